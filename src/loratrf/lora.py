"""LoRALinear: a frozen linear map plus a trainable low-rank update."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratrf._torch_internals import hold_unregistered
from loratrf.base_checkpoints import keep_absent_adapter_tensors
from loratrf.config import Init, LoRASpec, dtype_name, torch_dtype
from loratrf.errors import MergeError
from loratrf.fused import fast_path_applies, lora_linear
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
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(adapter_dtype, torch.dtype):
            adapter_dtype = dtype_name(adapter_dtype)
        LoRASpec(rank, alpha, dropout, init, rslora, adapter_dtype)  # validates every option
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
        self.register_load_state_dict_pre_hook(keep_absent_adapter_tensors)
        hold_unregistered(self, "base_module", None)

    @property
    def spec(self) -> LoRASpec:
        """This layer's options, as `inject` plans them and adapter files store them."""
        t = self.lora
        return LoRASpec(t.rank, t.alpha, self.dropout, t.init, t.rslora, dtype_name(t.U.dtype))

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
        layer.train(base.training)
        hold_unregistered(layer, "base_module", base)  # for `unload`
        return layer

    def base_forward(self, x: Tensor) -> Tensor:
        """The frozen map `x W0ᵀ + b`, computed exactly as the wrapped module computes it."""
        if not self.fan_in_fan_out:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ self.weight if self.bias is None else torch.addmm(self.bias, x2, self.weight)
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            out = self.base_forward(x)
            if self.training and torch.is_grad_enabled() and self.lora.U.requires_grad:
                out = _RefuseBackwardWhileMerged.apply(out, self.lora.U)
            return out
        dropout = self.dropout and self.training
        lora = self.lora
        if not dropout and self.fast_path_applies(x):
            return lora_linear(x, self.weight, self.bias, lora.U, lora.V, lora.scale, self.fan_in_fan_out)
        out = self.base_forward(x)
        if dropout:
            x = F.dropout(x, self.dropout, training=True)
        return lora(x, residual=out, inplace=True)

    def fast_path_applies(self, x: Tensor) -> bool:
        """`loratrf.fused.lora_linear` serves float32/float64 layers whose base is frozen, with
        input, weight and adapter of one dtype and autocast off; the rest runs the plain formula
        (as does an input of the wrong width, so it fails with the base layer's own error)."""
        if x.shape[-1] != self.in_features:
            return False
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        return frozen and fast_path_applies(x, self.weight, self.bias, self.lora.U, self.lora.V)

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
