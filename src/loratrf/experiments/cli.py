"""`python -m loratrf.experiments {demo,grid,report,list}`: fine-tune all-MiniLM-L6-v2 on real
sentences with full fine-tuning, LoRA, LoRATRF and the paper's other baselines, and compare them."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from loratrf.experiments.data import TASKS
from loratrf.experiments.methods import EXAMPLES, GRAMMAR, LR_SWEEP, Method
from loratrf.experiments.packages import MissingPackage
from loratrf.experiments.results import GROWTH
from loratrf.experiments.studies import RANKS, STUDY_NAMES, Study, studies
from loratrf.experiments.training import TrainingConfig

SMOKE = TrainingConfig(train_size=48, dev_size=16, test_size=32, epochs=1, batch_size=16, max_length=32, max_steps=3)
SEEDS = (0, 1, 2, 3, 4)
RUNS = Path("docs/results/runs")  # the committed run files that docs/results.md is made from


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = TrainingConfig()
    training = argparse.ArgumentParser(add_help=False)
    group = training.add_argument_group("data and training (the same for every method; they select the run files)")
    group.add_argument("--train-size", type=int, default=defaults.train_size, help="(default %(default)s)")
    group.add_argument("--dev-size", type=int, default=defaults.dev_size, help="(default %(default)s)")
    group.add_argument(
        "--test-size",
        type=lambda s: None if s == "all" else int(s),
        default=defaults.test_size,
        help="test sentences per source, or 'all' (default: all, every sentence not used for training or dev)",
    )
    group.add_argument("--epochs", type=int, default=defaults.epochs, help="(default %(default)s)")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default %(default)s)")
    group.add_argument(
        "--max-length", type=int, default=defaults.max_length, help="tokens per sentence at most (default %(default)s)"
    )
    group.add_argument("--max-steps", type=int, default=None, help="stop each run after this many optimiser steps")
    group.add_argument("--smoke", action="store_true", help=f"a few steps on a tiny subset (the tests'): {SMOKE}")
    chosen = argparse.ArgumentParser(add_help=False)
    group = chosen.add_argument_group("what to run")
    group.add_argument("--study", nargs="+", help="studies (default: all but demo; see `list`)")
    group.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="ranks of the rank study")
    group.add_argument("--methods", nargs="+", metavar="SPEC", help=f"methods instead of the study's; {GRAMMAR}")
    group.add_argument("--tasks", nargs="+", choices=sorted(TASKS), help="tasks instead of the study's")
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
    sub.add_parser("list", help="the studies, tasks, method specs and learning-rate sweeps")
    return parser.parse_args(argv)


def training_config(args: argparse.Namespace) -> TrainingConfig:
    if args.smoke:
        return SMOKE
    return TrainingConfig(
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
        else:
            run(args)
    except (MissingPackage, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
