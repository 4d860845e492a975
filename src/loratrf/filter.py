"""TaskAwareFilter: the paper's task-aware filter on hidden states (equations 4 and 5)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from loratrf import kernels
from loratrf.base_checkpoints import keep_absent_adapter_tensors
from loratrf.errors import FilterOutputError, InjectionError
from loratrf.low_rank import Init, LowRankTransform

Similarity = Literal["cosine", "dot"]
TaskInit = Literal["normal", "ones"]
SIMILARITIES: tuple[str, ...] = ("cosine", "dot")
TASK_INITS: tuple[str, ...] = ("normal", "ones")


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
    """

    base_parameter_names: tuple[str, ...] = ()

    def __init__(
        self,
        dim: int,
        rank: int = 8,
        alpha: float = 16.0,
        *,
        similarity: Similarity = "cosine",
        task_init: TaskInit = "normal",
        init: Init = "kaiming",
        eps: float = 1e-8,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if similarity not in SIMILARITIES:
            raise InjectionError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        if task_init not in TASK_INITS:
            raise InjectionError(f"task_init must be one of {TASK_INITS}, got {task_init!r}")
        self.dim, self.similarity, self.task_init, self.eps = dim, similarity, task_init, eps
        self.task_vector = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.transform = LowRankTransform(dim, dim, rank, alpha, init=init, device=device, dtype=dtype)
        self.reset_task_vector()
        self.register_load_state_dict_pre_hook(keep_absent_adapter_tensors)

    @torch.no_grad()
    def reset_task_vector(self) -> None:
        if self.task_init == "normal":
            self.task_vector.normal_(0.0, 1.0 / math.sqrt(self.dim))
        else:
            self.task_vector.fill_(1.0 / math.sqrt(self.dim))

    def reset_parameters(self) -> None:
        """Back to the initial state: a fresh task vector and an identity filter."""
        self.reset_task_vector()
        self.transform.reset_parameters()

    def relevance(self, h: Tensor) -> Tensor:
        """`s = clamp(sim(h, t), 0, 1)`: `[..., dim] -> [..., 1]`, in at least float32."""
        return kernels.relevance(h, self.task_vector, self.similarity == "cosine", self.eps).unsqueeze(-1)

    def forward(self, h: Tensor) -> Tensor:
        if h.shape[-1] != self.dim:
            raise FilterOutputError(
                f"TaskAwareFilter(dim={self.dim}) got hidden states of shape {tuple(h.shape)}; "
                f"the filtered module's output width is {h.shape[-1]}, so inject with "
                f"filter_dim={h.shape[-1]} (or filter a module whose output has width {self.dim})"
            )
        T = self.transform
        return kernels.task_filter(h, self.task_vector, T.U, T.V, T.scale, self.similarity == "cosine", self.eps)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, similarity={self.similarity!r}, task_init={self.task_init!r}"


FILTER_NAME = "task_filter"


def filter_host_output(host: nn.Module, args: tuple, output: object) -> object:
    """Forward hook: filter `output`, or the first element of a tuple or list output."""
    task_filter = getattr(host, FILTER_NAME)
    if isinstance(output, Tensor):
        return task_filter(output)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        first = task_filter(output[0])
        if hasattr(output, "_fields"):  # namedtuple
            return output._replace(**{output._fields[0]: first})
        return type(output)([first, *output[1:]])
    raise FilterOutputError(
        f"a task-aware filter sits on {type(host).__name__}, whose forward returned "
        f"{type(output).__name__}; filters act on a tensor output or on the first element of a "
        "tuple or list output, so filter a module that returns hidden states"
    )


def attach_filter(host: nn.Module, task_filter: TaskAwareFilter) -> None:
    """Register `task_filter` as `host.task_filter` and filter `host`'s output with it."""
    host.add_module(FILTER_NAME, task_filter)
    host.register_forward_hook(filter_host_output)


def detach_filter(host: nn.Module) -> None:
    """Undo `attach_filter`: `host` computes its plain output again."""
    del host._modules[FILTER_NAME]
    for hook_id, hook in list(host._forward_hooks.items()):
        if hook is filter_host_output:
            del host._forward_hooks[hook_id]
            host._forward_hooks_with_kwargs.pop(hook_id, None)
            host._forward_hooks_always_called.pop(hook_id, None)


def filter_of(host: nn.Module) -> TaskAwareFilter | None:
    found = host._modules.get(FILTER_NAME)
    return found if isinstance(found, TaskAwareFilter) else None
