"""calibrate_filters: start each task vector where the hidden states are, so no filter is dead.

A filter's gate is `s = clamp(cos(h, t), 0, 1)`. When a random `t` points away from every
token (likely on pretrained models, whose hidden states share a dominant direction), `s = 0`
everywhere, `t`, `U` and `V` get exactly zero gradient, and the filter stays the identity.
Calibration sets `t` to the mean direction of the host's outputs on a sample batch, scaled by
their inverse mean norm, so both cosine and dot gates start inside (0, 1) for typical tokens.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from loratrf.errors import FilterOutputError
from loratrf.filter import TaskAwareFilter
from loratrf.walk import named_filters


def calibrate_filters(model: nn.Module, *args, **kwargs) -> dict[str, float]:
    """Run `model(*args, **kwargs)` once without grad and set every filter's task vector to

        t = mean_i(h_i / |h_i|) / |mean_i(h_i / |h_i|)| / mean_i |h_i|

    over the tokens `h_i` its host outputs. Returns, per filter host, the fraction of those
    tokens whose gate is open (`s > 0`) afterwards. The filters stay the identity (only `t`
    changes), so the model's outputs do not change.
    """
    filters = dict(named_filters(model))
    if not filters:
        raise FilterOutputError("the model has no task-aware filters to calibrate; inject filters first")
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
    return {host: _calibrate(filters[host], seen[host]) for host in filters}


@torch.no_grad()
def _calibrate(task_filter: TaskAwareFilter, h: Tensor) -> float:
    tokens = rearrange(h, "... d -> (...) d").double()
    norms = torch.linalg.vector_norm(tokens, dim=-1)
    live = norms > 0
    if not bool(live.any()):
        raise FilterOutputError(
            "a filter's host returned only zero vectors on the sample batch; calibrate on real inputs"
        )
    direction = (tokens[live] / norms[live, None]).mean(0)
    direction = direction / torch.linalg.vector_norm(direction).clamp_min(torch.finfo(torch.float64).tiny)
    task_filter.task_vector.copy_(direction / norms[live].mean())
    return (task_filter.relevance(h) > 0).float().mean().item()
