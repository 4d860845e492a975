import importlib.util
from pathlib import Path

STORY = Path(__file__).resolve().parents[1] / "examples" / "story.py"


def load_story():
    spec = importlib.util.spec_from_file_location("story", STORY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_story_trains_merges_saves_and_reloads(tmp_path, capsys):
    figures = load_story().main(["--steps", "60", "--out", str(tmp_path)])
    assert figures["final_loss"] < 0.5 * figures["first_loss"]
    assert figures["merge_gap"] < 1e-3
    assert figures["reload_gap"] == 0.0
    assert (tmp_path / "adapter.safetensors").exists()
    printed = capsys.readouterr().out
    assert "merged vs unmerged" in printed and "reloaded into a fresh base model" in printed
