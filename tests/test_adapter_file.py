import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

import loratrf
from loratrf import AdapterFileError, InjectionError, LoRATRFError
from adapter_edits import raw, rewrite
from loratrf.adapter_file import FORMAT, read_adapter_file
from models import FILTERS, TARGETS, Net, randomise_adapters

ids = torch.randint(0, 20, (3, 6))
ADAPTER = "adapter.safetensors"


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


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained model, its base state and its file's bytes."""
    path = tmp_path_factory.mktemp("saved") / ADAPTER
    model, base_state = trained()
    loratrf.save_adapter(model, path)
    return model, base_state, path.read_bytes()


@given(
    st.integers(0, 1000),
    st.integers(1, 6),
    st.floats(1.0, 32.0),
    st.sampled_from(["cosine", "dot"]),
    st.booleans(),
    st.sampled_from([None, "float64", "bfloat16"]),
)
def test_save_load_round_trip_reproduces_outputs_exactly(
    tmp_path_factory, seed, rank, alpha, similarity, rslora, dtype
):
    path = tmp_path_factory.mktemp("adapter") / ADAPTER
    model, base_state = trained(seed, rank=rank, alpha=alpha, similarity=similarity, rslora=rslora, adapter_dtype=dtype)
    loratrf.save_adapter(model, path)
    other = fresh_base(base_state)
    loratrf.load_adapter(other, path)
    assert torch.equal(other(ids), model(ids))
    assert {n for n, p in other.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert other.layers[0].up.lora.U.dtype == model.layers[0].up.lora.U.dtype
    assert other.layers[0].up.spec == model.layers[0].up.spec
    assert other.layers[1].task_filter.spec == model.layers[1].task_filter.spec


def test_the_file_is_safetensors_with_only_adapter_tensors_and_the_trainable_head(tmp_path):
    model, _ = trained(trainable=["head"])
    loratrf.save_adapter(model, tmp_path / ADAPTER)
    tensors = safetensors.torch.load_file(tmp_path / ADAPTER)  # any safetensors reader reads it
    assert set(tensors) == {k for k in model.state_dict() if ".lora." in k or ".task_filter." in k} | {
        "head.weight",
        "head.bias",
    }
    assert all(torch.equal(tensors[k], v) for k, v in loratrf.adapter_state_dict(model).items())
    plan, _ = read_adapter_file(tmp_path / ADAPTER)
    assert plan.trainable == ("head.weight", "head.bias")
    assert set(plan.lora) == {f"layers.{i}.{m}" for i in range(2) for m in ("value", "up", "down")}
    assert plan.filters["layers.0"].dim == 16


def test_the_plan_in_the_metadata_is_plain_json(tmp_path):
    model, _ = trained()
    loratrf.save_adapter(model, tmp_path / ADAPTER)
    metadata, _ = raw(tmp_path / ADAPTER)
    assert metadata["format"] == FORMAT and metadata["version"] == "4"
    plan = json.loads(metadata["plan"])
    assert plan["lora"]["layers.0.value"] == {
        "rank": 8,
        "alpha": 16.0,
        "dropout": 0.0,
        "init": "kaiming",
        "rslora": False,
        "adapter_dtype": "float32",
        "dora": False,
    }
    assert plan["filters"]["layers.1"] == {
        "dim": 16,
        "rank": 8,
        "alpha": 16.0,
        "similarity": "cosine",
        "task_init": "normal",
        "init": "kaiming",
        "adapter_dtype": "float32",
        "gate": "paper",
    }


def test_trainable_head_is_restored_and_trainable(tmp_path):
    model, base_state = trained(trainable=["head"])
    with torch.no_grad():
        model.head.weight.add_(1.0)
    loratrf.save_adapter(model, tmp_path / ADAPTER)
    other = fresh_base(base_state)
    loratrf.load_adapter(other, tmp_path / ADAPTER)
    assert torch.equal(other.head.weight, model.head.weight) and other.head.weight.requires_grad
    assert torch.equal(other(ids), model(ids))


def test_loading_into_a_model_that_already_holds_the_same_adapters(tmp_path):
    model, base_state = trained()
    loratrf.save_adapter(model, tmp_path / ADAPTER)
    other = fresh_base(base_state)
    loratrf.inject(other, targets=TARGETS, filters=FILTERS)
    loratrf.load_adapter(other, tmp_path / ADAPTER)
    assert torch.equal(other(ids), model(ids))
    different = fresh_base(base_state)
    loratrf.inject(different, targets=TARGETS, rank=2)
    with pytest.raises(AdapterFileError, match="already holds a different LoRA adapter"):
        loratrf.load_adapter(different, tmp_path / ADAPTER)


def test_merged_model_saves_the_adapter_not_the_merged_weights(tmp_path):
    model, base_state = trained()
    y = model(ids)
    loratrf.merge(model)
    loratrf.save_adapter(model, tmp_path / ADAPTER)
    other = fresh_base(base_state)
    loratrf.load_adapter(other, tmp_path / ADAPTER)
    torch.testing.assert_close(other(ids), y, rtol=1e-4, atol=1e-4)


def test_a_file_from_another_model_names_what_does_not_fit(tmp_path):
    model, _ = trained()
    loratrf.save_adapter(model, tmp_path / ADAPTER)
    wider = Net(d=24)
    with pytest.raises(AdapterFileError, match=r"layers\.0\.value\.lora\.U: file \(16, 8\), model \(24, 8\)"):
        loratrf.load_adapter(wider, tmp_path / ADAPTER)
    shallow = Net(layers=1, d=16)
    with pytest.raises(AdapterFileError, match=r"another model.*'layers\.1\.value'"):
        loratrf.load_adapter(shallow, tmp_path / ADAPTER)
    assert not any(".lora." in k for k in wider.state_dict()) and not any(".lora." in k for k in shallow.state_dict())


def _plan_edit(edit):
    def apply(metadata, tensors):
        plan = json.loads(metadata["plan"])
        edit(plan)
        metadata["plan"] = json.dumps(plan)

    return apply


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m, t: t.pop("layers.0.up.lora.V"), r"missing: \['layers\.0\.up\.lora\.V'\]"),
        (lambda m, t: t.update(extra=torch.zeros(2)), r"unexpected: \['extra'\]"),
        (lambda m, t: t.update({"layers.0.up.lora.V": torch.zeros(3, 3)}), r"layers\.0\.up\.lora\.V: file \(3, 3\)"),
        (
            lambda m, t: m.update(version="99"),
            r"version '99'; this loratrf reads versions \(2, 3, 4\); upgrade loratrf",
        ),
        (lambda m, t: m.update(version="1"), r"version '1'; this loratrf reads versions \(2, 3, 4\)$"),
        (lambda m, t: m.update(format="peft"), "not a loratrf adapter"),
        (lambda m, t: m.update(plan="{not json"), "plan .* is malformed"),
        (_plan_edit(lambda p: p["lora"]["layers.0.up"].update(rank=0)), "malformed: rank must be an integer >= 1"),
        (_plan_edit(lambda p: p["filters"]["layers.0"].update(similarity="l2")), "malformed: similarity must be"),
        (
            _plan_edit(lambda p: p["lora"]["layers.0.up"].update(ranks=2)),
            r"malformed: unknown LoRASpec option.*'ranks'",
        ),
        (_plan_edit(lambda p: p["filters"]["layers.0"].pop("dim")), "malformed: incomplete FilterSpec"),
        (_plan_edit(lambda p: p.update(extra=1)), "malformed: a plan is a mapping with exactly the keys"),
        (_plan_edit(lambda p: p.update(trainable="head")), "malformed: a plan's 'trainable' is a list"),
        (_plan_edit(lambda p: p["lora"].update({"layers.0.key": 3})), "malformed: a LoRASpec is a mapping"),
        (_plan_edit(lambda p: p["filters"]["layers.0"].update(adapter_dtype="int8")), "malformed: adapter_dtype"),
    ],
)
def test_inconsistent_files_are_refused_with_the_reason(saved, tmp_path, edit, message):
    _, base_state, data = saved
    path = tmp_path / ADAPTER
    path.write_bytes(data)
    rewrite(path, edit)
    other = fresh_base(base_state)
    with pytest.raises(AdapterFileError, match=message):
        loratrf.load_adapter(other, path)
    assert list(other.state_dict()) == list(base_state)  # the model is untouched


def test_damaged_missing_and_foreign_files_are_refused(saved, tmp_path):
    _, base_state, data = saved
    (tmp_path / "noise").write_bytes(os.urandom(2000))
    (tmp_path / "empty").write_bytes(b"")
    torch.save({"format": FORMAT, "tensors": {}}, tmp_path / "pickle.pt")  # loratrf's old torch.save format
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    cases = {
        "noise": "not a readable loratrf adapter file",
        "empty": "not a readable",
        "pickle.pt": "not a readable",
        "plain.safetensors": "but not a loratrf adapter",
        "missing": "no adapter file at",
    }
    for name, message in cases.items():
        with pytest.raises(AdapterFileError, match=message):
            loratrf.load_adapter(fresh_base(base_state), tmp_path / name)


@given(st.data())
def test_any_truncation_is_an_adapter_file_error(saved, tmp_path_factory, data):
    model, base_state, good = saved
    cut = data.draw(st.integers(0, len(good) - 1))
    path = tmp_path_factory.mktemp("cut") / ADAPTER
    path.write_bytes(good[:cut])
    other = fresh_base(base_state)
    with pytest.raises(AdapterFileError):
        loratrf.load_adapter(other, path)
    assert list(other.state_dict()) == list(base_state)


@given(st.data())
def test_any_bit_flip_is_an_adapter_file_error(saved, tmp_path_factory, data):
    """A flipped bit in the header length, the header (names, dtypes, shapes, offsets, the
    plan, the checksum) or the tensor bytes: always refused, never loaded as something else."""
    model, base_state, good = saved
    flips = data.draw(st.lists(st.integers(0, 8 * len(good) - 1), min_size=1, max_size=3, unique=True))
    damaged = bytearray(good)
    for bit in flips:
        damaged[bit // 8] ^= 1 << (bit % 8)
    path = tmp_path_factory.mktemp("flip") / ADAPTER
    path.write_bytes(bytes(damaged))
    other = fresh_base(base_state)
    with pytest.raises(AdapterFileError):
        loratrf.load_adapter(other, path)
    assert list(other.state_dict()) == list(base_state)


def _with_header(header: object, body: bytes = b"\0" * 64) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=12,
    )
)
def test_edited_headers_are_adapter_file_errors(tmp_path_factory, header):
    path = tmp_path_factory.mktemp("header") / ADAPTER
    path.write_bytes(_with_header(header))
    with pytest.raises(LoRATRFError):
        loratrf.load_adapter(Net(d=16), path)


def test_headers_that_claim_huge_sizes_allocate_nothing(tmp_path):
    huge = 1 << 40  # 4 TiB of float32, far beyond this machine
    metadata = {"format": FORMAT, "version": "2", "plan": "{}", "sha256": ""}
    claims = {
        "a tensor larger than the file": {
            "__metadata__": metadata,
            "w": {"dtype": "F32", "shape": [huge], "data_offsets": [0, 4 * huge]},
        },
        "a shape that disagrees with its offsets": {
            "__metadata__": metadata,
            "w": {"dtype": "F32", "shape": [huge], "data_offsets": [0, 64]},
        },
    }
    for name, header in claims.items():
        (tmp_path / name).write_bytes(_with_header(header))
        with pytest.raises(AdapterFileError, match="not a readable"):
            loratrf.load_adapter(Net(d=16), tmp_path / name)
    (tmp_path / "header length").write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(AdapterFileError, match="not a readable"):
        loratrf.load_adapter(Net(d=16), tmp_path / "header length")


def test_flipped_tensor_bytes_fail_the_checksum(saved, tmp_path):
    _, base_state, data = saved
    path = tmp_path / ADAPTER
    path.write_bytes(data)
    rewrite(path, lambda m, t: t["layers.0.up.lora.V"].view(-1)[0].add_(1.0), rehash=False)
    with pytest.raises(AdapterFileError, match="corrupted"):
        loratrf.load_adapter(fresh_base(base_state), path)


def test_saving_is_atomic(tmp_path, monkeypatch):
    model, _ = trained()
    path = tmp_path / ADAPTER
    loratrf.save_adapter(model, path)
    good = path.read_bytes()

    def crash(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        loratrf.save_adapter(model, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == [ADAPTER]


KILLED_MID_SAVE = textwrap.dedent(
    """
    import os, sys, time
    import torch
    import loratrf

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    loratrf.inject(model, targets=[r"\\d"], rank=4)
    real_fsync = os.fsync

    def stall(fd):  # the new file is written, not yet renamed into place: say so, then hang
        print("writing", flush=True)
        time.sleep(120)

    os.fsync = stall
    loratrf.save_adapter(model, sys.argv[1])
    """
)


def test_kill_9_in_the_middle_of_a_save_leaves_the_previous_file_intact(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    loratrf.inject(model, targets=[r"\d"], rank=4)
    path = tmp_path / ADAPTER
    loratrf.save_adapter(model, path)
    good = path.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == good
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora." not in k})
    loratrf.load_adapter(fresh, path)
    x = torch.randn(2, 64)
    assert torch.equal(fresh(x), model(x))


def test_saving_a_model_without_adapters_or_on_meta_is_refused(tmp_path):
    with pytest.raises(AdapterFileError, match="no adapter"):
        loratrf.save_adapter(Net(), tmp_path / ADAPTER)
    with torch.device("meta"):
        model = Net()
    loratrf.inject(model, targets=TARGETS)
    with pytest.raises(AdapterFileError, match="meta device"):
        loratrf.save_adapter(model, tmp_path / ADAPTER)


def test_a_module_in_the_way_is_an_injection_error_and_nothing_changes(tmp_path):
    model, base_state = trained()
    loratrf.save_adapter(model, tmp_path / ADAPTER)
    other = fresh_base(base_state)
    other.layers[0].value.register_forward_hook(lambda *a: None)
    with pytest.raises(InjectionError, match="hooks"):
        loratrf.load_adapter(other, tmp_path / ADAPTER)
    assert list(other.state_dict()) == list(base_state)
    assert Path(tmp_path / ADAPTER).exists()
