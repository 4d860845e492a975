"""The filters' gates in the experiments: measured on held-out sentences at the start and after
training, as a table for the terminal and the results pages, and as data for the gate picture.

Every run with filters records, on the first `PROBE_SENTENCES` test sentences of its task (real
tokens only: the attention mask keeps padding out), each layer's `loratrf.GateStats` (mean `s`,
the share of open gates, the spread of `s` across a sentence's tokens, and the mean `s` per
class), and the gates of `PICTURE_SENTENCES` of those sentences token by token.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

import loratrf
from loratrf.experiments.problems import PROBLEMS
from loratrf.experiments.training import Encoded, pad

PROBE_SENTENCES = 256
PICTURE_SENTENCES = 6
PICTURE_TOKENS = (6, 14)  # the picture's sentences: this many tokens, [CLS] and [SEP] included
DIGITS = 4  # recorded gates are rounded, to keep run files small


def picture_rows(data: Encoded, lengths: tuple[float, float] = PICTURE_TOKENS) -> list[int]:
    """Which probe sentences the picture shows: the first whose length is within `lengths`,
    alternating between the classes (in the order of the class ids), `PICTURE_SENTENCES` in all."""
    low, high = lengths
    n = min(PROBE_SENTENCES, len(data))
    by_class: dict[int, list[int]] = {}
    for row in range(n):
        if low <= len(data.ids[row]) <= high:
            by_class.setdefault(int(data.labels[row]), []).append(row)
    queues = [by_class[c] for c in sorted(by_class)]
    rows: list[int] = []
    while len(rows) < PICTURE_SENTENCES and any(queues):
        for queue in queues:
            if queue and len(rows) < PICTURE_SENTENCES:
                rows.append(queue.pop(0))
    return rows


@torch.no_grad()
def measure(model: nn.Module, data: Encoded, pad_id: int, rows: Sequence[int], cut: slice = slice(None)) -> dict:
    """`{"stats": {host: GateStats as a dict}, "picture": {host: [[s per token] per picture row]}}`
    on the first `PROBE_SENTENCES` of `data`, in eval mode (the model's mode is restored); the
    picture keeps a row's tokens `cut` (all of them by default)."""
    n = min(PROBE_SENTENCES, len(data))
    input_ids, mask = pad(data.ids[:n], pad_id)
    was_training = model.training
    model.eval()
    try:
        with loratrf.record_gates(model) as gates:
            model(input_ids=input_ids, attention_mask=mask)
    finally:
        model.train(was_training)
    stats = loratrf.gate_statistics(gates, mask, data.labels[:n])
    return {
        "stats": {host: dataclasses.asdict(s) for host, s in stats.items()},
        "picture": {
            host: [[round(v, DIGITS) for v in calls[0][row, : len(data.ids[row])][cut].tolist()] for row in rows]
            for host, calls in gates.items()
        },
    }


def probe(
    model: nn.Module,
    data: Encoded,
    pad_id: int,
    tokens: Callable[[list[int]], list[str]],
    source: str,
    classes: Sequence[str],
    *,
    tail: int | None = None,
) -> tuple[dict, Callable[[], dict]]:
    """The gates at the start, and a function that measures them again after training: a run's
    `"gates"`, `{"source", "sentences", "classes", "picture": {"tokens", "labels"}, "start", "trained"}`.
    `tail`: the picture shows the last `tail` tokens of the first sentences of any length (a
    decoder's prompts are long; their end holds the question and the answer)."""
    rows = picture_rows(data) if tail is None else picture_rows(data, (1, math.inf))
    cut = slice(-tail if tail else None, None)
    record = {
        "source": source,
        "sentences": min(PROBE_SENTENCES, len(data)),
        "classes": list(classes),
        "picture": {
            "tokens": [tokens(data.ids[r][cut]) for r in rows],
            "labels": [int(data.labels[r]) for r in rows],
        },
        "start": measure(model, data, pad_id, rows, cut),
    }

    def after_training() -> dict:
        record["trained"] = measure(model, data, pad_id, rows, cut)
        return record

    return record, after_training


def layer_name(host: str) -> str:
    """`bert.encoder.layer.3` -> `layer 3`; other names unchanged."""
    head, _, last = host.rpartition(".")
    return f"{head.rpartition('.')[2]} {last}" if last.isdigit() and head else host


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def gate_table(gates: Mapping) -> list[str]:
    """A Markdown table of one run's gates: a row per layer, at the start and after training."""
    phases = [p for p in ("start", "trained") if p in gates]
    head = ["layer"]
    for phase in phases:
        word = "start" if phase == "start" else "trained"
        head += [f"mean s ({word})", f"open ({word})", f"spread ({word})", f"s by class ({word})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for host in gates["start"]["stats"]:
        cells = [layer_name(host)]
        for phase in phases:
            s = gates[phase]["stats"][host]
            by_class = " / ".join(_cell(v) for v in s["class_means"]) if s.get("class_means") else "-"
            cells += [_cell(s["mean"]), f"{100 * s['open']:.0f}%", _cell(s["spread"]), by_class]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def ranges(gates: Mapping, phase: str) -> str:
    """One line: the per-layer range of each statistic, e.g. `mean s 0.01-0.04, open 27-74%, ...`."""
    stats = list(gates[phase]["stats"].values())

    def span(key: str, scale: float = 1.0, digits: int = 3) -> str:
        values = [scale * s[key] for s in stats if not math.isnan(s[key])]
        return f"{min(values):.{digits}f}-{max(values):.{digits}f}" if values else "-"

    return f"mean s {span('mean')}, open {span('open', 100, 0)}%, spread {span('spread')}"


def first_gate_run(runs: Sequence[Mapping], method: str) -> Mapping | None:
    """The run of `method` with recorded gates and the lowest seed (the first task of those)."""
    found = [r for r in runs if r["method"] == method and r.get("gates")]
    return min(found, key=lambda r: r["seed"]) if found else None


def unit(gates: Mapping) -> str:
    """What the gates were measured on: "problem" (an LLM task's) or "sentence"."""
    return "problem" if gates["source"] in PROBLEMS else "sentence"


def summary_line(gates: Mapping) -> str:
    """Where the gates were measured, and their per-layer ranges at the start and after training."""
    line = f"on {gates['sentences']} {gates['source']} test {unit(gates)}s (real tokens only): "
    line += f"at the start {ranges(gates, 'start')}"
    if "trained" in gates:
        line += f"; after training {ranges(gates, 'trained')}"
    return line


def gate_lines(
    runs: Sequence[Mapping], methods: Sequence[str], pictures: Mapping[str, Path], relative_to: Path
) -> list[str]:
    """A results page's gate section: per method with filters, its gate statistics per layer
    (the lowest seed's run) and its gate picture."""
    lines: list[str] = []
    for method in methods:
        run = first_gate_run(runs, method)
        if run is None:
            continue
        gates = run["gates"]
        each = unit(gates)
        classes = gates.get("classes")
        by_class = f"; s by class: the mean s of the tokens of {' / '.join(classes)} {each}s" if classes else ""
        lines += [
            f"#### gates: {run['title']}",
            "",
            (
                f"Seed {run['seed']}, {summary_line(gates)}. Spread: the std of s across a {each}'s tokens, "
                f"averaged over {each}s{by_class}."
            ),
            "",
            *gate_table(gates),
            "",
        ]
        if method in pictures:
            rel = Path(os.path.relpath(pictures[method], relative_to))
            lines += [f"![gates of {method}]({rel.as_posix()})", ""]
    return lines


def console_gates(runs: Sequence[Mapping], methods: Sequence[str]) -> str:
    """The terminal's gate report: each filter method's gates per layer, at the start and after training."""
    out = []
    for method in methods:
        run = first_gate_run(runs, method)
        if run is not None:
            out += [f"gates of {run['title']}, seed {run['seed']}, {summary_line(run['gates'])}"]
            out += gate_table(run["gates"])
    return "\n".join(out)
