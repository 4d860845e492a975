"""Adapter files: one safetensors file holding the adapter tensors and, in its metadata, the
plan that re-injects them. Nothing is unpickled when reading one.

A file holds one adapter, keyed as in `model.state_dict()` of a model holding it as its default
adapter (docs/adapters.md: a named adapter is written under the default's keys). The metadata (safetensors' string map) holds
`format` ("loratrf-adapter"), `version`, `plan` (the `Plan` as JSON: `{"lora": {name: LoRASpec},
"filters": {host: FilterSpec}, "trainable": [parameter names], "stacks": [regexes]}`, and
`"tokens": {embedding: [token ids]}` where the adapter has trainable token rows, whose tensor is
`<embedding>.token_rows.default.rows`) and `sha256`, a digest of the
plan and the tensors, so damaged bytes anywhere are caught, not loaded. Other tools that read safetensors (and
`safetensors.torch.load_file`) read the tensors as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from loratrf import quantized
from loratrf.config import DEFAULT_ADAPTER, Plan, check_adapter_name
from loratrf.errors import AdapterFileError, InjectionError, MergeError
from loratrf.filter import FILTER_NAME, TaskAwareFilter, filter_of
from loratrf.inject import apply_plan, engine_problem, named_candidates
from loratrf.lora import LoRALinear, is_conv1d
from loratrf.lora_layer import LoRALayer, parts_spec
from loratrf.token_rows import TOKEN_ROWS, merged_token_tables, token_rows_of
from loratrf.walk import (
    adapter_parameters,
    check_held,
    named_adapter_parameters,
    named_filters,
    non_finite_tensors,
    unwrap,
)

FORMAT = "loratrf-adapter"
VERSION = 4  # 3 added the plan's `stacks`, 4 its `tokens`; files of versions 2 and 3 still load
READABLE_VERSIONS = (2, 3, 4)


def adapter_state_dict(model: nn.Module, adapter: str | None = None) -> dict[str, Tensor]:
    """The adapter tensors and the trainable base parameters: with `adapter=None` every
    adapter's, keyed as in `model.state_dict()`; with an adapter's name that adapter's alone,
    keyed as the default adapter's would be (what `save_adapter` writes; the two agree on a
    model holding only the default adapter).

    Sharded parameters (DTensors, as under FSDP2's `fully_shard`) are gathered to full
    tensors, a collective: every rank must call this.
    """
    if adapter is not None:
        check_held(model, [adapter])
    params = {
        found.key if adapter is None else found.file_key: found.parameter
        for found in adapter_parameters(model)
        if adapter is None or found.adapter == adapter
    }
    params.update(trainable_base_parameters(model))
    return {name: full_tensor(p.detach()) for name, p in params.items()}


def trainable_base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters that belong to no adapter (`inject(trainable=...)`'s)."""
    adapters = {id(p) for _, p in named_adapter_parameters(model)}
    return {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad and id(p) not in adapters}


def adapter_plan(model: nn.Module, adapter: str = DEFAULT_ADAPTER) -> Plan:
    """The plan that re-injects adapter `adapter` of this model into a fresh base model."""
    root = unwrap(model)
    lora = {}
    for name, module in root.named_modules():
        if isinstance(module, LoRALayer) and (parts := module.parts(adapter)) is not None:
            lora[name] = parts_spec(parts)
    filters = {host: task_filter.spec for host, task_filter in named_filters(root, adapter)}
    tokens = {n: tuple(r.ids.tolist()) for n, m in root.named_modules() if (r := token_rows_of(m, adapter)) is not None}
    return Plan(lora, filters, tuple(trainable_base_parameters(root)), _stacks(root, [*lora, *filters]), tokens)


def _stacks(root: nn.Module, names: list[str]) -> tuple[str, ...]:
    """The stacks (`Plan.stacks`) of `names` that `names` cover whole among `root`'s modules:
    each name's numbered parts become `\\d+`, and a stack counts when every module of `root` it
    matches is named."""
    modules = list(named_candidates(root))
    stacks: dict[str, set[str]] = {}
    for name in names:
        parts = name.split(".")
        if any(part.isdigit() for part in parts):
            stack = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in parts)
            stacks.setdefault(stack, set()).add(name)
    return tuple(s for s, held in stacks.items() if {n for n in modules if re.fullmatch(s, n)} == held)


def _stack_problems(plan: Plan, candidates: Mapping[str, nn.Module]) -> list[str]:
    """Each stack the file covers whole that has more modules in this model, layer by layer (a
    module the file names and this model lacks is `_expected_shapes`' to report)."""
    planned = [*plan.lora, *plan.filters]
    problems = []
    for stack in plan.stacks:
        held = [n for n in planned if re.fullmatch(stack, n)]
        if extra := [n for n in candidates if re.fullmatch(stack, n) and n not in held]:
            problems.append(
                f"{stack}: the file holds {len(held)} of these modules, this model has {len(held) + len(extra)}; "
                f"not in the file: {_listed(extra)}"
            )
    return problems


def _listed(names: list[str], most: int = 8) -> str:
    return ", ".join(map(repr, names[:most])) + (f" and {len(names) - most} more" if len(names) > most else "")


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = DEFAULT_ADAPTER) -> None:
    """Write adapter `adapter` of `model` (and the trainable base parameters) to `path`, a
    safetensors file, atomically (a complete temporary file, then a rename: an interrupted
    save leaves the previous file as it was). The file names no adapter: every adapter is
    written as the default one is, and loads into a fresh model as its default adapter.

    Under `torch.distributed` only rank 0 writes. A sharded (FSDP2) model's adapter is
    gathered first, so there every rank must call this; a DDP model's may be saved by rank 0
    alone.
    """
    if next(named_adapter_parameters(model), None) is None:
        raise AdapterFileError("the model holds no adapter to save; call loratrf.inject first")
    tensors = adapter_state_dict(model, adapter)
    on_meta = [name for name, t in tensors.items() if t.is_meta]
    if on_meta:
        raise AdapterFileError(
            f"adapter tensors are on the meta device (e.g. {on_meta[0]!r}) and hold no values; "
            "materialise the model (to_empty + loading weights) before saving"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    tensors = {name: t.cpu().contiguous() for name, t in tensors.items()}
    if bad := non_finite_tensors(tensors.items()):
        warnings.warn(
            f"saving an adapter that holds NaN/Inf in {len(bad)} tensor(s) ({_listed(bad, 3)}): training diverged. "
            f"The file is written, so that it can be inspected, but load_adapter will refuse it",
            stacklevel=2,
        )
    plan = json.dumps(adapter_plan(model, adapter).to_dict())
    metadata = {"format": FORMAT, "version": str(VERSION), "plan": plan, "sha256": adapter_digest(plan, tensors)}
    data = safetensors.torch.save(tensors, metadata)
    path = Path(path)
    if not path.parent.is_dir():
        raise AdapterFileError(f"cannot write {path}: the folder {path.parent} does not exist; create it first")
    write_atomically(path, data)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush and fsync it, then rename it over
    `path`: a reader (or a crash at any moment) sees the old file or the new one, never part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = DEFAULT_ADAPTER) -> None:
    """Re-inject the adapter recorded in `path` into `model` as adapter `adapter`, and load its
    tensors (and the trainable base parameters the file holds).

    `model` is the base model the adapter was trained on, possibly holding other adapters (or
    already holding adapter `adapter` as the file describes it, whose values are then replaced).
    As with `inject`, the active adapter stays, unless none was active. Every check runs before
    the model changes: a file that is unreadable, of another format, or whose modules, keys or
    shapes do not fit this model raises `AdapterFileError` naming them, and leaves the model
    untouched.
    """
    check_adapter_name(adapter)
    root = unwrap(model)
    plan, tensors = read_adapter_file(path)
    if bad := non_finite_tensors(tensors.items()):
        raise AdapterFileError(
            f"{path} holds NaN/Inf in {len(bad)} tensor(s) ({_listed(bad, 3)}): the adapter it was saved from had "
            "diverged, and loaded it would make the model compute NaN; the model was left unchanged. Load an "
            "earlier checkpoint (safetensors.torch.load_file reads this one for inspection)"
        )
    candidates = named_candidates(root)
    expected = _expected_shapes(candidates, root, plan, path, adapter)
    if stack_problems := _stack_problems(plan, candidates):
        raise AdapterFileError(
            f"{path} covers whole stacks of layers that this model has more of (is it from a deeper model of "
            "this family?); the model was left unchanged:\n- " + "\n- ".join(stack_problems)
        )
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{path}: the tensors do not match the adapter it describes; "
            f"missing: {missing or 'none'}; unexpected: {unexpected or 'none'}"
        )
    wrong = [
        f"{key}: file {tuple(tensors[key].shape)}, model {shape}"
        for key, shape in expected.items()
        if tuple(tensors[key].shape) != shape
    ]
    if wrong:
        raise AdapterFileError(f"{path}: adapter shapes do not fit this model: " + "; ".join(wrong))

    merged = [n for n in plan.lora if isinstance(candidates[n], LoRALayer) and candidates[n].merged]
    merged += [n for n in plan.tokens if merged_token_tables(candidates[n])]
    if merged:
        raise MergeError(
            f"cannot load the adapter: LoRA layer {merged[0]!r} is merged, so its weight holds the current "
            "update, which new factors would leave behind; call loratrf.unmerge(model) first"
        )
    new = Plan(
        {n: spec for n, spec in plan.lora.items() if _lora_parts(candidates[n], adapter) is None},
        {h: spec for h, spec in plan.filters.items() if filter_of(candidates[h], adapter) is None},
        plan.trainable,
        tokens={n: ids for n, ids in plan.tokens.items() if token_rows_of(candidates[n], adapter) is None},
    )
    if (new.lora or new.filters or new.tokens) and (problem := engine_problem(model)):
        raise InjectionError(f"cannot load the adapter into this model: {problem}")
    apply_plan(root, new, adapter)
    params = dict(root.named_parameters(remove_duplicate=False))  # the trainable base parameters' keys
    params.update({found.file_key: found.parameter for found in adapter_parameters(root) if found.adapter == adapter})
    with torch.no_grad():
        for key, tensor in tensors.items():
            _copy_full_tensor(params[key], tensor)


def _lora_parts(module: nn.Module, adapter: str):
    return module.parts(adapter) if isinstance(module, LoRALayer) else None


def read_adapter_file(path: str | os.PathLike) -> tuple[Plan, dict[str, Tensor]]:
    """`(plan, tensors)` of an adapter file, checked for format, version, plan and checksum."""
    if not Path(path).is_file():
        raise AdapterFileError(f"no adapter file at {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own and OS errors for damaged or hostile files
        raise AdapterFileError(
            f"{path} is not a readable loratrf adapter file (truncated, corrupted, or not a safetensors file "
            f"written by loratrf.save_adapter): {type(e).__name__}: {e}"
        ) from None
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(
            f"{path} is a safetensors file but not a loratrf adapter (no '{FORMAT}' format marker in its metadata)"
        )
    version = metadata.get("version", "")
    if not version.isdigit() or int(version) not in READABLE_VERSIONS:
        raise AdapterFileError(
            f"{path} has adapter format version {version!r}; this loratrf reads versions {READABLE_VERSIONS}"
            + ("; upgrade loratrf" if version.isdigit() and int(version) > VERSION else "")
        )
    plan_text = metadata.get("plan", "")
    if metadata.get("sha256") != adapter_digest(plan_text, tensors):
        raise AdapterFileError(f"{path}: the plan and tensors do not match the file's checksum; the file is corrupted")
    try:
        plan = Plan.from_dict(json.loads(plan_text))
    except (ValueError, InjectionError) as e:  # json's errors are ValueErrors
        raise AdapterFileError(f"{path}: the adapter's plan (metadata 'plan') is malformed: {e}") from None
    return plan, tensors


def adapter_digest(plan: str, tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the plan's JSON, then every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256(plan.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def full_tensor(t: Tensor) -> Tensor:
    """`t`, or the whole of a sharded DTensor (gathered from every rank)."""
    gather = getattr(t, "full_tensor", None)  # DTensor's; duck-typed for builds without torch.distributed
    return gather() if gather is not None else t


def _copy_full_tensor(param: Tensor, full: Tensor) -> None:
    """`param.copy_(full)`, where a sharded DTensor `param` takes only this rank's part of `full`."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def _expected_shapes(candidates, root, plan: Plan, path, adapter: str) -> dict[str, tuple[int, ...]]:
    """Every tensor key the file must hold, with its shape in this model; checks the modules
    (against adapter `adapter`'s parts where they hold it). Shapes are read off the modules the
    plan would build (on the meta device)."""
    shapes: dict[str, tuple[int, ...]] = {}
    problems = []
    for name, spec in plan.lora.items():
        module = candidates.get(name)
        if module is None or not (isinstance(module, (nn.Linear, nn.Embedding, LoRALinear)) or is_conv1d(module)):
            found = "nothing" if module is None else type(module).__name__
            problems.append(f"LoRA layer {name!r} (the model has {found} there)")
            continue
        parts = _lora_parts(module, adapter)
        if parts is not None and parts_spec(parts) != spec:
            problems.append(
                f"{name!r} already holds a different LoRA adapter {parts_spec(parts)}, the file has {spec}"
                + ("" if adapter == DEFAULT_ADAPTER else f" (adapter {adapter!r})")
            )
            continue
        in_f, out_f = linear_shape(module)
        # DoRA's magnitude included; an embedding's U, V are those of the map from num_embeddings to dim
        layer = LoRALinear(in_f, out_f, **dataclasses.asdict(spec), device="meta")
        shapes.update(
            {
                f"{name}.{k}": tuple(p.shape)
                for k, p in layer.named_parameters()
                if k not in LoRALinear.base_parameter_names
            }
        )
    for host, spec in plan.filters.items():
        module = candidates.get(host)
        if module is None:
            problems.append(f"filter host {host!r} (no such module)")
            continue
        existing = filter_of(module, adapter)
        if existing is not None and existing.spec != spec:
            problems.append(f"{host!r} already holds a different filter {existing.spec}, the file has {spec}")
            continue
        task_filter = TaskAwareFilter.from_spec(spec, torch.device("meta"), torch.float32)
        shapes.update({f"{host}.{FILTER_NAME}.{k}": tuple(p.shape) for k, p in task_filter.named_parameters()})
    for name, ids in plan.tokens.items():
        module, existing = candidates.get(name), token_rows_of(candidates.get(name), adapter)
        if not isinstance(module, nn.Embedding):
            found = "nothing" if module is None else type(module).__name__
            problems.append(f"trainable token rows of {name!r} (the model has {found} there)")
        elif existing is not None and existing.ids.tolist() != list(ids):
            problems.append(f"{name!r} already has trainable rows {existing.ids.tolist()}, the file has {list(ids)}")
        else:
            shapes[f"{name}.{TOKEN_ROWS}.{DEFAULT_ADAPTER}.rows"] = (len(ids), module.embedding_dim)
    params = dict(root.named_parameters(remove_duplicate=False))
    for name in plan.trainable:
        if name not in params:
            problems.append(f"trainable parameter {name!r} (no such parameter)")
        else:
            shapes[name] = tuple(params[name].shape)
    if problems:
        raise AdapterFileError(f"{path} does not fit this model (is it from another model?): " + "; ".join(problems))
    return shapes


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of a LoRA target (a packed quantized weight's shape is not;
    an embedding's are `(num_embeddings, embedding_dim)`)."""
    if isinstance(module, LoRALayer) or quantized.runs_own_forward(module):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return tuple(module.weight.shape)
    rows, cols = module.weight.shape
    return (rows, cols) if is_conv1d(module) else (cols, rows)
