"""Results as Markdown tables, PNG plots and plain-spoken findings, from a grid's `results.json`.

`python -m loratrf.experiments report results/<run>/results.json` regenerates docs/results.md
(and its figures) from any results file, so a larger grid run later replaces the page whole.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

from loratrf.experiments.data import TASKS
from loratrf.experiments.gate_picture import draw_study
from loratrf.experiments.gate_stats import gate_lines
from loratrf.experiments.grid import PAPER_LORA, PAPER_LORATRF, aggregate
from loratrf.experiments.methods import Method
from loratrf.experiments.packages import require


def percent(figure: tuple[float, float | None]) -> str:
    """`(mean, std)` of an accuracy as `81.2 ± 0.4` (points), or `81.2` for a single seed."""
    mean, std = figure
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def table(study: Mapping, agg: Mapping) -> list[str]:
    """One Markdown table per task of the study: a row per method, then the majority class."""
    lines: list[str] = []
    for task in study["tasks"]:
        rows = [(m, agg[m, task]) for m in study["methods"] if (m, task) in agg]
        if not rows:
            continue
        sources = list(rows[0][1]["test"])
        head = ["method", "lr", "LoRA", "filters", "head/other", "trainable", "seeds", "dev acc"]
        head += [f"test acc ({s})" for s in sources] + ["train time"]
        if len(study["tasks"]) > 1:
            lines.append(f"*{task}: {TASKS[task].description}*\n")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, a in rows:
            p, m = a["params"], Method.parse(method)
            seconds, _ = a["train_seconds"]
            cells = [m.title, f"{m.learning_rate:g}", f"{p['lora']:,}", f"{p['filter']:,}", f"{p['other']:,}"]
            cells += [f"{p['trainable']:,}", str(a["n"]), percent(a["dev"])]
            cells += [percent(a["test"][s]) for s in sources] + [f"{seconds:.0f} s"]
            lines.append("| " + " | ".join(cells) + " |")
        majority = rows[0][1]["majority"]
        lines.append("| majority class |" + " |" * 7 + "".join(f" {100 * majority[s]:.1f} |" for s in sources) + " |")
        lines.append("")
    return lines


def noise(p: float, n: int) -> float:
    """Standard error (points) of the difference of two independent accuracies near `p` on `n`
    sentences: `100 sqrt(2 p (1 - p) / n)`."""
    return 100 * math.sqrt(2 * p * (1 - p) / n) if n else float("nan")


def gap_text(a: Mapping, b: Mapping, source: str) -> str:
    """`a - b` on `source`'s test set in points, against a noise band of two standard errors
    (`gap_and_band`)."""
    gap, band = gap_and_band(a, b, source)
    verdict = "within noise" if abs(gap) < band else ("better" if gap > 0 else "worse")
    return f"{gap:+.1f} points ({verdict}: noise band ±{band:.1f})"


def gap_and_band(a: Mapping, b: Mapping, source: str) -> tuple[float, float]:
    """`a - b` on `source`'s test set and its noise band (two standard errors), both in points.

    The test-set error is paired (the same sentences): the standard deviation over sentences of
    the difference in correctness, over sqrt(n); without per-sentence results, the unpaired
    `noise`. With several seeds, the seeds' standard error of the difference of the means adds
    in quadrature.
    """
    (mean_a, std_a), (mean_b, std_b) = a["test"][source], b["test"][source]
    ca, cb = a["correct"].get(source), b["correct"].get(source)
    if ca is not None and cb is not None and len(ca) == len(cb) > 1:
        d = [x - y for x, y in zip(ca, cb)]
        m = sum(d) / len(d)
        test_se = 100 * math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))
    else:
        test_se = noise((mean_a + mean_b) / 2, len(ca or cb or ()) or 1000)
    seed_se = 0.0
    if std_a is not None and std_b is not None:
        seed_se = 100 * math.sqrt(std_a**2 / a["n"] + std_b**2 / b["n"])
    return 100 * (mean_a - mean_b), 2 * math.hypot(test_se, seed_se)


def findings(name: str, study: Mapping, agg: Mapping) -> list[str]:
    """Each comparison that bears on one of the paper's claims, with its size against the noise."""
    out: list[str] = []

    def compare(claim: str, first: str, second: str, task: str, source: str | None = None) -> None:
        a, b = agg.get((first, task)), agg.get((second, task))
        if a is not None and b is not None:
            out.append(f"- {claim}: {gap_text(a, b, source or TASKS[task].tests[0])}")

    tasks = study["tasks"]
    if name == "rank":
        for method in study["methods"]:
            m = Method.parse(method)
            if m.kind == "loratrf":
                compare(f"LoRATRF minus LoRA at r={m.rank}", method, f"lora:all:r{m.rank}", tasks[0])
    elif name == "ablation":
        compare("adding filters to LoRA on v,f1,f2 (r=8)", PAPER_LORATRF, "lora:v,f1,f2:r8", tasks[0])
        compare("dot-product minus cosine filters", "loratrf:v,f1,f2:r8:dot", PAPER_LORATRF, tasks[0])
        compare("LoRATRF (v,f1,f2) minus the all-six LoRA baseline", PAPER_LORATRF, PAPER_LORA, tasks[0])
    elif name == "starts":
        for method in study["methods"]:
            if method != PAPER_LORATRF:
                compare(f"{Method.parse(method).title} minus the paper's form", method, PAPER_LORATRF, tasks[0])
    elif name == "module":
        ranked = sorted(
            (
                (agg[m, tasks[0]]["test"][TASKS[tasks[0]].tests[0]][0], m)
                for m in study["methods"]
                if (m, tasks[0]) in agg
            ),
            reverse=True,
        )
        if ranked:
            best = Method.parse(ranked[0][1])
            out.append(
                f"- best choice here: {','.join(best.matrices)} (r={best.rank}); order: "
                + " > ".join(",".join(Method.parse(m).matrices) for _, m in ranked)
            )
            compare(
                f"best ({','.join(best.matrices)}) minus the paper's v,f1,f2", ranked[0][1], PAPER_LORATRF, tasks[0]
            )
    else:
        for task in tasks:
            for source in TASKS[task].tests:
                where = f" on {task}" + (
                    f" ({source} test)" if source != TASKS[task].train or len(TASKS[task].tests) > 1 else ""
                )
                compare(f"LoRATRF minus LoRA{where}", PAPER_LORATRF, PAPER_LORA, task, source)
                compare(f"full fine-tuning minus LoRATRF{where}", "full", PAPER_LORATRF, task, source)
    return out


def plot(name: str, study: Mapping, agg: Mapping, path: Path) -> Path | None:
    """Test accuracy of the study's methods: over rank for the rank study, else grouped bars."""
    matplotlib = require("matplotlib", "matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    tasks = study["tasks"]
    if name == "rank":
        families: dict[str, list] = {}
        for method in study["methods"]:
            if (method, tasks[0]) not in agg:
                continue
            m = Method.parse(method)
            mean, std = agg[method, tasks[0]]["test"][TASKS[tasks[0]].tests[0]]
            families.setdefault(re.sub(r" r=\d+", "", m.title), []).append((m.rank, mean, std or 0.0))
        for label, points in families.items():
            points.sort()
            ax.errorbar(
                [p[0] for p in points],
                [100 * p[1] for p in points],
                yerr=[100 * p[2] for p in points],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({p[0] for ps in families.values() for p in ps}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("rank r")
    else:
        groups = [(t, s) for t in tasks for s in TASKS[t].tests]
        methods = [m for m in study["methods"] if any((m, t) in agg for t in tasks)]
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            xs, ys, es = [], [], []
            for g, (task, source) in enumerate(groups):
                if (method, task) in agg:
                    mean, std = agg[method, task]["test"][source]
                    xs.append(g + (i - (len(methods) - 1) / 2) * width)
                    ys.append(100 * mean)
                    es.append(100 * (std or 0.0))
            bars = ax.bar(xs, ys, width, yerr=es, capsize=2, label=Method.parse(method).title)
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
        _noise_bands(ax, methods, groups, agg)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([s if t in ("transfer",) or s == t else f"{t}: {s}" for t, s in groups])
        low = min((100 * agg[m, t]["test"][s][0] for m in methods for t, s in groups if (m, t) in agg), default=50)
        ax.set_ylim(max(0, math.floor(low / 5) * 5 - 5), 100)
    if not ax.has_data():
        plt.close(fig)
        return None
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(study["question"].split(":")[0].split("(")[0].strip(), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _noise_bands(ax, methods: list[str], groups: list[tuple[str, str]], agg: Mapping) -> None:
    """Shade, in each group of bars, the reference method's accuracy ± the widest noise band of
    its paired differences with the other methods there: a bar outside the shading differs from
    the reference by more than noise. The reference is the paper's LoRA where it ran, else the
    first method."""
    reference = PAPER_LORA if PAPER_LORA in methods else (methods[0] if methods else None)
    labelled = False
    for g, (task, source) in enumerate(groups):
        ref = agg.get((reference, task))
        others = [agg[m, task] for m in methods if m != reference and (m, task) in agg]
        if ref is None or not others:
            continue
        band = max(gap_and_band(other, ref, source)[1] for other in others)
        mean = 100 * ref["test"][source][0]
        label = None if labelled else f"noise band around {Method.parse(reference).title} (±{band:.1f})"
        ax.fill_between([g - 0.45, g + 0.45], mean - band, mean + band, color="grey", alpha=0.25, zorder=3, label=label)
        for y in (mean - band, mean + band):
            ax.plot([g - 0.45, g + 0.45], [y, y], color="black", linestyle="--", linewidth=0.7, zorder=3)
        labelled = True


def setup_lines(results: Mapping) -> list[str]:
    t, env = results["training"], results["environment"]
    runs = results["runs"]
    loads = [r["load_average"] for r in runs if r.get("load_average") is not None]
    lines = [
        f"- model: all-MiniLM-L6-v2 (6-layer BERT, hidden 384, {runs[0]['params']['base_total']:,} parameters) "
        "with a sequence-classification head (pooler + linear), which trains in every method"
        if runs
        else "",
        (
            f"- data per task: {t['train_size'] or 'all'} training sentences (fewer where a set is smaller), "
            f"{t['dev_size']} dev, {t['test_size']} test (fixed split); max length {t['max_length']} tokens"
        ),
        f"- training: {t['epochs']} epoch{'s' * (t['epochs'] != 1)}, batch {t['batch_size']}, "
        f"AdamW (weight decay {t['weight_decay']}), "
        f"linear schedule with {100 * t['warmup_ratio']:.0f}% warm-up, gradient clipping {t['max_grad_norm']}"
        + (f", at most {t['max_steps']} steps" if t["max_steps"] else ""),
        (
            f"- seeds: {', '.join(map(str, results['seeds']))}; figures are mean ± sample std over seeds "
            "(no ± for a single seed); accuracy on the final model (no early stopping)"
        ),
        f"- machine: {env['cpus']} CPUs, {env['threads']} torch thread(s), torch {env['torch']}, "
        f"transformers {env['transformers']}"
        + (f"; 1-minute load average during runs {min(loads):.1f} to {max(loads):.1f}" if loads else ""),
        *(f"- command: `{c}`" for c in results.get("commands") or [env["command"]]),
    ]
    return [line for line in lines if line]


def markdown(
    results: Mapping,
    figures: Mapping[str, Path | None],
    relative_to: Path,
    *,
    with_findings: bool,
    gate_pictures: tuple[Path, str] | None = None,
) -> list[str]:
    """The studies' sections; `gate_pictures = (folder, file-name prefix)` draws each filter
    method's gate picture there and adds its gate statistics (gate_stats.py)."""
    agg = aggregate(results["runs"])
    lines: list[str] = []
    for name, study in results["studies"].items():
        body = table(study, agg)
        if not body:
            continue
        lines += [f"### {name}", "", study["question"] + ".", ""] + body
        if figures.get(name):
            rel = Path(os.path.relpath(figures[name], relative_to))
            lines += [f"![{name}]({rel.as_posix()})", ""]
        if with_findings:
            found = findings(name, study, agg)
            if found:
                lines += found + [""]
        if gate_pictures is not None:
            folder, prefix = gate_pictures
            pictures = draw_study(results["runs"], list(study["methods"]), folder, prefix)
            lines += gate_lines(results["runs"], study["methods"], pictures, relative_to)
    return lines


def write_results(results: Mapping, folder: Path) -> tuple[Path, list[Path]]:
    """`folder/results.md` and `folder/plot-<study>.png`; returns their paths."""
    figures = {
        name: plot(name, study, aggregate(results["runs"]), folder / f"plot-{name}.png")
        for name, study in results["studies"].items()
    }
    page = ["# loratrf experiment results", ""] + setup_lines(results) + [""]
    page += markdown(results, figures, folder, with_findings=True, gate_pictures=(folder, ""))
    path = folder / "results.md"
    path.write_text("\n".join(page))
    return path, [p for p in figures.values() if p] + sorted(folder.glob("gates-*.png"))


def console_table(results: Mapping, study: str) -> str:
    """A plain table of one study for the terminal."""
    return "\n".join(table(results["studies"][study], aggregate(results["runs"])))


HOW_TO_RUN = [
    "## How to run",
    "",
    "    make demo                                   # the demo study: about 13 CPU-minutes",
    '    make demo ARGS="--seeds 0 1 2 --train-size 4000"   # longer: more seeds, more data (or --epochs)',
    "    .venv/bin/python -m loratrf.experiments list            # tasks, studies, method specs",
    "    .venv/bin/python -m loratrf.experiments grid --seeds 0 1 2 3 4 --out results/full   # every study",
    "    .venv/bin/python -m loratrf.experiments grid --study rank --ranks 4 8 --seeds 0 1 2   # part of a study",
    "    .venv/bin/python -m loratrf.experiments grid --methods lora:q,v:r8 loratrf:o,f1,f2:r4 --tasks trec nyt",
    "    .venv/bin/python -m loratrf.experiments report results/full/results.json   # rewrites this page",
    "",
    (
        "A grid writes `results.json` after every run and resumes an interrupted or extended grid in the "
        "same `--out` folder (the training settings must match). `--threads 1` (or `OMP_WAIT_POLICY=PASSIVE`, "
        "which `make demo` sets) keeps a busy machine from slowing training several-fold. `report` keeps the "
        "hand-written notes at the top of this page and regenerates everything else."
    ),
]

NOTES = ("<!-- notes: kept when the page is regenerated -->", "<!-- end of notes -->")


def kept_notes(page: Path) -> list[str]:
    """The hand-written block of an existing page (between the NOTES markers), else an empty one."""
    text = page.read_text() if page.exists() else ""
    start, end = text.find(NOTES[0]), text.find(NOTES[1])
    if start < 0 or end < start:
        return [NOTES[0], "", NOTES[1]]
    return text[start : end + len(NOTES[1])].splitlines()


def write_docs(grids: Mapping[str, Mapping], page: Path, figures_folder: Path) -> Path:
    """Regenerate a documentation page (docs/results.md) and its figures from results files
    (`{name: content of a results.json}`, a section each), keeping the page's hand-written notes."""
    lines = ["# Results: LoRATRF vs LoRA vs full fine-tuning on a real model and real data", ""]
    lines += kept_notes(page) + [""]
    for name, results in grids.items():
        agg = aggregate(results["runs"])
        figures = {
            study: plot(study, spec, agg, figures_folder / f"{name}-{study}.png")
            for study, spec in results["studies"].items()
        }
        lines += [f"## {name}", ""] + setup_lines(results) + [""]
        lines += markdown(results, figures, page.parent, with_findings=True, gate_pictures=(figures_folder, f"{name}-"))
    lines += [
        "## Noise bands",
        "",
        (
            "A gap between two methods is called *within noise* when it is smaller than two standard errors. "
            "The test set's standard error is paired where the runs recorded which sentences they got right "
            "(the standard deviation of the per-sentence difference over sqrt(n)) and otherwise that of two "
            "independent accuracies, `100 sqrt(2 p (1 - p) / n)` points "
            f"({noise(0.8, 1000):.1f} at 80% on 1,000 sentences); with several seeds, the seeds' "
            "standard error of the difference of the means adds in quadrature."
        ),
        "",
    ]
    lines += HOW_TO_RUN
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page
