"""DoRA's weight decomposition (Liu et al. 2024), defined once for every LoRA layer kind.

With adapter parts holding a `magnitude` `m [out_features]`, the layer computes with
`W = m ⊙ (W0 + scale · B A) / ‖W0 + scale · B A‖`, the norm taken per output feature (over the
input axis) and treated as a constant in backward (DoRA's section 4.3). `f = m / ‖W0 + scale · B A‖`
is the factor each output feature is scaled by; `m` starts at the norms of `W0`, so a fresh
adapter (`B = 0`, `f = 1` exactly) computes the base map. `m` is kept in at least float32 and in
the precision its norm is computed in (`merge_dtype` of the weight).
"""

from __future__ import annotations

import torch
from torch import Tensor

from loratrf import quantized
from loratrf.config import merge_dtype
from loratrf.errors import MergeError


class DoRAWeights:
    """DoRA's terms for a `LoRALayer` (`weight`, `fan_in_fan_out`, `parts`, `delta_weight`);
    `parts` below is one adapter's (`LoRALayer.parts(name)`), None: the active adapter's."""

    @torch.no_grad()
    def reset_magnitude(self, parts=None) -> None:
        """`m <- ‖W0 + scale · B A‖` per output feature: with a fresh adapter (`B = 0`), the norms
        of `W0`, and then the layer computes exactly its base map."""
        parts = self._active() if parts is None else parts
        if not parts.magnitude.is_meta:  # a meta tensor holds no values to set
            parts.magnitude.copy_(self.dora_weight_norm(parts))

    @torch.no_grad()
    def dora_weight_norm(self, parts=None) -> Tensor:
        """`‖W0 + scale · B A‖` per output feature, `[out_features]`, in `merge_dtype` of the
        weight (at least float32). Computed without a graph: DoRA treats it as a constant."""
        weight = quantized.float_weight(self)  # `deq(W_q)` for a quantized base
        dtype = merge_dtype(weight.dtype)
        w = weight if self.fan_in_fan_out else weight.T  # [in, out]
        parts = self._active() if parts is None else parts
        return torch.linalg.vector_norm(w.to(dtype) + parts.lora.delta_weight(dtype), dim=0)

    def dora_factor(self, norm: Tensor | None = None, parts=None) -> Tensor:
        """`f = m / ‖W0 + scale · B A‖`, `[out_features]`: differentiable in `m`, the norm a
        constant (`norm`, when the caller has it). A feature whose norm is 0 (a zero row of `W0`
        with a fresh adapter) gets `m / tiny` (0 while `m` is its norm, 0), never NaN."""
        parts = self._active() if parts is None else parts
        norm = self.dora_weight_norm(parts) if norm is None else norm
        return parts.magnitude.to(norm.dtype) / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def _dora_merged_weight(self, factor: Tensor, sign: int) -> Tensor:
        """`f ⊙ (W0 + scale · B A)` (`sign=+1`, from `W0`) or `W / f - scale · B A` (`sign=-1`,
        from a merged `W`), in `factor`'s dtype, in the layout of `weight`. Features with `f = 0`
        (zero rows, see `_dora_merge_factor`) come back as `-scale · B A`, the `W0` they had."""
        dtype = factor.dtype
        f = factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)
        delta = self.delta_weight(dtype)
        if sign > 0:
            return f * (self.weight.to(dtype) + delta)
        return self.weight.to(dtype) / torch.where(f == 0, torch.ones_like(f), f) - delta

    @torch.no_grad()
    def _dora_merge_factor(self) -> Tensor:
        """The `f` that `merge` folds in; refuses when `unmerge` could not divide it out again."""
        norm = self.dora_weight_norm()
        factor = self.dora_factor(norm)
        lost = (factor == 0) & (norm != 0)
        if self.weight.device.type != "meta" and bool(lost.any()):
            rows = lost.nonzero().flatten().tolist()
            raise MergeError(
                f"cannot merge a DoRA layer whose magnitude is 0 on a non-zero row (output features "
                f"{rows[:5]}{'...' if len(rows) > 5 else ''}): the merged weight would hold zeros there and "
                "unmerge could not restore W0; the weight was left unchanged"
            )
        return factor
