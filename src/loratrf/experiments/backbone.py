"""The pretrained model the experiments fine-tune: all-MiniLM-L6-v2, loaded offline from its pip package.

A 6-layer BERT (hidden 384, FFN 1536, 12 heads, 22.7M parameters) with a sequence
classification head (BERT's pooler on [CLS], then a new linear classifier).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from loratrf.experiments.packages import model_folder, require

TRANSFORMERS = "transformers==5.24.0"


class Backbone:
    """The tokenizer and the pretrained classifier, loaded once; `fresh(...)` hands out copies."""

    def __init__(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
        transformers = require("transformers", TRANSFORMERS)
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self._transformers = transformers
        self.folder = model_folder()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self._loaded: dict[int, nn.Module] = {}

    def fresh(self, num_labels: int, seed: int) -> nn.Module:
        """A copy of the pretrained model with a `num_labels`-way classifier initialised from `seed`."""
        if num_labels not in self._loaded:
            self._loaded[num_labels] = self._transformers.AutoModelForSequenceClassification.from_pretrained(
                self.folder, num_labels=num_labels, local_files_only=True
            )
        model = copy.deepcopy(self._loaded[num_labels])
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # BERT's initialisation of a new head: N(0, initializer_range), zero bias
            model.classifier.weight.normal_(0.0, model.config.initializer_range, generator=generator)
            model.classifier.bias.zero_()
        return model

    def encode(self, texts: tuple[str, ...], max_length: int) -> list[list[int]]:
        """Token ids of each text, with [CLS] and [SEP], cut to `max_length` tokens."""
        return self.tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id
