"""Trainable token rows (`inject(trainable_tokens=...)`, PEFT's `trainable_token_indices`) on a
tiny LlamaForCausalLM with tied and untied embeddings, against the formula written out here:
the model with its table's rows `ids` replaced by `R` (`E' = E.index_copy(0, ids, R)`), whose
tied head reads `E'` too and whose untied head keeps its own weight; and against PEFT itself."""

from __future__ import annotations

import copy
import json

import pytest
import safetensors.torch
import torch
from hf_architectures import VOCAB, llama, token_ids, transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import loratrf
from loratrf import AdapterError, AdapterFileError, InjectionError, MergeError
from loratrf.peft_format import CONFIG_NAME, WEIGHTS_NAME

ATOL = 1e-5
EMBED = r"model\.embed_tokens"


def decoder(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = llama().config
    config.tie_word_embeddings = tied
    return transformers.LlamaForCausalLM(config).eval()


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=token_ids() if ids is None else ids).logits


def rows_of(model, adapter="default"):
    return model.model.embed_tokens.token_rows[adapter].rows


def set_rows(model, seed, adapter="default"):
    """Random rows `R` (about the table's scale); returns them."""
    rows = rows_of(model, adapter)
    with torch.no_grad():
        rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return rows.detach().clone()


def reference(base, ids, R):
    """The formula: a copy of the base model whose table reads `E'`, `E'[ids] = R` (a tied head
    shares that table; an untied head keeps its own weight)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.model.embed_tokens.weight.index_copy_(0, torch.tensor(ids), R)
    return model


def with_tokens(ids_in_batch):
    """Token ids (clear of the special tokens) that contain each of `ids_in_batch`."""
    ids = token_ids()
    ids[0, : len(ids_in_batch)] = torch.tensor(ids_in_batch)
    ids[1, -len(ids_in_batch) :] = torch.tensor(ids_in_batch)
    return ids


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_rows_replace_the_table_for_the_lookup_and_the_tied_head_alone(tied):
    base = decoder(tied)
    ids = [5, 9, 17]
    x = with_tokens(ids)
    model = copy.deepcopy(base)
    loratrf.inject(model, trainable_tokens={EMBED: ids})
    assert torch.equal(logits(model, x), logits(base, x))  # it starts as the base model
    R = set_rows(model, seed=1)
    E = base.model.embed_tokens.weight.detach()
    E_prime = E.index_copy(0, torch.tensor(ids), R)
    torch.testing.assert_close(model.model.embed_tokens(x), E_prime[x], rtol=0, atol=0)
    h = torch.randn(2, 7, E.shape[1])
    head = E_prime if tied else base.lm_head.weight.detach()
    torch.testing.assert_close(model.lm_head(h), h @ head.T, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits(model, x), logits(reference(base, ids, R), x), rtol=0, atol=ATOL)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    assert torch.equal(model.model.embed_tokens.weight, E)  # the table itself is untouched


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_only_the_rows_get_gradients_and_the_rest_stays_bit_identical(tied):
    base = decoder(tied)
    ids = [5, 9]
    x = with_tokens(ids)
    model = copy.deepcopy(base)
    loratrf.inject(model, targets=[r".*q_proj"], trainable_tokens={EMBED: ids})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "model.embed_tokens.token_rows.default.rows",
        *(f"model.layers.{i}.self_attn.q_proj.lora.{f}" for i in range(2) for f in "UV"),
    }
    R = set_rows(model, seed=2)

    # the gradient of the rows is that of the same rows of a fully trained table E' (formula)
    ref = reference(base, ids, R)
    ref.model.embed_tokens.weight.requires_grad_(True)
    ref(input_ids=x).logits.square().mean().backward()
    model.model.layers.requires_grad_(False)  # LoRA's V = 0 and U frozen: the LoRA layers compute their base
    model(input_ids=x).logits.square().mean().backward()
    expected = ref.model.embed_tokens.weight.grad[ids]
    torch.testing.assert_close(rows_of(model).grad, expected, rtol=1e-4, atol=1e-6)
    assert rows_of(model).grad.abs().sum() > 0

    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    optimizer = torch.optim.SGD([rows_of(model)], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=x).logits.square().mean().backward()
        optimizer.step()
    assert not torch.equal(rows_of(model), R)
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p, before[name]) and p.grad is None, name  # the base, the table included


def test_named_adapters_per_row_batches_activation_and_delete():
    base = decoder(tied=True)
    x = with_tokens([5, 6, 7])[:1].repeat(3, 1)
    model = copy.deepcopy(base)
    loratrf.inject(model, trainable_tokens={EMBED: [5, 6]})
    loratrf.inject(model, trainable_tokens={EMBED: [6, 7]}, adapter="b")
    Ra, Rb = set_rows(model, 3), set_rows(model, 4, "b")
    expected = {
        "default": logits(reference(base, [5, 6], Ra), x[:1]),
        "b": logits(reference(base, [6, 7], Rb), x[:1]),
        None: logits(base, x[:1]),
    }
    for name, want in expected.items():
        loratrf.set_adapter(model, name)
        # an inactive adapter's rows do not apply
        torch.testing.assert_close(logits(model, x[:1]), want, rtol=0, atol=ATOL)
        assert rows_of(model, "b").requires_grad == (name == "b")
    loratrf.set_adapter(model, "default")
    names = ["b", None, "default"]
    with loratrf.use_adapters(model, names):
        out = logits(model, x)
    for row, name in enumerate(names):
        torch.testing.assert_close(out[row : row + 1], expected[name], rtol=0, atol=ATOL)
    loratrf.delete_adapter(model, "b")
    assert list(model.model.embed_tokens.token_rows) == ["default"]
    torch.testing.assert_close(logits(model, x[:1]), expected["default"], rtol=0, atol=ATOL)
    loratrf.delete_adapter(model, "default")
    for module in (model.model.embed_tokens, model.lm_head):
        assert not hasattr(module, "token_rows") and not module._forward_hooks
    assert torch.equal(logits(model, x), logits(base, x))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_unload_writes_the_rows_in_or_gives_back_the_base(tied):
    base = decoder(tied)
    ids = [5, 9]
    x = with_tokens(ids)
    for merge in (True, False):
        model = copy.deepcopy(base)
        loratrf.inject(model, trainable_tokens={EMBED: ids})
        R = set_rows(model, 5)
        adapted = logits(model, x)
        loratrf.unload(model, merge=merge)
        for module in (model.model.embed_tokens, model.lm_head):
            assert not hasattr(module, "token_rows") and not module._forward_hooks
        want = reference(base, ids, R) if merge else base
        assert torch.equal(model.model.embed_tokens.weight, want.model.embed_tokens.weight)
        torch.testing.assert_close(logits(model, x), adapted if merge else logits(base, x), rtol=0, atol=ATOL)


BASES = {tied: decoder(tied) for tied in (True, False)}


@settings(max_examples=12, deadline=None)
@given(
    tied=st.booleans(),
    ids=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6, unique=True),
    seed=st.integers(0, 2**16),
)
def test_merge_writes_the_rows_exactly_and_unmerge_restores_the_table(tied, ids, seed):
    base = BASES[tied]
    x = with_tokens(ids[:3])
    model = copy.deepcopy(base)
    loratrf.inject(model, trainable_tokens={EMBED: ids})
    R = set_rows(model, seed)
    adapted = logits(model, x)
    E = model.model.embed_tokens.weight.detach().clone()
    loratrf.merge(model)
    assert torch.equal(model.model.embed_tokens.weight, E.index_copy(0, torch.tensor(ids), R))
    torch.testing.assert_close(logits(model, x), adapted, rtol=1e-5, atol=ATOL)
    with pytest.raises(MergeError, match="are merged"):
        loratrf.set_adapter(model, None)
    loratrf.unmerge(model)
    assert torch.equal(model.model.embed_tokens.weight, E)
    assert torch.equal(logits(model, x), adapted)


@settings(max_examples=10, deadline=None)
@given(
    tied=st.booleans(),
    ids=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6, unique=True),
    seed=st.integers(0, 2**16),
    adapter=st.sampled_from(["default", "other"]),
)
def test_an_adapter_file_round_trips_the_rows_exactly(tmp_path_factory, tied, ids, seed, adapter):
    base = BASES[tied]
    x = with_tokens(ids[:3])
    model = copy.deepcopy(base)
    loratrf.inject(model, targets=[r".*v_proj"], trainable_tokens={EMBED: ids}, adapter=adapter)
    set_rows(model, seed, adapter)
    path = tmp_path_factory.mktemp("file") / "adapter.safetensors"
    loratrf.save_adapter(model, path, adapter=adapter)
    written = safetensors.torch.load_file(path)["model.embed_tokens.token_rows.default.rows"]
    assert torch.equal(written, rows_of(model, adapter))
    loratrf.set_adapter(model, adapter)
    fresh = copy.deepcopy(base)
    loratrf.load_adapter(fresh, path)
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert fresh.model.embed_tokens.token_rows["default"].ids.tolist() == ids


def test_files_without_token_rows_still_write_no_tokens_and_old_plans_load():
    plan = loratrf.config.Plan.from_dict({"lora": {}, "filters": {}, "trainable": []})  # a version 2 plan
    assert plan.tokens == {} and "tokens" not in plan.to_dict()
    plan = loratrf.config.Plan.from_dict({**plan.to_dict(), "tokens": {"model.embed_tokens": [4, 7]}})
    assert plan.tokens == {"model.embed_tokens": (4, 7)}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("as_list", [True, False], ids=["list", "mapping"])
def test_peft_trainable_token_indices_in_and_out_with_equal_logits(tmp_path, tied, as_list):
    peft = pytest.importorskip("peft", reason="the `test` extra (peft) is not installed")
    pytest.importorskip("peft.tuners.trainable_tokens", reason="PEFT 0.15 added trainable_token_indices")
    base = decoder(tied)
    ids = [5, 9, 17]
    x = with_tokens(ids)
    indices = ids if as_list else {"embed_tokens": ids}
    config = peft.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8, trainable_token_indices=indices)
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    saved = safetensors.torch.load_file(tmp_path / "peft" / WEIGHTS_NAME)
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    assert [k for k in saved if "token" in k] == [key]  # one tensor, the embedding's, tied or not

    model = copy.deepcopy(base)
    loratrf.import_peft(model, tmp_path / "peft")
    assert torch.equal(rows_of(model), saved[key])  # the rows themselves, not differences
    torch.testing.assert_close(logits(model, x), logits(peft_model, x), rtol=0, atol=ATOL)

    written = loratrf.export_peft(model, tmp_path / "out")
    assert written["trainable_token_indices"] == {"model.embed_tokens": ids}
    assert torch.equal(safetensors.torch.load_file(tmp_path / "out" / WEIGHTS_NAME)[key], saved[key])
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded, x), logits(model, x), rtol=0, atol=ATOL)
    with pytest.raises(AdapterFileError, match="trainable_token_indices: vLLM does not load trained token rows"):
        loratrf.export_peft(model, tmp_path / "served", for_serving="vllm")


def test_peft_token_rows_that_do_not_fit_are_refused(tmp_path):
    peft = pytest.importorskip("peft", reason="the `test` extra (peft) is not installed")
    pytest.importorskip("peft.tuners.trainable_tokens", reason="PEFT 0.15 added trainable_token_indices")
    base = decoder(tied=True)
    config = peft.LoraConfig(target_modules=["q_proj"], r=2, trainable_token_indices={"embed_tokens": [5, 9]})
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "peft")
    path = tmp_path / "peft" / WEIGHTS_NAME
    tensors = safetensors.torch.load_file(path)
    key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"
    safetensors.torch.save_file({**tensors, key: tensors[key][:1]}, path)
    model = copy.deepcopy(base)
    with pytest.raises(AdapterFileError, match=r"delta must be rows \(2, 32\); found torch.float32 \(1, 32\)"):
        loratrf.import_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    (tmp_path / "peft" / CONFIG_NAME).write_text(json.dumps({**config, "trainable_token_indices": {"embed": [5, 9]}}))
    with pytest.raises(AdapterFileError, match="indices names 'embed', which is the end of the name of no module"):
        loratrf.import_peft(model, tmp_path / "peft")
    (tmp_path / "peft" / CONFIG_NAME).write_text(json.dumps({**config, "trainable_token_indices": [5, 9]}))
    bare = torch.nn.Module()  # the same module names, without transformers' get_input_embeddings
    bare.model = copy.deepcopy(base.model)
    with pytest.raises(AdapterFileError, match=r"indices is a list, .* has no get_input_embeddings\(\)"):
        loratrf.import_peft(bare, tmp_path / "peft")
    assert not hasattr(model.model.embed_tokens, "token_rows")


# --- refusals (docs/errors.md) -----------------------------------------------------------------


def test_resizing_before_inject_works_and_after_inject_is_refused():
    model = decoder(tied=True)
    model.resize_token_embeddings(VOCAB + 2)  # the documented order: the new tokens' rows first
    loratrf.inject(model, trainable_tokens={EMBED: [VOCAB, VOCAB + 1]})
    assert logits(model).shape[-1] == VOCAB + 2
    model.resize_token_embeddings(VOCAB + 4)
    with pytest.raises(InjectionError, match=r"now has 68 token rows, but its trainable token rows were made .* 66"):
        logits(model)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(trainable_tokens={EMBED: [VOCAB]}), rf"ids \[{VOCAB}\] of 'model.embed_tokens' are not below its"),
        (dict(trainable_tokens={EMBED: [4, 4]}), "lists a token id more than once"),
        (dict(trainable_tokens={EMBED: []}), "needs a non-empty list of token ids"),
        (dict(trainable_tokens=[4, 5]), "maps embedding names to lists of token ids"),
        (dict(trainable_tokens={r".*q_proj": [4]}), "trainable token rows go on an nn.Embedding"),
        (dict(targets=[EMBED], trainable_tokens={EMBED: [4]}), "is a Embedding and a LoRA target"),
        (dict(targets=["lm_head"], trainable_tokens={EMBED: [4]}), "with 'lm_head.weight', a Linear and a LoRA target"),
        (dict(trainable=[EMBED], trainable_tokens={EMBED: [4]}), "is trainable whole, and 'model.embed_tokens' has"),
        (dict(trainable_tokens={EMBED: [4], r"model\.embed_.*": [5]}), "two trainable_tokens patterns match"),
    ],
)
def test_token_rows_loratrf_cannot_train_are_refused_before_anything_changes(options, match):
    model = decoder(tied=True)
    with pytest.raises(InjectionError, match=match):
        loratrf.inject(model, **options)
    assert not hasattr(model.model.embed_tokens, "token_rows") and not model.lm_head._forward_hooks


def test_lora_on_a_module_that_reads_token_rows_and_rows_added_twice_are_refused():
    model = decoder(tied=True)
    loratrf.inject(model, trainable_tokens={EMBED: [4]})
    with pytest.raises(InjectionError, match="'lm_head' reads trainable token rows"):
        loratrf.inject(model, targets=["lm_head"], adapter="b")
    with pytest.raises(InjectionError, match="already has trainable token rows of adapter 'default'"):
        loratrf.inject(model, trainable_tokens={EMBED: [5]})
    loratrf.merge(model)
    with pytest.raises(InjectionError, match="holds merged token rows"):
        loratrf.inject(model, trainable_tokens={EMBED: [5]}, adapter="b")


def test_merging_rows_into_a_weight_tied_after_inject_is_refused():
    model = decoder(tied=False)
    loratrf.inject(model, trainable_tokens={EMBED: [4]})
    model.lm_head.weight = model.model.embed_tokens.weight  # tied after inject: the head does not read the rows
    E = model.model.embed_tokens.weight.detach().clone()
    with pytest.raises(MergeError, match=r"weight is tied to 'lm_head.weight', which was tied after inject"):
        loratrf.merge(model)
    assert torch.equal(model.model.embed_tokens.weight, E)


def test_adapter_files_whose_token_rows_do_not_fit_are_refused(tmp_path):
    model = decoder(tied=True)
    loratrf.inject(model, trainable_tokens={EMBED: [4, 5]})
    path = tmp_path / "adapter.safetensors"
    loratrf.save_adapter(model, path)
    other = decoder(tied=True)
    loratrf.inject(other, trainable_tokens={EMBED: [6]})
    with pytest.raises(AdapterFileError, match=r"'model.embed_tokens' already has trainable rows \[6\], the file has"):
        loratrf.load_adapter(other, path)
    other.model.embed_tokens = torch.nn.Linear(2, 2)
    with pytest.raises(AdapterFileError, match=r"token rows of 'model.embed_tokens' \(the model has Linear there\)"):
        loratrf.load_adapter(other, path)
    loratrf.merge(model)
    with pytest.raises(MergeError, match="'model.embed_tokens' is merged"):
        loratrf.load_adapter(model, path)


def test_the_option_round_trips_and_summary_reset_and_copies_follow_the_rows():
    config = loratrf.InjectionConfig(trainable_tokens={EMBED: [4, 5]})
    assert loratrf.InjectionConfig.from_json(config.to_json()) == config
    base = decoder(tied=True)
    x = with_tokens([4, 5])
    model = copy.deepcopy(base)
    loratrf.inject(model, config, targets=[r".*q_proj"], rank=2)
    summary = loratrf.summary(model)
    assert summary.tokens == 2 * model.config.hidden_size and summary.trainable == summary.tokens + summary.lora
    set_rows(model, 7)
    twin = copy.deepcopy(model)  # its hooks read its own rows
    with torch.no_grad():
        rows_of(twin).zero_()
    assert not torch.equal(logits(twin, x), logits(model, x))
    zeroed = reference(base, [4, 5], torch.zeros(2, model.config.hidden_size))
    torch.testing.assert_close(logits(twin, x), logits(zeroed, x), rtol=0, atol=ATOL)
    loratrf.delete_adapter(twin, "default")  # removes the twin's hooks, not the original's
    assert model.model.embed_tokens._forward_hooks and model.lm_head._forward_hooks
    loratrf.reset_adapters(model)
    assert torch.equal(rows_of(model), base.model.embed_tokens.weight[[4, 5]])
    assert torch.equal(logits(model, x), logits(base, x))


def test_training_through_merged_rows_is_refused():
    model = decoder(tied=True)
    loratrf.inject(model, trainable_tokens={EMBED: [4]})
    loratrf.merge(model)
    model.train()
    loss = model(input_ids=with_tokens([4])).logits.sum()
    with pytest.raises(MergeError, match="backward through a merged LoRA layer"):
        loss.backward()


def test_adapters_with_token_rows_are_not_combined():
    model = decoder(tied=True)
    loratrf.inject(model, targets=[r".*q_proj"], trainable_tokens={EMBED: [4]})
    loratrf.inject(model, targets=[r".*q_proj"], adapter="b")
    with pytest.raises(AdapterError, match=r"combine adapter\(s\) \['default'\]: they hold trainable token rows"):
        loratrf.combine_adapters(model, {"default": 0.5, "b": 0.5}, name="ab")
    assert loratrf.walk.adapter_names(model) == ["default", "b"]
