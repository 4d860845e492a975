"""Presets on the real architectures they name: each pattern reaches exactly the intended
modules of every layer, and the paper's parameter budgets on DeBERTa-v3-base and LLaMA-7B."""

import pathlib
import re

import pytest
import torch

import loratrf
from hf_architectures import LAYERS, deberta_v3, encoder_config, gpt2, llama, t5, transformers
import meta_inject  # after hf_architectures, which skips this file without transformers
from loratrf import InjectionConfig, presets
from loratrf.walk import named_filters, named_lora_layers

# The modules of layer {i} that hold each of the paper's matrices, written out by hand.
BERT = {
    "q": ["attention.self.query"],
    "k": ["attention.self.key"],
    "v": ["attention.self.value"],
    "o": ["attention.output.dense"],
    "f1": ["intermediate.dense"],
    "f2": ["output.dense"],
}
DEBERTA = {
    **BERT,
    "q": ["attention.self.query_proj"],
    "k": ["attention.self.key_proj"],
    "v": ["attention.self.value_proj"],
}
LLAMA = {
    "q": ["self_attn.q_proj"],
    "k": ["self_attn.k_proj"],
    "v": ["self_attn.v_proj"],
    "o": ["self_attn.o_proj"],
    "gate": ["mlp.gate_proj"],
    "f1": ["mlp.up_proj"],
    "f2": ["mlp.down_proj"],
}
GPT2 = {
    "q": ["attn.c_attn"],
    "k": ["attn.c_attn"],
    "v": ["attn.c_attn"],
    "o": ["attn.c_proj"],
    "f1": ["mlp.c_fc"],
    "f2": ["mlp.c_proj"],
}
T5_ENCODER = {m: [f"layer.0.SelfAttention.{m}"] for m in "qkvo"} | {
    "f1": ["layer.1.DenseReluDense.wi"],
    "f2": ["layer.1.DenseReluDense.wo"],
}
T5_DECODER = {m: [f"layer.0.SelfAttention.{m}", f"layer.1.EncDecAttention.{m}"] for m in "qkvo"}
T5_DECODER |= {"f1": ["layer.2.DenseReluDense.wi"], "f2": ["layer.2.DenseReluDense.wo"]}


FUSED = {"gpt2": ("q", "k", "v")}  # one Conv1D, c_attn, computes all three


def bert_for_classification():
    return transformers.BertForSequenceClassification(encoder_config(transformers.BertConfig))


def roberta_for_masked_lm():
    return transformers.RobertaForMaskedLM(encoder_config(transformers.RobertaConfig))


def t5_v1_1():
    return t5(feed_forward_proj="gated-gelu")


def gated(layout):
    """T5 v1.1's gated FFN: W_f1 is both `wi_0` and `wi_1`."""
    return layout | {"f1": [f"{name}_{j}" for name in layout["f1"] for j in (0, 1)]}


# preset, builder, {layer prefix (with {i}): per-matrix modules inside that layer}
CASES = {
    "bert": ("bert", bert_for_classification, {"bert.encoder.layer.{i}": BERT}),
    "roberta": ("bert", roberta_for_masked_lm, {"roberta.encoder.layer.{i}": BERT}),
    "deberta-v3": ("deberta", deberta_v3, {"encoder.layer.{i}": DEBERTA}),
    "llama": ("llama", llama, {"model.layers.{i}": LLAMA}),
    "gpt2": ("gpt2", gpt2, {"transformer.h.{i}": GPT2}),
    "t5": ("t5", t5, {"encoder.block.{i}": T5_ENCODER, "decoder.block.{i}": T5_DECODER}),
    "t5-v1.1": ("t5", t5_v1_1, {"encoder.block.{i}": gated(T5_ENCODER), "decoder.block.{i}": gated(T5_DECODER)}),
}


def expected_names(layers, matrices):
    return {
        f"{prefix.format(i=i)}.{module}"
        for prefix, layout in layers.items()
        for i in range(LAYERS)
        for m in matrices
        for module in layout[m]
    }


def injected_names(build, config):
    model = build()
    loratrf.inject(model, **config.to_dict())
    return {name for name, _ in named_lora_layers(model)}, {host for host, _ in named_filters(model)}


@pytest.mark.parametrize("case", CASES)
def test_each_matrix_pattern_reaches_exactly_its_modules_in_every_layer(case):
    arch, build, layers = CASES[case]
    assert set(presets.ARCHITECTURES[arch].matrices) == set(next(iter(layers.values())))
    for matrix in presets.ARCHITECTURES[arch].matrices:
        fused = FUSED.get(arch, ())
        chosen = fused if matrix in fused else (matrix,)
        lora, filters = injected_names(build, presets.preset(arch, chosen, filters=True))
        assert lora == expected_names(layers, chosen), matrix
        assert filters == {prefix.format(i=i) for prefix in layers for i in range(LAYERS)}


@pytest.mark.parametrize(
    "config, build, layers, matrices",
    [
        (presets.LORATRF_DEBERTA_V3, deberta_v3, {"encoder.layer.{i}": DEBERTA}, ("v", "f1", "f2")),
        (presets.LORA_DEBERTA_V3, deberta_v3, {"encoder.layer.{i}": DEBERTA}, ("q", "k", "v", "o", "f1", "f2")),
        (presets.LORATRF_LLAMA, llama, {"model.layers.{i}": LLAMA}, ("o", "f1", "f2")),
        (presets.LORA_LLAMA, llama, {"model.layers.{i}": LLAMA}, ("q", "k", "v", "o", "f1", "f2")),
    ],
    ids=["LORATRF_DEBERTA_V3", "LORA_DEBERTA_V3", "LORATRF_LLAMA", "LORA_LLAMA"],
)
def test_the_papers_presets_adapt_exactly_their_matrices(config, build, layers, matrices):
    lora, filters = injected_names(build, config)
    assert lora == expected_names(layers, matrices)
    has_filters = config is presets.LORATRF_DEBERTA_V3 or config is presets.LORATRF_LLAMA
    assert filters == ({p.format(i=i) for p in layers for i in range(LAYERS)} if has_filters else set())


def test_the_papers_ranks_and_alphas():
    assert (presets.LORATRF_DEBERTA_V3.rank, presets.LORATRF_DEBERTA_V3.alpha) == (8, 16.0)
    assert (presets.LORA_DEBERTA_V3.rank, presets.LORA_DEBERTA_V3.alpha) == (8, 16.0)
    assert (presets.LORATRF_LLAMA.rank, presets.LORATRF_LLAMA.alpha) == (32, 64.0)
    assert (presets.LORA_LLAMA.rank, presets.LORA_LLAMA.alpha) == (32, 64.0)


def test_part_of_gpt2s_fused_qkv_is_refused():
    with pytest.raises(ValueError, match=r"q, k, v with one module \(attn\.c_attn\).*all of \['q', 'k', 'v'\] or none"):
        presets.preset("gpt2", ("v", "o"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(architecture="opt"), "unknown architecture 'opt'; known: "),
        (dict(architecture="bert", matrices=("gate",)), r"bert has no matrices \['gate'\]"),
    ],
)
def test_bad_preset_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        presets.preset(**kwargs)


def deberta_v3_base():
    """microsoft/deberta-v3-base's config, built on the meta device (no memory)."""
    config = transformers.DebertaV2Config(
        vocab_size=128100,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        relative_attention=True,
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        type_vocab_size=0,
    )
    with torch.device("meta"):
        return transformers.DebertaV2Model(config)


def counts(model, config):
    loratrf.inject(model, **config.to_dict())
    assert all(p.is_meta for p in model.parameters())
    return loratrf.summary(model)


def lora_params(r, d_in, d_out):
    return r * (d_in + d_out)  # A [r, d_in] and B [d_out, r]


def filter_params(r, d):
    return d + 2 * d * r  # t [d], U [d, r], V [r, d]


def test_deberta_v3_base_budgets_are_the_papers():
    d, ffn, layers, r = 768, 3072, 12, 8
    base = 128100 * d + 2 * d + 2 * 256 * d + 2 * d  # embeddings, their norm, relative embeddings, their norm
    base += layers * (4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 2 * 2 * d)
    lora = counts(deberta_v3_base(), presets.LORA_DEBERTA_V3)
    assert (
        lora.lora == layers * (4 * lora_params(r, d, d) + lora_params(r, d, ffn) + lora_params(r, ffn, d)) == 1_327_104
    )
    assert (lora.filter, lora.other, lora.base_total) == (0, 0, base)
    loratrf_ = counts(deberta_v3_base(), presets.LORATRF_DEBERTA_V3)
    assert loratrf_.lora == layers * (lora_params(r, d, d) + lora_params(r, d, ffn) + lora_params(r, ffn, d)) == 884_736
    assert loratrf_.filter == layers * filter_params(r, d) == 156_672
    assert loratrf_.other == 0 and loratrf_.base_total == base == 183_831_552
    assert 3 * (lora.lora - loratrf_.lora) == lora.lora  # 33.3% fewer LoRA parameters


def test_llama_7b_budgets():
    d, ffn, layers, vocab, r = 4096, 11008, 32, 32000, 32
    base = 2 * vocab * d + d + layers * (4 * d * d + 3 * d * ffn + 2 * d)  # no biases, untied head
    lora = counts(meta_inject.build(), presets.LORA_LLAMA)
    assert (
        lora.lora == layers * (4 * lora_params(r, d, d) + lora_params(r, d, ffn) + lora_params(r, ffn, d)) == 64_487_424
    )
    assert (lora.filter, lora.base_total) == (0, base) and base == 6_738_415_616
    loratrf_ = counts(meta_inject.build(), presets.LORATRF_LLAMA)
    assert (
        loratrf_.lora == layers * (lora_params(r, d, d) + lora_params(r, d, ffn) + lora_params(r, ffn, d)) == 39_321_600
    )
    assert loratrf_.filter == layers * filter_params(r, d) == 8_519_680
    assert loratrf_.trainable == 47_841_280


DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "models.md"
SNIPPET = re.compile(
    r'^loratrf\.inject\(model, targets=\[r"([^"]+)"\], filters=\[r"([^"]+)"\]\)  # = (presets\.preset\([^)]*\))$', re.M
)
BUILDERS = {"bert": bert_for_classification, "deberta": deberta_v3, "llama": llama, "gpt2": gpt2, "t5": t5_v1_1}


def test_the_copy_pasteable_patterns_in_the_docs_inject_what_their_presets_inject():
    snippets = SNIPPET.findall(DOCS.read_text())
    assert len(snippets) == len(BUILDERS)
    for targets, filters, expression in snippets:
        config = eval(expression, {"presets": presets})
        build = BUILDERS[expression.split('"')[1]]
        written = injected_names(build, InjectionConfig(targets=[targets], filters=[filters]))
        assert written == injected_names(build, config), expression
