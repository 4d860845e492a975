"""inject: put LoRA adapters and task-aware filters into any torch model by module-name regex."""

from __future__ import annotations

import difflib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from loratrf.config import InjectionConfig
from loratrf.errors import InjectionError
from loratrf.filter import TaskAwareFilter, attach_filter, filter_of
from loratrf.lora import LoRALinear, default_adapter_dtype, is_conv1d
from loratrf.walk import named_adapter_parameters, unwrap

SUPPORTED_TARGETS = "nn.Linear (or a subclass that keeps nn.Linear.forward) and Hugging Face's Conv1D (GPT-2)"

# Parents whose forward reads their children's weights directly instead of calling them: an
# adapter or filter on such a child would never run, and so would train nothing.
BYPASSING_PARENTS: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: (
        "nn.MultiheadAttention keeps its q, k, v projections in a packed Parameter (in_proj_weight), "
        "not in Linear modules, and passes it and out_proj.weight straight to "
        "F.multi_head_attention_forward and never calls out_proj, so an adapter or filter on its "
        "projections would never run. Adapt the feed-forward layers instead (linear1/linear2 of "
        "nn.TransformerEncoderLayer or nn.TransformerDecoderLayer), or filter the attention module's "
        "or the layer's output"
    ),
}


def inject(
    model: nn.Module,
    targets: Sequence[str] = (),
    filters: Sequence[str] = (),
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    init: str = "kaiming",
    rslora: bool = False,
    filter_rank: int | None = None,
    filter_alpha: float | None = None,
    similarity: str = "cosine",
    task_init: str = "normal",
    filter_dim: int | None = None,
    trainable: Sequence[str] = (),
    adapter_dtype: str | None = None,
) -> InjectionConfig:
    """Inject LoRA into the `targets` and task-aware filters on the outputs of the `filters`.

    Every pattern is a regex matched against whole qualified module names (`re.fullmatch`),
    and must match at least one module. Base parameters keep their names and Parameter
    objects; afterwards every parameter is frozen except the adapters and the modules matched
    by `trainable`. The model computes exactly what it computed before. All checks run before
    anything changes, so a refused call leaves the model untouched. The options are those of
    `InjectionConfig`, which this returns.
    """
    config = InjectionConfig(
        targets=targets,
        filters=filters,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        init=init,
        rslora=rslora,
        filter_rank=filter_rank,
        filter_alpha=filter_alpha,
        similarity=similarity,
        task_init=task_init,
        filter_dim=filter_dim,
        trainable=trainable,
        adapter_dtype=adapter_dtype,
    )
    problem = engine_problem(model)
    if problem:
        raise InjectionError(f"cannot inject: {problem}")
    model = unwrap(model)
    candidates = named_candidates(model)
    dtype = config.torch_adapter_dtype()
    lora = {
        name: {**config.lora_options, "adapter_dtype": dtype}
        for name in match_patterns("targets", config.targets, candidates)
    }
    filter_specs = {
        name: {"dim": config.filter_dim or infer_width(name, candidates[name]), **config.filter_options, "dtype": dtype}
        for name in match_patterns("filters", config.filters, candidates)
    }
    trainable_modules = match_patterns("trainable", config.trainable, candidates)
    trainable_params = [
        param_name
        for name in trainable_modules
        for param_name, _ in candidates[name].named_parameters(prefix=name, remove_duplicate=False)
    ]
    apply_plan(model, lora, filter_specs, trainable_params, trainable_modules)
    return config


def apply_plan(
    model: nn.Module,
    lora: Mapping[str, Mapping[str, Any]],
    filters: Mapping[str, Mapping[str, Any]],
    trainable_params: Iterable[str] = (),
    trainable_modules: Iterable[str] = (),
) -> None:
    """Inject by exact module names: `lora` maps names to `LoRALinear.from_linear` options,
    `filters` maps host names to `TaskAwareFilter` options. Checks everything first."""
    candidates = named_candidates(model)
    parents = parent_map(model)
    problems = [p for name in lora if (p := target_problem(name, candidates, parents))]
    problems += [p for name in filters if (p := filter_problem(name, candidates, parents))]
    targets = {id(candidates[name]) for name in lora if name in candidates}
    for name in trainable_modules:  # by identity: a shared module may be listed under another name
        inside = [
            n
            for n, m in candidates[name].named_modules(prefix=name, remove_duplicate=False)
            if id(m) in targets or isinstance(m, LoRALinear)
        ]
        if inside:
            problems.append(
                f"trainable module {name!r} holds LoRA layer {inside[0]!r}, whose base weight must stay "
                "frozen; make a module either trainable or a LoRA target, not both"
            )
    if problems:
        raise InjectionError("cannot inject:\n- " + "\n- ".join(dict.fromkeys(problems)))

    replacements: dict[int, LoRALinear] = {}
    for name, options in lora.items():
        module = candidates[name]
        if id(module) not in replacements:
            new = replacements[id(module)] = LoRALinear.from_linear(module, **options)
            for parent, child_name in parents[id(module)]:
                parent._modules[child_name] = new
    hosts: set[int] = set()  # a module registered under several names gets one filter
    for name, options in filters.items():
        host = candidates[name]
        host = replacements.get(id(host), host)  # a LoRA target's filter goes on its LoRALinear
        if id(host) in hosts:
            continue
        hosts.add(id(host))
        device, host_dtype = _placement(host, model)
        options = dict(options)
        dtype = options.pop("dtype", None) or default_adapter_dtype(host_dtype)
        attach_filter(host, TaskAwareFilter(**options, device=device, dtype=dtype))
    sync_fast_paths(model)
    freeze_base(model, trainable_params)


def engine_problem(model: nn.Module) -> str | None:
    """Why adapters added to `model` now would escape its distributed engine, or None."""
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in (model, getattr(model, "_orig_mod", None))):
        return (
            "the model is wrapped in DistributedDataParallel, which synchronises only the parameters "
            "it saw when it was built, so new adapters would train apart on each rank; inject (or "
            "load_adapter) first, then wrap the model"
        )
    if any(hasattr(p, "device_mesh") for p in unwrap(model).parameters()):
        return (
            "the model's parameters are sharded DTensors (FSDP2's fully_shard or tensor parallelism), "
            "which shard and synchronise only the parameters present when applied; inject (or "
            "load_adapter) first, then call fully_shard"
        )
    return None


def named_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module, for every module but the root and loratrf's own internals.

    A module registered under several names appears under each of them.
    """
    found: dict[str, nn.Module] = {}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None or isinstance(child, TaskAwareFilter):
                continue
            qualified = f"{prefix}.{name}" if prefix else name
            found[qualified] = child
            if not isinstance(child, LoRALinear):
                walk(child, qualified)

    walk(model, "")
    return found


def match_patterns(kind: str, patterns: Sequence[str], candidates: Mapping[str, nn.Module]) -> list[str]:
    """Names that fully match any pattern, in model order; a pattern matching none is an error."""
    names = list(candidates)
    matched: dict[str, None] = {}
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [name for name in names if regex.fullmatch(name)]
        if not hits:
            raise InjectionError(no_match_message(kind, pattern, names) + bypassed_parameter_hint(regex, candidates))
        matched.update(dict.fromkeys(hits))
    return [name for name in names if name in matched]


def no_match_message(kind: str, pattern: str, names: Sequence[str]) -> str:
    message = f"{kind} pattern {pattern!r} matches no module name"
    partial = [name for name in names if re.search(pattern, name)]
    if partial:
        message += (
            f"; patterns must match the WHOLE name (re.fullmatch), and it only matches part of "
            f"{partial[0]!r}: write r'.*{pattern}' to match names ending with it"
        )
    plain = re.sub(r"\\(.)", r"\1", pattern)
    nearest = difflib.get_close_matches(plain, names, n=5, cutoff=0.0)
    if nearest:
        message += f". Nearest module names: {', '.join(map(repr, nearest))}"
    else:
        message += ". The model has no submodules"
    return message


def bypassed_parameter_hint(regex: re.Pattern, candidates: Mapping[str, nn.Module]) -> str:
    """Why a pattern aimed at a weight that a bypassing module holds directly cannot work."""
    for name, module in candidates.items():
        why = bypass_reason(module)
        for param_name in module._parameters if why else ():  # with those registered as None
            if regex.search(f"{name}.{param_name}"):
                return f". {name}.{param_name} is a parameter, not a module: {why}"
    return ""


def parent_map(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """`id(child) -> [(parent, name), ...]` over every place a module is registered."""
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, child in module._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((module, name))
    return parents


def bypass_reason(module: nn.Module) -> str | None:
    """Why `module` is in BYPASSING_PARENTS, or None."""
    return next((why for cls, why in BYPASSING_PARENTS.items() if isinstance(module, cls)), None)


def bypass_problem(name: str, module: nn.Module, parents: Mapping[int, list[tuple[nn.Module, str]]]) -> str | None:
    for parent, _ in parents.get(id(module), []):
        if why := bypass_reason(parent):
            return f"{name!r}: {why}"
    return None


def target_problem(name: str, candidates: Mapping[str, nn.Module], parents) -> str | None:
    """Why the module `name` cannot take a LoRA adapter, or None."""
    module = candidates.get(name)
    if module is None:
        return f"the model has no module named {name!r}"
    kind = type(module).__name__
    if isinstance(module, LoRALinear):
        return f"{name!r} already has a LoRA adapter; inject once per module (loratrf.unload removes adapters)"
    if why := bypass_reason(module):
        return f"{name!r} is a {kind}: {why}"
    if not (is_conv1d(module) or isinstance(module, nn.Linear)):
        return f"{name!r} is a {kind}; LoRA targets must be {SUPPORTED_TARGETS}"
    if isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return (
            f"{name!r} is a {kind}, an nn.Linear subclass with its own forward; a LoRALinear in its "
            f"place would not compute what it computes. LoRA targets must be {SUPPORTED_TARGETS}"
        )
    if "forward" in vars(module):
        return (
            f"{name!r} has its forward replaced on the instance (a patch or an offloading hook); "
            "inject before patching it"
        )
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return f"{name!r} has hooks registered; inject first, then register the hooks on the injected layer"
    return bypass_problem(name, module, parents)


def filter_problem(name: str, candidates: Mapping[str, nn.Module], parents) -> str | None:
    """Why the output of the module `name` cannot be filtered, or None."""
    host = candidates.get(name)
    if host is None:
        return f"the model has no module named {name!r}"
    if filter_of(host) is not None:
        return f"{name!r} already has a task-aware filter; inject once per module (loratrf.unload removes filters)"
    if "task_filter" in vars(host) or "task_filter" in host._parameters or "task_filter" in host._buffers:
        return f"{name!r} already has an attribute named 'task_filter', where the filter would go"
    return bypass_problem(name, host, parents)


def infer_width(name: str, module: nn.Module) -> int:
    """Width of `module`'s output, read off its last linear (or embedding) layer."""
    width = None
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, LoRALinear)):
            width = sub.out_features
        elif is_conv1d(sub):
            width = sub.weight.shape[-1]
        elif isinstance(sub, nn.Embedding):
            width = sub.embedding_dim
    if width is None:
        raise InjectionError(
            f"cannot tell the output width of {name!r} ({type(module).__name__}: it holds no linear "
            "or embedding layer to read it from); pass filter_dim=<width of its hidden states>"
        )
    return width


def _placement(host: nn.Module, model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of `host`'s parameters, else of the model's, else the defaults."""
    for p in itertools.chain(host.parameters(), model.parameters()):  # stops at the first
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.get_default_dtype()


# PyTorch's fused encoder paths (eval mode, no grad) read `linear1.weight`, `linear2.weight`
# and the attention weights directly and skip the submodules' forwards, and the encoder may
# hand its layers nested tensors. Each switch below turns one off without changing the math.
FAST_PATH_SWITCHES: dict[type[nn.Module], tuple[str, object]] = {
    nn.TransformerEncoderLayer: ("activation_relu_or_gelu", 0),
    nn.TransformerEncoder: ("use_nested_tensor", False),
}


def sync_fast_paths(model: nn.Module) -> None:
    """Fused fast paths off wherever loratrf modules sit inside, and back on where none are left."""
    for module in model.modules():
        for cls, (attr, off) in FAST_PATH_SWITCHES.items():
            if not isinstance(module, cls):
                continue
            saved = f"_loratrf_saved_{attr}"
            if any(isinstance(m, (LoRALinear, TaskAwareFilter)) for m in module.modules()):
                module.__dict__.setdefault(saved, getattr(module, attr))
                setattr(module, attr, off)
            elif saved in module.__dict__:
                setattr(module, attr, module.__dict__.pop(saved))


def freeze_base(model: nn.Module, trainable_params: Iterable[str] = ()) -> None:
    """Only adapters and the named parameters stay trainable."""
    keep = {id(p) for _, p in named_adapter_parameters(model)}
    wanted = set(trainable_params)
    keep |= {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in wanted}
    for p in model.parameters():
        if p.is_floating_point() or p.is_complex():
            p.requires_grad_(id(p) in keep)
