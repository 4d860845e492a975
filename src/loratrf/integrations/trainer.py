"""`transformers.Trainer` checkpoints that hold the loratrf adapter file, not the base weights.

    from loratrf.integrations.trainer import LoRATRFTrainer

    loratrf.inject(model, targets=[...], filters=[...], trainable=["classifier"])
    trainer = LoRATRFTrainer(model=model, args=TrainingArguments(..., save_steps=100), ...)
    trainer.train()                                   # checkpoint-*/loratrf_adapter.safetensors
    trainer.train(resume_from_checkpoint=True)        # a later run picks up where it stopped

Each checkpoint (and `trainer.save_model()`) writes `loratrf_adapter.safetensors`, the
`loratrf.save_adapter` file of the adapters and the trainable base parameters, beside the
model's `config.json` and the Trainer's own optimizer, scheduler, RNG and state files; the base
weights are never written. Resuming loads the adapter file (`loratrf.load_adapter`, which also
injects the adapters into a model that lacks them), as does `load_best_model_at_end`. A
checkpoint without the file (one written by a plain `Trainer`) is loaded as `Trainer` loads it.

`AdapterCheckpointMixin` brings the same to another `Trainer` subclass:
`class MyTrainer(AdapterCheckpointMixin, SFTTrainer): ...`. Needs the `hf` extra.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from loratrf.adapter_file import load_adapter, save_adapter
from loratrf.walk import unwrap

ADAPTER_NAME = "loratrf_adapter.safetensors"
TRAINING_ARGS_NAME = "training_args.bin"  # transformers' name for the saved TrainingArguments


class AdapterCheckpointMixin:
    """Overrides `Trainer`'s model saving and loading with loratrf's adapter file."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = unwrap(self.accelerator.unwrap_model(self.model))
        save_adapter(model, os.path.join(output_dir, ADAPTER_NAME))
        config = getattr(model, "config", None)
        if hasattr(config, "save_pretrained"):
            config.save_pretrained(output_dir)  # config.json: which architecture the adapter is for
        processor = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if processor is not None:
            processor.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = os.path.join(resume_from_checkpoint, ADAPTER_NAME)
        if not os.path.isfile(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter(unwrap(self.accelerator.unwrap_model(model if model is not None else self.model)), path)

    def _load_best_model(self) -> None:
        path = os.path.join(self.state.best_model_checkpoint, ADAPTER_NAME)
        if not os.path.isfile(path):
            return super()._load_best_model()
        load_adapter(unwrap(self.accelerator.unwrap_model(self.model)), path)


class LoRATRFTrainer(AdapterCheckpointMixin, Trainer):
    """`transformers.Trainer` whose checkpoints hold loratrf's adapter file instead of the base weights."""


__all__ = ["ADAPTER_NAME", "AdapterCheckpointMixin", "LoRATRFTrainer"]
