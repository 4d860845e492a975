"""summary: trainable parameters split into LoRA, filter and other, against the base model."""

from __future__ import annotations

import dataclasses

from torch import nn

from loratrf.filter import TaskAwareFilter
from loratrf.lora import LoRALinear
from loratrf.walk import unwrap


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of an injected model; `str()` gives a table."""

    lora: int  # trainable LoRA parameters (U and V of every LoRALinear, DoRA's magnitudes included)
    filter: int  # trainable task-aware filter parameters (t, U, V)
    other: int  # trainable base parameters (e.g. a classifier head)
    base_total: int  # every base parameter, trainable or not
    dora: int = 0  # of `lora`: the trainable DoRA magnitude vectors (one entry per output feature)

    @property
    def trainable(self) -> int:
        return self.lora + self.filter + self.other

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of the base model's."""
        return 100.0 * self.trainable / self.base_total if self.base_total else 0.0

    def __str__(self) -> str:
        rows = [("LoRA", self.lora)]
        if self.dora:
            rows.append(("  DoRA magnitude", self.dora))
        rows += [
            ("filters", self.filter),
            ("other trainable", self.other),
            ("trainable total", self.trainable),
            ("base model", self.base_total),
        ]
        width = max(len(f"{n:,}") for _, n in rows)
        lines = [f"{label:<16} {n:>{width},}" for label, n in rows]
        lines.append(f"{'trainable / base':<16} {self.percent:>{width}.4f}%")
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Count `model`'s parameters (shared ones once); works on the meta device.

    Adapter layers of PEFT (its tuner layers: LoRA, DoRA, AdaLoRA, ...) count as LoRA too, so
    one summary compares loratrf's methods with PEFT's on the same model.
    """
    kind: dict[int, str] = {}
    root = unwrap(model)
    for module in root.modules():
        if isinstance(module, LoRALinear):
            kind.update({id(p): "lora" for p in module.lora.parameters()})
            if module.magnitude is not None:
                kind[id(module.magnitude)] = "dora"
        elif isinstance(module, TaskAwareFilter):
            kind.update({id(p): "filter" for p in module.parameters()})
        elif _is_peft_tuner_layer(module):
            # its adapters, and its adapters' other tensors (AdaLoRA's frozen `ranknum`)
            for name in (*module.adapter_layer_names, *getattr(module, "other_param_names", ())):
                adapters = getattr(module, name, None)
                if isinstance(adapters, nn.Module):
                    kind.update({id(p): "lora" for p in adapters.parameters()})
    counts = {"lora": 0, "filter": 0, "other": 0, "base_total": 0, "dora": 0}
    for p in root.parameters():
        k = kind.get(id(p))
        if k is None:
            counts["base_total"] += p.numel()
            k = "other"
        if p.requires_grad:
            counts[k] += p.numel()
    counts["lora"] += counts["dora"]
    return Summary(**counts)


def _is_peft_tuner_layer(module: nn.Module) -> bool:
    """A PEFT adapter layer (`peft.tuners.tuners_utils.BaseTunerLayer`), told apart without
    importing PEFT: its adapters sit in the containers named by `adapter_layer_names`."""
    return any(
        cls.__name__ == "BaseTunerLayer" and cls.__module__.startswith("peft.") for cls in type(module).__mro__
    ) and isinstance(getattr(module, "adapter_layer_names", None), tuple)
