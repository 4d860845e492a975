"""The end-to-end story on a small torch model, in a few seconds on a CPU.

inject -> train until the loss falls -> merge (outputs agree) -> save the adapter ->
load it into a fresh base model (outputs agree). Run: `python examples/story.py` (`make story`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import loratrf

VOCAB, LENGTH, WIDTH, MARK = 32, 12, 64, 7


class Classifier(nn.Module):
    """A small frozen Transformer encoder with a classification head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 4 * WIDTH, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def base_model() -> Classifier:
    """The 'pretrained' base: the same weights every time."""
    torch.manual_seed(1234)
    return Classifier()


def batch(size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences, labelled 1 when the marker token occurs at least twice."""
    tokens = torch.randint(0, VOCAB, (size, LENGTH), generator=generator)
    labels = torch.randint(0, 2, (size,), generator=generator)
    for i in range(size):
        spots = torch.randperm(LENGTH, generator=generator)[:2]
        tokens[i, tokens[i] == MARK] = MARK + 1
        tokens[i, spots[: 1 + int(labels[i])]] = MARK
    return tokens, labels


def accuracy(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(tokens).argmax(-1) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the adapter (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    test_tokens, test_labels = batch(1000, data)

    model = base_model()
    print(
        f"base model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"test accuracy {accuracy(model.eval(), test_tokens, test_labels):.3f}"
    )
    config = loratrf.inject(
        model,
        targets=[r"encoder\.layers\.\d+\.linear[12]"],
        filters=[r"encoder\.layers\.\d+"],
        rank=8,
        alpha=16,
        trainable=["head"],
    )
    print(f"injected: LoRA on {len(config.targets)} pattern(s), filters on each layer\n{loratrf.summary(model)}")

    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    start, first_loss, loss = time.perf_counter(), None, torch.tensor(0.0)
    for step in range(1, args.steps + 1):
        tokens, labels = batch(64, data)
        loss = nn.functional.cross_entropy(model(tokens), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        first_loss = first_loss if first_loss is not None else loss.item()
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - start:.1f} s)")
    model.eval()
    trained_acc = accuracy(model, test_tokens, test_labels)
    print(f"trained: loss {first_loss:.4f} -> {loss.item():.4f}, test accuracy {trained_acc:.3f}")

    with torch.no_grad():
        unmerged = model(test_tokens)
        loratrf.merge(model)
        merged = model(test_tokens)
        loratrf.unmerge(model)
    merge_gap = (merged - unmerged).abs().max().item()
    print(f"merged vs unmerged logits: max |difference| = {merge_gap:.2e}")

    folder = args.out or Path(tempfile.mkdtemp(prefix="loratrf-story-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "adapter.safetensors"
    loratrf.save_adapter(model, path)
    fresh = base_model()
    loratrf.load_adapter(fresh, path)
    with torch.no_grad():
        reload_gap = (fresh.eval()(test_tokens) - unmerged).abs().max().item()
    print(
        f"saved {path} ({path.stat().st_size / 1024:.0f} KiB); reloaded into a fresh base model: "
        f"max |difference| = {reload_gap:.2e}"
    )
    return {
        "first_loss": first_loss,
        "final_loss": loss.item(),
        "accuracy": trained_acc,
        "merge_gap": merge_gap,
        "reload_gap": reload_gap,
    }


if __name__ == "__main__":
    main()
