"""Fine-tuning methods, written as short specs and built with `loratrf.presets` and `loratrf.inject`.

Spec grammar (`Method.parse`; `str(method)` gives the canonical spec back):

    full                          full fine-tuning (every parameter trains)
    zeroshot                      nothing trains: the pretrained model as it is (decoder LLMs)
    head                          only the task head trains (the floor every method starts from)
    bitfit                        BitFit: every bias term of the model trains, and the head
    lora:<matrices>:r<rank>       LoRA on those matrices of every layer
    loratrf:<matrices>:r<rank>    the same plus a task-aware filter on every layer's output
    filters:r<rank>               filters only, no LoRA
    adalora:<matrices>:r<rank>    AdaLoRA (PEFT's): SVD-form adapters starting at rank 1.5 r
                                  (12 for r=8), pruned during training to an average rank r
    ...:dora                      DoRA layers instead of LoRA (lora, loratrf: DoRA + filters);
                                  `dora:<matrices>:r<rank>` reads as `lora:<matrices>:r<rank>:dora`
    ...:peft                      PEFT's LoRA (or DoRA) layers instead of loratrf's (lora): the same
                                  targets, rank, alpha, initialisation and dropout, to cross-check
    ...:fr<rank>                  the filters' rank, when it differs from LoRA's (loratrf)
    ...:dot                       dot-product relevance instead of cosine (loratrf, filters)
    ...:cal                       task vectors set by `loratrf.calibrate_filters` (the mean
                                  direction) on the first training sentences, instead of
                                  random (loratrf, filters)
    ...:con                       task vectors set by `calibrate_filters(start="contrastive")`:
                                  the direction that separates the classes of those sentences
    ...:aff                       the affine gate `s = clamp(a cos(h, t) + b, 0, 1)` (a, b learnable,
                                  from 1 and 0); with ':cal' or ':con' also
                                  `calibrate_filters(gate_range=GATE_RANGE)`
    ...:lr=<float>                a fixed learning rate: not swept, and not the method's default

`<matrices>` are the paper's names joined by commas (`q,k,v,o,f1,f2`), or `all` for the six;
the rank defaults to 8. LoRA's alpha is 16 throughout (the paper: "typically 16 or 32 and
never tuned"); the filters take LoRA's rank and alpha.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import loratrf
from loratrf.presets import MATRICES

if TYPE_CHECKING:
    import peft

KINDS = ("full", "head", "lora", "loratrf", "filters", "bitfit", "adalora", "zeroshot")
GRAMMAR = (
    "method specs are 'full', 'head', 'bitfit', 'zeroshot', 'lora:<matrices>:r<rank>', 'loratrf:<matrices>:r<rank>', "
    "'adalora:<matrices>:r<rank>' or 'filters:r<rank>', "
    "with <matrices> from q,k,v,o,f1,f2 joined by commas (or 'all'), optionally followed by ':fr<rank>' "
    "(the filters' rank), ':dot' (filters' similarity), ':cal' or ':con' (task vectors started at the mean or the "
    "contrastive direction), ':aff' (the affine gate), ':dora' (DoRA layers, for lora and loratrf; "
    "'dora:<matrices>:r<rank>' is 'lora:<matrices>:r<rank>:dora'), ':peft' (PEFT's layers, for lora) "
    "and ':lr=<float>'; "
    "e.g. 'loratrf:v,f1,f2:r8'"
)
# Kinds that take LoRA-type matrices and a rank
LOW_RANK_KINDS = ("lora", "loratrf", "adalora")
# One spec of each method the runner offers, in the order of the paper's Table 1
EXAMPLES = {
    "full fine-tuning": "full",
    "head only": "head",
    "BitFit": "bitfit",
    "LoRA": "lora:v,f1,f2:r8",
    "LoRA (PEFT)": "lora:v,f1,f2:r8:peft",
    "DoRA": "dora:v,f1,f2:r8",
    "AdaLoRA (PEFT)": "adalora:v,f1,f2:r8",
    "LoRATRF": "loratrf:v,f1,f2:r8",
    "DoRA + filters": "loratrf:v,f1,f2:r8:dora",
    "filters only": "filters:r8",
}
ALPHA = 16.0
# The learning rates a study sweeps for each kind (on dev, seed 0; each spans 10x): full
# fine-tuning around BERT's usual 5e-5, every adapter method around 1e-3 (LoRA's usual range is
# 5e-4 to 2e-3 at alpha/r = 2). The middle value is the default, which the demo uses untuned. A
# sweep grows past its edge while its best rate sits there (`results.Runs.sweep`).
ADAPTER_SWEEP = (3e-4, 1e-3, 3e-3)
LR_SWEEP = {
    "full": (2e-5, 5e-5, 2e-4),
    "head": ADAPTER_SWEEP,
    "lora": ADAPTER_SWEEP,
    "loratrf": ADAPTER_SWEEP,
    "filters": ADAPTER_SWEEP,
    "bitfit": ADAPTER_SWEEP,
    "adalora": ADAPTER_SWEEP,
}
DEFAULT_LR = {kind: rates[1] for kind, rates in LR_SWEEP.items()} | {"zeroshot": 0.0}  # zero-shot: nothing trains
ARCHITECTURE = "bert"
# The task head trains in every method: BERT's pooler (dense + tanh on [CLS]) and classifier.
HEAD = (r"(?:.*\.)?pooler", "classifier")
# Decoder LLMs (`prepare(..., architecture="llama")`, causal_lm.py): no new head (the LM head is
# the tied embedding, frozen), and alpha 64, as at r=32 in the paper's LLaMA setup and its baselines.
LLAMA_ALPHA = 64.0
# How the task vectors start: spec field -> the words of a method's title
STARTS = {"random": "random", "cal": "calibrated", "con": "contrastive"}
# and the `loratrf.calibrate_filters` start that each calibrating field asks for
CALIBRATION_STARTS = {"cal": "mean", "con": "contrastive"}
# ':aff' with a calibrated start: the gate is 0 at the median of the tokens' cosines, 1 at their 95th percentile
GATE_RANGE = (0.5, 0.95)


@dataclasses.dataclass(frozen=True)
class Method:
    kind: str
    matrices: tuple[str, ...] = ()
    rank: int | None = None  # None: 8, or no rank for `full` and `head`
    similarity: str = "cosine"
    lr: float | None = None  # None: DEFAULT_LR[kind]
    filter_rank: int | None = None  # None: the filters take `rank`
    start: str = "random"  # how task vectors start: "random", or by calibrate_filters: "cal" (mean), "con"
    gate: str = "paper"  # the filters' gate: "paper" or "affine"
    dora: bool = False  # DoRA layers instead of LoRA (kinds 'lora' and 'loratrf')
    peft: bool = False  # PEFT's layers instead of loratrf's (kind 'lora')

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown method kind {self.kind!r}; known: {KINDS}")
        object.__setattr__(self, "matrices", tuple(self.matrices))
        bad = [m for m in self.matrices if m not in MATRICES]
        if bad or len(set(self.matrices)) != len(self.matrices):
            raise ValueError(f"matrices must be distinct names from {MATRICES}, got {self.matrices}")
        if (self.kind in LOW_RANK_KINDS) != bool(self.matrices):
            raise ValueError(
                f"{self.kind!r} takes matrices only if it is 'lora', 'loratrf' or 'adalora' (which need them)"
            )
        if self.dora and self.kind not in ("lora", "loratrf"):
            raise ValueError("':dora' makes LoRA layers DoRA layers (kind 'lora' or 'loratrf')")
        if self.peft and self.kind != "lora":
            raise ValueError("':peft' builds LoRA with PEFT (kind 'lora')")
        if self.similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', got {self.similarity!r}")
        if self.similarity == "dot" and self.kind not in ("loratrf", "filters"):
            raise ValueError("'dot' similarity needs filters (kind 'loratrf' or 'filters')")
        if self.kind in ("full", "head", "bitfit", "zeroshot"):
            if self.rank is not None:
                raise ValueError(f"{self.kind!r} has no rank")
        elif self.rank is None:
            object.__setattr__(self, "rank", 8)
        elif isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if self.filter_rank is not None:
            if not self.filters:
                raise ValueError("a filter rank needs filters (kind 'loratrf' or 'filters')")
            if isinstance(self.filter_rank, bool) or not isinstance(self.filter_rank, int) or self.filter_rank < 1:
                raise ValueError(f"filter rank must be an integer >= 1, got {self.filter_rank!r}")
            if self.filter_rank == self.rank:  # canonical: the default is left out
                object.__setattr__(self, "filter_rank", None)
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {tuple(STARTS)}, got {self.start!r}")
        if self.start != "random" and not self.filters:
            raise ValueError(f"':{self.start}' calibrates filters (kind 'loratrf' or 'filters')")
        if self.gate not in ("paper", "affine"):
            raise ValueError(f"gate must be 'paper' or 'affine', got {self.gate!r}")
        if self.gate != "paper" and not self.filters:
            raise ValueError("':aff' is a filter gate (kind 'loratrf' or 'filters')")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.lr!r}")
        if self.matrices:  # canonical order, so equal methods have equal specs
            object.__setattr__(self, "matrices", tuple(m for m in MATRICES if m in self.matrices))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.kind]

    @property
    def tunable(self) -> bool:
        """Whether a study sweeps this kind's learning rate (zero-shot trains nothing)."""
        return self.kind in LR_SWEEP

    @property
    def filters(self) -> bool:
        return self.kind in ("loratrf", "filters")

    @property
    def tuned_as(self) -> Method:
        """The method whose learning-rate sweep this one takes: itself without a fixed rate;
        PEFT's LoRA takes loratrf's, so that the pair differs in the implementation alone."""
        return dataclasses.replace(self, lr=None, peft=False)

    def __str__(self) -> str:
        parts = [self.kind]
        if self.matrices:
            parts.append("all" if self.matrices == MATRICES else ",".join(self.matrices))
        if self.rank is not None:
            parts.append(f"r{self.rank}")
        if self.filter_rank is not None:
            parts.append(f"fr{self.filter_rank}")
        if self.similarity != "cosine":
            parts.append(self.similarity)
        if self.start != "random":
            parts.append(self.start)
        if self.gate == "affine":
            parts.append("aff")
        if self.dora:
            parts.append("dora")
        if self.peft:
            parts.append("peft")
        if self.lr is not None:
            parts.append(f"lr={self.lr!r}")  # repr: the shortest text that reads back exactly
        return ":".join(parts)

    @property
    def title(self) -> str:
        """A readable name for tables, e.g. `LoRATRF r=8 (v,f1,f2 + filters)`."""
        if self.kind == "full":
            return "full fine-tuning"
        if self.kind == "head":
            return "head only"
        if self.kind == "bitfit":
            return "BitFit (biases + head)"
        if self.kind == "zeroshot":
            return "zero-shot"
        where = ",".join(self.matrices)
        if self.kind == "adalora":
            return f"AdaLoRA r={adalora_init_rank(self.rank)}→{self.rank} ({where})"
        if self.filters:
            where = f"{where} + filters" if where else "filters only"
            if self.filter_rank is not None:
                where += f" r={self.filter_rank}"
            if self.similarity == "dot":
                where += ", dot"
            if self.start != "random":
                where += f", {STARTS[self.start]} t"
            if self.gate == "affine":
                where += ", affine gate"
        name = {"lora": "LoRA", "loratrf": "LoRATRF", "filters": "filters"}[self.kind]
        if self.dora:
            name = "DoRA"  # with filters: DoRA + filters, `where` says so
        if self.peft:
            name = f"PEFT {name}"
        return f"{name} r={self.rank} ({where})"

    @classmethod
    def parse(cls, spec: str) -> Method:
        kind, *fields = spec.strip().split(":")
        options: dict = {"kind": kind}
        if kind == "dora":  # `dora:<matrices>:r<rank>` is LoRA with DoRA layers
            options.update(kind="lora", dora=True)
        for field in fields:
            if m := re.fullmatch(r"r(\d+)", field):
                options["rank"] = int(m.group(1))
            elif m := re.fullmatch(r"fr(\d+)", field):
                options["filter_rank"] = int(m.group(1))
            elif field in ("cosine", "dot"):
                options["similarity"] = field
            elif field in STARTS:
                options["start"] = field
            elif field == "aff":
                options["gate"] = "affine"
            elif field == "dora":
                options["dora"] = True
            elif field == "peft":
                options["peft"] = True
            elif field.startswith("lr="):
                try:
                    options["lr"] = float(field[3:])
                except ValueError:
                    raise ValueError(f"{spec!r}: {field!r} is not a learning rate; {GRAMMAR}") from None
            elif field == "all" and "matrices" not in options:
                options["matrices"] = MATRICES
            elif re.fullmatch(r"[a-z0-9]+(,[a-z0-9]+)*", field) and "matrices" not in options:
                options["matrices"] = tuple(field.split(","))
            else:
                raise ValueError(f"{spec!r}: cannot read {field!r}; {GRAMMAR}")
        try:
            return cls(**options)
        except ValueError as e:
            raise ValueError(f"{spec!r}: {e}; {GRAMMAR}") from None


def prepare(
    model: nn.Module, method: Method, *, total_steps: int | None = None, architecture: str = ARCHITECTURE
) -> loratrf.InjectionConfig | AdaLoRA | peft.LoraConfig | None:
    """Make `method` trainable in `model` (in place): inject adapters (PEFT's for ':peft', whose
    `LoraConfig` it returns), unfreeze all for `full`, only the head for `head`, the biases and
    the head for `bitfit`, nothing for `zeroshot`. `adalora` needs the run's `total_steps` (its
    pruning schedule) and returns the `AdaLoRA` whose hooks the training loop must call every step.

    `architecture="llama"`: a decoder LLM (causal_lm.py), which has no task head: `full`,
    `zeroshot`, `lora`, `dora` (loratrf's or, with ':peft', PEFT's) and `loratrf`, at alpha
    `LLAMA_ALPHA`."""
    if method.kind == "zeroshot":
        model.requires_grad_(False)
        return None
    if architecture == "llama":
        if method.kind == "full":
            model.requires_grad_(True)
            return None
        if method.kind not in ("lora", "loratrf"):
            raise ValueError(f"{method}: decoder LLMs take 'zeroshot', 'full', 'lora', 'dora' and 'loratrf' specs")
        if method.peft:
            return peft_lora(model, method, "llama", LLAMA_ALPHA, trainable=())
        return _inject(model, method, "llama", LLAMA_ALPHA)
    if method.kind in ("full", "head", "bitfit"):
        model.requires_grad_(method.kind == "full")
        if method.kind == "bitfit":
            for name, p in model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias":
                    p.requires_grad_(True)
        unfreeze_head(model)
        return None
    if method.kind == "adalora":
        if total_steps is None:
            raise ValueError("AdaLoRA's pruning schedule needs the run's total_steps")
        return AdaLoRA(model, method, total_steps)
    if method.peft:
        return peft_lora(model, method, ARCHITECTURE, ALPHA, trainable=HEAD)
    return _inject(model, method, ARCHITECTURE, ALPHA, trainable=HEAD)


def _inject(
    model: nn.Module, method: Method, architecture: str, alpha: float, trainable: tuple[str, ...] = ()
) -> loratrf.InjectionConfig:
    """Inject `method`'s LoRA layers and filters into `model` through `architecture`'s preset."""
    config = loratrf.presets.preset(
        architecture,
        method.matrices,
        filters=method.filters,
        rank=method.rank,
        filter_rank=method.filter_rank,
        alpha=alpha,
        similarity=method.similarity,
        gate=method.gate,
        trainable=trainable,
        dora=method.dora,
    )
    loratrf.inject(model, config)
    return config


def peft_lora(
    model: nn.Module, method: Method, architecture: str, alpha: float, trainable: tuple[str, ...]
) -> peft.LoraConfig:
    """PEFT's LoRA (`peft.LoraModel`, injected into `model` in place) as loratrf's preset for
    `architecture` builds it: the same target modules (one regex, matched whole), rank, alpha,
    dropout (none) and initialisation (A uniform on ±1/sqrt(d_in), PEFT's kaiming default, and
    B = 0); the modules `trainable` names train too. PEFT wraps a quantized base layer
    (bitsandbytes, torchao) in its own layer for it. Returns PEFT's config."""
    from loratrf.experiments.packages import require

    peft = require("peft", "peft>=0.21,<0.22")
    targets = loratrf.presets.preset(architecture, method.matrices).targets[0]
    config = peft.LoraConfig(
        r=method.rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, use_dora=method.dora
    )
    peft.LoraModel(model, config, "default")
    unfreeze_head(model, trainable)
    return config


def unfreeze_head(model: nn.Module, patterns: tuple[str, ...] = HEAD) -> None:
    """Make the modules whose names `patterns` match whole trainable."""
    for name, module in model.named_modules():
        if any(re.fullmatch(pattern, name) for pattern in patterns):
            module.requires_grad_(True)


def adalora_init_rank(rank: int) -> int:
    """AdaLoRA's starting rank for a target average rank: 1.5 times it (PEFT's 12 for 8)."""
    return math.ceil(1.5 * rank)


def adalora_schedule(total_steps: int) -> tuple[int, int]:
    """`(tinit, tfinal)`: AdaLoRA's warm-up without pruning (the first 10% of the steps) and
    its final phase at the target budget (the last 40%), the proportions of the AdaLoRA
    paper's GLUE settings. From step `total - tfinal` on, the ranks are held at the budget."""
    tinit = total_steps // 10
    tfinal = min(max(1, 2 * total_steps // 5), total_steps - 1 - tinit)
    return tinit, max(0, tfinal)


ADALORA_ORTH_REG = 0.1  # the AdaLoRA paper's orthogonal-regularisation weight on GLUE


class AdaLoRA:
    """AdaLoRA through PEFT (`peft.AdaLoraModel`, injected into `model` in place) on the
    method's matrices: ranks start at `adalora_init_rank(r)` and are pruned to an average of
    `r` by PEFT's `RankAllocator`. It prunes only when `update_and_allocate` runs every step,
    after `backward` and before the gradients are cleared (without it AdaLoRA silently trains
    as plain LoRA: peft #432, #1801); `after_step` is that call. `extra_loss` is AdaLoRA's
    orthogonal regulariser, which PEFT adds only to a loss the model computes itself."""

    def __init__(self, model: nn.Module, method: Method, total_steps: int) -> None:
        from loratrf.experiments.packages import require

        peft = require("peft", "peft>=0.21,<0.22")
        tinit, tfinal = adalora_schedule(total_steps)
        targets = loratrf.presets.preset(ARCHITECTURE, method.matrices).targets[0]
        self.config = peft.AdaLoraConfig(
            target_r=method.rank,
            init_r=adalora_init_rank(method.rank),
            lora_alpha=ALPHA,
            target_modules=targets,  # a regex, matched whole (re.fullmatch) as loratrf matches it
            tinit=tinit,
            tfinal=tfinal,
            total_step=total_steps,
            orth_reg_weight=ADALORA_ORTH_REG,
        )
        self.tuner = peft.AdaLoraModel(model, self.config, "default")
        self.model = model
        unfreeze_head(model)

    def after_step(self, step: int) -> None:
        """PEFT's `update_and_allocate(step)`: importance scores from this step's gradients,
        then the budget's mask on `lora_E`."""
        self.tuner.update_and_allocate(step)

    def extra_loss(self) -> Tensor:
        """`orth_reg_weight` times the mean of `‖A Aᵀ - I‖_F` and `‖Bᵀ B - I‖_F` over the adapters,
        as `peft.AdaLoraModel.forward` adds it."""
        terms = []
        for name, p in self.model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and "default" in name:
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype)))
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def ranks(self) -> dict[str, int]:
        """The rank each adapted matrix holds now: its non-zero entries of `lora_E`."""
        return {
            name.removesuffix(".lora_E.default"): int(torch.count_nonzero(p))
            for name, p in self.model.named_parameters()
            if name.endswith(".lora_E.default")
        }


def lora_cost(model: nn.Module, matrices: Sequence[str], architecture: str = ARCHITECTURE) -> int:
    """LoRA parameters per unit of rank for `matrices` in every layer: `sum(in + out)` over those linears."""
    if not matrices:
        return 0
    probe = loratrf.presets.preset(architecture, matrices)
    regex = re.compile(probe.targets[0])
    return sum(
        m.in_features + m.out_features
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and regex.fullmatch(name)
    )


def rank_for_budget(model: nn.Module, matrices: Sequence[str], budget: int, architecture: str = ARCHITECTURE) -> int:
    """The rank whose LoRA parameter count on `matrices` is nearest to `budget` (at least 1)."""
    cost = lora_cost(model, matrices, architecture)
    if cost == 0:
        raise ValueError(f"no linear layer of the model matches matrices {tuple(matrices)}")
    return max(1, round(budget / cost))
