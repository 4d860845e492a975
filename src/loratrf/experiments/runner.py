"""The runner: trains and evaluates runs, and takes studies through their learning-rate sweeps
and seeds, one run file each (results.py).

A study runs in two phases: the sweep (every `LR_SWEEP` rate of each method without a fixed
rate, at seed `SWEEP_SEED`, on each task's training source, grown past its edge while its best
rate sits there: `Runs.sweep`), then every seed at the rate the sweep chose on dev. A run whose
file exists is skipped, so rerunning the same command resumes, and a killed runner loses only
the run it was training.

Several processes may run the same studies into one folder: before training a run a process
claims it with a marker file created atomically (`<run file>.claim`, holding its host and pid),
and leaves runs that another live process holds. A marker whose process is gone (its pid is
not alive on this host: the process was killed) is stale and taken over. Markers of other
hosts are never judged stale; delete those by hand if their process died.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

import loratrf
from loratrf.experiments.backbone import Backbone
from loratrf.experiments.data import TASKS, load_source, split
from loratrf.experiments.gate_stats import probe
from loratrf.experiments.methods import CALIBRATION_STARTS, GATE_RANGE, AdaLoRA, Method, prepare
from loratrf.experiments.results import (
    SWEEP_SEED,
    Runs,
    identity,
    pack_bits,
    read_runs,
    run_path,
    sweep_task,
    write_run,
)
from loratrf.experiments.studies import Study
from loratrf.experiments.training import Encoded, TrainingConfig, correct, pad, sentence_loss, total_steps, train

CALIBRATION_SENTENCES = 256  # ':cal' and ':con' set the task vectors from the first training sentences


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: `method` (without a rate) trained at `lr` on `task` from `seed`."""

    method: Method
    lr: float
    task: str
    seed: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", dataclasses.replace(self.method, lr=None))

    def identity(self, config: TrainingConfig) -> dict:
        return identity(self.method, self.lr, self.task, self.seed, config)


class Trainer(Protocol):
    """What the runner needs of a trainer: its settings and one run's results."""

    config: TrainingConfig

    def run(self, spec: RunSpec, label: str) -> dict: ...


class Runner:
    """Trains and evaluates runs on the pretrained backbone, sharing the loaded model and the
    encoded data between them."""

    def __init__(self, backbone: Backbone, config: TrainingConfig) -> None:
        self.backbone, self.config = backbone, config
        self._encoded: dict[tuple[str, str], Encoded] = {}
        self._majority: dict[str, float] = {}
        self._classes: dict[str, tuple[str, ...]] = {}

    def encoded(self, source: str, part: str) -> Encoded:
        """A source's train, dev or test split, tokenised (cached)."""
        if (source, part) not in self._encoded:
            cfg = self.config
            data = load_source(source)
            parts = split(data, dev_size=cfg.dev_size, train_size=cfg.train_size, test_size=cfg.test_size)
            for name in ("train", "dev", "test"):
                texts = getattr(parts, name)
                ids = self.backbone.encode(texts.texts, cfg.max_length)
                self._encoded[source, name] = Encoded(ids, torch.tensor(texts.labels, dtype=torch.long))
            self._majority[source] = parts.test.majority_share()
            self._classes[source] = data.classes
        return self._encoded[source, part]

    def run(self, spec: RunSpec, label: str) -> dict:
        """Train `spec` and evaluate it on dev and on each test source of its task."""
        task = TASKS[spec.task]
        train_data = self.encoded(task.train, "train")
        torch.manual_seed(spec.seed)  # adapter and task-vector initialisation
        model = self.backbone.fresh(len(self._classes[task.train]), spec.seed)
        prepared = prepare(model, spec.method, total_steps=total_steps(self.config, len(train_data)))
        hooks = prepared if isinstance(prepared, AdaLoRA) else None
        open_gates = gates = None
        if spec.method.start in CALIBRATION_STARTS:
            rows = slice(0, CALIBRATION_SENTENCES)
            input_ids, mask = pad(train_data.ids[rows], self.backbone.pad_id)
            how = CALIBRATION_STARTS[spec.method.start]
            open_gates = loratrf.calibrate_filters(
                model,
                input_ids=input_ids,
                attention_mask=mask,
                start=how,
                labels=train_data.labels[rows] if how == "contrastive" else None,
                token_mask=mask,
                gate_range=GATE_RANGE if spec.method.gate == "affine" else None,
            )
        if spec.method.filters:
            source = task.tests[0]
            tokens = self.backbone.tokenizer.convert_ids_to_tokens
            probe_data, classes = self.encoded(source, "test"), self._classes[source]
            gates, after_training = probe(model, probe_data, self.backbone.pad_id, tokens, source, classes)
        params = loratrf.summary(model)
        start = time.perf_counter()
        losses = train(
            model,
            len(train_data),
            functools.partial(sentence_loss, model, train_data, self.backbone.pad_id),
            lr=spec.lr,
            config=self.config,
            seed=spec.seed,
            label=label,
            hooks=hooks,
        )
        train_seconds = time.perf_counter() - start
        if gates is not None:
            gates = after_training()
        start = time.perf_counter()
        pad_id, batch = self.backbone.pad_id, self.config.eval_batch_size
        dev = correct(model, self.encoded(task.train, "dev"), pad_id=pad_id, batch_size=batch)
        test = {s: correct(model, self.encoded(s, "test"), pad_id=pad_id, batch_size=batch) for s in task.tests}
        return {
            "title": spec.method.title,
            "params": {**dataclasses.asdict(params), "trainable": params.trainable},
            "dev": dev.float().mean().item(),
            "test": {s: hits.float().mean().item() for s, hits in test.items()},
            "test_size": {s: len(hits) for s, hits in test.items()},
            "test_correct": {s: pack_bits(hits.tolist()) for s, hits in test.items()},  # results.unpack_bits
            "majority": {s: self._majority[s] for s in task.tests},
            "open_gates": open_gates,  # calibrated runs: per filter, the share of tokens with s > 0
            "gates": gates,  # runs with filters: gate statistics at the start and after training (gate_stats.py)
            "train_loss": losses,
            "train_sentences": len(train_data),
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - start,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            **({"ranks": prepared.ranks()} if hooks is not None else {}),  # AdaLoRA: each matrix's rank after pruning
        }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo, as `lscpu` shows it), with the number of CPUs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} CPUs)"


def environment() -> dict:
    """Versions and machine, stored in every run file."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "peft", "loratrf"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "machine": {
            "platform": platform.machine(),
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "host": socket.gethostname(),
        },
        "command": " ".join(["python -m loratrf.experiments", *sys.argv[1:]]),
    }


# --- claims: which process trains which run ----------------------------------------------------------


def claim(path: Path) -> bool:
    """Take the marker of run file `path`: True when this process now holds it. The marker is
    made whole and then linked into place (`os.link` fails if it exists), so it is never seen
    half-written; a stale one (`stale`) is removed and taken over."""
    marker = path.with_name(path.name + ".claim")
    mine = path.with_name(f".{path.name}.{os.getpid()}.claim")
    mine.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        for _ in range(2):
            try:
                os.link(mine, marker)
                return True
            except FileExistsError:
                if not stale(marker):
                    return False
                marker.unlink(missing_ok=True)
        return False
    finally:
        mine.unlink()


def stale(marker: Path) -> bool:
    """A marker left by a process of this host that no longer runs."""
    try:
        held = json.loads(marker.read_text())
    except FileNotFoundError:
        return True
    if held["host"] != socket.gethostname():
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def release(path: Path) -> None:
    path.with_name(path.name + ".claim").unlink(missing_ok=True)


# --- studies ---------------------------------------------------------------------------------------


def sweep_runs(study: Study, runs: Runs) -> list[RunSpec]:
    """The sweep of every method of `study` without a fixed rate (PEFT's LoRA: loratrf's), as
    far as `runs` tell (a sweep grows past its edge once its rates are finished)."""
    specs = []
    for spec in study.methods:
        method = Method.parse(spec)
        if method.lr is None:
            for task in study.tasks:
                tuned, source = method.tuned_as, sweep_task(task)
                specs += [RunSpec(tuned, lr, source, SWEEP_SEED) for lr in runs.sweep(method, task)]
    return specs


def seed_runs(study: Study, seeds: Sequence[int], runs: Runs) -> tuple[list[RunSpec], list[tuple[Method, str, int]]]:
    """Every seed of every method and task at its rate, seed by seed; and the `(method, task,
    seed)` that wait for a sweep that is not finished (another process holds part of it)."""
    found, waiting = [], []
    for seed in seeds if study.seeds is None else [s for s in seeds if s in study.seeds]:
        for task in study.tasks:
            for spec in study.methods:
                method = Method.parse(spec)
                lr = runs.rate(method, task)
                if lr is None:
                    waiting.append((method, task, seed))
                else:
                    found.append(RunSpec(method, lr, task, seed))
    return found, waiting


def run_studies(
    trainer: Trainer,
    chosen: Mapping[str, Study],
    seeds: Sequence[int],
    folder: Path,
    *,
    tune: bool = True,
    log=print,
) -> Runs:
    """Run every missing run of the studies into `folder`, study by study, each through its
    sweep (when `tune`) and then its seeds; returns the folder's runs of this training config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = trainer.config
    context = environment()

    def execute(specs: Sequence[RunSpec], what: str) -> int:
        """Train the missing runs of `specs`; returns how many this process trained."""
        specs = list(dict.fromkeys(specs))
        paths = [run_path(folder, s.identity(config)) for s in specs]
        todo = [(s, p) for s, p in zip(specs, paths) if not p.exists()]
        log(f"{what}: {len(specs)} runs, {len(specs) - len(todo)} already in {folder}, {len(todo)} to train")
        held = trained = 0
        for number, (spec, path) in enumerate(todo, start=1):
            if not claim(path):
                held += 1
                continue
            try:
                if path.exists():  # another process finished it since the listing
                    continue
                label = f"[{number}/{len(todo)}] {spec.method} lr={spec.lr:g} on {spec.task}, seed {spec.seed}"
                record = trainer.run(spec, label)
                write_run(path, {**spec.identity(config), **record, **context})
                tests = ", ".join(f"{s} {a:.3f}" for s, a in record["test"].items())
                log(f"    dev {record['dev']:.3f}, test {tests}; {record['train_seconds']:.0f} s training")
                trained += 1
            finally:
                release(path)
        if held:
            log(f"    {held} runs held by other processes, left to them")
        return trained

    def current() -> Runs:
        return Runs(read_runs(folder, config), tune=tune)

    for name, study in chosen.items():
        while tune and execute(sweep_runs(study, current()), f"{name}, learning-rate sweep"):
            pass  # until no sweep grows past its edge
        specs, waiting = seed_runs(study, seeds, current())
        execute(specs, f"{name}, seeds {', '.join(map(str, seeds))}")
        if waiting:
            log(f"    {len(waiting)} runs wait for a sweep that other processes hold; run again once it is done")
    return current()
