"""Effective weights for decoding: an unmerged LoRA layer's `W0 + scale · B A`, and a filter's
`[U | t]ᵀ` and `|t|`, formed once per parameter version and reused across calls
(`cache_effective_weights`).

Without gradients to compute, an unmerged layer costs its base product plus two rank-`r` products
and the Python that dispatches them, on every call. At batch 1 of a decoder that per-call work,
not arithmetic, sets the speed (210 LoRA layers per token on a 30-layer LLaMA). With the effective
weight in hand the layer runs one product, the very one `nn.Linear` runs on `W0`. A filter saves
the concatenation and the norm that its one product over `[U | t]` needs.

They are never stale: each is formed again whenever a tensor it is made of changed
(`loratrf.versioned.Derived`, which says what counts as a change).

**The price** is memory: one extra weight per adapted layer (for LoRA on all seven projections of
SmolLM2-135M, about 424 MB in float32, as much as the layers' weights), held until the block ends.
So it is a choice the caller makes, for the span of a generation, not a default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from loratrf.filter import TaskAwareFilter
from loratrf.lora import LoRALinear
from loratrf.versioned import Derived


@contextlib.contextmanager
def cache_effective_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, every unmerged `LoRALinear` of `model` that computes no gradient runs
    `x W_effᵀ + b` with `W_eff = W0 + scale · B A` of its active adapter, formed once per version
    of `W0`, `A` and `B` and reused; equal to the layer's own fused forward (the same kernels),
    so the plain formula's up to rounding. Layers that record gradients, run dropout, hold a
    quantized or low-precision base, or compute one adapter per row (`use_adapters`) run as
    before. Every `TaskAwareFilter` with the paper's gate takes its `[U | t]ᵀ` and `|t|` from
    such a cache too (the same values it would form). The extra weights are freed when the
    block ends.

        with torch.no_grad(), loratrf.cache_effective_weights(model):
            model.generate(...)
    """
    layers = [m for m in model.modules() if isinstance(m, (LoRALinear, TaskAwareFilter))]
    before = [layer.weight_cache for layer in layers]
    for layer, cache in zip(layers, before):
        layer.weight_cache = cache or Derived()
    try:
        yield
    finally:
        for layer, cache in zip(layers, before):
            layer.weight_cache = cache
