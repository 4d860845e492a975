"""Hand-written forward and backward passes for LoRA and the task-aware filter (float32/64).

Under autograd the plain formulas spend most of an adapter's time outside its arithmetic:
each rank-`r` product is a skinny matrix product that re-reads an `[N, d]` tensor (and MKL's
`sgemm` runs these shapes far below its peak), adding the update to the output or to the
input's gradient is one more read and write of it, and autograd keeps or builds further
`[N, d]` tensors. These Functions

- save only the input plus `[N, r]`-sized tensors for backward, never an `[N, d]` one;
- compute each rank-`r` product once, with the kernel and layout that run fastest: oneDNN's
  linear where this torch build has it (eager float32 on CPU; 2-4x faster than MKL's `sgemm`
  for these skinny shapes), else `F.linear` with row-major `[r, d]` factors (`F.linear(x, A)`
  rather than `x @ U`, `(gzᵀ x)ᵀ` rather than `xᵀ gz`);
- for LoRA, fold the update into an effective weight `W0 + scale · B A` for the two large
  products (forward and the input's gradient) when forming it is cheaper than one more pass
  over the activations (`fuse_effective_weight`);
- for the filter, get `h U` and `h · t` from one product `h [U | t]` and `|h|` from one
  reduction.

Both compute the same functions as the plain formulas (tested against them and by
`gradcheck` in float64). The modules take these paths only for float32/float64 tensors of
one dtype, outside autocast and without dropout; everything else runs the plain formulas.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

FAST_DTYPES = (torch.float32, torch.float64)

# Fold `scale · B A` into the weight when `N (d_in + d_out) >= FUSE_RATIO · d_in · d_out`
# (and `N >= d_in`, so the effective weight is never larger than the output). Forming it
# costs a read of `W0` and a write of `W_eff` (`d_in · d_out` each) in forward and again in
# backward; it saves a read-modify-write of the `[N, d_out]` output in forward and of the
# `[N, d_in]` input gradient in backward. By that count the break-even ratio is 2; measured
# on 2-core CPUs (float32, r = 8) it is 2 to 4, so fusing starts at 4.
FUSE_RATIO = 4.0


def fast_path_applies(*tensors: Tensor | None) -> bool:
    """True when all tensors share one float32/float64 dtype and autocast is off."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    if dtype not in FAST_DTYPES or any(t.dtype != dtype for t in present):
        return False
    device = present[0].device.type
    return not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device))


def fuse_effective_weight(n_rows: int, d_in: int, d_out: int) -> bool:
    """Whether `W0 + scale · B A` is cheaper to form than an extra pass over the activations."""
    return n_rows >= d_in and n_rows * (d_in + d_out) >= FUSE_RATIO * d_in * d_out


@functools.cache
def _onednn_linear() -> Callable | None:
    """oneDNN's linear `x wᵀ` (`torch.ops.mkldnn._linear_pointwise`), if this torch build has
    one that works; `None` otherwise. Probed once, on fixed values (no random numbers drawn)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.arange(12.0).view(4, 3)
        w = torch.arange(6.0).view(3, 2).T  # a strided view, as the backward passes use
        if torch.equal(op(x, w, None, "none", [], ""), x @ w.T):
            return op
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return None


def _uses_onednn(t: Tensor) -> bool:
    return (
        t.dtype == torch.float32
        and t.device.type == "cpu"
        and t.numel() > 0
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()  # inductor picks its own kernels
        and _onednn_linear() is not None
    )


def small_mm(a: Tensor, b: Tensor) -> Tensor:
    """`a bᵀ` for products with a rank-sized side (`a [m, k]`, `b [n, k]`, either may be a
    transposed view)."""
    if _uses_onednn(a):
        return _onednn_linear()(a, b, None, "none", [], "")
    return F.linear(a, b)


def add_low_rank(h: Tensor, z: Tensor, V: Tensor, scale: float) -> Tensor:
    """`h + scale · z V` as a new tensor (`h [N, d]`, `z [N, r]`, `V [r, d]`), the only
    `[N, d]` allocation."""
    if _uses_onednn(h):
        return small_mm(z * scale, V.T).add_(h)
    return torch.addmm(h, z, V, alpha=scale)


def unviewed(t: Tensor, shape: torch.Size) -> Tensor:
    """`t` reshaped to `shape` without autograd recording a view (as `F.linear` folds its batch
    dims). An adapter's output must not be a view: autograd refuses an in-place op on a Function's
    view output (`nn.ReLU(inplace=True)`), and FSDP2's output hooks are lost on a view."""
    return torch.ops.aten._unsafe_view(t, shape)


def _linear(x2: Tensor, weight: Tensor, bias: Tensor | None, fan_in_fan_out: bool) -> Tensor:
    """`x2 Wᵀ + b` for `W [out, in]`, or `x2 W + b` for `W [in, out]` (`fan_in_fan_out`)."""
    if not fan_in_fan_out:
        return F.linear(x2, weight, bias)
    return x2 @ weight if bias is None else torch.addmm(bias, x2, weight)


def _effective_weight(weight: Tensor, U: Tensor, V: Tensor, A: Tensor, scale: float, fan_in_fan_out: bool) -> Tensor:
    """`W0 + scale · (U V)ᵀ` in `weight`'s layout (`U V` itself when `fan_in_fan_out`)."""
    if fan_in_fan_out:
        return torch.addmm(weight, U, V, alpha=scale)
    return torch.addmm(weight, V.T.contiguous(), A, alpha=scale)


def _input_grad(g2: Tensor, weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """`g W` for `W [out, in]`, `g Wᵀ` for `W [in, out]`."""
    return g2 @ weight.T if fan_in_fan_out else g2 @ weight


class LoRALinearFunction(torch.autograd.Function):
    """`y = x W0ᵀ + b + scale · (x U) V`, with `W0`, `b` constant (no gradient).

    Saves `x`, the parameters and `z = x U [N, r]`; the effective weight, when fused, is
    formed again in backward rather than kept (it is weight-sized).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, U, V, scale: float, fan_in_fan_out: bool, fuse: bool):
        x2 = x.reshape(-1, x.shape[-1])
        A = U.T.contiguous()  # [r, in]
        z = small_mm(x2, A)  # [N, r]
        if fuse:
            y = _linear(x2, _effective_weight(weight, U, V, A, scale, fan_in_fan_out), bias, fan_in_fan_out)
        else:
            y = _linear(x2, weight, bias, fan_in_fan_out)
            y.addmm_(z, V, alpha=scale)
        ctx.save_for_backward(x2, weight, U, V, A, z)
        ctx.scale, ctx.fan_in_fan_out, ctx.fuse, ctx.x_shape = scale, fan_in_fan_out, fuse, x.shape
        return unviewed(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, g):
        x2, weight, U, V, A, z = ctx.saved_tensors
        scale, needs = ctx.scale, ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])
        gz = small_mm(g2, V).mul_(scale)  # scale · g Vᵀ [N, r]
        grad_x = grad_U = grad_V = None
        if needs[0]:
            if ctx.fuse:
                w = _effective_weight(weight, U, V, A, scale, ctx.fan_in_fan_out)
                grad_x = _input_grad(g2, w, ctx.fan_in_fan_out)
            else:
                grad_x = _input_grad(g2, weight, ctx.fan_in_fan_out).addmm_(gz, A)
            grad_x = grad_x.view(ctx.x_shape)
        if needs[3]:
            grad_U = small_mm(gz.T, x2.T).T  # xᵀ gz [in, r], computed as (gzᵀ x)ᵀ
        if needs[4]:
            grad_V = small_mm(z.T, g2.T).mul_(scale)  # scale · zᵀ g [r, out]
        return grad_x, None, None, grad_U, grad_V, None, None, None


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    U: Tensor,
    V: Tensor,
    scale: float,
    fan_in_fan_out: bool = False,
    fuse: bool | None = None,
) -> Tensor:
    """`x W0ᵀ + b + scale · (x U) V` through `LoRALinearFunction` (`fuse=None`: by cost).

    Shapes: `x [..., in]`, `weight [out, in]` (`[in, out]` with `fan_in_fan_out`), `U [in, r]`,
    `V [r, out]`. Without gradients to compute it runs the forward alone and saves nothing.
    """
    d_in, d_out = U.shape[0], V.shape[1]
    if fuse is None:
        fuse = fuse_effective_weight(x.numel() // max(d_in, 1), d_in, d_out)
    if torch.is_grad_enabled() and (x.requires_grad or U.requires_grad or V.requires_grad):
        return LoRALinearFunction.apply(x, weight, bias, U, V, scale, fan_in_fan_out, fuse)
    x2 = x.reshape(-1, d_in)
    A = U.T.contiguous()
    if fuse:
        y = _linear(x2, _effective_weight(weight, U, V, A, scale, fan_in_fan_out), bias, fan_in_fan_out)
    else:
        y = _linear(x2, weight, bias, fan_in_fan_out).addmm_(small_mm(x2, A), V, alpha=scale)
    return unviewed(y, (*x.shape[:-1], d_out))


class TaskFilterFunction(torch.autograd.Function):
    """`out = h + scale · (s ⊙ (h U)) V`, `s = clamp(q, 0, 1)` with `q = h·t / max(|h| |t|, eps)`
    (`cosine`) or `q = h·t` (dot).

    One product `P = h [U | t]` gives `h U` and `h·t`; `|h|` is one reduction. Saves `h` and
    the `[N, r + 2]` tensors `P`, `|h|`; everything else is recomputed from them.
    """

    @staticmethod
    def forward(ctx, h, t, U, V, scale: float, cosine: bool, eps: float):
        d, r = U.shape
        h2 = h.reshape(-1, d)
        M = torch.cat([U.T, t.unsqueeze(0)])  # [r + 1, d]
        P = small_mm(h2, M)  # [N, r + 1]: h U | h·t
        n = torch.linalg.vector_norm(h2, dim=-1) if cosine else P.new_empty(0)
        s = _relevance(P[:, r], n, t, cosine, eps)[0].clamp(0.0, 1.0)
        out = add_low_rank(h2, P[:, :r] * s.unsqueeze(-1), V, scale)
        ctx.save_for_backward(h2, t, M, V, P, n)
        ctx.scale, ctx.cosine, ctx.eps, ctx.h_shape = scale, cosine, eps, h.shape
        return unviewed(out, h.shape)

    @staticmethod
    def backward(ctx, g):
        h2, t, M, V, P, n = ctx.saved_tensors
        scale, cosine, needs = ctx.scale, ctx.cosine, ctx.needs_input_grad
        r = M.shape[0] - 1
        g2 = g.reshape(-1, g.shape[-1])
        a, c = P[:, :r], P[:, r]
        q, denom, t_norm = _relevance(c, n, t, cosine, ctx.eps)
        s = q.clamp(0.0, 1.0)
        gz = small_mm(g2, V).mul_(scale)  # scale · g Vᵀ [N, r]
        grad_V = small_mm((a * s.unsqueeze(-1)).T, g2.T).mul_(scale) if needs[3] else None
        gq = (gz * a).sum(-1) * ((q >= 0) & (q <= 1))  # through clamp(q, 0, 1)
        # d out / d P: the rank-r part (ga = s gz) and the h·t part (gc)
        gP = torch.cat([gz * s.unsqueeze(-1), (gq / denom if cosine else gq).unsqueeze(-1)], dim=-1)
        grad_h = grad_t = grad_U = None
        if cosine:
            # q = c / max(|h| |t|, eps): the denominator's gradient, where it is not clamped
            g_denom = torch.where(n * t_norm >= ctx.eps, -gq * q / denom, 0.0)
        if needs[0]:
            if cosine:  # through |h| (h · g_denom |t| / |h|), then through h U and h·t
                through_norm = torch.where(n > 0, g_denom * t_norm / n, 0.0).unsqueeze(-1)
                grad_h = torch.addcmul(g2, h2, through_norm).addmm_(gP, M)
            else:
                grad_h = add_low_rank(g2, gP, M, 1.0)
            grad_h = grad_h.view(ctx.h_shape)
        if needs[1] or needs[2]:
            hP = small_mm(gP.T, h2.T)  # gPᵀ h [r + 1, d]: pulled back to U and t
            grad_U = hP[:r].T if needs[2] else None
            if needs[1]:
                grad_t = hP[r]
                if cosine:  # through |t|
                    grad_t = grad_t + t * torch.where(t_norm > 0, (g_denom * n).sum() / t_norm, 0.0)
        return grad_h, grad_t, grad_U, grad_V, None, None, None


def _relevance(c: Tensor, n: Tensor, t: Tensor, cosine: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """The unclamped relevance `q`, its denominator and `|t|` from `c = h·t` and `n = |h|`."""
    if not cosine:
        return c, c, c
    t_norm = torch.linalg.vector_norm(t)
    denom = (n * t_norm).clamp_min(eps)
    return c / denom, denom, t_norm


def task_filter(h: Tensor, t: Tensor, U: Tensor, V: Tensor, scale: float, cosine: bool, eps: float) -> Tensor:
    """The filter `h + scale · (s ⊙ (h U)) V` through `TaskFilterFunction`. Shapes: `h [..., d]`,
    `t [d]`, `U [d, r]`, `V [r, d]`."""
    return TaskFilterFunction.apply(h, t, U, V, scale, cosine, eps)
