"""The low-rank map `x -> scale · (x U) V` shared by LoRA and the task-aware filter."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from loratrf import kernels
from loratrf.config import Init, LoRASpec, check_low_rank


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """`alpha / rank` (LoRA), or `alpha / sqrt(rank)` (rsLoRA)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LowRankTransform(nn.Module):
    """`x -> residual + scale · ((x U) ⊙ gate) V`, the paper's `T ≈ U V`.

    Shapes: `x [..., d_in]`, `U [d_in, r]`, `V [r, d_out]`, `gate [..., 1]` (optional),
    `residual [..., d_out]` (optional). `V` starts at zero, so at init the map is zero and
    `residual` passes through exactly. The gate multiplies the rank-`r` projection, never an
    input-sized tensor: `(g ⊙ x) U = g ⊙ (x U)`.

    `U` starts like a Linear's weight with fan-in `d_in` (`init="kaiming"`: uniform on
    `±1/sqrt(d_in)`) or Gaussian with std `1/r` (`init="gaussian"`).
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        rank: int = LoRASpec.rank,
        alpha: float = LoRASpec.alpha,
        *,
        init: Init = LoRASpec.init,
        rslora: bool = LoRASpec.rslora,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_low_rank(rank, alpha, init)
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.alpha, self.init, self.rslora = float(alpha), init, rslora
        self.scale = lora_scale(rank, alpha, rslora)
        self.U = nn.Parameter(torch.empty(d_in, rank, device=device, dtype=dtype))
        self.V = nn.Parameter(torch.empty(rank, d_out, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "kaiming":
            bound = 1.0 / math.sqrt(self.d_in)
            self.U.uniform_(-bound, bound)
        else:
            self.U.normal_(0.0, 1.0 / self.rank)
        self.V.zero_()

    def forward(
        self,
        x: Tensor,
        *,
        gate: Tensor | None = None,
        residual: Tensor | None = None,
        inplace: bool = False,
    ) -> Tensor:
        """With `inplace=True`, `residual` (contiguous, owned by the caller) is overwritten."""
        return kernels.low_rank(x, self.U, self.V, self.scale, gate=gate, residual=residual, inplace=inplace)

    def delta_weight(self, dtype: torch.dtype) -> Tensor:
        """`scale · U V` of shape `[d_in, d_out]`, computed in `dtype`."""
        return (self.U.to(dtype) * self.scale) @ self.V.to(dtype)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, alpha={self.alpha:g}"
