import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import loratrf
from loratrf import AdapterFileError, InjectionError
from loratrf.adapter_file import FORMAT, read_adapter_file
from models import FILTERS, TARGETS, Net, randomise_adapters

ids = torch.randint(0, 20, (3, 6))


def trained(seed=0, **options):
    torch.manual_seed(seed)
    model = Net(d=16)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, **options)
    randomise_adapters(model)
    return model, base_state


def fresh_base(base_state):
    model = Net(d=16)
    model.load_state_dict(base_state)
    return model


@given(
    st.integers(0, 1000),
    st.integers(1, 6),
    st.floats(1.0, 32.0),
    st.sampled_from(["cosine", "dot"]),
    st.booleans(),
    st.sampled_from([None, "float64"]),
)
def test_save_load_round_trip_reproduces_outputs_exactly(
    tmp_path_factory, seed, rank, alpha, similarity, rslora, dtype
):
    path = tmp_path_factory.mktemp("adapter") / "adapter.pt"
    model, base_state = trained(seed, rank=rank, alpha=alpha, similarity=similarity, rslora=rslora, adapter_dtype=dtype)
    loratrf.save_adapter(model, path)
    other = fresh_base(base_state)
    loratrf.load_adapter(other, path)
    assert torch.equal(other(ids), model(ids))
    assert {n for n, p in other.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert other.layers[0].up.lora.U.dtype == model.layers[0].up.lora.U.dtype


def test_the_file_holds_only_adapter_tensors_and_the_trainable_head(tmp_path):
    model, _ = trained(trainable=["head"])
    loratrf.save_adapter(model, tmp_path / "a.pt")
    metadata, tensors = read_adapter_file(tmp_path / "a.pt")
    assert set(tensors) == {k for k in model.state_dict() if ".lora." in k or ".task_filter." in k} | {
        "head.weight",
        "head.bias",
    }
    assert metadata["trainable"] == ["head.weight", "head.bias"]
    assert set(metadata["lora"]) == {f"layers.{i}.{m}" for i in range(2) for m in ("value", "up", "down")}
    assert metadata["filters"]["layers.0"]["dim"] == 16
    assert set(loratrf.adapter_state_dict(model)) == set(tensors)


def test_trainable_head_is_restored_and_trainable(tmp_path):
    model, base_state = trained(trainable=["head"])
    with torch.no_grad():
        model.head.weight.add_(1.0)
    loratrf.save_adapter(model, tmp_path / "a.pt")
    other = fresh_base(base_state)
    loratrf.load_adapter(other, tmp_path / "a.pt")
    assert torch.equal(other.head.weight, model.head.weight) and other.head.weight.requires_grad
    assert torch.equal(other(ids), model(ids))


def test_loading_into_a_model_that_already_holds_the_same_adapters(tmp_path):
    model, base_state = trained()
    loratrf.save_adapter(model, tmp_path / "a.pt")
    other = fresh_base(base_state)
    loratrf.inject(other, targets=TARGETS, filters=FILTERS)
    loratrf.load_adapter(other, tmp_path / "a.pt")
    assert torch.equal(other(ids), model(ids))
    different = fresh_base(base_state)
    loratrf.inject(different, targets=TARGETS, rank=2)
    with pytest.raises(AdapterFileError, match="already holds a different LoRA adapter"):
        loratrf.load_adapter(different, tmp_path / "a.pt")


def test_merged_model_saves_the_adapter_not_the_merged_weights(tmp_path):
    model, base_state = trained()
    y = model(ids)
    loratrf.merge(model)
    loratrf.save_adapter(model, tmp_path / "a.pt")
    other = fresh_base(base_state)
    loratrf.load_adapter(other, tmp_path / "a.pt")
    torch.testing.assert_close(other(ids), y, rtol=1e-4, atol=1e-4)


def test_a_file_from_another_model_names_what_does_not_fit(tmp_path):
    model, _ = trained()
    loratrf.save_adapter(model, tmp_path / "a.pt")
    wider = Net(d=24)
    with pytest.raises(AdapterFileError, match=r"layers\.0\.value\.lora\.U: file \(16, 8\), model \(24, 8\)"):
        loratrf.load_adapter(wider, tmp_path / "a.pt")
    shallow = Net(layers=1, d=16)
    with pytest.raises(AdapterFileError, match=r"another model.*'layers\.1\.value'"):
        loratrf.load_adapter(shallow, tmp_path / "a.pt")
    assert not any(".lora." in k for k in wider.state_dict()) and not any(".lora." in k for k in shallow.state_dict())


def _rewrite(path, edit):
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["tensors"].pop("layers.0.up.lora.V"), r"missing: \['layers\.0\.up\.lora\.V'\]"),
        (lambda p: p["tensors"].update(extra=torch.zeros(2)), r"unexpected: \['extra'\]"),
        (
            lambda p: p["tensors"].update({"layers.0.up.lora.V": torch.zeros(3, 3)}),
            r"layers\.0\.up\.lora\.V: file \(3, 3\)",
        ),
        (lambda p: p.update(version=99), "newer than this loratrf reads"),
        (lambda p: p.update(format="safetensors"), "not a loratrf adapter file"),
        (lambda p: p.update(metadata="{not json"), "metadata is malformed"),
    ],
)
def test_inconsistent_files_are_refused_with_the_keys(tmp_path, edit, message):
    model, base_state = trained()
    path = tmp_path / "a.pt"
    loratrf.save_adapter(model, path)

    def edit_and_rehash(payload):
        edit(payload)
        if isinstance(payload.get("tensors"), dict):
            from loratrf.adapter_file import tensors_digest

            payload["sha256"] = tensors_digest(payload["tensors"])

    _rewrite(path, edit_and_rehash)
    other = fresh_base(base_state)
    with pytest.raises(AdapterFileError, match=message):
        loratrf.load_adapter(other, path)
    assert list(other.state_dict()) == list(base_state)  # the model is untouched


def test_damaged_files_are_refused(tmp_path):
    model, base_state = trained()
    path = tmp_path / "a.pt"
    loratrf.save_adapter(model, path)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="not a readable loratrf adapter file"):
        loratrf.load_adapter(fresh_base(base_state), tmp_path / "truncated.pt")
    (tmp_path / "noise.pt").write_bytes(os.urandom(2000))
    with pytest.raises(AdapterFileError, match="not a readable"):
        loratrf.load_adapter(fresh_base(base_state), tmp_path / "noise.pt")
    with pytest.raises(AdapterFileError, match="no adapter file"):
        loratrf.load_adapter(fresh_base(base_state), tmp_path / "missing.pt")


def test_flipped_tensor_bytes_fail_the_checksum(tmp_path):
    model, base_state = trained()
    path = tmp_path / "a.pt"
    loratrf.save_adapter(model, path)
    _rewrite(path, lambda p: p["tensors"]["layers.0.up.lora.V"].view(-1)[0].add_(1.0))
    with pytest.raises(AdapterFileError, match="corrupted"):
        loratrf.load_adapter(fresh_base(base_state), path)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_file_crafted_to_run_code_does_not_run_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "metadata": Payload(str(marker)), "tensors": {}}, path)
    with pytest.raises(AdapterFileError, match="runs no pickled code"):
        loratrf.load_adapter(Net(), path)
    assert not marker.exists()


def test_saving_is_atomic(tmp_path, monkeypatch):
    model, _ = trained()
    path = tmp_path / "a.pt"
    loratrf.save_adapter(model, path)
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        loratrf.save_adapter(model, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt"]


def test_saving_a_model_without_adapters_or_on_meta_is_refused(tmp_path):
    with pytest.raises(AdapterFileError, match="no adapter"):
        loratrf.save_adapter(Net(), tmp_path / "a.pt")
    with torch.device("meta"):
        model = Net()
    loratrf.inject(model, targets=TARGETS)
    with pytest.raises(AdapterFileError, match="meta device"):
        loratrf.save_adapter(model, tmp_path / "a.pt")


def test_metadata_is_plain_json(tmp_path):
    model, _ = trained()
    loratrf.save_adapter(model, tmp_path / "a.pt")
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert json.loads(raw["metadata"])["lora"]["layers.0.value"] == {
        "rank": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "init": "kaiming",
        "rslora": False,
        "dtype": "float32",
    }


def test_a_module_in_the_way_is_an_injection_error_and_nothing_changes(tmp_path):
    model, base_state = trained()
    loratrf.save_adapter(model, tmp_path / "a.pt")
    other = fresh_base(base_state)
    other.layers[0].value.register_forward_hook(lambda *a: None)
    with pytest.raises(InjectionError, match="hooks"):
        loratrf.load_adapter(other, tmp_path / "a.pt")
    assert list(other.state_dict()) == list(base_state)
    assert Path(tmp_path / "a.pt").exists()
