"""Effective weights for decoding: an unmerged LoRA layer's `W0 + scale · B A`, formed once per
parameter version and reused across calls (`cache_effective_weights`).

Without gradients to compute, an unmerged layer costs its base product plus two rank-`r` products
and the Python that dispatches them, on every call. At batch 1 of a decoder that per-call work,
not arithmetic, sets the speed (210 LoRA layers per token on a 30-layer LLaMA). With the effective
weight in hand the layer runs one product, the very one `nn.Linear` runs on `W0`.

**Never stale.** The weight is formed again whenever a tensor it is made of changed: the key is
each tensor's identity (the cache holds the tensors, so no identity is reused), its `_version`
(bumped by every in-place write: an optimizer step, `load_adapter`, `merge`/`unmerge`, `copy_`
under `no_grad`) and its data pointer (a `.to()` that swaps the storage), and the scale.
Another adapter (`set_adapter`) has other tensors. The one write torch does not count is through
`.data` (`p.data.copy_(...)` bypasses the version counter); write `with torch.no_grad(): p.copy_(...)`.

**The price** is memory: one extra weight per adapted layer (for LoRA on all seven projections of
SmolLM2-135M, about 424 MB in float32, as much as the layers' weights), held until the block ends.
So it is a choice the caller makes, for the span of a generation, not a default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from loratrf import kernels
from loratrf.lora import LoRALinear


class EffectiveWeight:
    """One layer's `W0 + scale · (U V)ᵀ` (in the weight's layout; `kernels.effective_weight`), and
    the key of the tensors it was formed from."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self._held: tuple[Tensor, ...] = ()  # the key's tensors, so that their ids stay theirs
        self._weight: Tensor | None = None

    def get(self, weight: Tensor, U: Tensor, V: Tensor, scale: float, fan_in_fan_out: bool) -> Tensor:
        key = (scale, fan_in_fan_out, *(k for t in (weight, U, V) for k in (id(t), t._version, t.data_ptr())))
        if key != self._key or self._weight is None:
            self._weight = None  # freed before the new one is formed
            self._weight = kernels.effective_weight(weight, U, V, U.T.contiguous(), scale, fan_in_fan_out)
            self._key, self._held = key, (weight, U, V)
        return self._weight


@contextlib.contextmanager
def cache_effective_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, every unmerged `LoRALinear` of `model` that computes no gradient runs
    `x W_effᵀ + b` with `W_eff = W0 + scale · B A` of its active adapter, formed once per version
    of `W0`, `A` and `B` and reused; equal to the layer's own fused forward (the same kernels),
    so the plain formula's up to rounding. Layers that record gradients, run dropout, hold a
    quantized or low-precision base, or compute one adapter per row (`use_adapters`) run as
    before. The extra weights are freed when the block ends.

        with torch.no_grad(), loratrf.cache_effective_weights(model):
            model.generate(...)
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [layer.weight_cache for layer in layers]
    for layer, cache in zip(layers, before):
        layer.weight_cache = cache or EffectiveWeight()
    try:
        yield
    finally:
        for layer, cache in zip(layers, before):
            layer.weight_cache = cache
