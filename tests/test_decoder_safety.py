"""Nothing silently wrong on decoder LLMs (issue 25): tied heads, mixed adapters, adapter files
from models of another depth, non-finite adapters, filters lost on the Hugging Face save path,
and resized embeddings. Each test fails on loratrf before these checks existed.

A tiny LLaMA-architecture decoder with tied input and output embeddings stands in for SmolLM2.
"""

from __future__ import annotations

import json
import warnings

import pytest
import safetensors.torch
import torch

import loratrf
from loratrf import AdapterFileError, InjectionError, MergeError
from loratrf.adapter_file import adapter_digest

transformers = pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")
transformers.logging.set_verbosity_error()

LORATRF = dict(
    targets=[r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.(up|down)_proj)"], filters=[r"model\.layers\.\d+"], rank=4
)
IDS = torch.tensor([[5, 9, 2, 30, 17, 4], [8, 1, 60, 3, 3, 12]])


def decoder(layers: int = 2, tie: bool = True, seed: int = 0) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def randomise(model, seed: int = 1) -> None:
    """Non-zero adapters, as training leaves them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in loratrf.walk.named_adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:  # bit for bit, NaN where NaN was
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)


# --- 1. LoRA on a tied lm_head, and a tied trainable module


def test_lora_on_a_tied_head_is_announced_and_its_merge_refused_with_the_model_unchanged():
    model = decoder()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.warns(UserWarning, match=r"'lm_head' shares its weight with 'model\.embed_tokens\.weight'"):
        loratrf.inject(model, targets=["lm_head"], rank=4)
    randomise(model)
    before, y = snapshot(model), logits(model)
    for call in (lambda: loratrf.merge(model), lambda: loratrf.merge(model, safe=False), lambda: loratrf.unload(model)):
        with pytest.raises(MergeError, match=r"tied to 'model\.embed_tokens\.weight'.*untie"):
            call()
        assert_unchanged(model, before)
        assert not model.lm_head.merged
        assert torch.equal(logits(model), y)


def test_a_tied_head_untied_as_the_refusal_says_merges_exactly():
    model = decoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loratrf.inject(model, targets=["lm_head"], rank=4)
    randomise(model)
    embedding = model.model.embed_tokens.weight.detach().clone()
    y = logits(model)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    loratrf.merge(model)
    layer = model.lm_head
    expected = embedding + layer.lora.scale * (layer.lora.U @ layer.lora.V).T.detach()  # W0 + (alpha/r) B A
    torch.testing.assert_close(layer.weight.detach(), expected, rtol=0, atol=1e-6)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding did not move
    torch.testing.assert_close(logits(model), y, rtol=0, atol=1e-4)


def test_a_tied_trainable_module_says_what_else_trains_and_how_big_the_file_gets():
    model = decoder()
    numel = model.model.embed_tokens.weight.numel()
    with pytest.warns(UserWarning) as record:
        loratrf.inject(model, **LORATRF, trainable=["lm_head"])
    (message,) = [str(w.message) for w in record if "trainable parameter" in str(w.message)]
    assert "'lm_head.weight' is tied to 'model.embed_tokens.weight'" in message
    assert f"all {numel:,} of its values ({numel * 4 / 1e6:,.1f} MB)" in message


def test_untied_modules_are_not_reported_as_tied():
    model = decoder(tie=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loratrf.inject(model, targets=["lm_head"], trainable=["model.embed_tokens"], rank=4)
    randomise(model)
    y = logits(model)
    loratrf.merge(model)
    torch.testing.assert_close(logits(model), y, rtol=0, atol=1e-4)


# --- 2. merge / unmerge / unload with adapters on different modules


def test_merge_and_unload_with_a_second_adapter_on_other_modules():
    model = decoder()
    base = logits(model)
    loratrf.inject(model, **LORATRF)
    loratrf.inject(model, targets=[r".*\.(q_proj|v_proj)"], rank=2, adapter="b")
    randomise(model)
    y = logits(model)
    loratrf.merge(model)
    assert {n for n, layer in loratrf.walk.named_lora_layers(model) if layer.merged} == {
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
    }
    torch.testing.assert_close(logits(model), y, rtol=0, atol=1e-4)
    loratrf.unmerge(model)
    loratrf.set_adapter(model, "b")
    yb = logits(model)
    loratrf.merge(model)  # now b's layers merge and the default's stay
    torch.testing.assert_close(logits(model), yb, rtol=0, atol=1e-4)
    loratrf.unmerge(model)
    loratrf.set_adapter(model, "default")
    loratrf.unload(model)
    assert not list(loratrf.walk.named_lora_layers(model))
    torch.testing.assert_close(logits(model), y, rtol=0, atol=1e-4)
    assert not torch.allclose(y, base)


# --- 3. adapter files from a model of another depth


def _saved(model, tmp_path, name="adapter.safetensors"):
    path = tmp_path / name
    loratrf.save_adapter(model, path)
    return path


@pytest.mark.parametrize("layers", [3, 1])
def test_an_adapter_file_covering_every_layer_refuses_a_model_with_more_or_fewer(tmp_path, layers):
    model = decoder(layers=2)
    loratrf.inject(model, **LORATRF)
    path = _saved(model, tmp_path)
    other = decoder(layers=layers)
    before = snapshot(other)
    with pytest.raises(AdapterFileError) as refusal:
        loratrf.load_adapter(other, path)
    assert_unchanged(other, before)
    message = str(refusal.value)
    if layers == 3:  # layer by layer, one line per stack
        stack = r"model\.layers\.\d+"
        down = f"{stack}\\.mlp\\.down_proj: the file holds 2 of these modules, this model has 3; not in the file: "
        assert f"\n- {down}'model.layers.2.mlp.down_proj'\n" in message
        layer = f"{stack}: the file holds 2 of these modules, this model has 3; not in the file: 'model.layers.2'"
        assert message.endswith(f"\n- {layer}")
    else:
        for module in ("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"LoRA layer 'model.layers.1.{module}' (the model has nothing there)" in message
        assert "filter host 'model.layers.1' (no such module)" in message


def test_an_adapter_file_on_some_layers_on_purpose_loads_into_its_model(tmp_path):
    model = decoder(layers=3)
    loratrf.inject(model, targets=[r"model\.layers\.[01]\.mlp\.down_proj"], filters=[r"model\.layers\.0"], rank=4)
    randomise(model)
    path = _saved(model, tmp_path)
    fresh = decoder(layers=3)
    loratrf.load_adapter(fresh, path)
    assert torch.equal(logits(fresh), logits(model))


def test_an_adapter_file_of_format_version_2_without_stacks_still_loads(tmp_path):
    model = decoder()
    loratrf.inject(model, **LORATRF)
    randomise(model)
    path = _saved(model, tmp_path)
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        plan = json.loads(f.metadata()["plan"])
    del plan["stacks"]
    old_plan = json.dumps(plan)
    metadata = {
        "format": "loratrf-adapter",
        "version": "2",
        "plan": old_plan,
        "sha256": adapter_digest(old_plan, tensors),
    }
    safetensors.torch.save_file(tensors, str(path), metadata)
    fresh = decoder()
    loratrf.load_adapter(fresh, path)
    assert torch.equal(logits(fresh), logits(model))


# --- 4. non-finite adapter tensors


@pytest.mark.parametrize("where", ["filter", "lora"])
def test_a_non_finite_adapter_is_refused_at_merge_and_load_and_reported_at_save(tmp_path, where):
    model = decoder()
    loratrf.inject(model, **LORATRF)
    randomise(model)
    with torch.no_grad():
        if where == "filter":
            model.model.layers[1].task_filter.transform.V[0, 3] = float("nan")
        else:
            model.model.layers[0].mlp.up_proj.lora.V[1, 2] = float("inf")
    before = snapshot(model)
    with pytest.raises(MergeError, match="NaN/Inf"):
        loratrf.merge(model)
    assert_unchanged(model, before)
    with pytest.raises(MergeError, match="NaN/Inf"):
        loratrf.unload(model)
    assert_unchanged(model, before)
    path = tmp_path / "diverged.safetensors"
    bad = "model.layers.1.task_filter.transform.V" if where == "filter" else "model.layers.0.mlp.up_proj.lora.V"
    with pytest.warns(UserWarning, match=f"NaN/Inf in 1 tensor.*{bad}"):
        loratrf.save_adapter(model, path)
    assert path.is_file()
    fresh = decoder()
    fresh_before = snapshot(fresh)
    with pytest.raises(AdapterFileError, match=f"NaN/Inf in 1 tensor.*{bad}"):
        loratrf.load_adapter(fresh, path)
    assert_unchanged(fresh, fresh_before)


# --- 5. filters on the ordinary Hugging Face save path


def test_export_peft_lora_only_says_what_it_left_out(tmp_path):
    model = decoder()
    loratrf.inject(model, **LORATRF)
    n_filter = sum(p.numel() for _, f in loratrf.walk.named_filters(model) for p in f.parameters())
    with pytest.warns(UserWarning) as record:
        loratrf.export_peft(model, tmp_path / "peft", lora_only=True)
    (line,) = [str(w.message) for w in record if "left out" in str(w.message)]
    assert f"left out 2 task-aware filter(s) ({n_filter:,} parameters) and 0 trainable base tensor(s)" in line
    assert "\n" not in line


def test_unload_tells_how_to_keep_filters_across_save_pretrained_and_that_route_is_faithful(tmp_path):
    model = decoder()
    loratrf.inject(model, **LORATRF)
    randomise(model)
    y = logits(model)
    with pytest.warns(UserWarning, match=r"unload kept 2 task-aware filter.*from_pretrained drops them.*save_adapter"):
        loratrf.unload(model)
    torch.testing.assert_close(logits(model), y, rtol=0, atol=1e-4)
    model.save_pretrained(tmp_path / "merged")
    loratrf.save_adapter(model, tmp_path / "filters.safetensors")

    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not list(loratrf.walk.named_filters(plain))  # what the warning is about
    assert not torch.allclose(logits(plain), y, atol=1e-3)
    loratrf.load_adapter(plain, tmp_path / "filters.safetensors")
    assert torch.equal(logits(plain), logits(model))


# --- 6. resizing the embeddings under a LoRA layer


def test_resizing_a_tied_embedding_under_lora_on_the_head_is_refused_clearly():
    model = decoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loratrf.inject(model, targets=["lm_head"], rank=4)
    model.resize_token_embeddings(65)
    with pytest.raises(
        InjectionError, match=r"base weight is now \[65, 32\], but its adapters were built for \[64, 32\]"
    ):
        model(IDS)


def test_resizing_before_inject_is_the_order_that_works():
    model = decoder()
    model.resize_token_embeddings(65)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loratrf.inject(model, targets=["lm_head"], rank=4)
    assert model(IDS).logits.shape == (2, 6, 65)
