"""loratrf: LoRA adapters and the task-aware filters of LoRATRF for any torch model.

import loratrf
config = loratrf.inject(model, targets=[r".*\\.value"], filters=[r"encoder\\.layer\\.\\d+"])
loratrf.inject(other_model, loratrf.presets.LORATRF_DEBERTA_V3, rank=4)
loratrf.inject(model, config, adapter="task2"); loratrf.set_adapter(model, "task2")
"""

from loratrf import presets
from loratrf.adapter_file import adapter_state_dict, load_adapter, save_adapter
from loratrf.adapters import combine_adapters, delete_adapter, set_adapter, use_adapters
from loratrf.config import InjectionConfig
from loratrf.errors import (
    AdapterError,
    AdapterFileError,
    FilterOutputError,
    InjectionError,
    LoRATRFError,
    MergeError,
)
from loratrf.filter import TaskAwareFilter
from loratrf.gates import GateStats, calibrate_filters, gate_statistics, record_gates
from loratrf.inject import inject
from loratrf.lora import LoRALinear
from loratrf.low_rank import LowRankTransform
from loratrf.merging import merge, reset_adapters, unload, unmerge
from loratrf.param_summary import Summary, summary
from loratrf.peft_format import export_peft, import_peft
from loratrf.quantized import dequantize
from loratrf.weight_cache import cache_effective_weights

__all__ = [
    "AdapterError",
    "AdapterFileError",
    "FilterOutputError",
    "GateStats",
    "InjectionConfig",
    "InjectionError",
    "LoRALinear",
    "LoRATRFError",
    "LowRankTransform",
    "MergeError",
    "Summary",
    "TaskAwareFilter",
    "adapter_state_dict",
    "cache_effective_weights",
    "calibrate_filters",
    "combine_adapters",
    "delete_adapter",
    "dequantize",
    "export_peft",
    "gate_statistics",
    "import_peft",
    "inject",
    "load_adapter",
    "merge",
    "presets",
    "record_gates",
    "reset_adapters",
    "save_adapter",
    "set_adapter",
    "summary",
    "unload",
    "unmerge",
    "use_adapters",
]
