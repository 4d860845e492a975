"""export_peft / import_peft against real PEFT: both directions compute the same outputs
(float32, 1e-5) on config-built BERT and GPT-2, with per-module ranks and alphas, rsLoRA and
GPT-2's Conv1D; and every refusal."""

from __future__ import annotations

import copy
import json
import re

import models
import pytest
import safetensors.torch
import torch
from hf_architectures import bert, encoder_config, gpt2, main_output, token_ids, transformers
from hypothesis import given
from hypothesis import strategies as st

import loratrf
from loratrf import AdapterFileError, LoRALinear
from loratrf.peft_format import CONFIG_NAME, WEIGHTS_NAME
from loratrf.walk import named_lora_layers

peft = pytest.importorskip("peft", reason="the `test` extra (peft) is not installed")

ATOL = 1e-5
BERT_LAYERS = r"encoder\.layer\.\d+\."


def randomise_lora(model, seed=1):
    """Random A and B in every LoRA layer, loratrf's or PEFT's (B starts at zero in both), and
    random positive DoRA magnitudes (loratrf's `magnitude`, PEFT's `lora_magnitude_vector`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
            elif ".lora." in name or "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def peft_layers(peft_model):
    """PEFT's LoRA layers, by module name in the base model."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def outputs(model, ids):
    model.eval()
    with torch.no_grad():
        return main_output(model(input_ids=ids))


def bert_with_lora(rslora=False, dora=False):
    """BERT with three LoRA groups of different ranks and alphas, randomised."""
    model = bert()
    same = dict(rslora=rslora, dora=dora)
    loratrf.inject(model, targets=[BERT_LAYERS + r"attention\.self\.query"], rank=4, alpha=8, **same)
    loratrf.inject(model, targets=[BERT_LAYERS + r"attention\.self\.value"], rank=2, alpha=5, **same)
    loratrf.inject(model, targets=[r"encoder\.layer\.1\.intermediate\.dense"], rank=3, alpha=3, **same)
    randomise_lora(model)
    return model


def base_copy(model_with_adapters):
    """The base model under the adapters, as a separate model."""
    return loratrf.unload(copy.deepcopy(model_with_adapters), merge=False, keep_filters=False)


@pytest.mark.parametrize("rslora, dora", [(False, False), (True, False), (False, True)], ids=["lora", "rslora", "dora"])
def test_export_loads_in_peft_with_per_module_ranks_and_alphas(tmp_path, rslora, dora):
    model = bert_with_lora(rslora, dora)
    base = base_copy(model)
    ids = token_ids()
    config = loratrf.export_peft(model, tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file() and json.loads((tmp_path / CONFIG_NAME).read_text()) == config
    assert (
        config["use_rslora"] is rslora and config["use_dora"] is dora and config["r"] == 4 and config["lora_alpha"] == 8
    )

    peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
    theirs = peft_layers(peft_model)
    assert theirs.keys() == dict(named_lora_layers(model)).keys()
    for name, layer in named_lora_layers(model):
        assert theirs[name].r["default"] == layer.lora.rank
        assert theirs[name].scaling["default"] == pytest.approx(layer.lora.scale, rel=1e-12)
    torch.testing.assert_close(outputs(peft_model, ids), outputs(model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_export_of_gpt2_conv1d_and_a_linear_head_loads_in_peft(tmp_path, dora):
    model = gpt2()
    loratrf.inject(model, targets=[r"transformer\.h\.\d+\.(attn\.c_attn|mlp\.c_proj)"], rank=4, alpha=16, dora=dora)
    loratrf.inject(model, targets=[r"transformer\.h\.0\.attn\.c_proj", "lm_head"], rank=2, alpha=2, dora=dora)
    randomise_lora(model)
    base = base_copy(model)
    config = loratrf.export_peft(model, tmp_path)
    assert config["fan_in_fan_out"] is True
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
    ids = token_ids()
    torch.testing.assert_close(outputs(peft_model, ids), outputs(model, ids), atol=ATOL, rtol=0)


def peft_adapter(build, directory, config):
    """`(base, peft_model)`: a PEFT adapter on a copy of `build()`, trained-looking (random A
    and B), saved to `directory`."""
    base = build()
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    randomise_lora(peft_model)
    peft_model.save_pretrained(directory)
    return base, peft_model


def peft_bert(directory, **options):
    return peft_adapter(bert, directory, peft.LoraConfig(**options))


PEFT_CONFIGS = {
    "plain": dict(target_modules=["query", "value"], r=4, lora_alpha=8),
    "patterns": dict(
        target_modules=["query", "value", "dense"],
        r=4,
        lora_alpha=8,
        rank_pattern={"value": 2, "encoder.layer.1.intermediate.dense": 6},
        alpha_pattern={r"layer\.0\.attention\.self\.query": 3, "output.dense": 5},
    ),
    "rslora": dict(target_modules=["key", "dense"], r=4, lora_alpha=6, use_rslora=True, rank_pattern={"key": 2}),
    "dora": dict(target_modules=["query", "value"], r=4, lora_alpha=8, use_dora=True, rank_pattern={"value": 2}),
    "regex-targets": dict(target_modules=r".*\.attention\.self\.(query|key)", r=3, lora_alpha=4, lora_dropout=0.1),
}


@pytest.mark.parametrize("options", PEFT_CONFIGS.values(), ids=PEFT_CONFIGS.keys())
def test_import_computes_what_peft_computes(tmp_path, options):
    model, peft_model = peft_bert(tmp_path, **options)
    names = loratrf.import_peft(model, tmp_path)

    theirs = peft_layers(peft_model)
    assert sorted(names) == sorted(theirs)
    for name, layer in named_lora_layers(model):
        assert layer.lora.rank == theirs[name].r["default"]
        assert layer.lora.scale == pytest.approx(theirs[name].scaling["default"], rel=1e-12)
        assert layer.dropout == options.get("lora_dropout", 0.0)
        assert layer.dora is options.get("use_dora", False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(loratrf.adapter_state_dict(model))  # the base is frozen
    ids = token_ids()
    torch.testing.assert_close(outputs(model, ids), outputs(peft_model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_import_of_a_gpt2_conv1d_adapter(tmp_path, dora):
    config = peft.LoraConfig(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=8, fan_in_fan_out=True, use_dora=dora)
    model, peft_model = peft_adapter(gpt2, tmp_path, config)
    loratrf.import_peft(model, tmp_path)
    assert all(layer.fan_in_fan_out for _, layer in named_lora_layers(model))
    ids = token_ids()
    torch.testing.assert_close(outputs(model, ids), outputs(peft_model, ids), atol=ATOL, rtol=0)


def test_round_trip_keeps_every_tensor_and_filters_can_be_added_after_import(tmp_path):
    model = bert_with_lora(rslora=True)
    loratrf.export_peft(model, tmp_path)
    fresh = base_copy(model)
    loratrf.import_peft(fresh, tmp_path)
    assert loratrf.adapter_state_dict(fresh).keys() == loratrf.adapter_state_dict(model).keys()
    for key, tensor in loratrf.adapter_state_dict(model).items():
        assert torch.equal(loratrf.adapter_state_dict(fresh)[key], tensor), key
    assert {n: layer.spec for n, layer in named_lora_layers(fresh)} == {
        n: layer.spec for n, layer in named_lora_layers(model)
    }
    ids = token_ids()
    before = outputs(fresh, ids)
    loratrf.inject(fresh, filters=[r"encoder\.layer\.\d+"])  # filters start as the identity
    torch.testing.assert_close(outputs(fresh, ids), before, atol=ATOL, rtol=0)


def bert_classifier(num_labels=3):
    return transformers.BertForSequenceClassification(encoder_config(transformers.BertConfig, num_labels=num_labels))


def test_export_writes_trainable_modules_as_modules_to_save(tmp_path):
    model = bert_classifier()
    base = copy.deepcopy(model)
    loratrf.inject(model, targets=[r".*\.query"], trainable=["classifier", r"bert\.embeddings\.LayerNorm"])
    randomise_lora(model)
    with torch.no_grad():  # trained head and layer norm
        for name, p in model.named_parameters():
            if name.startswith(("classifier.", "bert.embeddings.LayerNorm.")):
                p.add_(torch.randn_like(p))
    config = loratrf.export_peft(model, tmp_path)
    assert config["modules_to_save"] == ["bert.embeddings.LayerNorm", "classifier"]
    saved = safetensors.torch.load_file(tmp_path / WEIGHTS_NAME)
    for key in ("bert.embeddings.LayerNorm.weight", "bert.embeddings.LayerNorm.bias", "classifier.weight"):
        assert torch.equal(saved[f"base_model.model.{key}"], model.state_dict()[key])

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ids = token_ids()
    torch.testing.assert_close(outputs(peft_model, ids), outputs(model, ids), atol=ATOL, rtol=0)
    lora_only = loratrf.export_peft(model, tmp_path / "lora-only", lora_only=True)
    assert lora_only["modules_to_save"] is None  # PEFT then runs the base's head
    assert not torch.allclose(outputs(base, ids), outputs(model, ids), atol=1e-3)


def test_modules_to_save_travel_from_peft_and_back(tmp_path):
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=2, lora_alpha=4)
    base, peft_model = peft_adapter(bert_classifier, tmp_path / "peft", config)
    assert peft_model.peft_config["default"].modules_to_save == ["classifier", "score"]  # PEFT's SEQ_CLS default
    with torch.no_grad():  # PEFT's own copy of the head, trained
        for name, p in peft_model.named_parameters():
            if ".modules_to_save.default." in name:
                p.add_(torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    names = loratrf.import_peft(model, tmp_path / "peft")
    assert sorted(names) == sorted(peft_layers(peft_model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable - set(loratrf.adapter_state_dict(model, "default")) == set()
    assert {"classifier.weight", "classifier.bias"} <= trainable
    ids = token_ids()
    torch.testing.assert_close(outputs(model, ids), outputs(peft_model, ids), atol=ATOL, rtol=0)
    assert not torch.allclose(outputs(base, ids), outputs(model, ids), atol=1e-3)

    back = loratrf.export_peft(model, tmp_path / "back")
    assert back["modules_to_save"] == ["classifier"]
    theirs, ours = (safetensors.torch.load_file(tmp_path / d / WEIGHTS_NAME) for d in ("peft", "back"))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    torch.testing.assert_close(outputs(reloaded, ids), outputs(model, ids), atol=ATOL, rtol=0)


def test_import_refuses_modules_to_save_that_do_not_fit(tmp_path):
    config = peft.LoraConfig(task_type="SEQ_CLS", target_modules=["query"], r=2)
    peft_adapter(bert_classifier, tmp_path, config)
    assert_refused_untouched(
        bert_classifier(num_labels=2),
        tmp_path,
        r"'base_model\.model\.classifier\.weight': shape \(3, 32\), where this model's module has \(2, 32\)",
    )
    assert_refused_untouched(  # the model without its head
        transformers.BertModel(bert_classifier().config, add_pooling_layer=False),
        tmp_path,
        r"'base_model\.model\.classifier\.bias' is no LoRA tensor, and no module of this model that "
        r"modules_to_save \['classifier', 'score'\] names holds it",
    )


def test_export_of_a_model_with_filters_needs_lora_only(tmp_path):
    model = bert_classifier()
    loratrf.inject(model, targets=[r".*\.query"], filters=[r"bert\.encoder\.layer\.\d+"], trainable=["classifier"])
    with pytest.raises(
        AdapterFileError, match=r"cannot hold the model's task-aware filters \(on 'bert\.encoder\.layer\.0'"
    ):
        loratrf.export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written

    randomise_lora(model)
    loratrf.export_peft(model, tmp_path, lora_only=True)
    lora_alone = loratrf.unload(copy.deepcopy(model), merge=True, keep_filters=False)
    peft_model = peft.PeftModel.from_pretrained(base_copy(model), tmp_path)
    ids = token_ids()
    torch.testing.assert_close(outputs(peft_model, ids), outputs(lora_alone, ids), atol=ATOL, rtol=0)


def test_export_refuses_trainable_parameters_peft_cannot_save(tmp_path):
    model = Net()
    loratrf.inject(model, targets=[r"block\.out"], trainable=["fc"])
    with pytest.raises(AdapterFileError, match=r"PEFT would also save \['block\.fc'\] for the entry 'fc'"):
        loratrf.export_peft(model, tmp_path)
    model = Net()
    loratrf.inject(model, targets=[r"block\.out"], trainable=[r"block\.fc"])
    loratrf.inject(model, filters=[r"block\.fc"], adapter="b", trainable=[r"block\.fc"])  # another adapter's filter
    with pytest.raises(
        AdapterFileError, match=r"module 'block\.fc' holds the adapter module 'block\.fc\.task_filters\.b'"
    ):
        loratrf.export_peft(model, tmp_path)
    model = bert()
    loratrf.inject(model, targets=[r".*\.query"])
    model.register_parameter("temperature", torch.nn.Parameter(torch.ones(())))
    with pytest.raises(AdapterFileError, match=r"not the model's own trainable parameters \['temperature'\]"):
        loratrf.export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())


def test_export_refusals(tmp_path):
    with pytest.raises(AdapterFileError, match="holds no LoRA layers to export"):
        loratrf.export_peft(bert(), tmp_path)
    model = bert()
    loratrf.inject(model, targets=[r".*\.query"], dropout=0.1)
    loratrf.inject(model, targets=[r".*\.value"])
    with pytest.raises(AdapterFileError, match=r"different dropouts \[0\.0, 0\.1\].*one lora_dropout"):
        loratrf.export_peft(model, tmp_path)
    model = bert()
    loratrf.inject(model, targets=[r".*\.query"], rslora=True)
    loratrf.inject(model, targets=[r".*\.value"])
    with pytest.raises(AdapterFileError, match="use_rslora holds for all"):
        loratrf.export_peft(model, tmp_path)
    model = bert()
    loratrf.inject(model, targets=[r".*\.query"], dora=True)
    loratrf.inject(model, targets=[r".*\.value"])
    with pytest.raises(AdapterFileError, match="some LoRA layers are DoRA layers and others plain LoRA"):
        loratrf.export_peft(model, tmp_path)
    with torch.device("meta"):
        model = bert()
    loratrf.inject(model, targets=[r".*\.query"])
    with pytest.raises(AdapterFileError, match="is on the meta device and holds no values"):
        loratrf.export_peft(model, tmp_path)
    assert not any(tmp_path.iterdir())


def edit_config(directory, **changes):
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def assert_refused_untouched(model, directory, match):
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterFileError, match=match):
        loratrf.import_peft(model, directory)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())


def test_import_refuses_other_methods(tmp_path):  # LoRA on embeddings: test_embedding_peft.py
    peft_adapter(bert, tmp_path / "loha", peft.LoHaConfig(target_modules=["query"]))
    assert_refused_untouched(
        bert(), tmp_path / "loha", "describes a LOHA adapter; loratrf reads PEFT's LoRA adapters only"
    )


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(bias="all"), r"bias='all' \(PEFT trains the base layers' biases"),
        (dict(lora_bias=True), r"lora_bias=True \(PEFT trains a bias"),
        (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' \(PEFT's initialisations such as PiSSA"),
        (dict(layer_replication=[[0, 1]]), r"layer_replication=\[\[0, 1\]\] \(an option loratrf does not represent\)"),
        (
            dict(rank_pattern={"query": 2}),
            r"'encoder\.layer\.0\.attention\.self\.query': lora_A \(4, 32\).*rank 2 need",
        ),
        (dict(target_modules=["value"]), r"LoRA tensors for 'encoder\.layer\.0\.attention\.self\.query', which the"),
        (dict(rank_pattern={"(": 2}), r"'\(' is not a valid regular expression"),
        (dict(lora_dropout=1.5), r"adapter_config\.json: dropout must be a probability in \[0, 1\), got 1\.5$"),
        (dict(use_dora=True), r"'encoder\.layer\.0\.attention\.self\.query': the config says use_dora, so it needs"),
        (dict(lora_alpha=0), r"'encoder\.layer\.0\.attention\.self\.query': alpha must be a finite number > 0, got 0"),
        (dict(modules_to_save="pooler"), r"modules_to_save must be a list of module names"),
        (
            dict(modules_to_save=["attention.self"]),
            r"picks 'encoder\.layer\.0\.attention\.self', which is or holds 'encoder\.layer\.0\.attention\.self\.query'",
        ),
    ],
    ids=[
        "bias",
        "lora_bias",
        "pissa",
        "unknown-option",
        "rank-mismatch",
        "untargeted",
        "bad-regex",
        "bad-dropout",
        "dora-without-magnitude",
        "bad-alpha",
        "modules-to-save-not-a-list",
        "modules-to-save-holding-lora",
    ],
)
def test_import_refuses_configs_it_cannot_represent(tmp_path, changes, match):
    peft_bert(tmp_path, target_modules=["query"], r=4)
    edit_config(tmp_path, **changes)
    assert_refused_untouched(bert(), tmp_path, match)


def test_import_refuses_a_dora_magnitude_the_config_does_not_name(tmp_path):
    peft_bert(tmp_path, target_modules=["query"], use_dora=True)
    edit_config(tmp_path, use_dora=False)
    assert_refused_untouched(
        bert(), tmp_path, r"has a lora_magnitude_vector \(DoRA's\), but the config does not say use_dora"
    )


def test_import_refuses_damaged_missing_and_foreign_files(tmp_path):
    assert_refused_untouched(bert(), tmp_path / "nowhere", "no PEFT adapter config at .*no such folder")
    model = bert_with_lora()
    loratrf.export_peft(model, tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    data = weights.read_bytes()

    weights.write_bytes(data[: len(data) // 2])
    assert_refused_untouched(bert(), tmp_path, "is not a readable PEFT adapter weights file")
    weights.unlink()
    assert_refused_untouched(bert(), tmp_path, "no PEFT adapter weights in .*: it holds no adapter_model.safetensors")
    loratrf.save_adapter(model, weights)  # a loratrf adapter file under PEFT's name
    assert_refused_untouched(
        bert(), tmp_path, r"'encoder\.layer\.0\.attention\.self\.query\.lora\.U' \(not a PEFT LoRA"
    )
    tensors = safetensors.torch.load(data)
    safetensors.torch.save_file(
        {k: t for k, t in tensors.items() if "layer.0.attention.self.query.lora_B" not in k}, weights
    )
    assert_refused_untouched(bert(), tmp_path, r"encoder\.layer\.0\.attention\.self\.query\.lora_B\.weight is missing")
    layer_norm = {k.replace("layer.0.attention.self.query", "layer.0.output.LayerNorm"): t for k, t in tensors.items()}
    safetensors.torch.save_file(layer_norm, weights)
    assert_refused_untouched(
        bert(), tmp_path, r"'encoder\.layer\.0\.output\.LayerNorm' is a LayerNorm; loratrf's LoRA targets"
    )
    weights.write_bytes(data)

    config = (tmp_path / CONFIG_NAME).read_text()
    (tmp_path / CONFIG_NAME).write_text(config[:40])
    assert_refused_untouched(bert(), tmp_path, "adapter_config.json is not a readable JSON file")
    (tmp_path / CONFIG_NAME).write_text('{"hello": 1}')
    assert_refused_untouched(bert(), tmp_path, "is not a PEFT adapter config")
    (tmp_path / CONFIG_NAME).unlink()
    assert_refused_untouched(
        bert(), tmp_path, r"no PEFT adapter config at .* \(it holds \['adapter_model.safetensors'\]\)"
    )


def test_import_refuses_an_adapter_from_another_model_or_a_model_already_adapted(tmp_path):
    loratrf.export_peft(bert_with_lora(), tmp_path)
    assert_refused_untouched(
        gpt2(), tmp_path, r"the model has no module named 'encoder\.layer\.0\.attention\.self\.query'"
    )
    adapted = bert()
    loratrf.inject(adapted, targets=[r".*\.query"])
    with pytest.raises(AdapterFileError, match="already has a LoRA adapter named 'default'; import under another name"):
        loratrf.import_peft(adapted, tmp_path)


class Net(torch.nn.Module):
    """Module names where one is a dot-suffix of another: 'fc' and 'block.fc'."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.block = torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 8), "out": torch.nn.Linear(8, 4)})

    def forward(self, x):
        return self.block["out"](torch.relu(self.block["fc"](torch.relu(self.fc(x)))))


def test_export_names_modules_exactly_where_a_name_is_a_suffix_of_another(tmp_path):
    model = Net()
    loratrf.inject(model, targets=["fc"], rank=2, alpha=4)
    loratrf.inject(model, targets=[r"block\.out"], rank=4, alpha=8)
    randomise_lora(model)
    config = loratrf.export_peft(model, tmp_path)
    assert config["target_modules"] == r"fc|block\.out"  # a list entry 'fc' would also adapt 'block.fc'
    peft_model = peft.PeftModel.from_pretrained(base_copy(model), tmp_path)
    assert peft_layers(peft_model).keys() == {"fc", "block.out"}
    x = torch.randn(3, 8)
    torch.testing.assert_close(peft_model(x), model(x), atol=ATOL, rtol=0)

    both = Net()
    loratrf.inject(both, targets=["fc"], rank=2, alpha=4)
    loratrf.inject(both, targets=[r"block\.(fc|out)"], rank=4, alpha=8)
    with pytest.raises(AdapterFileError, match="cannot give each of these LoRA layers its own rank and alpha"):
        loratrf.export_peft(both, tmp_path / "both")


SMALL_LINEARS = ["layers.0.query", "layers.0.value", "layers.0.up", "layers.1.key", "layers.1.down"]
SMALL_TRAINABLE = ["head", "layers.0.norm", "layers.1.norm"]


@given(
    groups=st.lists(
        st.tuples(
            st.lists(st.sampled_from(SMALL_LINEARS), unique=True, min_size=1, max_size=2),
            st.integers(1, 4),
            st.sampled_from([1.0, 3.0, 16.0]),
        ),
        min_size=1,
        max_size=3,
    ),
    trainable=st.lists(st.sampled_from(SMALL_TRAINABLE), unique=True, max_size=2),
    rslora=st.booleans(),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_export_then_import_computes_what_peft_computes(tmp_path_factory, groups, trainable, rslora, dora, seed):
    """Any mix of ranks, alphas and trainable modules: PEFT computes what the exported model
    computes, and importing the folder into the base gives back every tensor."""
    torch.manual_seed(seed)
    model = models.Net()
    base = copy.deepcopy(model)
    adapted: set[str] = set()
    for names, rank, alpha in groups:
        names = [n for n in names if n not in adapted]  # a layer gets one adapter
        if names:
            same = dict(rslora=rslora, dora=dora, trainable=[re.escape(m) for m in trainable])
            loratrf.inject(model, targets=[re.escape(n) for n in names], rank=rank, alpha=alpha, **same)
            adapted.update(names)
    randomise_lora(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[0] in trainable:
                p.add_(torch.randn_like(p))
    directory = tmp_path_factory.mktemp("peft")
    config = loratrf.export_peft(model, directory)
    assert config["modules_to_save"] == (sorted(trainable) or None)

    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(seed))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids), model(ids), atol=ATOL, rtol=0)
    fresh = copy.deepcopy(base)
    loratrf.import_peft(fresh, directory)
    ours, theirs = loratrf.adapter_state_dict(model), loratrf.adapter_state_dict(fresh)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), model(ids), atol=0, rtol=0)
