"""Adapter files: only the adapter tensors plus how to re-inject them, loaded without pickle code.

A file is a `torch.save`d dict `{"format", "version", "metadata", "tensors", "sha256"}` where
`metadata` is a JSON string (`{"lora": {name: options}, "filters": {host: options},
"trainable": [parameter names]}`), `tensors` maps `model.state_dict()` keys to tensors and
`sha256` digests the tensors, so damaged bytes are caught, not loaded. It is read with
`torch.load(weights_only=True)`, which runs no pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loratrf.errors import AdapterFileError, InjectionError
from loratrf.filter import FILTER_NAME, TaskAwareFilter, filter_of
from loratrf.surgery import apply_plan, engine_problem, named_candidates
from loratrf.lora import LoRALinear, is_conv1d
from loratrf.walk import named_adapter_parameters, named_filters, named_lora_layers, unwrap

FORMAT = "loratrf-adapter"
VERSION = 1


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors and the trainable base parameters, keyed as in `model.state_dict()`.

    Sharded parameters (DTensors, as under FSDP2's `fully_shard`) are gathered to full
    tensors, a collective: every rank must call this.
    """
    params = dict(named_adapter_parameters(model))
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad and name not in params:
            params[name] = p
    return {name: _full_tensor(p.detach()) for name, p in params.items()}


def adapter_metadata(model: nn.Module) -> dict[str, Any]:
    """How to re-inject this model's adapters into a fresh base model, as plain JSON data."""
    adapter_names = {name for name, _ in named_adapter_parameters(model)}
    return {
        "lora": {name: _lora_options(layer) for name, layer in named_lora_layers(model)},
        "filters": {host: _filter_options(f) for host, f in named_filters(model)},
        "trainable": [n for n, p in unwrap(model).named_parameters() if p.requires_grad and n not in adapter_names],
    }


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter of `model` to `path` atomically (a temporary file, then a rename).

    Under `torch.distributed` only rank 0 writes. A sharded (FSDP2) model's adapter is
    gathered first, so there every rank must call this; a DDP model's may be saved by rank 0
    alone.
    """
    if next(named_adapter_parameters(model), None) is None:
        raise AdapterFileError("the model holds no adapter to save; call loratrf.inject first")
    tensors = adapter_state_dict(model)
    on_meta = [name for name, t in tensors.items() if t.is_meta]
    if on_meta:
        raise AdapterFileError(
            f"adapter tensors are on the meta device (e.g. {on_meta[0]!r}) and hold no values; "
            "materialise the model (to_empty + loading weights) before saving"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    tensors = {name: t.cpu().contiguous() for name, t in tensors.items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "metadata": json.dumps(adapter_metadata(model)),
        "tensors": tensors,
        "sha256": tensors_digest(tensors),
    }
    path = Path(path)
    if not path.parent.is_dir():
        raise AdapterFileError(f"cannot write {path}: the folder {path.parent} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Re-inject the adapters recorded in `path` into `model` and load their tensors.

    `model` is the base model the adapter was trained on (or one already holding exactly these
    adapters). Every check runs before the model changes: a file that is unreadable, of
    another format, or whose modules, keys or shapes do not fit this model raises
    `AdapterFileError` naming them, and leaves the model untouched.
    """
    root = unwrap(model)
    metadata, tensors = read_adapter_file(path)
    candidates = named_candidates(root)
    lora, filters, trainable = metadata["lora"], metadata["filters"], metadata["trainable"]

    expected = _expected_shapes(candidates, root, lora, filters, trainable, path)
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

    new_lora = {n: _lora_kwargs(o) for n, o in lora.items() if not isinstance(candidates[n], LoRALinear)}
    new_filters = {h: _filter_kwargs(o) for h, o in filters.items() if filter_of(_module(root, h)) is None}
    if (new_lora or new_filters) and (problem := engine_problem(model)):
        raise InjectionError(f"cannot load the adapter into this model: {problem}")
    apply_plan(root, new_lora, new_filters, trainable)
    params = dict(root.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, tensor in tensors.items():
            _copy_full_tensor(params[key], tensor)


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """`(metadata, tensors)` of an adapter file, checked for format, version and types."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterFileError(f"no adapter file at {path}") from None
    except Exception as e:  # torch raises many types for damaged or hostile files
        raise AdapterFileError(
            f"{path} is not a readable loratrf adapter file (truncated, corrupted, or not written by "
            f"loratrf.save_adapter; loading runs no pickled code): {type(e).__name__}: {e}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AdapterFileError(f"{path} is not a loratrf adapter file (no '{FORMAT}' format marker)")
    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise AdapterFileError(
            f"{path} has adapter format version {version!r}, newer than this loratrf reads ({VERSION}); upgrade loratrf"
        )
    try:
        metadata = json.loads(payload["metadata"])
        lora, filters, trainable = metadata["lora"], metadata["filters"], metadata["trainable"]
        tensors = payload["tensors"]
        assert isinstance(lora, dict) and isinstance(filters, dict) and isinstance(trainable, list)
        assert isinstance(tensors, dict) and all(isinstance(t, Tensor) for t in tensors.values())
        assert all(isinstance(o, dict) for o in (*lora.values(), *filters.values()))
    except (KeyError, TypeError, ValueError, AssertionError):
        raise AdapterFileError(f"{path}: the adapter metadata is malformed") from None
    if payload.get("sha256") != tensors_digest(tensors):
        raise AdapterFileError(f"{path}: the tensors do not match the file's checksum; the file is corrupted")
    return metadata, tensors


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _full_tensor(t: Tensor) -> Tensor:
    """`t`, or the whole of a sharded DTensor (gathered from every rank)."""
    full_tensor = getattr(t, "full_tensor", None)  # DTensor's; duck-typed for builds without torch.distributed
    return full_tensor() if full_tensor is not None else t


def _copy_full_tensor(param: Tensor, full: Tensor) -> None:
    """`param.copy_(full)`, where a sharded DTensor `param` takes only this rank's part of `full`."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def _module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


def _lora_options(layer: LoRALinear) -> dict[str, Any]:
    t = layer.lora
    return dict(
        rank=t.rank, alpha=t.alpha, dropout=layer.dropout, init=t.init, rslora=t.rslora, dtype=_dtype_name(t.U.dtype)
    )


def _filter_options(task_filter: TaskAwareFilter) -> dict[str, Any]:
    t = task_filter.transform
    return dict(
        dim=task_filter.dim,
        rank=t.rank,
        alpha=t.alpha,
        similarity=task_filter.similarity,
        task_init=task_filter.task_init,
        init=t.init,
        dtype=_dtype_name(t.U.dtype),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: object) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise AdapterFileError(f"the adapter file names an unknown dtype {name!r}")
    return dtype


def _lora_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(options)
    options["adapter_dtype"] = _torch_dtype(options.pop("dtype"))
    return options


def _filter_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(options)
    options["dtype"] = _torch_dtype(options["dtype"])
    return options


def _expected_shapes(candidates, root, lora, filters, trainable, path) -> dict[str, tuple[int, ...]]:
    """Every tensor key the file must hold, with its shape in this model; checks the modules."""
    shapes: dict[str, tuple[int, ...]] = {}
    problems = []
    for name, options in lora.items():
        module = candidates.get(name)
        if module is None or not (isinstance(module, (nn.Linear, LoRALinear)) or is_conv1d(module)):
            found = "nothing" if module is None else type(module).__name__
            problems.append(f"LoRA layer {name!r} (the model has {found} there)")
            continue
        if isinstance(module, LoRALinear) and _lora_options(module) != options:
            problems.append(
                f"{name!r} already holds a different LoRA adapter {_lora_options(module)}, the file has {options}"
            )
            continue
        in_f, out_f = _linear_shape(module)
        shapes[f"{name}.lora.U"], shapes[f"{name}.lora.V"] = (in_f, options["rank"]), (options["rank"], out_f)
    for host, options in filters.items():
        module = candidates.get(host) if host else root
        if module is None:
            problems.append(f"filter host {host!r} (no such module)")
            continue
        existing = filter_of(module)
        if existing is not None and _filter_options(existing) != options:
            problems.append(
                f"{host!r} already holds a different filter {_filter_options(existing)}, the file has {options}"
            )
            continue
        dim, rank = options["dim"], options["rank"]
        prefix = f"{host}.{FILTER_NAME}" if host else FILTER_NAME
        shapes[f"{prefix}.task_vector"] = (dim,)
        shapes[f"{prefix}.transform.U"], shapes[f"{prefix}.transform.V"] = (dim, rank), (rank, dim)
    params = dict(root.named_parameters(remove_duplicate=False))
    for name in trainable:
        if name not in params:
            problems.append(f"trainable parameter {name!r} (no such parameter)")
        else:
            shapes[name] = tuple(params[name].shape)
    if problems:
        raise AdapterFileError(f"{path} does not fit this model (is it from another model?): " + "; ".join(problems))
    return shapes


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, LoRALinear):
        return module.in_features, module.out_features
    rows, cols = module.weight.shape
    return (rows, cols) if is_conv1d(module) else (cols, rows)
