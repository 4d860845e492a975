"""Tiny Hugging Face models of every family loratrf has presets for, built from configs.

Random weights, no downloads, dropout off (so train-mode and eval-mode outputs agree).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")
transformers.logging.set_verbosity_error()

VOCAB, WIDTH, FFN, LAYERS = 64, 32, 48, 2
TOKENS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    preset: str  # key of loratrf.presets.ARCHITECTURES
    build: Callable[[], torch.nn.Module]
    decoder: str | None = None  # "causal" or "seq2seq" for models that generate

    def inputs(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward arguments; decoders also get `labels`, so `output.loss` is the LM loss."""
        if self.decoder == "seq2seq":
            return dict(input_ids=ids, labels=ids.flip(-1))
        if self.decoder == "causal":
            return dict(input_ids=ids, labels=ids)
        return dict(input_ids=ids)


def encoder_config(cls, **options):
    return cls(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=FFN,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=40,
        **TOKENS,
        **options,
    )


def bert():
    return transformers.BertModel(encoder_config(transformers.BertConfig), add_pooling_layer=False)


def roberta():
    return transformers.RobertaModel(encoder_config(transformers.RobertaConfig), add_pooling_layer=False)


def deberta_v3():
    """DeBERTa-v2 code with DeBERTa-v3's options (relative positions, shared keys, no position input)."""
    config = encoder_config(
        transformers.DebertaV2Config,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=8,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        position_biased_input=False,
        type_vocab_size=0,
    )
    return transformers.DebertaV2Model(config)


def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **TOKENS,
    )
    return transformers.LlamaForCausalLM(config)


def gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=WIDTH,
        n_inner=FFN,
        n_layer=LAYERS,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **TOKENS,
    )
    return transformers.GPT2LMHeadModel(config)


def t5(feed_forward_proj="relu"):
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=WIDTH,
        d_kv=16,
        d_ff=FFN,
        num_layers=LAYERS,
        num_heads=2,
        dropout_rate=0.0,
        feed_forward_proj=feed_forward_proj,
        decoder_start_token_id=0,
        **TOKENS,
    )
    return transformers.T5ForConditionalGeneration(config)


ARCHS = [
    Arch("bert", "bert", bert),
    Arch("roberta", "bert", roberta),
    Arch("deberta-v3", "deberta", deberta_v3),
    Arch("llama", "llama", llama, "causal"),
    Arch("gpt2", "gpt2", gpt2, "causal"),
    Arch("t5", "t5", t5, "seq2seq"),
]


def token_ids(batch=2, length=7, seed=0):
    """Ids clear of the special tokens (pad 0, bos 2, eos 3)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (batch, length), generator=generator)


def main_output(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state
