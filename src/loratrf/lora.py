"""LoRALinear: a frozen linear map plus a trainable low-rank update."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from loratrf import kernels
from loratrf.base_checkpoints import keep_absent_adapter_tensors
from loratrf.errors import InjectionError, MergeError
from loratrf.low_rank import Init, LowRankTransform

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
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    base_parameter_names = ("weight", "bias")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        alpha: float = 16.0,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        init: Init = "kaiming",
        rslora: bool = False,
        fan_in_fan_out: bool = False,
        adapter_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise InjectionError(f"dropout must be in [0, 1), got {dropout!r}")
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
            dtype=adapter_dtype or default_adapter_dtype(self.weight.dtype),
        )
        self.register_load_state_dict_pre_hook(keep_absent_adapter_tensors)
        self._base_module: nn.Module | None = None

    @torch.no_grad()
    def _reset_base(self) -> None:
        """nn.Linear's own initialisation, for layers built from scratch."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    @classmethod
    def from_linear(cls, base: nn.Module, rank: int = 8, alpha: float = 16.0, **options) -> LoRALinear:
        """Wrap an `nn.Linear` (or HF `Conv1D`), keeping its very weight and bias Parameters.

        No base tensor is copied or allocated; the adapter is created on the weight's device.
        `unload` puts `base` itself back.
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
        layer.train(base.training)
        object.__setattr__(layer, "_base_module", base)  # kept for `unload`, not registered
        return layer

    def base_forward(self, x: Tensor) -> Tensor:
        """The frozen map `x W0ᵀ + b`, computed exactly as the wrapped module computes it."""
        return kernels.base_linear(x, self.weight, self.bias, self.fan_in_fan_out)

    def forward(self, x: Tensor) -> Tensor:
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

    def delta_weight(self, dtype: torch.dtype) -> Tensor:
        """`scale · B A` in the layout of `weight`, computed in `dtype`."""
        delta = self.lora.delta_weight(dtype)  # [in, out]
        return delta if self.fan_in_fan_out else delta.T

    @torch.no_grad()
    def merged_weight(self, sign: int = 1) -> Tensor:
        """`W0 ± scale · B A`, computed in at least float32, rounded once to the weight's dtype;
        `weight` itself is untouched."""
        dtype = merge_dtype(self.weight.dtype)
        return self.weight.to(dtype).add(self.delta_weight(dtype), alpha=sign).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, safe: bool = True) -> None:
        """`W0 <- W0 + scale · B A`; a second call does nothing.

        With `safe` (the default) a non-finite result raises `MergeError` and leaves `W0`
        untouched; `safe=False` skips that check.
        """
        if self.merged:
            return
        new = self.merged_weight(+1)
        if safe:
            check_finite(new, "merge")
        self.weight.copy_(new)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """`W0 <- W0 - scale · B A`; does nothing on an unmerged layer."""
        if not self.merged:
            return
        self.weight.copy_(self.merged_weight(-1))
        self.merged = False

    def reset_adapter(self) -> None:
        """Back to the initial state: the update is zero and the layer equals its base."""
        self.unmerge()
        self.lora.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.lora.rank}, alpha={self.lora.alpha:g}, dropout={self.dropout:g}, "
            f"bias={self.bias is not None}, merged={self.merged}"
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
