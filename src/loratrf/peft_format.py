"""PEFT's LoRA adapter folders: `export_peft` writes one, `import_peft` reads one.

A PEFT LoRA adapter is a folder with `adapter_config.json` (a `peft.LoraConfig`) and
`adapter_model.safetensors`, whose keys are `base_model.model.<module>.lora_A.weight`
(`A`, `[r, in]`) and `...lora_B.weight` (`B`, `[out, r]`) for every adapted module, named as in
the base model's `named_modules()` (and `...lora_magnitude_vector`, `[out]`, DoRA's magnitude,
with `use_dora`). PEFT computes `base(x) + scale · B A dropout(x)` with
`scale = lora_alpha / r` (or `/ sqrt(r)` with `use_rslora`), exactly what `LoRALinear` computes
with `U = Aᵀ` and `V = Bᵀ`; `A` and `B` keep that layout for GPT-2's Conv1D too
(`fan_in_fan_out` only describes the base weight). An embedding's are `...lora_embedding_A`
(`A`, `[r, num_embeddings]`) and `...lora_embedding_B` (`B`, `[dim, r]`), PEFT's
`E[x] + scale · (A[:, x])ᵀ Bᵀ`, which `LoRAEmbedding` computes with the same `U = Aᵀ`, `V = Bᵀ`;
the copy of the base table PEFT saves beside it (`...base_layer.weight`) is checked against the
model's, never loaded. Neither function needs PEFT installed.

PEFT's `trainable_token_indices` (`{embedding: [token ids]}`, or a list for the input
embedding) are loratrf's trainable token rows (`inject(trainable_tokens=...)`): the rows
`R [n, dim]` themselves (not differences) are `base_model.model.<embedding>.token_adapter.trainable_tokens_delta`,
which both PEFT and loratrf read in a tied `lm_head` as well; PEFT saves no second copy for it.

PEFT's `modules_to_save` (a classification head, say) are whole modules PEFT trains and saves,
picked by the ends of their names; their tensors are keyed `base_model.model.<module>.<key>`
as in the module's `state_dict()`. They are loratrf's trainable base parameters
(`inject(trainable=...)`): `export_peft` writes the modules that own them, `import_peft` loads
them into the base model's modules and keeps those trainable. PEFT keeps a copy per adapter;
loratrf's trainable base parameters are shared by all adapters, as in its own adapter files.

Module names are written exactly: `target_modules` lists the full names (PEFT matches list
entries as name suffixes, so where an entry would also match another module it is one regex,
which PEFT full-matches), and each layer whose rank or alpha differs from the config's `r` /
`lora_alpha` gets its full name in `rank_pattern` / `alpha_pattern`. `export_peft` checks with
PEFT's matching rules (the current one and that of 0.13 and earlier) that every layer resolves
to its own rank and alpha.
"""

from __future__ import annotations

import collections
import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from loratrf.adapter_file import full_tensor, linear_shape, trainable_base_parameters, write_atomically
from loratrf.config import DEFAULT_ADAPTER, LoRASpec, Plan, check_adapter_name, token_ids
from loratrf.errors import AdapterFileError, InjectionError
from loratrf.filter import TaskAwareFilter
from loratrf.inject import SUPPORTED_TARGETS, apply_plan, engine_problem, named_candidates
from loratrf.embedding import LoRAEmbedding
from loratrf.lora import LoRALinear, is_conv1d
from loratrf.lora_layer import LoRAAdapter, LoRALayer
from loratrf.serving import check_servable, check_server
from loratrf.token_rows import token_rows_of
from loratrf.walk import named_filters, named_lora_layers, unwrap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # older PEFT releases; read with weights_only=True
PREFIX = "base_model.model."
_KEY = re.compile(
    r"base_model\.model\.(?P<module>.+)\."
    r"(?P<which>lora_A\.weight|lora_B\.weight|lora_magnitude_vector|lora_embedding_A|lora_embedding_B)"
)
_AB, _EMBEDDING_AB = ("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")
# the base table PEFT saves beside LoRA on an embedding (`save_embedding_layers`), checked, not loaded
_SAVED_BASE = re.compile(r"base_model\.model\.(?P<module>.+)\.base_layer\.weight")
_TOKEN_ROWS = "token_adapter.trainable_tokens_delta"  # `<embedding>.<this>`: trainable token rows `[n, dim]`

# adapter_config.json options loratrf understands; any other option must hold its default
_UNDERSTOOD = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "fan_in_fan_out",  # loratrf reads the base layer's layout off the module itself
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "modules_to_save",
    "use_dora",
    "lora_bias",
    "trainable_token_indices",
}
# options whose PEFT default is not None/False/empty
_NON_EMPTY_DEFAULTS = {"megatron_core": "megatron.core", "qalora_group_size": 16}
# options that change what the model computes (or trains) in ways loratrf's LoRA cannot express
_UNREPRESENTABLE = {
    "lora_bias": "PEFT trains a bias on each lora_B; loratrf's LoRA has none",
}


def export_peft(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    adapter: str = DEFAULT_ADAPTER,
    lora_only: bool = False,
    base_model_name_or_path: str | None = None,
    for_serving: str | None = None,
) -> dict[str, Any]:
    """Write the LoRA layers of adapter `adapter` of `model` as a PEFT LoRA adapter folder
    (created if missing):
    `adapter_config.json` and `adapter_model.safetensors`, which
    `peft.PeftModel.from_pretrained(base_model, directory)` loads onto the base model to
    compute what `model` computes. Returns the config written.

    Trainable base parameters (a classifier head kept trainable, say) go into the folder as
    PEFT's `modules_to_save`: the modules that own them, with their whole `state_dict()`. PEFT's
    LoRA cannot express task-aware filters: a model holding this adapter's is refused with
    `AdapterFileError`, unless `lora_only=True` asks for the LoRA layers alone (the model PEFT
    loads then lacks the filters and the trained modules, and computes something else).
    `base_model_name_or_path` goes into the config (default: the model's
    `config._name_or_path`, for Hugging Face models). Under `torch.distributed` only rank 0
    writes; a sharded (FSDP2) model's tensors are gathered, so there every rank must call this.

    `for_serving="vllm"` also refuses, before writing, a folder vLLM cannot serve as the model
    computes (`loratrf.serving`: DoRA, modules to save, filters, ranks above 512, tensors it does not
    read), each with its reason and the way out; without it nothing is checked for a server.
    """
    check_server(for_serving)
    root = unwrap(model)
    lora_layers = dict(named_lora_layers(root))
    if not lora_layers:
        raise AdapterFileError("the model holds no LoRA layers to export; call loratrf.inject first")
    layers = {name: parts for name, layer in lora_layers.items() if (parts := layer.parts(adapter)) is not None}
    if not layers:
        held = list(dict.fromkeys(n for layer in lora_layers.values() for n in layer.adapter_names()))
        raise AdapterFileError(
            f"the model holds no LoRA layers of adapter {adapter!r} to export; its LoRA adapters are {held}: "
            "pass export_peft(..., adapter=<one of them>)"
        )
    if not lora_only and for_serving is None:
        _refuse_filters(root, adapter)
    hosts = [] if lora_only else [host or "(the model itself)" for host, _ in named_filters(root, adapter)]
    saved = {} if lora_only else _modules_to_save(root)
    if lora_only:
        _say_what_is_left_out(root, adapter)
    config = peft_config(root, layers, base_model_name_or_path, modules_to_save=list(saved))
    rows = {n: r for n, m in root.named_modules() if (r := token_rows_of(m, adapter)) is not None}
    if rows:
        config["trainable_token_indices"] = {name: r.ids.tolist() for name, r in rows.items()}
    tensors = {
        f"{PREFIX}{name}.{key}": full_tensor(t.detach()).cpu().contiguous()
        for name, module in saved.items()
        for key, t in module.state_dict().items()
    }
    for name, r in rows.items():
        tensors[f"{PREFIX}{name}.{_TOKEN_ROWS}"] = full_tensor(r.rows.detach()).cpu().contiguous()
    for name, layer in layers.items():
        U, V = (full_tensor(p.detach()) for p in (layer.lora.U, layer.lora.V))
        if U.is_meta or V.is_meta:
            raise AdapterFileError(
                f"the adapter of {name!r} is on the meta device and holds no values; materialise the model first"
            )
        A, B = _EMBEDDING_AB if isinstance(lora_layers[name], LoRAEmbedding) else _AB
        tensors[f"{PREFIX}{name}.{A}"] = U.T.cpu().contiguous()
        tensors[f"{PREFIX}{name}.{B}"] = V.T.cpu().contiguous()
        if layer.dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = full_tensor(layer.magnitude.detach()).cpu().contiguous()
    if for_serving is not None:
        check_servable(for_serving, config, tensors, hosts)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / WEIGHTS_NAME, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    write_atomically(directory / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return config


def peft_config(
    root: nn.Module,
    layers: Mapping[str, LoRALayer | LoRAAdapter],
    base_model_name_or_path: str | None = None,
    modules_to_save: list[str] | None = None,
) -> dict[str, Any]:
    """The `adapter_config.json` (a `peft.LoraConfig`, as a dict) for one adapter's parts
    (`LoRALinear.parts`) on these LoRA layers of `root`, and these modules to save (full names)."""
    dropouts = {layer.dropout for layer in layers.values()}
    rsloras = {layer.lora.rslora for layer in layers.values()}
    doras = {layer.dora for layer in layers.values()}
    if len(dropouts) > 1:
        raise AdapterFileError(
            f"the LoRA layers use different dropouts {sorted(dropouts)}, and PEFT's LoRA has one "
            "lora_dropout for all; inject them with one dropout to export them"
        )
    if len(rsloras) > 1:
        raise AdapterFileError(
            "some LoRA layers use rsLoRA's scale (alpha / sqrt(r)) and others alpha / r, and PEFT's "
            "use_rslora holds for all; inject them alike to export them"
        )
    if len(doras) > 1:
        raise AdapterFileError(
            "some LoRA layers are DoRA layers and others plain LoRA, and PEFT's use_dora holds for all; "
            "inject them alike to export them"
        )
    ranks = {name: layer.lora.rank for name, layer in layers.items()}
    alphas = {name: _number(layer.lora.alpha) for name, layer in layers.items()}
    r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
    rank_pattern, alpha_pattern = _patterns(ranks, r), _patterns(alphas, alpha)
    names = list(layers)
    if not _patterns_resolve(rank_pattern, alpha_pattern, r, alpha, ranks, alphas):
        rank_pattern, alpha_pattern = _patterns(ranks, None), _patterns(alphas, None)  # every layer, longest first
        if not _patterns_resolve(rank_pattern, alpha_pattern, r, alpha, ranks, alphas):
            raise AdapterFileError(
                "PEFT's rank_pattern / alpha_pattern match module names by suffix, and cannot give each of "
                f"these LoRA layers its own rank and alpha: {names}; give the layers one rank and alpha"
            )
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(root, "config", None), "_name_or_path", None) or None
    init = _most_common(layer.lora.init for layer in layers.values())
    linear = [name for name in layers if isinstance(root.get_submodule(name), LoRALinear)]  # not an embedding
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropouts.pop(),
        "target_modules": _target_modules(root, names),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": rsloras.pop(),
        "use_dora": doras.pop(),
        "fan_in_fan_out": any(getattr(root.get_submodule(name), "fan_in_fan_out", False) for name in linear),
        "bias": "none",
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": "gaussian" if init == "gaussian" else True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def import_peft(model: nn.Module, directory: str | os.PathLike, adapter: str = DEFAULT_ADAPTER) -> list[str]:
    """Inject LoRA layers from a PEFT LoRA adapter folder into `model`, the base model it was
    trained on, as adapter `adapter`, so that `model` computes what PEFT computes with it
    (`rank_pattern`, `alpha_pattern`, `use_rslora`, DoRA, GPT-2's Conv1D, `modules_to_save`
    included). Layers that hold other adapters take it beside them (as PEFT's
    `load_adapter(..., adapter_name=...)`); as with `inject`, the active adapter stays unless
    none was active. Like `inject`, this freezes every base parameter but those of the modules to
    save, whose tensors it loads into the model's modules (shared by all adapters); filters can be
    added afterwards with a further `inject`. Returns the names of the LoRA layers injected.

    Every check runs before the model changes. A folder without the two files, a file that is
    truncated or not PEFT's, or tensors that do not fit the model raise `AdapterFileError`;
    so does whatever loratrf cannot represent (another `peft_type` than LoRA, LoRA on
    embeddings or convolutions, trained biases, ...), named in the message.
    """
    check_adapter_name(adapter)
    directory = Path(directory)
    config = read_peft_config(directory)
    root = unwrap(model)
    candidates = named_candidates(root)
    tensors = _check_saved_bases(_read_weights(directory), candidates, directory)
    tokens, rows, tensors = _token_rows(config, tensors, root, candidates, directory)
    saved, tensors = _saved_modules(config, tensors, candidates, directory)
    pairs = _lora_pairs(tensors, directory)
    specs = _specs(config, pairs, candidates, directory, adapter)
    if problem := engine_problem(model):
        raise InjectionError(f"cannot import the adapter into this model: {problem}")
    trainable = [n for name in saved for n, _ in candidates[name].named_parameters(name, remove_duplicate=False)]
    apply_plan(root, Plan(specs, {}, tuple(trainable), tokens=tokens), adapter)
    layers = dict(named_lora_layers(root))
    with torch.no_grad():
        for name, values in rows.items():
            token_rows_of(candidates[name], adapter).rows.copy_(values)
        for name, values in saved.items():
            state = candidates[name].state_dict(keep_vars=True)
            for key, tensor in values.items():
                state[key].copy_(tensor)
        for name, pair in pairs.items():
            parts = layers[name].parts(adapter)
            A, B = _factors(pair)
            parts.lora.U.copy_(A.T)
            parts.lora.V.copy_(B.T)
            if parts.dora:
                parts.magnitude.copy_(pair["lora_magnitude_vector"])
    return list(pairs)


def read_peft_config(directory: Path) -> dict[str, Any]:
    """The adapter_config.json of a PEFT LoRA adapter folder, checked for what loratrf can represent."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        where = (
            "no such folder" if not directory.is_dir() else f"it holds {sorted(p.name for p in directory.iterdir())}"
        )
        raise AdapterFileError(f"no PEFT adapter config at {path} ({where}); a PEFT adapter folder holds {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise AdapterFileError(f"{path} is not a readable JSON file: {type(e).__name__}: {e}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterFileError(f"{path} is not a PEFT adapter config (a JSON object with a 'peft_type')")
    peft_type = config["peft_type"]
    if peft_type != "LORA":
        raise AdapterFileError(
            f"{path} describes a {peft_type} adapter; loratrf reads PEFT's LoRA adapters only (peft_type 'LORA')"
        )
    problems = [f"{key}={config[key]!r} ({why})" for key, why in _UNREPRESENTABLE.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (PEFT trains the base layers' biases; loratrf keeps them frozen)")
    init = config.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        problems.append(
            f"init_lora_weights={init!r} (PEFT's initialisations such as PiSSA, OLoRA, CorDA and LoftQ change the "
            "base weights as well, so such an adapter does not apply to the original base; convert it to plain "
            "LoRA with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))"
        )
    for key, value in config.items():
        if key not in _UNDERSTOOD and value not in (None, False, [], {}, "", _NON_EMPTY_DEFAULTS.get(key)):
            problems.append(f"{key}={value!r} (an option loratrf does not represent)")
    if problems:
        raise AdapterFileError(
            f"{path}: this PEFT LoRA adapter uses what loratrf cannot represent: " + "; ".join(problems)
        )
    return config


def _read_weights(directory: Path) -> dict[str, Tensor]:
    path = directory / WEIGHTS_NAME
    try:
        if path.is_file():
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            path = directory / PICKLE_WEIGHTS_NAME
            tensors = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
                raise ValueError("not a dict of tensors")
            return tensors
    except Exception as e:  # safetensors and torch raise many types for damaged or hostile files
        raise AdapterFileError(
            f"{path} is not a readable PEFT adapter weights file (truncated or corrupted): {type(e).__name__}: {e}"
        ) from None
    raise AdapterFileError(f"no PEFT adapter weights in {directory}: it holds no {WEIGHTS_NAME}")


def _saved_modules(
    config: Mapping[str, Any], tensors: Mapping[str, Tensor], candidates: Mapping[str, nn.Module], directory: Path
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """`(module name -> {state_dict key -> tensor}, the other tensors)`: the modules of this
    model that `modules_to_save` names (by PEFT's rule: every module whose name ends with an
    entry) and their tensors in the weights file, checked against the modules."""
    entries = config.get("modules_to_save") or []
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise AdapterFileError(f"{directory / CONFIG_NAME}: modules_to_save must be a list of module names")
    modules = {n: m for n, m in candidates.items() if any(n.endswith(e) for e in entries)}
    states = {n: m.state_dict(keep_vars=True) for n, m in modules.items()}
    owner = {f"{PREFIX}{n}.{key}": (n, key) for n, state in states.items() for key in state}
    lora_modules = {match["module"] for key in tensors if (match := _KEY.fullmatch(key))}
    saved: dict[str, dict[str, Tensor]] = {n: {} for n in modules}
    rest, problems = {}, []
    for key, tensor in tensors.items():
        if key not in owner:
            rest[key] = tensor
            if entries and not _KEY.fullmatch(key) and "lora_" not in key:
                problems.append(
                    f"{key!r} is no LoRA tensor, and no module of this model that modules_to_save {entries} names "
                    "holds it (is this the model the adapter was trained on, with its head?)"
                )
            continue
        name, state_key = owner[key]
        expected = tuple(states[name][state_key].shape)
        if tuple(tensor.shape) != expected:
            problems.append(f"{key!r}: shape {tuple(tensor.shape)}, where this model's module has {expected}")
        saved[name][state_key] = tensor
    for name, module in modules.items():
        inside = [n for n in modules if n.startswith(f"{name}.")]
        inside += [n for n, m in module.named_modules(prefix=name) if isinstance(m, (LoRALayer, TaskAwareFilter))]
        inside += [n for n in lora_modules if n == name or n.startswith(f"{name}.")]
        if inside:
            problems.append(
                f"modules_to_save picks {name!r}, which is or holds {inside[0]!r}, another module to save or one "
                "with an adapter; a module is either saved whole or adapted"
            )
    if problems:
        raise AdapterFileError(f"{directory} does not fit this model: " + "; ".join(dict.fromkeys(problems)))
    return saved, rest


def _check_saved_bases(tensors: Mapping[str, Tensor], candidates, directory: Path) -> dict[str, Tensor]:
    """The tensors but the base tables PEFT saves beside LoRA on embeddings
    (`<module>.base_layer.weight`), each checked to equal the model's own."""
    problems = []
    for key, tensor in tensors.items():
        if match := _SAVED_BASE.fullmatch(key):
            module = candidates.get(match["module"])
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor) or weight.shape != tensor.shape:
                found = "no such module" if module is None else f"{tuple(getattr(weight, 'shape', ()))}"
                problems.append(f"{key!r}: the saved base weight {tuple(tensor.shape)}, where this model has {found}")
            elif not torch.equal(weight.detach().cpu(), tensor.to(weight.dtype)):
                problems.append(
                    f"{key!r}: the saved base weight differs from this model's {match['module']!r} (the adapter was "
                    "trained on other embeddings: resize and load the same base model, with the same added tokens)"
                )
    if problems:
        raise AdapterFileError(f"{directory} does not fit this model: " + "; ".join(problems))
    return {key: t for key, t in tensors.items() if not _SAVED_BASE.fullmatch(key)}


def _token_rows(
    config: Mapping[str, Any], tensors: Mapping[str, Tensor], root: nn.Module, candidates, directory: Path
) -> tuple[dict[str, tuple[int, ...]], dict[str, Tensor], dict[str, Tensor]]:
    """`({embedding name: token ids}, {embedding name: rows [n, dim]}, the other tensors)` from
    `trainable_token_indices` (a list: the model's `get_input_embeddings()`; a mapping: the
    embedding whose name ends with each key) and the `...token_adapter.trainable_tokens_delta` keys."""
    indices = config.get("trainable_token_indices") or {}
    path, problems = directory / CONFIG_NAME, []
    if isinstance(indices, list):
        embedding = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
        names = [n for n, m in candidates.items() if m is embedding][:1]
        if not names:
            raise AdapterFileError(
                f"{path}: trainable_token_indices is a list, which PEFT applies to the model's input embedding, and "
                "this model has no get_input_embeddings(); write it as {'<embedding name>': [token ids]}"
            )
        indices = {names[0]: indices}
    try:
        indices = token_ids(f"{path}: trainable_token_indices", indices)
    except InjectionError as e:
        raise AdapterFileError(str(e)) from None
    tokens, rows = {}, {}
    for key, ids in indices.items():
        matched = {id(m): n for n, m in candidates.items() if n == key or n.endswith(f".{key}")}
        if len(matched) != 1:
            found = "no module" if not matched else f"several modules {list(matched.values())}"
            problems.append(f"trainable_token_indices names {key!r}, which is the end of the name of {found}")
            continue
        name = next(iter(matched.values()))
        tokens[name] = ids
        dim = getattr(candidates[name], "embedding_dim", None)
        values = tensors.get(f"{PREFIX}{name}.{_TOKEN_ROWS}")
        if values is None or tuple(values.shape) != (len(ids), dim) or not values.is_floating_point():
            found = "none" if values is None else f"{values.dtype} {tuple(values.shape)}"
            problems.append(f"{PREFIX}{name}.{_TOKEN_ROWS} must be rows ({len(ids)}, {dim}); found {found}")
            continue
        rows[name] = values
    keys = {f"{PREFIX}{name}.{_TOKEN_ROWS}" for name in tokens}
    problems += [
        f"{k!r} holds token rows, which trainable_token_indices does not name"
        for k in tensors
        if k.endswith(_TOKEN_ROWS) and k not in keys
    ]
    if problems:
        raise AdapterFileError(f"{directory} does not fit this model: " + "; ".join(problems))
    return tokens, rows, {k: t for k, t in tensors.items() if not k.endswith(_TOKEN_ROWS)}


def _factors(pair: Mapping[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
    """`(A [r, in], B [out, r])` of a module's PEFT tensors (an embedding's `lora_embedding_A`
    `[r, num_embeddings]` and `lora_embedding_B` `[dim, r]` have the same layout)."""
    names = _EMBEDDING_AB if set(_EMBEDDING_AB) & set(pair) else _AB
    return pair.get(names[0]), pair.get(names[1])


def _lora_pairs(tensors: Mapping[str, Tensor], directory: Path) -> dict[str, dict[str, Tensor]]:
    """`module name -> {"lora_A.weight": A [r, in], "lora_B.weight": B [out, r]}` (an
    embedding's `"lora_embedding_A"`, `"lora_embedding_B"`, and `"lora_magnitude_vector": m [out]`
    for DoRA), from PEFT's keys."""
    found: dict[str, dict[str, Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match:
            found.setdefault(match["module"], {})[match["which"]] = tensor
        else:
            problems.append(f"{key!r} (not a PEFT LoRA tensor key '{PREFIX}<module>.lora_A.weight' / .lora_B.weight)")
    for name, pair in found.items():
        A, B = _factors(pair)
        if set(_AB) & set(pair) and set(_EMBEDDING_AB) & set(pair):
            problems.append(f"{name!r} has both a linear layer's and an embedding's LoRA tensors")
        elif A is None or B is None:
            names = _EMBEDDING_AB if "lora_embedding_A" in pair or "lora_embedding_B" in pair else _AB
            problems.append(f"{PREFIX}{name}.{names[0] if A is None else names[1]} is missing")
        elif A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            problems.append(
                f"{name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not "
                "a linear layer's [r, in] and [out, r]"
            )
        elif not all(t.is_floating_point() for t in pair.values()):
            problems.append(f"{name!r}: the LoRA tensors are not floating-point tensors")
    if not found and not problems:
        problems.append("it holds no LoRA tensors")
    if problems:
        raise AdapterFileError(f"{directory / WEIGHTS_NAME}: " + "; ".join(problems))
    return found


def _specs(
    config: Mapping[str, Any], pairs: Mapping[str, Mapping[str, Tensor]], candidates, directory: Path, adapter: str
) -> dict[str, LoRASpec]:
    """Each module's `LoRASpec`, after checking it against the model and the config."""
    path = directory / CONFIG_NAME
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if not isinstance(rank_pattern, dict) or not isinstance(alpha_pattern, dict):
        raise AdapterFileError(f"{path}: rank_pattern and alpha_pattern must be JSON objects")
    regexes = [*rank_pattern, *alpha_pattern]
    for key in ("target_modules", "exclude_modules"):
        regexes += [config[key]] if isinstance(config.get(key), str) else []
    for regex in regexes:
        try:
            re.compile(regex)
        except re.error as e:
            raise AdapterFileError(f"{path}: {regex!r} is not a valid regular expression: {e}") from None
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    init = "gaussian" if config.get("init_lora_weights", True) == "gaussian" else "kaiming"
    dora = config.get("use_dora", False)
    shared = dict(dropout=config.get("lora_dropout", 0.0), init=init, rslora=config.get("use_rslora", False), dora=dora)
    try:
        LoRASpec(**shared)
    except InjectionError as e:
        raise AdapterFileError(f"{path}: {e}") from None
    specs, problems = {}, []
    for name, pair in pairs.items():
        (A, B), magnitude = _factors(pair), pair.get("lora_magnitude_vector")
        module = candidates.get(name)
        if module is None:
            problems.append(f"the model has no module named {name!r} (is the adapter from another model?)")
            continue
        if isinstance(module, LoRALayer) and module.parts(adapter) is not None:
            problems.append(
                f"{name!r} already has a LoRA adapter named {adapter!r}; import under another name (adapter=...) "
                "or into the base model"
            )
            continue
        if not (isinstance(module, (nn.Linear, LoRALinear)) or is_conv1d(module)) and "lora_A.weight" in pair:
            problems.append(f"{name!r} is a {type(module).__name__}; loratrf's LoRA targets are {SUPPORTED_TARGETS}")
            continue
        if not isinstance(module, nn.Embedding) and "lora_embedding_A" in pair:  # a LoRAEmbedding is one
            problems.append(f"{name!r} is a {type(module).__name__}, and its LoRA tensors are an embedding's")
            continue
        if not _targeted(config, name):
            problems.append(
                f"the weights hold LoRA tensors for {name!r}, which the config's target_modules "
                f"{config.get('target_modules')!r} does not name, so PEFT would not load them"
            )
            continue
        in_f, out_f = linear_shape(module)
        rank = _resolve(rank_pattern, r, name)
        if tuple(A.shape) != (rank, in_f) or tuple(B.shape) != (out_f, rank):
            problems.append(
                f"{name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, where this model's layer and the "
                f"config's rank {rank!r} need ({rank}, {in_f}) and ({out_f}, {rank})"
            )
            continue
        if dora and (magnitude is None or tuple(magnitude.shape) != (out_f,)):
            found = "none" if magnitude is None else f"one of shape {tuple(magnitude.shape)}"
            problems.append(
                f"{name!r}: the config says use_dora, so it needs a lora_magnitude_vector ({out_f},); found {found}"
            )
            continue
        if not dora and magnitude is not None:
            problems.append(f"{name!r} has a lora_magnitude_vector (DoRA's), but the config does not say use_dora")
            continue
        try:
            specs[name] = LoRASpec(rank=rank, alpha=_resolve(alpha_pattern, alpha, name), **shared)
        except InjectionError as e:
            problems.append(f"{name!r}: {e}")
    if problems:
        raise AdapterFileError(f"{directory} does not fit this model: " + "; ".join(dict.fromkeys(problems)))
    return specs


def _targeted(config: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT would put LoRA on module `name`, as far as target_modules and exclude_modules tell."""
    targets, exclude = config.get("target_modules"), config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, list) and any(name == e or name.endswith(f".{e}") for e in exclude):
        return False
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, name) is not None
    if isinstance(targets, list):
        return any(name == t or name.endswith(f".{t}") for t in targets)
    return True  # None: PEFT's defaults for the architecture, which the weights' keys reflect


def _resolve(pattern: Mapping[str, Any], default: Any, name: str) -> Any:
    """The value PEFT gives module `name` from a rank_pattern or alpha_pattern (the rule of
    current PEFT releases: the first key that matches a dot-separated suffix of the name, as a
    regex; else the default)."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return pattern[key]
    return default


def _resolve_old(ranks: Mapping[str, Any], alphas: Mapping[str, Any], r: Any, alpha: Any, name: str) -> tuple:
    """`(rank, alpha)` as PEFT 0.13 and earlier resolve them: the first key of either pattern that
    matches after a dot, else the name itself, looked up in both."""
    key = next((key for key in (*ranks, *alphas) if re.match(rf".*\.{key}$", name)), name)
    return ranks.get(key, r), alphas.get(key, alpha)


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """`name -> value` for every name whose value is not `default`, longest names first."""
    return {name: values[name] for name in sorted(values, key=len, reverse=True) if values[name] != default}


def _patterns_resolve(
    rank_pattern: Mapping[str, Any], alpha_pattern: Mapping[str, Any], r: Any, alpha: Any, ranks, alphas
) -> bool:
    """Whether every layer gets its own rank and alpha, under the current and the older rule."""
    try:
        return all(
            _resolve(rank_pattern, r, name) == ranks[name]
            and _resolve(alpha_pattern, alpha, name) == alphas[name]
            and _resolve_old(rank_pattern, alpha_pattern, r, alpha, name) == (ranks[name], alphas[name])
            for name in ranks
        )
    except re.error:  # a module name that is no valid regex
        return False


def _target_modules(root: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT's target_modules for exactly these modules: the list of names where no other module's
    name ends with `.<one of them>` (PEFT matches list entries as suffixes), else one regex."""
    wanted = set(names)
    others = [n for n in named_candidates(root) if n not in wanted]
    if not any(o.endswith(f".{n}") for o in others for n in names):
        return names
    return "|".join(re.escape(n) for n in names)


def _say_what_is_left_out(root: nn.Module, adapter: str) -> None:
    """`lora_only=True`: one warning line with the filters and trainable base tensors the folder leaves out."""
    filters = [f for _, f in named_filters(root, adapter)]
    trainable = list(trainable_base_parameters(root).values())
    if filters or trainable:
        n_filter = sum(p.numel() for f in filters for p in f.parameters())
        warnings.warn(
            f"export_peft(lora_only=True) left out {len(filters)} task-aware filter(s) ({n_filter:,} parameters) "
            f"and {len(trainable)} trainable base tensor(s) ({sum(p.numel() for p in trainable):,} parameters): "
            "PEFT computes the LoRA layers alone; loratrf.save_adapter keeps everything",
            stacklevel=3,
        )


def _refuse_filters(root: nn.Module, adapter: str) -> None:
    hosts = [host or "(the model itself)" for host, _ in named_filters(root, adapter)]
    if hosts:
        raise AdapterFileError(
            f"PEFT's LoRA format cannot hold the model's task-aware filters (on {', '.join(map(repr, hosts))}); "
            "export_peft(model, directory, lora_only=True) writes the LoRA layers alone (PEFT then computes "
            "without the filters and the trainable base parameters), and loratrf.save_adapter saves everything"
        )


def _modules_to_save(root: nn.Module) -> dict[str, nn.Module]:
    """PEFT's `modules_to_save` for the trainable base parameters: `full name -> module` for the
    modules that own them (one inside another listed is covered by it), each holding no adapter
    and picked out exactly by PEFT's rule (every module whose name ends with an entry)."""
    candidates, trainable = named_candidates(root), list(trainable_base_parameters(root))
    owners = sorted({name.rpartition(".")[0] for name in trainable})
    if "" in owners:
        raise AdapterFileError(
            "PEFT's modules_to_save holds submodules, not the model's own trainable parameters "
            f"{[n for n in trainable if '.' not in n]}; freeze them, or keep them with loratrf.save_adapter"
        )
    owners = [o for o in owners if not any(o.startswith(f"{other}.") for other in owners)]
    problems = []
    for owner in owners:
        modules = candidates[owner].named_modules(prefix=owner)
        inside = [n for n, m in modules if isinstance(m, (LoRALayer, TaskAwareFilter))]
        if inside:
            problems.append(f"trainable module {owner!r} holds the adapter module {inside[0]!r}")
        also = [n for n in candidates if n != owner and n.endswith(owner)]
        if also:
            problems.append(f"PEFT would also save {also} for the entry {owner!r} (it matches the ends of names)")
    if problems:
        raise AdapterFileError(
            "cannot write the trainable base parameters as PEFT's modules_to_save: " + "; ".join(problems)
        )
    return {owner: candidates[owner] for owner in owners}


def _most_common(values: Iterable[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


__all__ = ["export_peft", "import_peft"]
