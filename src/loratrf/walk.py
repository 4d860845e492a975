"""Finding loratrf's modules and tensors inside a model."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from loratrf._torch_internals import compiled_original
from loratrf.errors import InjectionError
from loratrf.filter import FILTER_NAME, TaskAwareFilter
from loratrf.lora import LoRALinear


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


def named_lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in unwrap(model).named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def named_filters(model: nn.Module) -> Iterator[tuple[str, TaskAwareFilter]]:
    """`(host name, filter)` for every module whose output is filtered."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, TaskAwareFilter) and name.rsplit(".", 1)[-1] == FILTER_NAME:
            yield name[: -len(FILTER_NAME)].rstrip("."), module


def named_adapter_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every LoRA and filter tensor, named as in `model.state_dict()`."""
    for name, module in unwrap(model).named_modules():
        if isinstance(module, (LoRALinear, TaskAwareFilter)):
            for local, p in module.named_parameters():
                if local not in module.base_parameter_names:
                    yield f"{name}.{local}" if name else local, p
