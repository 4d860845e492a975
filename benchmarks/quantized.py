"""LoRA on a quantized base: SmolLM2-135M's memory in float32, int8 and 4-bit, and the time of a
training step of loratrf's LoRA beside PEFT's on each base.

    python benchmarks/quantized.py [--rounds 7] [--threads N] [--layers 4] [--batch 2] [--seq 64] [--rank 8]

The model is a `LlamaForCausalLM` built from SmolLM2-135M's config (hidden 576, 9 query and 3
key/value heads, SwiGLU width 1536, vocabulary 49152, tied embeddings) with random weights: the
memory does not depend on the values, and no model is downloaded. The bases quantize the seven
Linear layers of every decoder layer, as QLoRA does; the embeddings (and the tied lm_head) stay
float32. Memory: the bytes of every parameter and buffer, a quantized weight counted by what it
stores (torchao's inner tensors; bitsandbytes' packed bytes, block scales and code book), for all
30 layers. Step time: one AdamW step of rank-`r` LoRA on all seven projections (forward with the
causal-LM loss, backward, step), on `--layers` of the 30 decoder layers (the timing is per step,
so fewer layers keep the run short), every method interleaved with the others: each round runs
each once, in an order that rotates, and ratios are taken within a round. Printed: the median
step time and its 25th-75th percentiles, each base's time over float32's (loratrf), and PEFT's
time over loratrf's on the same base, with the CPU model and torch's thread count.
Needs torchao, bitsandbytes and PEFT (`pip install -e ".[hf,bench,quant]"`); a base whose
library is absent is left out.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable

import torch
import transformers
from torch import nn

import loratrf
from cases import ALPHA, installed, version
from timing import cpu_model, interleaved, quartiles

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = rf".*\.({'|'.join(PROJECTIONS)})"


def smollm2(layers: int = 30) -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers}))


def quantize(model: nn.Module, base: str) -> nn.Module:
    """`model` with every decoder layer's projections quantized as `base` says (in place)."""
    names = [n for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]
    if base.startswith("torchao"):
        import torchao.quantization as tq

        config = tq.Int8WeightOnlyConfig() if base == "torchao int8" else tq.IntxWeightOnlyConfig(torch.int4)
        tq.quantize_(model, config, filter_fn=lambda module, name: name in names)
        return model
    if base.startswith("bitsandbytes"):
        import bitsandbytes as bnb

        for name in names:
            linear = model.get_submodule(name)
            shape = (linear.in_features, linear.out_features)
            if base == "bitsandbytes int8":
                layer = bnb.nn.Linear8bitLt(*shape, bias=linear.bias is not None, has_fp16_weights=False)
            else:
                quant_type = base.rsplit(" ", 1)[-1].lower()
                layer = bnb.nn.Linear4bit(
                    *shape, bias=linear.bias is not None, quant_type=quant_type, compute_dtype=torch.float32
                )
            layer.load_state_dict(linear.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer.to("cpu"))  # bitsandbytes quantizes here
    return model


def stored_bytes(t: torch.Tensor) -> int:
    """What `t` stores: a torchao tensor's inner tensors; bitsandbytes' packed bytes plus its
    quantization state (4-bit: block scales and code book; int8: the row scales)."""
    if type(t).__module__.startswith("torchao"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    size = t.numel() * t.element_size()
    if (state := getattr(t, "quant_state", None)) is not None:
        size += sum(v.numel() * v.element_size() for v in state.as_dict().values() if torch.is_tensor(v))
    if (scales := getattr(t, "SCB", None)) is not None:
        size += scales.numel() * scales.element_size()
    return size


def memory(model: nn.Module) -> tuple[int, int]:
    """(bytes of the whole model, bytes of the decoder layers' projections), shared tensors once."""
    seen: dict[int, tuple[str, torch.Tensor]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        seen.setdefault(id(t), (name, t))
    total = sum(stored_bytes(t) for _, t in seen.values())
    projections = sum(stored_bytes(t) for n, t in seen.values() if n.rsplit(".", 2)[-2] in PROJECTIONS)
    return total, projections


def bases() -> list[str]:
    found = ["float32"]
    if installed("torchao"):
        found += ["torchao int8", "torchao int4"]
    if installed("bitsandbytes"):
        found += ["bitsandbytes NF4", "bitsandbytes FP4", "bitsandbytes int8"]
    return found


def training_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def methods(base: str, layers: int, rank: int, ids: torch.Tensor) -> dict[str, Callable[[], None]]:
    model = quantize(smollm2(layers), base)
    loratrf.inject(model, targets=[TARGETS], rank=rank, alpha=ALPHA)
    found = {f"loratrf on {base}": training_step(model, ids)}
    if installed("peft"):
        import peft

        config = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=list(PROJECTIONS), lora_dropout=0.0)
        found[f"PEFT {version('peft')} on {base}"] = training_step(
            peft.get_peft_model(quantize(smollm2(layers), base), config), ids
        )
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers in the timed model (of 30)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="peft|bitsandbytes|torchao")  # PEFT: no requantization recipe

    print("SmolLM2-135M (random weights, 30 layers): stored bytes")
    print(f"{'base':<20} {'model MB':>9} {'projections MB':>15} {'vs float32':>10}")
    float_total = None
    for base in bases():
        total, projections = memory(quantize(smollm2(), base))
        float_total = float_total or total
        print(f"{base:<20} {total / 1e6:9.1f} {projections / 1e6:15.1f} {total / float_total:10.2f}")

    ids = torch.randint(0, SMOLLM2["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    timed: dict[str, Callable[[], None]] = {}
    for base in bases():
        timed.update(methods(base, args.layers, args.rank, ids))
    baseline = "loratrf on float32"
    results = interleaved(timed, baseline, args.rounds)
    print(
        f"\nOne training step, SmolLM2 widths, {args.layers} decoder layers, batch {args.batch} x {args.seq} tokens, "
        f"LoRA rank {args.rank} on all 7 projections; {args.rounds} interleaved rounds; {cpu_model()}, "
        f"{torch.get_num_threads()} torch threads; a shared machine: other processes ran"
    )
    print(f"{'method':<36} {'median s':>9} {'(25-75%)':>17} {'vs float32':>19} {'PEFT / loratrf':>19}")
    for name, timing in results.items():
        lo, hi = timing.time_iqr
        rlo, rhi = timing.ratio_iqr
        line = f"{name:<36} {timing.median:9.3f} {f'({lo:.3f}-{hi:.3f})':>17} "
        line += f"{f'{timing.ratio:.2f} ({rlo:.2f}-{rhi:.2f})':>19}"
        if name.startswith("PEFT"):
            ours = results["loratrf on " + name.split(" on ", 1)[1]]
            ratios = [p / o for p, o in zip(timing.times, ours.times)]
            qlo, qhi = quartiles(ratios)
            line += f" {f'{statistics.median(ratios):.2f} ({qlo:.2f}-{qhi:.2f})':>19}"
        print(line)


if __name__ == "__main__":
    main()
