"""Strict loading of base checkpoints into an injected model.

A base checkpoint holds no adapter tensors. Each adapter module registers
`keep_absent_adapter_tensors` as a load-state-dict pre-hook, so
`model.load_state_dict(base_state_dict, strict=True)` loads the base and leaves every
adapter as it is, while a state dict holding only part of an adapter still fails.
"""

from __future__ import annotations

from torch import nn


def keep_absent_adapter_tensors(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Pre-hook: when `state_dict` holds none of `module`'s adapter tensors, keep them as they are.

    `module.base_parameter_names` lists the parameters that belong to the base model.
    """
    own = {prefix + name: p for name, p in module.named_parameters() if name not in module.base_parameter_names}
    if not any(key in state_dict for key in own):
        state_dict.update(own)
