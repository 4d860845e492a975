"""bfloat16 / float16 base weights with float32 (or bf16) adapters, under torch.autocast: the
bounds stated in docs/mixed_precision.md."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import loratrf
from loratrf import LoRALinear
from models import FILTERS, TARGETS, Net, randomise_adapters
from reference import lora_magnitude

# unit roundoff u = 2^-(significand bits): half the gap between 1 and the next number
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def subnormal_gap(dtype):
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


@given(
    st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    st.integers(0, 10_000),
    st.sampled_from([1e-3, 1e-1, 1.0, 10.0]),
)
def test_a_hundred_merge_unmerge_cycles_do_not_drift_after_the_first(dtype, seed, delta_scale):
    """Merging rounds `W0 + ΔW` (formed in float32) once to the weight's dtype, so the first
    merge/unmerge round trip may move `W0` by a rounding error; the claim is that later cycles
    move nothing: every unmerged weight equals the first cycle's, bit for bit, and every merged
    weight equals the second cycle's (which is within one unit in the last place of the first)."""
    torch.manual_seed(seed)
    base = nn.Linear(24, 40, dtype=dtype)
    layer = LoRALinear.from_linear(base, rank=4, alpha=8.0)
    with torch.no_grad():
        layer.lora.V.normal_(0.0, delta_scale)
    w0 = layer.weight.detach().clone()
    merged, unmerged = [], []
    for _ in range(100):
        layer.merge()
        merged.append(layer.weight.detach().clone())
        layer.unmerge()
        unmerged.append(layer.weight.detach().clone())

    u, gap = UNIT[dtype], subnormal_gap(dtype)
    m1, u1 = merged[0].double(), unmerged[0].double()
    first_trip = (u + 2.0**-24) * (1 + 2 * u) * (w0.double().abs() + m1.abs()) + gap  # docs/mixed_precision.md
    assert ((u1 - w0.double()).abs() <= first_trip).all()
    assert all(torch.equal(w, unmerged[0]) for w in unmerged)
    assert all(torch.equal(w, merged[1]) for w in merged[1:])
    assert ((merged[1].double() - m1).abs() <= 2 * u * m1.abs() + gap).all()


def test_first_cycle_loss_is_real_for_bfloat16_and_bounded():
    """The bound above is not vacuous: a bf16 round trip does move some weights."""
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 64, dtype=torch.bfloat16), rank=8)
    with torch.no_grad():
        layer.lora.V.normal_()
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    moved = layer.weight != w0
    assert 0.1 < moved.float().mean() < 1.0


@given(st.integers(1, 24), st.integers(1, 24), st.integers(1, 6), st.floats(0.5, 64.0), st.booleans())
def test_float16_layer_merge_equivalence_within_rounding_bound(in_f, out_f, rank, alpha, bias):
    """docs/method.md's per-layer bound with float16's unit roundoff: elementwise
    |y_merged - y_unmerged| <= 4u (|x| |W0|ᵀ + scale (|x| |A|ᵀ) |B|ᵀ + |b|), u = 2^-11."""
    layer = LoRALinear.from_linear(nn.Linear(in_f, out_f, bias=bias, dtype=torch.float16), rank=rank, alpha=alpha)
    with torch.no_grad():
        layer.lora.V.normal_()
    x = torch.randn(4, in_f).to(torch.float16)
    before = layer(x).double()
    magnitude = lora_magnitude(layer, x)
    layer.merge()
    assert ((layer(x).double() - before).abs() <= 4 * UNIT[torch.float16] * magnitude).all()


# (base weights, adapter dtype, autocast dtype or None)
SETTINGS = {
    "bf16 base, fp32 adapters, autocast bf16": (torch.bfloat16, None, torch.bfloat16),
    "fp16 base, fp32 adapters, autocast fp16": (torch.float16, None, torch.float16),
    "all bf16, autocast bf16": (torch.bfloat16, "bfloat16", torch.bfloat16),
    "fp32 base and adapters, autocast bf16": (torch.float32, None, torch.bfloat16),
    "bf16 base, fp32 adapters, no autocast": (torch.bfloat16, None, None),
}
ids = torch.randint(0, 20, (8, 12), generator=torch.Generator().manual_seed(1))


def low_precision_model(seed, weights, adapter_dtype):
    """Net(d=32) in `weights`, injected, with adapters of trained-like size."""
    torch.manual_seed(seed)
    model = Net(d=32).to(weights)
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, adapter_dtype=adapter_dtype, trainable=["head"])
    randomise_adapters(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for name, p in loratrf.adapter_state_dict(model).items():
            if name.endswith(".V"):
                p.mul_(0.1)
    return model


def autocast(dtype):
    return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@pytest.mark.parametrize("setting", SETTINGS)
@settings(max_examples=6)  # x 5 settings; each example runs the model three times
@given(seed=st.integers(0, 10_000))
def test_merged_and_unmerged_models_agree_within_the_stated_bound(setting, seed):
    """Model level (docs/mixed_precision.md): |y_merged - y_unmerged| <= 8u max|y| and each is
    within 8u max|y| of the same model computed in float64, u the unit roundoff of the
    low-precision dtype (bf16 2^-8, fp16 2^-11)."""
    weights, adapter_dtype, amp = SETTINGS[setting]
    model = low_precision_model(seed, weights, adapter_dtype).eval()
    reference = copy.deepcopy(model).double()  # the same rounded base weights, computed in float64
    with torch.no_grad():
        exact = reference(ids)
        with autocast(amp):
            unmerged = model(ids).double()
            loratrf.merge(model, safe=True)
            merged = model(ids).double()
    bound = 8 * UNIT[amp or weights] * exact.abs().max()
    assert (merged - unmerged).abs().max() <= bound
    assert (unmerged - exact).abs().max() <= bound and (merged - exact).abs().max() <= bound
    assert not torch.equal(merged, unmerged)  # the bound is exercised, not vacuous


@pytest.mark.parametrize("setting", SETTINGS)
def test_training_runs_and_leaves_the_base_untouched(setting):
    weights, adapter_dtype, amp = SETTINGS[setting]
    model = low_precision_model(0, weights, adapter_dtype)
    if amp == torch.float16:
        model.head.float()  # a trainable base module: GradScaler unscales float32 gradients only
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = model.layers[0].value.lora.U
    assert adapter.dtype == (torch.bfloat16 if adapter_dtype else torch.float32)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", enabled=amp == torch.float16)  # fp16 gradients can underflow
    labels = torch.arange(len(ids)) % 3
    losses = []
    for _ in range(10):
        with autocast(amp):
            loss = F.cross_entropy(model(ids).float(), labels)
        scaler.scale(loss).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        scaler.step(optimiser)
        scaler.update()
        optimiser.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert adapter.dtype == (torch.bfloat16 if adapter_dtype else torch.float32)
