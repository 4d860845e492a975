"""inject: put LoRA adapters and task-aware filters into any torch model by module-name regex."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from loratrf import quantized
from loratrf._torch_internals import (
    compiled_original,
    has_hooks,
    parameter_slots,
    registered_children,
    set_fused_encoder_path,
)
from loratrf.config import DEFAULT_ADAPTER, InjectionConfig, Plan
from loratrf.errors import InjectionError
from loratrf.filter import (
    FILTER_NAME,
    NAMED_FILTERS,
    TaskAwareFilter,
    attach_filter,
    filter_dispatch,
    filter_of,
    move_filters,
)
from loratrf.embedding import LoRAEmbedding
from loratrf.lora import LoRALinear, is_conv1d
from loratrf.lora_layer import LoRALayer
from loratrf.token_rows import add_token_rows, reads_token_rows, table_dispatch, token_row_names, token_rows_of
from loratrf.walk import (
    active_adapter,
    adapter_parameters,
    named_adapter_parameters,
    parameter_owners,
    tied_elsewhere,
    unwrap,
)

SUPPORTED_TARGETS = (
    "nn.Linear (or a subclass that keeps nn.Linear.forward), Hugging Face's Conv1D (GPT-2), "
    "bitsandbytes' Linear4bit and Linear8bitLt (docs/quantization.md), and nn.Embedding"
)

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


def inject(model: nn.Module, config: InjectionConfig | None = None, /, **overrides: Any) -> InjectionConfig:
    """Inject LoRA into the `targets` and task-aware filters on the outputs of the `filters`.

    `config` is an `InjectionConfig` (a preset, or one returned by an earlier call); keyword
    `overrides` are its options and replace its values (`inject(model, preset, rank=4)`), or
    make the whole config (`inject(model, targets=[...], rank=8)`). Every pattern is a regex
    matched against whole qualified module names (`re.fullmatch`), and must match at least one
    module. Base parameters keep their names and Parameter objects; afterwards every parameter
    is frozen except the active adapter and the modules matched by `trainable`. The model
    computes exactly what it computed before. All checks run before anything changes, so a
    refused call leaves the model untouched. Returns the config applied.

    `adapter` names the adapter the new layers and filters belong to ("default"); another name
    adds an adapter beside those already on the same modules (docs/adapters.md). The active
    adapter stays as it was, unless none was active: then the new one runs.
    """
    if config is None:
        config = InjectionConfig.from_dict(overrides)
    elif isinstance(config, InjectionConfig):
        config = config.replace(**overrides)
    else:
        raise InjectionError(
            f"inject's second argument is an InjectionConfig (a preset, say), got {type(config).__name__}; "
            "give patterns by keyword: inject(model, targets=[...], filters=[...])"
        )
    if problem := engine_problem(model):
        raise InjectionError(f"cannot inject: {problem}")
    root = unwrap(model)
    apply_plan(root, _plan(root, config), config.adapter)
    return config


def _plan(root: nn.Module, config: InjectionConfig) -> Plan:
    """`config` resolved against `root`: exact names, each with its spec."""
    candidates = named_candidates(root)
    lora = {name: config.lora_spec() for name in _match("targets", config.targets, candidates)}
    filters = {
        name: config.filter_spec(config.filter_dim or _output_width(name, candidates[name]))
        for name in _match("filters", config.filters, candidates)
    }
    trainable_modules = _match("trainable", config.trainable, candidates)
    _check_trainable_modules(trainable_modules, lora, candidates)
    trainable = [
        param_name
        for name in trainable_modules
        for param_name, _ in candidates[name].named_parameters(prefix=name, remove_duplicate=False)
    ]
    tokens: dict[str, tuple[int, ...]] = {}
    for pattern, ids in config.trainable_tokens.items():
        for name in _match("trainable_tokens", [pattern], candidates):
            if name in tokens:
                raise InjectionError(f"cannot inject: two trainable_tokens patterns match {name!r}; give it one")
            tokens[name] = ids
    return Plan(lora, filters, tuple(dict.fromkeys(trainable)), tokens=tokens)


def _check_trainable_modules(trainable: Sequence[str], lora: Mapping[str, Any], candidates) -> None:
    """A trainable module may not hold a LoRA layer (by identity: a shared module may be listed
    under another name)."""
    targets = {id(candidates[name]) for name in lora}
    for name in trainable:
        inside = [
            n
            for n, m in candidates[name].named_modules(prefix=name, remove_duplicate=False)
            if id(m) in targets or isinstance(m, LoRALayer)
        ]
        if inside:
            raise InjectionError(
                f"cannot inject:\n- trainable module {name!r} holds LoRA layer {inside[0]!r}, whose base weight "
                "must stay frozen; make a module either trainable or a LoRA target, not both"
            )


def apply_plan(root: nn.Module, plan: Plan, adapter: str = DEFAULT_ADAPTER) -> None:
    """Inject what `plan` names into `root` (already unwrapped) as adapter `adapter`. Checks
    everything first."""
    candidates = named_candidates(root)
    parents = parent_map(root)
    problems = [p for name in plan.lora if (p := _target_problem(name, candidates, parents, adapter))]
    problems += [p for name in plan.lora if (p := _embedding_problem(name, candidates))]
    problems += [p for name in plan.filters if (p := _filter_problem(name, candidates, parents, adapter))]
    problems += _trainable_problems(root, plan, candidates)
    heads, token_problems = _token_row_readers(root, plan, candidates, adapter)
    problems += token_problems
    if problems:
        raise InjectionError("cannot inject:\n- " + "\n- ".join(dict.fromkeys(problems)))
    _warn_about_ties(root, plan, candidates)

    active = active_adapter(root)
    replacements: dict[int, LoRALayer] = {}
    for name, spec in plan.lora.items():
        module = candidates[name]
        if id(module) in replacements:
            continue
        if isinstance(module, LoRALayer):  # beside the adapters it holds
            module.add_adapter(adapter, spec)
            replacements[id(module)] = module
            continue
        wrap = LoRAEmbedding.from_embedding if isinstance(module, nn.Embedding) else LoRALinear.from_linear
        new = replacements[id(module)] = wrap(module, adapter=adapter, **dataclasses.asdict(spec))
        move_filters(module, new)  # filters kept by `unload` move onto the new layer
        for parent, child_name in parents[id(module)]:
            setattr(parent, child_name, new)
    hosts: set[int] = set()  # a module registered under several names gets one filter
    for name, spec in plan.filters.items():
        host = candidates[name]
        host = replacements.get(id(host), host)  # a LoRA target's filter goes on its LoRA layer
        if id(host) in hosts:
            continue
        hosts.add(id(host))
        device, host_dtype = _placement(host, root)
        attach_filter(host, TaskAwareFilter.from_spec(spec, device, host_dtype), adapter)
    for name, ids in plan.tokens.items():
        if token_rows_of(candidates[name], adapter) is None:  # once for a module listed under several names
            add_token_rows(candidates[name], heads[name], adapter, ids)
    sync_fused_encoder_paths(root)
    _freeze_base(root, plan.trainable)
    activate(root, adapter if active is None else active)


def _warn_about_ties(root: nn.Module, plan: Plan, candidates: Mapping[str, nn.Module]) -> None:
    """Tell the user of every tie the plan meets (a decoder's `lm_head.weight` is its
    `embed_tokens.weight`): a LoRA target whose weight another module shares cannot be merged,
    and a trainable parameter that another module shares trains there too, whole."""
    owners = parameter_owners(root)
    for name in plan.lora:
        module = candidates[name]
        if tied := tied_elsewhere(owners, module, module.weight):
            warnings.warn(
                f"LoRA target {name!r} shares its weight with {', '.join(map(repr, tied))} (tied weights): the "
                "adapter trains and runs exactly, but loratrf.merge and unload(merge=True) will refuse to fold it "
                "into the shared tensor, since that would change the other module too",
                stacklevel=4,
            )
    params = dict(root.named_parameters(remove_duplicate=False))
    trainable = set(plan.trainable)
    for p in {id(params[n]): params[n] for n in plan.trainable}.values():
        names = [n for n, _ in owners.get(id(p), [])]
        if others := [n for n in names if n not in trainable]:
            name = next(n for n in names if n in trainable)
            warnings.warn(
                f"trainable parameter {name!r} is tied to {', '.join(map(repr, others))}: training it trains that "
                f"module too, and the adapter file holds all {p.numel():,} of its values "
                f"({p.numel() * p.element_size() / 1e6:,.1f} MB); train a LoRA adapter on it instead, or untie it",
                stacklevel=4,
            )


def activate(root: nn.Module, name: str | None) -> None:
    """Adapter `name` runs in every module (None: none does), and its tensors alone among the
    adapters' require grad; base parameters are left as they are."""
    for module in root.modules():
        if isinstance(module, LoRALayer):
            module.active_adapter = name
        if (dispatch := filter_dispatch(module) or table_dispatch(module)) is not None:
            dispatch.active = name
    for found in adapter_parameters(root):
        found.parameter.requires_grad_(found.adapter == name)


def _token_row_readers(
    root: nn.Module, plan: Plan, candidates: Mapping[str, nn.Module], adapter: str
) -> tuple[dict[str, list[nn.Module]], list[str]]:
    """`({embedding name: the other modules sharing its weight}, problems)` for the plan's
    trainable token rows: each goes on a plain nn.Embedding that is no LoRA target, below its
    number of rows, and every module sharing its weight (found by identity) is a plain
    nn.Embedding or nn.Linear, which reads the rows too; no LoRA target reads rows."""
    owners, trainable = parameter_owners(root), set(plan.trainable)
    targets = {id(candidates[n]) for n in plan.lora if n in candidates}
    heads: dict[str, list[nn.Module]] = {}
    problems = [
        f"{name!r} reads trainable token rows (an embedding with them, or a head sharing its weight), and LoRA on "
        "it would not see them; train the rows or put LoRA on it, not both"
        for name in plan.lora
        if name in candidates and reads_token_rows(candidates[name])
    ]
    for name, ids in plan.tokens.items():
        module = candidates.get(name)
        if module is None:
            problems.append(f"the model has no module named {name!r}")
            continue
        kind = type(module).__name__
        if not _plain(module, nn.Embedding) or id(module) in targets:
            problems.append(
                f"trainable_tokens: {name!r} is a {kind}{' and a LoRA target' * (id(module) in targets)}; trainable "
                "token rows go on an nn.Embedding (not a subclass with its own forward, no max_norm) that is no "
                "LoRA target: train its rows or put LoRA on it, not both"
            )
            continue
        if token_rows_of(module, adapter) is not None:
            problems.append(f"{name!r} already has trainable token rows of adapter {adapter!r}; inject them once")
        if any(token_rows_of(module, n).merged for n in token_row_names(module)):
            problems.append(f"{name!r} holds merged token rows; loratrf.unmerge(model) first, then add adapters")
        if too_big := [i for i in ids if i >= module.num_embeddings]:
            problems.append(
                f"trainable_tokens: token ids {too_big} of {name!r} are not below its {module.num_embeddings} rows; "
                "add the tokens and resize the embeddings (resize_token_embeddings) before loratrf.inject"
            )
        shared = list({id(m): (n, m) for n, m in owners.get(id(module.weight), []) if m is not module}.values())
        heads[name] = [m for _, m in shared]
        for other, head in shared:
            if not (_plain(head, nn.Linear) or _plain(head, nn.Embedding)) or id(head) in targets:
                problems.append(
                    f"{name!r} shares its weight with {other!r}, a {type(head).__name__}"
                    f"{' and a LoRA target' * (id(head) in targets)}, which cannot read its trainable token rows; "
                    "untie it, or train the rows of an embedding whose weight only plain nn.Linear heads share"
                )
        if names := [n for n, _ in owners.get(id(module.weight), []) if n in trainable]:
            problems.append(f"{names[0]!r} is trainable whole, and {name!r} has trainable token rows; choose one")
    return heads, problems


def _plain(module: nn.Module, kind: type[nn.Module]) -> bool:
    """Whether `module` is a `kind` (no loratrf layer) that computes what `kind.forward` does."""
    plain = isinstance(module, kind) and not isinstance(module, LoRALayer) and type(module).forward is kind.forward
    return plain and getattr(module, "max_norm", None) is None


def _trainable_problems(root: nn.Module, plan: Plan, candidates: Mapping[str, nn.Module]) -> list[str]:
    """Trainable parameters that do not exist, or that are the frozen base of a LoRA layer
    (one already injected or one the plan adds)."""
    params = dict(root.named_parameters(remove_duplicate=False))
    lora_layers = {n: m for n, m in candidates.items() if isinstance(m, LoRALayer)}
    lora_layers.update({n: candidates[n] for n in plan.lora if n in candidates})
    base = {
        id(p): n
        for n, m in lora_layers.items()
        for p in (getattr(m, "weight", None), getattr(m, "bias", None))
        if p is not None
    }
    problems = []
    for name in plan.trainable:
        if name not in params:
            problems.append(f"the model has no parameter named {name!r} to keep trainable")
        elif id(params[name]) in base:
            problems.append(
                f"trainable parameter {name!r} is the base of LoRA layer {base[id(params[name])]!r}, which must "
                "stay frozen; make a module either trainable or a LoRA target, not both"
            )
    return problems


def engine_problem(model: nn.Module) -> str | None:
    """Why adapters added to `model` now would escape its distributed engine, or None."""
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in (model, compiled_original(model))):
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
        for name, child in registered_children(module):
            if isinstance(child, TaskAwareFilter) or (name == NAMED_FILTERS and isinstance(child, nn.ModuleDict)):
                continue
            qualified = f"{prefix}.{name}" if prefix else name
            found[qualified] = child
            if not isinstance(child, LoRALayer):
                walk(child, qualified)

    walk(model, "")
    return found


def _match(kind: str, patterns: Sequence[str], candidates: Mapping[str, nn.Module]) -> list[str]:
    """Names that fully match any pattern, in model order; a pattern matching none is an error."""
    names = list(candidates)
    matched: dict[str, None] = {}
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [name for name in names if regex.fullmatch(name)]
        if not hits:
            raise InjectionError(_no_match_message(kind, pattern, names) + _bypassed_parameter_hint(regex, candidates))
        matched.update(dict.fromkeys(hits))
    return [name for name in names if name in matched]


def _no_match_message(kind: str, pattern: str, names: Sequence[str]) -> str:
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


def _bypassed_parameter_hint(regex: re.Pattern, candidates: Mapping[str, nn.Module]) -> str:
    """Why a pattern aimed at a weight that a bypassing module holds directly cannot work."""
    for name, module in candidates.items():
        why = _bypass_reason(module)
        for param_name in parameter_slots(module) if why else ():
            if regex.search(f"{name}.{param_name}"):
                return f". {name}.{param_name} is a parameter, not a module: {why}"
    return ""


def parent_map(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """`id(child) -> [(parent, name), ...]` over every place a module is registered."""
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, child in registered_children(module):
            parents.setdefault(id(child), []).append((module, name))
    return parents


def _bypass_reason(module: nn.Module) -> str | None:
    """Why `module` is in BYPASSING_PARENTS, or None."""
    return next((why for cls, why in BYPASSING_PARENTS.items() if isinstance(module, cls)), None)


def _bypass_problem(name: str, module: nn.Module, parents: Mapping[int, list[tuple[nn.Module, str]]]) -> str | None:
    for parent, _ in parents.get(id(module), []):
        if why := _bypass_reason(parent):
            return f"{name!r}: {why}"
    return None


def _target_problem(name: str, candidates: Mapping[str, nn.Module], parents, adapter: str) -> str | None:
    """Why the module `name` cannot take LoRA adapter `adapter`, or None."""
    module = candidates.get(name)
    if module is None:
        return f"the model has no module named {name!r}"
    kind = type(module).__name__
    if isinstance(module, LoRALayer) and module.parts(adapter) is not None:
        named = "" if adapter == DEFAULT_ADAPTER else f" named {adapter!r}"
        return (
            f"{name!r} already has a LoRA adapter{named}; inject once per module and adapter name "
            "(inject(..., adapter='<another name>') adds one beside it; loratrf.delete_adapter or "
            "loratrf.unload removes adapters)"
        )
    if isinstance(module, LoRALayer) and module.merged:
        return (
            f"{name!r} is merged (adapter {module.active_adapter!r} is folded into its weight), and a new adapter "
            "starts from the base weight; loratrf.unmerge(model) first, then add adapters"
        )
    if isinstance(module, LoRALayer):
        return _bypass_problem(name, module, parents)
    if why := _bypass_reason(module):
        return f"{name!r} is a {kind}: {why}"
    if not (is_conv1d(module) or isinstance(module, (nn.Linear, nn.Embedding))):
        return f"{name!r} is a {kind}; LoRA targets must be {SUPPORTED_TARGETS}"
    if quantized.runs_own_forward(module):  # bitsandbytes: its own forward is the base map
        if why := quantized.target_problem(module):
            return f"{name!r} is a {kind}: {why}"
    elif isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward:
        return (
            f"{name!r} is a {kind}, an nn.Linear subclass with its own forward; a LoRALinear in its "
            f"place would not compute what it computes. LoRA targets must be {SUPPORTED_TARGETS}"
        )
    if "forward" in vars(module):
        return (
            f"{name!r} has its forward replaced on the instance (a patch or an offloading hook); "
            "inject before patching it"
        )
    if has_hooks(module, besides=_filter_hooks(module)) and not reads_token_rows(module):  # `_token_row_readers`'
        return f"{name!r} has hooks registered; inject first, then register the hooks on the injected layer"
    return _bypass_problem(name, module, parents)


def _embedding_problem(name: str, candidates: Mapping[str, nn.Module]) -> str | None:
    """Why the embedding `name` cannot take LoRA (None where it is no embedding, or can)."""
    module = candidates.get(name)
    if not isinstance(module, nn.Embedding) or isinstance(module, LoRAEmbedding):
        return None
    kind = type(module).__name__
    if type(module).forward is not nn.Embedding.forward:
        return (
            f"{name!r} is a {kind}, an nn.Embedding subclass with its own forward (a scaled embedding, say); a "
            f"LoRAEmbedding in its place would not compute what it computes. LoRA targets must be {SUPPORTED_TARGETS}"
        )
    if module.max_norm is not None:
        return f"{name!r} renormalises its rows (max_norm={module.max_norm}), which LoRA on it cannot follow"
    return None


def _filter_hooks(module: nn.Module) -> tuple[int, ...]:
    """The id of the forward hook through which loratrf's filters on `module` run, if any."""
    dispatch = filter_dispatch(module)
    return (dispatch.handle.id,) if dispatch is not None else ()


def _filter_problem(name: str, candidates: Mapping[str, nn.Module], parents, adapter: str) -> str | None:
    """Why the output of the module `name` cannot take adapter `adapter`'s filter, or None."""
    host = candidates.get(name)
    if host is None:
        return f"the model has no module named {name!r}"
    if filter_of(host, adapter) is not None:
        named = "" if adapter == DEFAULT_ADAPTER else f" of adapter {adapter!r}"
        return (
            f"{name!r} already has a task-aware filter{named}; inject once per module and adapter name "
            "(inject(..., adapter='<another name>') adds one beside it; loratrf.delete_adapter or "
            "loratrf.unload removes filters)"
        )
    slot = FILTER_NAME if adapter == DEFAULT_ADAPTER else NAMED_FILTERS
    if hasattr(host, slot) and (adapter == DEFAULT_ADAPTER or not isinstance(getattr(host, slot), nn.ModuleDict)):
        return f"{name!r} already has an attribute named {slot!r}, where the filter would go"
    return _bypass_problem(name, host, parents)


def _output_width(name: str, module: nn.Module) -> int:
    """Width of `module`'s output, read off its last linear (or embedding) layer."""
    width = None
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, LoRALayer)):
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


def sync_fused_encoder_paths(model: nn.Module) -> None:
    """PyTorch's fused encoder paths off wherever loratrf modules sit inside (they would skip
    them), and back on where none are left."""
    for module in model.modules():
        holds = any(isinstance(m, (LoRALayer, TaskAwareFilter)) for m in module.modules())
        set_fused_encoder_path(module, enabled=not holds)


def _freeze_base(model: nn.Module, trainable_params: Sequence[str]) -> None:
    """Of the base parameters, only the named ones stay trainable (`activate` sets the adapters')."""
    adapters = {id(p) for _, p in named_adapter_parameters(model)}
    wanted = set(trainable_params)
    keep = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in wanted}
    for p in model.parameters():
        if id(p) not in adapters and (p.is_floating_point() or p.is_complex()):
            p.requires_grad_(id(p) in keep)
