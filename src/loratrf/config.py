"""InjectionConfig: everything `inject` needs to redo an injection, serialisable to JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from loratrf.errors import InjectionError
from loratrf.filter import SIMILARITIES, TASK_INITS
from loratrf.low_rank import INITS


@dataclasses.dataclass(frozen=True)
class InjectionConfig:
    """The arguments of one `loratrf.inject` call; `inject(model, **config.to_dict())` redoes it.

    targets: regexes (`re.fullmatch` on qualified module names) of linear layers that get LoRA.
    filters: regexes of modules whose output gets a TaskAwareFilter.
    rank, alpha, dropout, init, rslora: LoRA's rank `r`, `alpha` (scale `alpha/r`, or
        `alpha/sqrt(r)` with `rslora`), dropout on the adapter's input, and `A`'s init
        (`"kaiming"` or `"gaussian"`).
    filter_rank, filter_alpha: rank and alpha of each filter's `T ≈ U V` (default: LoRA's).
    similarity: `"cosine"` (the paper) or `"dot"`; task_init: `"normal"` or `"ones"`.
    filter_dim: width of the filtered hidden states, when it cannot be read off the module.
    trainable: regexes of modules that stay fully trainable (a classifier head, say).
    adapter_dtype: dtype name of the adapter tensors (default: float32 beside half-precision
        weights, else the weight's dtype).
    """

    targets: tuple[str, ...] = ()
    filters: tuple[str, ...] = ()
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: str = "kaiming"
    rslora: bool = False
    filter_rank: int | None = None
    filter_alpha: float | None = None
    similarity: str = "cosine"
    task_init: str = "normal"
    filter_dim: int | None = None
    trainable: tuple[str, ...] = ()
    adapter_dtype: str | None = None

    def __post_init__(self) -> None:
        for name in ("targets", "filters", "trainable"):
            patterns = getattr(self, name)
            if isinstance(patterns, str):
                patterns = (patterns,)
            try:
                patterns = tuple(patterns)
            except TypeError:
                raise InjectionError(f"{name} must be a list of regex strings, got {patterns!r}") from None
            object.__setattr__(self, name, patterns)
            for pattern in getattr(self, name):
                _check_pattern(name, pattern)
        if not self.targets and not self.filters:
            raise InjectionError("nothing to inject: give `targets` (LoRA) and/or `filters` (task-aware filters)")
        _check_rank("rank", self.rank)
        _check_alpha("alpha", self.alpha)
        if self.filter_rank is not None:
            _check_rank("filter_rank", self.filter_rank)
        if self.filter_alpha is not None:
            _check_alpha("filter_alpha", self.filter_alpha)
        if self.filter_dim is not None:
            _check_rank("filter_dim", self.filter_dim)
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise InjectionError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        _check_choice("init", self.init, INITS)
        _check_choice("similarity", self.similarity, SIMILARITIES)
        _check_choice("task_init", self.task_init, TASK_INITS)
        if self.adapter_dtype is not None:
            self.torch_adapter_dtype()

    def torch_adapter_dtype(self) -> torch.dtype | None:
        if self.adapter_dtype is None:
            return None
        dtype = getattr(torch, str(self.adapter_dtype), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise InjectionError(
                f"adapter_dtype must name a floating-point torch dtype such as 'float32', got {self.adapter_dtype!r}"
            )
        return dtype

    @property
    def lora_options(self) -> dict[str, Any]:
        """Keyword arguments of `LoRALinear.from_linear`."""
        return dict(rank=self.rank, alpha=self.alpha, dropout=self.dropout, init=self.init, rslora=self.rslora)

    @property
    def filter_options(self) -> dict[str, Any]:
        """Keyword arguments of `TaskAwareFilter`, less `dim`."""
        return dict(
            rank=self.filter_rank or self.rank,
            alpha=self.filter_alpha or self.alpha,
            similarity=self.similarity,
            task_init=self.task_init,
            init=self.init,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InjectionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InjectionError(f"unknown injection option(s) {unknown}; known options are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> InjectionConfig:
        return cls.from_dict(json.loads(text))


def _check_pattern(kind: str, pattern: object) -> None:
    if not isinstance(pattern, str):
        raise InjectionError(f"{kind} must be regex strings, got {pattern!r} ({type(pattern).__name__})")
    try:
        re.compile(pattern)
    except re.error as e:
        raise InjectionError(f"{kind} pattern {pattern!r} is not a valid regular expression: {e}") from None


def _check_rank(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InjectionError(f"{name} must be an integer >= 1, got {value!r}")


def _check_alpha(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InjectionError(f"{name} must be a finite number > 0, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InjectionError(f"{name} must be one of {choices}, got {value!r}")
