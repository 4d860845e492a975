"""LoRALinear: a frozen linear map plus a trainable low-rank update."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratrf import kernels, quantized
from loratrf._torch_internals import unviewed
from loratrf.config import DEFAULT_ADAPTER, Init, LoRASpec, dtype_name
from loratrf.lora_layer import LoRAAdapter, LoRALayer, merged_output

if TYPE_CHECKING:
    from loratrf.versioned import Derived


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's `Conv1D` (GPT-2): a linear map whose weight is stored `[in, out]`."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


class LoRALinear(LoRALayer):
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
    See `_dora_forward` and `loratrf.dora`; `merge` folds `W` into the weight and `unmerge`
    restores `W0`.

    Several adapters, which one runs, one per row, and merging: `LoRALayer`, shared with
    `LoRAEmbedding`.
    """

    bias: nn.Parameter | None
    weight_cache: Derived[Tensor] | None = None  # set inside `loratrf.cache_effective_weights`

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
        spec = LoRASpec(rank, alpha, dropout, init, rslora, adapter_dtype, dora)  # validates every option
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = fan_in_fan_out
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._reset_base()
        self._init_adapters(spec)

    @torch.no_grad()
    def _reset_base(self) -> None:
        """nn.Linear's own initialisation, for layers built from scratch."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    @classmethod
    def from_linear(
        cls,
        base: nn.Module,
        rank: int = LoRASpec.rank,
        alpha: float = LoRASpec.alpha,
        *,
        adapter: str = DEFAULT_ADAPTER,
        **options,
    ) -> LoRALinear:
        """Wrap an `nn.Linear` (or HF `Conv1D`), keeping its very weight and bias Parameters.

        No base tensor is copied or allocated; the adapter (named `adapter`) is created on the
        weight's device. `unload` puts `base` itself back. `options` are the keyword options of
        the constructor (`LoRALinear.from_linear(base, **dataclasses.asdict(spec))` builds a `LoRASpec`).
        """
        fan_in_fan_out = is_conv1d(base)
        weight = base.weight
        in_features, out_features = weight.shape if fan_in_fan_out else weight.shape[::-1]
        if quantized.is_quantized(weight):  # a packed weight's shape is not `[out, in]`
            in_features, out_features = base.in_features, base.out_features
            quantized.keep_layout(base)
        layer = cls(
            in_features,
            out_features,
            rank,
            alpha,
            bias=base.bias is not None,
            fan_in_fan_out=fan_in_fan_out,
            device="meta",
            dtype=quantized.float_dtype(weight),
            **options,
        )
        layer.weight, layer.bias = weight, base.bias  # (`_adopt` takes a packed quantized weight's shape)
        for p in (weight, base.bias):
            if p is not None:
                p.requires_grad_(False)
        layer._adopt(base, adapter)
        return layer

    def base_forward(self, x: Tensor) -> Tensor:
        """The frozen map `x W0ᵀ + b`, computed exactly as the wrapped module computes it (a
        bitsandbytes quantized layer by its own forward, `loratrf.quantized`)."""
        if quantized.runs_own_forward(self.base_module):  # not a view, as `base_linear`'s: updated in place
            out = self.base_module(x)
            return unviewed(out, out.shape)
        return kernels.base_linear(x, self.weight, self.bias, self.fan_in_fan_out)

    def forward(self, x: Tensor) -> Tensor:
        self._check_base_shape()
        if self.rows is not None:
            return self._forward_rows(x, self.rows)
        parts = self._active()
        if parts is None:
            return self.base_forward(x)
        if self.merged:
            return merged_output(self.base_forward(x), self.training, parts.lora.U)
        if parts.dora or quantized.is_quantized(self.weight):  # a quantized base's own map, the update plain
            return self._adapted(x, self.base_forward(x), parts)
        lora = parts.lora
        dropout = parts.dropout if self.training else 0.0
        return kernels.lora_linear(
            x,
            self.weight,
            self.bias,
            lora.U,
            lora.V,
            lora.scale,
            self.fan_in_fan_out,
            dropout=dropout,
            cache=self.weight_cache,
        )

    def fast_path_applies(self, x: Tensor) -> bool:
        """Whether `x` runs `loratrf.kernels.LoRALinearFunction` with the active adapter
        (`kernels.lora_fast_path_applies`: float32/float64, one dtype, frozen base, no active
        dropout, autocast off, the right width); otherwise the plain formula runs."""
        parts = self._active()
        dropout = parts.dropout if self.training else 0.0
        return kernels.lora_fast_path_applies(x, self.weight, self.bias, parts.lora.U, parts.lora.V, dropout)

    def _adapted(self, x: Tensor, out: Tensor, parts: LoRALayer | LoRAAdapter) -> Tensor:
        """From `out = x W0ᵀ + b` (owned: it is overwritten), adapter `parts`' output on `x` by
        the plain formula (`use_adapters` computes each adapter's rows so)."""
        if parts.dora:
            return self._dora_forward(x, out, parts)
        if parts.dropout and self.training:
            x = F.dropout(x, parts.dropout, training=True)
        return parts.lora(x, residual=out, inplace=True)

    # --- DoRA (the terms all layer kinds share are in `loratrf.dora`) --------------------------

    def _dora_forward(self, x: Tensor, out: Tensor, parts: LoRALayer | LoRAAdapter) -> Tensor:
        """From `out = x W0ᵀ + b` (owned: it is overwritten), DoRA's
        `y = f ⊙ (x W0ᵀ + scale · B A x) + b` with `f = m / ‖W0 + scale · B A‖`,
        computed as `f ⊙ (x W0ᵀ + b + scale · B A x) + (1 - f) ⊙ b`, so a fresh layer
        (`f = 1` exactly, `B = 0`) returns exactly its base map's output.

        With dropout (training), as PEFT computes it: the DoRA terms take `x_d = dropout(x)`,
        `y = x W0ᵀ + b + (f - 1) ⊙ (x_d W0ᵀ) + f ⊙ scale · B A x_d`, which is the formula above
        when nothing is dropped.
        """
        factor = self.dora_factor(parts=parts).to(out.dtype)
        if parts.dropout and self.training:
            xd = F.dropout(x, parts.dropout, training=True)
            base_d = kernels.base_linear(xd, quantized.float_weight(self).to(xd.dtype), None, self.fan_in_fan_out)
            return out + (factor - 1) * base_d + factor * parts.lora(xd).to(out.dtype)
        out = parts.lora(x, residual=out, inplace=True)
        if self.bias is None:
            return out * factor
        return torch.addcmul((1 - factor) * self.bias.to(out.dtype), out, factor)

    def extra_repr(self) -> str:
        default = (
            "" if self.lora is None else f"rank={self.lora.rank}, alpha={self.lora.alpha:g}, dropout={self.dropout:g}, "
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {default}"
            f"bias={self.bias is not None}, merged={self.merged}" + (", dora=True" if self.dora else "")
        )
