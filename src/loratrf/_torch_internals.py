"""Every access to torch's private internals in loratrf, each with the reason it is needed."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn


def hold_unregistered(module: nn.Module, name: str, value: nn.Module | None) -> None:
    """`module.<name> = value` without registering `value` as a child. `LoRALinear` keeps the
    module it wraps for `unload`; registered, its weight would appear twice in `parameters()`
    and under a second name in `state_dict()`."""
    object.__setattr__(module, name, value)


def registered_children(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every `(name, child)` registered on `module`, a child registered under several names once
    per name: `named_children()` lists a shared child only under its first name, and injection
    must see (and replace) it under each."""
    for name, child in module._modules.items():
        if child is not None:
            yield name, child


def compiled_original(model: nn.Module) -> nn.Module | None:
    """The module inside a `torch.compile` wrapper (`OptimizedModule._orig_mod`, which has no
    public accessor), or None."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else None


# PyTorch's fused encoder paths (eval mode, no grad) read `linear1.weight`, `linear2.weight`
# and the attention weights directly and skip the submodules' forwards, and the encoder may
# hand its layers nested tensors. Each undocumented switch below turns one off without
# changing the math: `TransformerEncoderLayer` takes its fast path only when
# `activation_relu_or_gelu` is set, `TransformerEncoder` builds nested tensors only when
# `use_nested_tensor` is.
_FUSED_PATH_SWITCHES: dict[type[nn.Module], tuple[str, object]] = {
    nn.TransformerEncoderLayer: ("activation_relu_or_gelu", 0),
    nn.TransformerEncoder: ("use_nested_tensor", False),
}


def set_fused_encoder_path(module: nn.Module, enabled: bool) -> None:
    """Turn PyTorch's fused encoder path of `module` off (remembering its setting) or back on."""
    for cls, (attr, off) in _FUSED_PATH_SWITCHES.items():
        if not isinstance(module, cls):
            continue
        saved = f"_loratrf_saved_{attr}"
        if not enabled:
            module.__dict__.setdefault(saved, getattr(module, attr))
            setattr(module, attr, off)
        elif saved in module.__dict__:
            setattr(module, attr, module.__dict__.pop(saved))


def parameter_slots(module: nn.Module) -> list[str]:
    """The names of `module`'s own parameters, those registered as None included (as
    `nn.MultiheadAttention` registers `q_proj_weight` when it packs them): no public API lists
    an empty slot."""
    return list(module._parameters)


def has_hooks(module: nn.Module, besides: tuple[int, ...] = ()) -> bool:
    """Whether hooks other than the forward hooks of ids `besides` are registered on `module`
    itself; torch has no public query for it."""
    forward = set(module._forward_hooks) - set(besides)
    return bool(forward or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks)


def unviewed(t: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """`t` reshaped to `shape` without autograd recording a view (`aten._unsafe_view`, as
    `F.linear` folds its batch dims). An adapter's output must not be a view: autograd refuses an
    in-place op on a Function's view output (`nn.ReLU(inplace=True)`), and FSDP2's output hooks
    are lost on a view."""
    return torch.ops.aten._unsafe_view(t, shape)


@functools.cache
def onednn_linear() -> Callable | None:
    """oneDNN's linear `x wᵀ` (`torch.ops.mkldnn._linear_pointwise`, no public API), which on some
    CPUs runs the adapters' skinny rank-r products several times faster than MKL's sgemm; `None`
    where this torch build has none that works. Probed once, on fixed values (no random numbers
    drawn)."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x = torch.arange(12.0).view(4, 3)
        w = torch.arange(6.0).view(3, 2).T  # a strided view, as the backward passes use
        h = torch.arange(8.0).view(4, 2)
        if torch.equal(op(x, w, None, "none", [], ""), x @ w.T) and torch.equal(
            op.binary(x, h, w, None, "add"), x @ w.T + h
        ):
            return op
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return None


def in_dispatch_mode() -> bool:
    """Whether a `TorchDispatchMode` (FlopCounter, fake tensors, ...) is recording: oneDNN's op
    must not run under one (`torch.utils._python_dispatch` has the only query)."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    return is_in_torch_dispatch_mode()
