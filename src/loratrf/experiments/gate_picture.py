"""The gate picture: for a handful of test sentences, each token coloured by its gate `s`, one
row per layer, at the start and after training. It shows what each layer's task vector selects.

Drawn from a run's `"gates"` record (gate_stats.py), so `report` redraws it from the run files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from loratrf.experiments.gate_stats import first_gate_run, layer_name
from loratrf.experiments.packages import require

GAMMA = 0.5  # the colour scale's power: small gates stay visible beside large ones; the bar shows s itself
SHOWN = 4  # sentences drawn (of the PICTURE_SENTENCES recorded, which alternate between the classes)


def picture_name(method: str) -> str:
    """The PNG's file name for a method: `gates-loratrf-v-f1-f2-r8-con.png`."""
    return "gates-" + re.sub(r"[^a-z0-9]+", "-", method.lower()).strip("-") + ".png"


def draw(gates: Mapping, title: str, path: Path) -> Path | None:
    """One panel per sentence and phase (start, trained): rows are layers, columns tokens,
    colour the gate `s` on a fixed [0, 1] scale. Returns `path`, or None without sentences."""
    tokens = gates["picture"]["tokens"][:SHOWN]
    if not tokens:
        return None
    matplotlib = require("matplotlib", "matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    phases = [p for p in ("start", "trained") if p in gates]
    hosts = list(gates["start"]["picture"])
    classes = gates.get("classes") or []
    labels = gates["picture"]["labels"]
    widest = max(len(t) for t in tokens)
    fig, axes = plt.subplots(
        len(tokens),
        len(phases),
        figsize=(1.2 + 0.62 * widest * len(phases), 0.25 + (0.3 * len(hosts) + 0.75) * len(tokens)),
        dpi=90,
        squeeze=False,
        constrained_layout=True,
    )
    norm = PowerNorm(GAMMA, vmin=0.0, vmax=1.0)
    image = None
    for row, words in enumerate(tokens):
        label = classes[labels[row]] if labels[row] < len(classes) else str(labels[row])
        for col, phase in enumerate(phases):
            ax = axes[row][col]
            values = [gates[phase]["picture"][host][row] for host in hosts]
            image = ax.imshow(values, cmap="magma", norm=norm, aspect="auto", interpolation="nearest")
            for y, layer in enumerate(values):  # the value in each cell, small
                for x, v in enumerate(layer):
                    ax.text(
                        x,
                        y,
                        f"{v:.2f}"[1:] if v < 1 else "1",
                        ha="center",
                        va="center",
                        fontsize=5.5,
                        color="black" if norm(v) > 0.55 else "white",
                    )
            ax.set_xticks(range(len(words)))
            ax.set_xticklabels(words, rotation=40, ha="right", fontsize=7)
            ax.set_yticks(range(len(hosts)))
            ax.set_yticklabels([layer_name(h) for h in hosts], fontsize=6)
            ax.tick_params(length=0)
            if row == 0:
                ax.set_title(("at the start" if phase == "start" else "after training"), fontsize=9)
            if col == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(f"gates s per token and layer: {title}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.6, label="s (power scale)", pad=0.01)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_study(runs: list[Mapping], methods: list[str], folder: Path, prefix: str = "") -> dict[str, Path]:
    """`{method: picture}` for each method among `methods` whose runs recorded gates, drawn from
    its first run of the lowest seed."""
    paths = {}
    for method in methods:
        run = first_gate_run(runs, method)
        if run is not None:
            title = f"{run['title']} on {run['task']}, seed {run['seed']}"
            path = draw(run["gates"], title, folder / (prefix + picture_name(method)))
            if path:
                paths[method] = path
    return paths
