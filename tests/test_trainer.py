"""LoRATRFTrainer: a real transformers.Trainer on a config-built BERT classifier, whose
checkpoints hold the adapter file (no base weights) and resume to the same per-step losses."""

from __future__ import annotations

import pytest
import torch
from hf_architectures import encoder_config, token_ids, transformers

import loratrf
from loratrf.adapter_file import read_adapter_file

pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (the `hf` extra)")
from loratrf.integrations.trainer import ADAPTER_NAME, LoRATRFTrainer

STEPS, SAVE_EVERY, BATCH = 8, 3, 4
BASE_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "adapter_model.safetensors")


def classifier(inject=True):
    """A tiny BERT classifier with dropout on (the Trainer's saved RNG state must bring it back)."""
    torch.manual_seed(0)
    config = encoder_config(transformers.BertConfig, num_labels=3)
    config.hidden_dropout_prob = 0.1
    model = transformers.BertForSequenceClassification(config)
    if not inject:
        return model
    loratrf.inject(
        model,
        targets=[r"bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)"],
        filters=[r"bert\.encoder\.layer\.\d+"],
        rank=4,
        dropout=0.1,
        trainable=["classifier"],
    )
    return model


class Examples(torch.utils.data.Dataset):
    def __init__(self, n=20):
        self.ids = token_ids(batch=n, length=6, seed=1)
        self.labels = torch.arange(n) % 3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class RecordingTrainer(LoRATRFTrainer):
    """Keeps every training step's loss unrounded (the logged ones are rounded)."""

    losses: list[float]

    def compute_loss(self, *args, **kwargs):
        loss = super().compute_loss(*args, **kwargs)
        if self.model.training:
            self.losses.append(loss.item())
        return loss


def run(output_dir, model, resume=None, **options):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=5e-3,
        warmup_steps=2,
        save_steps=SAVE_EVERY,
        logging_steps=1,
        seed=0,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        **options,
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=Examples(), eval_dataset=Examples(8))
    trainer.losses = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("into", ["injected", "bare-base"])
def test_checkpoints_hold_the_adapter_and_resuming_repeats_the_run(tmp_path, into):
    whole = run(tmp_path / "whole", classifier())
    assert len(whole.losses) == STEPS and len(set(whole.losses)) > 1

    checkpoint = tmp_path / "whole" / f"checkpoint-{SAVE_EVERY}"
    names = {p.name for p in checkpoint.iterdir()}
    assert ADAPTER_NAME in names and "config.json" in names and "optimizer.pt" in names, names
    assert not names & set(BASE_FILES), names
    plan, tensors = read_adapter_file(checkpoint / ADAPTER_NAME)
    assert plan.trainable == ("classifier.weight", "classifier.bias") and plan.filters
    base_bytes = sum(p.numel() * p.element_size() for p in whole.model.parameters() if not p.requires_grad)
    adapter_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert (checkpoint / ADAPTER_NAME).stat().st_size < adapter_bytes + 16_384 < base_bytes

    model = classifier(inject=into == "injected")  # a bare base gets the adapters from the file
    with torch.no_grad():  # a different start: everything must come from the checkpoint
        for name, p in model.named_parameters():
            if p.requires_grad and (into == "injected" or name.startswith("classifier")):
                p.add_(1.0)
    resumed = run(tmp_path / "resumed", model, resume=str(checkpoint))
    assert resumed.losses == whole.losses[SAVE_EVERY:]
    # the logged history: the checkpoint's first steps, then the resumed ones
    logged = [entry["loss"] for entry in resumed.state.log_history if "loss" in entry]
    assert logged == [entry["loss"] for entry in whole.state.log_history if "loss" in entry]
    assert logged[SAVE_EVERY:] == pytest.approx(resumed.losses, abs=5e-5)  # transformers 4 rounds them
    theirs = loratrf.adapter_state_dict(whole.model)
    for key, tensor in loratrf.adapter_state_dict(resumed.model).items():
        assert torch.equal(tensor, theirs[key]), key


def test_best_model_at_end_and_save_model_use_the_adapter_file(tmp_path):
    # "best" = the highest evaluation loss: an earlier checkpoint than the last, so loading it shows
    options = dict(eval_strategy="steps", eval_steps=SAVE_EVERY, load_best_model_at_end=True, greater_is_better=True)
    trainer = run(tmp_path / "run", classifier(), **options)
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith(f"-{STEPS}"), best
    _, tensors = read_adapter_file(f"{best}/{ADAPTER_NAME}")
    _, last = read_adapter_file(tmp_path / "run" / f"checkpoint-{STEPS}" / ADAPTER_NAME)
    loaded = loratrf.adapter_state_dict(trainer.model)
    assert all(torch.equal(tensor, tensors[key]) for key, tensor in loaded.items())  # the best one, loaded back
    assert not all(torch.equal(tensor, last[key]) for key, tensor in loaded.items())
    trainer.save_model(str(tmp_path / "final"))
    assert not {p.name for p in (tmp_path / "final").iterdir()} & set(BASE_FILES)

    torch.manual_seed(0)
    fresh = transformers.BertForSequenceClassification(trainer.model.config)  # the same base (seed 0)
    loratrf.load_adapter(fresh, tmp_path / "final" / ADAPTER_NAME)
    ids = token_ids()
    trainer.model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, trainer.model(input_ids=ids).logits, atol=0, rtol=0)
