"""The studies: each asks one of the paper's questions as methods x tasks, names the pairs of
methods it compares (first minus second, on the same test sentences) and how it is plotted.

Method specs are `methods.Method`'s grammar. A spec without `:lr=` has its learning rate swept
on dev (runner.py); one with `:lr=` runs at that rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from loratrf.experiments.data import TASKS
from loratrf.experiments.methods import MATRICES, Method, lora_cost, rank_for_budget

PAPER_LORA = "lora:all:r8"  # the paper's LoRA baseline: r=8 on all six matrices
PAPER_LORATRF = "loratrf:v,f1,f2:r8"  # the paper's DeBERTa setup: r=8 on W_v, W_f1, W_f2, filters on every layer
LORA_VF = "lora:v,f1,f2:r8"  # LoRA at LoRATRF's targets: what the filters add
RANKS = (2, 4, 8, 16)
# The paper's Table 1 rows at this scale, every LoRA-type row at one LoRA budget (r=8 on v,f1,f2,
# the paper's LoRATRF placement); then the head alone (the floor) and the paper's all-six LoRA row.
# Houlsby and Pfeiffer adapters are left out: see docs/results.md.
TABLE1 = (
    "full",
    "bitfit",
    LORA_VF,
    "lora:v,f1,f2:r8:dora",
    "adalora:v,f1,f2:r8",
    PAPER_LORATRF,
    "loratrf:v,f1,f2:r8:dora",
    "head",
    PAPER_LORA,
)
# Figure 2's question: which matrices to adapt, at the LoRA budget of the paper's setup.
MODULE_CHOICES = (("q", "v"), ("q", "k", "v", "o"), ("f1", "f2"), ("o", "f1", "f2"), ("v", "f1", "f2"), MATRICES)
PLOTS = ("bars", "rank")
# Figure 2's choices on the decoder: attention alone, the FFN alone, the paper's o,f1,f2, its
# baselines' q,k,v,f1,f2, and all six
LLM_MODULE_CHOICES = (
    ("q", "v"),
    ("q", "k", "v", "o"),
    ("f1", "f2"),
    ("o", "f1", "f2"),
    ("q", "k", "v", "f1", "f2"),
    MATRICES,
)
# Decoder LLMs (SmolLM2-135M-Instruct, problem_runner.py), in the paper's LLaMA setup: LoRATRF is
# LoRA r=32 on W_o, W_f1, W_f2 with a filter on every layer; its LoRA and DoRA baselines (LLM-Adapters,
# DoRA) adapt q, k, v and the FFN's up and down projections at r=32. W_f1 is the SwiGLU FFN's
# `up_proj`, W_f2 its `down_proj`; `gate_proj` is left alone (presets.ARCHITECTURES["llama"]).
LLM_LORATRF = "loratrf:o,f1,f2:r32"
LLM_LORA = "lora:q,k,v,f1,f2:r32"
LLM_DORA = "dora:q,k,v,f1,f2:r32"
LLM_LORA_OFF = "lora:o,f1,f2:r32"  # LoRATRF's LoRA without its filters: what the filters add
LLM_RANKS = (4, 8, 16, 32)
# The problem tasks of the LLM studies, chosen by measurement (the `llm-tasks` study,
# docs/results-llm.md): the two candidates on which LoRA lands between 20% and 80%, arithmetic
# and a word problem (durations of times of day); the first also takes the rank, module,
# filter-start and PEFT studies.
LLM_TASKS = ("arithmetic", "durations-formats")
# and the candidates that study measured: zero-shot, and LoRA at its default rate
LLM_CANDIDATES = (
    "legs",
    "legs-hard",
    "family",
    "arithmetic",
    "aiw",
    "gsm_symbolic",
    "durations",
    "durations-hms",
    "durations-formats",
    "time_intervals",
    "syllogism",
)


@dataclasses.dataclass(frozen=True)
class Study:
    """`comparisons`: `(first, second)` method pairs, each reported as first minus second on
    every task and test source of the study. `plot`: `"bars"` (accuracy per method and test
    source) or `"rank"` (accuracy over the methods' rank, a line per method family)."""

    question: str
    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    comparisons: tuple[tuple[str, str], ...] = ()
    plot: str = "bars"
    seeds: tuple[int, ...] | None = None  # the only seeds it runs, of those asked for (None: all)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(str(Method.parse(m)) for m in self.methods))
        pairs = tuple((str(Method.parse(a)), str(Method.parse(b))) for a, b in self.comparisons)
        object.__setattr__(self, "comparisons", pairs)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {sorted(TASKS)}")
        strangers = [m for pair in pairs for m in pair if m not in self.methods]
        if strangers:
            raise ValueError(f"comparisons name methods outside the study: {strangers}")
        if self.plot not in PLOTS:
            raise ValueError(f"plot must be one of {PLOTS}, got {self.plot!r}")


def studies(base: nn.Module, ranks: Sequence[int] = RANKS) -> dict[str, Study]:
    """The paper's questions as studies, in the order a full run takes them (the most
    informative first); `base` (the unadapted model) sizes the module-choice ranks."""
    budget = 8 * lora_cost(base, ("v", "f1", "f2"))
    modules = tuple(
        str(Method("loratrf", choice, rank_for_budget(base, choice, budget), filter_rank=8))
        for choice in MODULE_CHOICES
    )
    o_f1_f2 = modules[MODULE_CHOICES.index(("o", "f1", "f2"))]
    main = ("full", PAPER_LORA, PAPER_LORATRF)
    main_pairs = ((PAPER_LORATRF, PAPER_LORA), ("full", PAPER_LORATRF))
    starts = tuple(f"{PAPER_LORATRF}:{s}" for s in ("dot", "cal", "con", "con:aff", "aff"))
    return {
        "demo": Study(
            "Full fine-tuning, the paper's LoRA baseline and LoRATRF on movie sentiment", main, ("movies",), main_pairs
        ),
        "headline": Study(
            "The paper's first claim: LoRATRF (r=8 on v,f1,f2 + filters) at least as accurate as LoRA "
            "(r=8 on all six matrices) with fewer trainable parameters",
            (PAPER_LORA, PAPER_LORATRF),
            ("movies",),
            ((PAPER_LORATRF, PAPER_LORA),),
        ),
        "rank": Study(
            "Rank robustness (the paper's Figure 3): LoRA vs LoRATRF as the rank changes",
            tuple(f"{kind}:r{r}" for r in ranks for kind in ("lora:all", "loratrf:v,f1,f2")),
            ("movies",),
            tuple((f"loratrf:v,f1,f2:r{r}", f"lora:all:r{r}") for r in ranks),
            plot="rank",
        ),
        "table1": Study(
            "The paper's Table 1 at this scale: full fine-tuning, BitFit, LoRA, DoRA, AdaLoRA (PEFT's, pruned "
            "from rank 12 to an average of 8), LoRATRF and DoRA + filters, every LoRA-type row at one LoRA budget "
            "(r=8 on v,f1,f2); the head alone and the paper's all-six LoRA baseline beside them. No Houlsby or "
            "Pfeiffer adapters (no maintained package for them works with transformers 5)",
            TABLE1,
            ("movies",),
            tuple((PAPER_LORATRF, m) for m in TABLE1 if m != PAPER_LORATRF)
            + (("loratrf:v,f1,f2:r8:dora", "lora:v,f1,f2:r8:dora"),),
        ),
        "peft": Study(
            "Cross-implementation check: PEFT's LoRA beside loratrf's (the same targets, rank, alpha, "
            "initialisation, seeds, data and learning rate: PEFT's runs take loratrf's swept rate)",
            (PAPER_LORA, f"{PAPER_LORA}:peft"),
            ("movies",),
            ((f"{PAPER_LORA}:peft", PAPER_LORA),),
        ),
        "module": Study(
            f"Which matrices to adapt (the paper's Figure 2), LoRATRF at a held LoRA budget of {budget:,} "
            "parameters (that of r=8 on v,f1,f2): each choice takes the rank whose count is nearest, and "
            "the filters keep rank 8",
            modules,
            ("movies",),
            tuple((o_f1_f2, m) for m in modules if m != o_f1_f2),
        ),
        "ablation": Study(
            "Filter ablations at the same LoRA targets (v,f1,f2, r=8): LoRA without filters, the paper's "
            "filters, dot-product relevance, the gate starts of docs/method.md (task vectors at the mean "
            "direction ':cal' or the contrastive one ':con', the affine gate ':aff'), filters alone and the head alone",
            (LORA_VF, PAPER_LORATRF, *starts, "filters:r8", "head"),
            ("movies",),
            ((PAPER_LORATRF, LORA_VF),) + tuple((m, PAPER_LORATRF) for m in starts) + (("filters:r8", "head"),),
        ),
        "domains": Study(
            "Other domains: trained on movies and tested on tweets, Amazon and NYT sentences "
            "(cross-domain), and trained on each domain itself (in-domain)",
            main,
            ("transfer", "tweets", "amazon", "nyt"),
            main_pairs,
        ),
        "trec": Study("Multi-class: TREC question type (6 classes)", main, ("trec",), main_pairs),
    }


def llm_demo(task: str = "arithmetic") -> Study:
    """`demo-llm`: zero-shot, the paper's LLaMA LoRA baseline and LoRATRF on a problem task."""
    return Study(
        f"Zero-shot, LoRA and LoRATRF on SmolLM2-135M-Instruct, exact match on {task}",
        ("zeroshot", LLM_LORA, LLM_LORATRF),
        (task,),
        ((LLM_LORA, "zeroshot"), (LLM_LORATRF, "zeroshot"), (LLM_LORATRF, LLM_LORA)),
    )


STUDY_NAMES = ("demo", "headline", "rank", "table1", "peft", "module", "ablation", "domains", "trec")


def llm_studies(base: nn.Module, tasks: Sequence[str] = LLM_TASKS) -> dict[str, Study]:
    """The paper's LLM claims in miniature on SmolLM2-135M-Instruct (`llm-grid`), in the order a
    full run takes them; `base` (the unadapted decoder) sizes the module-choice ranks."""
    main = tasks[:1]
    table2 = (LLM_LORA, LLM_DORA, LLM_LORATRF, LLM_LORA_OFF)
    budget = 32 * lora_cost(base, ("o", "f1", "f2"), "llama")
    modules = tuple(
        str(Method("loratrf", choice, rank_for_budget(base, choice, budget, "llama"), filter_rank=32))
        for choice in LLM_MODULE_CHOICES
    )
    o_f1_f2 = str(Method.parse(LLM_LORATRF))
    calibrated = f"{LLM_LORATRF}:cal:aff"
    return {
        "llm-tasks": Study(
            "Which tasks: zero-shot and LoRA r=32 (q,k,v,f1,f2) at its default rate on each candidate; a task "
            "qualifies when LoRA lands between 20% and 80% exact match",
            ("zeroshot", f"{LLM_LORA}:lr=0.001"),
            LLM_CANDIDATES,
            ((f"{LLM_LORA}:lr=0.001", "zeroshot"),),
            seeds=(0,),
        ),
        "llm-table2": Study(
            "The paper's Table 2 in miniature: LoRA and DoRA (r=32 on q,k,v,f1,f2, the paper's LLaMA baselines) "
            "against LoRATRF (r=32 on o,f1,f2 + filters), and LoRA r=32 on o,f1,f2 without filters (what the "
            "filters add)",
            table2,
            tuple(tasks),
            ((LLM_LORATRF, LLM_LORA), (LLM_LORATRF, LLM_DORA), (LLM_LORATRF, LLM_LORA_OFF)),
        ),
        "llm-peft": Study(
            "Cross-implementation check on the decoder: PEFT's LoRA beside loratrf's (the same targets, rank, alpha, "
            "initialisation, seeds, data and learning rate: PEFT's runs take loratrf's swept rate)",
            (LLM_LORA, f"{LLM_LORA}:peft"),
            main,
            ((f"{LLM_LORA}:peft", LLM_LORA),),
        ),
        "llm-start": Study(
            "The filter's start on a decoder: the paper's random task vector against task vectors at the mean "
            "direction of the first training problems' tokens with the affine gate (':cal:aff'; problems have "
            "no classes, so the contrastive start does not apply)",
            (LLM_LORATRF, calibrated),
            main,
            ((calibrated, LLM_LORATRF),),
        ),
        "llm-rank": Study(
            "Rank robustness (the paper's Figure 3): LoRA (q,k,v,f1,f2) against LoRATRF (o,f1,f2 + filters) as "
            "the rank changes",
            tuple(f"{m}:r{r}" for r in LLM_RANKS for m in ("lora:q,k,v,f1,f2", "loratrf:o,f1,f2")),
            main,
            tuple((f"loratrf:o,f1,f2:r{r}", f"lora:q,k,v,f1,f2:r{r}") for r in LLM_RANKS),
            plot="rank",
        ),
        "llm-module": Study(
            f"Which matrices to adapt (the paper's Figure 2) on the decoder: LoRATRF at a held LoRA budget of "
            f"{budget:,} parameters (that of r=32 on o,f1,f2); each choice takes the rank whose count is nearest, "
            "and the filters keep rank 32",
            modules,
            main,
            tuple((o_f1_f2, m) for m in modules if m != o_f1_f2),
        ),
    }


LLM_STUDY_NAMES = ("llm-tasks", "llm-table2", "llm-peft", "llm-start", "llm-rank", "llm-module")
