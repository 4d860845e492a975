"""LoRA on every attention and FFN projection plus a filter on every layer's output, on real
transformers architectures (BERT, RoBERTa, DeBERTa-v3, LLaMA, GPT-2, T5) built from tiny configs."""

import copy

import pytest
import torch

import loratrf
from hf_architectures import ARCHS, main_output, token_ids, transformers
from models import randomise_adapters
from loratrf import LoRALinear, presets
from loratrf.walk import named_adapter_parameters, named_filters, named_lora_layers

PARAMS = pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
DECODERS = pytest.mark.parametrize("arch", [a for a in ARCHS if a.decoder], ids=[a.name for a in ARCHS if a.decoder])


def injected(arch):
    """(untouched model, a copy with LoRA on all six matrices and a filter on every layer)."""
    untouched = arch.build().eval()
    model = copy.deepcopy(untouched)
    config = presets.preset(arch.preset, presets.MATRICES, filters=True, rank=4, alpha=8.0)
    loratrf.inject(model, **config.to_dict())
    return untouched, model


def train(arch, model, steps=4, lr=1e-2):
    ids = token_ids(seed=1)
    target = torch.randn(*ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        output = model(**arch.inputs(ids))
        loss = output.loss if arch.decoder else (output.last_hidden_state - target).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@torch.no_grad()
def run(arch, model, ids=None):
    return main_output(model(**arch.inputs(token_ids() if ids is None else ids)))


def adapter_keys(model):
    return set(loratrf.adapter_state_dict(model))


# (LoRA layers, filters) in 2 layers: GPT-2 fuses q, k, v into one Conv1D; T5's decoder
# blocks hold self- and cross-attention; encoder-decoders have 2 + 2 blocks.
INJECTED = {"gpt2": (2 * 4, 2), "t5": (2 * 6 + 2 * 10, 4)}


@PARAMS
def test_injected_model_equals_the_untouched_model_at_init(arch):
    untouched, model = injected(arch)
    counts = len(list(named_lora_layers(model))), len(list(named_filters(model)))
    assert counts == INJECTED.get(arch.name, (2 * 6, 2))
    assert torch.equal(run(arch, model), run(arch, untouched))


def live_filters(arch, model, ids):
    """Hosts of the filters that give some token a relevance s > 0 on `ids`.

    A filter whose task vector has a negative cosine with every token gets s = 0 everywhere,
    and with it a zero gradient for all its tensors (the paper's clamp to [0, 1])."""
    live, hooks = set(), []
    for host, task_filter in named_filters(model):
        record = lambda f, args, out, host=host: live.add(host) if bool((f.relevance(args[0]) > 0).any()) else None
        hooks.append(task_filter.register_forward_hook(record))
    run(arch, model, ids)
    for hook in hooks:
        hook.remove()
    return live


@PARAMS
def test_training_changes_the_output_and_only_adapter_tensors(arch):
    untouched, model = injected(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    live = live_filters(arch, model, token_ids(seed=1))
    train(arch, model)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    lora = {k for k in adapter_keys(model) if ".lora." in k}
    filters = {k for k in adapter_keys(model) if k.rsplit(".task_filter.", 1)[0] in live}
    assert len(lora) == 2 * len(list(named_lora_layers(model))) and len(filters) == 3 * len(live) > 0
    assert lora | filters <= changed <= adapter_keys(model)
    assert not torch.allclose(run(arch, model), run(arch, untouched), atol=1e-4)


@PARAMS
def test_merge_gives_the_same_outputs_and_unmerge_restores_the_weights(arch):
    _, model = injected(arch)
    train(arch, model)
    weights = {n: p.clone() for n, p in model.named_parameters() if n not in adapter_keys(model)}
    expected = run(arch, model)
    loratrf.merge(model)
    for name, layer in named_lora_layers(model):
        A, B = layer.lora.U.T, layer.lora.V.T  # A [r, in], B [out, r]
        update = 8.0 / 4 * B @ A  # alpha / r · B A, laid out [out, in]; Conv1D stores [in, out]
        expected_weight = weights[f"{name}.weight"] + (update.T if arch.name == "gpt2" else update)
        torch.testing.assert_close(layer.weight, expected_weight)
    torch.testing.assert_close(run(arch, model), expected, rtol=1e-4, atol=1e-5)
    loratrf.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(run(arch, model), expected, rtol=1e-4, atol=1e-5)


@PARAMS
def test_unload_with_merge_gives_back_the_original_classes(arch):
    untouched, model = injected(arch)
    train(arch, model)
    expected = run(arch, model)
    loratrf.unload(model, merge=True, keep_filters=True)
    kinds = {n: type(m) for n, m in model.named_modules() if "task_filter" not in n}
    assert kinds == {n: type(m) for n, m in untouched.named_modules()}
    torch.testing.assert_close(run(arch, model), expected, rtol=1e-4, atol=1e-5)


@PARAMS
def test_a_saved_adapter_loads_into_a_freshly_built_model(arch, tmp_path):
    untouched, model = injected(arch)
    train(arch, model)
    loratrf.save_adapter(model, tmp_path / "adapter.pt")
    fresh = arch.build().eval()
    fresh.load_state_dict(untouched.state_dict(), strict=True)
    loratrf.load_adapter(fresh, tmp_path / "adapter.pt")
    assert torch.equal(run(arch, fresh), run(arch, model))
    assert set(fresh.state_dict()) == set(model.state_dict())


def generate(model, ids, **options):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, **options)


@DECODERS
def test_generation_with_filters_is_the_same_merged_unmerged_and_reloaded(arch, tmp_path):
    untouched, model = injected(arch)
    train(arch, model, steps=6, lr=3e-2)
    prompt = token_ids(length=5, seed=3)
    tokens = generate(model, prompt)
    assert not torch.equal(tokens, generate(untouched, prompt)), "training should change what the model generates"
    assert torch.equal(generate(model, prompt, use_cache=False), tokens), "the KV cache must not skip a filter"
    loratrf.save_adapter(model, tmp_path / "adapter.pt")
    loratrf.merge(model)
    assert torch.equal(generate(model, prompt), tokens)
    fresh = arch.build().eval()
    fresh.load_state_dict(untouched.state_dict(), strict=True)
    loratrf.load_adapter(fresh, tmp_path / "adapter.pt")
    assert torch.equal(generate(fresh, prompt), tokens)


def test_gpt2_conv1d_layer_computes_and_merges_in_its_transposed_layout():
    """HF's Conv1D stores W [in, out] and computes x W + b; LoRA must add scale · x Aᵀ Bᵀ and
    merge scale · (B A)ᵀ into that layout."""
    conv = transformers.pytorch_utils.Conv1D(12, 5)  # nf=12 outputs, nx=5 inputs: weight [5, 12]
    torch.nn.init.normal_(conv.weight), torch.nn.init.normal_(conv.bias)
    weight0 = conv.weight.clone()
    layer = LoRALinear.from_linear(conv, rank=3, alpha=6.0)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (5, 12, True)
    torch.nn.init.normal_(layer.lora.V)
    A, B, scale = layer.lora.U.T, layer.lora.V.T, 6.0 / 3  # A [r, in], B [out, r]
    x = torch.randn(2, 4, 5)
    expected = x @ weight0 + conv.bias + scale * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)
    layer.merge()
    torch.testing.assert_close(conv.weight, weight0 + scale * (B @ A).T)
    torch.testing.assert_close(conv(x), expected)
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    torch.testing.assert_close(conv.weight, weight0, rtol=0, atol=1e-6)


def adapter_grads(arch, model, ids):
    model.zero_grad()
    model.train()
    output = model(**arch.inputs(ids))
    loss = output.loss if arch.decoder else main_output(output).square().mean()
    loss.backward()
    return {name: p.grad for name, p in named_adapter_parameters(model)}


def count_calls(model):
    calls = []
    for _, layer in named_lora_layers(model):
        layer.register_forward_hook(lambda *_: calls.append(1))
    return calls


def assert_grads_close(grads, expected):
    """Checkpointing may sum gradients in another order: agreement to float32 rounding."""
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert grad is not None, name
        assert (grad - expected[name]).norm() <= 1e-4 * expected[name].norm(), name


@PARAMS
@pytest.mark.parametrize("reentrant", [False, True], ids=["default", "reentrant"])
def test_gradient_checkpointing_with_a_frozen_base_still_trains_every_adapter(arch, reentrant):
    """transformers 5.24 checkpoints non-reentrantly by default (no input needs requires_grad);
    with use_reentrant=True it makes the input embeddings require grad itself."""
    _, model = injected(arch)
    randomise_adapters(model)
    ids = token_ids(seed=4)
    calls = count_calls(model)
    expected = {name: grad.clone() for name, grad in adapter_grads(arch, model, ids).items()}
    plain_calls = len(calls)
    if reentrant:
        model.activation_checkpointing_enable({"use_reentrant": True})
    else:
        with pytest.warns(FutureWarning, match="activation_checkpointing_enable"):
            model.gradient_checkpointing_enable()
    grads = adapter_grads(arch, model, ids)
    assert len(calls) - plain_calls > plain_calls, "checkpointed layers run again in the backward pass"
    assert_grads_close(grads, expected)
    assert all(grad.abs().sum() > 0 for name, grad in grads.items() if ".lora." in name)


def test_reentrant_checkpointing_with_inputs_embeds_needs_them_to_require_grad():
    """The documented corner: `inputs_embeds` passed in (the embedding layer never runs, so
    transformers' hook cannot mark them) with use_reentrant=True."""
    arch = next(a for a in ARCHS if a.name == "llama")
    _, model = injected(arch)
    randomise_adapters(model)
    embeds = model.get_input_embeddings()(token_ids(seed=5)).detach()

    def grads():
        model.zero_grad(set_to_none=True)
        model.train()(inputs_embeds=embeds).logits.square().mean().backward()
        return {n: p.grad for n, p in named_adapter_parameters(model)}

    expected = grads()
    model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        trapped = grads()
    assert all(trapped[n] is None for n in trapped if n.startswith("model.layers.0.") and ".lora." in n)
    embeds.requires_grad_(True)
    assert_grads_close(grads(), expected)


def test_the_big_model_flow_meta_inject_to_empty_strict_load_reset():
    """Build on meta, inject, materialise, load the base checkpoint strictly, reset the adapters:
    the result equals the base model exactly, and trains."""
    arch = next(a for a in ARCHS if a.name == "llama")
    pretrained = arch.build().eval()  # stands in for the checkpoint on disk
    base_state = pretrained.state_dict()
    with torch.device("meta"):
        model = arch.build()
    loratrf.inject(model, **presets.LORATRF_LLAMA.to_dict())
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    model.to_empty(device="cpu")
    model.init_weights()  # transformers: recompute non-persistent buffers (RoPE), re-tie embeddings
    model.load_state_dict(base_state, strict=True)
    loratrf.reset_adapters(model)
    assert set(model.state_dict()) == set(base_state) | adapter_keys(model)
    assert torch.equal(run(arch, model.eval()), run(arch, pretrained))
    train(arch, model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_state.items())
    assert not torch.allclose(run(arch, model), run(arch, pretrained), atol=1e-4)
