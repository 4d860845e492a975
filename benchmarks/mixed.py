"""One adapter per row of a batch: loratrf's `use_adapters` beside PEFT's `adapter_names=`.

    python benchmarks/mixed.py [--rounds 20] [--threads N] [--shape 16 128 768] [--layers 4] [--rank 8]

Inference (no grad, unmerged) of a stack of `--layers` blocks `Linear(d, 4d) -> GELU ->
Linear(4d, d)`, LoRA of rank 8 on every Linear for each of 4 adapters with trained (non-zero)
factors, on `x [batch, seq, d]` whose rows cycle through the 4 adapters. Beside them: the frozen
stack (the baseline every ratio is against) and loratrf with one adapter for the whole batch.
Methods run interleaved (`timing.interleaved`); printed per method: tokens per second at the
median time, the median ratio to the frozen stack in the same round with its 25th-75th
percentiles, and the CPU model and torch's thread count. Needs PEFT for its rows.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import loratrf
from cases import ALPHA, forward_only, installed, trained, version
from timing import cpu_model, interleaved, layer_arguments

ADAPTERS = ("task0", "task1", "task2", "task3")  # PEFT warns of names inside its "lora_" prefix


def stack(d: int, layers: int) -> nn.Sequential:
    blocks = [nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)) for _ in range(layers)]
    return nn.Sequential(*blocks).eval().requires_grad_(False)


def loratrf_model(base: nn.Module, rank: int) -> nn.Module:
    model = copy.deepcopy(base)
    for name in ADAPTERS:
        loratrf.inject(model, targets=[r".*\.(0|2)"], rank=rank, alpha=ALPHA, adapter=name)
    trained(*(p for n, p in model.named_parameters() if n.endswith(".V")))
    return model


def peft_model(base: nn.Module, rank: int) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=r".*\.(0|2)")
    model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, config)
    trained(*(p for n, p in model.named_parameters() if ".lora_B." in n))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = layer_arguments(__doc__, rounds=20, shape=(16, 128, 768))
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, seq, d = args.shape
    base = stack(d, args.layers)
    x = torch.randn(batch, seq, d)
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]
    ours = loratrf_model(base, args.rank)

    def mixed() -> None:
        with loratrf.use_adapters(ours, names):
            forward_only(ours, x)()

    steps = {"frozen stack": forward_only(base, x), "loratrf, one adapter": forward_only(ours, x)}
    steps["loratrf use_adapters, 4 adapters"] = mixed
    if installed("peft"):
        theirs = peft_model(base, args.rank)
        steps[f"PEFT {version('peft')} adapter_names, 4 adapters"] = forward_only(
            lambda t: theirs(t, adapter_names=names), x
        )
    results = interleaved(steps, "frozen stack", args.rounds, warmup=2)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(
        f"x {list(x.shape)}, {args.layers} blocks Linear({d}, {4 * d}) -> GELU -> Linear({4 * d}, {d}), "
        f"rank {args.rank} on each Linear, rows cycling over {len(ADAPTERS)} adapters, no grad, {args.rounds} rounds"
    )
    print(f"{'method':<40} {'tokens/s':>10} {'ratio to frozen':>16} {'p25-p75':>12}")
    for name, timing in results.items():
        low, high = timing.ratio_iqr
        print(f"{name:<40} {batch * seq / timing.median:>10,.0f} {timing.ratio:>15.3f}x {low:>6.3f}-{high:<5.3f}")


if __name__ == "__main__":
    main()
