"""Record the size of every tensor an operation allocates (views and in-place results excluded)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numels.append(t.numel())
        return out


def count_allocations_of_at_least(numel: int, fn, *args) -> int:
    with AllocationLog() as log:
        fn(*args)
    return sum(n >= numel for n in log.numels)
