"""DoRA (`dora=True`): the formula, PEFT's DoRA on the same tensors, merge/unmerge, files,
summary, unload, GPT-2's Conv1D, half precision and filters on DoRA layers."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from models import FILTERS, TARGETS, Net
from reference import filter_reference, lora_magnitude
from torch import nn

import loratrf
from loratrf import InjectionError, LoRALinear, MergeError
from loratrf.walk import named_filters, named_lora_layers

NOT_IN_CI = not os.environ.get("CI")
peft = pytest.importorskip("peft") if NOT_IN_CI else __import__("peft")
transformers = pytest.importorskip("transformers") if NOT_IN_CI else __import__("transformers")


def dora_reference(x, W0, b, A, B, m, scale, detach_norm=True):
    """DoRA (Liu et al. 2024, eq. 5): `y = x Wᵀ + b`, `W = m ⊙ V / ‖V‖` with `V = W0 + scale · B A`
    and the norm per output row (`W0 [out, in]`, `A [r, in]`, `B [out, r]`, `m [out]`); the
    norm is a constant in backward (section 4.3) unless `detach_norm=False`."""
    V = W0 + scale * (B @ A)
    norm = V.norm(dim=1, keepdim=True)
    if detach_norm:
        norm = norm.detach()
    W = m.unsqueeze(1) * V / norm
    y = x @ W.T
    return y if b is None else y + b


def factors(layer):
    """`(W0 [out, in], b, A [r, in], B [out, r], m [out])` of a LoRALinear, as the paper writes them."""
    W0 = layer.weight.T if layer.fan_in_fan_out else layer.weight
    return W0, layer.bias, layer.lora.U.T, layer.lora.V.T, layer.magnitude


@torch.no_grad()
def train_a_little(layer, generator=None):
    """Give `B` and `m` values as after training (`A` is random already)."""
    layer.lora.V.copy_(torch.randn(layer.lora.V.shape, generator=generator, dtype=layer.lora.V.dtype) * 0.3)
    layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=generator, dtype=layer.magnitude.dtype))


shapes = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.sampled_from([1.0, 4.0, 16.0]))


# --- the formula -----------------------------------------------------------------------------


@given(shapes, st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_forward_and_gradients_match_the_written_out_formula(shape, bias, fan_in_fan_out, rslora, seed):
    in_f, out_f, rank, alpha = shape
    g = torch.Generator().manual_seed(seed)
    layer = LoRALinear(
        in_f,
        out_f,
        rank,
        alpha,
        bias=bias,
        fan_in_fan_out=fan_in_fan_out,
        rslora=rslora,
        dora=True,
        dtype=torch.float64,
    )
    train_a_little(layer, g)
    x = torch.randn(2, 3, in_f, generator=g, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    W0, b, A, B, m = (
        t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in factors(layer)
    )
    xr = x.detach().clone().requires_grad_(True)
    expected = dora_reference(xr, W0, b, A, B, m, layer.lora.scale)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.lora.U.grad.T, A.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.lora.V.grad.T, B.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.magnitude.grad, m.grad, rtol=1e-10, atol=1e-12)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


def test_the_norm_is_a_constant_in_backward():
    layer = LoRALinear(6, 5, 2, dora=True, dtype=torch.float64)
    train_a_little(layer)
    x = torch.randn(4, 6, dtype=torch.float64)
    layer(x).sum().backward()
    W0, b, A, B, m = (t.detach().clone().requires_grad_(True) for t in factors(layer))
    dora_reference(x, W0, b, A, B, m, layer.lora.scale, detach_norm=False).sum().backward()
    # through the norm, B's gradient would differ (by the projection DoRA's section 4.3 drops)
    assert (layer.lora.V.grad.T - B.grad).abs().max() > 1e-3


@given(shapes, st.booleans(), st.booleans(), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_a_fresh_layer_is_exactly_its_base(shape, bias, with_dropout, dtype):
    in_f, out_f, rank, alpha = shape
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    layer = LoRALinear.from_linear(copy.deepcopy(base), rank, alpha, dora=True, dropout=0.3 if with_dropout else 0.0)
    row_norms = torch.linalg.vector_norm(base.weight.double(), dim=1)
    eps = torch.finfo(layer.magnitude.dtype).eps
    torch.testing.assert_close(layer.magnitude.double(), row_norms, rtol=4 * eps, atol=0)
    assert torch.equal(layer.dora_factor(), torch.ones(out_f, dtype=layer.dora_factor().dtype))
    x = torch.randn(3, in_f, dtype=dtype)
    assert torch.equal(layer(x), base(x))  # train mode, dropout drawn included
    layer.eval()
    assert torch.equal(layer(x), base(x))


def test_a_zero_row_of_the_weight_gives_zero_not_nan():
    base = nn.Linear(4, 3, dtype=torch.float64)
    with torch.no_grad():
        base.weight[1] = 0
    layer = LoRALinear.from_linear(copy.deepcopy(base), 2, dora=True)
    x = torch.randn(5, 4, dtype=torch.float64)
    assert torch.equal(layer(x), base(x))
    assert layer.magnitude[1] == 0 and torch.isfinite(layer.dora_factor()).all()


def test_dropout_follows_pefts_formula_with_the_mask_drawn():
    """With dropout, `y = x W0ᵀ + b + (f - 1) ⊙ (x_d W0ᵀ) + f ⊙ scale · B A x_d` with
    `x_d = dropout(x)`: the mask is redrawn from the same seed and the formula written out."""
    layer = LoRALinear(6, 5, 2, dropout=0.4, dora=True, dtype=torch.float64)
    train_a_little(layer)
    x = torch.randn(7, 6, dtype=torch.float64)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    xd = F.dropout(x, 0.4, training=True)
    assert not torch.equal(xd, x)
    W0, b, A, B, m = (t.detach() for t in factors(layer))
    V = W0 + layer.lora.scale * B @ A
    f = m / V.norm(dim=1)
    expected = x @ W0.T + b + (f - 1) * (xd @ W0.T) + f * (layer.lora.scale * xd @ A.T @ B.T)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    layer.eval()  # no dropout: the plain formula
    torch.testing.assert_close(layer(x), dora_reference(x, W0, b, A, B, m, layer.lora.scale), rtol=1e-12, atol=1e-12)


# --- PEFT's DoRA on the same tensors ---------------------------------------------------------------


def peft_dora_pair(base, rank, alpha, dropout=0.0, rslora=False):
    """PEFT's DoRA layer and loratrf's over copies of `base`, holding the same A, B and m."""
    holder = nn.Module()
    holder.layer = copy.deepcopy(base)
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=["layer"],
        use_dora=True,
        use_rslora=rslora,
        fan_in_fan_out=isinstance(base, transformers.pytorch_utils.Conv1D),
    )
    peft.inject_adapter_in_model(config, holder)
    theirs = holder.layer
    ours = LoRALinear.from_linear(copy.deepcopy(base), rank, alpha, dropout=dropout, rslora=rslora, dora=True)
    train_a_little(ours)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora.U.T)
        theirs.lora_B["default"].weight.copy_(ours.lora.V.T)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    return ours, theirs


def peft_grads(theirs):
    return (
        theirs.lora_A["default"].weight.grad,
        theirs.lora_B["default"].weight.grad,
        theirs.lora_magnitude_vector["default"].weight.grad,
    )


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")
@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "Conv1D"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_gradients_and_merges_equal_pefts_dora(conv1d, dropout, rslora):
    torch.manual_seed(0)
    base = transformers.pytorch_utils.Conv1D(5, 7) if conv1d else nn.Linear(7, 5)
    base = base.double()
    with torch.no_grad():
        base.bias.normal_()
    ours, theirs = peft_dora_pair(base, 3, 8.0, dropout, rslora)
    assert ours.lora.scale == theirs.scaling["default"]
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    ours.train(), theirs.train()
    xo, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout mask for both
    yo = ours(xo)
    torch.manual_seed(7)
    yt = theirs(xt)
    torch.testing.assert_close(yo, yt, rtol=1e-12, atol=1e-12)
    grad = torch.randn(yo.shape, dtype=torch.float64)
    yo.backward(grad)
    yt.backward(grad)
    dA, dB, dm = peft_grads(theirs)
    torch.testing.assert_close(xo.grad, xt.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.lora.U.grad.T, dA, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.lora.V.grad.T, dB, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours.magnitude.grad, dm, rtol=1e-10, atol=1e-12)
    ours.eval(), theirs.eval()
    ours.merge()
    theirs.merge()
    torch.testing.assert_close(ours.weight, theirs.base_layer.weight, rtol=1e-12, atol=1e-12)
    ours.unmerge()
    theirs.unmerge()
    torch.testing.assert_close(ours.weight, base.weight, rtol=0, atol=1e-12)
    torch.testing.assert_close(theirs.base_layer.weight, base.weight, rtol=0, atol=1e-12)


def test_peft_starts_from_the_same_magnitude():
    base = nn.Linear(7, 5, dtype=torch.float64)
    holder = nn.Module()
    holder.layer = copy.deepcopy(base)
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["layer"], use_dora=True), holder)
    ours = LoRALinear.from_linear(copy.deepcopy(base), 2, dora=True)
    torch.testing.assert_close(ours.magnitude, holder.layer.lora_magnitude_vector["default"].weight, rtol=1e-15, atol=0)


# --- merge and unmerge ----------------------------------------------------------------------------


@given(shapes, st.booleans(), st.booleans(), st.integers(0, 2**31 - 1))
def test_merge_computes_the_same_map_and_unmerge_restores_w0_float64(shape, bias, fan_in_fan_out, seed):
    in_f, out_f, rank, alpha = shape
    g = torch.Generator().manual_seed(seed)
    layer = LoRALinear(
        in_f, out_f, rank, alpha, bias=bias, fan_in_fan_out=fan_in_fan_out, dora=True, dtype=torch.float64
    )
    train_a_little(layer, g)
    W0 = layer.weight.detach().clone()
    x = torch.randn(4, in_f, generator=g, dtype=torch.float64)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-12, atol=1e-12)
    W0_, _, A, B, m = (t.detach() if t is not None else None for t in factors(layer))
    V = (W0.T if fan_in_fan_out else W0) + layer.lora.scale * B @ A
    W = m.unsqueeze(1) * V / V.norm(dim=1, keepdim=True)
    torch.testing.assert_close(W0_, W, rtol=1e-12, atol=1e-12)  # the weight now holds DoRA's W
    layer.merge()  # a second merge does nothing
    layer.unmerge()
    assert not layer.merged and (layer.weight - W0).abs().max() <= 1e-10
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-12, atol=1e-12)


def test_unmerge_restores_a_zero_row_and_a_zero_magnitude_on_a_live_row_is_refused():
    layer = LoRALinear(4, 3, 2, dora=True, dtype=torch.float64)
    with torch.no_grad():
        layer.weight[2] = 0
        layer.reset_magnitude()  # m = 0 on the zero row
    W0 = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, W0)
    train_a_little(layer)  # B gives row 2 a direction; its m stays 0
    with torch.no_grad():
        layer.magnitude[0] = 0.0  # and a live row whose direction merge would wipe out
    W0 = layer.weight.detach().clone()
    with pytest.raises(MergeError, match=r"magnitude is 0 on a non-zero row \(output features \[0, 2\]\)"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, W0)
    model = nn.Sequential(layer)
    with pytest.raises(MergeError, match="magnitude is 0"):
        loratrf.merge(model)
    assert torch.equal(layer.weight, W0)


def test_safe_merge_refuses_a_non_finite_magnitude_and_leaves_the_weight():
    layer = LoRALinear(4, 3, 2, dora=True)
    with torch.no_grad():
        layer.magnitude[1] = float("inf")
    W0 = layer.weight.detach().clone()
    with pytest.raises(MergeError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.weight, W0) and not layer.merged


def test_backward_through_a_merged_dora_layer_is_refused():
    layer = LoRALinear(4, 3, 2, dora=True)
    layer.merge()
    with pytest.raises(MergeError, match="backward through a merged LoRA layer"):
        layer(torch.randn(2, 4)).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_take_a_float32_norm_and_keep_their_dtype(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(32, 16, 4, dora=True, dtype=dtype)
    assert layer.lora.U.dtype == layer.magnitude.dtype == layer.dora_weight_norm().dtype == torch.float32
    train_a_little(layer)
    x = torch.randn(8, 32, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    W0, b, A, B, m = (t.detach().double() for t in factors(layer))
    expected = dora_reference(x.double(), W0, b, A, B, m, layer.lora.scale)
    # rounding bound: a few half-precision ulps of the sums the layer adds up, times |f|
    eps = torch.finfo(dtype).eps
    f = layer.dora_factor().detach().double()
    size = lora_magnitude(layer, x) * f.abs().clamp_min(1) + b.abs()
    assert ((y.double() - expected).abs() <= 8 * eps * size).all()
    y.float().sum().backward()
    assert layer.magnitude.grad.dtype == torch.float32 and torch.isfinite(layer.magnitude.grad).all()
    delta = layer.delta_weight(torch.float64)
    layer.merge()
    assert layer.weight.dtype == dtype
    layer.unmerge()
    assert ((layer.weight.double() - W0).abs() <= 4 * eps * (W0.abs() + delta.abs())).all()


def test_autocast_bfloat16_runs_forward_and_backward():
    layer = LoRALinear(16, 8, 2, dora=True)
    train_a_little(layer)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.magnitude.grad is not None and layer.lora.V.grad is not None


# --- inject, options, files, summary, unload, presets ---------------------------------------------


def dora_net(filters=False, seed=0):
    torch.manual_seed(seed)
    model = Net().double()
    loratrf.inject(model, targets=TARGETS, filters=FILTERS if filters else [], rank=2, dora=True)
    return model


def train_model_a_little(model):
    g = torch.Generator().manual_seed(1)
    for _, layer in named_lora_layers(model):
        train_a_little(layer, g)
    for _, f in named_filters(model):
        with torch.no_grad():
            f.transform.V.copy_(torch.randn(f.transform.V.shape, generator=g, dtype=f.transform.V.dtype))


def test_inject_with_dora_is_the_identity_and_trains_only_adapters():
    torch.manual_seed(0)
    base = Net().double()
    model = copy.deepcopy(base)
    config = loratrf.inject(model, targets=TARGETS, rank=2, dora=True)
    assert config.dora and config.lora_spec().dora
    ids = torch.randint(0, 20, (3, 5))
    assert torch.equal(model(ids), base(ids))
    layers = dict(named_lora_layers(model))
    assert len(layers) == 6 and all(layer.dora and layer.spec.dora for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{k}" for n in layers for k in ("magnitude", "lora.U", "lora.V")}
    assert "layers.0.value.magnitude" in model.state_dict()
    assert model.get_parameter("layers.0.up.magnitude").shape == (16,)


def test_bad_dora_options_are_refused():
    with pytest.raises(InjectionError, match="dora must be True or False, got 'yes'"):
        loratrf.inject(Net(), targets=TARGETS, dora="yes")
    with pytest.raises(InjectionError, match="dora must be True or False, got 1"):
        LoRALinear(4, 4, dora=1)


def test_dora_with_filters_computes_the_dora_layers_then_the_filter():
    """DoRA layers inside a model whose layer outputs are filtered: one block written out with
    the reference formulas (DoRA for value/up/down, the paper's filter on the block's output)."""
    model = dora_net(filters=True)
    train_model_a_little(model)
    block = model.layers[0]
    x = torch.randn(2, 5, 8, dtype=torch.float64)

    def dora(layer, h):
        return dora_reference(h, *factors(layer), layer.lora.scale)

    q, k, v = block.query(x), block.key(x), dora(block.value, x)
    h = block.norm(x + torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
    h = h + dora(block.down, torch.relu(dora(block.up, h)))
    f = block.task_filter
    expected = filter_reference(h, f.task_vector, f.transform.U, f.transform.V, f.transform.scale)
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    # merging folds the DoRA layers; the filters stay and the model computes the same
    ids = torch.randint(0, 20, (3, 5))
    before = model(ids)
    loratrf.merge(model)
    torch.testing.assert_close(model(ids), before, rtol=1e-12, atol=1e-12)


@given(st.booleans(), st.integers(0, 1000))
def test_save_and_load_round_trip(filters, seed):
    import tempfile

    model = dora_net(filters, seed)
    train_model_a_little(model)
    ids = torch.randint(0, 20, (2, 4))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "a.safetensors")
        loratrf.save_adapter(model, path)
        from adapter_edits import raw

        metadata, tensors = raw(path)
        assert tensors["layers.1.down.magnitude"].shape == (8,)
        assert '"dora": true' in metadata["plan"]
        torch.manual_seed(seed)
        fresh = Net().double()
        loratrf.load_adapter(fresh, path)
    assert torch.equal(fresh(ids), model(ids))
    assert all(layer.dora for _, layer in named_lora_layers(fresh))


def test_a_file_missing_the_magnitude_is_refused(tmp_path):
    from adapter_edits import rewrite

    model = dora_net()
    path = tmp_path / "a.safetensors"
    loratrf.save_adapter(model, path)
    rewrite(path, lambda metadata, tensors: tensors.pop("layers.0.value.magnitude"))
    with pytest.raises(loratrf.AdapterFileError, match=r"missing: \['layers.0.value.magnitude'\]"):
        loratrf.load_adapter(Net().double(), path)


def test_a_dora_file_into_a_model_holding_plain_lora_is_refused(tmp_path):
    model = dora_net()
    path = tmp_path / "a.safetensors"
    loratrf.save_adapter(model, path)
    other = Net().double()
    loratrf.inject(other, targets=TARGETS, rank=2)
    with pytest.raises(loratrf.AdapterFileError, match="already holds a different LoRA adapter"):
        loratrf.load_adapter(other, path)


def test_summary_counts_the_magnitudes_as_lora_and_on_their_own_line():
    model = Net()
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, rank=2, dora=True)
    counts = loratrf.summary(model)
    d, ffn, layers = 8, 16, 2
    lora = layers * 2 * ((d + d) + (d + ffn) + (ffn + d))
    magnitudes = layers * (d + ffn + d)
    assert counts.dora == magnitudes and counts.lora == lora + magnitudes
    assert counts.trainable == counts.lora + counts.filter
    assert "DoRA magnitude" in str(counts) and f"{lora + magnitudes:,}" in str(counts)
    plain = Net()
    loratrf.inject(plain, targets=TARGETS, rank=2)
    assert loratrf.summary(plain).dora == 0 and "DoRA" not in str(loratrf.summary(plain))


def test_summary_counts_pefts_adapters_as_lora():
    model = nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 2))
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["0"], use_dora=True), model)
    counts = loratrf.summary(model)
    assert counts.lora == 2 * 10 + 6 * 2 + 6 and counts.base_total == 10 * 6 + 6 + 6 * 2 + 2


@pytest.mark.parametrize("merge", [True, False])
def test_unload_gives_plain_layers_computing_the_dora_model_or_the_base(merge):
    torch.manual_seed(0)
    base = Net().double()
    model = copy.deepcopy(base)
    loratrf.inject(model, targets=TARGETS, rank=2, dora=True)
    train_model_a_little(model)
    ids = torch.randint(0, 20, (3, 5))
    trained = model(ids)
    loratrf.unload(model, merge=merge)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    if merge:
        torch.testing.assert_close(model(ids), trained, rtol=1e-12, atol=1e-12)
    else:
        for (name, p), q in zip(model.named_parameters(), base.parameters()):
            assert (p - q).abs().max() <= 1e-10, name


def test_reset_adapters_returns_a_dora_model_to_its_base():
    torch.manual_seed(0)
    base = Net().double()
    model = copy.deepcopy(base)
    loratrf.inject(model, targets=TARGETS, rank=2, dora=True)
    train_model_a_little(model)
    loratrf.merge(model)
    loratrf.reset_adapters(model)
    ids = torch.randint(0, 20, (3, 5))
    torch.testing.assert_close(model(ids), base(ids), rtol=1e-12, atol=1e-12)


def test_meta_device_injection_then_materialised_and_reset():
    with torch.device("meta"):
        model = Net()
    loratrf.inject(model, targets=TARGETS, rank=2, dora=True)
    layer = model.layers[0].value
    assert layer.magnitude.is_meta and layer.magnitude.shape == (8,)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    real = Net()
    model.load_state_dict(real.state_dict())  # the base checkpoint: adapters are kept as they are
    loratrf.reset_adapters(model)  # m from the loaded W0
    ids = torch.randint(0, 20, (2, 3))
    torch.testing.assert_close(model(ids), real(ids), rtol=1e-6, atol=1e-6)


def test_dora_presets():
    config = loratrf.presets.DORA_LLAMA
    assert config.dora and config.rank == 32 and config.alpha == 64.0
    assert config.targets == loratrf.presets.LORA_LLAMA.targets
    trf = loratrf.presets.preset("llama", ("o", "f1", "f2"), filters=True, rank=32, alpha=64.0, dora=True)
    assert trf.dora and trf.filters == loratrf.presets.LORATRF_LLAMA.filters


# --- GPT-2's Conv1D ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:fan_in_fan_out")
def test_gpt2_conv1d_layers_take_dora_and_agree_with_peft():
    from hf_architectures import gpt2

    torch.manual_seed(0)
    base = gpt2().double().eval()
    ids = torch.randint(0, 50, (2, 6))
    expected = base(ids).logits
    ours = copy.deepcopy(base)
    loratrf.inject(ours, loratrf.presets.preset("gpt2", rank=4, dora=True))
    assert torch.equal(ours(ids).logits, expected)
    layers = dict(named_lora_layers(ours))
    attn = layers["transformer.h.0.attn.c_attn"]
    assert attn.fan_in_fan_out and attn.magnitude.shape == (attn.out_features,) == (3 * base.config.n_embd,)
    torch.testing.assert_close(attn.magnitude, base.transformer.h[0].attn.c_attn.weight.norm(dim=0), rtol=0, atol=0)
    theirs = copy.deepcopy(base)
    targets = ["c_attn", "c_proj", "c_fc"]
    peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, use_dora=True), theirs)
    train_model_a_little(ours)
    peft_layers = dict(theirs.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            p = peft_layers[name]
            p.lora_A["default"].weight.copy_(layer.lora.U.T)
            p.lora_B["default"].weight.copy_(layer.lora.V.T)
            p.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-10, atol=1e-10)
    trained = ours(ids).logits
    loratrf.merge(ours)
    torch.testing.assert_close(ours(ids).logits, trained, rtol=1e-10, atol=1e-10)
    loratrf.unmerge(ours)
    for name, layer in layers.items():
        assert (layer.weight - base.get_submodule(name).weight).abs().max() <= 1e-10
