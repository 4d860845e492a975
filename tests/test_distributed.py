"""DDP and FSDP2 on CPU: two gloo processes, started here, train an injected model (LoRA,
filters and a trainable head) on halves of the same global batches as a single-process run."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import loratrf
from distributed_worker import WORLD, InPlaceNet, base_model, gradients, injected_model, probe_ids, run, train
from loratrf.adapter_file import read_adapter_file

DOCS = Path(__file__).parents[1] / "docs" / "distributed.md"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Every rank's results; both ranks run DDP, then FSDP2, in one spawn (one start-up)."""
    out = tmp_path_factory.mktemp("distributed")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # a free port
    workers = mp.start_processes(run, args=(store.port, out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not workers.join(timeout=2):  # a worker's exception is raised here, with its traceback
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the distributed workers did not finish within 180 s")
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    """The reference: one process, the whole global batch each step."""
    model = injected_model()
    train(model)
    model.eval()
    return model


def assert_states_close(state, reference, **tolerance):
    assert set(state) == set(reference)
    for name in reference:
        torch.testing.assert_close(state[name], reference[name], msg=name, **tolerance)


def test_ddp_adapters_are_identical_across_ranks_and_match_one_process(ranks, single_process):
    _, results = ranks
    first, second = (r["ddp"]["adapter"] for r in results)
    assert all(torch.equal(first[name], second[name]) for name in first)
    reference = loratrf.adapter_state_dict(single_process)
    assert_states_close(first, reference, rtol=1e-5, atol=1e-6)
    initial = loratrf.adapter_state_dict(injected_model())
    assert all(not torch.equal(first[name], initial[name]) for name in initial)  # every tensor trained


def test_ddp_adapter_is_saved_once_from_the_wrapper(ranks, single_process):
    out, results = ranks
    assert [r["ddp"]["writes"] for r in results] == [1, 0]  # every rank called save_adapter; rank 0 wrote
    model = base_model()
    loratrf.load_adapter(model, out / "ddp_adapter.pt")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(probe_ids), single_process(probe_ids), rtol=1e-5, atol=1e-6)


def test_fsdp2_shards_the_model_and_matches_one_process(ranks, single_process):
    _, results = ranks
    for r in results:
        assert r["fsdp"]["sharding"]["type"] == "DTensor" and r["fsdp"]["sharding"]["full"] == (3, 16)
    assert sorted(r["fsdp"]["sharding"]["local"] for r in results) == [(1, 16), (2, 16)]
    reference = loratrf.adapter_state_dict(single_process)
    for r in results:
        assert_states_close(r["fsdp"]["adapter"], reference, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(results[0]["fsdp"]["outputs"], single_process(probe_ids), rtol=1e-5, atol=1e-6)


def test_fsdp2_adapter_is_written_once_in_full_and_loads_into_one_process(ranks):
    out, results = ranks
    assert [r["fsdp"]["writes"] for r in results] == [1, 0]  # rank 0 writes, rank 1 only gathers
    _, tensors = read_adapter_file(out / "fsdp_adapter.pt")
    gathered = results[0]["fsdp"]["adapter"]
    assert all(torch.equal(tensors[name], gathered[name]) for name in gathered) and set(tensors) == set(gathered)
    assert tensors["head.weight"].shape == (3, 16)  # full, not rank 0's (2, 16) shard
    model = base_model()
    loratrf.load_adapter(model, out / "fsdp_adapter.pt")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(probe_ids), results[0]["fsdp"]["outputs"], rtol=0, atol=1e-6)


def test_fsdp2_resumes_from_a_saved_adapter(ranks):
    _, results = ranks
    for r in results:
        saved = r["fsdp"]["adapter"]
        assert all(torch.equal(r["fsdp"]["resumed_adapter"][name], saved[name]) for name in saved)
        assert torch.equal(r["fsdp"]["resumed_outputs"], r["fsdp"]["outputs"])


def test_fsdp2_gradients_survive_in_place_ops_after_a_filtered_block(ranks):
    """Regression: the filter returned a view, from which FSDP2's pre-backward hook is dropped
    when the model then modifies the block's output in place; backward failed in FSDP's
    all-gather (RuntimeError: setStorage ... out of bounds for storage of size 0)."""
    _, results = ranks
    reference = gradients(injected_model(InPlaceNet))
    for r in results:
        assert_states_close(r["fsdp"]["inplace_gradients"], reference, rtol=1e-5, atol=1e-5)


def test_a_filter_output_is_a_fresh_tensor_not_a_view():
    model = injected_model()
    outputs = []
    model.layers[0].register_forward_hook(lambda module, args, out: outputs.append(out))  # after the filter's hook
    model(probe_ids)
    assert outputs[0]._base is None


def test_adding_adapters_behind_a_distributed_engine_is_refused(ranks):
    _, results = ranks
    for r in results:
        assert re.search(r"InjectionError: .*DistributedDataParallel.*inject .*first", r["ddp"]["inject_into_ddp"])
        assert re.search(r"InjectionError: .*sharded DTensors.*then call fully_shard", r["fsdp"]["inject_into_sharded"])
        assert "cannot load the adapter" in r["fsdp"]["load_into_sharded_base"]


def test_the_documented_script_runs_under_torchrun(tmp_path):
    """docs/distributed.md's script, launched with its documented FSDP2 torchrun command (one
    launch costs seconds; DDP is covered by the spawned ranks above)."""
    script = re.search(r"```python\n(# train_adapter\.py.*?)```", DOCS.read_text(), re.S).group(1)
    (tmp_path / "train_adapter.py").write_text(script)
    command = re.search(r"torchrun (--nproc-per-node 2 train_adapter\.py --engine fsdp)", DOCS.read_text())
    argv = command.group(1).split()
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv, "--out", "adapter.pt"]
    done = subprocess.run(launch, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", done.stdout)]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.pt", "train_adapter.py"]  # no temporary left
    plan, tensors = read_adapter_file(tmp_path / "adapter.pt")
    assert set(plan.lora) == {f"encoder.layers.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    assert tensors["head.weight"].shape == (2, 64) and tensors["encoder.layers.0.linear1.lora.U"].shape == (64, 8)
