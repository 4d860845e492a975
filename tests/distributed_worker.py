"""What each rank runs in the two-process gloo tests of test_distributed.py (and the shared
single-process reference): the same seeded model, batches and optimiser everywhere."""

import datetime

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from models import FILTERS, TARGETS, Net
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import loratrf

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 8
probe_ids = torch.randint(0, 20, (5, 6), generator=torch.Generator().manual_seed(99))


def base_model(cls=Net):
    """The same base weights in every process: `Net(d=16)` drawn from seed 0."""
    torch.manual_seed(0)
    return cls(d=16)


class InPlaceNet(Net):
    """Scales each block's (filtered) output in place, as some models do between layers."""

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
            x.mul_(1.5)
        return self.head(x[:, 0])


def injected_model(cls=Net):
    model = base_model(cls)
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, trainable=["head"])
    return model


def shard(model):
    """FSDP2 as its docs recommend: each block, then the root."""
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 20, (GLOBAL_BATCH, 6), generator=g), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def train(model, rank=0, world=1):
    """`STEPS` SGD steps; rank `rank` of `world` takes its equal slice of each global batch, so
    the averaged gradient of a distributed run is that of the whole batch."""
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    per_rank = GLOBAL_BATCH // world
    for step in range(STEPS):
        ids, labels = global_batch(step)
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        F.cross_entropy(model(ids[part]), labels[part]).backward()
        optimiser.step()
        optimiser.zero_grad()


def gradients(model, rank=0, world=1):
    """The (gathered) gradients of every trainable parameter after one step on `global_batch(0)`."""
    per_rank = GLOBAL_BATCH // world
    ids, labels = global_batch(0)
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    F.cross_entropy(model(ids[part]), labels[part]).backward()
    full = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in full.items()}


def refusal(call):
    try:
        call()
    except loratrf.LoRATRFError as e:
        return f"{type(e).__name__}: {e}"
    return None


def ddp_run(rank, out):
    model = injected_model()
    ddp = DistributedDataParallel(model)  # find_unused_parameters=False: an unused adapter would raise
    train(ddp, rank, WORLD)
    return {
        "adapter": {k: v.clone() for k, v in loratrf.adapter_state_dict(ddp).items()},
        "writes": count_saves(lambda: loratrf.save_adapter(ddp, out / "ddp_adapter.pt")),  # every rank calls it
        "inject_into_ddp": refusal(lambda: loratrf.inject(ddp, targets=[r"layers\.0\.query"])),
    }


def count_saves(call):
    real, calls = safetensors.torch.save, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    safetensors.torch.save = counting
    try:
        call()
    finally:
        safetensors.torch.save = real
    return len(calls)


def fsdp_run(rank, out):
    model = shard(injected_model())
    head = model.head.weight
    sharding = {"type": type(head).__name__, "local": tuple(head.to_local().shape), "full": tuple(head.shape)}
    train(model, rank, WORLD)
    adapter = loratrf.adapter_state_dict(model)  # a collective: every rank gathers
    model.eval()
    with torch.no_grad():
        outputs = model(probe_ids)
    path = out / "fsdp_adapter.pt"
    writes = count_saves(lambda: loratrf.save_adapter(model, path))  # every rank calls it
    dist.barrier()  # the file is written before anyone reads it
    resumed = shard(injected_model())  # resuming: the adapter loads into a sharded model
    loratrf.load_adapter(resumed, path)
    resumed.eval()
    with torch.no_grad():
        resumed_outputs = resumed(probe_ids)
    return {
        "sharding": sharding,
        "adapter": adapter,
        "outputs": outputs,
        "writes": writes,
        "resumed_adapter": loratrf.adapter_state_dict(resumed),
        "resumed_outputs": resumed_outputs,
        "inject_into_sharded": refusal(lambda: loratrf.inject(model, targets=[r"layers\.0\.query"])),
        "load_into_sharded_base": refusal(lambda: loratrf.load_adapter(shard(base_model()), path)),
        "inplace_gradients": gradients(shard(injected_model(InPlaceNet)), rank, WORLD),
    }


def run(rank, port, out):
    """Entry point of one spawned rank; the parent process holds the TCP store on `port`."""
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = {"ddp": ddp_run(rank, out), "fsdp": fsdp_run(rank, out)}
        # gloo's worker threads are not joined by destroy_process_group; one that still holds the
        # last gather's tensors when the interpreter shuts down aborts the process (see
        # docs/distributed.md, "Teardown"). In the barrier they get the GIL and finish first.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(results, out / f"rank{rank}.pt")
