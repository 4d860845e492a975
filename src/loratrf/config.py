"""The one source of truth for every option: `InjectionConfig` (what the user asks for), the
per-module specs `LoRASpec` and `FilterSpec`, and the resolved `Plan` that `inject` applies and
adapter files store. Every option is checked here, once; the modules trust a validated spec.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch

from loratrf.errors import InjectionError

Init = Literal["kaiming", "gaussian"]
Similarity = Literal["cosine", "dot"]
TaskInit = Literal["normal", "ones"]
Gate = Literal["paper", "affine"]
INITS: tuple[str, ...] = ("kaiming", "gaussian")
SIMILARITIES: tuple[str, ...] = ("cosine", "dot")
TASK_INITS: tuple[str, ...] = ("normal", "ones")
GATES: tuple[str, ...] = ("paper", "affine")
DEFAULT_ADAPTER = "default"  # the adapter name of today's single-adapter API (docs/adapters.md)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """One LoRA layer: rank `r`, `alpha` (scale `alpha / r`, or `alpha / sqrt(r)` with
    `rslora`), dropout on the adapter's input, `A`'s init (`"kaiming"` or `"gaussian"`), the
    adapter's dtype name (None: float32 beside half-precision weights, else the weight's) and
    `dora`: DoRA's weight decomposition (a trainable magnitude per output feature times the
    normalised direction `W0 + scale · B A`, Liu et al. 2024) instead of plain LoRA."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    init: Init = "kaiming"
    rslora: bool = False
    adapter_dtype: str | None = None
    dora: bool = False

    def __post_init__(self) -> None:
        check_low_rank(self.rank, self.alpha, self.init)
        if isinstance(self.dropout, bool) or not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise InjectionError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):
            raise InjectionError(f"rslora must be True or False, got {self.rslora!r}")
        if not isinstance(self.dora, bool):
            raise InjectionError(f"dora must be True or False, got {self.dora!r}")
        torch_dtype(self.adapter_dtype)


@dataclasses.dataclass(frozen=True)
class FilterSpec:
    """One task-aware filter: the width `dim` of the hidden states it filters, the rank and
    alpha of its `T ≈ U V`, the relevance (`"cosine"`, the paper's, or `"dot"`), how the task
    vector starts (`"normal"` or `"ones"`), `U`'s init, the adapter's dtype name, and the gate:
    `"paper"`, `s = clamp(sim(h, t), 0, 1)`, or `"affine"`, `s = clamp(a · sim(h, t) + b, 0, 1)`
    with a learnable scale `a` (starting at 1) and offset `b` (starting at 0)."""

    dim: int
    rank: int = LoRASpec.rank
    alpha: float = LoRASpec.alpha
    similarity: Similarity = "cosine"
    task_init: TaskInit = "normal"
    init: Init = LoRASpec.init
    adapter_dtype: str | None = None
    gate: Gate = "paper"

    def __post_init__(self) -> None:
        _check_positive_int("filter_dim", self.dim)
        check_low_rank(self.rank, self.alpha, self.init, prefix="filter_")
        _check_choice("similarity", self.similarity, SIMILARITIES)
        _check_choice("task_init", self.task_init, TASK_INITS)
        torch_dtype(self.adapter_dtype)
        _check_choice("gate", self.gate, GATES)


@dataclasses.dataclass(frozen=True)
class InjectionConfig:
    """The options of one `loratrf.inject` call; `inject(model, config)` redoes it.

    targets: regexes (`re.fullmatch` on qualified module names) of linear layers that get LoRA.
    filters: regexes of modules whose output gets a TaskAwareFilter.
    trainable: regexes of modules that stay fully trainable (a classifier head, say).
    rank, alpha, dropout, init, rslora, dora: every LoRA layer's `LoRASpec` (`dora=True`: DoRA
        layers, a trained magnitude per output feature times the normalised `W0 + scale · B A`).
    filter_rank, filter_alpha: rank and alpha of each filter's `T ≈ U V` (default: LoRA's).
    similarity, task_init, gate: the filters' relevance, task-vector start and gate (`FilterSpec`).
    filter_dim: width of the filtered hidden states, when it cannot be read off the module.
    adapter_dtype: dtype name of every adapter tensor (default: float32 beside half-precision
        weights, else the weight's dtype).
    adapter: the name of the adapter these layers and filters belong to (docs/adapters.md); a
        name other than "default" adds an adapter beside those already on the same modules.
    trainable_tokens: `{embedding regex: [token ids]}`: those rows of each matched nn.Embedding
        train (the adapter's, as PEFT's `trainable_token_indices`), read by the embedding and by
        every linear head sharing its weight (a tied `lm_head`); the rest of the table stays frozen.
    """

    targets: tuple[str, ...] = ()
    filters: tuple[str, ...] = ()
    rank: int = LoRASpec.rank
    alpha: float = LoRASpec.alpha
    dropout: float = LoRASpec.dropout
    init: Init = LoRASpec.init
    rslora: bool = LoRASpec.rslora
    filter_rank: int | None = None
    filter_alpha: float | None = None
    similarity: Similarity = FilterSpec.similarity
    task_init: TaskInit = FilterSpec.task_init
    filter_dim: int | None = None
    trainable: tuple[str, ...] = ()
    adapter_dtype: str | None = None
    gate: Gate = FilterSpec.gate
    dora: bool = LoRASpec.dora
    adapter: str = DEFAULT_ADAPTER
    trainable_tokens: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_adapter_name(self.adapter)
        for name in ("targets", "filters", "trainable"):
            object.__setattr__(self, name, _patterns(name, getattr(self, name)))  # frozen: normalise once
        tokens = token_ids("trainable_tokens", self.trainable_tokens)
        _patterns("trainable_tokens", list(tokens))
        object.__setattr__(self, "trainable_tokens", tokens)
        if not self.targets and not self.filters and not self.trainable_tokens:
            raise InjectionError(
                "nothing to inject: give `targets` (LoRA), `filters` (task-aware filters) and/or `trainable_tokens`"
            )
        self.lora_spec()
        self.filter_spec(1)

    def lora_spec(self) -> LoRASpec:
        """The spec every targeted layer gets."""
        return LoRASpec(self.rank, self.alpha, self.dropout, self.init, self.rslora, self.adapter_dtype, self.dora)

    def filter_spec(self, dim: int) -> FilterSpec:
        """The spec of a filter on hidden states of width `dim` (`filter_dim`, when given, wins)."""
        rank = self.rank if self.filter_rank is None else self.filter_rank
        alpha = self.alpha if self.filter_alpha is None else self.filter_alpha
        dim = dim if self.filter_dim is None else self.filter_dim
        return FilterSpec(
            dim, rank, alpha, self.similarity, self.task_init, self.init, self.adapter_dtype, gate=self.gate
        )

    def replace(self, **overrides: Any) -> InjectionConfig:
        """A copy with `overrides` applied (and validated); an unknown option is an InjectionError."""
        _check_known(type(self), overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InjectionConfig:
        _check_known(cls, data)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> InjectionConfig:
        return cls.from_dict(json.loads(text))


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to inject, by exact names: LoRA layers (`module name -> LoRASpec`), filters
    (`host module name -> FilterSpec`, `""` for the root) and the base parameters that stay
    trainable (`model.named_parameters()` names). `inject` resolves a config into a plan;
    adapter files store the plan of the model they were saved from, with its `stacks`: one
    regex per stack of numbered modules (`model\\.layers\\.\\d+\\.mlp\\.down_proj`) that the plan
    covers whole in that model, so that a model with more or fewer layers is told apart."""

    lora: Mapping[str, LoRASpec] = dataclasses.field(default_factory=dict)
    filters: Mapping[str, FilterSpec] = dataclasses.field(default_factory=dict)
    trainable: tuple[str, ...] = ()
    stacks: tuple[str, ...] = ()
    tokens: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        plain = {
            "lora": {name: _plain(spec) for name, spec in self.lora.items()},
            "filters": {host: _plain(spec) for host, spec in self.filters.items()},
            "trainable": list(self.trainable),
            "stacks": list(self.stacks),
        }
        return plain | ({"tokens": {name: list(ids) for name, ids in self.tokens.items()}} if self.tokens else {})

    @classmethod
    def from_dict(cls, data: object) -> Plan:
        """The plan `to_dict` wrote (files of format version 2 have no 'stacks', and a plan
        without trainable token rows no 'tokens'); anything else is an InjectionError naming
        what is wrong."""
        keys = {"lora", "filters", "trainable"}
        if not isinstance(data, Mapping) or not keys <= set(data) <= keys | {"stacks", "tokens"}:
            raise InjectionError(
                "a plan is a mapping with exactly the keys 'lora', 'filters', 'trainable' and (optionally) "
                "'stacks' and 'tokens'"
            )
        lora, filters, trainable, stacks = data["lora"], data["filters"], data["trainable"], data.get("stacks", [])
        if not isinstance(lora, Mapping) or not isinstance(filters, Mapping):
            raise InjectionError("a plan's 'lora' and 'filters' map module names to option mappings")
        for key, names in (("trainable", trainable), ("stacks", stacks)):
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise InjectionError(f"a plan's {key!r} is a list of strings")
        return cls(
            {_name(n): _spec(LoRASpec, o) for n, o in lora.items()},
            {_name(h): _spec(FilterSpec, o) for h, o in filters.items()},
            tuple(trainable),
            _patterns("stacks", stacks),
            token_ids("a plan's 'tokens'", data.get("tokens", {})),
        )


def torch_dtype(name: str | None) -> torch.dtype | None:
    """The floating-point torch dtype called `name` (`"float32"`), or None for None."""
    if name is None:
        return None
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InjectionError(f"adapter_dtype must name a floating-point torch dtype such as 'float32', got {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters train in float32 beside half-precision weights, else in the weight's dtype."""
    return torch.float32 if weight_dtype in LOW_PRECISION else weight_dtype


def merge_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Merges are computed in at least float32 and never below the weight's own precision."""
    return torch.promote_types(weight_dtype, torch.float32)


def check_low_rank(rank: object, alpha: object, init: object, prefix: str = "") -> None:
    """The options of a `LowRankTransform`: rank >= 1, finite alpha > 0, a known init."""
    _check_positive_int(f"{prefix}rank", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise InjectionError(f"{prefix}alpha must be a finite number > 0, got {alpha!r}")
    _check_choice("init", init, INITS)


def check_adapter_name(name: object) -> None:
    """An adapter name: letters, digits, `_` and `-` (it becomes part of parameter names)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in _RESERVED_NAMES:
        raise InjectionError(
            f"an adapter name is a non-empty string of letters, digits, '_' and '-' (it becomes part of "
            f"parameter names), and not one of torch's ModuleDict attributes; got {name!r}"
        )


_RESERVED_NAMES = frozenset(dir(torch.nn.ModuleDict()))


def _patterns(kind: str, patterns: object) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise InjectionError(f"{kind} must be a list of regex strings, got {patterns!r}") from None
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise InjectionError(f"{kind} must be regex strings, got {pattern!r} ({type(pattern).__name__})")
        try:
            re.compile(pattern)
        except re.error as e:
            raise InjectionError(f"{kind} pattern {pattern!r} is not a valid regular expression: {e}") from None
    return patterns


def token_ids(kind: str, tokens: object) -> dict[str, tuple[int, ...]]:
    """`{name or pattern: [token ids]}` checked: strings to non-empty lists of distinct ints >= 0."""
    if not isinstance(tokens, Mapping):
        raise InjectionError(
            f"{kind} maps embedding names to lists of token ids, {{'embed_tokens': [32000]}}; got {tokens!r}"
        )
    checked = {}
    for name, ids in tokens.items():
        if (
            isinstance(ids, (str, bytes))
            or not isinstance(ids, (list, tuple))
            or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        ):
            raise InjectionError(f"{kind}: {name!r} needs a non-empty list of token ids (ints >= 0), got {ids!r}")
        if len(set(ids)) != len(ids):
            raise InjectionError(f"{kind}: {name!r} lists a token id more than once: {list(ids)}")
        checked[_name(name)] = tuple(ids)
    return checked


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InjectionError(f"{name} must be an integer >= 1, got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InjectionError(f"{name} must be one of {choices}, got {value!r}")


def _check_known(cls: type, options: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InjectionError(f"unknown {cls.__name__} option(s) {unknown}; known options are {sorted(known)}")


def _plain(spec: object) -> dict[str, Any]:
    """A spec or config as JSON-ready data (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec).items()}


def _name(name: object) -> str:
    if not isinstance(name, str):
        raise InjectionError(f"a plan names modules with strings, got {name!r}")
    return name


def _spec(cls: type, options: object):
    if not isinstance(options, Mapping):
        raise InjectionError(f"a {cls.__name__} is a mapping of options, got {options!r}")
    _check_known(cls, options)
    try:
        return cls(**options)
    except TypeError as e:  # a required option missing
        raise InjectionError(f"incomplete {cls.__name__} {dict(options)}: {e}") from None
