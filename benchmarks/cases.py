"""What `run.py` measures: the layers of each library, the workloads, and their FLOP limits.

Every workload is a zero-argument callable; `run.py` times them interleaved. PEFT and loralib
are used where installed (`pip install -e ".[bench]"`); loratrf's own figures need neither.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable

import torch
from torch import nn

import loratrf
from loratrf import LoRALinear, TaskAwareFilter

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


def forward_backward(module: Callable, x: torch.Tensor, grad: torch.Tensor, params) -> Callable[[], None]:
    params = [p for p in params if p.requires_grad]

    def step() -> None:
        module(x).backward(grad)
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


# --- a training step of a small encoder ----------------------------------------------------


def encoder(layers: int, d: int, ffn: int) -> nn.TransformerEncoder:
    return nn.TransformerEncoder(encoder_layer(d, ffn), layers, enable_nested_tensor=False)


LORA_TARGETS = [r"layers\.\d+\.linear[12]"]
FILTER_HOSTS = [r"layers\.\d+"]


def encoder_models(layers: int, d: int, ffn: int, rank: int) -> dict[str, nn.Module]:
    """The same encoder with LoRA on every FFN (r=`rank`), without and with filters."""
    torch.manual_seed(0)
    base = encoder(layers, d, ffn)
    models = {}
    for name, hosts in (("loratrf LoRA", []), ("loratrf LoRA + filters", FILTER_HOSTS)):
        model = copy.deepcopy(base)
        loratrf.inject(model, targets=LORA_TARGETS, filters=hosts, rank=rank, alpha=ALPHA)
        trained(*(p for n, p in loratrf.adapter_state_dict(model).items() if n.endswith(".V")))
        models[name] = model
    if installed("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=["linear1", "linear2"])
        )
        trained(*(p for n, p in model.named_parameters() if "lora_B" in n))
        models[f"PEFT {version('peft')} LoRA"] = model
    return models


def training_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        model(x).pow(2).mean().backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return step
