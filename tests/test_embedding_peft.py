"""LoRA on embeddings through PEFT's folders (`lora_embedding_A` / `lora_embedding_B`), both
ways, against PEFT itself: equal logits with tied and untied embeddings, PEFT's saved base
table checked rather than refused, and a property test of the round trip."""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch
from hf_architectures import llama, token_ids, transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import loratrf
from loratrf import AdapterFileError
from loratrf.embedding import LoRAEmbedding
from loratrf.peft_format import WEIGHTS_NAME

peft = pytest.importorskip("peft", reason="the `test` extra (peft) is not installed")

ATOL = 1e-5


def randomise(model, seed=1):
    """Random LoRA factors, loratrf's or PEFT's (either starts with one factor at zero), and
    random positive DoRA magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            elif ".lora." in name or "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def decoder(tied):
    config = llama().config
    config.tie_word_embeddings = tied
    return transformers.LlamaForCausalLM(config).eval()


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied, dora", [(True, False), (False, False), (True, True)], ids=["tied", "untied", "dora"])
def test_peft_in_and_out_with_equal_logits(tmp_path, tied, dora):
    base = decoder(tied)
    config = peft.LoraConfig(target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8, use_dora=dora)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    saved = safetensors.torch.load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved  # PEFT's copy of the table
    ids = token_ids()

    model = copy.deepcopy(base)
    loratrf.import_peft(model, tmp_path / "peft")
    assert isinstance(model.model.embed_tokens, LoRAEmbedding)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=0, atol=ATOL)

    loratrf.export_peft(model, tmp_path / "out", for_serving=None if dora else "vllm")
    written = safetensors.torch.load_file(tmp_path / "out" / WEIGHTS_NAME)
    keys = ["lora_embedding_A", "lora_embedding_B", *["lora_magnitude_vector"] * dora]
    assert {k for k in written if "embed_tokens" in k} == {f"base_model.model.model.embed_tokens.{k}" for k in keys}
    for key in keys:  # PEFT's own layout, exactly
        full = f"base_model.model.model.embed_tokens.{key}"
        assert torch.equal(written[full], saved[full])
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=ATOL)


class Tokens(nn.Module):
    def __init__(self, vocab=13, dim=6, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids):
        return self.out(torch.tanh(self.embed(ids)))


@settings(max_examples=10)
@given(
    rank=st.integers(1, 6),
    alpha=st.sampled_from([1, 2.5, 8, 16]),
    rslora=st.booleans(),
    padding_idx=st.one_of(st.none(), st.integers(0, 12)),
    seed=st.integers(0, 2**16),
)
def test_export_then_import_round_trips_through_peft(tmp_path_factory, rank, alpha, rslora, padding_idx, seed):
    torch.manual_seed(seed)
    base = Tokens(padding_idx=padding_idx)
    model = copy.deepcopy(base)
    loratrf.inject(model, targets=["embed", "out"], rank=rank, alpha=alpha, rslora=rslora)
    randomise(model, seed)
    directory = tmp_path_factory.mktemp("peft")
    loratrf.export_peft(model, directory)
    ids = torch.randint(0, 13, (3, 4), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(ids)
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
        torch.testing.assert_close(peft_model(ids), expected, rtol=0, atol=ATOL)
        back = copy.deepcopy(base)
        loratrf.import_peft(back, directory)
        torch.testing.assert_close(back(ids), expected, rtol=0, atol=0)


def test_import_checks_what_it_cannot_load(tmp_path):
    base = decoder(tied=True)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    randomise(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")  # with PEFT's copy of the table, base_layer.weight
    loratrf.import_peft(copy.deepcopy(base), tmp_path / "peft")  # the very table: checked, and fine

    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.embed_tokens.weight[3] += 1.0  # not the table the adapter was trained on
    key = r"'base_model\.model\.model\.embed_tokens\.base_layer\.weight'"
    with pytest.raises(AdapterFileError, match=key + ": the saved base weight differs from this model's"):
        loratrf.import_peft(other, tmp_path / "peft")
    assert type(other.model.embed_tokens) is nn.Embedding  # refused before anything changed

    path = tmp_path / "peft" / WEIGHTS_NAME
    tensors = safetensors.torch.load_file(path)
    q_proj = "model.layers.0.self_attn.q_proj"
    moved = {k.replace("model.embed_tokens.lora_", f"{q_proj}.lora_"): t for k, t in tensors.items() if q_proj not in k}
    safetensors.torch.save_file(moved, path)
    with pytest.raises(AdapterFileError, match=f"'{q_proj}' is a Linear, and its LoRA tensors are an embedding's"):
        loratrf.import_peft(copy.deepcopy(base), tmp_path / "peft")
