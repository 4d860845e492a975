"""Quantized base weights: which loratrf recognises, and how it reads them as float.

A `LoRALinear` on a quantized base computes `y = base(x) + scale · B A dropout(x)` where `base`
is the quantized layer's own map, never a copy of it:

- a torchao tensor subclass as the weight of an `nn.Linear` (`quantize_(model, Int8WeightOnlyConfig())`,
  `IntxWeightOnlyConfig(weight_dtype=torch.int4)`): `F.linear(x, W_q, b)`, which torchao computes
  as `x deq(W_q)ᵀ + b` for its weight-only configs;
- bitsandbytes' `Linear4bit` (NF4, FP4) and `Linear8bitLt` with int8 weights: the module's own
  forward, `bnb.matmul_4bit` resp. `bnb.matmul` (`x deq(W_q)ᵀ + b` up to float rounding).

The update runs on the plain path (the fast paths' `mm` on `W_q` is not what these libraries
implement), the gradient reaches the input through the library's own backward, and `W_q`
stays frozen. DoRA's norm `‖deq(W_q) + scale · B A‖` reads `float_weight`. Merging is refused
(`check_mergeable`): `W0 + scale · B A` rounded back to 4 or 8 bits is no longer what the
adapted model computes; `dequantize` makes the base float first, after which merges are exact.

loratrf never imports either library: a model that holds their tensors has imported them
already, so they are found in `sys.modules`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from loratrf._torch_internals import hold_unregistered
from loratrf.errors import MergeError


def _library(name: str) -> Any:
    """The module `name` if the program imported it, else None (loratrf never imports it)."""
    return sys.modules.get(name)


def kind(weight: Tensor | None) -> str | None:
    """What quantized `weight`: `"torchao <TensorClass>"`, `"bitsandbytes 4-bit (nf4)"`,
    `"bitsandbytes int8"`, or None for a plain (float) tensor."""
    torchao = _library("torchao.utils")
    if torchao is not None and isinstance(weight, torchao.TorchAOBaseTensor):
        return f"torchao {type(weight).__name__}"
    bnb = _library("bitsandbytes.nn")
    if bnb is None or weight is None:
        return None
    if isinstance(weight, bnb.Params4bit) and weight.bnb_quantized:
        return f"bitsandbytes 4-bit ({weight.quant_type})"
    if isinstance(weight, bnb.Int8Params) and weight.dtype == torch.int8:
        return "bitsandbytes int8"
    return None


def is_quantized(weight: Tensor | None) -> bool:
    return kind(weight) is not None


def runs_own_forward(module: nn.Module | None) -> bool:
    """Whether `module` is a bitsandbytes quantized linear layer whose own forward is its base
    map (`Linear4bit` and its NF4/FP4 subclasses, `Linear8bitLt`, with their forward and a
    quantized weight): `inject` wraps it and `LoRALinear.base_forward` calls it."""
    bnb = _library("bitsandbytes.nn")
    if bnb is None or not is_quantized(getattr(module, "weight", None)):
        return False
    known = (bnb.Linear4bit, bnb.Linear8bitLt)
    return any(isinstance(module, cls) and type(module).forward is cls.forward for cls in known)


def target_problem(module: nn.Module) -> str | None:
    """Why the quantized layer `module` cannot take a LoRA adapter, or None."""
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        return (
            "its 4-bit weight was repacked by bitsandbytes for AVX512-BF16 inference (a forward in eval mode "
            "without gradients), a layout it cannot dequantize exactly; inject before such a forward (loratrf "
            "keeps the adapted layers' weights in bitsandbytes' own layout)"
        )
    return None


def keep_layout(module: nn.Module) -> None:
    """Keep a bitsandbytes `Linear4bit`'s weight in its own layout (no repacking for AVX512-BF16
    inference), so that `float_weight` reads it and the forward stays `x deq(W_q)ᵀ + b`."""
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def float_dtype(weight: Tensor) -> torch.dtype:
    """The dtype of `weight` read as float: its own for a plain or torchao tensor, the dtype it
    was quantized from for bitsandbytes 4-bit, float32 for bitsandbytes int8 (its scales')."""
    found = kind(weight)
    if found is None or found.startswith("torchao"):
        return weight.dtype
    return weight.quant_state.dtype if found.startswith("bitsandbytes 4-bit") else torch.float32


@torch.no_grad()
def float_weight(layer: nn.Module) -> Tensor:
    """`layer.weight` (`[out, in]`), or for a quantized one `deq(W_q)`, a new float tensor.

    `layer` is a `LoRALinear` (bitsandbytes int8 keeps its scales on the module it wraps after
    the first forward) or the quantized module itself."""
    weight = layer.weight
    found = kind(weight)
    if found is None:
        return weight
    if found.startswith("torchao"):
        return weight.dequantize()
    functional = _library("bitsandbytes.functional")
    if found.startswith("bitsandbytes 4-bit"):
        return functional.dequantize_4bit(weight.data, weight.quant_state)
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(layer, "base_module", layer).state.SCB
    return functional.int8_vectorwise_dequant(weight.data, scales)


def check_mergeable(layer: nn.Module, where: str) -> None:
    """Refuse a merge into a quantized base weight (`where` names the layer in the message)."""
    if (found := kind(layer.weight)) is not None:
        raise MergeError(
            f"cannot merge {where}: its base weight is quantized ({found}), and W0 + scale · B A rounded back "
            "to that precision would no longer be what the adapted model computes; no weight was changed. Call "
            "loratrf.dequantize(model) first (the base weights become float tensors that compute the same, and "
            "merge is exact), or keep the adapter apart: save_adapter, then load_adapter onto the float model"
        )


@torch.no_grad()
def dequantize(model: nn.Module) -> nn.Module:
    """Every LoRA layer's quantized base weight becomes a frozen float Parameter holding
    `deq(W_q)` (in `float_dtype`), so that the layer computes `x deq(W_q)ᵀ + b + update(x)`, as
    before up to the library's float rounding, and `merge` / `unload` write exact float weights.
    `unload` then gives back an `nn.Linear`. Other quantized modules stay as they are. Returns `model`."""
    from loratrf.walk import named_lora_layers  # loratrf.walk imports the layers that use this module

    for _, layer in named_lora_layers(model):
        if is_quantized(layer.weight):
            weight = float_weight(layer).to(float_dtype(layer.weight))
            layer.weight = nn.Parameter(weight, requires_grad=False)
            layer._base_shape = tuple(weight.shape)  # the shape `LoRALinear.forward` checks the weight against
            hold_unregistered(layer, "base_module", None)  # `unload` builds an nn.Linear around it
    return model
