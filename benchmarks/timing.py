"""Interleaved timing: every method runs once per round, so slow phases of a shared machine
hit all methods alike, and each method's time is compared with the baseline's in the same round."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from loratrf.experiments.runner import cpu_model  # noqa: F401 (the benchmarks' CPU line)


@dataclass(frozen=True)
class Timing:
    """One method's times (seconds) and its per-round ratios to the baseline's."""

    times: tuple[float, ...]
    ratios: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def ratio(self) -> float:
        """Median over rounds of (this method's time / the baseline's time in the same round)."""
        return statistics.median(self.ratios)

    @property
    def ratio_iqr(self) -> tuple[float, float]:
        return quartiles(self.ratios)

    @property
    def time_iqr(self) -> tuple[float, float]:
        return quartiles(self.times)


def quartiles(values) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(
    methods: dict[str, Callable[[], object]], baseline: str, rounds: int, warmup: int = 2, clock: str = "wall"
) -> dict[str, Timing]:
    """Time each method `rounds` times after `warmup` calls, in rounds whose order rotates.

    `clock="cpu"` counts this process's CPU time instead of wall time: with one thread on a
    busy machine it leaves out the time the process waits for a core. Garbage collection is off
    while timing. Returns a `Timing` per method, ratios against `baseline` (whose own ratios
    are all 1).
    """
    now = CLOCKS[clock]
    names = list(methods)
    for name in names:
        for _ in range(warmup):
            methods[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = now()
                methods[name]()
                times[name].append(now() - start)
    finally:
        gc.enable()
    base = times[baseline]
    return {name: Timing(tuple(ts), tuple(t / b for t, b in zip(ts, base))) for name, ts in times.items()}


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS
    (no `mmap` for large blocks, no trimming), as caching allocators such as jemalloc or
    tcmalloc do. Otherwise every fresh large tensor is page-faulted in anew, whenever glibc's
    trim heuristics happen to release it: on these VMs ~1.5-3 µs per 4 KiB page, 80% of an
    elementwise op on a 32 MiB tensor, and timings turn bimodal. Returns whether it applied
    (False off glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def layer_arguments(doc: str, rounds: int, shape: tuple[int, int, int]) -> argparse.ArgumentParser:
    """The options of a single-script benchmark: --rounds, --threads, --shape BATCH SEQ D, --rank."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(shape), metavar=("BATCH", "SEQ", "D"))
    parser.add_argument("--rank", type=int, default=8)
    return parser
