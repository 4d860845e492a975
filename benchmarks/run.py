"""Measure loratrf's LoRALinear and TaskAwareFilter beside PEFT and loralib; write the report.

    python benchmarks/run.py                  # full run (a few minutes on 2 cores)
    python benchmarks/run.py --quick --out /tmp/b.md --plot /tmp/b.png   # tiny shapes, smoke test

Writes `docs/benchmarks.md` (tables, the method, the goals) and `docs/benchmarks.png`.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cases
from timing import Timing, interleaved, keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Shape:
    """The sizes of one full or quick run."""

    lora_dims: tuple[int, ...] = (768, 2048)
    batch: int = 8
    lora_seq: int = 512
    rank: int = 8
    filter_dim: int = 768
    ffn: int = 3072
    filter_seqs: tuple[int, ...] = (128, 512)
    encoder_layers: int = 4
    encoder_seq: int = 128
    rounds: int = 15
    clock: str = "wall"
    malloc: str = "keep"  # "keep": glibc keeps freed memory (see timing.keep_freed_memory)


QUICK = Shape(
    lora_dims=(48,),
    batch=2,
    lora_seq=16,
    filter_dim=48,
    ffn=96,
    filter_seqs=(8,),
    encoder_layers=2,
    encoder_seq=8,
    rounds=3,
)


@dataclass
class Row:
    case: str  # the shape, e.g. "x=[8,512,768]"
    method: str
    timing: Timing | None = None
    value: float | None = None  # for rows without timing (saved memory)
    limit: float | None = None  # the FLOP limit for this case


@dataclass
class Table:
    key: str
    title: str
    unit: str  # "ratio" or "percent"
    baseline: str
    rows: list[Row] = field(default_factory=list)


def lora_tables(shape: Shape) -> list[Table]:
    fb = Table(
        "lora_fb", "LoRALinear unmerged, forward + backward (input requires grad)", "ratio", "nn.Linear (frozen)"
    )
    fwd = Table("lora_fwd", "LoRALinear unmerged, forward only (no grad)", "ratio", "nn.Linear (frozen)")
    merged = Table("lora_merged", "LoRALinear merged, forward only (eval, no grad)", "ratio", "nn.Linear (frozen)")
    saved = Table("lora_saved", "LoRALinear, memory saved for backward (over |x|)", "saved", "")
    for d in shape.lora_dims:
        torch.manual_seed(0)
        base = torch.nn.Linear(d, d).requires_grad_(False)
        x = torch.randn(shape.batch, shape.lora_seq, d, requires_grad=True)
        grad = torch.randn_like(x)
        layers = cases.lora_layers(base, shape.rank)
        case = f"x=[{shape.batch},{shape.lora_seq},{d}], {d}->{d}, r={shape.rank}"
        steps = {name: cases.forward_backward(m, x, grad, m.parameters()) for name, m in layers.items()}
        add_rows(
            fb,
            case,
            interleaved(steps, fb.baseline, shape.rounds, clock=shape.clock),
            cases.lora_flop_limit(d, d, shape.rank, True),
        )
        steps = {name: cases.forward_only(m, x) for name, m in layers.items()}
        add_rows(
            fwd,
            case,
            interleaved(steps, fwd.baseline, shape.rounds, clock=shape.clock),
            cases.lora_flop_limit(d, d, shape.rank, False),
        )
        for name, m in layers.items():
            params = tuple(m.parameters())
            nbytes = cases.saved_bytes(lambda m=m: m(x), exclude=params)
            saved.rows.append(Row(case, name, value=nbytes / x.untyped_storage().nbytes()))
        for m in layers.values():
            cases.merge_layer(m)
        steps = {name: cases.forward_only(m, x) for name, m in layers.items() if "plain" not in name}
        add_rows(merged, case, interleaved(steps, merged.baseline, shape.rounds, clock=shape.clock), 1.0)
    return [fb, fwd, merged, saved]


def filter_tables(shape: Shape) -> list[Table]:
    d = shape.filter_dim
    layer_name = f"TransformerEncoderLayer (d={d}, FFN {shape.ffn})"
    cost = Table("filter_fb", "TaskAwareFilter forward + backward, % of one encoder layer's", "percent", layer_name)
    saved = Table("filter_saved", "TaskAwareFilter, memory saved for backward (over |h|)", "saved", "")
    for seq in shape.filter_seqs:
        torch.manual_seed(0)
        layer = cases.encoder_layer(d, shape.ffn)
        f, variants = cases.filters(d, shape.rank)
        x = torch.randn(shape.batch, seq, d, requires_grad=True)
        h = torch.randn(shape.batch, seq, d, requires_grad=True)
        grad = torch.randn_like(h)
        tokens = shape.batch * seq
        case = f"h=[{shape.batch},{seq},{d}], r={shape.rank}"
        steps = {layer_name: cases.forward_backward(layer, x, grad, layer.parameters())}
        steps |= {name: cases.forward_backward(fn, h, grad, f.parameters()) for name, fn in variants.items()}
        limit = 100 * cases.filter_flops(tokens, d, shape.rank) / cases.encoder_layer_flops(tokens, seq, d, shape.ffn)
        add_rows(cost, case, interleaved(steps, layer_name, shape.rounds, clock=shape.clock), limit)
        for name, fn in variants.items():
            nbytes = cases.saved_bytes(lambda fn=fn: fn(h), exclude=tuple(f.parameters()))
            saved.rows.append(Row(case, name, value=nbytes / h.untyped_storage().nbytes()))
    return [cost, saved]


def encoder_table(shape: Shape) -> Table:
    d, seq, n = shape.filter_dim, shape.encoder_seq, shape.encoder_layers
    table = Table(
        "encoder_step",
        f"{n}-layer encoder training step (AdamW), LoRA r={shape.rank} on the FFN",
        "ratio",
        "loratrf LoRA",
    )
    models = cases.encoder_models(n, d, shape.ffn, shape.rank)
    x = torch.randn(shape.batch, seq, d)
    steps = {name: cases.training_step(model, x) for name, model in models.items()}
    tokens = shape.batch * seq
    step_flops = n * 2 * cases.encoder_layer_flops(tokens, seq, d, shape.ffn) / 3  # frozen base: backward = forward
    limit = 1 + n * cases.filter_flops(tokens, d, shape.rank) / step_flops
    add_rows(
        table,
        f"x=[{shape.batch},{seq},{d}], {n} layers",
        interleaved(steps, table.baseline, shape.rounds, clock=shape.clock),
        limit,
    )
    return table


def add_rows(table: Table, case: str, timings: dict[str, Timing], limit: float) -> None:
    for name, timing in timings.items():
        table.rows.append(Row(case, name, timing, limit=limit))


# --- the report ---------------------------------------------------------------------------

METHOD = """\
## How these figures are made

- **One process, interleaved.** For each shape, every method (the baseline included) runs
  once per round, the order rotating from round to round, after two warm-up calls each; garbage
  collection is off while timing. A figure is the **median over rounds of the method's time
  divided by the baseline's time in the same round**, so a slow phase of a shared machine
  lands on all methods alike. `p25–p75` is the interquartile range of those per-round ratios;
  `time` is the method's own median wall time.
- **Threads and clock.** `torch.set_num_threads({threads})`, {clock} time, float32, CPU. (With
  `--clock cpu` the process's CPU time is counted instead of wall time; with one thread it
  leaves out the time spent waiting for a core on a busy machine.)
- **Memory allocator.** {malloc}
- **Same work for everyone.** All LoRA layers wrap copies of one frozen `nn.Linear`; adapter
  factors are non-zero (as after training). Forward + backward means `layer(x).backward(g)`
  with `x.requires_grad=True` (so the input's gradient is computed, as inside a network) and
  the adapter's gradients reset each call. *loratrf, plain formula* is loratrf's layer forced
  onto its plain path (base `F.linear`, then one `addmm_` of the update, differentiated by
  autograd): the "ten-line addmm version".
- **FLOP limit.** What the arithmetic alone allows: FLOPs of the method over FLOPs of the
  baseline (formulas in `benchmarks/cases.py`). LoRA forward + backward:
  `1 + 1.5 r (in + out) / (in · out)`; forward: `1 + r (in + out) / (in · out)`. The filter:
  `2 N d (5r + 6)` FLOPs against the encoder layer's matmuls (`3 x` the forward, weights
  trainable). Rank-`r` products and elementwise passes are memory-bound, so the limit is not
  reachable; it shows how much of each overhead is arithmetic and how much is memory traffic.
- **Saved for backward.** Bytes of the tensors autograd keeps (counted with
  `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters not counted), over
  the bytes of the layer's input.
- **Encoder step.** `nn.TransformerEncoder` (d={d}, 12 heads, FFN {ffn}, dropout 0), LoRA
  (r={rank}) on every `linear1`/`linear2` via `loratrf.inject`, AdamW over the trainable
  parameters, loss `mean(out²)`; with filters, one `TaskAwareFilter` on every layer's output.
"""

MALLOC = {
    "keep": (
        "glibc's malloc is told to keep freed memory for reuse (`mallopt`: no `mmap` for large "
        "blocks, no trimming), as jemalloc or tcmalloc would, for every method alike. Otherwise "
        "a fresh large tensor is page-faulted in anew whenever glibc's trim heuristics release "
        "it: on these VMs that costs ~1.5-3 µs per 4 KiB page (80% of an elementwise op on a "
        "32 MiB tensor) and makes timings bimodal. `--malloc default` measures without it."
    ),
    "default": (
        "glibc's default malloc: tensors of 32 MiB and more, and others whenever glibc trims "
        "its heap, are page-faulted in anew on each allocation, and that time is included."
    ),
}

DESIGN = """\
## Why loratrf is fast here

`LoRALinear` and `TaskAwareFilter` run hand-written forward and backward passes
(`loratrf/fused.py`) for float32/float64 (bfloat16/float16 weights, autocast and adapter
dropout run the plain formula):

- **Rank-r products.** Each runs once, through oneDNN's linear where torch has it (eager
  float32 on CPU: 2-4x faster than MKL's `sgemm` for `[N, d] x [d, 8]` shapes on this CPU),
  else through `F.linear` with the factor stored row-major `[r, d]` (`x @ U` and `xᵀ @ gz`
  run up to 5x slower than `F.linear(x, Uᵀ)` and `(gzᵀ x)ᵀ` on MKL).
- **LoRA.** When the activations outweigh the weight (`N (in + out) >= 4 in · out`), the
  update is folded into an effective weight `W0 + scale · B A` for the two large products
  (the forward and the input's gradient), so neither the output nor the input's gradient is
  read and written a second time to add the update; `W_eff` is formed again in backward
  rather than kept. Backward keeps `x` and `z = x U [N, r]` only. The large products are
  the same `F.linear`/`mm` calls `nn.Linear` makes, so the ratio measures the adapter alone.
- **Filter.** `h U` and `h · t` come from one product `h [U | t]`, `|h|` from one reduction,
  the output from one rank-`r` product added onto `h`; backward keeps `h` plus `[N, r + 2]`
  numbers, forms `h`'s gradient as one `addcmul` (the `|h|` term) plus one rank-`(r+1)`
  update, and `U`'s and `t`'s gradients from one product `[s ⊙ gz | g_c]ᵀ h`. Forward and
  backward allocate one `[N, d]` tensor each: the output and the input's gradient.

Both are tested equal to the paper's formulas (values and gradients, float64, and
`torch.autograd.gradcheck`; float32 with both kernels).
"""


def fmt_ratio(table: Table, value: float) -> str:
    return f"{value:.2f} %" if table.unit == "percent" else f"{value:.3f}x"


def scaled(table: Table, value: float) -> float:
    return 100 * value if table.unit == "percent" else value


def render_table(table: Table) -> list[str]:
    lines = [f"### {table.title}", ""]
    if table.unit == "saved":
        lines += ["| shape | method | saved / input |", "|---|---|---|"]
        lines += [f"| {r.case} | {r.method} | {r.value:.3f}x |" for r in table.rows]
        return lines + [""]
    against = "% of baseline" if table.unit == "percent" else "ratio"
    lines += [
        f"Baseline: {table.baseline}.",
        "",
        f"| shape | method | time (median) | {against} (median) | p25–p75 | FLOP limit |",
        "|---|---|---|---|---|---|",
    ]
    for r in table.rows:
        lo, hi = (scaled(table, v) for v in r.timing.ratio_iqr)
        ratio = scaled(table, r.timing.ratio)
        limit = "" if r.method == table.baseline else fmt_ratio(table, r.limit)
        lines.append(
            f"| {r.case} | {r.method} | {1e3 * r.timing.median:.2f} ms | {fmt_ratio(table, ratio)} "
            f"| {lo:.3f}–{hi:.3f} | {limit} |"
        )
    return lines + [""]


def goals(tables: dict[str, Table]) -> list[str]:
    """The issue's goals, each with its measured figure (median ratios)."""
    lines = ["## Goals", "", "| goal | shape | measured | met |", "|---|---|---|---|"]

    def row(goal: str, case: str, measured: str, met: bool) -> None:
        lines.append(f"| {goal} | {case} | {measured} | {'yes' if met else 'no'} |")

    def ratios(key: str) -> dict[tuple[str, str], float]:
        return {(r.case, r.method): r.timing.ratio for r in tables[key].rows}

    fb, fwd, merged = ratios("lora_fb"), ratios("lora_fwd"), ratios("lora_merged")
    for case in dict.fromkeys(c for c, _ in fb):
        ours = fb[(case, "loratrf")]
        row("LoRA fwd+bwd <= 1.10x nn.Linear", case, f"{ours:.3f}x", ours <= 1.10)
        others = {m: v for (c, m), v in fb.items() if c == case and m.startswith(("PEFT", "loralib"))}
        if others:
            best = min(others.values())
            text = ", ".join(f"{m} {v:.3f}x" for m, v in others.items())
            row("LoRA fwd+bwd below PEFT and loralib", case, f"{ours:.3f}x vs {text}", ours < best)
        row("LoRA forward <= 1.04x", case, f"{fwd[(case, 'loratrf')]:.3f}x", fwd[(case, "loratrf")] <= 1.04)
        m = merged[(case, "loratrf")]
        row("LoRA merged 1.00x (within 0.02)", case, f"{m:.3f}x", abs(m - 1) <= 0.02)
    cost = ratios("filter_fb")
    saved = {(r.case, r.method): r.value for r in tables["filter_saved"].rows}
    for case in dict.fromkeys(c for c, _ in cost):
        pct = 100 * cost[(case, "loratrf")]
        row("filter fwd+bwd <= 1.0% of an encoder layer", case, f"{pct:.2f} %", pct <= 1.0)
        kept = saved[(case, "loratrf")]
        row("filter saves <= 1.05x |h|", case, f"{kept:.3f}x", kept <= 1.05)
    step = tables["encoder_step"].rows
    with_filters = next(r for r in step if r.method == "loratrf LoRA + filters")
    row(
        "encoder step with filters <= 1.02x LoRA only",
        with_filters.case,
        f"{with_filters.timing.ratio:.3f}x",
        with_filters.timing.ratio <= 1.02,
    )
    return lines + [""]


def environment(threads: int, clock: str, malloc: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    libs = ", ".join(
        f"{p} {cases.version(p)}" if cases.installed(p) else f"{p} not installed" for p in ("peft", "loralib")
    )
    return (
        f"Generated by `make bench` on {datetime.date.today().isoformat()}: {cpu}, "
        f"{threads} threads, {clock} time, {malloc} malloc, torch {torch.__version__}, Python {platform.python_version()}, {libs}."
    )


def write_report(tables: list[Table], shape: Shape, threads: int, out: Path, plot: Path | None, notes: str) -> None:
    by_key = {t.key: t for t in tables}
    lines = ["# Benchmarks", "", environment(threads, shape.clock, shape.malloc), ""]
    if notes:
        lines += [notes, ""]
    lines += goals(by_key)
    if plot is not None:
        lines += [f"![overhead per shape and method]({plot.name})", ""]
    else:
        lines += ["(No plot: matplotlib is not installed; `make bench` installs it.)", ""]
    lines += ["## Results", ""]
    for table in tables:
        lines += render_table(table)
    malloc = MALLOC[shape.malloc]
    lines += [
        METHOD.format(
            threads=threads, clock=shape.clock, malloc=malloc, d=shape.filter_dim, ffn=shape.ffn, rank=shape.rank
        ),
        DESIGN,
    ]
    out.write_text("\n".join(lines))


def draw(tables: list[Table], path: Path) -> bool:
    """Bars of each method's median ratio per shape, the FLOP limit as a black tick."""
    if not cases.installed("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [t for t in tables if t.unit != "saved" and t.key != "lora_merged"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, table in zip(axes.flat, panels):
        shapes = list(dict.fromkeys(r.case for r in table.rows))
        methods = [m for m in dict.fromkeys(r.method for r in table.rows) if m != table.baseline]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            rows = [next(r for r in table.rows if r.case == c and r.method == method) for c in shapes]
            values = [scaled(table, r.timing.ratio) for r in rows]
            lo = [v - scaled(table, r.timing.ratio_iqr[0]) for v, r in zip(values, rows)]
            hi = [scaled(table, r.timing.ratio_iqr[1]) - v for v, r in zip(values, rows)]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(shapes))]
            ax.bar(xs, values, width, label=method, yerr=[lo, hi], capsize=2)
        for j, case in enumerate(shapes):
            limit = next(r.limit for r in table.rows if r.case == case and r.method != table.baseline)
            ax.hlines(limit, j - 0.45, j + 0.45, colors="black", linewidth=2, label="FLOP limit" if j == 0 else None)
        if table.unit == "percent":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="goal: 1 %")
            ax.set_ylabel("% of one encoder layer's time")
        else:
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_ylabel(f"time / {table.baseline}")
            top = max(scaled(table, r.timing.ratio) for r in table.rows)
            ax.set_ylim(0.9, max(1.1, top * 1.05))
        ax.set_xticks(range(len(shapes)), [c.split("], ")[0] + "]" for c in shapes], fontsize=8)
        ax.set_title(table.title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds: checks that everything runs")
    parser.add_argument("--rounds", type=int, help="timed rounds per shape (default 15)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time (use with --threads 1 on a busy machine)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "benchmarks.png")
    parser.add_argument(
        "--malloc",
        choices=["keep", "default"],
        default="keep",
        help="keep: glibc keeps freed memory (no fresh page faults)",
    )
    parser.add_argument("--notes", default="", help="a paragraph to put at the top of the report")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else Shape()
    if args.rounds:
        shape.rounds = args.rounds
    shape.clock = args.clock
    shape.malloc = "keep" if args.malloc == "keep" and keep_freed_memory() else "default"
    torch.set_num_threads(args.threads)
    tables = []
    for part in (lora_tables, filter_tables):
        tables += part(shape)
        print(f"{part.__name__} done", file=sys.stderr)
    tables.append(encoder_table(shape))
    plot = args.plot if draw(tables, args.plot) else None
    write_report(tables, shape, args.threads, args.out, plot, args.notes)
    print(f"wrote {args.out}" + (f" and {plot}" if plot else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
