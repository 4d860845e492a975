"""Adapter files written by an earlier loratrf keep loading and computing what they computed.

`fixtures/adapter_v2_{lora,dora}.safetensors` were written by `loratrf.save_adapter` (format
version 2, the layer as it stood before the named-adapter storage was shared with the embedding
layer): `nn.Sequential(Linear(4, 5), Tanh(), Linear(5, 3), Linear(3, 2))` with LoRA (or DoRA) of
rank 2 and alpha 3 on modules `0` and `2`, module `3` trainable, every tensor random. Outputs are
checked against the formulas written out here, from the file's own tensors.
"""

from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import loratrf

FIXTURES = Path(__file__).parent / "fixtures"
SCALE = 3.0 / 2  # alpha / rank


def base():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 2)).double()


def adapted_linear(x, linear, t, name, dora):
    """`x Wᵀ + b` with `W = W0 + s (U V)ᵀ` (LoRA) or `m ⊙ (W0 + s (U V)ᵀ) / ‖W0 + s (U V)ᵀ‖` (DoRA, row norms)."""
    W = linear.weight.double() + SCALE * (t[f"{name}.lora.U"].double() @ t[f"{name}.lora.V"].double()).T
    if dora:
        W = t[f"{name}.magnitude"].double()[:, None] * W / W.norm(dim=1, keepdim=True)
    return x @ W.T + linear.bias.double()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_version_2_adapter_file_loads_with_its_keys_and_outputs(kind):
    path = FIXTURES / f"adapter_v2_{kind}.safetensors"
    t = safetensors.torch.load_file(path)
    model = base()
    plain = base()
    plain.load_state_dict(model.state_dict())
    loratrf.load_adapter(model, path)
    assert set(loratrf.adapter_state_dict(model)) == set(t)
    assert set(t) <= set(model.state_dict())  # the default adapter keeps the keys `lora.U`, `lora.V`, `magnitude`
    x = torch.randn(7, 4, dtype=torch.float64)
    h = torch.tanh(adapted_linear(x, plain[0], t, "0", kind == "dora"))
    h = adapted_linear(h, plain[2], t, "2", kind == "dora")
    expected = h @ t["3.weight"].double().T + t["3.bias"].double()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)
    for key in ("0.lora.U", "2.lora.V", "3.weight"):  # the very values, loaded as saved
        torch.testing.assert_close(loratrf.adapter_state_dict(model)[key].double(), t[key].double(), rtol=0, atol=0)
