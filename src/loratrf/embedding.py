"""LoRAEmbedding: a frozen lookup table plus a trainable low-rank change of it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratrf.config import DEFAULT_ADAPTER, Init, LoRASpec, dtype_name
from loratrf.lora_layer import LoRAAdapter, LoRALayer, merged_output


class LoRAEmbedding(LoRALayer, nn.Embedding):
    """`y = E[x] + scale · U[x] V` with the table `E [num_embeddings, dim]` frozen.

    This is PEFT's `E[x] + scale · (A[:, x])ᵀ Bᵀ` with `U = Aᵀ [num_embeddings, r]` (PEFT's
    `lora_embedding_A`, `[r, num_embeddings]`) and `V = Bᵀ [r, dim]` (`lora_embedding_B`,
    `[dim, r]`). Shapes: integer ids `x [...]` -> `y [..., dim]`. The table is the linear map of
    one-hot rows, stored `[in, out]` (`fan_in_fan_out`), so an adapter changes it by the rank-`r`
    `scale · U V`, which `merge` folds in exactly as for a linear layer (`LoRALayer`). `V` starts at
    zero, so a fresh layer looks up exactly its base rows.

    As in PEFT, an embedding's adapter takes no dropout (its `dropout` is kept, for the config,
    and not applied), and the update's rows are looked up with the base's `padding_idx`,
    `scale_grad_by_freq` and `sparse`. With DoRA (`loratrf.dora`, as PEFT's DoRA on embeddings)
    `y = f ⊙ (E[x] + scale · U[x] V)` with `f = m / ‖E + scale · U V‖`, the norm per embedding
    dimension (over the tokens), `m [dim]`. It is an
    `nn.Embedding` (with that class's attributes) so that code which checks for one, such as
    transformers' `resize_token_embeddings`, takes it; a table resized after `inject` is
    refused at the next forward (`LoRALayer._check_base_shape`).
    """

    base_parameter_names = ("weight",)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int = LoRASpec.rank,
        alpha: float = LoRASpec.alpha,
        *,
        padding_idx: int | None = None,
        dropout: float = LoRASpec.dropout,
        init: Init = LoRASpec.init,
        rslora: bool = LoRASpec.rslora,
        adapter_dtype: torch.dtype | str | None = None,
        dora: bool = LoRASpec.dora,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, padding_idx, device=device, dtype=dtype)
        if isinstance(adapter_dtype, torch.dtype):
            adapter_dtype = dtype_name(adapter_dtype)
        spec = LoRASpec(rank, alpha, dropout, init, rslora, adapter_dtype, dora)  # validates every option
        self.in_features, self.out_features = num_embeddings, embedding_dim
        self.fan_in_fan_out = True  # the table is `[in, out]`
        self.weight.requires_grad_(False)
        self._init_adapters(spec)

    @classmethod
    def from_embedding(
        cls,
        base: nn.Embedding,
        rank: int = LoRASpec.rank,
        alpha: float = LoRASpec.alpha,
        *,
        adapter: str = DEFAULT_ADAPTER,
        **options,
    ) -> LoRAEmbedding:
        """Wrap an `nn.Embedding`, keeping its very weight Parameter (a tied output layer keeps
        sharing it); the adapter (named `adapter`) is created on the weight's device. `unload`
        puts `base` itself back."""
        num, dim = base.weight.shape
        options.update(padding_idx=base.padding_idx, device="meta", dtype=base.weight.dtype)
        layer = cls(num, dim, rank, alpha, **options)
        layer.weight = base.weight
        layer.weight.requires_grad_(False)
        layer.scale_grad_by_freq, layer.sparse = base.scale_grad_by_freq, base.sparse
        layer._adopt(base, adapter)
        return layer

    def base_forward(self, x: Tensor) -> Tensor:
        """The frozen lookup `E[x]`, as `nn.Embedding` computes it."""
        return self._lookup(x, self.weight)

    def _lookup(self, x: Tensor, table: Tensor) -> Tensor:
        return F.embedding(x, table, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)

    def forward(self, x: Tensor) -> Tensor:
        self._check_base_shape()
        if self.rows is not None:
            return self._forward_rows(x, self.rows)
        parts = self._active()
        out = self.base_forward(x)
        if parts is None:
            return out
        if self.merged:
            return merged_output(out, self.training, parts.lora.U)
        return self._adapted(x, out, parts)

    def _adapted(self, x: Tensor, out: Tensor, parts: LoRALayer | LoRAAdapter) -> Tensor:
        """`out + scale · U[x] V`, from `out = E[x]`: the update's rows `U[x] [..., r]`, then `V`
        (DoRA: times `f`, which is exactly 1 on a fresh adapter)."""
        lora = parts.lora
        out = out + (self._lookup(x, lora.U) @ lora.V * lora.scale).to(out.dtype)
        return out * self.dora_factor(parts=parts).to(out.dtype) if parts.dora else out

    def extra_repr(self) -> str:
        default = "" if self.lora is None else f", rank={self.lora.rank}, alpha={self.lora.alpha:g}"
        return f"{self.num_embeddings}, {self.embedding_dim}{default}, merged={self.merged}"
