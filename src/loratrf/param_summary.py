"""summary: trainable parameters split into LoRA, filter, token rows and other, against the base model."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from torch import nn

from loratrf.walk import active_adapter, adapter_parameters, unwrap


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of an injected model; `str()` gives a table."""

    lora: int  # trainable LoRA parameters (U and V of every LoRALinear, DoRA's magnitudes included)
    filter: int  # trainable task-aware filter parameters (t, U, V)
    other: int  # trainable base parameters (e.g. a classifier head)
    base_total: int  # every base parameter, trainable or not
    dora: int = 0  # of `lora`: the trainable DoRA magnitude vectors (one entry per output feature)
    adapters: Mapping[str, int] = dataclasses.field(default_factory=dict)  # every adapter's size, trainable or not
    active: str | None = None  # the adapter that runs (`set_adapter`)
    tokens: int = 0  # trainable token rows (`inject(trainable_tokens=...)`)

    @property
    def trainable(self) -> int:
        return self.lora + self.filter + self.tokens + self.other

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of the base model's."""
        return 100.0 * self.trainable / self.base_total if self.base_total else 0.0

    def __str__(self) -> str:
        rows = [("LoRA", self.lora)]
        if self.dora:
            rows.append(("  DoRA magnitude", self.dora))
        rows += [("filters", self.filter), *[("token rows", self.tokens)] * bool(self.tokens)]
        rows += [
            ("other trainable", self.other),
            ("trainable total", self.trainable),
            ("base model", self.base_total),
        ]
        width = max(len(f"{n:,}") for _, n in rows)
        lines = [f"{label:<16} {n:>{width},}" for label, n in rows]
        lines.append(f"{'trainable / base':<16} {self.percent:>{width}.4f}%")
        lines += [
            f"adapter {name!r}: {n:,} parameters" + (" (active)" if name == self.active else "")
            for name, n in self.adapters.items()
        ]
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Count `model`'s parameters (shared ones once); works on the meta device. The first
    fields count trainable parameters (the active adapter's, as only it trains); `adapters`
    gives every adapter's size.

    Adapter layers of PEFT (its tuner layers: LoRA, DoRA, AdaLoRA, ...) count as LoRA too, so
    one summary compares loratrf's methods with PEFT's on the same model.
    """
    kind: dict[int, str] = {}
    root = unwrap(model)
    sizes: dict[str, int] = {}
    for found in adapter_parameters(root):
        kind[id(found.parameter)] = found.kind
        sizes[found.adapter] = sizes.get(found.adapter, 0) + found.parameter.numel()
    for module in root.modules():
        if _is_peft_tuner_layer(module):
            # its adapters, and its adapters' other tensors (AdaLoRA's frozen `ranknum`)
            for name in (*module.adapter_layer_names, *getattr(module, "other_param_names", ())):
                adapters = getattr(module, name, None)
                if isinstance(adapters, nn.Module):
                    kind.update({id(p): "lora" for p in adapters.parameters()})
    counts = {"lora": 0, "filter": 0, "other": 0, "base_total": 0, "dora": 0, "tokens": 0}
    for p in root.parameters():
        k = kind.get(id(p))
        if k is None:
            counts["base_total"] += p.numel()
            k = "other"
        if p.requires_grad:
            counts[k] += p.numel()
    counts["lora"] += counts["dora"]
    return Summary(**counts, adapters=sizes, active=active_adapter(root) if sizes else None)


def _is_peft_tuner_layer(module: nn.Module) -> bool:
    """A PEFT adapter layer (`peft.tuners.tuners_utils.BaseTunerLayer`), told apart without
    importing PEFT: its adapters sit in the containers named by `adapter_layer_names`."""
    return any(
        cls.__name__ == "BaseTunerLayer" and cls.__module__.startswith("peft.") for cls in type(module).__mro__
    ) and isinstance(getattr(module, "adapter_layer_names", None), tuple)
