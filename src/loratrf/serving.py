"""What an inference server loads of a PEFT LoRA folder: `export_peft(..., for_serving="vllm")`
checks the folder it is about to write against it, and refuses with the reason and the way out.

vLLM (`vllm/lora/peft_helper.py`, `vllm/lora/utils.py`) reads `adapter_config.json`'s `r`,
`lora_alpha`, `use_rslora` and `target_modules`, and the tensors `<module>.lora_A.weight`,
`.lora_B.weight`, `.lora_embedding_A` and `.lora_embedding_B` under `base_model.model.`; it
refuses `use_dora`, any `modules_to_save`, a `bias` other than "none" (unless started with
LoRA biases enabled) and a rank above the `--max-lora-rank` it was started with, one of
`VLLM_MAX_LORA_RANKS`. Any other tensor is an "unsupported LoRA weight" to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from loratrf.errors import AdapterFileError

SERVERS = ("vllm",)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank takes
_VLLM_KEY = re.compile(r"base_model\.model\..+\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")


def check_server(server: object) -> None:
    if server is not None and server not in SERVERS:
        raise AdapterFileError(
            f"for_serving names the server the folder is checked for, one of {SERVERS}; got {server!r}"
        )


def check_servable(server: str, config: Mapping[str, Any], keys: Iterable[str], filter_hosts: list[str]) -> None:
    """Refuse a PEFT LoRA folder (its config and tensor keys) that `server` cannot load or would
    compute differently from the model it came from (`filter_hosts`: the filters left out)."""
    problems = vllm_problems(config, keys, filter_hosts)
    if problems:
        raise AdapterFileError("vLLM cannot serve this adapter as it stands:\n- " + "\n- ".join(problems))


def vllm_problems(config: Mapping[str, Any], keys: Iterable[str], filter_hosts: list[str]) -> list[str]:
    """Each thing vLLM refuses or leaves out, with its reason and the way out."""
    problems = []
    if filter_hosts:
        problems.append(
            f"task-aware filters (on {', '.join(map(repr, filter_hosts))}): vLLM computes PEFT's LoRA alone, "
            "so the served model would compute something else; serve the model with loratrf, or pass "
            "lora_only=True to serve its LoRA layers alone"
        )
    if config.get("use_dora"):
        problems.append(
            "use_dora: vLLM does not serve DoRA's magnitude vectors; serve the merged model "
            "(loratrf.unload(model) folds the adapter into the base weights), or train plain LoRA (dora=False)"
        )
    if config.get("modules_to_save"):
        problems.append(
            f"modules_to_save {config['modules_to_save']}: vLLM loads no modules_to_save (the trainable base "
            "modules); freeze them (no trainable=... at inject), serve the model with them saved into its base "
            "checkpoint, or pass lora_only=True to leave them out (the served model then lacks their training)"
        )
    if config.get("trainable_token_indices"):
        problems.append(
            "trainable_token_indices: vLLM does not load trained token rows; serve the merged model "
            "(loratrf.unload(model) writes the rows into the embedding)"
        )
    if config.get("bias", "none") != "none":
        problems.append(
            f"bias={config['bias']!r}: vLLM loads no trained base biases; keep the base biases frozen (bias='none')"
        )
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    too_big = sorted({r for r in ranks if r > VLLM_MAX_LORA_RANKS[-1]})
    if too_big:
        problems.append(
            f"rank {too_big}: above {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank vLLM takes "
            f"({', '.join(map(str, VLLM_MAX_LORA_RANKS))}); inject with a rank of at most {VLLM_MAX_LORA_RANKS[-1]}"
        )
    explained = [".lora_magnitude_vector"] * bool(config.get("use_dora"))
    explained += [".trainable_tokens_delta"] * bool(config.get("trainable_token_indices"))
    saved = tuple(f"base_model.model.{m}." for m in config.get("modules_to_save") or ())
    unknown = [k for k in keys if not (_VLLM_KEY.fullmatch(k) or k.endswith(tuple(explained)) or k.startswith(saved))]
    if unknown:
        problems.append(
            f"tensors vLLM does not read: {unknown[:5]}{' ...' if len(unknown) > 5 else ''} (it reads lora_A / "
            "lora_B weights and lora_embedding_A / lora_embedding_B only); leave out what writes them"
        )
    return problems
