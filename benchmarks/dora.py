"""DoRA beside LoRA, loratrf's and PEFT's, against a frozen nn.Linear (self-contained).

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

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import statistics
import subprocess
import time

import torch
from torch import nn

from loratrf import LoRALinear

ALPHA = 16.0


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


@torch.no_grad()
def trained(*tensors: torch.Tensor) -> None:
    """Adapter factors as after some training (B away from zero, m away from ‖W0‖)."""
    for t in tensors:
        t.add_(torch.randn_like(t) * 0.02)


def layers(base: nn.Linear, rank: int) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {"nn.Linear (frozen)": base}
    for name, dora in (("loratrf LoRA", False), ("loratrf DoRA", True)):
        layer = LoRALinear.from_linear(copy.deepcopy(base), rank, ALPHA, dora=dora)
        trained(layer.lora.V, *([layer.magnitude] if dora else []))
        found[name] = layer
    if importlib.util.find_spec("peft") is not None:
        import peft

        version = importlib.metadata.version("peft")
        for name, dora in ((f"PEFT {version} LoRA", False), (f"PEFT {version} DoRA", True)):
            holder = nn.Module()
            holder.layer = copy.deepcopy(base)
            config = peft.LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=["layer"], use_dora=dora)
            peft.inject_adapter_in_model(config, holder)
            layer = holder.layer
            trained(layer.lora_B["default"].weight)
            if dora:
                trained(layer.lora_magnitude_vector["default"].weight)
            found[name] = layer
    for layer in found.values():
        layer.train()
    return found


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    params = [p for p in layer.parameters() if p.requires_grad]

    def run() -> None:
        layer(x).backward(grad)
        x.grad = None
        for p in params:
            p.grad = None

    return run


def interleaved(runs: dict, baseline: str, rounds: int, warmup: int = 3) -> dict[str, tuple[list, list]]:
    """`name -> (times, ratios to the baseline's time in the same round)`."""
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {name: (ts, [t / b for t, b in zip(ts, times[baseline])]) for name, ts in times.items()}


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--shape", type=int, nargs=3, default=[8, 512, 768], metavar=("BATCH", "SEQ", "D"))
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, seq, d = args.shape
    base = nn.Linear(d, d).requires_grad_(False)
    x = torch.randn(batch, seq, d, requires_grad=True)
    grad = torch.randn(batch, seq, d)
    found = layers(base, args.rank)
    baseline = "nn.Linear (frozen)"
    results = interleaved({name: step(layer, x, grad) for name, layer in found.items()}, baseline, args.rounds)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"x {list(x.shape)}, {d} -> {d} with bias, rank {args.rank}, forward + backward, {args.rounds} rounds")
    print(f"{'layer':<22} {'median ratio':>12} {'p25-p75':>13} {'median time':>12}")
    for name, (times, ratios) in results.items():
        low, high = quartiles(ratios)
        print(
            f"{name:<22} {statistics.median(ratios):>11.2f}x {low:>6.2f}-{high:<5.2f}  "
            f"{1e3 * statistics.median(times):>9.1f} ms"
        )
    names = list(results)
    pairs = [("loratrf DoRA", "loratrf LoRA")] + [
        (n, n.replace("DoRA", "LoRA")) for n in names if n.startswith("PEFT") and n.endswith("DoRA")
    ]
    pairs += [("loratrf DoRA", n) for n in names if n.startswith("PEFT") and n.endswith("DoRA")]
    for a, b in pairs:
        per_round = [t / u for t, u in zip(results[a][0], results[b][0])]
        low, high = quartiles(per_round)
        print(f"{a} / {b}: median {statistics.median(per_round):.2f}x (p25-p75 {low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
