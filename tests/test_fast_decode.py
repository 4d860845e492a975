"""`loratrf.cache_effective_weights`: the cached effective weight (a filter's `[U | t]ᵀ` and `|t|`)
equals the plain formula, and is never stale (optimizer steps, in-place edits, set_adapter,
use_adapters, load_adapter, merge, unmerge, replaced parameters), in eval and train mode, with and
without gradients."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import FILTERS, TARGETS, Net, randomise_adapters
from reference import filter_reference, lora_reference

import loratrf
from loratrf import LoRALinear, TaskAwareFilter, kernels


def layer(in_f, out_f, rank, bias, fan_in_fan_out=False, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(in_f, out_f, bias=bias, dtype=torch.float64)
    if fan_in_fan_out:  # HF's Conv1D layout (weight [in, out]; it always has a bias)
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(out_f, in_f).double()
    lay = LoRALinear.from_linear(base, rank=rank, alpha=2.0 * rank)
    with torch.no_grad():
        lay.lora.V.normal_()
    return lay


def formula(lay, x):
    """The layer's map written out (`lora_reference`), from its current tensors."""
    w = lay.weight.T if lay.fan_in_fan_out else lay.weight
    return lora_reference(x, w, lay.bias, lay.lora.U.T, lay.lora.V.T, lay.lora.scale)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(1, 4),
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_cached_layer_equals_the_formula_and_the_fused_forward(in_f, out_f, rank, lead, bias, fan_in_fan_out, training):
    lay = layer(in_f, out_f, rank, bias, fan_in_fan_out).train(training)
    x = torch.randn(*lead, in_f, dtype=torch.float64)
    with torch.no_grad(), loratrf.cache_effective_weights(lay):
        got = lay(x)
        again = lay(x)
    torch.testing.assert_close(got, formula(lay, x), rtol=1e-12, atol=1e-12)
    assert torch.equal(got, again)
    with torch.no_grad():  # the same kernels as the layer's own fused forward, bit for bit
        fused = kernels.lora_linear(
            x, lay.weight, lay.bias, lay.lora.U, lay.lora.V, lay.lora.scale, fan_in_fan_out, fuse=True
        )
    assert torch.equal(got, fused)


def test_the_cache_is_formed_once_per_version_and_freed_when_the_block_ends():
    lay = layer(6, 5, 2, True)
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad(), loratrf.cache_effective_weights(lay):
        lay(x)
        cached = lay.weight_cache.value
        lay(x)
        assert lay.weight_cache.value is cached  # reused, not formed again
        with loratrf.cache_effective_weights(lay):  # nested: the same cache
            assert lay.weight_cache.value is cached
        assert lay.weight_cache.value is cached
        lay.lora.V.add_(1.0)  # an in-place write bumps V's version
        torch.testing.assert_close(lay(x), formula(lay, x), rtol=1e-12, atol=1e-12)
        assert lay.weight_cache.value is not cached
    assert lay.weight_cache is None


def test_with_gradients_the_layer_trains_as_before_inside_the_block():
    lay = layer(6, 5, 2, True)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    with loratrf.cache_effective_weights(lay):
        got = lay(x)
    assert type(got.grad_fn).__name__ == "LoRALinearFunctionBackward"
    want = formula(lay, x)
    g = torch.randn_like(want)
    params = (x, lay.lora.U, lay.lora.V)
    for a, e in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)


def test_dropout_in_training_takes_the_plain_path_inside_the_block():
    lay = LoRALinear.from_linear(torch.nn.Linear(6, 5, dtype=torch.float64), rank=2, dropout=0.5).train()
    x = torch.randn(64, 6, dtype=torch.float64)
    with torch.no_grad(), loratrf.cache_effective_weights(lay):
        lay(x)
        assert lay.weight_cache.value is None  # dropout is active: nothing cached
        lay.eval()
        torch.testing.assert_close(lay(x), formula(lay, x), rtol=1e-12, atol=1e-12)
        assert lay.weight_cache.value is not None  # eval: no dropout, the cache runs


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 4),
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    st.sampled_from(["cosine", "dot"]),
    st.booleans(),
)
def test_a_cached_filter_equals_the_formula_and_its_own_forward(dim, rank, lead, similarity, training):
    torch.manual_seed(dim * 10 + rank)
    f = TaskAwareFilter(dim, rank, 2.0 * rank, similarity=similarity, dtype=torch.float64).train(training)
    with torch.no_grad():
        f.transform.V.normal_()
    h = torch.randn(*lead, dim, dtype=torch.float64) + 2 * f.task_vector.detach()  # most gates open
    with torch.no_grad():
        plain = f(h)
        with loratrf.cache_effective_weights(f):
            got, again = f(h), f(h)
    T = f.transform
    want = filter_reference(h, f.task_vector, T.U, T.V, T.scale, similarity)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, plain) and torch.equal(got, again)  # the same kernels, bit for bit


def test_a_filters_cache_is_formed_once_per_version_of_u_and_t():
    f = TaskAwareFilter(6, 2, 4.0, dtype=torch.float64)
    with torch.no_grad():
        f.transform.V.normal_()
    h = torch.randn(3, 6, dtype=torch.float64) + 2 * f.task_vector.detach()

    def formula():
        return filter_reference(h, f.task_vector, f.transform.U, f.transform.V, f.transform.scale)

    with torch.no_grad(), loratrf.cache_effective_weights(f):
        f(h)
        packed = f.weight_cache.value
        f(h)
        assert f.weight_cache.value is packed  # reused
        f.task_vector.mul_(-1.0)  # every gate shuts: the output is h itself
        torch.testing.assert_close(f(h), h, rtol=0, atol=0)
        assert f.weight_cache.value is not packed
        f.task_vector.mul_(-1.0)
        f.transform.U.add_(0.5)
        torch.testing.assert_close(f(h), formula(), rtol=1e-12, atol=1e-12)
        f.transform.U = torch.nn.Parameter(torch.randn_like(f.transform.U))  # a new tensor, version 0
        torch.testing.assert_close(f(h), formula(), rtol=1e-12, atol=1e-12)
    assert f.weight_cache is None


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = Net(layers=2, d=8).double()
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, rank=3)
    randomise_adapters(model)
    return model


def uncached(model, ids):
    """The model's output outside any block: the dispatch's own paths, tested against the formula."""
    with torch.no_grad():
        return model(ids)


def cached(model, ids):
    with torch.no_grad():
        return model(ids)


IDS = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("training", [False, True])
def test_after_an_optimizer_step_the_cache_is_formed_again(net, training):
    net.train(training)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1)
    with loratrf.cache_effective_weights(net):
        before = cached(net, IDS)
        net(IDS).sum().backward()  # training inside the block: the uncached, differentiable path
        optimizer.step()
        after = cached(net, IDS)
    assert not torch.allclose(before, after)  # the step changed the model
    torch.testing.assert_close(after, uncached(net, IDS), rtol=1e-10, atol=1e-10)


def test_set_adapter_and_use_adapters_inside_the_block(net):
    loratrf.inject(net, targets=TARGETS, filters=FILTERS, rank=2, adapter="other")
    randomise_adapters(net)
    want = {}
    for name in ("default", "other"):
        loratrf.set_adapter(net, name)
        want[name] = uncached(net, IDS)
    with loratrf.cache_effective_weights(net):
        for name in ("default", "other", "default"):
            loratrf.set_adapter(net, name)
            torch.testing.assert_close(cached(net, IDS), want[name], rtol=1e-10, atol=1e-10)
        names = ["other", "default", None, "other"]
        with loratrf.use_adapters(net, names):
            rows = cached(net, IDS)
    loratrf.set_adapter(net, None)
    base = uncached(net, IDS)
    for i, name in enumerate(names):
        expected = base[i] if name is None else want[name][i]
        torch.testing.assert_close(rows[i], expected, rtol=1e-10, atol=1e-10)


def test_load_adapter_inside_the_block(net, tmp_path):
    path = tmp_path / "adapter.safetensors"
    loratrf.save_adapter(net, path)
    saved = uncached(net, IDS)
    with loratrf.cache_effective_weights(net):
        cached(net, IDS)
        randomise_adapters(net, torch.Generator().manual_seed(5))
        changed = cached(net, IDS)
        loratrf.load_adapter(net, path)
        loaded = cached(net, IDS)
    assert not torch.allclose(changed, saved)
    torch.testing.assert_close(loaded, saved, rtol=1e-10, atol=1e-10)


def test_merge_and_unmerge_inside_the_block(net):
    want = uncached(net, IDS)
    with loratrf.cache_effective_weights(net):
        cached(net, IDS)
        loratrf.merge(net)
        torch.testing.assert_close(cached(net, IDS), want, rtol=1e-10, atol=1e-10)
        loratrf.unmerge(net)
        torch.testing.assert_close(cached(net, IDS), want, rtol=1e-10, atol=1e-10)
        for m in net.modules():  # a changed adapter after unmerge: formed again from the restored W0
            if isinstance(m, LoRALinear):
                with torch.no_grad():
                    m.lora.V.mul_(2.0)
        changed = cached(net, IDS)
    torch.testing.assert_close(changed, uncached(net, IDS), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(changed, want)


def test_a_replaced_parameter_is_seen(net):
    lay = next(m for m in net.modules() if isinstance(m, LoRALinear))
    task_filter = next(m for m in net.modules() if isinstance(m, TaskAwareFilter))
    with loratrf.cache_effective_weights(net):
        cached(net, IDS)
        lay.lora.V = torch.nn.Parameter(torch.randn_like(lay.lora.V))  # a new tensor, version 0
        task_filter.task_vector = torch.nn.Parameter(torch.randn_like(task_filter.task_vector))
        got = cached(net, IDS)
    torch.testing.assert_close(got, uncached(net, IDS), rtol=1e-10, atol=1e-10)


def test_a_copy_of_the_model_made_inside_the_block_computes_the_same(net):
    with loratrf.cache_effective_weights(net):
        want = cached(net, IDS)
        twin = copy.deepcopy(net)
    torch.testing.assert_close(uncached(twin, IDS), want, rtol=1e-10, atol=1e-10)


def test_decoding_sized_products_run_atens_kernel_without_measuring():
    kernels.clear_kernel_choices()
    lay = LoRALinear.from_linear(torch.nn.Linear(48, 40), rank=4)
    with torch.no_grad():
        lay.lora.V.normal_()
        x = torch.randn(16, 1, 48)  # one token for each of 16 sequences: FEW_ROWS or fewer
        got = lay(x)
    assert not any(kernels.kernel_choices().values())  # nothing timed, nothing chosen
    want = formula(lay, x.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
