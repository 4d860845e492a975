"""The experiment runner: studies, their method x task x seed grid, runs, and mean/std over seeds.

A run is one method trained on one task from one seed. Every finished run is written to
`results.json` at once, so an interrupted grid resumes where it stopped (same training
settings), and runs shared by several studies are trained once.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

import loratrf
from loratrf.experiments.backbone import Backbone
from loratrf.experiments.data import TASKS, load_source, split
from loratrf.experiments.gate_stats import probe
from loratrf.experiments.methods import (
    CALIBRATION_STARTS,
    GATE_RANGE,
    MATRICES,
    AdaLoRA,
    Method,
    lora_cost,
    prepare,
    rank_for_budget,
)
from loratrf.experiments.training import Encoded, TrainingConfig, correct, pad, total_steps, train

try:
    import fcntl  # POSIX: several grid processes may share one results file
except ImportError:  # pragma: no cover
    fcntl = None

PAPER_LORA = "lora:all:r8"  # the paper's LoRA baseline: r=8 on all six matrices
PAPER_LORATRF = "loratrf:v,f1,f2:r8"  # the paper's DeBERTa setup: r=8 on W_v, W_f1, W_f2, filters on every layer
RANKS = (4, 8, 16, 32)
STUDY_NAMES = ("demo", "rank", "module", "ablation", "domains", "trec", "table1")
# The paper's Table 1 rows at this scale, every LoRA-type row at one LoRA budget (r=8 on v,f1,f2,
# the paper's LoRATRF placement); then the head alone (the floor) and the paper's all-six LoRA row.
# Houlsby and Pfeiffer adapters are left out: see docs/results.md.
TABLE1 = (
    "full",
    "bitfit",
    "lora:v,f1,f2:r8",
    "lora:v,f1,f2:r8:dora",
    "adalora:v,f1,f2:r8",
    PAPER_LORATRF,
    "loratrf:v,f1,f2:r8:dora",
    "head",
    PAPER_LORA,
)
# Figure 2's question: which matrices to adapt, at the LoRA budget of the paper's setup.
MODULE_CHOICES = (("q", "v"), ("q", "k", "v", "o"), ("f1", "f2"), ("o", "f1", "f2"), ("v", "f1", "f2"), MATRICES)
CALIBRATION_SENTENCES = 256  # ':cal' and ':con' set the task vectors from the first training sentences


@dataclasses.dataclass(frozen=True)
class Study:
    question: str
    methods: tuple[str, ...]
    tasks: tuple[str, ...]


def studies(base: nn.Module, ranks: Sequence[int] = RANKS) -> dict[str, Study]:
    """The paper's comparisons as grids; `base` (the unadapted model) sizes the module-choice ranks."""
    budget = 8 * lora_cost(base, ("v", "f1", "f2"))
    modules = tuple(
        str(Method("loratrf", choice, rank_for_budget(base, choice, budget), filter_rank=8))
        for choice in MODULE_CHOICES
    )
    main = ("full", PAPER_LORA, PAPER_LORATRF)
    found = {  # in STUDY_NAMES' order
        "demo": Study("Full fine-tuning, the paper's LoRA baseline and LoRATRF on movie sentiment", main, ("movies",)),
        "rank": Study(
            "Rank robustness (the paper's Figure 3): LoRA vs LoRATRF as the rank changes",
            tuple(f"{kind}:r{r}" for r in ranks for kind in ("lora:all", "loratrf:v,f1,f2")),
            ("movies",),
        ),
        "module": Study(
            f"Which matrices to adapt (the paper's Figure 2), LoRATRF at a held LoRA budget of {budget:,} "
            "parameters (that of r=8 on v,f1,f2): each choice takes the rank whose count is nearest, and "
            "the filters keep rank 8",
            modules,
            ("movies",),
        ),
        "ablation": Study(
            "Filter ablations at the same LoRA targets (v,f1,f2, r=8): without filters, with cosine "
            "filters, with dot-product filters, with task vectors calibrated on the first "
            f"{CALIBRATION_SENTENCES} training sentences (`loratrf.calibrate_filters`) instead of random, "
            "filters alone, the head alone; and the all-six LoRA baseline",
            (
                "lora:v,f1,f2:r8",
                PAPER_LORATRF,
                "loratrf:v,f1,f2:r8:dot",
                "loratrf:v,f1,f2:r8:cal",
                "filters:r8",
                "head",
                PAPER_LORA,
            ),
            ("movies",),
        ),
        "domains": Study(
            "Other domains: trained on movies and tested on tweets, Amazon and NYT sentences "
            "(cross-domain), and trained on each domain itself (in-domain)",
            main,
            ("transfer", "tweets", "amazon", "nyt"),
        ),
        "trec": Study("Multi-class: TREC question type (6 classes)", main, ("trec",)),
        "table1": Study(
            "The paper's Table 1 at this scale: full fine-tuning, BitFit, LoRA, DoRA, AdaLoRA (PEFT's, pruned "
            "from rank 12 to an average of 8), LoRATRF and DoRA + filters, every LoRA-type row at one LoRA budget "
            "(r=8 on v,f1,f2); the head alone and the paper's all-six LoRA baseline beside them. No Houlsby or "
            "Pfeiffer adapters (no maintained package for them works with transformers 5)",
            TABLE1,
            ("movies",),
        ),
    }
    return found


@dataclasses.dataclass(frozen=True)
class RunSpec:
    method: Method
    task: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}|{self.task}|{self.seed}"


def expand(chosen: Iterable[Study], seeds: Sequence[int]) -> list[RunSpec]:
    """Every (method, task, seed) of the studies, each once: seed by seed, then study by study."""
    runs: dict[str, RunSpec] = {}
    chosen = list(chosen)
    for seed in seeds:
        for study in chosen:
            for task in study.tasks:
                if task not in TASKS:
                    raise ValueError(f"unknown task {task!r}; known: {sorted(TASKS)}")
                for spec in study.methods:
                    run = RunSpec(Method.parse(spec), task, seed)
                    runs.setdefault(run.key, run)
    return list(runs.values())


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""
    n = len(values)
    if n == 0:
        return float("nan"), None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def aggregate(runs: Sequence[dict]) -> dict[tuple[str, str], dict]:
    """`(method, task) -> {"n", "seeds", "params", "dev", "test": {source: ...}, "train_seconds", ...}`,
    where each figure is `(mean, std)` over the seeds of that method and task, and
    `"correct": {source: [share of seeds right on each test sentence] or None}`."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["task"]), []).append(run)
    table = {}
    for key, group in groups.items():
        table[key] = {
            "n": len(group),
            "seeds": sorted(r["seed"] for r in group),
            "params": group[0]["params"],
            "dev": mean_std([r["dev"] for r in group]),
            "test": {s: mean_std([r["test"][s] for r in group]) for s in group[0]["test"]},
            "majority": group[0]["majority"],
            "train_seconds": mean_std([r["train_seconds"] for r in group]),
            "correct": {s: per_sentence([r.get("test_correct", {}).get(s) for r in group]) for s in group[0]["test"]},
        }
    return table


def per_sentence(flags: Sequence[str | None]) -> list[float] | None:
    """Share of runs right on each sentence, from the runs' `"0110..."` strings; runs that
    recorded none are left out (None when no run did)."""
    flags = [f for f in flags if f is not None]
    if not flags:
        return None
    return [sum(f[i] == "1" for f in flags) / len(flags) for i in range(len(flags[0]))]


class Runner:
    """Trains and evaluates runs, sharing the loaded model and encoded data between them."""

    def __init__(self, backbone: Backbone, config: TrainingConfig) -> None:
        self.backbone, self.config = backbone, config
        self._encoded: dict[tuple[str, str], Encoded] = {}
        self._majority: dict[str, float] = {}
        self._classes: dict[str, int] = {}
        self._class_names: dict[str, tuple[str, ...]] = {}

    def encoded(self, source: str, part: str) -> Encoded:
        """A source's train, dev or test split, tokenised (cached)."""
        if (source, part) not in self._encoded:
            cfg = self.config
            train_size = cfg.train_size
            data = load_source(source)
            if train_size is not None:  # a source smaller than asked trains on all it has
                train_size = min(train_size, len(data) - cfg.dev_size - cfg.test_size)
            parts = split(data, dev_size=cfg.dev_size, test_size=cfg.test_size, train_size=train_size)
            for name in ("train", "dev", "test"):
                texts = getattr(parts, name)
                ids = self.backbone.encode(texts.texts, cfg.max_length)
                self._encoded[source, name] = Encoded(ids, torch.tensor(texts.labels, dtype=torch.long))
            self._majority[source] = parts.test.majority_share()
            self._classes[source] = len(data.classes)
            self._class_names[source] = data.classes
        return self._encoded[source, part]

    def run(self, spec: RunSpec, label: str) -> dict:
        task = TASKS[spec.task]
        train_data = self.encoded(task.train, "train")
        torch.manual_seed(spec.seed)  # adapter and task-vector initialisation
        model = self.backbone.fresh(self._classes[task.train], spec.seed)
        prepared = prepare(model, spec.method, total_steps=total_steps(self.config, len(train_data)))
        hooks = prepared if isinstance(prepared, AdaLoRA) else None
        open_gates = gates = None
        if spec.method.start in CALIBRATION_STARTS:
            rows = slice(0, CALIBRATION_SENTENCES)
            input_ids, mask = pad(train_data.ids[rows], self.backbone.pad_id)
            how = CALIBRATION_STARTS[spec.method.start]
            labels = train_data.labels[rows] if how == "contrastive" else None
            gate_range = GATE_RANGE if spec.method.gate == "affine" else None
            open_gates = loratrf.calibrate_filters(
                model,
                input_ids=input_ids,
                attention_mask=mask,
                start=how,
                labels=labels,
                token_mask=mask,
                gate_range=gate_range,
            )
        if spec.method.filters:
            source = task.tests[0]
            tokens = self.backbone.tokenizer.convert_ids_to_tokens
            probe_data, classes = self.encoded(source, "test"), self._class_names[source]
            gates, after_training = probe(model, probe_data, self.backbone.pad_id, tokens, source, classes)
        params = loratrf.summary(model)
        start = time.perf_counter()
        losses = train(
            model,
            train_data,
            lr=spec.method.learning_rate,
            config=self.config,
            seed=spec.seed,
            pad_id=self.backbone.pad_id,
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
            "key": spec.key,
            "method": str(spec.method),
            "title": spec.method.title,
            "lr": spec.method.learning_rate,
            "task": spec.task,
            "seed": spec.seed,
            "params": {**dataclasses.asdict(params), "trainable": params.trainable},
            "dev": dev.float().mean().item(),
            "test": {s: hits.float().mean().item() for s, hits in test.items()},
            "test_correct": {s: "".join("1" if h else "0" for h in hits.tolist()) for s, hits in test.items()},
            "majority": {s: self._majority[s] for s in task.tests},
            "open_gates": open_gates,  # calibrated runs: per filter, the share of tokens with s > 0
            "gates": gates,  # runs with filters: gate statistics at the start and after training (gate_stats.py)
            "train_loss": losses,
            "train_sentences": len(train_data),
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - start,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            **({"ranks": hooks.ranks()} if hooks is not None else {}),  # AdaLoRA: each matrix's rank after pruning
        }


def environment() -> dict:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "loratrf": importlib.metadata.version("loratrf"),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "command": " ".join(["python -m loratrf.experiments", *sys.argv[1:]]),
    }


def run_grid(runner: Runner, chosen: dict[str, Study], seeds: Sequence[int], out: Path, *, log=print) -> dict:
    """Run every missing run of the grid, saving `out/results.json` after each; returns its content.

    Several grid processes may share one `out` (say one per seed, each with `--threads 1`): each
    saves its runs under a file lock, merged with the runs the others saved meanwhile.
    """
    path = out / "results.json"
    out.mkdir(parents=True, exist_ok=True)
    results = {"training": dataclasses.asdict(runner.config), "studies": {}, "seeds": [], "runs": []}
    results["studies"] = {name: dataclasses.asdict(s) for name, s in chosen.items()}
    results["seeds"] = sorted(set(seeds))
    results["environment"] = environment()
    results["commands"] = [results["environment"]["command"]]
    results = save(path, results)
    done = {r["key"] for r in results["runs"]}
    specs = expand(chosen.values(), seeds)
    todo = [s for s in specs if s.key not in done]
    log(f"{len(specs)} runs in the grid, {len(specs) - len(todo)} already in {path}, {len(todo)} to train")
    for number, spec in enumerate(todo, start=1):
        label = f"[{number}/{len(todo)}] {spec.method} on {spec.task}, seed {spec.seed}"
        record = runner.run(spec, label)
        tests = ", ".join(f"{s} {a:.3f}" for s, a in record["test"].items())
        log(f"    dev {record['dev']:.3f}, test {tests}; trained in {record['train_seconds']:.0f} s")
        results["runs"].append(record)
        results = save(path, results)
    return results


def save(path: Path, results: dict) -> dict:
    """Merge `results` into `path` (under a lock: other grid processes may write it too) and
    return the merged content. Runs are keyed by method, task and seed; the first saved wins."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            saved = json.loads(path.read_text())
            if saved["training"] != results["training"]:
                raise ValueError(
                    f"{path} was made with other training settings ({saved['training']}); "
                    "pass another --out, or the same settings to add runs to it"
                )
            known = {r["key"] for r in saved["runs"]}
            saved["runs"] += [r for r in results["runs"] if r["key"] not in known]
            saved["studies"].update(results["studies"])
            saved["seeds"] = sorted(set(saved["seeds"]) | set(results["seeds"]))
            commands = saved.setdefault("commands", [])
            commands += [c for c in results.get("commands", []) if c not in commands]
            results = saved
        write_json(path, results)
    return results


def write_json(path: Path, content: dict) -> None:
    """Write atomically, so an interrupted run never leaves a broken file."""
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(content, indent=1))
    temporary.replace(path)
