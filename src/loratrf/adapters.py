"""Several adapters in one model (docs/adapters.md): which one runs (`set_adapter`), one per row
of a batch (`use_adapters`), removing one (`delete_adapter`), and the exact weighted sum of LoRA
adapters (`combine_adapters`). `inject(..., adapter=name)` and `load_adapter(..., adapter=name)`
add them."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from loratrf.config import LoRASpec, check_adapter_name, dtype_name
from loratrf.errors import AdapterError, MergeError
from loratrf.filter import detach_filter, filter_dispatch, filter_names
from loratrf.inject import activate, parent_map, sync_fused_encoder_paths
from loratrf.lora_layer import SWITCH_WHILE_MERGED, LoRALayer
from loratrf.merging import put_back_base_module
from loratrf.rows import AdapterRows
from loratrf.token_rows import merged_token_tables, remove_token_rows, table_dispatch, token_row_names
from loratrf.walk import active_adapter, adapter_names, adapter_parameters, check_held, named_lora_layers, unwrap


def _refuse_merged(root: nn.Module, what: str) -> None:
    merged = [name for name, layer in named_lora_layers(root) if layer.merged]
    if merged:
        raise MergeError(f"cannot {what}: LoRA layer {merged[0]!r} is merged; {SWITCH_WHILE_MERGED}")
    if tables := merged_token_tables(root):
        raise MergeError(f"cannot {what}: the trainable token rows of {tables[0]!r} are merged; {SWITCH_WHILE_MERGED}")


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Run adapter `name` from now on (None: the base model alone). Its tensors alone among the
    adapters' require grad; trainable base parameters (`inject(trainable=...)`) stay as they are.
    A module that does not hold adapter `name` computes its base. Refused while the model is
    merged, unless `name` is already active."""
    root = unwrap(model)
    check_held(root, [name])
    if name != active_adapter(root):
        _refuse_merged(root, f"switch to adapter {name!r}")
    activate(root, name)


@contextlib.contextmanager
def use_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[None]:
    """Within the block row `i` of every batch (the inputs' first dimension, `B = len(names)`)
    computes with adapter `names[i]` (None: the base model alone), as it would alone with that
    adapter active: each LoRA layer computes its base map on the whole batch, then each adapter's
    update on its own rows; each filter host filters each row with its adapter's filter.

    A module input whose first dimension is not `B` is an `AdapterError`, and so is an unknown
    name; refused on a merged model. The adapters named require grad within the block (each
    receives the gradient of its own rows); on leaving, the active adapter and which tensors
    require grad are as before."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise AdapterError(f"use_adapters takes a sequence of adapter names (or None), one per row; got {names!r}")
    root = unwrap(model)
    check_held(root, names)
    _refuse_merged(root, "run one adapter per row")
    rows = AdapterRows(names)
    routed = []  # (object with `rows`, what it had)
    for qualified, module in root.named_modules():
        lora_layer = module if isinstance(module, LoRALayer) else None
        for router in (lora_layer, filter_dispatch(module), table_dispatch(module)):
            if router is not None:
                routed.append((router, router.rows))
                router.rows = rows.at(repr(qualified or type(module).__name__))
    grads = [(p, p.requires_grad) for p in (found.parameter for found in adapter_parameters(root))]
    for found in adapter_parameters(root):
        if found.adapter in rows.groups:
            found.parameter.requires_grad_(True)
    try:
        yield
    finally:
        for router, before in routed:
            router.rows = before
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every module; a LoRA layer left with no adapter becomes the
    module it wrapped again (as `unload` makes it). Deleting the active adapter leaves none
    active: the model computes its base until `set_adapter`. Refused while it is merged."""
    root = unwrap(model)
    check_held(root, [name])
    if name == active_adapter(root):
        _refuse_merged(root, f"delete the merged adapter {name!r}")
    parents = parent_map(root)
    for module in list(root.modules()):
        if name in filter_names(module):
            detach_filter(module, name)
        if name in token_row_names(module):
            remove_token_rows(module, name)
        if isinstance(module, LoRALayer) and module.parts(name) is not None:
            module.pop_parts(name)
            if not module.adapter_names():
                put_back_base_module(module, parents)
    if name == active_adapter(root):
        activate(root, None)
    sync_fused_encoder_paths(root)


def combine_adapters(model: nn.Module, weights: Mapping[str, float], name: str) -> None:
    """Add adapter `name`, the exact weighted sum of LoRA adapters: on every LoRA layer holding
    any of them, `W0 + Σ w_i s_i B_i A_i` over those it holds (`s_i` their scales). Its factors
    are the adapters' concatenated, `U = [U_1 | U_2 | ...]` `[in, Σ r_i]` and
    `V = [w_1 s_1 V_1; w_2 s_2 V_2; ...]` `[Σ r_i, out]`, with rank and alpha `Σ r_i` (scale 1)
    and no dropout. Weights may be negative. Adapters with filters or DoRA layers are refused:
    neither is linear in its parameters, so no adapter computes their weighted sum. As with
    `inject`, the active adapter stays, unless none was active."""
    root = unwrap(model)
    check_adapter_name(name)
    if not isinstance(weights, Mapping) or not weights:
        raise AdapterError(
            f"combine_adapters takes a mapping of adapter names to weights, {{'a': 0.5}}; got {weights!r}"
        )
    check_held(root, list(weights))
    if name in adapter_names(root):
        raise AdapterError(
            f"the model already holds an adapter named {name!r}; choose another name for the combination"
        )
    for adapter, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise AdapterError(f"the weight of adapter {adapter!r} must be a finite number, got {w!r}")
    layers = dict(named_lora_layers(root))
    filtered = [a for a in weights if any(a in filter_names(m) for m in root.modules())]
    if filtered:
        raise AdapterError(
            f"cannot combine adapter(s) {filtered}: they hold task-aware filters, and a filter is not linear in "
            "its parameters (its gate depends on the task vector, and the output on the gate times U V), so "
            "no filter computes a weighted sum of filters; combine LoRA-only adapters"
        )
    if rows := [a for a in weights if any(a in token_row_names(m) for m in root.modules())]:
        raise AdapterError(
            f"cannot combine adapter(s) {rows}: they hold trainable token rows, which replace rows of the table "
            "rather than add to it, so no adapter computes their weighted sum; combine LoRA-only adapters"
        )
    dora = [a for a in weights if any((p := layer.parts(a)) is not None and p.dora for layer in layers.values())]
    if dora:
        raise AdapterError(
            f"cannot combine adapter(s) {dora}: they are DoRA adapters, whose magnitude normalisation "
            "m / ‖W0 + s B A‖ is not linear in B A, so no adapter computes their weighted sum; combine plain LoRA adapters"
        )
    active = active_adapter(root)
    for layer in layers.values():
        terms = [(w, parts.lora) for adapter, w in weights.items() if (parts := layer.parts(adapter)) is not None]
        if not terms:
            continue
        with torch.no_grad():
            U = torch.cat([t.U for _, t in terms], dim=1)  # [in, Σ r_i]
            V = torch.cat([t.V * (w * t.scale) for w, t in terms], dim=0)  # [Σ r_i, out]
        rank = U.shape[1]
        spec = LoRASpec(rank, float(rank), 0.0, terms[0][1].init, False, dtype_name(U.dtype), False)
        layer.add_adapter(name, spec)
        with torch.no_grad():
            layer.parts(name).lora.U.copy_(U)
            layer.parts(name).lora.V.copy_(V)
    activate(root, name if active is None else active)


__all__ = ["combine_adapters", "delete_adapter", "set_adapter", "use_adapters"]
