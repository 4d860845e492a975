"""LoRAEmbedding against the formula written out here, `E[x] + (alpha / r) · (A[:, x])ᵀ Bᵀ`
with PEFT's `A [r, num_embeddings]`, `B [dim, r]`: a rank-r change of the table, exact merges,
several adapters, one per row, adapter files, unload, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from einops import einsum
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loratrf
from loratrf import InjectionError, MergeError
from loratrf.embedding import LoRAEmbedding

V, D = 11, 6


class Tokens(nn.Module):
    """ids `[B, T]` -> `[B, T, V]`: an embedding, a nonlinearity and a linear read-out."""

    def __init__(self, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(V, D, padding_idx=padding_idx)
        self.out = nn.Linear(D, V)

    def forward(self, ids):
        return self.out(torch.tanh(self.embed(ids)))


def randomise(layer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parts in (layer.parts(n) for n in layer.adapter_names()):
            parts.lora.U.copy_(torch.randn(parts.lora.U.shape, generator=generator, dtype=parts.lora.U.dtype))
            parts.lora.V.copy_(torch.randn(parts.lora.V.shape, generator=generator, dtype=parts.lora.V.dtype))


def reference(E, A, B, scale, ids):
    """`E[x] + scale · (A[:, x])ᵀ Bᵀ`, in float64."""
    E, A, B = E.double(), A.double(), B.double()
    return E[ids] + scale * einsum(A[:, ids], B, "r ..., d r -> ... d")


def ids(batch=3, length=5, seed=0):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_the_update_is_a_rank_r_change_of_the_table():
    base = nn.Embedding(V, D).double()
    layer = LoRAEmbedding.from_embedding(base, rank=2, alpha=5.0)
    x = ids()
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # starts as the base
    randomise(layer)
    A, B = layer.lora.U.T, layer.lora.V.T  # PEFT's lora_embedding_A [r, V] and lora_embedding_B [D, r]
    torch.testing.assert_close(layer(x), reference(base.weight, A, B, 2.5, x), rtol=1e-12, atol=1e-12)
    delta = layer(torch.arange(V)) - base.weight  # the change of every row of the table
    assert torch.linalg.matrix_rank(delta) == 2
    torch.testing.assert_close(delta, 2.5 * A.T @ B.T, rtol=1e-12, atol=1e-12)


@given(
    rank=st.integers(1, 5),
    alpha=st.floats(0.25, 8.0),
    rslora=st.booleans(),
    padding_idx=st.one_of(st.none(), st.integers(0, V - 1)),
    seed=st.integers(0, 2**16),
)
def test_merge_computes_the_unmerged_layer_and_unmerge_restores_the_table(rank, alpha, rslora, padding_idx, seed):
    base = nn.Embedding(V, D, padding_idx=padding_idx).double()
    table = base.weight.detach().clone()
    layer = LoRAEmbedding.from_embedding(base, rank=rank, alpha=alpha, rslora=rslora)
    randomise(layer, seed)
    x = ids(seed=seed)
    scale = alpha / rank**0.5 if rslora else alpha / rank
    expected = reference(table, layer.lora.U.T, layer.lora.V.T, scale, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    layer.merge()
    torch.testing.assert_close(layer.weight, table + scale * layer.lora.U @ layer.lora.V, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, table, rtol=1e-12, atol=1e-12)
    assert layer.weight is base.weight  # the very Parameter, kept throughout


@given(rank=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_dora_scales_each_embedding_dimension_by_its_magnitude_over_the_norm(rank, seed):
    """`f ⊙ (E[x] + s (A[:, x])ᵀ Bᵀ)` with `f = m / ‖E + s Aᵀ Bᵀ‖`, the norm over the tokens
    (PEFT's DoRA on embeddings); `m` starts at the norms of `E`, so a fresh layer is its base."""
    base = nn.Embedding(V, D).double()
    table = base.weight.detach().clone()
    layer = LoRAEmbedding.from_embedding(base, rank=rank, alpha=2.0, dora=True)
    x = ids(seed=seed)
    torch.testing.assert_close(layer(x), table[x], rtol=0, atol=0)
    randomise(layer, seed)
    with torch.no_grad():
        layer.magnitude.mul_(torch.rand(D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5)
    A, B, scale = layer.lora.U.T, layer.lora.V.T, 2.0 / rank
    adapted = table + scale * A.T @ B.T
    f = layer.magnitude.detach() / adapted.norm(dim=0)
    expected = f * reference(table, A, B, scale, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    layer.merge()
    torch.testing.assert_close(layer.weight, f * adapted, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, table, rtol=1e-10, atol=1e-10)


def test_inject_picks_an_embedding_by_name_and_it_trains_alone():
    model = Tokens()
    x = ids()
    before = model(x)
    loratrf.inject(model, targets=["embed"], rank=3)
    assert isinstance(model.embed, LoRAEmbedding)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"embed.lora.U", "embed.lora.V"}
    assert {"embed.weight", "embed.lora.U", "embed.lora.V"} <= set(model.state_dict())
    model(x).sum().backward()
    assert model.embed.lora.V.grad.abs().sum() > 0 and model.embed.weight.grad is None


def test_several_adapters_one_per_row_files_and_unload(tmp_path):
    model = Tokens(padding_idx=0)
    base = copy.deepcopy(model)
    loratrf.inject(model, targets=["embed", "out"], rank=2)
    loratrf.inject(model, targets=["embed"], rank=3, alpha=3.0, adapter="b")
    randomise(model.embed)
    x = ids(batch=3)
    alone = {}
    for name in ("default", "b", None):
        loratrf.set_adapter(model, name)
        alone[name] = model(x)
    with loratrf.use_adapters(model, ["b", None, "default"]):
        mixed = model(x)
    torch.testing.assert_close(mixed, torch.stack([alone["b"][0], alone[None][1], alone["default"][2]]))
    torch.testing.assert_close(alone[None], base(x), rtol=0, atol=0)

    loratrf.set_adapter(model, "b")
    loratrf.save_adapter(model, tmp_path / "b.safetensors", adapter="b")
    fresh = copy.deepcopy(base)
    loratrf.load_adapter(fresh, tmp_path / "b.safetensors")
    torch.testing.assert_close(fresh(x), alone["b"], rtol=0, atol=0)

    loratrf.delete_adapter(model, "default")
    plain = loratrf.unload(model)  # merges "b" into the table
    assert type(plain.embed) is nn.Embedding and plain.embed.padding_idx == 0
    torch.testing.assert_close(plain(x), alone["b"], rtol=1e-6, atol=1e-6)


def test_unload_without_merging_gives_back_the_base():
    model = Tokens()
    base = copy.deepcopy(model)
    loratrf.inject(model, targets=["embed"], rank=2)
    randomise(model.embed)
    loratrf.unload(model, merge=False)
    assert type(model.embed) is nn.Embedding
    torch.testing.assert_close(model(ids()), base(ids()), rtol=0, atol=0)


class Scaled(nn.Embedding):
    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize(
    "module, options, match",
    [
        (Scaled(V, D), {}, "'embed' is a Scaled, an nn.Embedding subclass with its own forward"),
        (nn.Embedding(V, D, max_norm=1.0), {}, r"'embed' renormalises its rows \(max_norm=1.0\)"),
    ],
    ids=["subclass", "max-norm"],
)
def test_embeddings_loratrf_cannot_adapt_are_refused_before_anything_changes(module, options, match):
    model = Tokens()
    model.embed = module
    with pytest.raises(InjectionError, match=match):
        loratrf.inject(model, targets=["embed", "out"], **options)
    assert model.embed is module and type(model.out) is nn.Linear


def test_resizing_before_inject_works_and_after_inject_is_refused():
    from hf_architectures import llama, token_ids

    model = llama()
    model.resize_token_embeddings(70)  # the documented order: new tokens' rows first
    loratrf.inject(model, targets=[r"model\.embed_tokens"], rank=2)
    assert model(input_ids=token_ids()).logits.shape[-1] == 70
    model.resize_token_embeddings(72)
    with pytest.raises(InjectionError, match=r"LoRAEmbedding's base weight is now \[72, 32\], but its adapters were"):
        model(input_ids=token_ids())


def test_lora_on_a_tied_embedding_leaves_the_head_on_the_base_table():
    """As PEFT: the tied head keeps reading the shared base table; the adapter changes the lookup
    alone. Folding it into the shared table would change the head too, so merge is refused."""
    from hf_architectures import llama, token_ids, transformers

    config = llama().config
    config.tie_word_embeddings = True
    model = transformers.LlamaForCausalLM(config).eval()
    loratrf.inject(model, targets=[r"model\.embed_tokens"], rank=2)
    randomise(model.model.embed_tokens)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    x = token_ids()
    hidden = model.model(input_ids=x).last_hidden_state
    torch.testing.assert_close(model(input_ids=x).logits, hidden @ model.model.embed_tokens.weight.T)
    with pytest.raises(MergeError, match="tied"):
        loratrf.merge(model)
    assert not model.model.embed_tokens.merged


def test_combined_embedding_adapters_are_the_weighted_sum_of_their_tables():
    model = Tokens()
    loratrf.inject(model, targets=["embed"], rank=2, alpha=4.0)
    loratrf.inject(model, targets=["embed"], rank=3, alpha=1.5, adapter="b")
    randomise(model.embed)
    layer = model.embed
    a, b = layer.parts("default").lora, layer.parts("b").lora
    loratrf.combine_adapters(model, {"default": 0.5, "b": -2.0}, "mix")
    loratrf.set_adapter(model, "mix")
    x = ids()
    E = layer.weight.double()
    delta = 0.5 * a.scale * a.U.double() @ a.V.double() - 2.0 * b.scale * b.U.double() @ b.V.double()
    torch.testing.assert_close(layer(x).double(), (E + delta)[x], rtol=1e-6, atol=1e-6)


@given(rank=st.integers(1, 5), alpha=st.floats(0.5, 16.0), padding_idx=st.one_of(st.none(), st.integers(0, V - 1)))
def test_an_adapter_file_round_trips_an_embedding_exactly(tmp_path_factory, rank, alpha, padding_idx):
    base = Tokens(padding_idx=padding_idx)
    model = copy.deepcopy(base)
    loratrf.inject(model, targets=["embed"], rank=rank, alpha=alpha)
    randomise(model.embed, rank)
    path = tmp_path_factory.mktemp("file") / "embed.safetensors"
    loratrf.save_adapter(model, path)
    fresh = copy.deepcopy(base)
    loratrf.load_adapter(fresh, path)
    assert isinstance(fresh.embed, LoRAEmbedding) and fresh.embed.spec == model.embed.spec
    torch.testing.assert_close(fresh(ids()), model(ids()), rtol=0, atol=0)
