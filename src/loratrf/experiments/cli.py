"""`python -m loratrf.experiments {demo,grid,report,list}`: fine-tune all-MiniLM-L6-v2 on real
sentences with full fine-tuning, LoRA and LoRATRF, and compare them."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from loratrf.experiments.data import TASKS
from loratrf.experiments.grid import RANKS, STUDY_NAMES, Study, run_grid, studies
from loratrf.experiments.methods import DEFAULT_LR, EXAMPLES, GRAMMAR, Method
from loratrf.experiments.packages import MissingPackage
from loratrf.experiments.training import TrainingConfig

SMOKE = TrainingConfig(train_size=48, dev_size=16, test_size=32, epochs=1, batch_size=16, max_length=32, max_steps=3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = TrainingConfig()
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("data and training (the same for every method)")
    group.add_argument(
        "--train-size",
        type=lambda s: None if s == "all" else int(s),
        default=defaults.train_size,
        help=f"training sentences per task, or 'all' (default {defaults.train_size})",
    )
    group.add_argument("--dev-size", type=int, default=defaults.dev_size, help=f"(default {defaults.dev_size})")
    group.add_argument("--test-size", type=int, default=defaults.test_size, help=f"(default {defaults.test_size})")
    group.add_argument("--epochs", type=int, default=defaults.epochs, help=f"(default {defaults.epochs})")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"(default {defaults.batch_size})")
    group.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help=f"tokens per sentence at most (default {defaults.max_length})",
    )
    group.add_argument("--max-steps", type=int, default=None, help="stop each run after this many optimiser steps")
    group.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    group.add_argument("--methods", nargs="+", metavar="SPEC", help=f"methods instead of the study's; {GRAMMAR}")
    group.add_argument("--tasks", nargs="+", choices=sorted(TASKS), help="tasks instead of the study's")
    group.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 is faster on a busy machine)"
    )
    group.add_argument(
        "--out", type=Path, help="results folder (default: results/<command>-<time>); an existing one is resumed"
    )

    parser = argparse.ArgumentParser(prog="python -m loratrf.experiments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="full FT vs the paper's LoRA vs LoRATRF on movie sentiment",
        description="Full fine-tuning, LoRA r=8 on all six matrices, and LoRATRF (LoRA r=8 on "
        "v,f1,f2 + filters) on movie-review sentiment: 2,000 training sentences, 3 epochs, 1,000 test "
        "sentences; about 13 CPU-minutes (6 to 8 minutes on 2 quiet cores).",
    )
    demo.add_argument(
        "--smoke",
        action="store_true",
        help=f"a few steps on a tiny subset (the tests' check of the whole path): {SMOKE}",
    )
    grid = sub.add_parser("grid", parents=[common], help="run the paper's studies as a method x task x seed grid")
    grid.add_argument("--study", nargs="+", default=None, help="studies to run (default: all; see `list`)")
    grid.add_argument("--ranks", type=int, nargs="+", default=list(RANKS), help="ranks of the rank study")
    report = sub.add_parser("report", help="regenerate a page such as docs/results.md from a results.json")
    report.add_argument(
        "results",
        type=Path,
        nargs="+",
        help="results.json files written by demo or grid (a section each, named after its folder)",
    )
    report.add_argument("--page", type=Path, default=Path("docs/results.md"), help="(default docs/results.md)")
    report.add_argument("--figures", type=Path, default=Path("docs/results"), help="(default docs/results/)")
    sub.add_parser("list", help="the studies, tasks and method defaults")
    return parser.parse_args(argv)


def training_config(args: argparse.Namespace) -> TrainingConfig:
    if getattr(args, "smoke", False):
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
    known = studies(base, args.ranks if args.command == "grid" else RANKS)
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
        chosen = {n: dataclasses.replace(s, methods=methods) for n, s in chosen.items()}
    if args.tasks:
        chosen = {n: dataclasses.replace(s, tasks=tuple(args.tasks)) for n, s in chosen.items()}
    return chosen


def run(args: argparse.Namespace) -> dict:
    from loratrf.experiments.backbone import Backbone
    from loratrf.experiments.gate_stats import console_gates
    from loratrf.experiments.grid import Runner
    from loratrf.experiments.report import console_table, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    config = training_config(args)
    out = args.out or (
        Path(tempfile.mkdtemp(prefix="loratrf-smoke-"))
        if args.smoke and args.command == "demo"
        else Path("results") / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    backbone = Backbone()
    chosen = chosen_studies(args, backbone.fresh(2, 0))
    print(
        f"training: {config}\nthreads: {torch.get_num_threads()}; learning rates: "
        + ", ".join(f"{m} {Method.parse(m).learning_rate:g}" for s in chosen.values() for m in s.methods)
    )
    start = time.perf_counter()
    results = run_grid(Runner(backbone, config), chosen, args.seeds, out)
    page, figures = write_results(results, out)
    for name in chosen:
        print(f"\n{name}: {chosen[name].question}\n{console_table(results, name)}")
        gates = console_gates(results, name)
        if gates:
            print(f"\n{gates}")
    print(f"finished in {time.perf_counter() - start:.0f} s; results in {out}/:")
    for path in (out / "results.json", page, *figures):
        print(f"  {path}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "list":
            print("tasks:\n" + "\n".join(f"  {n:<9} {t.description}" for n, t in TASKS.items()))
            print(f"studies (grid --study NAME): {', '.join(STUDY_NAMES)}")
            print("methods (an example spec of each):")
            print("\n".join(f"  {name:<17} {spec}" for name, spec in EXAMPLES.items()))
            print("default learning rates: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))
            print(GRAMMAR)
        elif args.command == "report":
            from loratrf.experiments.report import write_docs

            grids = {path.parent.name: json.loads(path.read_text()) for path in args.results}
            page = write_docs(grids, args.page, args.figures)
            print(f"wrote {page} and its figures in {args.figures}/")
        else:
            run(args)
    except MissingPackage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
