"""LoRA, DoRA and filters on quantized base weights (torchao, bitsandbytes), against the formulas
on the dequantized weights, which each test computes itself from the library's quantized tensors."""

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loratrf
from hf_architectures import llama, token_ids
from models import randomise_adapters
from reference import filter_reference, lora_reference

try:
    import torchao.quantization as tq
except ImportError:
    tq = None
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns that its optional CPU kernels are absent
        import bitsandbytes as bnb
except ImportError:
    bnb = None

NO_TORCHAO = pytest.mark.skipif(tq is None, reason="torchao is not installed (pip install 'loratrf[quant]')")
NO_BNB = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed (pip install 'loratrf[quant]')")
BACKENDS = [
    pytest.param("torchao-int8", marks=NO_TORCHAO),
    pytest.param("torchao-int4", marks=NO_TORCHAO),
    pytest.param("bnb-nf4", marks=NO_BNB),
    pytest.param("bnb-fp4", marks=NO_BNB),
    pytest.param("bnb-int8", marks=NO_BNB),
]


def quantize(model: nn.Module, backend: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Quantize the Linear layers `names` of `model` in place; returns each one's dequantized
    weight `[out, in]`, read from the quantized tensor with the library's own functions."""
    if backend.startswith("torchao"):
        config = tq.Int8WeightOnlyConfig() if backend == "torchao-int8" else tq.IntxWeightOnlyConfig(torch.int4)
        tq.quantize_(model, config, filter_fn=lambda module, name: name in names)
        return {name: model.get_submodule(name).weight.dequantize() for name in names}
    weights = {}
    for name in names:
        linear = model.get_submodule(name)
        has_bias = linear.bias is not None
        if backend == "bnb-int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        else:
            quant_type = backend.removeprefix("bnb-")
            shape = (linear.in_features, linear.out_features)
            layer = bnb.nn.Linear4bit(*shape, bias=has_bias, quant_type=quant_type, compute_dtype=torch.float32)
        layer.load_state_dict(linear.state_dict())
        layer = layer.to("cpu")  # bitsandbytes quantizes here
        w = layer.weight
        if backend == "bnb-int8":  # row-wise absmax scaling: W = CB · SCB / 127
            weights[name] = w.data.float() * w.SCB.float().unsqueeze(1) / 127
        else:
            weights[name] = bnb.functional.dequantize_4bit(w.data, w.quant_state)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return weights


def mlp(d_in=64, d_hidden=48, d_out=32):
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


def with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """`model` (float) with the named Linear layers' weights replaced by `weights`."""
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)
    return model


def dora_reference(x, weight, bias, A, B, scale, m):
    """DoRA: y = m ⊙ (x (W0 + s B A)ᵀ) / ‖W0 + s B A‖ (per output row) + b, in float64."""
    W = weight.double() + scale * B.double() @ A.double()
    y = x.double() @ W.T * (m.double() / W.norm(dim=1))
    return y if bias is None else y + bias.double()


def close(a, b, tol=1e-5):
    """Equal up to float32 rounding of sums of the size of `b`."""
    return torch.allclose(a.double(), b.double(), rtol=tol, atol=tol * float(b.detach().abs().max()) + 1e-12)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_gradients_match_the_formula_on_the_dequantized_weight(backend, dora):
    model = mlp()
    weights = quantize(model, backend, ["0"])
    loratrf.inject(model, targets=["0"], rank=4, alpha=8, dora=dora)
    randomise_adapters(model)
    layer = model[0]
    with torch.no_grad():
        if dora:
            layer.magnitude.mul_(torch.linspace(0.5, 1.5, layer.out_features))
    x = torch.randn(3, 5, 64, requires_grad=True)
    assert not layer.fast_path_applies(x)  # the hand-written backward steps aside
    y = layer(x)
    A, B = layer.lora.U.T, layer.lora.V.T
    x64 = x.detach().double().requires_grad_()
    A64, B64 = (t.detach().double().requires_grad_() for t in (A, B))
    if dora:
        m64 = layer.magnitude.detach().double().requires_grad_()
        # DoRA's norm is a constant in backward (its section 4.3): detached in the reference's gradient
        W = weights["0"].double() + layer.lora.scale * B64 @ A64
        factor = m64 / W.norm(dim=1).detach()
        ref = x64 @ W.T * factor + layer.bias.double()
        assert close(y, dora_reference(x, weights["0"], layer.bias, A, B, layer.lora.scale, layer.magnitude))
    else:
        ref = lora_reference(x64, weights["0"], layer.bias, A64, B64, layer.lora.scale)
    assert close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    assert close(x.grad, x64.grad)
    assert close(layer.lora.U.grad, A64.grad.T) and close(layer.lora.V.grad, B64.grad.T)
    if dora:
        assert close(layer.magnitude.grad, m64.grad)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"0.lora.U", "0.lora.V"} | ({"0.magnitude"} if dora else set())


@pytest.mark.parametrize("backend", BACKENDS)
def test_filters_and_lora_on_a_quantized_llama_compute_what_the_dequantized_float_llama_does(backend):
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
    model = llama().eval()
    float_model = llama().eval()
    float_model.load_state_dict(model.state_dict())
    weights = quantize(model, backend, names)
    with_weights(float_model, weights)
    options = dict(targets=[r".*\.(q_proj|v_proj|up_proj)"], filters=[r"model\.layers\.\d+"], rank=4)
    loratrf.inject(model, **options)
    loratrf.inject(float_model, **options)
    randomise_adapters(model)
    float_model.load_state_dict(loratrf.adapter_state_dict(model), strict=False)
    ids = token_ids()
    logits = model(ids).logits
    assert close(logits, float_model(ids).logits, tol=1e-4)
    logits.square().mean().backward()
    trained = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"U", "V", "task_vector"}


def test_the_filter_on_a_quantized_layer_s_output_is_the_paper_s_formula():
    if bnb is None:
        pytest.skip("bitsandbytes is not installed (pip install 'loratrf[quant]')")
    model = mlp()
    weights = quantize(model, "bnb-nf4", ["0"])
    loratrf.inject(model, filters=["0"], rank=4)
    randomise_adapters(model)
    x = torch.randn(6, 64)
    host = model[0]
    f = host.task_filter
    h = x.double() @ weights["0"].double().T + host.bias.double()
    assert close(host(x), filter_reference(h, f.task_vector, f.transform.U, f.transform.V, f.transform.scale))


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_into_a_quantized_weight_is_refused_and_changes_nothing(backend):
    model = mlp()
    quantize(model, backend, ["2"])  # layer 0 stays float: a refused merge must not merge it either
    loratrf.inject(model, targets=["0", "2"], rank=4)
    randomise_adapters(model)
    x = torch.randn(4, 64)
    before = model(x)
    float_weight = model[0].weight.detach().clone()
    calls = (loratrf.merge, lambda m: loratrf.merge(m, safe=False), lambda m: loratrf.unload(m), lambda m: m[2].merge())
    for call in calls:
        with pytest.raises(loratrf.MergeError, match=r"quantized .*loratrf\.dequantize\(model\)"):
            call(model)
        assert not model[0].merged and not model[2].merged
        assert torch.equal(model[0].weight, float_weight) and torch.equal(model(x), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantize_then_merge_is_exact_in_float(backend):
    model = mlp()
    weights = quantize(model, backend, ["0", "2"])
    loratrf.inject(model, targets=["0", "2"], rank=4)
    randomise_adapters(model)
    x = torch.randn(4, 64)
    before = model(x)
    loratrf.dequantize(model)
    assert all(close(model.get_submodule(n).weight, w, tol=1e-6) for n, w in weights.items())
    assert close(model(x), before)
    layers = {n: model.get_submodule(n) for n in weights}
    updates = {n: layer.lora.scale * (layer.lora.U @ layer.lora.V).T.detach() for n, layer in layers.items()}
    plain = loratrf.unload(model)  # merge in float: W0 + scale · B A
    assert type(plain[0]) is nn.Linear and type(plain[2]) is nn.Linear
    assert all(close(plain.get_submodule(n).weight, weights[n] + updates[n]) for n in weights)
    assert close(plain(x), before)


@pytest.mark.parametrize("peft_folder", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_files_move_between_quantized_and_float_models(backend, peft_folder, tmp_path):
    """Both ways: from the quantized model into a float one holding the dequantized weights, and
    from a float model into the quantized one; each computes what the other did."""
    float_model = mlp()
    model = mlp()
    model.load_state_dict(float_model.state_dict())
    with_weights(float_model, quantize(model, backend, ["0", "2"]))
    x = torch.randn(5, 64)
    for source, target in ((model, float_model), (float_model, model)):
        loratrf.inject(source, targets=["0", "2"], filters=["0"], rank=4)
        randomise_adapters(source)
        if peft_folder:
            loratrf.unload(source, merge=False, keep_filters=False)  # PEFT folders hold LoRA alone
            loratrf.inject(source, targets=["0", "2"], rank=4)
            randomise_adapters(source)
            loratrf.export_peft(source, tmp_path / "peft")
            loratrf.import_peft(target, tmp_path / "peft")
        else:
            loratrf.save_adapter(source, tmp_path / "adapter.safetensors")
            loratrf.load_adapter(target, tmp_path / "adapter.safetensors")
        assert close(target(x), source(x))
        for m in (source, target):
            loratrf.unload(m, merge=False, keep_filters=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_adapter_per_row_on_a_quantized_base_computes_each_row_s_adapter(backend):
    model = mlp()
    quantize(model, backend, ["0", "2"])
    for name in ("default", "b"):
        loratrf.inject(model, targets=["0", "2"], rank=4, adapter=name)
    randomise_adapters(model)
    x = torch.randn(4, 64)
    alone = {}
    for name in ("default", "b"):
        loratrf.set_adapter(model, name)
        alone[name] = model(x)
    with loratrf.use_adapters(model, ["default", "b", "b", "default"]):
        mixed = model(x)
    assert close(mixed[[0, 3]], alone["default"][[0, 3]]) and close(mixed[[1, 2]], alone["b"][[1, 2]])


def test_a_bitsandbytes_4bit_weight_repacked_for_inference_is_refused():
    if bnb is None:
        pytest.skip("bitsandbytes is not installed (pip install 'loratrf[quant]')")
    model = nn.Sequential(nn.Linear(64, 64))  # bitsandbytes repacks only widths divisible by 32
    quantize(model, "bnb-nf4", ["0"])
    with torch.no_grad():
        model.eval()(torch.randn(2, 64))  # bitsandbytes repacks here on CPUs with AVX512-BF16
    if not getattr(model[0].weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16, so bitsandbytes does not repack the weight")
    with pytest.raises(loratrf.InjectionError, match="repacked by bitsandbytes"):
        loratrf.inject(model, targets=["0"])
    assert type(model[0]) is bnb.nn.Linear4bit


@pytest.mark.skipif(tq is None, reason="torchao is not installed (pip install 'loratrf[quant]')")
# widths from 3: the libraries themselves fail on some smaller ones (torchao 0.18 on in_features = 1,
# bitsandbytes 0.50 on 1 x 2 and 2 x 1 weights), with no adapter in the way
@given(
    d_in=st.integers(3, 40),
    d_out=st.integers(3, 40),
    rank=st.integers(1, 6),
    rows=st.integers(1, 7),
    backend=st.sampled_from(["torchao-int8", "torchao-int4"] + ["bnb-nf4", "bnb-int8"] * (bnb is not None)),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_rank_computes_the_formula_on_the_dequantized_weight(
    d_in, d_out, rank, rows, backend, dora, seed
):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    weights = quantize(model, backend, ["0"])
    loratrf.inject(model, targets=["0"], rank=rank, alpha=2 * rank, dora=dora)
    randomise_adapters(model)
    layer = model[0]
    x = torch.randn(rows, d_in)
    A, B, scale = layer.lora.U.T, layer.lora.V.T, layer.lora.scale
    if dora:
        ref = dora_reference(x, weights["0"], layer.bias, A, B, scale, layer.magnitude)
    else:
        ref = lora_reference(x, weights["0"], layer.bias, A, B, scale)
    y = layer(x)
    assert close(y, ref, tol=1e-4)
    y.sum().backward()
    assert layer.lora.V.grad is not None and layer.weight.grad is None


def test_loratrf_imports_no_quantization_library_for_a_float_model():
    code = (
        "import sys, torch, loratrf\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4))\n"
        "loratrf.inject(m, targets=['0'], filters=['0'])\n"
        "m(torch.randn(2, 4)).sum().backward(); loratrf.merge(m)\n"
        "print(sorted(n for n in ('torchao', 'bitsandbytes') if n in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_fast_path_steps_aside_for_a_torchao_weight_whose_dtype_reads_float():
    if tq is None:
        pytest.skip("torchao is not installed (pip install 'loratrf[quant]')")
    model = mlp()
    quantize(model, "torchao-int8", ["0"])
    weight = model[0].weight
    assert weight.dtype == torch.float32  # torchao's tensor reports the dtype it dequantizes to
    U, V = torch.randn(64, 4, requires_grad=True), torch.randn(4, 48, requires_grad=True)
    x = torch.randn(3, 64)
    assert not loratrf.kernels.lora_fast_path_applies(x, weight, None, U, V)
    y = loratrf.kernels.lora_linear(x, weight, None, U, V, 0.5)
    y.sum().backward()
    ref = x @ weight.dequantize().T + 0.5 * (x @ U) @ V
    assert close(y, ref) and U.grad is not None


def test_dora_with_dropout_on_a_quantized_base_trains():
    if bnb is None:
        pytest.skip("bitsandbytes is not installed (pip install 'loratrf[quant]')")
    model = mlp()
    quantize(model, "bnb-nf4", ["0"])
    loratrf.inject(model, targets=["0"], rank=4, dora=True, dropout=0.5)
    randomise_adapters(model)
    model.train()
    F.mse_loss(model(torch.randn(8, 64)), torch.zeros(8, 32)).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("backend", [None, *BACKENDS[:1], *BACKENDS[-1:]])
def test_the_benchmark_counts_the_bytes_each_base_stores(backend):
    import quantized as benchmark  # benchmarks/quantized.py

    model = nn.Sequential(nn.Linear(64, 48, bias=False))
    if backend is not None:
        quantize(model, backend, ["0"])
    model.append(model[0])  # registered twice: counted once
    per_row = {None: 64 * 4, "torchao-int8": 64 + 4 + 1, "bnb-int8": 64 + 4}[backend]  # values, scale (, zero point)
    assert benchmark.stored_bytes(model[0].weight) == 48 * per_row
    assert benchmark.memory(model)[0] == 48 * per_row


def test_dora_on_a_bitsandbytes_int8_layer_that_already_ran_reads_its_scales_from_the_module():
    if bnb is None:
        pytest.skip("bitsandbytes is not installed (pip install 'loratrf[quant]')")
    model = mlp()
    weights = quantize(model, "bnb-int8", ["0"])
    model(torch.randn(2, 64))  # bitsandbytes moves the row scales from the weight to the module's state here
    loratrf.inject(model, targets=["0"], rank=4, dora=True)
    randomise_adapters(model)
    layer, x = model[0], torch.randn(5, 64)
    ref = dora_reference(x, weights["0"], layer.bias, layer.lora.U.T, layer.lora.V.T, layer.lora.scale, layer.magnitude)
    assert close(layer(x), ref)
