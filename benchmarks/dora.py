"""DoRA beside LoRA, loratrf's and PEFT's, against a frozen nn.Linear.

    python benchmarks/dora.py [--rounds 30] [--threads N] [--shape 8 512 768] [--rank 8]

One forward and backward (the input's gradient included, as inside a network) of each layer
on `x [8, 512, 768]`, a 768 -> 768 layer with bias, rank 8, every adapter holding trained
(non-zero) values. The layers run interleaved: every round runs each once, in an order that
rotates, and each layer's time is divided by the frozen nn.Linear's in the same round, so slow
phases of a shared machine hit all alike. Printed: per layer the median of those ratios and
their 25th-75th percentiles, the median time, and the CPU model and torch's thread count.
Needs PEFT (`pip install -e ".[bench]"`); without it only loratrf's layers run.
"""

from __future__ import annotations

import copy
import statistics

import torch
from torch import nn

from cases import ALPHA, forward_backward, installed, trained, version
from loratrf import LoRALinear
from timing import cpu_model, interleaved, layer_arguments, quartiles


def layers(base: nn.Linear, rank: int) -> dict[str, nn.Module]:
    """The frozen `base` and LoRA / DoRA layers over copies of it, loratrf's and PEFT's, with
    B away from zero and m away from the row norms of W0 (as after some training)."""
    found: dict[str, nn.Module] = {"nn.Linear (frozen)": base}
    for name, dora in (("loratrf LoRA", False), ("loratrf DoRA", True)):
        layer = LoRALinear.from_linear(copy.deepcopy(base), rank, ALPHA, dora=dora)
        trained(layer.lora.V)
        if dora:
            with torch.no_grad():
                layer.magnitude.add_(torch.randn_like(layer.magnitude) * 0.02)
        found[name] = layer
    if installed("peft"):
        import peft

        for name, dora in ((f"PEFT {version('peft')} LoRA", False), (f"PEFT {version('peft')} DoRA", True)):
            holder = nn.Module()
            holder.layer = copy.deepcopy(base)
            config = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=["layer"], use_dora=dora)
            peft.inject_adapter_in_model(config, holder)
            layer = holder.layer
            trained(layer.lora_B["default"].weight)
            if dora:
                with torch.no_grad():
                    magnitude = layer.lora_magnitude_vector["default"].weight
                    magnitude.add_(torch.randn_like(magnitude) * 0.02)
            found[name] = layer
    for layer in found.values():
        layer.train()
    return found


def main(argv: list[str] | None = None) -> None:
    parser = layer_arguments(__doc__, rounds=30, shape=(8, 512, 768))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, seq, d = args.shape
    base = nn.Linear(d, d).requires_grad_(False)
    x = torch.randn(batch, seq, d, requires_grad=True)
    grad = torch.randn(batch, seq, d)
    found = layers(base, args.rank)
    steps = {name: forward_backward(layer, x, grad, layer.parameters()) for name, layer in found.items()}
    results = interleaved(steps, "nn.Linear (frozen)", args.rounds, warmup=3)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"x {list(x.shape)}, {d} -> {d} with bias, rank {args.rank}, forward + backward, {args.rounds} rounds")
    print(f"{'layer':<22} {'median ratio':>12} {'p25-p75':>13} {'median time':>12}")
    for name, timing in results.items():
        low, high = timing.ratio_iqr
        print(f"{name:<22} {timing.ratio:>11.2f}x {low:>6.2f}-{high:<5.2f}  {1e3 * timing.median:>9.1f} ms")
    peft_dora = [n for n in results if n.startswith("PEFT") and n.endswith("DoRA")]
    pairs = [("loratrf DoRA", "loratrf LoRA")] + [(n, n.replace("DoRA", "LoRA")) for n in peft_dora]
    pairs += [("loratrf DoRA", n) for n in peft_dora]
    for a, b in pairs:
        per_round = [t / u for t, u in zip(results[a].times, results[b].times)]
        low, high = quartiles(per_round)
        print(f"{a} / {b}: median {statistics.median(per_round):.2f}x (p25-p75 {low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
