"""The training loop every method shares, and accuracy.

AdamW with a linear learning-rate schedule (warm-up, then decay to zero), gradient clipping,
mini-batches padded to their longest sentence (dynamic padding). Only the learning rate
differs between methods, and a method may hook into each step (`StepHooks`: AdaLoRA's
regulariser and its per-step rank allocation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratrf.experiments.progress import Progress


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """How much data and training; the same for every method of a run."""

    train_size: int = 2000
    dev_size: int = 500
    test_size: int | None = None  # None: every sentence used neither for training nor for dev
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 64  # tokens, [CLS] and [SEP] included
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    eval_batch_size: int = 128
    max_steps: int | None = None  # stop early after this many optimiser steps (smoke runs)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of each sentence (unpadded) and the labels."""

    ids: list[list[int]]
    labels: Tensor  # [n], int64

    def __len__(self) -> int:
        return len(self.ids)


def pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """`(input_ids, attention_mask)`, both `[batch, longest]`: padded to the longest sentence only."""
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.as_tensor(x)
        mask[row, : len(x)] = 1
    return input_ids, mask


class StepHooks(Protocol):
    """What a method adds to each training step."""

    def extra_loss(self) -> Tensor:
        """A term added to the step's loss before `backward` (a regulariser)."""

    def after_step(self, step: int) -> None:
        """Called after `optimiser.step()` and before the gradients are cleared, with the
        0-based index of the step just taken."""


def total_steps(config: TrainingConfig, n_sentences: int) -> int:
    """How many optimiser steps `train` takes on `n_sentences` sentences."""
    total = math.ceil(n_sentences / config.batch_size) * config.epochs
    return total if config.max_steps is None else min(total, config.max_steps)


def schedule_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier for optimiser step `step` (0-based) of `total`: a linear rise
    over `warmup` steps to 1, then a linear fall, ending at `1 / (total - warmup)`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def sentence_loss(model: nn.Module, data: Encoded, pad_id: int, rows: list[int]) -> Tensor:
    """The mean cross-entropy of the sentences `rows` of `data` against their labels."""
    input_ids, mask = pad([data.ids[i] for i in rows], pad_id)
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    return F.cross_entropy(logits, data.labels[rows])


def train(
    model: nn.Module,
    size: int,
    batch_loss: Callable[[list[int]], Tensor],
    *,
    lr: float,
    config: TrainingConfig,
    seed: int,
    label: str = "train",
    hooks: StepHooks | None = None,
) -> list[float]:
    """Train `model`'s trainable parameters on `size` items, each batch's loss computed by
    `batch_loss(rows)` (the item indices of the batch: `sentence_loss`, or the decoder's
    `causal_lm.answer_loss`); returns the mean training loss of each epoch (without a hook's
    extra loss).

    The batch order comes from `seed`; a progress bar shows steps, loss and speed.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    total = total_steps(config, size)
    warmup = round(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: schedule_factor(step, warmup, total))
    order_rng = torch.Generator().manual_seed(seed)
    progress = Progress(label, total)
    losses: list[float] = []
    step = 0
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(size, generator=order_rng).tolist()
        epoch_loss, batches = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            if step == total:
                break
            rows = order[start : start + config.batch_size]
            loss = batch_loss(rows)
            (loss if hooks is None else loss + hooks.extra_loss()).backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimiser.step()
            scheduler.step()
            if hooks is not None:
                hooks.after_step(step)
            optimiser.zero_grad(set_to_none=True)
            step += 1
            epoch_loss, batches = epoch_loss + loss.item(), batches + 1
            progress.update(loss.item(), len(rows))
        if batches:
            losses.append(epoch_loss / batches)
        if step == total:
            break
    progress.close()
    return losses


@torch.no_grad()
def correct(model: nn.Module, data: Encoded, *, pad_id: int, batch_size: int = 128) -> Tensor:
    """`[n]` bool: whether the argmax logit of each sentence is its label (evaluation mode;
    batches of sentences of similar length, results in the data's order)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    hits = torch.zeros(len(data), dtype=torch.bool)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = pad([data.ids[i] for i in rows], pad_id)
        predicted = model(input_ids=input_ids, attention_mask=mask).logits.argmax(-1)
        hits[rows] = predicted == data.labels[rows]
    model.train(was_training)
    return hits
