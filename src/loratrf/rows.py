"""One adapter per row of a batch (`loratrf.use_adapters`): which rows each adapter computes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from loratrf.errors import AdapterError


class AdapterRows:
    """`names[i]` is the adapter (None: the base alone) of row `i` of the batch, the inputs'
    first dimension. Each adapter's rows are gathered with `index_select`, computed, and written
    back with `index_copy_`; the index tensors are built once per device and shared by every
    module (`at` gives a module its own copy of this object, naming it in errors)."""

    def __init__(self, names: Sequence[str | None], where: str = "", _index: dict | None = None) -> None:
        self.names = tuple(names)
        self.where = where
        self.groups = {n: [i for i, m in enumerate(self.names) if m == n] for n in dict.fromkeys(self.names) if n}
        self._index: dict[tuple[str, torch.device], Tensor] = {} if _index is None else _index

    def at(self, where: str) -> AdapterRows:
        return AdapterRows(self.names, where, self._index)

    def indices(self, x: Tensor) -> Iterator[tuple[str, Tensor]]:
        """`(adapter name, its row numbers [n] on x's device)`, after checking that `x [B, ...]`
        has one row per name."""
        if x.dim() == 0 or x.shape[0] != len(self.names):
            got = "a scalar" if x.dim() == 0 else f"{x.shape[0]} rows (shape {tuple(x.shape)})"
            raise AdapterError(
                f"use_adapters was given {len(self.names)} adapter names, one per row of the batch, but "
                f"{self.where or 'a module'} got {got}: give one name per row of the inputs' first "
                "dimension (batch-first inputs)"
            )
        for name, rows in self.groups.items():
            key = (name, x.device)
            if key not in self._index:
                self._index[key] = torch.tensor(rows, device=x.device)
            yield name, self._index[key]
