"""Refused inputs that the other test files do not already cover; docs/errors.md lists every
refusal with the test behind it. Each refusal must name the problem, be one of loratrf's
errors, and leave the model (or file) as it was."""

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import loratrf
from loratrf import AdapterFileError, InjectionError, LoRALinear, LoRATRFError, LowRankTransform, TaskAwareFilter
from adapter_edits import rewrite
from loratrf.presets import preset
from models import FILTERS, TARGETS, Net, randomise_adapters

ids = torch.randint(0, 20, (2, 5))


def state(model):
    """Module structure, parameters and flags: what a refused call must leave alone."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    )


def assert_same_state(model, before):
    after = state(model)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][n][0], v) and after[1][n][1] == g for n, (v, g) in before[1].items())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(filters=FILTERS, filter_dim=0), "filter_dim must be an integer >= 1"),
        (dict(filters=FILTERS, filter_alpha=float("nan")), "filter_alpha must be a finite number > 0"),
        (dict(targets=TARGETS, alpha="16"), "alpha must be a finite number > 0"),
        (dict(targets=TARGETS, init="xavier"), "init must be one of"),
        (dict(filters=FILTERS, task_init="zeros"), "task_init must be one of"),
    ],
)
def test_more_bad_options_are_refused_before_anything_changes(kwargs, message):
    model = Net()
    before = state(model)
    with pytest.raises(InjectionError, match=message):
        loratrf.inject(model, **kwargs)
    assert_same_state(model, before)


def test_a_model_without_submodules_says_so():
    with pytest.raises(InjectionError, match="matches no module name. The model has no submodules"):
        loratrf.inject(nn.Linear(4, 4), targets=["weight"])


def test_a_target_whose_forward_was_patched_on_the_instance_is_refused():
    model = Net()
    model.layers[0].value.forward = lambda x: x
    before = state(model)
    with pytest.raises(InjectionError, match="forward replaced on the instance"):
        loratrf.inject(model, targets=TARGETS)
    assert_same_state(model, before)


def test_a_filter_host_with_a_task_filter_attribute_is_refused():
    model = Net()
    model.layers[0].task_filter = "mine"
    with pytest.raises(InjectionError, match="already has an attribute named 'task_filter'"):
        loratrf.inject(model, filters=FILTERS)
    assert model.layers[0].task_filter == "mine" and not any(isinstance(m, TaskAwareFilter) for m in model.modules())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: preset("bertt"), r"unknown architecture 'bertt'; known: \['bert', 'deberta'"),
        (lambda: preset("bert", ("v", "f3")), r"bert has no matrices \['f3'\]; it has"),
        (lambda: preset("bert", trainabel=["classifier"]), r"unknown InjectionConfig option\(s\) \['trainabel'\]"),
    ],
)
def test_bad_preset_arguments_are_refused(call, message):
    with pytest.raises(InjectionError, match=message):
        call()


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: LowRankTransform(4, 4, rank=0), "rank must be an integer >= 1"),
        (lambda: LowRankTransform(4, 4, init="xavier"), "init must be one of"),
        (lambda: LoRALinear(4, 4, dropout=1.0), r"dropout must be a probability in \[0, 1\)"),
        (lambda: TaskAwareFilter(4, similarity="l2"), "similarity must be one of"),
        (lambda: TaskAwareFilter(4, task_init="zeros"), "task_init must be one of"),
    ],
)
def test_module_constructors_refuse_bad_options_with_loratrf_errors(build, message):
    with pytest.raises(InjectionError, match=message):
        build()


def test_a_lora_layer_given_the_wrong_width_fails_as_its_base_layer_does():
    """The base map runs first, so a wrong input width raises PyTorch's own shape error, the
    one the plain layer raises, before the adapter is touched."""
    base = nn.Linear(4, 3)
    layer = LoRALinear.from_linear(nn.Linear(4, 3), rank=2)
    x = torch.randn(2, 5)
    with pytest.raises(RuntimeError) as plain:
        base(x)
    with pytest.raises(RuntimeError) as adapted:
        layer(x)
    assert str(adapted.value) == str(plain.value) and "shapes cannot be multiplied" in str(plain.value)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, p: loratrf.inject(m, targets=TARGETS),
        lambda m, p: loratrf.merge(m),
        lambda m, p: loratrf.unmerge(m),
        lambda m, p: loratrf.unload(m),
        lambda m, p: loratrf.reset_adapters(m),
        lambda m, p: loratrf.summary(m),
        lambda m, p: loratrf.adapter_state_dict(m),
        lambda m, p: loratrf.save_adapter(m, p),
        lambda m, p: loratrf.load_adapter(m, p),
    ],
)
def test_a_model_that_is_not_a_module_is_named(call, tmp_path):
    with pytest.raises(InjectionError, match="expected the model, a torch.nn.Module; got dict"):
        call({"weight": torch.zeros(2)}, tmp_path / "a.pt")


def trained_and_saved(path, **options):
    torch.manual_seed(0)
    model = Net(d=16)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, **options)
    randomise_adapters(model)
    loratrf.save_adapter(model, path)
    return model, base_state


def fresh_base(base_state):
    model = Net(d=16)
    model.load_state_dict(base_state)
    return model


def test_loading_over_a_different_filter_is_refused(tmp_path):
    _, base_state = trained_and_saved(tmp_path / "a.pt")
    other = fresh_base(base_state)
    loratrf.inject(other, filters=FILTERS, filter_rank=2)
    before = state(other)
    with pytest.raises(AdapterFileError, match="'layers.0' already holds a different filter"):
        loratrf.load_adapter(other, tmp_path / "a.pt")
    assert_same_state(other, before)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda plan: plan["filters"].update({"layers.7": plan["filters"]["layers.0"]}), r"filter host 'layers\.7'"),
        (lambda plan: plan["trainable"].append("head.scale"), r"trainable parameter 'head\.scale' \(no such"),
        (
            lambda plan: plan["lora"].update({"layers.0.norm": plan["lora"]["layers.0.up"]}),
            r"'layers\.0\.norm' \(the model has LayerNorm",
        ),
    ],
)
def test_files_describing_modules_this_model_lacks_are_refused(tmp_path, edit, message):
    path = tmp_path / "a.safetensors"
    _, base_state = trained_and_saved(path)

    def edit_plan(metadata, tensors):
        plan = json.loads(metadata["plan"])
        edit(plan)
        metadata["plan"] = json.dumps(plan)

    rewrite(path, edit_plan)
    other = fresh_base(base_state)
    before = state(other)
    with pytest.raises(AdapterFileError, match=message):
        loratrf.load_adapter(other, path)
    assert_same_state(other, before)


def test_saving_into_a_missing_folder_names_it(tmp_path):
    model, _ = trained_and_saved(tmp_path / "a.pt")
    with pytest.raises(AdapterFileError, match="the folder .*missing does not exist"):
        loratrf.save_adapter(model, tmp_path / "missing" / "a.pt")


def test_every_refusal_is_a_loratrf_error_and_a_builtin_one():
    """Callers can catch loratrf's errors as a group, or as the builtin kind each one is."""
    assert issubclass(InjectionError, ValueError) and issubclass(AdapterFileError, ValueError)
    assert issubclass(loratrf.MergeError, RuntimeError) and issubclass(loratrf.FilterOutputError, ValueError)
    errors = (InjectionError, AdapterFileError, loratrf.MergeError, loratrf.FilterOutputError)
    assert all(issubclass(e, LoRATRFError) for e in errors)


def test_every_test_docs_errors_md_names_exists():
    tests = Path(__file__).parent
    named = re.findall(r"(test_\w+\.py)::(test_\w+)", (tests.parent / "docs" / "errors.md").read_text())
    assert len(named) > 40
    missing = [f"{f}::{t}" for f, t in named if not re.search(rf"^def {t}\(", (tests / f).read_text(), re.M)]
    assert not missing
