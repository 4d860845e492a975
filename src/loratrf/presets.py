"""The paper's configurations, and plain LoRA baselines, for common Transformer families.

A preset is an `InjectionConfig`: read it, change it with `dataclasses.replace`, apply it
with `loratrf.inject(model, preset)` (options given beside it override the preset's:
`loratrf.inject(model, preset, rank=4)`). The paper names six matrices per layer:
`q, k, v` (attention projections), `o` (attention output) and `f1, f2` (the two FFN layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from loratrf.config import InjectionConfig
from loratrf.errors import InjectionError

MATRICES = ("q", "k", "v", "o", "f1", "f2")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """Where a family keeps its layers and the paper's matrices (regexes on module names)."""

    layer: str  # one Transformer layer; filters sit on its output
    matrices: Mapping[str, str]  # the paper's name -> module inside a layer


ARCHITECTURES: dict[str, Architecture] = {
    # BERT, RoBERTa, MiniLM, ELECTRA: BertLayer-style names.
    "bert": Architecture(
        r"(?:.*\.)?encoder\.layer\.\d+",
        {
            "q": r"attention\.self\.query",
            "k": r"attention\.self\.key",
            "v": r"attention\.self\.value",
            "o": r"attention\.output\.dense",
            "f1": r"intermediate\.dense",
            "f2": r"output\.dense",
        },
    ),
    # DeBERTa v2 and v3.
    "deberta": Architecture(
        r"(?:.*\.)?encoder\.layer\.\d+",
        {
            "q": r"attention\.self\.query_proj",
            "k": r"attention\.self\.key_proj",
            "v": r"attention\.self\.value_proj",
            "o": r"attention\.output\.dense",
            "f1": r"intermediate\.dense",
            "f2": r"output\.dense",
        },
    ),
    # LLaMA, Mistral, Qwen2: SwiGLU FFN `down(act(gate(x)) * up(x))`. W_f1 is `up_proj`, W_f2
    # `down_proj`, as in the LoRA/DoRA LLaMA baselines the paper compares with; `gate` is
    # offered separately (docs/models.md).
    "llama": Architecture(
        r"(?:.*\.)?layers\.\d+",
        {
            "q": r"self_attn\.q_proj",
            "k": r"self_attn\.k_proj",
            "v": r"self_attn\.v_proj",
            "o": r"self_attn\.o_proj",
            "gate": r"mlp\.gate_proj",
            "f1": r"mlp\.up_proj",
            "f2": r"mlp\.down_proj",
        },
    ),
    # GPT-2: q, k and v share one fused Conv1D, `c_attn`.
    "gpt2": Architecture(
        r"(?:.*\.)?h\.\d+",
        {
            "q": r"attn\.c_attn",
            "k": r"attn\.c_attn",
            "v": r"attn\.c_attn",
            "o": r"attn\.c_proj",
            "f1": r"mlp\.c_fc",
            "f2": r"mlp\.c_proj",
        },
    ),
    # T5: self- and cross-attention both count as attention; `wi` (or v1.1's `wi_0`, `wi_1`) is W_f1.
    "t5": Architecture(
        r"(?:.*\.)?(?:encoder|decoder)\.block\.\d+",
        {
            "q": r"layer\.\d+\.(?:SelfAttention|EncDecAttention)\.q",
            "k": r"layer\.\d+\.(?:SelfAttention|EncDecAttention)\.k",
            "v": r"layer\.\d+\.(?:SelfAttention|EncDecAttention)\.v",
            "o": r"layer\.\d+\.(?:SelfAttention|EncDecAttention)\.o",
            "f1": r"layer\.\d+\.DenseReluDense\.wi(?:_0|_1)?",
            "f2": r"layer\.\d+\.DenseReluDense\.wo",
        },
    ),
}


def preset(
    architecture: str,
    matrices: Sequence[str] = MATRICES,
    *,
    filters: bool = False,
    rank: int = 8,
    alpha: float = 16.0,
    **options,
) -> InjectionConfig:
    """LoRA on `matrices` of every layer of `architecture`, plus a filter on each layer's
    output when `filters`; other `options` are `InjectionConfig`'s (e.g. `trainable`)."""
    if architecture not in ARCHITECTURES:
        raise InjectionError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[architecture]
    unknown = [m for m in matrices if m not in arch.matrices]
    if unknown:
        raise InjectionError(f"{architecture} has no matrices {unknown}; it has {sorted(arch.matrices)}")
    for module in {arch.matrices[m] for m in matrices}:
        fused = [m for m, pattern in arch.matrices.items() if pattern == module]
        if not set(fused) <= set(matrices):
            name = module.replace("\\", "")
            raise InjectionError(
                f"{architecture} computes {', '.join(fused)} with one module ({name}), so an adapter there "
                f"updates all of them; choose all of {fused} or none"
            )
    modules = "|".join(dict.fromkeys(arch.matrices[m] for m in matrices))
    targets = (rf"{arch.layer}\.(?:{modules})",) if matrices else ()
    filters = (arch.layer,) if filters else ()
    return InjectionConfig.from_dict(dict(targets=targets, filters=filters, rank=rank, alpha=alpha, **options))


# The paper's DeBERTa-v3 setup (Table 1): LoRA r=8 on W_v, W_f1, W_f2, a filter on each layer.
LORATRF_DEBERTA_V3 = preset("deberta", ("v", "f1", "f2"), filters=True, rank=8, alpha=16.0)
# Its LoRA baseline: r=8 on all six matrices (1.33M parameters on DeBERTa-v3-base).
LORA_DEBERTA_V3 = preset("deberta", MATRICES, rank=8, alpha=16.0)
# The paper's LLaMA setup (Table 2): LoRA r=32 on W_o, W_f1, W_f2, a filter on each layer;
# alpha 64 as in the LLaMA LoRA baselines it compares with.
LORATRF_LLAMA = preset("llama", ("o", "f1", "f2"), filters=True, rank=32, alpha=64.0)
LORA_LLAMA = preset("llama", MATRICES, rank=32, alpha=64.0)
# Its DoRA baseline (Table 2's strongest LLaMA-7B row): LORA_LLAMA's layers as DoRA layers.
DORA_LLAMA = preset("llama", MATRICES, rank=32, alpha=64.0, dora=True)
