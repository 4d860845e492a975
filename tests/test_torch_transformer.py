"""PyTorch's own Transformer modules: LoRA on the feed-forward layers of
nn.TransformerEncoderLayer and nn.TransformerDecoderLayer really trains, in training and in
eval mode (where the encoder's fused fast path would skip it); nn.MultiheadAttention's
projections are refused with the reason and what to adapt instead."""

import copy
import re

import pytest
import torch
from torch import nn

import loratrf
from loratrf import InjectionError
from loratrf.walk import named_filters, named_lora_layers

D, HEADS, FFN = 8, 2, 16


class Stack(nn.Module):
    """An encoder, a decoder (over a fixed memory) or both, called as `model(x)`."""

    def __init__(self, kind, norm_first):
        super().__init__()
        self.kind = kind
        options = dict(dropout=0.0, batch_first=True, norm_first=norm_first)
        if kind in ("encoder", "transformer"):
            layer = nn.TransformerEncoderLayer(D, HEADS, FFN, **options)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)
        if kind in ("decoder", "transformer"):
            self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(D, HEADS, FFN, **options), 2)
            self.register_buffer("memory", torch.randn(2, 3, D))

    def forward(self, x, padding_mask=None):
        if self.kind == "encoder":
            return self.encoder(x, src_key_padding_mask=padding_mask)
        memory = self.encoder(self.memory) if self.kind == "transformer" else self.memory
        return self.decoder(x, memory, tgt_key_padding_mask=padding_mask)


def layer_names(kind):
    stacks = {"encoder": ["encoder"], "decoder": ["decoder"], "transformer": ["encoder", "decoder"]}[kind]
    return [f"{stack}.layers.{i}" for stack in stacks for i in range(2)]


TARGETS = [r".*layers\.\d+\.linear[12]"]
FILTERS = [r".*layers\.\d+", r".*layers\.\d+\.self_attn"]  # a layer's output and its attention's
KINDS = pytest.mark.parametrize("kind", ["encoder", "decoder", "transformer"])
NORM_FIRST = pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])


@KINDS
@NORM_FIRST
@pytest.mark.parametrize("filters", [(), FILTERS], ids=["lora", "lora+filters"])
def test_lora_on_linear1_linear2_trains_and_counts_in_eval_mode(kind, norm_first, filters):
    """Without filters (forward hooks, which also turn the fused path off) the encoder's fused
    fast path would skip linear1/linear2 in eval mode unless loratrf switched it off."""
    model = Stack(kind, norm_first)
    base = copy.deepcopy(model).eval().requires_grad_(False)  # frozen too: the same attention kernels
    loratrf.inject(model, targets=TARGETS, filters=filters, rank=4, alpha=8.0)
    lora = dict(named_lora_layers(model))
    assert sorted(lora) == sorted(f"{layer}.linear{j}" for layer in layer_names(kind) for j in (1, 2))
    assert len(list(named_filters(model))) == len(filters) * len(layer_names(kind))
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), base(x))

    model.train()
    model(x).square().mean().backward()
    assert all(layer.lora.V.grad.abs().sum() > 0 for layer in lora.values()), "every adapter gets a gradient"
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimiser.zero_grad()
        model(x).square().mean().backward()
        optimiser.step()
    assert all(layer.lora.U.grad.abs().sum() > 0 for layer in lora.values())
    trained = model(x).detach()  # training mode: no fused fast path, every submodule is called

    model.eval()
    with torch.no_grad():  # where nn.TransformerEncoder's fused fast path would run
        evaluated = model(x)
        assert not torch.allclose(evaluated, base(x), atol=1e-4)
    torch.testing.assert_close(evaluated, trained)
    loratrf.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-6)


def test_an_encoder_with_padding_masks_keeps_the_adapters_in_eval_mode():
    """Padding masks let the encoder's fast path turn the input into nested tensors."""
    model = Stack("encoder", norm_first=False)
    loratrf.inject(model, targets=TARGETS, filters=FILTERS)
    for _, layer in named_lora_layers(model):
        nn.init.normal_(layer.lora.V)
    x, mask = torch.randn(2, 5, D), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    trained = model.train()(x, mask).detach()
    with torch.no_grad():
        evaluated = model.eval()(x, mask)
    torch.testing.assert_close(evaluated[~mask], trained[~mask])


ATTENTION = r"nn\.MultiheadAttention keeps its q, k, v projections in a packed Parameter \(in_proj_weight\)"
INSTEAD = r"Adapt the feed-forward layers instead \(linear1/linear2 of nn\.TransformerEncoderLayer or nn\.TransformerDecoderLayer\)"


@pytest.mark.parametrize(
    "kwargs, where",
    [
        (dict(targets=[r"encoder\.layers\.\d+\.self_attn\.out_proj"]), "'encoder.layers.0.self_attn.out_proj': "),
        (
            dict(targets=[r"decoder\.layers\.1\.multihead_attn\.out_proj"]),
            "'decoder.layers.1.multihead_attn.out_proj': ",
        ),
        (dict(filters=[r"decoder\.layers\.0\.self_attn\.out_proj"]), "'decoder.layers.0.self_attn.out_proj': "),
        (dict(targets=[r"encoder\.layers\.0\.self_attn"]), "'encoder.layers.0.self_attn' is a MultiheadAttention: "),
        (
            dict(targets=[r".*self_attn\.in_proj"]),
            "encoder.layers.0.self_attn.in_proj_weight is a parameter, not a module: ",
        ),
        (
            dict(targets=[r".*\.(q|k|v)_proj"]),
            "encoder.layers.0.self_attn.q_proj_weight is a parameter, not a module: ",
        ),
    ],
    ids=["out_proj", "cross-attention out_proj", "filter on out_proj", "the attention module", "in_proj", "q_proj"],
)
def test_attention_projections_are_refused_with_why_and_what_to_adapt_instead(kwargs, where):
    model = Stack("transformer", norm_first=False)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InjectionError) as refused:
        loratrf.inject(model, **kwargs)
    message = str(refused.value)
    assert where in message and re.search(ATTENTION, message)
    assert "never calls out_proj" in message and re.search(INSTEAD, message)
    assert not list(named_lora_layers(model)) and model.state_dict().keys() == before.keys()
