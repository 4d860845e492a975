"""A one-line progress bar for training: steps, running loss, speed and time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Redrawn in place (carriage return) on a terminal, at most every `interval` seconds;
    elsewhere (a log file, a test's captured output) one line per quarter of the steps."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, interval: float = 0.2, width: int = 24):
        self.label, self.total, self.width, self.interval = label, max(total, 1), width, interval
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.start = self.last_draw = time.perf_counter()
        self.steps = self.examples = 0
        self.loss: float | None = None
        self.quarter = 0

    def update(self, loss: float, examples: int) -> None:
        """One step of `examples` sentences done with this `loss` (smoothed for display)."""
        self.steps += 1
        self.examples += examples
        self.loss = loss if self.loss is None else 0.9 * self.loss + 0.1 * loss
        now = time.perf_counter()
        if self.live and now - self.last_draw >= self.interval:
            self.last_draw = now
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif not self.live and 4 * self.steps >= (self.quarter + 1) * self.total and self.steps < self.total:
            self.quarter = 4 * self.steps // self.total
            self.stream.write(self.line() + "\n")

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = min(self.steps / self.total, 1.0)
        bar = "#" * round(done * self.width)
        left = (self.total - self.steps) * elapsed / max(self.steps, 1)
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        return (
            f"{self.label} [{bar:<{self.width}}] {self.steps}/{self.total} loss {loss} "
            f"{self.steps / elapsed:.2f} it/s {self.examples / elapsed:.0f} sent/s "
            f"{elapsed:.0f}s elapsed, {left:.0f}s left"
        )

    def close(self) -> None:
        self.stream.write(("\r" if self.live else "") + self.line() + "\n")
        self.stream.flush()
