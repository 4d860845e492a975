"""How loratrf computes LoRA and the task-aware filter: each formula once, one dispatch, fast kernels.

**The formulas**, each written once and used by every path:

- `base_linear`: the frozen map `x W0ᵀ + b` for `W0 [out, in]`, or `x W0 + b` for GPT-2's
  Conv1D layout `[in, out]`; `base_input_grad`: its gradient with respect to `x`.
- `low_rank`: `residual + scale · ((x U) ⊙ gate) V`, built from `project` (`x U`) and `expand`
  (`residual + scale · z V`); LoRA's update and the filter's transform.
- `relevance`: the filter's `s = clamp(q, 0, 1)` with `q = h·t / max(|h| |t|, eps)` (cosine)
  or `q = h·t` (dot), from `score`, which the filter's Function shares.

**The dispatch.** `lora_linear` and `task_filter` are what the modules call. For float32/float64
tensors of one dtype, autocast off, no adapter dropout and a frozen base, they run
`LoRALinearFunction` / `TaskFilterFunction`: the same helpers in forward, plus hand-written
backward passes that save only the input and `[N, r]`-sized tensors (never an `[N, d]` one),
compute each rank-`r` product once, and (LoRA, when the activations outweigh the weight) fold
`scale · B A` into an effective weight for the two large products. Everything else runs the
plain formula through autograd. Without gradients to compute, the Functions' forward runs
alone (the same code) and saves nothing. Inside `loratrf.cache_effective_weights`, an unmerged
LoRA layer that records no gradient runs `base_linear` on its cached `W0 + scale · B A`, and a
filter takes the `[U | t]ᵀ` and `|t|` of its one product from its cache (`loratrf.weight_cache`).

**The kernels.** A rank-`r` product (`project`, the reductions over rows in backward,
`expand`) has two implementations: ATen's (`F.linear` / `addmm`, MKL on CPU) and oneDNN's
linear (`torch.ops.mkldnn._linear_pointwise`), whose speed depends on the CPU, the shape and
the operands' layout (on a stride-0 operand oneDNN's took 300x as long). Where both apply
(eager float32 on CPU) the faster is chosen by timing both on the first call of each shape
class and layout (sizes rounded up to a power of two), and cached (`KernelChoice`,
`kernel_choices`); products over at most `FEW_ROWS` rows (decoding) run ATen's directly.
`torch.use_deterministic_algorithms(True)`, `torch.backends.mkldnn.enabled = False` and
`torch.compile` use ATen's alone; `use_kernels` forces one. Inputs and gradients
whose strides no kernel reads well (a stride of 0, as in the gradient `.sum()` hands back, or
no unit stride) are copied once to rows first (`rows`), as ATen's own matrix product does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from loratrf import quantized
from loratrf._torch_internals import in_dispatch_mode, onednn_linear, unviewed

if TYPE_CHECKING:
    from loratrf.versioned import Derived

FAST_DTYPES = (torch.float32, torch.float64)

# Fold `scale · B A` into the weight when `N (d_in + d_out) >= FUSE_RATIO · d_in · d_out`
# (and `N >= d_in`, so the effective weight is never larger than the output). Forming it
# costs a read of `W0` and a write of `W_eff` (`d_in · d_out` each) in forward and again in
# backward; it saves a read-modify-write of the `[N, d_out]` output in forward and of the
# `[N, d_in]` input gradient in backward. By that count the break-even ratio is 2; measured
# on 2-core CPUs (float32, r = 8) it is 2 to 4, so fusing starts at 4.
FUSE_RATIO = 4.0

# Products over at most this many rows (decoding: one token per sequence) run ATen's kernel
# without a choice: at these sizes the choice's own per-call work (its checks and its lookup,
# about 9 µs against ATen's 4 µs for a [1, 576] x [576, 9] product, measured) outweighs what
# either kernel could save, and ATen's was the faster at every such size measured (oneDNN's:
# about 36 µs at one row).
FEW_ROWS = 32


# --- dispatch ------------------------------------------------------------------------------


def fast_path_applies(first: Tensor, *others: Tensor | None) -> bool:
    """True when all tensors share one float32/float64 dtype and autocast is off."""
    dtype = first.dtype
    if dtype not in FAST_DTYPES:
        return False
    for t in others:  # a loop, not any(...): this runs on every adapter call of a decoding step
        if t is not None and t.dtype is not dtype:
            return False
    device = first.device.type
    return not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))


def lora_fast_path_applies(
    x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor, V: Tensor, dropout: float = 0.0
) -> bool:
    """`LoRALinearFunction` serves layers whose base is frozen, without (active) dropout, with
    input, weight and adapter of one float32/float64 dtype and autocast off. An input of the
    wrong width takes the plain path, so it fails with the base layer's own error. A quantized
    weight (`loratrf.quantized`; torchao's report a float dtype) takes the plain path too: its
    library implements `F.linear` on it, not the products of the hand-written backward."""
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    plain = quantized.is_quantized(weight)
    return not (dropout or plain) and frozen and x.shape[-1] == U.shape[0] and fast_path_applies(x, weight, bias, U, V)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    U: Tensor,
    V: Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
    *,
    dropout: float = 0.0,
    fused: bool | None = None,
    fuse: bool | None = None,
    cache: Derived[Tensor] | None = None,
) -> Tensor:
    """`base_linear(x) + scale · (dropout(x) U) V`.

    Shapes: `x [..., in]`, `weight [out, in]` (`[in, out]` with `fan_in_fan_out`), `U [in, r]`,
    `V [r, out]`. `fused=None` takes `LoRALinearFunction` where `lora_fast_path_applies`;
    `fuse=None` folds the update into the weight where that is cheaper (`fuse_effective_weight`).
    With a `cache` (`loratrf.cache_effective_weights`), a fused call that records no gradient
    runs `base_linear` on the cached effective weight (eager only: a compiled graph forms it).
    """
    if fused is None:
        fused = lora_fast_path_applies(x, weight, bias, U, V, dropout)
    if fused and cache is not None and not records_grad(x, U, V) and not torch.compiler.is_compiling():
        form = lambda: effective_weight(weight, U, V, U.T.contiguous(), scale, fan_in_fan_out)  # noqa: E731
        return base_linear(x, cache.get(form, weight, U, V, key=(scale, fan_in_fan_out)), bias, fan_in_fan_out)
    if not fused:
        out = base_linear(x, weight, bias, fan_in_fan_out)
        if dropout:
            x = F.dropout(x, dropout, training=True)
        return low_rank(x, U, V, scale, residual=out, inplace=True)
    d_in, d_out = U.shape[0], V.shape[1]
    if fuse is None:
        fuse = fuse_effective_weight(x.numel() // max(d_in, 1), d_in, d_out)
    if records_grad(x, U, V):
        return LoRALinearFunction.apply(x, weight, bias, U, V, scale, fan_in_fan_out, fuse)
    y, _, _ = _lora_forward(rows(x), weight, bias, U, V, scale, fan_in_fan_out, fuse, keep_z=False)
    return unviewed(y, (*x.shape[:-1], d_out))


def task_filter(
    h: Tensor,
    t: Tensor,
    U: Tensor,
    V: Tensor,
    scale: float,
    cosine: bool,
    eps: float,
    affine: tuple[Tensor, Tensor] | None = None,
    cache: Derived[tuple[Tensor, Tensor]] | None = None,
) -> Tensor:
    """The filter `h + scale · (s ⊙ (h U)) V` with `s = relevance(h, t, affine)`: through
    `TaskFilterFunction` where `fast_path_applies` (the paper's gate, `affine=None`; its
    forward alone when nothing needs a gradient), else the plain formula. Shapes: `h [..., d]`,
    `t [d]`, `U [d, r]`, `V [r, d]`; `affine` the scalars `(a, b)`. With a `cache`
    (`loratrf.cache_effective_weights`), a call that records no gradient takes `pack_task`'s
    `[U | t]ᵀ` and `|t|` from it, formed once per version of `U` and `t` (eager only)."""
    if affine is None and fast_path_applies(h, t, U, V):
        if records_grad(h, t, U, V):
            return TaskFilterFunction.apply(h, t, U, V, *pack_task(U, t), scale, cosine, eps)
        if cache is None or torch.compiler.is_compiling():
            M, t_norm = pack_task(U, t)
        else:
            M, t_norm = cache.get(lambda: pack_task(U, t), U, t)
        return unviewed(_filter_forward(rows(h), M, t_norm, V, scale, cosine, eps)[0], h.shape)
    return low_rank(h, U, V, scale, gate=relevance(h, t, cosine, eps, affine).unsqueeze(-1), residual=h)


def pack_task(U: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """`M = [U | t]ᵀ [r + 1, d]` (so that one product gives `h U` and `h·t`) and `|t|` (0-dim),
    outside autograd: `TaskFilterFunction` returns their gradients through `U` and `t`."""
    U, t = U.detach(), t.detach()
    return torch.cat([U.T, t.unsqueeze(0)]), torch.linalg.vector_norm(t)


def records_grad(*tensors: Tensor) -> bool:
    """Whether autograd records an op on `tensors` (grad mode on and one of them requires grad)."""
    if torch.is_grad_enabled():
        for t in tensors:  # a loop, as in `fast_path_applies`
            if t.requires_grad:
                return True
    return False


def fuse_effective_weight(n_rows: int, d_in: int, d_out: int) -> bool:
    """Whether `W0 + scale · B A` is cheaper to form than an extra pass over the activations."""
    return n_rows >= d_in and n_rows * (d_in + d_out) >= FUSE_RATIO * d_in * d_out


# --- the formulas --------------------------------------------------------------------------


def base_linear(x: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool = False) -> Tensor:
    """`x Wᵀ + b` for `W [out, in]`, `x W + b` for `W [in, out]` (`fan_in_fan_out`, HF's Conv1D),
    with the very calls `nn.Linear` and `Conv1D` make (`addmm(b, x, Wᵀ)` resp. `addmm(b, x, W)`).
    The result is not a view."""
    if not fan_in_fan_out:
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    out = x2 @ weight if bias is None else torch.addmm(bias, x2, weight)
    return unviewed(out, (*x.shape[:-1], weight.shape[1]))


def base_input_grad(g: Tensor, weight: Tensor, fan_in_fan_out: bool = False) -> Tensor:
    """The gradient of `base_linear` with respect to `x`: `g W` (`W [out, in]`) or `g Wᵀ`."""
    return g @ weight.T if fan_in_fan_out else g @ weight


def project(x: Tensor, A: Tensor) -> Tensor:
    """`x Aᵀ = x U` with `A = Uᵀ [r, d]` stored row-major (ATen's `F.linear` runs this layout, and
    its backward, several times faster than `x @ U` for small r)."""
    return _mm_t_aten(x, A) if few_rows(x) else mm_t(x, A)


def expand(residual: Tensor, z: Tensor, V: Tensor, scale: float, inplace: bool = False) -> Tensor:
    """`residual + scale · z V` (`residual [N, d]`, `z [N, r]`, `V [r, d]`); with `inplace`,
    written into `residual`."""
    if inplace:
        return residual.addmm_(z, V, alpha=scale)
    return _add_low_rank_aten(residual, z, V, scale) if few_rows(residual) else add_low_rank(residual, z, V, scale)


def few_rows(x: Tensor) -> bool:
    """Whether a product over the rows of `x [N, d]` runs ATen's kernel without a choice: `N <=
    FEW_ROWS` (decoding, a token per sequence), unless `use_kernels` forces one."""
    return x.shape[0] <= FEW_ROWS and _FORCED is None


def low_rank(
    x: Tensor,
    U: Tensor,
    V: Tensor,
    scale: float,
    *,
    gate: Tensor | None = None,
    residual: Tensor | None = None,
    inplace: bool = False,
) -> Tensor:
    """`residual + scale · ((x U) ⊙ gate) V` (`LowRankTransform`'s map), differentiable.

    Shapes: `x [..., d_in]`, `U [d_in, r]`, `V [r, d_out]`, `gate [..., 1]`, `residual
    [..., d_out]`. Computed in `x`'s dtype (the factors are cast to it), added in `residual`'s.
    With `inplace`, `residual` (contiguous, owned by the caller) is overwritten and returned;
    otherwise the result is a new tensor, not a view.
    """
    z = project(x, U.to(x.dtype).T.contiguous())  # [..., r]
    if gate is not None:
        z = z * gate.to(z.dtype)
    if residual is None:
        return (z * scale) @ V.to(z.dtype)
    d_out = residual.shape[-1]
    z2 = z.reshape(-1, z.shape[-1]).to(residual.dtype)
    v = V.to(residual.dtype)
    if inplace:
        expand(residual.view(-1, d_out), z2, v, scale, inplace=True)
        return residual
    return unviewed(expand(residual.reshape(-1, d_out), z2, v, scale), residual.shape)


def score(c: Tensor, n: Tensor | None, t_norm: Tensor | None, cosine: bool, eps: float) -> tuple[Tensor, Tensor]:
    """The unclamped relevance `q` and its denominator, from `c = h·t`, `n = |h|` and `|t|`
    (both unused for the dot product, whose denominator is 1)."""
    if not cosine:
        return c, c.new_ones(())
    denom = (n * t_norm).clamp_min_(eps)
    return c / denom, denom


def similarity(h: Tensor, t: Tensor, cosine: bool, eps: float) -> Tensor:
    """The unclamped relevance `q` per token (`[..., d] -> [...]`), in at least float32; a zero
    token gets 0."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    h, t = h.to(dtype), t.to(dtype)
    if not cosine:
        return h @ t
    return score(h @ t, torch.linalg.vector_norm(h, dim=-1), torch.linalg.vector_norm(t), cosine, eps)[0]


def relevance(h: Tensor, t: Tensor, cosine: bool, eps: float, affine: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The gate `s = clamp(q, 0, 1)` per token (`[..., d] -> [...]`), or `clamp(a q + b, 0, 1)`
    with `affine = (a, b)`; in at least float32."""
    q = similarity(h, t, cosine, eps)
    if affine is not None:
        a, b = affine
        q = q * a.to(q.dtype) + b.to(q.dtype)
    return q.clamp(0.0, 1.0)


# --- layouts -------------------------------------------------------------------------------


def layout(t: Tensor) -> str | None:
    """`"r"` for a matrix of rows (unit stride along dim 1), `"c"` for columns (unit stride along
    dim 0), `None` for anything else (a stride of 0, as in an expanded tensor, or no unit stride).
    Size-1 dims do not count."""
    (n, d), (s0, s1) = t.shape, t.stride()
    if (d == 1 or s1 == 1) and (n == 1 or s0 >= d):
        return "r"
    if (n == 1 or s0 == 1) and (d == 1 or s1 >= n):
        return "c"
    return None


def rows(t: Tensor) -> Tensor:
    """`t [..., d]` as a matrix `[N, d]` every kernel reads well: a view where one exists, else a
    copy (batch dims that do not fold, a stride of 0, no unit stride)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if layout(t2) is not None else t2.contiguous()


# --- kernels -------------------------------------------------------------------------------


_FORCED: str | None = None  # set by `use_kernels`
TIMED_CALLS = 3  # timed calls of each kernel when choosing (after one untimed call); the fastest counts
MARGIN = 0.05  # oneDNN is chosen only when it is at least this much faster than ATen


def _size_class(n: int) -> int:
    """Sizes up to 16 (ranks) as they are, larger ones rounded up to a power of two, so that a
    new sequence length rarely costs a new measurement."""
    return n if n <= 16 else 1 << (n - 1).bit_length()


class KernelChoice:
    """Equivalent implementations of one product: ATen's and oneDNN's.

    The first call of a shape class and layout runs both on its own operands, once untimed
    (oneDNN builds its primitive) and `TIMED_CALLS` times each, interleaved, and keeps ATen's
    unless oneDNN's fastest call beat ATen's by `MARGIN`; that call returns the chosen kernel's
    result, and later calls run the chosen kernel alone, so equal inputs give equal outputs.
    ATen's runs alone where oneDNN does not apply: other dtypes and devices, autograd recording
    (ATen's is differentiable), autocast, `torch.compile`, Python dispatch modes (fake tensors,
    counters: nothing to time), deterministic algorithms, oneDNN disabled or missing.
    """

    def __init__(self, name: str, aten: Callable[..., Tensor], onednn: Callable[..., Tensor]) -> None:
        self.name = name
        self.aten, self.onednn = aten, onednn
        self.chosen: dict[tuple, str] = {}  # per shape class and layout: what `kernel_choices` reports
        self._exact: dict[tuple, Callable[..., Tensor]] = {}  # per exact shapes and strides: the kernel

    def __call__(self, *args) -> Tensor:
        tensors = [a for a in args if isinstance(a, Tensor)]
        if not _onednn_applies(tensors):
            return self.aten(*args)
        if _FORCED is not None:
            return self.onednn(*args)
        key = (torch.get_num_threads(), *[(t.shape, t.stride()) for t in tensors])
        kernel = self._exact.get(key)
        if kernel is None:
            out, kernel = self._choose(tensors, args)
            if len(self._exact) >= 4096:  # many distinct shapes (e.g. every sequence length): start afresh
                self._exact.clear()
            self._exact[key] = kernel
            if out is not None:
                return out
        return kernel(*args)

    def _choose(self, tensors: list[Tensor], args: tuple) -> tuple[Tensor | None, Callable[..., Tensor]]:
        """The kernel for this shape class and layout, measured now if it was not before (then
        also the chosen kernel's result)."""
        key = (torch.get_num_threads(), *((tuple(map(_size_class, t.shape)), layout(t)) for t in tensors))
        chosen = self.chosen.get(key)
        if chosen is not None:
            return None, self.onednn if chosen == "onednn" else self.aten
        kernels = {"aten": self.aten, "onednn": self.onednn}
        results = {name: kernel(*args) for name, kernel in kernels.items()}
        best = dict.fromkeys(kernels, float("inf"))
        for _ in range(TIMED_CALLS):
            for name, kernel in kernels.items():
                start = time.perf_counter()
                kernel(*args)
                best[name] = min(best[name], time.perf_counter() - start)
        chosen = "onednn" if best["onednn"] < (1 - MARGIN) * best["aten"] else "aten"
        self.chosen[key] = chosen
        return results[chosen], kernels[chosen]


def _onednn_applies(tensors: list[Tensor]) -> bool:
    """Whether oneDNN's kernel may run on `tensors` (2-D float32 on CPU, nothing recording)."""
    if torch.compiler.is_compiling():  # first: nothing below is traced (inductor picks its own kernels)
        return False
    a = tensors[0]
    if a.dtype is not torch.float32 or not a.is_cpu or a.dim() != 2 or _FORCED == "aten":
        return False
    if records_grad(*tensors):
        return False
    if not torch.backends.mkldnn.enabled or torch.are_deterministic_algorithms_enabled():
        return False
    if in_dispatch_mode() or torch.is_autocast_enabled("cpu"):
        return False
    if any(t.numel() == 0 for t in tensors):
        return False
    return onednn_linear() is not None


def _mm_t_aten(a: Tensor, b: Tensor) -> Tensor:
    return F.linear(a, b)


def _mm_t_onednn(a: Tensor, b: Tensor) -> Tensor:
    return onednn_linear()(a, b, None, "none", [], "")


def _add_low_rank_aten(h: Tensor, z: Tensor, V: Tensor, scale: float) -> Tensor:
    return torch.addmm(h, z, V, alpha=scale)


def _add_low_rank_onednn(h: Tensor, z: Tensor, V: Tensor, scale: float) -> Tensor:
    return onednn_linear().binary(z, h, (V if scale == 1.0 else V * scale).T, None, "add")


# `a bᵀ` for products with a rank-sized side (`a [m, k]`, `b [n, k]`, either may be a
# transposed view): `x Uᵀ`-style projections and `zᵀ x`-style reductions over rows
mm_t = KernelChoice("a bᵀ", _mm_t_aten, _mm_t_onednn)
# `h + scale · z V` as a new tensor (`h [N, d]`, `z [N, r]`, `V [r, d]`), the only `[N, d]` allocation
add_low_rank = KernelChoice("h + scale · z V", _add_low_rank_aten, _add_low_rank_onednn)
KERNEL_CHOICES = (mm_t, add_low_rank)


def kernel_choices() -> dict[str, dict[tuple, str]]:
    """What was measured so far: per product, `(threads, (size class, layout) per operand) ->
    "aten" | "onednn"`."""
    return {choice.name: dict(choice.chosen) for choice in KERNEL_CHOICES}


def clear_kernel_choices() -> None:
    """Forget the measured choices (they are measured again on next use)."""
    for choice in KERNEL_CHOICES:
        choice.chosen.clear()
        choice._exact.clear()


@contextlib.contextmanager
def use_kernels(name: str | None) -> Iterator[None]:
    """Within the block, rank-r products run `"aten"`'s or (where it applies) `"onednn"`'s kernel
    instead of the measured choice; `None` measures as usual."""
    global _FORCED
    if name not in (None, "aten", "onednn"):
        raise ValueError(f"kernels are 'aten' or 'onednn' (None: measured), got {name!r}")
    before, _FORCED = _FORCED, name
    try:
        yield
    finally:
        _FORCED = before


# --- LoRA ----------------------------------------------------------------------------------


def effective_weight(weight: Tensor, U: Tensor, V: Tensor, A: Tensor, scale: float, fan_in_fan_out: bool) -> Tensor:
    """`W0 + scale · (U V)ᵀ` in `weight`'s layout (`W0 + scale · U V` when `fan_in_fan_out`)."""
    if fan_in_fan_out:
        return expand(weight, U, V, scale)
    return expand(weight, V.T.contiguous(), A, scale)


def _lora_forward(
    x2: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    U: Tensor,
    V: Tensor,
    scale: float,
    fan_in_fan_out: bool,
    fuse: bool,
    keep_z: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """`y = base_linear(x2) + scale · (x2 U) V` on rows `x2 [N, in]`; also `A = Uᵀ` and, when
    `keep_z` or needed anyway, `z = x2 U [N, r]`."""
    A = U.T if few_rows(x2) and not fuse else U.T.contiguous()  # [r, in]; row-major where it is read much
    # z first, while x is still in cache from whatever produced it; the large product is compute-bound
    z = project(x2, A) if keep_z or not fuse else None
    if fuse:
        return base_linear(x2, effective_weight(weight, U, V, A, scale, fan_in_fan_out), bias, fan_in_fan_out), A, z
    return expand(base_linear(x2, weight, bias, fan_in_fan_out), z, V, scale, inplace=True), A, z


class LoRALinearFunction(torch.autograd.Function):
    """`y = base_linear(x) + scale · (x U) V`, with `W0`, `b` constant (no gradient).

    Saves `x` (as rows) and `z = x U [N, r]` where the adapter's gradients need them, plus the
    parameters; the effective weight, when fused, is formed again in backward rather than kept
    (it is weight-sized).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, U, V, scale: float, fan_in_fan_out: bool, fuse: bool):
        needs = ctx.needs_input_grad
        x2 = rows(x)
        y, A, z = _lora_forward(x2, weight, bias, U, V, scale, fan_in_fan_out, fuse, keep_z=needs[4])
        ctx.save_for_backward(x2 if needs[3] else None, weight, U, V, A, z if needs[4] else None)
        ctx.scale, ctx.fan_in_fan_out, ctx.fuse, ctx.x_shape = scale, fan_in_fan_out, fuse, x.shape
        return unviewed(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, g):
        x2, weight, U, V, A, z = ctx.saved_tensors
        scale, needs, fan_in_fan_out = ctx.scale, ctx.needs_input_grad, ctx.fan_in_fan_out
        g2 = rows(g)  # e.g. `.sum()`'s gradient has stride 0: made dense once, for every product
        # The rank-r products that read g first, while g is in cache from whatever produced it (the
        # large product is compute-bound); x, saved since forward, is read once, last.
        gz = project(g2, V).mul_(scale) if needs[3] or (needs[0] and not ctx.fuse) else None  # scale · g Vᵀ
        grad_V = mm_t(z.T, g2.T).mul_(scale) if needs[4] else None  # scale · zᵀ g [r, out]
        grad_x = grad_U = None
        if needs[0]:
            w = effective_weight(weight, U, V, A, scale, fan_in_fan_out) if ctx.fuse else weight
            grad_x = base_input_grad(g2, w, fan_in_fan_out)
            if not ctx.fuse:
                expand(grad_x, gz, A, 1.0, inplace=True)
            grad_x = grad_x.view(ctx.x_shape)
        if needs[3]:
            grad_U = mm_t(gz.T, x2.T).T  # xᵀ gz [in, r], computed as (gzᵀ x)ᵀ
        return grad_x, None, None, grad_U, grad_V, None, None, None


# --- the task-aware filter -----------------------------------------------------------------


def _filter_forward(
    h2: Tensor, M: Tensor, t_norm: Tensor, V: Tensor, scale: float, cosine: bool, eps: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """`out = h + scale · (s ⊙ (h U)) V` on rows `h2 [N, d]`, with `M = [U | t]ᵀ [r + 1, d]` and
    `|t|` from `pack_task`; also `P = h M [N, r + 1]` and `|h| [N]` (None for the dot
    product), what backward needs."""
    r = V.shape[0]
    P = project(h2, M)  # [N, r + 1]: h U | h·t
    n = torch.linalg.vector_norm(h2, dim=-1) if cosine else None
    s = score(P.select(1, r), n, t_norm, cosine, eps)[0].clamp(0.0, 1.0)
    return expand(h2, P.narrow(1, 0, r) * s.unsqueeze(-1), V, scale), P, n


class TaskFilterFunction(torch.autograd.Function):
    """`out = h + scale · (s ⊙ (h U)) V` with `s = clamp(q, 0, 1)` from `score`.

    One product `P = h [U | t]` gives `h U` and `h·t`; `|h|` is one reduction. Saves `h` and
    the `[N, r + 2]` tensors `P`, `|h|`; everything else is recomputed from them. `M` and `|t|`
    (`pack_task`) come in formed; their gradients leave through `U` and `t`.
    """

    @staticmethod
    def forward(ctx, h, t, U, V, M, t_norm, scale: float, cosine: bool, eps: float):
        h2 = rows(h)
        out, P, n = _filter_forward(h2, M, t_norm, V, scale, cosine, eps)
        ctx.save_for_backward(h2, t, M, t_norm, V, P, n)
        ctx.scale, ctx.cosine, ctx.eps, ctx.h_shape = scale, cosine, eps, h.shape
        return unviewed(out, h.shape)

    @staticmethod
    def backward(ctx, g):
        h2, t, M, t_norm, V, P, n = ctx.saved_tensors
        scale, cosine, needs = ctx.scale, ctx.cosine, ctx.needs_input_grad
        r = M.shape[0] - 1
        g2 = rows(g)
        a, c = P[:, :r], P[:, r]
        q, denom = score(c, n, t_norm, cosine, ctx.eps)
        s = q.clamp(0.0, 1.0)
        gz = project(g2, V).mul_(scale)  # scale · g Vᵀ [N, r]
        grad_V = mm_t((a * s.unsqueeze(-1)).T, g2.T).mul_(scale) if needs[3] else None
        gq = torch.linalg.vecdot(gz, a) * (s == q)  # d/dq, through clamp(q, 0, 1)
        # d out / d P: the rank-r part (s gz) and the h·t part (d/dc = gq / denom)
        gP = torch.cat([gz * s.unsqueeze(-1), (gq / denom).unsqueeze(-1)], dim=-1)
        if cosine:
            # Where |h| |t| >= eps, q = c / (|h| |t|): d/d|h| = -gq q / |h| and d/d|t| = -gq q / |t|
            # (elsewhere the denominator is the constant eps); tiny: a zero norm gives 0, not NaN.
            tiny = torch.finfo(q.dtype).tiny
            gqq = torch.where(n * t_norm >= ctx.eps, gq * q, 0.0)
        grad_h = grad_t = grad_U = None
        if needs[0]:
            grad_h = expand(g2, gP, M, 1.0)  # through h U and h·t
            if cosine:  # through |h|: -gq q h / |h|²
                grad_h.addcmul_(h2, (gqq / (n * n).clamp_min(tiny)).unsqueeze(-1), value=-1.0)
            grad_h = grad_h.view(ctx.h_shape)
        if needs[1] or needs[2]:
            hP = mm_t(gP.T, h2.T)  # gPᵀ h [r + 1, d]: pulled back to U and t
            grad_U = hP[:r].T if needs[2] else None
            if needs[1]:
                grad_t = hP[r]
                if cosine:  # through |t|: -Σ gq q t / |t|²
                    grad_t = grad_t - t * (gqq.sum() / (t_norm * t_norm).clamp_min(tiny))
        return grad_h, grad_t, grad_U, grad_V, None, None, None, None, None
