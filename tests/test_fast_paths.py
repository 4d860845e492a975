"""The fused forward/backward passes (loratrf.kernels) against the plain formulas: values and
gradients for every layout an input or a gradient can have, with each kernel, and the dispatch."""

import contextlib

import pytest
import torch
from allocations import count_allocations_of_at_least
from hypothesis import given
from hypothesis import strategies as st
from reference import filter_reference, lora_reference
from torch import nn

from loratrf import LoRALinear, TaskAwareFilter, kernels
from loratrf.kernels import (
    KernelChoice,
    LoRALinearFunction,
    TaskFilterFunction,
    add_low_rank,
    fuse_effective_weight,
    layout,
    lora_linear,
    mm_t,
    pack_task,
    rows,
    task_filter,
    use_kernels,
)

dims = st.integers(1, 24)
ranks = st.integers(1, 6)
leading = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
KERNELS = ["aten", "onednn", None]  # None: the measured choice


@pytest.fixture(autouse=True)
def _fresh_choices():
    kernels.clear_kernel_choices()
    yield
    kernels.clear_kernel_choices()


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
    assert backward_name(got) == "LoRALinearFunctionBackward"
    want = lora_plain(x, weight, b, U, V, scale, fan_in_fan_out)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    grads = torch.autograd.grad(got, (x, U, V), g)
    for a, e in zip(grads, torch.autograd.grad(want, (x, U, V), g)):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)
    with torch.no_grad():  # the forward alone: the same code, bit for bit
        assert torch.equal(lora_linear(x, weight, b, U, V, scale, fan_in_fan_out, fuse=fuse), got)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("fuse", [False, True])
def test_lora_function_gradcheck(fuse, fan_in_fan_out):
    x, weight, b, U, V = lora_tensors(5, 4, 2, (2, 3), True, fan_in_fan_out)
    fn = lambda x, U, V: LoRALinearFunction.apply(x, weight, b, U, V, 1.5, fan_in_fan_out, fuse)
    torch.autograd.gradcheck(fn, (x, U, V))


@pytest.mark.parametrize("fuse", [False, True])
def test_lora_function_computes_only_the_gradients_asked_for(fuse):
    x, weight, b, U, V = lora_tensors(6, 5, 2, (4,), True, False)
    for wanted in ((V,), (U,), (x,), (x, V)):
        inputs = [t if any(t is w for w in wanted) else t.detach() for t in (x, U, V)]
        got = torch.autograd.grad(lora_linear(inputs[0], weight, b, *inputs[1:], 2.0, fuse=fuse).sum(), wanted)
        want = torch.autograd.grad(lora_plain(x, weight, b, U, V, 2.0, False).sum(), wanted)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)


def trained_layer(in_f, out_f, rank=4, dtype=torch.float32, fan_in_fan_out=False, **options):
    if fan_in_fan_out:  # GPT-2's Conv1D layout
        layer = LoRALinear(in_f, out_f, rank, 8.0, fan_in_fan_out=True, dtype=dtype, **options)
    else:
        layer = LoRALinear.from_linear(nn.Linear(in_f, out_f, dtype=dtype), rank=rank, alpha=8.0, **options)
    with torch.no_grad():
        layer.lora.V.normal_()
    return layer


def backward_name(y):
    return type(y.grad_fn).__name__


# --- layouts ---------------------------------------------------------------------------
#
# Each input layout is a function of a dense float64 tensor `[B, S, d]` (whose values it keeps,
# or, for the expanded ones, replaces) and each gradient layout a loss on the output: autograd
# hands the layer the gradient in that layout, as it would inside a network.

B, S = 3, 5  # leading dims: N = 15 rows


def _contiguous(t):
    return t


def _two_d(t):
    return t.reshape(-1, t.shape[-1])


def _transposed(t):  # [S, B, d] memory read as [B, S, d]: the batch dims do not fold into rows
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _transposed_2d(t):  # a column-major matrix [N, d]
    t = t.reshape(-1, t.shape[-1])
    return t.T.contiguous().T


def _sliced(t):  # rows of a wider tensor: row stride > d
    wide = torch.cat([t, torch.randn_like(t)], dim=-1)
    return wide[..., : t.shape[-1]]


def _expanded(t):  # one token broadcast to every position: stride 0 on the batch dims
    return t[:1, :1].expand_as(t)


def _expanded_all(t):  # one value everywhere: strides all 0
    return t.flatten()[:1].reshape(1, 1, 1).expand_as(t)


INPUT_LAYOUTS = {f.__name__[1:]: f for f in (_contiguous, _two_d, _transposed, _transposed_2d, _sliced, _expanded)}
INPUT_LAYOUTS["expanded_all"] = _expanded_all


def _dense_loss(y, w):
    return (y * w).sum()


def _sum_loss(y, w):  # `.sum()` hands back a gradient of strides (0, 0, ...)
    return y.sum()


def _rows_sum_loss(y, w):  # a sum over the leading dim: the gradient has stride 0 there
    return (y.sum(0) * w[0]).sum()


def _transposed_loss(y, w):  # times a transposed tensor: the gradient arrives with its strides
    return (y * w.transpose(0, -1).contiguous().transpose(0, -1)).sum()


def _concatenated_loss(y, w):  # through a concatenation: the gradient is a slice of a wider one
    return (torch.cat([y, w], dim=-1) * torch.cat([w, w], dim=-1)).sum()


GRADIENT_LAYOUTS = {
    f.__name__[1:-5]: f for f in (_dense_loss, _sum_loss, _rows_sum_loss, _transposed_loss, _concatenated_loss)
}


def check_layouts(module, d_in, params, make_input, loss, kernel, reference):
    """Values and gradients of the float32 fast path, its input made by `make_input` (so in that
    layout, a view of a leaf) and its output's gradient in the layout `loss` gives, against the
    float64 `reference` on dense tensors."""
    x = make_input(torch.randn(B, S, d_in, requires_grad=True))
    with use_kernels(kernel):
        y = module(x)
        assert backward_name(y) in ("LoRALinearFunctionBackward", "TaskFilterFunctionBackward")
        assert y._base is None  # not a view
        w = torch.randn(y.shape)
        got = torch.autograd.grad(loss(y, w), (x, *params))
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    want_y = reference(x64, *p64)
    want = torch.autograd.grad(loss(want_y, w.double()), (x64, *p64))
    torch.testing.assert_close(y.double(), want_y, rtol=1e-4, atol=1e-4)
    for name, a, e in zip(("input", *(f"parameter {i}" for i in range(len(params)))), got, want):
        atol = 1e-4 * max(1.0, e.abs().max().item())  # float32 sums of up to B * S terms
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_layouts_are_what_their_names_say():
    t = torch.randn(B, S, 8)
    assert layout(rows(INPUT_LAYOUTS["contiguous"](t))) == "r"
    assert layout(rows(INPUT_LAYOUTS["transposed_2d"](t))) == "c"
    assert layout(rows(INPUT_LAYOUTS["sliced"](t))) == "r" and rows(INPUT_LAYOUTS["sliced"](t)).stride(0) == 16
    for name in ("expanded", "expanded_all"):
        x = INPUT_LAYOUTS[name](t)
        assert 0 in x.stride() and layout(x.reshape(-1, 8)) is None
        assert layout(rows(x)) == "r" and rows(x).is_contiguous()  # made dense once
    assert layout(torch.ones(8).expand(1, 8)) == "r" and layout(torch.ones(8, 1)) == "r"  # size-1 dims: any stride
    assert layout(torch.ones(()).expand(1, 8)) is None


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gradient", GRADIENT_LAYOUTS)
@pytest.mark.parametrize("inputs", INPUT_LAYOUTS)
@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_lora_every_layout(fan_in_fan_out, fuse, inputs, gradient, kernel, monkeypatch):
    layer = trained_layer(12, 10, fan_in_fan_out=fan_in_fan_out)
    monkeypatch.setattr(kernels, "FUSE_RATIO", 0.0 if fuse else float("inf"))
    assert kernels.fuse_effective_weight(B * S, 12, 10) == fuse

    def reference(x, U, V):
        w = layer.weight.double()
        return lora_reference(x, w.T if fan_in_fan_out else w, layer.bias.double(), U.T, V.T, layer.lora.scale)

    check_layouts(
        layer, 12, (layer.lora.U, layer.lora.V), INPUT_LAYOUTS[inputs], GRADIENT_LAYOUTS[gradient], kernel, reference
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gradient", GRADIENT_LAYOUTS)
@pytest.mark.parametrize("inputs", INPUT_LAYOUTS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_filter_every_layout(similarity, inputs, gradient, kernel):
    f = trained_filter(12, rank=4, similarity=similarity)
    T = f.transform

    def reference(h, t, U, V):
        return filter_reference(h, t, U, V, T.scale, similarity)

    check_layouts(
        f, 12, (f.task_vector, T.U, T.V), INPUT_LAYOUTS[inputs], GRADIENT_LAYOUTS[gradient], kernel, reference
    )


# --- kernels and their choice ------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
def test_products_equal_matmul_for_every_layout_used(kernel):
    x, z, V = torch.randn(64, 24), torch.randn(64, 5), torch.randn(5, 24)
    with use_kernels(kernel):
        torch.testing.assert_close(mm_t(x, V), x @ V.T)  # x Vᵀ
        torch.testing.assert_close(mm_t(z.T, x.T), z.T @ x)  # zᵀ x, both transposed views
        torch.testing.assert_close(mm_t(x, V.T.contiguous().T), x @ V.T)
        torch.testing.assert_close(mm_t(x.T.contiguous().T, V), x @ V.T)  # a column-major x
        torch.testing.assert_close(add_low_rank(x, z, V, 0.5), x + 0.5 * z @ V)
        torch.testing.assert_close(add_low_rank(x.T.contiguous().T, z, V, 1.0), x + z @ V)


class FakeClock:
    """`time.perf_counter` for `KernelChoice`: each fake kernel advances it by its cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def kernel(self, cost, value):
        def run(a):
            self.now += cost
            return a * 0 + value

        return run


@pytest.mark.parametrize(
    "aten_cost, onednn_cost, chosen", [(1.0, 0.5, "onednn"), (1.0, 0.97, "aten"), (1.0, 2, "aten")]
)
def test_the_measured_choice_is_onednn_only_when_clearly_faster(monkeypatch, aten_cost, onednn_cost, chosen):
    clock = FakeClock()
    monkeypatch.setattr(kernels.time, "perf_counter", clock)
    choice = KernelChoice("test", clock.kernel(aten_cost, 1.0), clock.kernel(onednn_cost, 2.0))
    a = torch.zeros(20, 3)
    first = choice(a)  # measures both (1 + TIMED_CALLS calls each), returns the chosen kernel's result
    assert list(choice.chosen.values()) == [chosen]
    value = 2.0 if chosen == "onednn" else 1.0
    assert torch.equal(first, torch.full((20, 3), value))
    before = clock.now
    assert torch.equal(choice(torch.zeros(30, 3)), torch.full((30, 3), value))  # the same size class: cached
    assert clock.now - before == (onednn_cost if chosen == "onednn" else aten_cost)
    choice(torch.zeros(20, 3).T.contiguous().T)  # another layout: measured on its own
    assert len(choice.chosen) == 2


def test_measured_choices_are_cached_per_shape_class_and_layout():
    x, V = torch.randn(100, 24), torch.randn(5, 24)
    mm_t(x, V)
    mm_t(torch.randn(120, 24), V)  # 100 and 120 rows: one size class (128)
    mm_t(x.T.contiguous().T, V)
    (choices,) = [c for name, c in kernels.kernel_choices().items() if name == mm_t.name]
    assert {key[1:] for key in choices} == {(((128, 32), "r"), ((5, 32), "r")), (((128, 32), "c"), ((5, 32), "r"))}
    assert set(choices.values()) <= {"aten", "onednn"}


@pytest.mark.parametrize(
    "why, context",
    [
        ("deterministic algorithms", lambda: deterministic()),
        ("oneDNN disabled", lambda: onednn_disabled()),
        ("forced", lambda: use_kernels("aten")),
    ],
)
def test_aten_alone_runs_where_asked(why, context):
    with context():
        mm_t(torch.randn(64, 24), torch.randn(5, 24))
    assert not kernels.kernel_choices()[mm_t.name], why  # nothing measured


@contextlib.contextmanager
def onednn_disabled():
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


@contextlib.contextmanager
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def test_autograd_recording_uses_the_differentiable_kernel():
    x = torch.randn(64, 24, requires_grad=True)
    mm_t(x, torch.randn(5, 24)).sum().backward()
    assert x.grad is not None and not kernels.kernel_choices()[mm_t.name]


# --- the dispatch ------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows_", [3, 512])  # below and above the effective-weight threshold
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_float32_layer_takes_the_fast_path_and_equals_the_plain_formula(rows_, fan_in_fan_out, kernel):
    layer = trained_layer(48, 40, fan_in_fan_out=fan_in_fan_out)
    assert fuse_effective_weight(rows_, 48, 40) == (rows_ == 512)
    x = torch.randn(rows_, 48, requires_grad=True)
    g = torch.randn(rows_, 40)
    params = (x, layer.lora.U, layer.lora.V)
    with use_kernels(kernel):
        y = layer(x)
        got = torch.autograd.grad(y, params, g)
    assert backward_name(y) == "LoRALinearFunctionBackward"
    want = lora_linear(x, layer.weight, layer.bias, *params[1:], layer.lora.scale, fan_in_fan_out, fused=False)
    assert backward_name(want) != "LoRALinearFunctionBackward"
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
    assert not layer.fast_path_applies(x)
    assert backward_name(layer(x)) != "LoRALinearFunctionBackward", why


def test_dropout_in_eval_mode_takes_the_fast_path():
    layer = trained_layer(8, 6, dropout=0.1).eval()
    assert backward_name(layer(torch.randn(3, 8, requires_grad=True))) == "LoRALinearFunctionBackward"


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


@pytest.mark.parametrize("rows_", [64, 1024])
def test_lora_saves_its_input_and_rank_sized_tensors_only(rows_):
    layer = trained_layer(128, 96, rank=8)
    x = torch.randn(rows_, 128, requires_grad=True)
    params = sum(p.untyped_storage().nbytes() for p in layer.parameters())
    extra = saved_bytes(layer, x) - x.untyped_storage().nbytes() - params
    assert 0 < extra <= 4 * (rows_ * 8 + 128 * 8)  # z = x U [N, r] and A = Uᵀ [r, in]


def test_a_frozen_adapter_saves_no_activations():
    layer = trained_layer(128, 96, rank=8).requires_grad_(False)
    x = torch.randn(1024, 128, requires_grad=True)
    params = sum(p.untyped_storage().nbytes() for p in layer.parameters())
    assert saved_bytes(layer, x) - params <= 4 * 128 * 8  # A = Uᵀ alone: the input's gradient needs no x


def test_fused_forward_allocates_only_its_output():
    layer = trained_layer(64, 96, rank=8)
    x = torch.randn(4, 64, 64)
    assert fuse_effective_weight(256, 64, 96)
    assert count_allocations_of_at_least(256 * 96, layer, x) == 1
    plain = lambda x: layer.base_forward(x) + layer.lora(x)
    assert count_allocations_of_at_least(256 * 96, plain, x) >= 2  # the count can fail


def test_an_expanded_gradient_is_made_dense_once():
    layer = trained_layer(64, 96, rank=8)
    x = torch.randn(4, 64, 64, requires_grad=True)
    y = layer(x)
    g = torch.ones(()).expand(y.shape)
    count = count_allocations_of_at_least(256 * 64, lambda: torch.autograd.grad(y, x, g))
    assert count == 2  # the dense copy of g and the input's gradient


def test_fresh_fast_layer_equals_its_base_exactly():
    for rows_ in (3, 512):
        for kernel in KERNELS:
            base = nn.Linear(48, 40)
            layer = LoRALinear.from_linear(base, rank=4)
            x = torch.randn(rows_, 48, requires_grad=True)
            with use_kernels(kernel):
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
    assert backward_name(got) == "TaskFilterFunctionBackward"
    want = filter_reference(h, t, U, V, scale, similarity)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, (h, t, U, V), g), torch.autograd.grad(want, (h, t, U, V), g)):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the forward alone, without the Function: the same code, bit for bit
        assert torch.equal(task_filter(h, t, U, V, scale, cosine, 1e-8), got)
    alone = task_filter(*(x.detach() for x in (h, t, U, V)), scale, cosine, 1e-8)  # nothing to differentiate
    assert alone.grad_fn is None and torch.equal(alone, got)


@pytest.mark.parametrize("cosine", [True, False])
def test_filter_function_gradcheck(cosine):
    h, t, U, V = filter_tensors(6, 2, (2, 3))
    with torch.no_grad():
        q = (h @ t) / (h.norm(dim=-1) * t.norm()) if cosine else h @ t
    assert ((q - 0).abs().min() > 1e-3) and ((q - 1).abs().min() > 1e-3)  # away from the clamp's kinks
    assert ((q > 0) & (q < 1)).any() and ((q < 0) | (q > 1)).any()  # both sides of the clamp
    fn = lambda h, t, U, V: TaskFilterFunction.apply(h, t, U, V, *pack_task(U, t), 1.5, cosine, 1e-8)
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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_float32_filter_takes_the_fast_path_and_equals_the_plain_formula(similarity, kernel):
    f = trained_filter(64, similarity=similarity)
    h = torch.randn(4, 16, 64) + 2 * torch.randn(4, 16, 1) * f.task_vector.detach() * 8
    h.requires_grad_()
    g = torch.randn_like(h)
    params = (h, f.task_vector, f.transform.U, f.transform.V)
    with use_kernels(kernel):
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
    naive = lambda h: h + (f.relevance(h) * h) @ f.transform.U @ f.transform.V
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


def test_the_module_relevance_is_the_kernels_relevance():
    f = trained_filter(16)
    h = torch.randn(5, 16)
    assert torch.equal(f.relevance(h).squeeze(-1), kernels.relevance(h, f.task_vector, True, f.eps))
