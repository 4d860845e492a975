"""Results: one JSON file per run, and the statistics that compare methods on them.

A run is one method trained on one task from one seed at one learning rate under one
`TrainingConfig`; those five define it (its *identity*), and its file is named after them
and their hash: `<task>--<method>--lr<lr>--s<seed>--<hash>.json`. A file is written once,
whole (a temporary file, then `os.replace`), so a folder holds only finished runs, and two
processes that train the same run replace one valid file with another.

Learning rates: a method without a fixed rate runs every seed at the rate its sweep chose,
the rate with the best dev accuracy at seed `SWEEP_SEED` on the task's training source. A
sweep is `LR_SWEEP`'s rates and, while its best is its lowest or highest rate, the next rate
past that edge, at most `GROWTH` more. Comparisons are paired: the same seeds, the same test
sentences.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from loratrf.experiments.data import TASKS
from loratrf.experiments.methods import LR_SWEEP, Method
from loratrf.experiments.training import TrainingConfig

SWEEP_SEED = 0
GROWTH = 2  # rates a sweep may grow by past the edge its best rate sits on
LEVEL = 0.95  # of every confidence interval


# --- run files ----------------------------------------------------------------------------------


def identity(method: Method, lr: float, task: str, seed: int, config: TrainingConfig) -> dict:
    """What defines a run: `method` is its spec without a rate, `lr` the rate it trains at."""
    spec = str(dataclasses.replace(method, lr=None))
    return {"method": spec, "lr": lr, "task": task, "seed": seed, "training": dataclasses.asdict(config)}


def run_path(folder: Path, ident: Mapping) -> Path:
    """`folder/<task>--<method>--lr<lr>--s<seed>--<12 hex digits of the identity's sha256>.json`."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9=]+", "-", ident["method"])
    return Path(folder) / f"{ident['task']}--{slug}--lr{ident['lr']!r}--s{ident['seed']}--{digest}.json"


def write_run(path: Path, record: Mapping) -> None:
    """Write atomically: a reader (or a killed writer) never sees a partial file. The temporary
    file is this process's own, so concurrent writers of one run do not collide."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(record, indent=1))
    os.replace(temporary, path)


def read_runs(folder: Path, config: TrainingConfig) -> list[dict]:
    """The records in `folder` made with `config` (files of other settings are left alone)."""
    training = dataclasses.asdict(config)
    records = (json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json")))
    return [r for r in records if r["training"] == training]


def pack_bits(flags: Sequence[bool]) -> str:
    """Per-sentence correctness as base64 of bytes, 8 sentences a byte, the first in the high bit."""
    bits = "".join("1" if f else "0" for f in flags)
    bits += "0" * (-len(bits) % 8)
    return base64.b64encode(bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))).decode()


def unpack_bits(text: str, n: int) -> list[bool]:
    """`pack_bits`' inverse for `n` sentences."""
    bits = "".join(f"{byte:08b}" for byte in base64.b64decode(text))
    if not n <= len(bits) < n + 8:
        raise ValueError(f"{len(bits)} packed bits cannot hold exactly {n} sentences")
    return [b == "1" for b in bits[:n]]


# --- statistics -----------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""
    n = len(values)
    if n == 0:
        return float("nan"), None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function `I_x(a, b)`, by its continued fraction
    (modified Lentz), on the side of `x` where it converges fast."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            term = 1.0
        elif i % 2 == 0:
            term = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            term = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + term * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + term / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def t_two_sided_p(t: float, df: int) -> float:
    """`P(|T| >= |t|)` for Student's t with `df` degrees of freedom: `I_{df/(df+t²)}(df/2, 1/2)`."""
    return _incomplete_beta(df / 2, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The `q` quantile of Student's t (`q` in (0.5, 1)), by bisection on `t_two_sided_p`."""
    if not 0.5 < q < 1.0 or df < 1:
        raise ValueError(f"need 0.5 < q < 1 and df >= 1, got q={q}, df={df}")
    target = 2 * (1 - q)
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > target:
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if t_two_sided_p(middle, df) > target else (low, middle)
    return (low + high) / 2


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for `b` and `c` discordant pairs: under the null each
    discordant pair goes either way with probability 1/2, `p = min(1, 2 P(Bin(b + c, 1/2) <= min(b, c)))`."""
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n)


@dataclasses.dataclass(frozen=True)
class Interval:
    """The mean of per-seed `values` and its `LEVEL` confidence interval, `mean ± t s / sqrt(n)`
    with `n - 1` degrees of freedom (no interval for fewer than two values)."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return mean_std(self.values)[0]

    @property
    def half_width(self) -> float | None:
        _, std = mean_std(self.values)
        n = len(self.values)
        return None if std is None else t_quantile(0.5 + LEVEL / 2, n - 1) * std / math.sqrt(n)

    @property
    def bounds(self) -> tuple[float, float] | None:
        h = self.half_width
        return None if h is None else (self.mean - h, self.mean + h)

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes zero."""
        b = self.bounds
        return b is not None and (b[0] > 0 or b[1] < 0)


@dataclasses.dataclass(frozen=True)
class Paired:
    """`first` minus `second` on one task's test source: per-seed differences in accuracy on
    the same sentences (`interval`), and McNemar's exact test on the pooled predictions:
    `discordant = (b, c)`, sentence-seed pairs that only `first` / only `second` got right."""

    first: str
    second: str
    task: str
    source: str
    seeds: tuple[int, ...]
    interval: Interval
    discordant: tuple[int, int]

    @property
    def p_value(self) -> float:
        return mcnemar(*self.discordant)


def paired(first: Mapping[int, Mapping], second: Mapping[int, Mapping], source: str) -> Paired | None:
    """Compare two methods' runs `{seed: record}` on `source` over their common seeds (None
    when they share none)."""
    seeds = tuple(sorted(set(first) & set(second)))
    if not seeds:
        return None
    differences, b, c = [], 0, 0
    for seed in seeds:
        x, y = (correctness(runs[seed], source) for runs in (first, second))
        if len(x) != len(y):
            raise ValueError(f"seed {seed}: {len(x)} and {len(y)} test sentences; runs differ in their data")
        differences.append((sum(x) - sum(y)) / len(x))
        b += sum(p and not q for p, q in zip(x, y))
        c += sum(q and not p for p, q in zip(x, y))
    a, z = first[seeds[0]], second[seeds[0]]
    return Paired(a["method"], z["method"], a["task"], source, seeds, Interval(tuple(differences)), (b, c))


def correctness(record: Mapping, source: str) -> list[bool]:
    """A run's right (True) or wrong answer on each test sentence of `source`."""
    return unpack_bits(record["test_correct"][source], record["test_size"][source])


def contrast(a: Paired, b: Paired) -> Interval:
    """The difference of two paired differences, seed by seed over their common seeds
    (e.g. LoRATRF's advantage at r=4 minus its advantage at r=16)."""
    da, db = dict(zip(a.seeds, a.interval.values)), dict(zip(b.seeds, b.interval.values))
    return Interval(tuple(da[s] - db[s] for s in sorted(set(da) & set(db))))


# --- the runs of a folder, by method, task, seed and rate ------------------------------------------


def sweep_task(task: str) -> str:
    """The task whose dev set tunes `task`'s rates: the one of its training source."""
    return TASKS[task].train


def choose(dev: Mapping[float, float]) -> float:
    """The rate with the best dev accuracy; ties go to the lower rate."""
    return max(sorted(dev), key=lambda lr: dev[lr])


def past(lr: float, up: bool) -> float:
    """The next rate above `lr` (`up`) or below it on the grid 1, 3, 10, 30, ... times a power of ten."""
    exponent = math.floor(math.log10(lr))
    grid = [float(f"{m}e{e}") for e in range(exponent - 1, exponent + 2) for m in (1, 3)]
    return min(g for g in grid if g > lr * (1 + 1e-9)) if up else max(g for g in grid if g < lr * (1 - 1e-9))


class Runs:
    """The records of one training config, indexed by `(method, task, seed, lr)`.

    `tune`: a method without a fixed rate runs at the rate its sweep chose (`rate`); without
    `tune`, at its default rate (the demo's untuned runs)."""

    def __init__(self, records: Iterable[Mapping], *, tune: bool = True) -> None:
        self.tune = tune
        self.records = {(r["method"], r["task"], r["seed"], r["lr"]): r for r in records}

    def get(self, method: Method, task: str, seed: int, lr: float) -> Mapping | None:
        return self.records.get((str(dataclasses.replace(method, lr=None)), task, seed, lr))

    def sweep(self, method: Method, task: str) -> dict[float, Mapping | None]:
        """`{rate: run or None}`, by rate: the sweep that sets `method`'s rate on `task`,
        `LR_SWEEP`'s rates grown, once they are all finished and while the best is the lowest
        or the highest, by the next rate past that edge (`past`), at most `GROWTH` times."""
        if not method.tunable:
            return {}
        tuned, source = method.tuned_as, sweep_task(task)
        found = {lr: self.get(tuned, source, SWEEP_SEED, lr) for lr in LR_SWEEP[method.kind]}
        for _ in range(GROWTH):
            if any(run is None for run in found.values()):
                break
            best = choose({lr: run["dev"] for lr, run in found.items()})
            if best not in (min(found), max(found)):
                break
            lr = past(best, up=best == max(found))
            found[lr] = self.get(tuned, source, SWEEP_SEED, lr)
        return dict(sorted(found.items()))

    def beyond_sweep(self, method: Method, task: str) -> dict[float, Mapping]:
        """`{rate: run}`: finished runs at the sweep's seed and task at rates outside the sweep;
        they show in the report but never set the rate."""
        tuned, rates = str(method.tuned_as), self.sweep(method, task)
        found = {
            lr: r
            for (m, t, s, lr), r in self.records.items()
            if (m, t, s) == (tuned, sweep_task(task), SWEEP_SEED) and lr not in rates
        }
        return dict(sorted(found.items()))

    def rate(self, method: Method, task: str) -> float | None:
        """The rate `method` runs at on `task`: fixed, default (untuned), or chosen by its
        finished sweep (None until then)."""
        if method.lr is not None or not self.tune or not method.tunable:
            return method.learning_rate
        sweep = self.sweep(method, task)
        if any(run is None for run in sweep.values()):
            return None
        return choose({lr: run["dev"] for lr, run in sweep.items()})

    def at_rate(self, method: Method, task: str) -> dict[int, Mapping]:
        """`{seed: run}` of `method` on `task` at its rate."""
        lr = self.rate(method, task)
        spec = str(dataclasses.replace(method, lr=None))
        return {s: r for (m, t, s, rate), r in self.records.items() if (m, t, rate) == (spec, task, lr)}

    def compare(self, first: str, second: str, task: str, source: str) -> Paired | None:
        return paired(self.at_rate(Method.parse(first), task), self.at_rate(Method.parse(second), task), source)
