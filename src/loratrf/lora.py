"""LoRALinear: a frozen linear map plus a trainable low-rank update."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratrf import kernels
from loratrf._torch_internals import hold_unregistered
from loratrf.base_checkpoints import keep_absent_adapter_tensors
from loratrf.config import Init, LoRASpec, dtype_name, torch_dtype
from loratrf.errors import MergeError
from loratrf.low_rank import LowRankTransform

LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in float32 beside half-precision weights, else in the weight's dtype."""
    return torch.float32 if weight_dtype in LOW_PRECISION else weight_dtype


def merge_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Merges are computed in at least float32 and never below the weight's own precision."""
    return torch.promote_types(weight_dtype, torch.float32)


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's `Conv1D` (GPT-2): a linear map whose weight is stored `[in, out]`."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


class LoRALinear(nn.Module):
    """`y = x W0ᵀ + b + scale · B A dropout(x)` with `W0`, `b` frozen and `scale = alpha / r`.

    Shapes: `x [..., in_features] -> y [..., out_features]`; `W0 [out, in]`
    (`[in, out]` when `fan_in_fan_out`, as in GPT-2's Conv1D). The update lives in
    `self.lora`, a `LowRankTransform` with `U = Aᵀ [in, r]` and `V = Bᵀ [r, out]`; `V` starts
    at zero, so a fresh layer computes exactly its base map.

    `merge()` folds the update into `W0` (the paper's `W_ft = W0 + BA`), after which the
    forward is the plain base map; `unmerge()` takes it out again. Both compute in at least
    float32 and write back in the weight's dtype.

    With `dora=True` (DoRA, Liu et al. 2024) the layer also holds `magnitude`, a trainable
    vector `m [out_features]` that starts at the row norms of `W0` (one per output feature),
    and computes `y = x Wᵀ + b` with `W = m ⊙ (W0 + scale · B A) / ‖W0 + scale · B A‖`, the
    norm taken per output feature and treated as a constant in backward (DoRA's section 4.3).
    See `_dora_forward`; `merge` folds `W` into the weight and `unmerge` restores `W0`.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    magnitude: nn.Parameter | None  # DoRA's `m [out_features]`; None for plain LoRA
    base_parameter_names = ("weight", "bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = LoRASpec.rank,
        alpha: float = LoRASpec.alpha,
        *,
        bias: bool = True,
        dropout: float = LoRASpec.dropout,
        init: Init = LoRASpec.init,
        rslora: bool = LoRASpec.rslora,
        fan_in_fan_out: bool = False,
        adapter_dtype: torch.dtype | str | None = None,
        dora: bool = LoRASpec.dora,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(adapter_dtype, torch.dtype):
            adapter_dtype = dtype_name(adapter_dtype)
        LoRASpec(rank, alpha, dropout, init, rslora, adapter_dtype, dora)  # validates every option
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = fan_in_fan_out
        self.dropout = float(dropout)
        self.merged = False
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._reset_base()
        self.lora = LowRankTransform(
            in_features,
            out_features,
            rank,
            alpha,
            init=init,
            rslora=rslora,
            device=device,
            dtype=torch_dtype(adapter_dtype) or default_adapter_dtype(self.weight.dtype),
        )
        self.register_parameter("magnitude", None)
        # DoRA's `m / ‖W0 + scale · B A‖` at merge time, which `unmerge` divides out again
        self.register_buffer("_merged_dora_factor", None, persistent=False)
        if dora:
            self.magnitude = nn.Parameter(torch.empty(out_features, device=device, dtype=self._magnitude_dtype()))
            self.reset_magnitude()
        self.register_load_state_dict_pre_hook(keep_absent_adapter_tensors)
        hold_unregistered(self, "base_module", None)

    @property
    def spec(self) -> LoRASpec:
        """This layer's options, as `inject` plans them and adapter files store them."""
        t = self.lora
        return LoRASpec(t.rank, t.alpha, self.dropout, t.init, t.rslora, dtype_name(t.U.dtype), self.dora)

    @property
    def dora(self) -> bool:
        """Whether this is a DoRA layer (it holds a `magnitude`)."""
        return self.magnitude is not None

    @torch.no_grad()
    def _reset_base(self) -> None:
        """nn.Linear's own initialisation, for layers built from scratch."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    @classmethod
    def from_linear(
        cls, base: nn.Module, rank: int = LoRASpec.rank, alpha: float = LoRASpec.alpha, **options
    ) -> LoRALinear:
        """Wrap an `nn.Linear` (or HF `Conv1D`), keeping its very weight and bias Parameters.

        No base tensor is copied or allocated; the adapter is created on the weight's device.
        `unload` puts `base` itself back. `options` are the keyword options of the constructor
        (`LoRALinear.from_linear(base, **dataclasses.asdict(spec))` builds a `LoRASpec`).
        """
        fan_in_fan_out = is_conv1d(base)
        weight = base.weight
        in_features, out_features = weight.shape if fan_in_fan_out else weight.shape[::-1]
        layer = cls(
            in_features,
            out_features,
            rank,
            alpha,
            bias=base.bias is not None,
            fan_in_fan_out=fan_in_fan_out,
            device="meta",
            dtype=weight.dtype,
            **options,
        )
        layer.weight, layer.bias = weight, base.bias
        for p in (weight, base.bias):
            if p is not None:
                p.requires_grad_(False)
        layer.lora.to_empty(device=weight.device).reset_parameters()
        if layer.dora:
            layer.magnitude = nn.Parameter(torch.empty_like(layer.magnitude, device=weight.device))
            layer.reset_magnitude()
        layer.train(base.training)
        hold_unregistered(layer, "base_module", base)  # for `unload`
        return layer

    def base_forward(self, x: Tensor) -> Tensor:
        """The frozen map `x W0ᵀ + b`, computed exactly as the wrapped module computes it."""
        return kernels.base_linear(x, self.weight, self.bias, self.fan_in_fan_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.dora and not self.merged:
            return self._dora_forward(x)
        if self.merged:
            out = self.base_forward(x)
            if self.training and torch.is_grad_enabled() and self.lora.U.requires_grad:
                out = _RefuseBackwardWhileMerged.apply(out, self.lora.U)
            return out
        lora = self.lora
        dropout = self.dropout if self.training else 0.0
        return kernels.lora_linear(
            x,
            self.weight,
            self.bias,
            lora.U,
            lora.V,
            lora.scale,
            self.fan_in_fan_out,
            dropout=dropout,
            fused=self.fast_path_applies(x),
        )

    def fast_path_applies(self, x: Tensor) -> bool:
        """Whether `x` runs `loratrf.kernels.LoRALinearFunction` (`kernels.lora_fast_path_applies`:
        float32/float64, one dtype, frozen base, no active dropout, autocast off, the right width);
        otherwise the plain formula runs."""
        dropout = self.dropout if self.training else 0.0
        return kernels.lora_fast_path_applies(x, self.weight, self.bias, self.lora.U, self.lora.V, dropout)

    # --- DoRA ----------------------------------------------------------------------------------

    def _magnitude_dtype(self) -> torch.dtype:
        """`m` is kept in at least float32 and in the precision its norm is computed in
        (`merge_dtype` of the weight), so that a fresh layer's `m / ‖W0‖` is exactly 1."""
        return torch.promote_types(self.lora.U.dtype, merge_dtype(self.weight.dtype))

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """`m <- ‖W0 + scale · B A‖` per output feature: with a fresh adapter (`B = 0`), the row
        norms of `W0`, and then the layer computes exactly its base map."""
        if not self.magnitude.is_meta:  # a meta tensor holds no values to set
            self.magnitude.copy_(self.dora_weight_norm())

    @torch.no_grad()
    def dora_weight_norm(self) -> Tensor:
        """`‖W0 + scale · B A‖` per output feature, `[out_features]`, in `merge_dtype` of the
        weight (at least float32). Computed without a graph: DoRA treats it as a constant."""
        dtype = merge_dtype(self.weight.dtype)
        w = self.weight if self.fan_in_fan_out else self.weight.T  # [in, out]
        return torch.linalg.vector_norm(w.to(dtype) + self.lora.delta_weight(dtype), dim=0)

    def dora_factor(self, norm: Tensor | None = None) -> Tensor:
        """`m / ‖W0 + scale · B A‖`, `[out_features]`: differentiable in `m`, the norm a
        constant (`norm`, when the caller has it). A row whose norm is 0 (a zero row of `W0`
        with a fresh adapter) gets `m / tiny` (0 while `m` is its norm, 0), never NaN."""
        norm = self.dora_weight_norm() if norm is None else norm
        return self.magnitude.to(norm.dtype) / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def _dora_forward(self, x: Tensor) -> Tensor:
        """DoRA's `y = f ⊙ (x W0ᵀ + scale · B A x) + b` with `f = m / ‖W0 + scale · B A‖`,
        computed as `f ⊙ (x W0ᵀ + b + scale · B A x) + (1 - f) ⊙ b`, so a fresh layer
        (`f = 1` exactly, `B = 0`) returns exactly its base map's output.

        With dropout (training), as PEFT computes it: the DoRA terms take `x_d = dropout(x)`,
        `y = x W0ᵀ + b + (f - 1) ⊙ (x_d W0ᵀ) + f ⊙ scale · B A x_d`, which is the formula above
        when nothing is dropped.
        """
        out = self.base_forward(x)
        factor = self.dora_factor().to(out.dtype)
        if self.dropout and self.training:
            xd = F.dropout(x, self.dropout, training=True)
            base_d = kernels.base_linear(xd, self.weight.to(xd.dtype), None, self.fan_in_fan_out)
            return out + (factor - 1) * base_d + factor * self.lora(xd).to(out.dtype)
        out = self.lora(x, residual=out, inplace=True)
        if self.bias is None:
            return out * factor
        return torch.addcmul((1 - factor) * self.bias.to(out.dtype), out, factor)

    def _dora_merged_weight(self, factor: Tensor, sign: int) -> Tensor:
        """`f ⊙ (W0 + scale · B A)` (`sign=+1`, from `W0`) or `W / f - scale · B A` (`sign=-1`,
        from a merged `W`), in `factor`'s dtype, in the layout of `weight`. Rows with `f = 0`
        (zero rows, see `merge`) come back as `-scale · B A`, the `W0` they had."""
        dtype = factor.dtype
        f = factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)
        delta = self.delta_weight(dtype)
        if sign > 0:
            return f * (self.weight.to(dtype) + delta)
        return self.weight.to(dtype) / torch.where(f == 0, torch.ones_like(f), f) - delta

    @torch.no_grad()
    def _dora_merge_factor(self) -> Tensor:
        """The `f` that `merge` folds in; refuses when `unmerge` could not divide it out again."""
        norm = self.dora_weight_norm()
        factor = self.dora_factor(norm)
        lost = (factor == 0) & (norm != 0)
        if self.weight.device.type != "meta" and bool(lost.any()):
            rows = lost.nonzero().flatten().tolist()
            raise MergeError(
                f"cannot merge a DoRA layer whose magnitude is 0 on a non-zero row (output features "
                f"{rows[:5]}{'...' if len(rows) > 5 else ''}): the merged weight would hold zeros there and "
                "unmerge could not restore W0; the weight was left unchanged"
            )
        return factor

    def delta_weight(self, dtype: torch.dtype) -> Tensor:
        """`scale · B A` in the layout of `weight`, computed in `dtype`."""
        delta = self.lora.delta_weight(dtype)  # [in, out]
        return delta if self.fan_in_fan_out else delta.T

    @torch.no_grad()
    def merged_weight(self, sign: int = 1) -> Tensor:
        """`W0 ± scale · B A`, computed in at least float32, rounded once to the weight's dtype;
        `weight` itself is untouched. DoRA: `f ⊙ (W0 + scale · B A)`, or (`sign=-1`, on a merged
        layer) `W / f - scale · B A` with the `f` folded in at merge time."""
        if self.dora:
            factor = self._dora_merge_factor() if sign > 0 else self._merged_dora_factor
            return self._dora_merged_weight(factor, sign).to(self.weight.dtype)
        dtype = merge_dtype(self.weight.dtype)
        return self.weight.to(dtype).add(self.delta_weight(dtype), alpha=sign).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """`W0 <- W0 + scale · B A` (DoRA: `W0 <- f ⊙ (W0 + scale · B A)`, keeping `f` for
        `unmerge`); a second call does nothing.

        With `safe` (the default) a non-finite result raises `MergeError` and leaves `W0`
        untouched; `safe=False` skips that check. A DoRA layer whose magnitude is 0 on a
        non-zero row is always refused (`unmerge` could not divide the 0 out again).
        """
        if self.merged:
            return
        factor = self._dora_merge_factor() if self.dora else None
        new = self._dora_merged_weight(factor, +1).to(self.weight.dtype) if self.dora else self.merged_weight(+1)
        if safe:
            check_finite(new, "merge")
        self.weight.copy_(new)
        self._merged_dora_factor = factor
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """`W0 <- W0 - scale · B A` (DoRA: `W0 <- W / f - scale · B A`); does nothing on an
        unmerged layer."""
        if not self.merged:
            return
        self.weight.copy_(self.merged_weight(-1))
        self._merged_dora_factor = None
        self.merged = False

    def reset_adapter(self) -> None:
        """Back to the initial state: the update is zero and the layer equals its base."""
        self.unmerge()
        self.lora.reset_parameters()
        if self.dora:
            self.reset_magnitude()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.lora.rank}, alpha={self.lora.alpha:g}, dropout={self.dropout:g}, "
            f"bias={self.bias is not None}, merged={self.merged}" + (", dora=True" if self.dora else "")
        )


def check_finite(weight: Tensor, what: str) -> None:
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        raise MergeError(
            f"{what} would write non-finite values into a base weight (the adapter holds NaN/Inf, "
            "or the result overflows the weight's dtype); the weight was left unchanged"
        )


MERGED_BACKWARD_MESSAGE = (
    "backward through a merged LoRALinear: its adapter would receive no gradient. "
    "Call loratrf.unmerge(model) before training (or run merged models in eval mode)"
)


@torch.library.custom_op("loratrf::refuse_merged_backward", mutates_args=())
def refuse_merged_backward(grad: Tensor) -> Tensor:
    """Raises `MergeError` when run. An operator rather than a Python `raise` in `backward`, so
    that `torch.compile` can trace the backward graph ahead of time and the refusal happens
    when a backward actually runs."""
    raise MergeError(MERGED_BACKWARD_MESSAGE)


@refuse_merged_backward.register_fake
def _(grad: Tensor) -> Tensor:
    return torch.empty_like(grad)


class _RefuseBackwardWhileMerged(torch.autograd.Function):
    """Identity on a merged layer's output whose backward refuses: training through a merged
    layer would give its adapter no gradient, so it would silently train nothing."""

    @staticmethod
    def forward(ctx, out: Tensor, adapter_weight: Tensor) -> Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return refuse_merged_backward(grad), None
