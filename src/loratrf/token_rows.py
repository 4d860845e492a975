"""Trainable token rows (`inject(trainable_tokens=...)`, PEFT's `trainable_token_indices`): chosen
rows of an embedding table trained in place, read by the embedding and by every linear head
that shares its weight (a decoder's tied `lm_head`); the rest of the table stays frozen."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from loratrf.config import DEFAULT_ADAPTER, default_adapter_dtype
from loratrf.errors import InjectionError
from loratrf.lora_layer import merged_output
from loratrf.rows import AdapterRows

TOKEN_ROWS = "token_rows"  # on an embedding: an nn.ModuleDict, adapter name -> TokenRows
DISPATCH = "token_rows_dispatch"  # on the embedding and on each head sharing its weight


class TokenRows(nn.Module):
    """One adapter's rows `R [n, dim]` for the token ids `ids [n]` of an embedding table
    `E [V, dim]`: the table reads as `E'` with `E'[ids] = R` and `E'[i] = E[i]` elsewhere, so the
    embedding looks up `y = E'[x]` and a head sharing `E` computes `h E'ᵀ (+ b)`. `R` starts as
    `E[ids]` (in float32 beside a half-precision table), so a fresh adapter changes nothing.
    `merge()` writes `R` into `E[ids]` and keeps the rows it replaced (`base_rows`) for `unmerge()`."""

    def __init__(self, ids: Sequence[int], table: Tensor) -> None:
        super().__init__()
        num_embeddings, device = table.shape[0], table.device
        self.register_buffer("ids", torch.tensor(list(ids), dtype=torch.long, device=device), persistent=False)
        position = torch.full((num_embeddings,), -1, dtype=torch.long, device=device)  # token id -> row of R, or -1
        position.index_copy_(0, self.ids, torch.arange(len(ids), device=device))
        self.register_buffer("position", position, persistent=False)
        self.rows = nn.Parameter(table.detach()[self.ids].to(default_adapter_dtype(table.dtype)))
        self.register_buffer("base_rows", None, persistent=False)  # E[ids] as it was, while merged
        self.num_embeddings = num_embeddings

    @property
    def merged(self) -> bool:
        return self.base_rows is not None

    def lookup(self, x: Tensor, out: Tensor) -> Tensor:
        """`E'[x]` from `out = E[x] [..., dim]`: the rows of `x`'s trained ids replaced by theirs."""
        p = self.position[x]  # [...], -1 for an untrained id
        return torch.where((p >= 0).unsqueeze(-1), self.rows[p.clamp(min=0)].to(out.dtype), out)

    def logits(self, head: nn.Linear, h: Tensor, out: Tensor) -> Tensor:
        """`h E'ᵀ + b` from `out = h Eᵀ + b [..., V]`: the trained ids' columns get `h (R - E[ids])ᵀ`
        added (exactly 0 on a fresh adapter), in place: no second `[..., V]` tensor of logits
        (the head's backward does not read its output)."""
        delta = (self.rows - head.weight[self.ids].to(self.rows.dtype)).to(h.dtype)  # [n, dim]
        return out.index_add_(-1, self.ids, (h @ delta.T).to(out.dtype))  # [..., n] into [..., V]

    @torch.no_grad()
    def merge(self, table: Tensor) -> None:
        """`E[ids] <- R` (rounded to the table's dtype), keeping the replaced rows; a merged
        adapter is left as it is. `loratrf.merge` checks first."""
        if self.merged:
            return
        self.base_rows = table[self.ids].clone()
        table.index_copy_(0, self.ids, self.rows.to(table.dtype))

    @torch.no_grad()
    def unmerge(self, table: Tensor) -> None:
        """`E[ids] <- the rows merge replaced`; an unmerged adapter is left as it is."""
        if self.merged:
            table.index_copy_(0, self.ids, self.base_rows)
            self.base_rows = None

    @torch.no_grad()
    def reset_parameters(self, table: Tensor) -> None:
        """`R <- E[ids]` (unmerged first): the adapter changes nothing again."""
        self.unmerge(table)
        self.rows.copy_(table[self.ids])

    def extra_repr(self) -> str:
        return f"ids={self.ids.tolist()}, dim={self.rows.shape[1]}"


class TokenRowsDispatch:
    """Which adapter's rows the embedding `table` and the heads sharing its weight read: adapter
    `active`'s (None, or one without rows here: the base) or, while `rows` is set
    (`loratrf.use_adapters`), each batch row its own adapter's. One object, held by each of those
    modules as `token_rows_dispatch`, whose forward hooks (`handles`) run before any other."""

    def __init__(self, table: nn.Embedding, heads: Sequence[nn.Module]) -> None:
        self.table, self.heads = table, list(heads)
        self.active: str | None = DEFAULT_ADAPTER
        self.rows: AdapterRows | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, host: nn.Module) -> None:
        object.__setattr__(host, DISPATCH, self)  # a plain attribute: no child module, no state-dict key
        self.handles.append(host.register_forward_hook(_apply_token_rows, prepend=True))

    def detach(self) -> None:
        """Remove the hooks from every module reading the rows (after the table's last adapter went)."""
        for handle in self.handles:
            handle.remove()
        for module in self.hosts():
            object.__delattr__(module, DISPATCH)
        self.handles = []

    def hosts(self) -> list[nn.Module]:
        """The table and the heads sharing its weight."""
        return [self.table, *self.heads]

    def apply(self, host: nn.Module, x: Tensor, out: Tensor) -> Tensor:
        if self.rows is None:
            rows = token_rows_of(self.table, self.active)
            return out if rows is None else self._read(host, x, out, rows)
        groups = [(i, r) for name, i in self.rows.indices(x) if (r := token_rows_of(self.table, name)) is not None]
        out = out.clone() if groups else out
        for index, rows in groups:
            out.index_copy_(0, index, self._read(host, x.index_select(0, index), out.index_select(0, index), rows))
        return out

    def _read(self, host: nn.Module, x: Tensor, out: Tensor, rows: TokenRows) -> Tensor:
        if host.weight.shape[0] != rows.num_embeddings:
            raise InjectionError(
                f"this {type(host).__name__}'s weight now has {host.weight.shape[0]} token rows, but its trainable "
                f"token rows were made for a table of {rows.num_embeddings}: the embeddings were resized after "
                "inject (resize_token_embeddings, say). Resize before loratrf.inject, or loratrf.unload(model), "
                "resize, then inject again"
            )
        if rows.merged:  # the weight holds R already
            return merged_output(out, host.training, rows.rows)
        return rows.lookup(x, out) if isinstance(host, nn.Embedding) else rows.logits(host, x, out)


def _apply_token_rows(host: nn.Module, args: tuple, out: Tensor) -> Tensor:
    """Forward hook of a module that reads trainable token rows (`TokenRowsDispatch`)."""
    return getattr(host, DISPATCH).apply(host, args[0], out)


def token_rows_of(table: nn.Module, name: str | None) -> TokenRows | None:
    """Adapter `name`'s rows on the embedding `table`, or None."""
    held = getattr(table, TOKEN_ROWS, None)
    return held[name] if isinstance(held, nn.ModuleDict) and name in held else None


def token_row_names(table: nn.Module) -> list[str]:
    """The adapters with trainable rows on `table`."""
    held = getattr(table, TOKEN_ROWS, None)
    return list(held) if isinstance(held, nn.ModuleDict) else []


def table_dispatch(module: nn.Module) -> TokenRowsDispatch | None:
    """The dispatch of the rows `module` holds (None on a head that only reads them, and elsewhere)."""
    dispatch = getattr(module, DISPATCH, None)
    return dispatch if dispatch is not None and dispatch.table is module else None


def reads_token_rows(module: nn.Module) -> bool:
    """Whether `module` is an embedding with trainable rows or a head that reads them."""
    return getattr(module, DISPATCH, None) is not None


def add_token_rows(table: nn.Embedding, heads: Sequence[nn.Module], name: str, ids: Sequence[int]) -> None:
    """Give adapter `name` trainable rows `ids` of `table`, read by `table` and by `heads` (the
    modules sharing its weight); the first adapter's rows add the hooks."""
    if table_dispatch(table) is None:
        dispatch = TokenRowsDispatch(table, heads)
        for host in dispatch.hosts():
            dispatch.attach(host)
        table.add_module(TOKEN_ROWS, nn.ModuleDict())
    getattr(table, TOKEN_ROWS)[name] = TokenRows(ids, table.weight)


def remove_token_rows(table: nn.Module, name: str) -> None:
    """Remove adapter `name`'s rows from `table` (a weight they are merged into keeps them); with
    the last, the hooks go too."""
    held = getattr(table, TOKEN_ROWS)
    del held[name]
    if not len(held):
        table_dispatch(table).detach()
        delattr(table, TOKEN_ROWS)


def merge_problem(name: str, table: nn.Module, owners: Sequence[tuple[str, nn.Module]]) -> str | None:
    """Why the rows on `table` cannot be written into its weight: a module among the weight's
    `owners` (`walk.parameter_owners`) that does not read the rows would change too."""
    readers = {id(m) for m in table_dispatch(table).hosts()}
    if others := [n for n, m in owners if id(m) not in readers]:
        return (
            f"cannot merge the trainable token rows of {name!r}: its weight is tied to {', '.join(map(repr, others))}, "
            "which was tied after inject and does not read the rows, so writing them in would change it too; the "
            "weights were left unchanged. Tie the weights before loratrf.inject, or keep the rows unmerged"
        )
    return None


def merged_token_tables(root: nn.Module) -> list[str]:
    """The names of the embeddings in `root` whose weight holds merged token rows."""
    return [n for n, m in root.named_modules() if any(token_rows_of(m, a).merged for a in token_row_names(m))]
