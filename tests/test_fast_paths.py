"""The hand-written forward/backward passes (loratrf.fused) against the plain formulas."""

import contextlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from allocations import count_allocations_of_at_least
from loratrf import LoRALinear, TaskAwareFilter
from loratrf.fused import (
    LoRALinearFunction,
    TaskFilterFunction,
    add_low_rank,
    fuse_effective_weight,
    lora_linear,
    small_mm,
    task_filter,
)
from reference import filter_reference, lora_reference

f64 = dict(dtype=torch.float64)
dims = st.integers(1, 24)
ranks = st.integers(1, 6)
leading = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


def lora_tensors(in_f, out_f, rank, lead, bias, fan_in_fan_out, dtype=torch.float64):
    weight = torch.randn((in_f, out_f) if fan_in_fan_out else (out_f, in_f), dtype=dtype)
    b = torch.randn(out_f, dtype=dtype) if bias else None
    U = torch.randn(in_f, rank, dtype=dtype, requires_grad=True)
    V = torch.randn(rank, out_f, dtype=dtype, requires_grad=True)
    x = torch.randn(*lead, in_f, dtype=dtype, requires_grad=True)
    return x, weight, b, U, V


def lora_plain(x, weight, bias, U, V, scale, fan_in_fan_out):
    w = weight.T if fan_in_fan_out else weight
    return lora_reference(x, w, bias, U.T, V.T, scale)


@given(dims, dims, ranks, leading, st.booleans(), st.booleans(), st.booleans(), st.floats(0.25, 8.0))
def test_lora_function_equals_the_formula_with_and_without_the_effective_weight(
    in_f, out_f, rank, lead, bias, fan_in_fan_out, fuse, scale
):
    x, weight, b, U, V = lora_tensors(in_f, out_f, rank, lead, bias, fan_in_fan_out)
    got = lora_linear(x, weight, b, U, V, scale, fan_in_fan_out, fuse=fuse)
    want = lora_plain(x, weight, b, U, V, scale, fan_in_fan_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (x, U, V), g)
    for a, e in zip(grads, torch.autograd.grad(want, (x, U, V), g)):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)
    with torch.no_grad():  # the forward-only path
        torch.testing.assert_close(lora_linear(x, weight, b, U, V, scale, fan_in_fan_out, fuse=fuse), want)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("fuse", [False, True])
def test_lora_function_gradcheck(fuse, fan_in_fan_out):
    x, weight, b, U, V = lora_tensors(5, 4, 2, (2, 3), True, fan_in_fan_out)
    fn = lambda x, U, V: LoRALinearFunction.apply(x, weight, b, U, V, 1.5, fan_in_fan_out, fuse)  # noqa: E731
    torch.autograd.gradcheck(fn, (x, U, V))


def test_lora_function_computes_only_the_gradients_asked_for():
    x, weight, b, U, V = lora_tensors(6, 5, 2, (4,), True, False)
    (gV,) = torch.autograd.grad(lora_linear(x.detach(), weight, b, U.detach(), V, 2.0).sum(), (V,))
    want = torch.autograd.grad(lora_plain(x, weight, b, U, V, 2.0, False).sum(), (V,))[0]
    torch.testing.assert_close(gV, want)


def trained_layer(in_f, out_f, rank=4, dtype=torch.float32, fan_in_fan_out=False, **options):
    if fan_in_fan_out:  # GPT-2's Conv1D layout
        layer = LoRALinear(in_f, out_f, rank, 8.0, fan_in_fan_out=True, dtype=dtype, **options)
    else:
        layer = LoRALinear.from_linear(nn.Linear(in_f, out_f, dtype=dtype), rank=rank, alpha=8.0, **options)
    with torch.no_grad():
        layer.lora.V.normal_()
    return layer


def plain_lora(layer, x):
    """The unfused formula as autograd would run it: base map plus the low-rank update."""
    return layer.base_forward(x) + layer.lora(x)


def backward_name(y):
    return type(y.grad_fn).__name__


@contextlib.contextmanager
def kernels(onednn):
    """float32 rank-r products through oneDNN (where this build has it) or through F.linear."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@pytest.mark.parametrize("onednn", [True, False])
def test_small_products_equal_matmul_for_every_layout_used(onednn):
    x, z, V = torch.randn(64, 24), torch.randn(64, 5), torch.randn(5, 24)
    with kernels(onednn):
        torch.testing.assert_close(small_mm(x, V), x @ V.T)  # x Vᵀ
        torch.testing.assert_close(small_mm(z.T, x.T), z.T @ x)  # zᵀ x, both transposed views
        torch.testing.assert_close(small_mm(x, V.T.contiguous().T), x @ V.T)
        torch.testing.assert_close(add_low_rank(x, z, V, 0.5), x + 0.5 * z @ V)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("rows", [3, 512])  # below and above the effective-weight threshold
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_float32_layer_takes_the_fast_path_and_equals_the_plain_formula(rows, fan_in_fan_out, onednn):
    layer = trained_layer(48, 40, fan_in_fan_out=fan_in_fan_out)
    assert fuse_effective_weight(rows, 48, 40) == (rows == 512)
    x = torch.randn(rows, 48, requires_grad=True)
    g = torch.randn(rows, 40)
    params = (x, layer.lora.U, layer.lora.V)
    with kernels(onednn):
        y = layer(x)
        got = torch.autograd.grad(y, params, g)
    assert backward_name(y) == "LoRALinearFunctionBackward"
    want = plain_lora(layer, x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    for a, e in zip(got, torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "why, make",
    [
        ("bfloat16 weights", lambda: trained_layer(8, 6, dtype=torch.bfloat16)),
        ("dropout in training", lambda: trained_layer(8, 6, dropout=0.1)),
        ("a trainable base weight", lambda: trained_layer(8, 6).requires_grad_(True)),
    ],
)
def test_other_cases_run_the_plain_formula(why, make):
    layer = make()
    x = torch.randn(3, 8).to(layer.weight.dtype)
    assert backward_name(layer(x)) != "LoRALinearFunctionBackward", why


def test_autocast_runs_the_plain_formula():
    layer = trained_layer(8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(3, 8))
    assert y.dtype == torch.bfloat16 and backward_name(y) != "LoRALinearFunctionBackward"


def saved_bytes(fn, *args):
    """Bytes autograd keeps for backward, each storage counted once."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


@pytest.mark.parametrize("rows", [64, 1024])
def test_lora_saves_its_input_and_rank_sized_tensors_only(rows):
    layer = trained_layer(128, 96, rank=8)
    x = torch.randn(rows, 128, requires_grad=True)
    params = sum(p.untyped_storage().nbytes() for p in layer.parameters())
    extra = saved_bytes(layer, x) - x.untyped_storage().nbytes() - params
    assert 0 < extra <= 4 * (rows * 8 + 128 * 8)  # z = x U [N, r] and A = Uᵀ [r, in]


def test_fused_forward_allocates_only_its_output():
    layer = trained_layer(64, 96, rank=8)
    x = torch.randn(4, 64, 64)
    assert fuse_effective_weight(256, 64, 96)
    assert count_allocations_of_at_least(256 * 96, layer, x) == 1
    assert count_allocations_of_at_least(256 * 96, plain_lora, layer, x) >= 2  # the count can fail


def test_fresh_fast_layer_equals_its_base_exactly():
    for rows in (3, 512):
        base = nn.Linear(48, 40)
        layer = LoRALinear.from_linear(base, rank=4)
        x = torch.randn(rows, 48, requires_grad=True)
        assert torch.equal(layer(x), base(x))


# --- the task-aware filter -------------------------------------------------------------


def filter_tensors(dim, rank, lead, dtype=torch.float64, toward_t=True):
    t = torch.randn(dim, dtype=dtype) / dim**0.5
    U = torch.randn(dim, rank, dtype=dtype) / dim**0.5
    V = torch.randn(rank, dim, dtype=dtype)
    h = torch.randn(*lead, dim, dtype=dtype)
    if toward_t:  # some tokens near t (s = 1 after the clamp), some far (s = 0), some between
        h = h + 3 * torch.randn(*lead, 1, dtype=dtype) * t
    return [x.requires_grad_() for x in (h, t, U, V)]


@given(st.integers(2, 32), st.integers(1, 6), leading, st.sampled_from(["cosine", "dot"]), st.floats(0.25, 8.0))
def test_filter_function_equals_the_papers_equations_and_their_gradients(dim, rank, lead, similarity, scale):
    h, t, U, V = filter_tensors(dim, rank, lead)
    cosine = similarity == "cosine"
    got = task_filter(h, t, U, V, scale, cosine, 1e-8)
    want = filter_reference(h, t, U, V, scale, similarity)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, (h, t, U, V), g), torch.autograd.grad(want, (h, t, U, V), g)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cosine", [True, False])
def test_filter_function_gradcheck(cosine):
    h, t, U, V = filter_tensors(6, 2, (2, 3))
    with torch.no_grad():
        q = (h @ t) / (h.norm(dim=-1) * t.norm()) if cosine else h @ t
    assert ((q - 0).abs().min() > 1e-3) and ((q - 1).abs().min() > 1e-3)  # away from the clamp's kinks
    assert ((q > 0) & (q < 1)).any() and ((q < 0) | (q > 1)).any()  # both sides of the clamp
    fn = lambda h, t, U, V: TaskFilterFunction.apply(h, t, U, V, 1.5, cosine, 1e-8)  # noqa: E731
    torch.autograd.gradcheck(fn, (h, t, U, V))


def test_filter_function_zero_tokens_get_zero_relevance_and_finite_gradients():
    h, t, U, V = filter_tensors(8, 2, (3,), toward_t=False)
    with torch.no_grad():
        h[1] = 0.0
    out = task_filter(h, t, U, V, 2.0, True, 1e-8)
    assert torch.equal(out[1], h[1])
    grads = torch.autograd.grad(out.pow(2).sum(), (h, t, U, V))
    want = torch.autograd.grad(filter_reference(h, t, U, V, 2.0).pow(2).sum(), (h, t, U, V))
    for a, e in zip(grads, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e)


def trained_filter(dim, rank=8, dtype=torch.float32, **options):
    f = TaskAwareFilter(dim, rank, 16.0, dtype=dtype, **options)
    with torch.no_grad():
        f.transform.V.normal_()
    return f


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_float32_filter_takes_the_fast_path_and_equals_the_plain_formula(similarity, onednn):
    f = trained_filter(64, similarity=similarity)
    h = torch.randn(4, 16, 64) + 2 * torch.randn(4, 16, 1) * f.task_vector.detach() * 8
    h.requires_grad_()
    g = torch.randn_like(h)
    params = (h, f.task_vector, f.transform.U, f.transform.V)
    with kernels(onednn):
        out = f(h)
        got = torch.autograd.grad(out, params, g)
    assert backward_name(out) == "TaskFilterFunctionBackward"
    plain = f.transform(h, gate=f.relevance(h), residual=h)  # the module's plain formula
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    for a, e in zip(got, torch.autograd.grad(plain, params, g)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_low_precision_and_autocast_filters_run_the_plain_formula():
    f = trained_filter(16)
    assert backward_name(f(torch.randn(3, 16).bfloat16())) != "TaskFilterFunctionBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert backward_name(f(torch.randn(3, 16))) != "TaskFilterFunctionBackward"


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_filter_saves_little_more_than_its_input(similarity):
    f = trained_filter(256, rank=8, similarity=similarity)
    h = torch.randn(8, 64, 256, requires_grad=True)
    params = sum(p.untyped_storage().nbytes() for p in f.parameters())
    saved = saved_bytes(f, h) - params
    assert h.untyped_storage().nbytes() <= saved <= 1.05 * h.untyped_storage().nbytes()
    naive = lambda h: h + (f.relevance(h) * h) @ f.transform.U @ f.transform.V  # noqa: E731
    assert saved_bytes(naive, h) - params > 2 * h.untyped_storage().nbytes()  # the count can fail


def test_filter_forward_allocates_only_its_output():
    f = trained_filter(128)
    h = torch.randn(4, 32, 128, requires_grad=True)
    assert count_allocations_of_at_least(h.numel(), f, h) == 1


def test_filter_gradients_for_a_frozen_task_vector_and_input():
    f = trained_filter(16, dtype=torch.float64)
    f.task_vector.requires_grad_(False)
    h = torch.randn(5, 16, dtype=torch.float64)
    out = f(h)
    gU, gV = torch.autograd.grad(out.sum(), (f.transform.U, f.transform.V))
    ref = filter_reference(h, f.task_vector, f.transform.U, f.transform.V, f.transform.scale)
    wU, wV = torch.autograd.grad(ref.sum(), (f.transform.U, f.transform.V))
    torch.testing.assert_close(gU, wU)
    torch.testing.assert_close(gV, wV)
