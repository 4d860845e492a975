import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loratrf
from loratrf import LoRALinear, MergeError, TaskAwareFilter
from models import FILTERS, TARGETS, Net, randomise_adapters

ids = torch.randint(0, 20, (3, 6))


def float64_net(**sizes):
    """A float64 `Net`: with random adapters a small model amplifies rounding about 250x
    (measured), so float32 outputs after a merge differ by CPU and kernel; float64 leaves room."""
    return Net(**sizes).double()


def injected(seed=0, **options):
    torch.manual_seed(seed)
    model = float64_net(d=16)
    base = float64_net(d=16)
    base.load_state_dict(model.state_dict())
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, **options)
    randomise_adapters(model)
    return base, model


def close_through_layers(a, b):
    """float64 agreement after several layers: rounding of 1e-16 relative, amplified by at most
    ~1e3, against 1e-10 relative to the output's size."""
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * max(1.0, b.abs().max().item()))


@given(st.integers(0, 10_000), st.integers(1, 8), st.floats(1.0, 32.0))
def test_model_merge_unmerge_round_trip(seed, rank, alpha):
    base, model = injected(seed, rank=rank, alpha=alpha)
    y = model(ids)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".weight")}
    loratrf.merge(model)
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    close_through_layers(model(ids), y)
    loratrf.unmerge(model)
    close_through_layers(model(ids), y)
    for n, p in model.named_parameters():
        if n in w0:
            torch.testing.assert_close(p, w0[n], rtol=1e-12, atol=1e-12)


def test_merge_folds_each_update_into_its_weight():
    base, model = injected()
    loratrf.merge(model)
    layer = model.layers[1].up
    expected = base.layers[1].up.weight + layer.lora.scale * (layer.lora.U @ layer.lora.V).T
    torch.testing.assert_close(layer.weight, expected)
    assert layer.weight is model.layers[1].up.weight


def test_safe_merge_changes_no_weight_when_any_would_break():
    _, model = injected()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.layers[1].down.lora.V[0, 0] = float("inf")
    with pytest.raises(MergeError):
        loratrf.merge(model, safe=True)
    for n, p in model.named_parameters():
        if not n.endswith(".lora.V"):
            assert torch.equal(p, weights[n]), n
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))


def test_unload_with_merge_gives_plain_linears_with_the_same_parameters():
    _, model = injected()
    y = model(ids)
    value = model.layers[0].value
    weight = value.weight
    plain = loratrf.unload(model, merge=True, keep_filters=True)
    assert plain is model
    assert type(model.layers[0].value) is nn.Linear and model.layers[0].value.weight is weight
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert any(isinstance(m, TaskAwareFilter) for m in model.modules())
    close_through_layers(model(ids), y)
    loratrf.unload(model, keep_filters=False)
    assert not any(isinstance(m, TaskAwareFilter) for m in model.modules())
    assert not any(model.layers[0]._forward_hooks.values())


def test_unload_without_merge_restores_the_base_model_exactly():
    base, model = injected()
    original_value = model.layers[0].value.base_module
    loratrf.unload(model, merge=False, keep_filters=False)
    assert model.layers[0].value is original_value
    assert list(model.state_dict()) == list(base.state_dict())
    assert torch.equal(model(ids), base(ids))


def test_unload_after_merge_then_merge_false_takes_the_update_out():
    base, model = injected()
    loratrf.merge(model)
    loratrf.unload(model, merge=False, keep_filters=False)
    close_through_layers(model(ids), base(ids))


def test_reset_adapters_returns_to_the_base_model():
    base, model = injected()
    loratrf.merge(model)
    loratrf.reset_adapters(model)
    close_through_layers(model(ids), base(ids))


def test_merged_model_in_eval_mode_runs_inference_with_filters():
    _, model = injected()
    model.eval()
    y = model(ids)
    loratrf.merge(model)
    with torch.no_grad():
        close_through_layers(model(ids), y)


def test_merge_and_unload_check_by_default_and_change_nothing_on_failure():
    _, model = injected()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.layers[1].up.lora.U[0, 0] = float("nan")
    for call in (lambda: loratrf.merge(model), lambda: loratrf.unload(model), lambda: model.layers[1].up.merge()):
        with pytest.raises(MergeError):
            call()
        assert all(torch.equal(p, weights[n]) or n.endswith("lora.U") for n, p in model.named_parameters())
        assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6
    loratrf.merge(model, safe=False)  # the unchecked merge writes what it computes
    assert torch.isnan(model.layers[1].up.weight).any()


@given(st.integers(0, 10_000), st.booleans())
def test_unload_by_default_keeps_what_a_filtered_model_computes(seed, merge):
    """The deployment call `unload(model)` keeps trained filters (on the plain modules), so a
    3-layer LoRATRF model computes what it did; only `keep_filters=False` drops them."""
    torch.manual_seed(seed)
    model = float64_net(layers=3, d=16)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    loratrf.inject(model, targets=TARGETS, filters=[*FILTERS, r"layers\.\d+\.up"])
    randomise_adapters(model)
    y = model(ids)
    filters = [layer.task_filter for layer in model.layers]
    up_filters = [layer.up.task_filter for layer in model.layers]
    loratrf.unload(model, merge=merge)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert [layer.task_filter for layer in model.layers] == filters
    if merge:
        close_through_layers(model(ids), y)
    y_plain = model(ids)
    loratrf.inject(model, targets=[r"layers\.\d+\.up"])  # a kept filter's host can be a target again
    assert torch.equal(model(ids), y_plain)
    assert [layer.up.task_filter for layer in model.layers] == up_filters
    assert all(isinstance(layer.up, LoRALinear) for layer in model.layers)
    loratrf.unload(model, keep_filters=False)
    assert not any(isinstance(m, TaskAwareFilter) for m in model.modules())
    if not merge:
        base = float64_net(layers=3, d=16)
        base.load_state_dict(base_state)
        assert torch.equal(model(ids), base(ids))
