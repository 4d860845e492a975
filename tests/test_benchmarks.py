"""The benchmark runner runs end to end (tiny shapes, one round); figures are not checked."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cases  # noqa: E402
import run  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_quick_run_writes_every_table_and_the_goals(tmp_path):
    out, plot = tmp_path / "bench.md", tmp_path / "bench.png"
    run.main(["--quick", "--rounds", "1", "--malloc", "default", "--out", str(out), "--plot", str(plot)])
    report = out.read_text()
    for title in (
        "LoRALinear unmerged, forward + backward",
        "LoRALinear unmerged, forward only",
        "LoRALinear merged",
        "TaskAwareFilter forward + backward",
        "memory saved for backward",
        "encoder training step",
        "## Goals",
        "## How these figures are made",
    ):
        assert title in report, title
    assert "| x=[2,16,48], 48->48, r=8 | loratrf |" in report
    assert plot.exists() == cases.installed("matplotlib")


def test_flop_limits_match_hand_counts():
    # d = 768, r = 8: forward + backward 1 + 1.5 * 8 * 1536 / 768², forward 1 + 8 * 1536 / 768²
    assert cases.lora_flop_limit(768, 768, 8, backward=True) == pytest.approx(1.03125)
    assert cases.lora_flop_limit(768, 768, 8, backward=False) == pytest.approx(1.0208333)
    # one token of a d=4, FFN 8 layer at sequence 2: 3 * (2 (4*16 + 2*32) + 4*2*4) = 864
    assert cases.encoder_layer_flops(1, 2, 4, 8) == 864
    assert cases.filter_flops(1, 4, 2) == 2 * 4 * 16
