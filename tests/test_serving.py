"""export_peft(..., for_serving="vllm"): each thing vLLM cannot serve is refused, before anything
is written, with its reason and the way out; what it can serve is written as without the check."""

import re

import pytest
import torch
from torch import nn

import loratrf
from loratrf import AdapterFileError
from loratrf.peft_format import CONFIG_NAME, WEIGHTS_NAME
from loratrf.serving import VLLM_MAX_LORA_RANKS, vllm_problems


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def refused(tmp_path, match, **export):
    folder = tmp_path / "out"
    with pytest.raises(AdapterFileError, match=match):
        loratrf.export_peft(export.pop("model"), folder, for_serving="vllm", **export)
    assert not folder.exists()  # nothing written


def test_a_plain_lora_adapter_is_written_as_without_the_check(tmp_path):
    model = Tiny()
    loratrf.inject(model, targets=["body", "head"], rank=8, alpha=16)
    served = loratrf.export_peft(model, tmp_path / "served", for_serving="vllm")
    plain = loratrf.export_peft(model, tmp_path / "plain")
    assert served == plain
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / "served" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_dora_is_refused_with_the_way_out(tmp_path):
    model = Tiny()
    loratrf.inject(model, targets=["body"], dora=True)
    refused(tmp_path, r"use_dora: vLLM does not serve DoRA.*loratrf\.unload\(model\)", model=model)
    loratrf.export_peft(model, tmp_path / "peft")  # without for_serving: today's behaviour


def test_modules_to_save_are_refused_unless_left_out(tmp_path):
    model = Tiny()
    loratrf.inject(model, targets=["body"], trainable=["head"])
    refused(tmp_path, r"modules_to_save \['head'\]: vLLM loads no modules_to_save.*lora_only=True", model=model)
    config = loratrf.export_peft(model, tmp_path / "lora", lora_only=True, for_serving="vllm")
    assert config["modules_to_save"] is None


def test_filters_are_refused_unless_left_out(tmp_path):
    model = Tiny()
    loratrf.inject(model, targets=["body"], filters=["body"])
    refused(tmp_path, r"task-aware filters \(on 'body'\).*lora_only=True", model=model)
    loratrf.export_peft(model, tmp_path / "lora", lora_only=True, for_serving="vllm")


@pytest.mark.parametrize("rank, ok", [(VLLM_MAX_LORA_RANKS[-1], True), (VLLM_MAX_LORA_RANKS[-1] + 1, False)])
def test_a_rank_above_vllms_largest_max_lora_rank_is_refused(tmp_path, rank, ok):
    model = Tiny()
    loratrf.inject(model, targets=["body"], rank=2)
    loratrf.inject(model, targets=["head"], rank=rank)  # a rank_pattern entry, not the config's r
    if ok:
        config = loratrf.export_peft(model, tmp_path / "ok", for_serving="vllm")
        assert config["rank_pattern"] == {"head": rank}
    else:
        refused(tmp_path, rf"rank \[{rank}\]: above 512, the largest --max-lora-rank", model=model)


@pytest.mark.parametrize(
    "config, keys, match",
    [
        ({"bias": "all"}, [], r"bias='all': vLLM loads no trained base biases"),
        ({"trainable_token_indices": [3]}, ["base_model.model.e.token_adapter.trainable_tokens_delta"], "token rows"),
        ({}, ["base_model.model.fc.lora_A.weight", "base_model.model.fc.lora_bias"], r"does not read: \['base_model"),
        ({"use_dora": True}, ["base_model.model.fc.lora_magnitude_vector"], "^use_dora"),
    ],
    ids=["bias", "trainable-tokens", "unknown-tensor", "dora-magnitude-counted-once"],
)
def test_what_no_export_of_loratrf_writes_is_refused_too(config, keys, match):
    """Folders written elsewhere (PEFT's own), checked by the same function."""
    problems = vllm_problems({"r": 8, **config}, keys, [])
    assert len(problems) == 1 and re.search(match, problems[0])


def test_vllm_reads_lora_and_embedding_tensors():
    read = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")
    keys = [f"base_model.model.m.{k}" for k in read]
    assert vllm_problems({"r": 8}, keys, []) == []


def test_an_unknown_server_is_refused(tmp_path):
    model = Tiny()
    loratrf.inject(model, targets=["body"])
    with pytest.raises(AdapterFileError, match=r"for_serving names the server.*\('vllm',\); got 'tgi'"):
        loratrf.export_peft(model, tmp_path / "x", for_serving="tgi")
