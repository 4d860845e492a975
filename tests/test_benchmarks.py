"""The benchmark runner runs end to end (tiny shapes, one round); figures are not checked."""

import pytest
import torch

from loratrf import LoRALinear, kernels

import cases
import run


@pytest.mark.filterwarnings("ignore")
def test_quick_run_writes_every_table_and_the_goals(tmp_path):
    out, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    run.main(["--quick", "--rounds", "1", "--malloc", "default", "--out", str(out), "--plot", str(plot)])
    report = out.read_text()
    for title in (
        "LoRALinear unmerged, forward + backward, dense output gradient",
        "LoRALinear unmerged, forward + backward, `.sum()`'s expanded (stride-0) gradient",
        "LoRALinear unmerged, forward only",
        f"LoRALinear: {cases.ADDED_TITLE}",
        "LoRALinear merged",
        "TaskAwareFilter forward + backward",
        "TaskAwareFilter forward only",
        "memory saved for backward",
        "## Goals",
        "## How these figures are made",
        "## Kernels chosen in this run",
    ):
        assert title in report, title
    if cases.minilm_available() is None:
        assert "all-MiniLM-L6-v2 fine-tuning step" in report and "MiB" in report
        assert f"MiniLM step, LoRA r=8 (all six): {cases.ADDED_TITLE}" in report
    assert f"| x=[2,16,48], 48->48, r=8 | {cases.READS} |" in report
    assert "| x=[2,16,48], 48->48, r=8 | loratrf |" in report
    assert run.cpu_model() in report and "default malloc" in report
    assert plot.exists() == cases.installed("matplotlib")


@pytest.mark.parametrize("n_rows", [64, 4])  # the update folded into the weight, and added to the output
def test_added_kernels_are_the_products_the_layer_runs(monkeypatch, n_rows):
    layer = LoRALinear(16, 24, rank=4)
    cases.trained(layer.lora.V)
    monkeypatch.setattr(kernels, "FEW_ROWS", 0)  # these small products too go through the choice
    calls = []
    for name in ("mm_t", "add_low_rank"):  # every rank-r product and effective weight goes through these
        choice = getattr(kernels, name)

        def counted(*args, _choice=choice, _name=name):
            calls.append((_name, *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return _choice(*args)

        monkeypatch.setattr(kernels, name, counted)
    x = torch.randn(n_rows, 16, requires_grad=True)
    layer(x).backward(torch.randn(n_rows, 24))
    in_the_layer = sorted(calls)
    calls.clear()
    cases.added_kernels([layer], n_rows)()
    assert sorted(calls) == in_the_layer
    assert len(in_the_layer) == (6 if n_rows == 64 else 4)


def test_flop_limits_match_hand_counts():
    # d = 768, r = 8: forward + backward 1 + 1.5 * 8 * 1536 / 768², forward 1 + 8 * 1536 / 768²
    assert cases.lora_flop_limit(768, 768, 8, backward=True) == pytest.approx(1.03125)
    assert cases.lora_flop_limit(768, 768, 8, backward=False) == pytest.approx(1.0208333)
    # one token of a d=4, FFN 8 layer at sequence 2: 3 * (2 (4*16 + 2*32) + 4*2*4) = 864
    assert cases.encoder_layer_flops(1, 2, 4, 8) == 864
    assert cases.filter_flops(1, 4, 2) == 2 * 4 * 16
    # all-MiniLM-L6-v2 (d=384, FFN 1536) at 64 tokens: LoRA on all six at r=8 about 1.045x the floor
    assert cases.minilm_flop_limit("loratrf LoRA r=8 (all six)", 64) == pytest.approx(1 + 331776 / 7372800)
    assert cases.minilm_flop_limit("loratrf LoRATRF r=8 (v,f1,f2 + filters)", 64) == pytest.approx(
        1 + (48 * (768 + 3840) + 2 * 384 * 46) / 7372800
    )


@pytest.mark.filterwarnings("ignore")
def test_the_mixed_batch_benchmark_runs_end_to_end(capsys):
    import mixed

    mixed.main(["--rounds", "1", "--shape", "4", "3", "8", "--layers", "1", "--rank", "2"])
    out = capsys.readouterr().out
    assert "CPU: " in out and "thread(s)" in out and "tokens/s" in out
    for name in ("frozen stack", "loratrf use_adapters, 4 adapters", "PEFT"):
        assert name in out


def test_the_dora_benchmark_runs_end_to_end(capsys):
    import dora

    dora.main(["--rounds", "2", "--shape", "2", "4", "16", "--rank", "2"])
    out = capsys.readouterr().out
    assert "CPU: " in out and "thread(s)" in out
    for name in ("nn.Linear (frozen)", "loratrf LoRA", "loratrf DoRA", "PEFT", "loratrf DoRA / PEFT"):
        assert name in out


def test_the_meta_inject_benchmark_runs_end_to_end(capsys):
    pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")
    import meta_inject

    meta_inject.main(["--repeats", "1"])
    out = capsys.readouterr().out
    assert out.count("every tensor is on meta") == 2
    assert "LoRA 39,321,600  filters 8,519,680" in out and "LoRA 64,487,424  filters 0" in out
