import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from loratrf import LoRALinear, MergeError
from reference import lora_magnitude, lora_reference

dims = st.integers(1, 24)
ranks = st.integers(1, 6)
alphas = st.floats(0.5, 64.0)
leading = st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple)


def make_layer(in_f, out_f, rank, alpha, bias=True, dtype=torch.float32, **options):
    """A LoRALinear over a fresh nn.Linear, with a non-zero adapter so merges mean something."""
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = LoRALinear.from_linear(base, rank=rank, alpha=alpha, **options)
    with torch.no_grad():
        layer.lora.V.normal_()
    return base, layer


def reference_of(layer, x):
    A, B = layer.lora.U.T, layer.lora.V.T
    return lora_reference(x, layer.weight, layer.bias, A, B, layer.lora.scale)


@given(dims, dims, ranks, alphas, st.booleans(), leading, st.booleans())
def test_forward_matches_the_lora_formula(in_f, out_f, rank, alpha, bias, lead, rslora):
    _, layer = make_layer(in_f, out_f, rank, alpha, bias, dtype=torch.float64, rslora=rslora)
    x = torch.randn(*lead, in_f, dtype=torch.float64)
    assert layer.lora.scale == pytest.approx(alpha / math.sqrt(rank) if rslora else alpha / rank)
    torch.testing.assert_close(layer(x), reference_of(layer, x), rtol=1e-12, atol=1e-12)


@given(
    dims,
    dims,
    ranks,
    st.booleans(),
    leading,
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
)
def test_fresh_layer_equals_its_base_exactly(in_f, out_f, rank, bias, lead, dtype):
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = LoRALinear.from_linear(base, rank=rank)
    x = torch.randn(*lead, in_f).to(dtype)
    assert torch.equal(layer(x), base(x))


def test_keeps_the_same_parameter_objects_and_keys():
    base = nn.Linear(5, 7)
    weight, bias = base.weight, base.bias
    layer = LoRALinear.from_linear(base, rank=2)
    assert layer.weight is weight and layer.bias is bias
    assert not weight.requires_grad and not bias.requires_grad
    assert list(layer.state_dict()) == ["weight", "bias", "lora.U", "lora.V"]
    layer.load_state_dict(nn.Linear(5, 7).state_dict(), strict=True)  # a base checkpoint loads strictly


@given(dims, dims, ranks, alphas, st.booleans(), leading)
def test_merge_equivalence_float64(in_f, out_f, rank, alpha, bias, lead):
    _, layer = make_layer(in_f, out_f, rank, alpha, bias, dtype=torch.float64)
    x = torch.randn(*lead, in_f, dtype=torch.float64)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-10)


@given(dims, dims, ranks, alphas, st.booleans(), leading)
def test_merge_equivalence_float32(in_f, out_f, rank, alpha, bias, lead):
    _, layer = make_layer(in_f, out_f, rank, alpha, bias)
    x = torch.randn(*lead, in_f)
    before = layer(x)
    layer.merge()
    scale = max(1.0, before.abs().max().item()) if before.numel() else 1.0
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5 * scale)


@given(dims, dims, ranks, alphas, st.booleans())
def test_merge_equivalence_bfloat16_within_rounding_bound(in_f, out_f, rank, alpha, bias):
    """bf16 rounds each product and sum to 8 significant bits, so the merged and unmerged paths
    may differ by a few units of 2^-8 of the magnitudes they add up. The stated bound
    (docs/method.md), elementwise: |y_merged - y_unmerged| <= 2^-6 (|x| |W0|ᵀ + scale (|x| |A|ᵀ) |B|ᵀ + |b|)."""
    _, layer = make_layer(in_f, out_f, rank, alpha, bias, dtype=torch.bfloat16)
    x = torch.randn(4, in_f).to(torch.bfloat16)
    before = layer(x).double()
    magnitude = lora_magnitude(layer, x)
    layer.merge()
    assert ((layer(x).double() - before).abs() <= 2.0**-6 * magnitude).all()


@given(dims, dims, ranks, alphas, st.sampled_from([torch.float32, torch.float64]))
def test_unmerge_restores_the_base_weight(in_f, out_f, rank, alpha, dtype):
    _, layer = make_layer(in_f, out_f, rank, alpha, dtype=dtype)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.weight, w0)
    layer.unmerge()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    delta_scale = max(1.0, layer.delta_weight(torch.float64).abs().max().item())
    torch.testing.assert_close(layer.weight, w0, rtol=tol, atol=tol * delta_scale)


def test_merge_twice_merges_once_and_unmerge_on_unmerged_does_nothing():
    _, layer = make_layer(6, 5, 2, 8.0)
    w0 = layer.weight.detach().clone()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    layer.merge()
    once = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, once)
    torch.testing.assert_close(once.double(), w0.double() + layer.delta_weight(torch.float64), rtol=1e-6, atol=1e-6)


def test_merged_forward_is_exactly_the_plain_linear():
    _, layer = make_layer(6, 5, 2, 8.0)
    layer.merge()
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_merge_is_computed_in_float32_for_half_weights():
    """A bf16 W0 merged through bf16 arithmetic would round ΔW before adding it; here W0 + ΔW
    is formed in float32 and rounded once."""
    _, layer = make_layer(16, 16, 4, 16.0, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora.V.mul_(1e-3)
    expected = (layer.weight.float() + layer.delta_weight(torch.float32)).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.weight, expected)


def test_float64_weights_merge_in_float64():
    _, layer = make_layer(8, 8, 2, 4.0, dtype=torch.float64)
    expected = layer.weight.detach() + layer.delta_weight(torch.float64)
    layer.merge()
    assert layer.weight.dtype == torch.float64
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-15)


def test_safe_merge_refuses_non_finite_and_leaves_the_weight():
    _, layer = make_layer(6, 5, 2, 8.0)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora.V[0, 0] = float("nan")
    with pytest.raises(MergeError, match="non-finite"):
        layer.merge(safe=True)
    assert torch.equal(layer.weight, w0) and not layer.merged


def test_safe_merge_refuses_half_precision_overflow():
    base = nn.Linear(4, 4, dtype=torch.float16)
    with torch.no_grad():
        base.weight.fill_(60000.0)
    layer = LoRALinear.from_linear(base, rank=1, alpha=1.0)
    with torch.no_grad():
        layer.lora.U.fill_(100.0)
        layer.lora.V.fill_(100.0)
    with pytest.raises(MergeError):
        layer.merge(safe=True)
    assert (layer.weight == 60000.0).all()


def test_backward_through_a_merged_layer_is_refused_but_inference_works():
    _, layer = make_layer(6, 5, 2, 8.0)
    layer.merge()
    x = torch.randn(3, 6)
    y = layer(x)  # a forward in training mode is fine
    with pytest.raises(MergeError, match="unmerge"):
        y.sum().backward()
    layer.eval()
    layer(x.requires_grad_()).sum().backward()  # eval: a plain linear, gradients for x only
    assert layer.lora.U.grad is None


def test_only_the_adapter_receives_gradients():
    _, layer = make_layer(6, 5, 2, 8.0)
    layer(torch.randn(3, 6)).pow(2).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora.U.grad is not None and layer.lora.U.grad.abs().sum() > 0
    assert layer.lora.V.grad is not None and layer.lora.V.grad.abs().sum() > 0


def test_gradients_match_autograd_of_the_reference():
    _, layer = make_layer(7, 5, 3, 6.0, dtype=torch.float64)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, U, V: _functional(layer, x, U, V), (x, layer.lora.U, layer.lora.V))


def _functional(layer, x, U, V):
    return lora_reference(x, layer.weight, layer.bias, U.T, V.T, layer.lora.scale)


def test_layer_gradients_equal_reference_gradients():
    _, layer = make_layer(7, 5, 3, 6.0, dtype=torch.float64)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 5, dtype=torch.float64)
    got = torch.autograd.grad(layer(x), (x, layer.lora.U, layer.lora.V), g)
    want = torch.autograd.grad(_functional(layer, x, layer.lora.U, layer.lora.V), (x, layer.lora.U, layer.lora.V), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_dropout_applies_to_the_adapter_input_only():
    _, layer = make_layer(6, 5, 2, 8.0, dropout=0.5)
    x = torch.randn(4, 6)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    dropped = F.dropout(x, 0.5, training=True)
    want = F.linear(x, layer.weight, layer.bias) + layer.lora.scale * dropped @ layer.lora.U @ layer.lora.V
    torch.testing.assert_close(y, want)
    layer.eval()
    torch.testing.assert_close(layer(x), reference_of(layer, x).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weights_get_float32_adapters_and_keep_their_output_dtype(dtype):
    _, layer = make_layer(8, 6, 2, 4.0, dtype=dtype)
    assert layer.lora.U.dtype == torch.float32
    x = torch.randn(3, 8).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), reference_of(layer, x), rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert layer.lora.V.grad.dtype == torch.float32


def test_autocast_bfloat16_forward_and_backward():
    _, layer = make_layer(8, 6, 2, 4.0)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference_of(layer, x), rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert layer.lora.U.grad is not None


def test_meta_device_allocates_nothing_and_runs_shapes():
    with torch.device("meta"):
        base = nn.Linear(4096, 11008)
    layer = LoRALinear.from_linear(base, rank=32)
    assert all(p.is_meta for p in layer.parameters())
    assert layer(torch.empty(2, 3, 4096, device="meta")).shape == (2, 3, 11008)
    layer.merge()
    layer.unmerge()


@given(dims, dims, ranks, alphas, leading)
def test_fan_in_fan_out_layout_computes_the_same_map(in_f, out_f, rank, alpha, lead):
    """GPT-2's Conv1D layout: W stored [in, out], y = x W + b; merges add (B A)ᵀ."""
    layer = LoRALinear(in_f, out_f, rank, alpha, fan_in_fan_out=True, dtype=torch.float64)
    assert layer.weight.shape == (in_f, out_f)
    with torch.no_grad():
        layer.lora.V.normal_()
    x = torch.randn(*lead, in_f, dtype=torch.float64)
    want = lora_reference(x, layer.weight.T, layer.bias, layer.lora.U.T, layer.lora.V.T, layer.lora.scale)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    layer.merge()
    torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def test_initialisations():
    torch.manual_seed(0)
    layer = LoRALinear(400, 300, rank=64, alpha=16.0)
    bound = 1 / math.sqrt(400)
    assert layer.lora.U.abs().max() <= bound and layer.lora.U.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora.V) == 0
    gaussian = LoRALinear(400, 300, rank=64, init="gaussian")
    assert gaussian.lora.U.std().item() == pytest.approx(1 / 64, rel=0.05)


def test_reset_adapter_returns_to_the_base():
    base, layer = make_layer(6, 5, 2, 8.0)
    layer.merge()
    layer.reset_adapter()
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(rank=0), "rank"), (dict(rank=2.5), "rank"), (dict(dropout=1.0), "dropout"), (dict(init="xavier"), "init")],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(4, 4, **kwargs)
