"""Independent reference formulas, written out from the paper, in float64."""

import math

import torch
import torch.nn.functional as F
from einops import einsum


def lora_reference(x, weight, bias, A, B, scale):
    """LoRA (Hu et al., eq. 2): h = W0 x + (alpha/r) B A x, with W0 [out, in], A [r, in], B [out, r]."""
    x, weight, A, B = (t.double() for t in (x, weight, A, B))
    y = einsum(x, weight, "... i, o i -> ... o") + scale * einsum(x, A, B, "... i, r i, o r -> ... o")
    return y if bias is None else y + bias.double()


def filter_reference(h, t, U, V, scale, similarity="cosine"):
    """The paper's eqs. (4)-(5) plus the residual: h~ = sim(h, t) h, h^ = h~ T, out = h + h^.

    sim is the cosine (or dot) similarity clamped to [0, 1]; T = scale U V.
    """
    h, t, U, V = (x.double() for x in (h, t, U, V))
    if similarity == "cosine":
        sim = F.cosine_similarity(h, t.expand_as(h), dim=-1, eps=1e-8)
    else:
        sim = einsum(h, t, "... d, d -> ...")
    h_tilde = einsum(sim.clamp(0, 1), h, "..., ... d -> ... d")
    T = scale * einsum(U, V, "d r, r e -> d e")
    return h + einsum(h_tilde, T, "... d, d e -> ... e")


def lora_magnitude(layer, x):
    """`|x| |W0|ᵀ + scale (|x| |A|ᵀ) |B|ᵀ + |b|` in float64: the size of the sums a LoRA layer's
    output adds up, which rounding bounds are relative to (elementwise, `[..., out]`)."""
    ax, lora = x.double().abs(), layer.lora
    magnitude = ax @ layer.weight.double().abs().T + lora.scale * (ax @ lora.U.double().abs()) @ lora.V.double().abs()
    return magnitude if layer.bias is None else magnitude + layer.bias.double().abs()


def peft_twins(ours, theirs):
    """Pair each loratrf `LoRALinear` of `ours` with PEFT's layer of the same name in `theirs`.

    Checks PEFT's scaling against loratrf's and PEFT's initialisation (A uniform within
    ±1/sqrt(d_in), B = 0). Then gives V random values, so the adapters act, and copies loratrf's
    U and V into PEFT's A = Uᵀ [r, d_in] and B = Vᵀ [d_out, r]. Returns the layer names and
    `[(loratrf parameter, PEFT parameter)]`: V with B, U with A."""
    import loratrf

    names, pairs = [], []
    for name, layer in ours.named_modules():
        if not isinstance(layer, loratrf.LoRALinear):
            continue
        host = theirs.get_submodule(name)
        a, b = host.lora_A["default"].weight, host.lora_B["default"].weight
        assert host.scaling["default"] == layer.lora.scale
        assert a.abs().max() <= 1 / math.sqrt(layer.lora.d_in) and torch.count_nonzero(b) == 0
        with torch.no_grad():
            layer.lora.V.normal_()
            a.copy_(layer.lora.U.T)
            b.copy_(layer.lora.V.T)
        names.append(name)
        pairs += [(layer.lora.V, b), (layer.lora.U, a)]
    return names, pairs
