import torch
from torch import nn

import loratrf


class DebertaLikeLayer(nn.Module):
    """The Linear shapes and names of one DeBERTa-v3-base layer (hidden 768, FFN 3072)."""

    def __init__(self, d=768, ffn=3072):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query_proj", "key_proj", "value_proj"):
            setattr(self.attention.self, name, nn.Linear(d, d))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(d, d)
        self.attention.output.LayerNorm = nn.LayerNorm(d)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(d, ffn)
        self.output = nn.Module()
        self.output.dense = nn.Linear(ffn, d)
        self.output.LayerNorm = nn.LayerNorm(d)


def deberta_v3_base_shape():
    with torch.device("meta"):
        model = nn.Module()
        model.encoder = nn.Module()
        model.encoder.layer = nn.ModuleList(DebertaLikeLayer() for _ in range(12))
    return model


ALL_SIX = [
    r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)_proj|attention\.output\.dense|intermediate\.dense|output\.dense)"
]
PAPER = [r"encoder\.layer\.\d+\.(attention\.self\.value_proj|intermediate\.dense|output\.dense)"]


def test_lora_on_all_six_deberta_matrices_is_the_papers_1_33m():
    model = deberta_v3_base_shape()
    loratrf.inject(model, targets=ALL_SIX, rank=8)
    counts = loratrf.summary(model)
    per_layer = 4 * (768 * 8 + 8 * 768) + 2 * (768 * 8 + 8 * 3072)
    assert counts.lora == 12 * per_layer == 1_327_104
    assert counts.filter == 0 and counts.other == 0


def test_loratrf_lora_part_is_the_papers_0_88m_and_filters_are_counted_apart():
    model = deberta_v3_base_shape()
    loratrf.inject(model, targets=PAPER, filters=[r"encoder\.layer\.\d+"], rank=8)
    counts = loratrf.summary(model)
    assert counts.lora == 884_736
    assert counts.filter == 12 * (768 + 768 * 8 + 8 * 768) == 156_672
    base = 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 2 * 2 * 768)
    assert counts.base_total == base
    assert counts.trainable == 884_736 + 156_672
    assert abs(counts.percent - 100 * counts.trainable / base) < 1e-12
    table = str(counts)
    assert "884,736" in table and "156,672" in table and f"{base:,}" in table


def test_trainable_head_counts_as_other():
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 2))
    loratrf.inject(model, targets=["0"], rank=2, trainable=["1"])
    counts = loratrf.summary(model)
    assert (counts.lora, counts.filter, counts.other, counts.base_total) == (40, 0, 22, 132)
