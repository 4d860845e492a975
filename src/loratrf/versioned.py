"""`Derived`: a value formed from some tensors, reused until one of those tensors changes.

An unmerged LoRA layer's effective weight (`loratrf.cache_effective_weights`) and a filter's
packed `[U | t]ᵀ` and `|t|` are such values: cheap to keep, and costly to form again on every
call of a decoding step.

**Never stale.** The value is formed again whenever a tensor it is made of changed: the key is
each tensor's identity (the cache holds the tensors, so no identity is reused), its `_version`
(bumped by every in-place write: an optimizer step, `load_adapter`, `merge`/`unmerge`, `copy_`
under `no_grad`) and its data pointer (a `.to()` that swaps the storage), plus the caller's own
`key` (a scale, a layout flag). Another adapter (`set_adapter`) has other tensors. The one write
torch does not count is through `.data` (`p.data.copy_(...)` bypasses the version counter);
write `with torch.no_grad(): p.copy_(...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from torch import Tensor

T = TypeVar("T")


class Derived(Generic[T]):
    """`get(form, *tensors)` returns `form()`, a value made of `tensors`: formed on the first
    call, and again only when one of `tensors` (or `key`) is not what it was."""

    def __init__(self) -> None:
        self._key: tuple = ()
        self._held: tuple[Tensor, ...] = ()  # the key's tensors, so that their ids stay theirs
        self.value: T | None = None

    def get(self, form: Callable[[], T], *tensors: Tensor, key: tuple = ()) -> T:
        found = (*key, *(part for t in tensors for part in (id(t), t._version, t.data_ptr())))
        if found != self._key or self.value is None:
            self.value = None  # freed before the new one is formed
            self.value = form()
            self._key, self._held = found, tensors
        return self.value
