"""The filters' gates: record them (`record_gates`), summarise them (`gate_statistics`), and
choose where they start (`calibrate_filters`).

A filter's gate is `s = clamp(cos(h, t), 0, 1)` per token (`clamp(a · cos(h, t) + b, 0, 1)` with
`gate="affine"`). How it starts decides what the filter can learn: where `s = 0` for every
token, `t`, `U` and `V` get exactly zero gradient and the filter stays the identity; where `s`
is small everywhere, the filter's update is scaled down with it. `calibrate_filters` offers
(docs/method.md measures each):

- `start="mean"`: `t` along the mean direction of the host's tokens, so nearly every gate opens;
- `start="contrastive"`: `t` along the direction that separates the classes of a labelled
  batch in the host's hidden states (representation engineering, Zou et al. 2023), so the
  tokens of one class's sentences get the larger `s`;
- `gate_range=(q0, q1)`, for affine gates: `a` and `b` such that `s` runs from 0 to 1 between
  those quantiles of the tokens' cosines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

from loratrf.errors import AdapterError, FilterOutputError
from loratrf.filter import TaskAwareFilter
from loratrf.walk import active_adapter, adapter_names, check_held, named_filters

STARTS: tuple[str, ...] = ("mean", "contrastive")


def _filters_of(model: nn.Module, purpose: str, adapter: str | None) -> tuple[str, dict[str, TaskAwareFilter]]:
    """Adapter `adapter`'s filters (None: the active adapter's) by host name, and the adapter."""
    with_filters = [n for n in adapter_names(model) if next(named_filters(model, n), None) is not None]
    if not with_filters:
        raise FilterOutputError(f"the model has no task-aware filters to {purpose}; inject filters first")
    if adapter is None:
        adapter = active_adapter(model)
        if adapter is None:
            raise AdapterError(
                f"no adapter is active, so there are no gates to {purpose}; name one of {with_filters} "
                "(adapter=...) or activate one with loratrf.set_adapter"
            )
    check_held(model, [adapter])
    filters = dict(named_filters(model, adapter))
    if not filters:
        raise FilterOutputError(
            f"adapter {adapter!r} has no task-aware filters to {purpose}; these adapters have some: {with_filters}"
        )
    return adapter, filters


def _record(store: list[Tensor], task_filter: TaskAwareFilter, inputs: tuple) -> None:
    h = inputs[0] if inputs else None
    if isinstance(h, Tensor) and h.ndim >= 1 and h.shape[-1] == task_filter.dim:  # else forward raises
        with torch.no_grad():
            store.append(task_filter.relevance(h.detach()).squeeze(-1))


@contextlib.contextmanager
def record_gates(model: nn.Module, adapter: str | None = None) -> Iterator[dict[str, list[Tensor]]]:
    """Inside `with loratrf.record_gates(model) as gates:`, every filter of `adapter` (None: the
    active adapter) records its gate: `gates[host_name]` is a list holding one detached tensor
    `s` of shape `h.shape[:-1]` (at least float32) per call of the filter, in call order (under
    `use_adapters`, the calls on its own rows).

    `s` comes from the filter's own `relevance`, computed once more beside its forward by a
    forward pre-hook that exists only inside the context: outputs and gradients are
    unchanged, and outside the context nothing is recorded or computed.
    """
    _, filters = _filters_of(model, "record", adapter)
    gates: dict[str, list[Tensor]] = {host: [] for host in filters}
    handles = [f.register_forward_pre_hook(functools.partial(_record, gates[host])) for host, f in filters.items()]
    try:
        yield gates
    finally:
        for handle in handles:
            handle.remove()


@dataclasses.dataclass(frozen=True)
class GateStats:
    """One filter's gates over the real tokens of a set of sentences.

    mean: the mean of `s`. open: the share of tokens with `s > 0`. spread: the standard
    deviation of `s` across the tokens of a sentence (population std; sentences of at least two
    tokens), averaged over sentences: how selective the gate is within a sentence. tokens and
    sentences: how many were counted. class_means: with labels, the mean `s` of the tokens of
    each class's sentences, in the order of the sorted class ids (else None).
    """

    mean: float
    open: float
    spread: float
    tokens: int
    sentences: int
    class_means: tuple[float, ...] | None = None


def _per_call(name: str, values: Tensor | Sequence[Tensor] | None, calls: int) -> list[Tensor | None]:
    if values is None:
        return [None] * calls
    if isinstance(values, Tensor):
        values = [values]
    values = list(values)
    if len(values) != calls:
        raise FilterOutputError(
            f"{name} holds {len(values)} tensor(s) but the filters recorded {calls} call(s); "
            f"give one {name[:-1]} per recorded call, in call order"
        )
    return values


def gate_statistics(
    gates: Mapping[str, Sequence[Tensor]],
    masks: Tensor | Sequence[Tensor] | None = None,
    labels: Tensor | Sequence[Tensor] | None = None,
) -> dict[str, GateStats]:
    """`GateStats` per host, from what `record_gates` recorded.

    Each recorded `s` has shape `[..., tokens]`: its last dimension runs over a sentence's
    tokens and the leading ones over sentences. `masks` (one per recorded call, the shape of
    its `s`; an attention mask, say) marks the real tokens: padding is left out. `labels` (one
    per call, shape `s.shape[:-1]`: a class id per sentence) adds the mean `s` per class. A
    single tensor stands for a list of one, when the model ran once.
    """
    if not gates:
        raise FilterOutputError("no gates to summarise; record them with loratrf.record_gates(model) first")
    stats = {}
    for host, calls in gates.items():
        if not calls:
            raise FilterOutputError(
                f"filter {host!r} recorded no gate; run the model inside `with loratrf.record_gates(model)`"
            )
        call_masks = _per_call("masks", masks, len(calls))
        call_labels = _per_call("labels", labels, len(calls))
        values, spreads, groups = [], [], []
        for s, mask, label in zip(calls, call_masks, call_labels):
            s = s.double()
            s = s.unsqueeze(0) if s.ndim == 0 else s
            if mask is None:
                mask = torch.ones_like(s, dtype=torch.bool)
            elif tuple(mask.shape) != tuple(s.shape):
                raise FilterOutputError(
                    f"a mask of shape {tuple(mask.shape)} does not fit the gates of {host!r}, of shape "
                    f"{tuple(s.shape)}; give a mask of the hidden states' shape without their last dimension"
                )
            mask = mask.to(device=s.device, dtype=torch.bool)
            if label is not None and tuple(label.shape) != tuple(s.shape[:-1]):
                raise FilterOutputError(
                    f"labels of shape {tuple(label.shape)} do not fit the gates of {host!r}, of shape "
                    f"{tuple(s.shape)}; give one class id per sentence, shape {tuple(s.shape[:-1])}"
                )
            s2, m2 = s.reshape(-1, s.shape[-1]), mask.reshape(-1, s.shape[-1])
            values.append(s2[m2])
            count = m2.sum(-1)
            mean = (s2 * m2).sum(-1) / count.clamp_min(1)
            var = (((s2 - mean[:, None]) ** 2) * m2).sum(-1) / count.clamp_min(1)
            spreads.append(var.sqrt()[count >= 2])
            if label is not None:
                groups.append(label.reshape(-1, 1).to(s.device).expand_as(s2)[m2])
        values_all, spreads_all = torch.cat(values), torch.cat(spreads)
        class_means = None
        if groups:
            group = torch.cat(groups)
            class_means = tuple(values_all[group == c].mean().item() for c in torch.unique(group).tolist())
        stats[host] = GateStats(
            mean=values_all.mean().item() if values_all.numel() else math.nan,
            open=(values_all > 0).double().mean().item() if values_all.numel() else math.nan,
            spread=spreads_all.mean().item() if spreads_all.numel() else math.nan,
            tokens=values_all.numel(),
            sentences=spreads_all.numel(),
            class_means=class_means,
        )
    return stats


def calibrate_filters(
    model: nn.Module,
    *args,
    start: str = "mean",
    labels: Tensor | None = None,
    token_mask: Tensor | None = None,
    gate_range: tuple[float, float] | None = None,
    adapter: str | None = None,
    **kwargs,
) -> dict[str, float]:
    """Run `model(*args, **kwargs)` once, without grad and in eval mode, and set the task vector
    of every filter of `adapter` (None: the active adapter, the one that must run) from the
    tokens `h_i` its host outputs:

    - `start="mean"`: `t = m / |m| / mean_i |h_i|` with `m = mean_i(h_i / |h_i|)`;
    - `start="contrastive"` (needs `labels`, a class id per sentence: shape `h.shape[:k]`, e.g.
      `[batch]` for `h [batch, tokens, dim]`): the unit direction that separates the classes,
      again over `mean_i |h_i|`. With `m_c` the mean of `h_i / |h_i|` over the tokens of class
      `c`'s sentences: for two classes `m_1 - m_0` (the larger class id minus the smaller), for
      more the leading principal direction of the centred `m_c`, signed so that the class
      furthest from the others along it lies on its positive side.

    `gate_range=(q0, q1)` (filters with `gate="affine"` only) also sets each gate's scale and
    offset so that `s = clamp(a · cos(h, t) + b, 0, 1)` is 0 at the `q0` quantile of the tokens'
    cosines and 1 at the `q1` quantile: about a share `1 - q0` of tokens opens, and `s` spreads
    over [0, 1] instead of the few hundredths a single direction's cosine reaches in hundreds
    of dimensions. Without it, `a` and `b` are left as they are.

    `token_mask` (the shape of `h` without its last dimension; an attention mask, say) keeps
    padding out. Returns, per filter host, the share of those tokens whose gate is open
    (`s > 0`) afterwards. Only the gates change and the filters are still the identity (`V = 0`
    until trained), so the model's outputs do not change.
    """
    if start not in STARTS:
        raise FilterOutputError(f"start must be one of {STARTS}, got {start!r}")
    if start == "contrastive" and labels is None:
        raise FilterOutputError(
            "start='contrastive' needs labels: a class id per sentence of the batch, with two classes or more"
        )
    if start == "mean" and labels is not None:
        raise FilterOutputError("labels are used by start='contrastive' only; drop them or pass start='contrastive'")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise FilterOutputError(f"labels must be integer class ids, got dtype {labels.dtype}")
        if torch.unique(labels).numel() < 2:
            raise FilterOutputError(
                f"labels hold one class only ({labels.unique().tolist()}); the contrastive start needs "
                "sentences of at least two classes in the batch"
            )
    adapter, filters = _filters_of(model, "calibrate", adapter)
    if adapter != active_adapter(model):
        raise AdapterError(
            f"adapter {adapter!r} is not the active one ({active_adapter(model)!r}), so its filters would not run on "
            f"the sample batch; call loratrf.set_adapter(model, {adapter!r}) first: its filters are calibrated on "
            "the hidden states of the model that runs it"
        )
    if gate_range is not None:
        _check_gate_range(gate_range, filters)
    seen: dict[str, Tensor] = {}
    handles = [
        f.register_forward_pre_hook(lambda _, inputs, host=host: seen.setdefault(host, inputs[0].detach()))
        for host, f in filters.items()
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = sorted(set(filters) - set(seen))
    if missing:
        raise FilterOutputError(
            f"these filters did not run on the sample batch, so they cannot be calibrated: {missing}"
        )
    # every check runs before any filter changes
    starts = {
        host: _task_vector(host, seen[host], _token_mask(host, seen[host], token_mask), labels) for host in filters
    }
    return {host: _set_gate(filters[host], seen[host], t, live, gate_range) for host, (t, live) in starts.items()}


def _check_gate_range(gate_range: object, filters: Mapping[str, TaskAwareFilter]) -> None:
    ok = isinstance(gate_range, (tuple, list)) and len(gate_range) == 2
    ok = ok and all(isinstance(q, (int, float)) and not isinstance(q, bool) for q in gate_range)
    if not ok or not 0.0 <= gate_range[0] < gate_range[1] <= 1.0:
        raise FilterOutputError(
            f"gate_range must be two quantiles (q0, q1) with 0 <= q0 < q1 <= 1, such as (0.5, 0.95); got {gate_range!r}"
        )
    paper = sorted(host for host, f in filters.items() if f.gate != "affine")
    if paper:
        raise FilterOutputError(
            f"gate_range sets the scale and offset of affine gates, but the filters on {paper} have the paper's "
            "gate, which has neither; inject with gate='affine' (or drop gate_range)"
        )


def _token_mask(host: str, h: Tensor, token_mask: Tensor | None) -> Tensor:
    if token_mask is None:
        return torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device)
    token_mask = torch.as_tensor(token_mask)
    if tuple(token_mask.shape) != tuple(h.shape[:-1]):
        raise FilterOutputError(
            f"token_mask of shape {tuple(token_mask.shape)} does not fit the hidden states of {host!r}, of shape "
            f"{tuple(h.shape)}; give a mask of their shape without the last dimension"
        )
    return token_mask.to(device=h.device, dtype=torch.bool)


def _token_labels(host: str, h: Tensor, labels: Tensor) -> Tensor:
    k = labels.ndim
    if not 1 <= k < h.ndim or tuple(labels.shape) != tuple(h.shape[:k]):
        raise FilterOutputError(
            f"labels of shape {tuple(labels.shape)} do not fit the hidden states of {host!r}, of shape "
            f"{tuple(h.shape)}; give one class id per sentence, shape {tuple(h.shape[:1])}"
        )
    return labels.to(h.device).reshape(*labels.shape, *([1] * (h.ndim - 1 - k))).expand(h.shape[:-1])


def _task_vector(host: str, h: Tensor, mask: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
    """The calibrated task vector (float64) and which tokens count (real and non-zero)."""
    tokens = rearrange(h, "... d -> (...) d").double()
    norms = torch.linalg.vector_norm(tokens, dim=-1)
    live = (norms > 0) & mask.reshape(-1)
    if not bool(live.any()):
        raise FilterOutputError(
            "a filter's host returned only zero vectors on the sample batch (or the mask kept none); "
            "calibrate on real inputs"
        )
    units = tokens[live] / norms[live, None]
    if labels is None:
        direction = units.mean(0)
    else:
        token_labels = _token_labels(host, h, labels).reshape(-1)[live]
        classes = torch.unique(token_labels)
        if classes.numel() < 2:
            raise FilterOutputError(
                f"the real tokens reaching {host!r} belong to one class only; the contrastive start needs "
                "sentences of at least two classes"
            )
        means = torch.stack([units[token_labels == c].mean(0) for c in classes])  # [classes, d]
        direction = _separating_direction(means)
    direction = direction / torch.linalg.vector_norm(direction).clamp_min(torch.finfo(torch.float64).tiny)
    return direction / norms[live].mean(), live


@torch.no_grad()
def _set_gate(
    task_filter: TaskAwareFilter, h: Tensor, t: Tensor, live: Tensor, gate_range: tuple[float, float] | None
) -> float:
    """Set `t` (and with `gate_range`, the gate's scale and offset); the share of open gates."""
    task_filter.task_vector.copy_(t)
    if gate_range is not None:
        cosines = task_filter.similarity_to_task(h).reshape(-1)[live].double()
        low, high = torch.quantile(cosines, torch.tensor(gate_range, dtype=torch.float64, device=cosines.device))
        scale = 1.0 / (high - low).clamp_min(torch.finfo(torch.float32).eps)
        task_filter.gate_scale.fill_(scale.item())
        task_filter.gate_offset.fill_((-low * scale).item())
    s = task_filter.relevance(h).reshape(-1)[live]
    return (s > 0).double().mean().item()


def _separating_direction(means: Tensor) -> Tensor:
    """`means[1] - means[0]` for two classes; for more, the leading right singular vector of the
    centred class means, signed so that the largest projection outweighs the most negative one."""
    if means.shape[0] == 2:
        return means[1] - means[0]
    centred = means - means.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    projections = centred @ direction
    return direction if projections.max() >= -projections.min() else -direction
