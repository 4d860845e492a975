"""How open the filters' gates start on SmolLM2-135M-Instruct, with the paper's random task
vector and after `calibrate_filters` (docs/method.md, "When to call calibrate_filters").

The LLaMA preset (LoRA r=32 on o, up, down and a filter on each of the 30 layers) on 16 chat
prompts of `basic_arithmetic` problems, over 5 seeds of the task vector: per filter, the share
of real tokens whose gate is open (`s > 0`) and the mean gate; the filters whose every gate is
closed get exactly zero gradient. Skipped, saying so, when the model's package is absent.

    python benchmarks/decoder_gates.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import loratrf
from loratrf.experiments import decoder
from loratrf.experiments.causal_lm import encode, pad_left

PROMPTS = 16


def prompts(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """`(ids, attention mask)`, `[16, T]`, left-padded: the questions of 16 generated problems."""
    import reasoning_gym

    data = reasoning_gym.create_dataset("basic_arithmetic", size=PROMPTS, seed=0, min_terms=2, max_terms=3)
    encoded = encode(tokenizer, [row["question"] for row in data], [row["answer"] for row in data])
    return pad_left(encoded.prompts, tokenizer.pad_token_id)


def gate_summary(model, ids, mask) -> tuple[int, float, float]:
    """(filters with every gate closed, median share open, median mean gate) over the 30 filters."""
    with loratrf.record_gates(model) as gates, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    stats = loratrf.gate_statistics(gates, masks=mask).values()
    closed = sum(s.open == 0 for s in stats)
    return closed, statistics.median(s.open for s in stats), statistics.median(s.mean for s in stats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        folder = decoder.float32_folder()
    except loratrf.LoRATRFError as e:
        print(f"skipped: SmolLM2 is not installed ({e})")
        return
    torch.set_num_threads(2)
    print("seed | start | filters all closed | median share open | median mean gate")
    for seed in range(args.seeds):
        model, tokenizer = decoder.load(folder)
        ids, mask = prompts(tokenizer)
        torch.manual_seed(seed)
        loratrf.inject(model, loratrf.presets.LORATRF_LLAMA)
        closed, share, mean = gate_summary(model, ids, mask)
        print(f"{seed} | paper (random t) | {closed} of 30 | {share:.2f} | {mean:.4f}")
        loratrf.calibrate_filters(model, input_ids=ids, attention_mask=mask, token_mask=mask)
        closed, share, mean = gate_summary(model, ids, mask)
        print(f"{seed} | calibrate_filters | {closed} of 30 | {share:.2f} | {mean:.4f}")


if __name__ == "__main__":
    main()
