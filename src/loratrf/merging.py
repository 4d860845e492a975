"""Folding the active adapter into base weights and taking it out again."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from loratrf.errors import MergeError
from loratrf.filter import attach_filter, detach_filter, filter_names, filter_of, move_filters
from loratrf.inject import parent_map, sync_fused_encoder_paths
from loratrf.embedding import LoRAEmbedding
from loratrf.lora_layer import LoRALayer, check_finite
from loratrf.quantized import check_mergeable
from loratrf.token_rows import merge_problem, remove_token_rows, token_row_names, token_rows_of
from loratrf.walk import (
    active_adapter,
    named_filters,
    named_lora_layers,
    non_finite_tensors,
    parameter_owners,
    tied_elsewhere,
    unwrap,
)


def merge(model: nn.Module, safe: bool = True) -> None:
    """Fold the active adapter's LoRA updates into their base weights: `W0 <- W0 + scale · B A`.

    Filters stay: they depend on the input and cannot be folded into a weight. Layers that do
    not hold the active adapter are left as they are. Every check runs before any weight
    changes, and a refused merge raises `MergeError` with the model unchanged: a LoRA layer's weight
    tied to another module (a decoder's `lm_head` sharing `embed_tokens.weight`) is always refused,
    since folding into it would change the other module too; with `safe` (the default) so is
    any NaN or Inf in a merged weight or in the active adapter's filters. `safe=False` skips
    the passes over the values.

    Trainable token rows are written into their table, `E[ids] <- R`. A tied head reads the
    rows as well, so it computes the same from the merged table and that tie is no refusal;
    a tie made after `inject`, whose other end does not read the rows, is.
    """
    merge_layers(unwrap(model), safe)


def merge_layers(root: nn.Module, safe: bool) -> None:
    """Merge the active adapter in every layer that holds it, unmerged: all of them or none."""
    active = active_adapter(root)
    layers = {n: layer for n, layer in named_lora_layers(root) if not layer.merged and layer.parts(active) is not None}
    owners = parameter_owners(root)
    for name, layer in layers.items():
        check_mergeable(layer, f"LoRA layer {name!r}")
        if tied := tied_elsewhere(owners, layer, layer.weight):
            raise MergeError(
                f"cannot merge LoRA layer {name!r}: its weight is tied to {', '.join(map(repr, tied))} (one tensor), "
                "so folding the update in would change that module too; the weights were left unchanged. "
                "Keep the adapter unmerged (loratrf.unload(model, merge=False) keeps it exact), or untie first: "
                f"model.get_submodule({name!r}).weight = torch.nn.Parameter(<that weight>.detach().clone(), "
                "requires_grad=False) (and, for a transformers model, config.tie_word_embeddings = False so that "
                "save_pretrained does not tie them again)"
            )
    tables = {n: m for n, m in root.named_modules() if (r := token_rows_of(m, active)) is not None and not r.merged}
    for name, table in tables.items():
        if problem := merge_problem(name, table, owners.get(id(table.weight), [])):
            raise MergeError(problem)
    if safe:
        with torch.no_grad():
            for table in tables.values():
                check_finite(token_rows_of(table, active).rows, "merge")
            for layer in layers.values():
                check_finite(layer.merged_weight(+1), "merge")
            for host, task_filter in named_filters(root, active):
                if bad := non_finite_tensors(task_filter.named_parameters(prefix=host or "<root>")):
                    raise MergeError(
                        f"cannot merge: the active adapter's filter holds NaN/Inf ({', '.join(bad)}), so the merged "
                        "model would compute NaN; the weights were left unchanged. The adapter diverged: reload a "
                        "finite checkpoint, or loratrf.reset_adapters(model)"
                    )
    for layer in layers.values():
        layer.merge(safe=False)
    for table in tables.values():
        token_rows_of(table, active).merge(table.weight)


def unmerge(model: nn.Module) -> None:
    """Take every merged LoRA update (and token row) out of its base weight again (the active adapter's)."""
    for _, layer in named_lora_layers(model):
        layer.unmerge()
    for table in unwrap(model).modules():
        for name in token_row_names(table):
            token_rows_of(table, name).unmerge(table.weight)


def reset_adapters(model: nn.Module) -> None:
    """Re-initialise every adapter (after `to_empty`, say): the model equals its base again."""
    for _, layer in named_lora_layers(model):
        layer.reset_adapter()
    for module in unwrap(model).modules():
        for name in filter_names(module):
            filter_of(module, name).reset_parameters()
        for name in token_row_names(module):
            token_rows_of(module, name).reset_parameters(module.weight)


def unload(model: nn.Module, merge: bool = True, keep_filters: bool = True, safe: bool = True) -> nn.Module:
    """Give back plain torch modules: each LoRA layer becomes the module it wrapped.

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
        merge_layers(root, safe)
    else:
        unmerge(root)
    kept = 0
    for host in list(root.modules()):
        for name in filter_names(host):
            task_filter = detach_filter(host, name)
            if keep_filters and name == active:
                attach_filter(host, task_filter)
                kept += 1
    if kept and hasattr(root, "save_pretrained"):
        warnings.warn(
            f"unload kept {kept} task-aware filter(s) as hooks on the plain modules. transformers' save_pretrained "
            "writes their tensors, but from_pretrained drops them (as unexpected keys) and the reloaded model "
            "computes without them. Save them apart with loratrf.save_adapter(model, 'filters.safetensors'), and "
            "after from_pretrained call loratrf.load_adapter(model, 'filters.safetensors') (docs/llm.md)",
            stacklevel=2,
        )
    for layer in layers:
        put_back_base_module(layer, parents)
    for table in list(root.modules()):
        for name in token_row_names(table):
            remove_token_rows(table, name)
    sync_fused_encoder_paths(root)
    return model


def put_back_base_module(layer: LoRALayer, parents: dict[int, list[tuple[nn.Module, str]]]) -> None:
    """Replace `layer` wherever it is registered (`parents`, from `parent_map`) by the module it
    wrapped, with the layer's current weight and bias (or by a new nn.Linear); the filters on
    its output move onto that module. Call `sync_fused_encoder_paths` afterwards."""
    plain = _plain_module(layer)
    move_filters(layer, plain)
    for parent, child_name in parents[id(layer)]:
        setattr(parent, child_name, plain)


def _plain_module(layer: LoRALayer) -> nn.Module:
    """The wrapped module with the layer's current weight and bias, or a new nn.Linear (nn.Embedding)."""
    plain, weight = layer.base_module, layer.weight
    if isinstance(layer, LoRAEmbedding):
        if plain is None:
            plain = nn.Embedding(*weight.shape, padding_idx=layer.padding_idx, device="meta")
        plain.weight = weight
        plain.train(layer.training)
        return plain
    if plain is None:
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        if layer.fan_in_fan_out:  # a [in, out] weight: nn.Linear takes its transposed view
            weight = nn.Parameter(weight.detach().T, requires_grad=weight.requires_grad)
    plain.weight, plain.bias = weight, layer.bias
    plain.train(layer.training)
    return plain
