"""Folding the active adapter into base weights and taking it out again."""

from __future__ import annotations

import torch
from torch import nn

from loratrf.filter import attach_filter, detach_filter, filter_names, filter_of, move_filters
from loratrf.inject import parent_map, sync_fused_encoder_paths
from loratrf.lora import LoRALinear, check_finite
from loratrf.walk import active_adapter, named_lora_layers, unwrap


def merge(model: nn.Module, safe: bool = True) -> None:
    """Fold the active adapter's LoRA updates into their base weights: `W0 <- W0 + scale · B A`.

    Filters stay: they depend on the input and cannot be folded into a weight. With `safe`
    (the default) every merged weight is checked first, and if any would hold NaN or Inf a
    `MergeError` is raised with no weight changed; `safe=False` skips that pass over the weights.
    """
    merge_layers([layer for _, layer in named_lora_layers(model)], safe)


def merge_layers(layers: list[LoRALinear], safe: bool) -> None:
    """Merge `layers`; with `safe`, all of them or, if any would write NaN/Inf, none."""
    layers = [layer for layer in layers if not layer.merged]
    if safe:
        with torch.no_grad():
            for layer in layers:
                check_finite(layer.merged_weight(+1), "merge")
    for layer in layers:
        layer.merge(safe=False)


def unmerge(model: nn.Module) -> None:
    """Take every merged LoRA update out of its base weight again (the active adapter's)."""
    for _, layer in named_lora_layers(model):
        layer.unmerge()


def reset_adapters(model: nn.Module) -> None:
    """Re-initialise every adapter (after `to_empty`, say): the model equals its base again."""
    for _, layer in named_lora_layers(model):
        layer.reset_adapter()
    for module in unwrap(model).modules():
        for name in filter_names(module):
            filter_of(module, name).reset_parameters()


def unload(model: nn.Module, merge: bool = True, keep_filters: bool = True, safe: bool = True) -> nn.Module:
    """Give back plain torch modules: each LoRALinear becomes the module it wrapped.

    With `merge=True` the base weights keep the folded updates of the active adapter (checked
    as `merge(safe=...)` checks them, before anything changes), so the model computes what the
    adapted one did; `merge=False` restores the base weights. Filters depend on the input and
    cannot be folded, so the active adapter's stay (on the plain modules, as the default
    adapter's) unless `keep_filters=False`, which drops them and so CHANGES the outputs of a
    model whose filters were trained. Every other adapter is dropped. The same Parameter
    objects are kept throughout. Returns `model`.
    """
    root = unwrap(model)
    parents = parent_map(root)
    active = active_adapter(root)
    layers = [layer for _, layer in named_lora_layers(root)]
    if merge:
        merge_layers(layers, safe)
    else:
        unmerge(root)
    for host in list(root.modules()):
        for name in filter_names(host):
            task_filter = detach_filter(host, name)
            if keep_filters and name == active:
                attach_filter(host, task_filter)
    for layer in layers:
        put_back_base_module(layer, parents)
    sync_fused_encoder_paths(root)
    return model


def put_back_base_module(layer: LoRALinear, parents: dict[int, list[tuple[nn.Module, str]]]) -> None:
    """Replace `layer` wherever it is registered (`parents`, from `parent_map`) by the module it
    wrapped, with the layer's current weight and bias (or by a new nn.Linear); the filters on
    its output move onto that module. Call `sync_fused_encoder_paths` afterwards."""
    plain = _plain_module(layer)
    move_filters(layer, plain)
    for parent, child_name in parents[id(layer)]:
        setattr(parent, child_name, plain)


def _plain_module(layer: LoRALinear) -> nn.Module:
    """The wrapped module with the layer's current weight and bias, or a new nn.Linear."""
    plain, weight = layer.base_module, layer.weight
    if plain is None:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        if layer.fan_in_fan_out:  # a [in, out] weight: nn.Linear takes its transposed view
            weight = nn.Parameter(weight.detach().T, requires_grad=weight.requires_grad)
    plain.weight, plain.bias = weight, layer.bias
    plain.train(layer.training)
    return plain
