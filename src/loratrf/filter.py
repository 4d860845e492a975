"""TaskAwareFilter: the paper's task-aware filter on hidden states (equations 4 and 5)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from loratrf import kernels
from loratrf.base_checkpoints import keep_absent_adapter_tensors
from loratrf.config import (
    DEFAULT_ADAPTER,
    FilterSpec,
    Gate,
    Init,
    Similarity,
    TaskInit,
    default_adapter_dtype,
    dtype_name,
    torch_dtype,
)
from loratrf.errors import FilterOutputError
from loratrf.low_rank import LowRankTransform
from loratrf.rows import AdapterRows

if TYPE_CHECKING:
    from loratrf.versioned import Derived


class TaskAwareFilter(nn.Module):
    """`out = h + T(s ⊙ h)` with `s = clamp(sim(h, t), 0, 1)` per token.

    Shapes: `h [..., dim] -> out [..., dim]`; task vector `t [dim]`; `s [..., 1]`;
    `T = self.transform`, a `LowRankTransform(dim, dim, rank, alpha)` whose `V` starts at
    zero, so a fresh filter is exactly the identity.

    `similarity="cosine"` (the paper's text) gives `s = clamp(h·t / max(|h| |t|, eps), 0, 1)`;
    `"dot"` gives `s = clamp(h·t, 0, 1)`. `s` is computed in at least float32, and a zero
    token gets `s = 0`, never NaN. `T(s ⊙ h)` is computed as `s ⊙ (h U)`, so no `[..., dim]`
    temporary is built for `s ⊙ h`.

    `task_init="normal"` draws `t ~ N(0, 1/dim)` (a random direction of about unit norm);
    `"ones"` sets `t = 1/sqrt(dim)` (relevance = the normalised sum of a token's features).

    `gate="affine"` gives `s = clamp(a · sim(h, t) + b, 0, 1)` with learnable scalars
    `gate_scale = a` (starting at 1) and `gate_offset = b` (starting at 0, so it starts as the
    paper's gate); `calibrate_filters(gate_range=...)` sets them so that the gate uses its range.
    `"paper"` (the default) has neither parameter.
    """

    base_parameter_names: tuple[str, ...] = ()
    weight_cache: Derived[tuple[Tensor, Tensor]] | None = None  # `[U | t]ᵀ`, `|t|`: inside `cache_effective_weights`

    def __init__(
        self,
        dim: int,
        rank: int = FilterSpec.rank,
        alpha: float = FilterSpec.alpha,
        *,
        similarity: Similarity = FilterSpec.similarity,
        task_init: TaskInit = FilterSpec.task_init,
        init: Init = FilterSpec.init,
        gate: Gate = FilterSpec.gate,
        eps: float = 1e-8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        FilterSpec(dim, rank, alpha, similarity, task_init, init, gate=gate)  # validates every option
        self.dim, self.similarity, self.task_init, self.gate, self.eps = dim, similarity, task_init, gate, eps
        self.task_vector = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        if gate == "affine":
            self.gate_scale = nn.Parameter(torch.ones((), device=device, dtype=dtype))
            self.gate_offset = nn.Parameter(torch.zeros((), device=device, dtype=dtype))
        self.transform = LowRankTransform(dim, dim, rank, alpha, init=init, device=device, dtype=dtype)
        self.reset_task_vector()
        self.register_load_state_dict_pre_hook(keep_absent_adapter_tensors)
        self.dispatch: FilterDispatch | None = None  # the hook on its host, while attached

    @classmethod
    def from_spec(cls, spec: FilterSpec, device: torch.device, host_dtype: torch.dtype) -> TaskAwareFilter:
        """The filter `spec` describes, beside a host whose parameters are of `host_dtype`."""
        dtype = torch_dtype(spec.adapter_dtype) or default_adapter_dtype(host_dtype)
        return cls(
            spec.dim,
            spec.rank,
            spec.alpha,
            similarity=spec.similarity,
            task_init=spec.task_init,
            init=spec.init,
            gate=spec.gate,
            device=device,
            dtype=dtype,
        )

    @property
    def spec(self) -> FilterSpec:
        """This filter's options, as `inject` plans them and adapter files store them."""
        t = self.transform
        return FilterSpec(
            self.dim,
            t.rank,
            t.alpha,
            self.similarity,
            self.task_init,
            t.init,
            dtype_name(self.task_vector.dtype),
            gate=self.gate,
        )

    @torch.no_grad()
    def reset_task_vector(self) -> None:
        if self.task_init == "normal":
            self.task_vector.normal_(0.0, 1.0 / math.sqrt(self.dim))
        else:
            self.task_vector.fill_(1.0 / math.sqrt(self.dim))

    def reset_parameters(self) -> None:
        """Back to the initial state: a fresh task vector, the paper's gate and an identity filter."""
        self.reset_task_vector()
        if self.gate == "affine":
            with torch.no_grad():
                self.gate_scale.fill_(1.0)
                self.gate_offset.zero_()
        self.transform.reset_parameters()

    def similarity_to_task(self, h: Tensor) -> Tensor:
        """`sim(h, t)` before the gate: `[..., dim] -> [...]`, in at least float32."""
        return kernels.similarity(h, self.task_vector, self.similarity == "cosine", self.eps)

    def relevance(self, h: Tensor) -> Tensor:
        """`s = clamp(sim(h, t), 0, 1)` (`clamp(a · sim(h, t) + b, 0, 1)` with `gate="affine"`):
        `[..., dim] -> [..., 1]`, in at least float32."""
        cosine = self.similarity == "cosine"
        return kernels.relevance(h, self.task_vector, cosine, self.eps, self._affine()).unsqueeze(-1)

    def _affine(self) -> tuple[Tensor, Tensor] | None:
        return (self.gate_scale, self.gate_offset) if self.gate == "affine" else None

    def forward(self, h: Tensor) -> Tensor:
        if h.shape[-1] != self.dim:
            raise FilterOutputError(
                f"TaskAwareFilter(dim={self.dim}) got hidden states of shape {tuple(h.shape)}; "
                f"the filtered module's output width is {h.shape[-1]}, so inject with "
                f"filter_dim={h.shape[-1]} (or filter a module whose output has width {self.dim})"
            )
        T = self.transform
        cosine = self.similarity == "cosine"
        return kernels.task_filter(
            h, self.task_vector, T.U, T.V, T.scale, cosine, self.eps, self._affine(), self.weight_cache
        )

    def extra_repr(self) -> str:
        gate = "" if self.gate == "paper" else f", gate={self.gate!r}"
        return f"dim={self.dim}, similarity={self.similarity!r}, task_init={self.task_init!r}{gate}"


FILTER_NAME = "task_filter"  # the default adapter's filter, on its host
NAMED_FILTERS = "task_filters"  # every other adapter's: an nn.ModuleDict on the host, name -> filter


def filter_of(host: nn.Module, name: str | None = DEFAULT_ADAPTER) -> TaskAwareFilter | None:
    """Adapter `name`'s filter on `host`, or None: the default adapter's is `host.task_filter`
    (so its state-dict keys stay `task_filter.*`), any other's `host.task_filters[name]`."""
    if name == DEFAULT_ADAPTER:
        found = getattr(host, FILTER_NAME, None)
    else:
        named = getattr(host, NAMED_FILTERS, None)
        found = named[name] if isinstance(named, nn.ModuleDict) and name in named else None
    return found if isinstance(found, TaskAwareFilter) else None


def filter_names(host: nn.Module) -> list[str]:
    """The adapters that have a filter on `host`."""
    named = getattr(host, NAMED_FILTERS, None)
    names = list(named) if isinstance(named, nn.ModuleDict) else []
    return [DEFAULT_ADAPTER] * (filter_of(host) is not None) + names


class FilterDispatch:
    """Which filter runs on a host: adapter `active`'s (None, or an adapter without a filter
    here: none) or, while `rows` is set (`loratrf.use_adapters`), each row of the output
    `[B, ..., dim]` its own adapter's. Every filter on the host refers to it as
    `task_filter.dispatch`; `handle` is that of the host's one hook, `filter_host_output`."""

    def __init__(self, host: nn.Module) -> None:
        self.active: str | None = DEFAULT_ADAPTER
        self.rows: AdapterRows | None = None
        self.handle = host.register_forward_hook(filter_host_output)

    def filter(self, host: nn.Module, h: Tensor) -> Tensor:
        if self.rows is None:
            task_filter = filter_of(host, self.active)
            return h if task_filter is None else task_filter(h)
        groups = [(index, f) for name, index in self.rows.indices(h) if (f := filter_of(host, name)) is not None]
        out = h.clone() if groups else h
        for index, task_filter in groups:
            out.index_copy_(0, index, task_filter(h.index_select(0, index)))
        return out


def filter_host_output(host: nn.Module, args: tuple, output: object) -> object:
    """Forward hook: filter `output`, or the first element of a tuple or list output."""
    dispatch = filter_dispatch(host)
    if isinstance(output, Tensor):
        return dispatch.filter(host, output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        first = dispatch.filter(host, output[0])
        if hasattr(output, "_fields"):  # namedtuple
            return output._replace(**{output._fields[0]: first})
        return type(output)([first, *output[1:]])
    raise FilterOutputError(
        f"a task-aware filter sits on {type(host).__name__}, whose forward returned "
        f"{type(output).__name__}; filters act on a tensor output or on the first element of a "
        "tuple or list output, so filter a module that returns hidden states"
    )


def filter_dispatch(host: nn.Module) -> FilterDispatch | None:
    """The hook through which `host`'s filters run, or None where it holds none."""
    if (default := filter_of(host)) is not None:  # the common case, without listing the others
        return default.dispatch
    names = filter_names(host)
    return filter_of(host, names[0]).dispatch if names else None


def attach_filter(host: nn.Module, task_filter: TaskAwareFilter, name: str = DEFAULT_ADAPTER) -> None:
    """Make `task_filter` adapter `name`'s filter on `host` (see `filter_of`), filtering the
    host's output through its one `FilterDispatch` hook (registered with the host's first filter)."""
    dispatch = filter_dispatch(host) or FilterDispatch(host)
    if name == DEFAULT_ADAPTER:
        host.add_module(FILTER_NAME, task_filter)
    else:
        if not hasattr(host, NAMED_FILTERS):
            host.add_module(NAMED_FILTERS, nn.ModuleDict())
        getattr(host, NAMED_FILTERS)[name] = task_filter
    task_filter.dispatch = dispatch


def detach_filter(host: nn.Module, name: str = DEFAULT_ADAPTER) -> TaskAwareFilter:
    """Undo `attach_filter`; with the host's last filter its hook goes too, and `host` computes
    its plain output again. Returns the filter."""
    task_filter = filter_of(host, name)
    if name == DEFAULT_ADAPTER:
        delattr(host, FILTER_NAME)
    else:
        named = getattr(host, NAMED_FILTERS)
        del named[name]
        if not len(named):
            delattr(host, NAMED_FILTERS)
    if not filter_names(host):
        task_filter.dispatch.handle.remove()
    task_filter.dispatch = None
    return task_filter


def move_filters(source: nn.Module, target: nn.Module) -> None:
    """Every filter of `source` onto `target`, which holds none; the same one runs."""
    dispatch = filter_dispatch(source)
    for name in filter_names(source):
        attach_filter(target, detach_filter(source, name), name)
    if dispatch is not None:
        filter_dispatch(target).active = dispatch.active
