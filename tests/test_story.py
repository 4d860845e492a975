from loratrf.experiments import story


def test_the_story_trains_merges_saves_and_reloads(tmp_path, capsys):
    figures = story.main(["--steps", "60", "--out", str(tmp_path)])
    assert figures["final_loss"] < 0.5 * figures["first_loss"]
    assert figures["merge_gap"] < 1e-3
    assert figures["reload_gap"] == 0.0
    assert (tmp_path / "adapter.safetensors").exists()
    printed = capsys.readouterr().out
    assert "merged vs unmerged" in printed and "reloaded into a fresh base model" in printed
