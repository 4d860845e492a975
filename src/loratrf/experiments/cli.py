"""`python -m loratrf.experiments {demo,grid,report,list,demo-llm,llm-grid,llm-report}`: fine-tune
all-MiniLM-L6-v2 on real sentences with full fine-tuning, LoRA, LoRATRF and the paper's other
baselines, and compare them; `demo-llm` fine-tunes the decoder SmolLM2-135M-Instruct on reasoning
problems (docs/llm.md), and `llm-grid` runs the paper's LLM studies on it (docs/results-llm.md)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from loratrf.experiments.data import TASKS
from loratrf.experiments.decoder import ModelFileError
from loratrf.experiments.methods import EXAMPLES, GRAMMAR, LR_SWEEP, Method
from loratrf.experiments.packages import MissingPackage
from loratrf.experiments.results import GROWTH
from loratrf.experiments.studies import LLM_STUDY_NAMES, RANKS, STUDY_NAMES, Study, llm_studies, studies
from loratrf.experiments.training import TrainingConfig

SMOKE = TrainingConfig(train_size=48, dev_size=16, test_size=32, epochs=1, batch_size=16, max_length=32, max_steps=3)
# demo-llm: SmolLM2-135M-Instruct on reasoning-gym arithmetic (docs/llm.md: about 10 minutes on 2 cores)
LLM_TRAINING = TrainingConfig(
    train_size=800, dev_size=32, test_size=200, epochs=1, batch_size=8, max_length=64, eval_batch_size=50
)
# llm-grid: the LLM studies of docs/results-llm.md (200 steps of batch 8, 1,000 test problems a task)
LLM_STUDY = TrainingConfig(
    train_size=1600, dev_size=200, test_size=1000, epochs=1, batch_size=8, max_length=192, eval_batch_size=50
)
LLM_SMOKE = TrainingConfig(
    train_size=16, dev_size=4, test_size=8, epochs=1, batch_size=8, max_length=128, eval_batch_size=8, max_steps=2
)
SEEDS = (0, 1, 2, 3, 4)
LLM_SEEDS = (0, 1, 2)
RUNS = Path("docs/results/runs")  # the committed run files that docs/results.md is made from
LLM_RUNS = Path("docs/results-llm/runs")  # and those of docs/results-llm.md


def training_options(defaults: TrainingConfig, smoke: TrainingConfig) -> argparse.ArgumentParser:
    """The options that make a `TrainingConfig` (a parent parser), with these defaults."""
    training = argparse.ArgumentParser(add_help=False)
    group = training.add_argument_group("data and training (the same for every method; they select the run files)")
    group.add_argument("--train-size", type=int, default=defaults.train_size, help="(default %(default)s)")
    group.add_argument("--dev-size", type=int, default=defaults.dev_size, help="(default %(default)s)")
    group.add_argument(
        "--test-size",
        type=lambda s: None if s == "all" else int(s),
        default=defaults.test_size,
        help="test sentences per source, or 'all' (default: all, every sentence not used for training or dev)"
        if defaults.test_size is None
        else "test problems per task (default %(default)s)",
    )
    group.add_argument("--epochs", type=int, default=defaults.epochs, help="(default %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default %(default)s)")
    group.add_argument(
        "--max-length", type=int, default=defaults.max_length, help="tokens per sentence at most (default %(default)s)"
    )
    group.add_argument("--max-steps", type=int, default=None, help="stop each run after this many optimiser steps")
    group.add_argument("--smoke", action="store_true", help=f"a few steps on a tiny subset (the tests'): {smoke}")
    return training


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    training = training_options(TrainingConfig(), SMOKE)
    chosen = argparse.ArgumentParser(add_help=False)
    group = chosen.add_argument_group("what to run")
    group.add_argument("--study", nargs="+", help="studies (default: all but demo; see `list`)")
    group.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="ranks of the rank study")
    group.add_argument("--methods", nargs="+", metavar="SPEC", help=f"methods instead of the study's; {GRAMMAR}")
    sentence_tasks = sorted(n for n, t in TASKS.items() if t.kind == "sentences")
    group.add_argument("--tasks", nargs="+", choices=sentence_tasks, help="tasks instead of the study's")
    group.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest per core on a busy machine)")

    parser = argparse.ArgumentParser(prog="python -m loratrf.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        parents=[training, chosen],
        help="full FT vs the paper's LoRA vs LoRATRF on movie sentiment, untuned rates",
        description="Full fine-tuning, LoRA r=8 on all six matrices, and LoRATRF (LoRA r=8 on "
        "v,f1,f2 + filters) on movie-review sentiment at their default learning rates: 2,000 training "
        "sentences, 3 epochs, tested on the other 8,066.",
    )
    demo.add_argument("--out", type=Path, help="results folder (default: results/demo-<time>); one is resumed")
    # --seeds is each command's own option: parents share an option's default among their children
    demo.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default %(default)s)")
    grid = sub.add_parser(
        "grid",
        parents=[training, chosen],
        help="run studies: each method's learning-rate sweep, then every seed at the chosen rate",
    )
    grid.add_argument("--out", type=Path, default=RUNS, help="run files' folder (default %(default)s); resumed")
    grid.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds (default %(default)s)")
    report = sub.add_parser(
        "report", parents=[training, chosen], help="regenerate docs/results.md from run files of these settings"
    )
    report.add_argument("--out", type=Path, default=RUNS, help="run files' folder (default %(default)s)")
    report.add_argument("--page", type=Path, default=Path("docs/results.md"), help="(default %(default)s)")
    report.add_argument("--figures", type=Path, default=Path("docs/results"), help="(default %(default)s)")
    report.add_argument(
        "--seeds", type=int, nargs="+", default=list(SEEDS), help="training seeds (default %(default)s)"
    )
    llm = sub.add_parser(
        "demo-llm",
        parents=[training_options(LLM_TRAINING, LLM_SMOKE)],
        help="zero-shot vs LoRA vs LoRATRF on SmolLM2-135M-Instruct, scored by its generated answers",
        description="Zero-shot, LoRA r=32 on q,k,v,f1,f2 (the paper's LLaMA baselines) and LoRATRF (LoRA r=32 on "
        "o,f1,f2 + filters, the paper's LLaMA setup) on reasoning-gym problems, with the loss on the answer tokens "
        "only, scored by exact match of greedy answers (docs/llm.md).",
    )
    problem_tasks = sorted(n for n, t in TASKS.items() if t.kind == "problems")
    llm.add_argument("--task", choices=problem_tasks, default="arithmetic", help="(default %(default)s)")
    llm.add_argument(
        "--methods",
        nargs="+",
        metavar="SPEC",
        help="methods instead of the demo's (zeroshot, lora, dora, loratrf specs; e.g. loratrf:o,f1,f2:r32)",
    )
    llm.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default %(default)s)")
    llm.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (less memory, slower)")
    llm.add_argument("--threads", type=int, help="torch CPU threads")
    llm.add_argument("--out", type=Path, help="results folder (default: results/demo-llm-<time>); one is resumed")
    llm_training = training_options(LLM_STUDY, LLM_SMOKE)
    llm_grid = sub.add_parser(
        "llm-grid",
        parents=[llm_training],
        help="run the LLM studies: each method's learning-rate sweep, then every seed at the chosen rate",
    )
    llm_report = sub.add_parser(
        "llm-report", parents=[llm_training], help="regenerate docs/results-llm.md from run files of these settings"
    )
    for command in (llm_grid, llm_report):
        command.add_argument("--study", nargs="+", choices=LLM_STUDY_NAMES, help="studies (default: all)")
        command.add_argument("--out", type=Path, default=LLM_RUNS, help="run files' folder (default %(default)s)")
        command.add_argument("--seeds", type=int, nargs="+", default=list(LLM_SEEDS), help="(default %(default)s)")
    llm_grid.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest per core on a busy machine)")
    llm_grid.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (less memory, slower)")
    llm_report.add_argument("--page", type=Path, default=Path("docs/results-llm.md"), help="(default %(default)s)")
    llm_report.add_argument("--figures", type=Path, default=Path("docs/results-llm"), help="(default %(default)s)")
    sub.add_parser("list", help="the studies, tasks, method specs and learning-rate sweeps")
    return parser.parse_args(argv)


def training_config(args: argparse.Namespace) -> TrainingConfig:
    llm = args.command in ("demo-llm", "llm-grid", "llm-report")
    if args.smoke:
        return LLM_SMOKE if llm else SMOKE
    return dataclasses.replace(
        {"demo-llm": LLM_TRAINING, "llm-grid": LLM_STUDY, "llm-report": LLM_STUDY}.get(args.command, TrainingConfig()),
        train_size=args.train_size,
        dev_size=args.dev_size,
        test_size=args.test_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_steps=args.max_steps,
    )


def chosen_studies(args: argparse.Namespace, base) -> dict[str, Study]:
    """The studies a command runs or reports, with `--methods` and `--tasks` replacing theirs
    (a custom study when `grid` names methods or tasks and no study)."""
    known = studies(base, args.ranks)
    if args.command == "grid" and not args.study and (args.methods or args.tasks):
        known["custom"] = Study("A grid of the given methods and tasks", known["demo"].methods, ("movies",))
        names = ["custom"]
    else:
        names = ["demo"] if args.command == "demo" else (args.study or [n for n in known if n != "demo"])
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown studies {unknown}; known: {sorted(known)}")
    chosen = {n: known[n] for n in names}
    if args.methods:
        methods = tuple(str(Method.parse(m)) for m in args.methods)
        chosen = {
            n: dataclasses.replace(
                s, methods=methods, comparisons=tuple(p for p in s.comparisons if set(p) <= set(methods))
            )
            for n, s in chosen.items()
        }
    if args.tasks:
        chosen = {n: dataclasses.replace(s, tasks=tuple(args.tasks)) for n, s in chosen.items()}
    return chosen


def run(args: argparse.Namespace) -> None:
    """`demo` or `grid`: train every missing run, then print (and for `demo` write) the results."""
    from loratrf.experiments.backbone import Backbone
    from loratrf.experiments.report import console_table, write_page
    from loratrf.experiments.runner import Runner, run_studies

    if args.threads:
        torch.set_num_threads(args.threads)
    config = training_config(args)
    demo = args.command == "demo"
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="loratrf-smoke-"))
        if args.smoke
        else Path("results") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    folder = out / "runs" if demo else out
    backbone = Backbone()
    chosen = chosen_studies(args, backbone.fresh(2, 0))
    print(f"training: {config}\nthreads: {torch.get_num_threads()}; seeds: {args.seeds}; runs in {folder}")
    start = time.perf_counter()
    runs = run_studies(Runner(backbone, config), chosen, args.seeds, folder, tune=not demo)
    for name, study in chosen.items():
        print(f"\n{name}: {study.question}\n{console_table(study, runs)}")
    print(f"finished in {time.perf_counter() - start:.0f} s")
    if demo:
        page = write_page(
            runs, chosen, config, args.seeds, out / "results.md", out, title="loratrf demo results", claims=False
        )
        print(f"results: {page} and its figures in {out}/")


LLM_HOW_TO_RUN = [
    "## How to run",
    "",
    "    make demo-llm                                        # this page: zero-shot, LoRA, LoRATRF",
    '    make demo-llm ARGS="--seeds 0 1 2"                   # more seeds (a folder given with --out resumes)',
    '    make demo-llm ARGS="--methods zeroshot dora:q,k,v,f1,f2:r32 loratrf:o,f1,f2:r32"',
    "",
    "The recipe behind it, and what a bigger model needs, is in docs/llm.md.",
]


def run_llm(args: argparse.Namespace) -> None:
    """`demo-llm`: train and score every missing run of the LLM demo, print and write its results."""
    from loratrf.experiments.problem_runner import ProblemRunner
    from loratrf.experiments.report import console_table, problem_setup_lines, write_page
    from loratrf.experiments.runner import run_studies
    from loratrf.experiments.studies import llm_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = training_config(args)
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="loratrf-smoke-"))
        if args.smoke
        else Path("results") / f"demo-llm-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    study = llm_demo(args.task)
    if args.methods:
        methods = tuple(str(Method.parse(m)) for m in args.methods)
        pairs = tuple(p for p in study.comparisons if set(p) <= set(methods))
        study = dataclasses.replace(study, methods=methods, comparisons=pairs)
    print(f"training: {config}\nthreads: {torch.get_num_threads()}; seeds: {args.seeds}; runs in {out / 'runs'}")
    runner = ProblemRunner(config, checkpointing=args.checkpointing)
    runs = run_studies(runner, {"demo-llm": study}, args.seeds, out / "runs", tune=False)
    print(f"\n{study.question}\n{console_table(study, runs)}")
    for spec in study.methods:
        for seed, record in sorted(runs.at_rate(Method.parse(spec), args.task).items()):
            right = round(record["test"][args.task] * record["test_size"][args.task])
            print(
                f"{record['title']:<40} seed {seed}: exact match {100 * record['test'][args.task]:5.1f}% "
                f"({right}/{record['test_size'][args.task]} test problems)"
            )
    setup = problem_setup_lines(config, runs, args.seeds)
    page = write_page(
        runs,
        {"demo-llm": study},
        config,
        args.seeds,
        out / "results.md",
        out,
        title="loratrf LLM demo results",
        claims=False,
        setup=setup,
        how_to_run=LLM_HOW_TO_RUN,
    )
    print(f"results: {page} and its plot in {out}/; finished in {time.perf_counter() - start:.0f} s")


LLM_GRID_HOW_TO_RUN = [
    "## How to run",
    "",
    "    make study-llm                                       # every study: 20-30 CPU-hours; rerun to resume",
    '    make study-llm ARGS="--study llm-table2"             # one study',
    "    make report-llm                                      # this page from the run files",
    "",
    "Two runners (`make study-llm` in two shells, one thread each) share the runs through their claim",
    "markers. The recipe behind the runs is in docs/llm.md.",
]


def run_llm_grid(args: argparse.Namespace) -> None:
    """`llm-grid`: train every missing run of the LLM studies; `llm-report`: write their page."""
    from loratrf.experiments.problem_runner import ProblemRunner
    from loratrf.experiments.report import console_table, problem_setup_lines, write_page
    from loratrf.experiments.results import Runs, read_runs
    from loratrf.experiments.runner import run_studies

    config = training_config(args)
    runner = ProblemRunner(config, checkpointing=getattr(args, "checkpointing", False))
    known = llm_studies(runner.model)
    chosen = {n: known[n] for n in args.study or known}
    if args.command == "llm-report":
        runs = Runs(read_runs(args.out, config))
        page = write_page(
            runs,
            chosen,
            config,
            args.seeds,
            args.page,
            args.figures,
            title="Results on a decoder LLM: LoRATRF, LoRA and DoRA on SmolLM2-135M-Instruct",
            claims=False,
            setup=problem_setup_lines(config, runs, args.seeds),
            how_to_run=LLM_GRID_HOW_TO_RUN,
        )
        print(f"wrote {page} and its figures in {args.figures}/ from {len(runs.records)} runs in {args.out}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"training: {config}\nthreads: {torch.get_num_threads()}; seeds: {args.seeds}; runs in {args.out}")
    start = time.perf_counter()
    runs = run_studies(runner, chosen, args.seeds, args.out)
    for name, study in chosen.items():
        print(f"\n{name}: {study.question}\n{console_table(study, runs)}")
    print(f"finished in {time.perf_counter() - start:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "list":
            print("tasks:\n" + "\n".join(f"  {n:<9} {t.description}" for n, t in TASKS.items()))
            print(f"studies (grid --study NAME): {', '.join(STUDY_NAMES)}")
            print("methods (an example spec of each):")
            print("\n".join(f"  {name:<17} {spec}" for name, spec in EXAMPLES.items()))
            sweeps = "; ".join(f"{k} {', '.join(map(str, v))}" for k, v in LR_SWEEP.items())
            print(f"learning-rate sweeps: {sweeps} (each grown past the edge its best sits on, at most {GROWTH} rates)")
            print(GRAMMAR)
        elif args.command == "report":
            from loratrf.experiments.backbone import Backbone
            from loratrf.experiments.report import write_page
            from loratrf.experiments.results import Runs, read_runs

            config = training_config(args)
            chosen = chosen_studies(args, Backbone().fresh(2, 0))
            runs = Runs(read_runs(args.out, config))
            title = "Results: LoRATRF, LoRA and the paper's baselines on a real model and real data"
            page = write_page(runs, chosen, config, args.seeds, args.page, args.figures, title=title)
            print(f"wrote {page} and its figures in {args.figures}/ from {len(runs.records)} runs in {args.out}")
        elif args.command == "demo-llm":
            run_llm(args)
        elif args.command in ("llm-grid", "llm-report"):
            run_llm_grid(args)
        else:
            run(args)
    except (MissingPackage, ModelFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
