"""Interleaved timing: every method runs once per round, so slow phases of a shared machine
hit all methods alike, and each method's time is compared with the baseline's in the same round."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


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


def interleaved(methods: dict[str, Callable[[], object]], baseline: str, rounds: int, warmup: int = 2) -> dict[str, Timing]:
    """Time each method `rounds` times after `warmup` calls, in rounds whose order rotates.

    Garbage collection is off while timing. Returns a `Timing` per method, ratios against
    `baseline` (whose own ratios are all 1).
    """
    names = list(methods)
    for name in names:
        for _ in range(warmup):
            methods[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                methods[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    base = times[baseline]
    return {
        name: Timing(tuple(ts), tuple(t / b for t, b in zip(ts, base)))
        for name, ts in times.items()
    }
