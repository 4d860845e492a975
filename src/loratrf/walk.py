"""Finding loratrf's modules and tensors inside a model."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from loratrf._torch_internals import compiled_original
from loratrf.errors import AdapterError, InjectionError
from loratrf.config import DEFAULT_ADAPTER
from loratrf.filter import FILTER_NAME, TaskAwareFilter, filter_dispatch, filter_names, filter_of
from loratrf.lora_layer import LoRALayer, parts_parameters
from loratrf.token_rows import TOKEN_ROWS, table_dispatch, token_row_names, token_rows_of


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside `torch.compile` and (Distributed)DataParallel wrappers."""
    if not isinstance(model, nn.Module):
        raise InjectionError(f"expected the model, a torch.nn.Module; got {type(model).__name__}")
    while True:
        if (inner := compiled_original(model)) is not None:
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def named_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    for name, module in unwrap(model).named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def named_filters(model: nn.Module, adapter: str = DEFAULT_ADAPTER) -> Iterator[tuple[str, TaskAwareFilter]]:
    """`(host name, filter)` for every module whose output adapter `adapter` filters."""
    for name, module in unwrap(model).named_modules():
        if (task_filter := filter_of(module, adapter)) is not None:
            yield name, task_filter


class AdapterParameter(NamedTuple):
    adapter: str  # the adapter's name
    key: str  # its name in `model.state_dict()`
    file_key: str  # its name in an adapter file, where every adapter is keyed as the default is
    parameter: nn.Parameter
    kind: str  # "lora", "dora" (a DoRA magnitude), "filter" or "tokens" (trainable token rows)


def adapter_parameters(model: nn.Module) -> Iterator[AdapterParameter]:
    """Every LoRA, filter and token-row tensor of every adapter, in module order."""
    root = unwrap(model)
    qualified = {id(m): n for n, m in root.named_modules()}
    for name, module in root.named_modules():
        if isinstance(module, LoRALayer):
            for adapter in module.adapter_names():
                parts = module.parts(adapter)
                for local, p in parts_parameters(parts):
                    kind = "dora" if local == "magnitude" else "lora"
                    yield AdapterParameter(adapter, _key(qualified[id(parts)], local), _key(name, local), p, kind)
        for adapter in filter_names(module):
            task_filter = filter_of(module, adapter)
            for local, p in task_filter.named_parameters():
                key, file_key = _key(qualified[id(task_filter)], local), _key(name, f"{FILTER_NAME}.{local}")
                yield AdapterParameter(adapter, key, file_key, p, "filter")
        for adapter in token_row_names(module):
            key, file_key = (_key(name, f"{TOKEN_ROWS}.{a}.rows") for a in (adapter, DEFAULT_ADAPTER))
            yield AdapterParameter(adapter, key, file_key, token_rows_of(module, adapter).rows, "tokens")


def named_adapter_parameters(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
    """Every LoRA and filter tensor (of adapter `adapter` only, if given), named as in `model.state_dict()`."""
    for found in adapter_parameters(model):
        if adapter is None or found.adapter == adapter:
            yield found.key, found.parameter


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in module order."""
    return list(dict.fromkeys(found.adapter for found in adapter_parameters(model)))


def check_held(model: nn.Module, names: Sequence[str | None]) -> None:
    """Refuse any of `names` (None: the base model, always held) that the model holds no adapter of."""
    held = adapter_names(model)
    unknown = [n for n in dict.fromkeys(names) if n is not None and n not in held]
    if unknown:
        raise AdapterError(
            f"the model holds no adapter named {', '.join(map(repr, unknown))}; its adapters are {held}"
            + ("" if held else " (loratrf.inject adds one)")
        )


Owners = dict[int, list[tuple[str, nn.Module]]]


def parameter_owners(model: nn.Module) -> Owners:
    """`id(parameter) -> [(qualified name, module holding it), ...]`, over every place each
    parameter is registered (a tied parameter, such as a decoder's shared embedding and output
    weight, has several)."""
    owners: Owners = {}
    for name, module in unwrap(model).named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((f"{name}.{local}" if name else local, module))
    return owners


def tied_elsewhere(owners: Owners, module: nn.Module, parameter: nn.Parameter) -> list[str]:
    """The names of `parameter` (one of `module`'s) in modules other than `module`: the other
    ends of a tie. Found by identity (`parameter_owners`), never assumed from a config."""
    return list(dict.fromkeys(name for name, owner in owners.get(id(parameter), []) if owner is not module))


def non_finite_tensors(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """The names of the tensors that hold NaN or Inf (a meta tensor holds no values)."""
    return [name for name, t in named if not t.is_meta and not bool(torch.isfinite(t).all())]


def active_adapter(model: nn.Module) -> str | None:
    """The adapter that runs (`set_adapter`); None when none does or the model holds none."""
    for module in unwrap(model).modules():
        if isinstance(module, LoRALayer):
            return module.active_adapter
        if (dispatch := filter_dispatch(module) or table_dispatch(module)) is not None:
            return dispatch.active
    return None


def _key(prefix: str, local: str) -> str:
    return f"{prefix}.{local}" if prefix else local
