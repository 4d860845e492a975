"""Fine-tuning a decoder LLM on question-answer pairs, and scoring it by what it generates.

The recipe, top to bottom:
1. `encode`: each question becomes the model's chat prompt (`apply_chat_template` with the
   generation prompt), each answer its tokens and the end-of-turn token;
2. `answer_loss`: prompt and answer side by side, padded on the right, and the cross-entropy of
   the next token over the answer tokens only (every prompt and padding position masked);
3. `train`: AdamW on the trainable parameters, the sentence experiments' linear schedule and
   gradient clipping, optionally with gradient checkpointing;
4. `generate`: greedy decoding of a batch of prompts padded on the LEFT, with the KV cache, until
   every row has ended its answer;
5. the task's scorer (`problems.Problems.exact`) marks each decoded answer right or wrong.

Shapes: B problems in a batch, T tokens of the longest, V the vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loratrf
from loratrf.experiments import training
from loratrf.experiments.training import TrainingConfig

IGNORE = -100  # the label of a position that is not scored (F.cross_entropy's ignore_index)


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of each prompt (chat template and generation prompt included) and of each
    answer (its text, then the end-of-turn token)."""

    prompts: list[list[int]]
    answers: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)


def encode(tokenizer, questions: Sequence[str], answers: Sequence[str], system: str | None = None) -> Encoded:
    """The chat prompt of each question (after the `system` message, if any) and the tokens of
    each answer: the assistant's turn as the template writes it, `answer<|im_end|>` on SmolLM2."""
    first = [{"role": "system", "content": system}] if system is not None else []
    chats = [[*first, {"role": "user", "content": q}] for q in questions]
    texts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    prompts = tokenizer(texts, add_special_tokens=False)["input_ids"]
    end = [tokenizer.eos_token_id]
    return Encoded(prompts, [ids + end for ids in tokenizer(list(answers), add_special_tokens=False)["input_ids"]])


def pad_right(rows: Sequence[Sequence[int]], value: int) -> Tensor:
    """`[B, T]`: each row followed by `value` up to the longest."""
    longest = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (longest - len(r)) for r in rows], dtype=torch.long)


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """`(input_ids, attention_mask)`, `[B, T]`: each row preceded by padding, so that every row's
    last token is in the last column and the next token is generated for all rows at once."""
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (longest - len(r)) + list(r) for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def answer_loss(
    model: nn.Module, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
) -> Tensor:
    """The mean cross-entropy of predicting each answer token from everything before it:
    `-(1/N) Σ log p(y_t | x, y_<t)` over the N answer tokens of the batch. Rows are prompt +
    answer, padded on the right (positions stay 0, 1, 2, ... from each row's first token)."""
    device = next(model.parameters()).device
    ids = pad_right([p + a for p, a in zip(prompts, answers)], pad_id).to(device)  # (B, T)
    mask = pad_right([[1] * (len(p) + len(a)) for p, a in zip(prompts, answers)], 0).to(device)  # (B, T)
    labels = pad_right([[IGNORE] * len(p) + list(a) for p, a in zip(prompts, answers)], IGNORE).to(device)
    targets = labels[:, 1:]  # position t predicts token t + 1
    # the head runs only where some row has an answer token to predict (K of T positions)
    keep = (targets != IGNORE).any(0).nonzero().squeeze(1)  # (K,)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits  # (B, K, V)
    return F.cross_entropy(logits.flatten(0, 1), targets[:, keep].flatten(), ignore_index=IGNORE)


def train(
    model: nn.Module,
    data: Encoded,
    *,
    lr: float,
    config: TrainingConfig,
    seed: int,
    pad_id: int,
    label: str = "train",
    checkpointing: bool = False,
) -> list[float]:
    """Train `model`'s trainable parameters on `data` with the answer-only loss; returns each
    epoch's mean loss. `checkpointing`: recompute each layer's activations in the backward pass
    instead of storing them (transformers' activation checkpointing: less memory, about a third
    more compute; the same gradients). transformers checkpoints each layer's `forward`, so a
    filter (a forward hook on the layer) runs once, outside the recomputed part, and keeps its
    own activations."""
    if not any(p.requires_grad for p in model.parameters()):
        return []
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def batch_loss(rows: list[int]) -> Tensor:
        return answer_loss(model, [data.prompts[i] for i in rows], [data.answers[i] for i in rows], pad_id)

    losses = training.train(model, len(data), batch_loss, lr=lr, config=config, seed=seed, label=label)
    if checkpointing:
        model.activation_checkpointing_disable()
    model.eval()
    return losses


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    end_id: int,
    max_new_tokens: int,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy answers (token ids, without the end token) to a batch of prompts, padded on the left.

    Each step feeds the newest token only and reuses the keys and values of the earlier ones
    (the KV cache; `use_cache=False` recomputes the whole sequence, for checking). Positions count
    from each row's first real token, so a padded row computes what it computes alone."""
    was_training = model.training
    model.eval()
    ids, mask = (t.to(next(model.parameters()).device) for t in pad_left(prompts, pad_id))  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    out: list[Tensor] = []
    cache, step_ids, step_positions = None, ids, positions
    for _ in range(max_new_tokens):
        result = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_positions,
            cache=cache,
            use_cache=use_cache,
            logits_to_keep=1,  # only the last position's logits are needed
        )
        token = result.logits[:, -1].argmax(-1).cpu()  # (B,)
        token = torch.where(done, end_id, token)
        out.append(token)
        done |= token == end_id
        if done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        ids = torch.cat([ids, token[:, None].to(ids.device)], dim=1)
        if use_cache:
            cache, step_ids, step_positions = result.cache, ids[:, -1:], positions[:, -1:]
        else:
            step_ids, step_positions = ids, positions
    model.train(was_training)
    tokens = torch.stack(out, dim=1).tolist()  # (B, new tokens)
    return [row[: row.index(end_id)] if end_id in row else row for row in tokens]


def answer_texts(
    model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy answers as text, in the prompts' order: batches of prompts of similar length (less
    padding), decoded without special tokens and stripped. Each unmerged LoRA layer forms its
    effective weight once for all of them (`loratrf.cache_effective_weights`)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [""] * len(prompts)
    with loratrf.cache_effective_weights(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            answers = generate(
                model,
                [prompts[i] for i in rows],
                pad_id=tokenizer.pad_token_id,
                end_id=tokenizer.eos_token_id,
                max_new_tokens=max_new_tokens,
            )
            for i, answer in zip(rows, answers):
                texts[i] = tokenizer.decode(answer, skip_special_tokens=True).strip()
    return texts
