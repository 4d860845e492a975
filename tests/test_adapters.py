"""Several adapters in one model (docs/adapters.md): switching, one adapter per row of a batch,
saving and loading under names, deleting, and the exact weighted combination of LoRA adapters.
Whole-model comparisons run in float64 (float32 sums round differently across CPUs)."""

import copy
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loratrf
from loratrf import AdapterError, LoRALinear, MergeError
from loratrf.filter import filter_of
from models import FILTERS, TARGETS, Net, randomise_adapters
from reference import lora_reference

ids = torch.randint(0, 20, (4, 5))
NAMES = ["default", "b", "c", "d"]


def adapted(dtype=torch.float64, seed=0):
    """Net with four adapters, random as after training: "default" (LoRA and filters), "b" (LoRA
    and filters of another rank), "c" (DoRA on the attention values only), "d" (LoRA on `up`)."""
    torch.manual_seed(seed)
    model = Net().to(dtype)
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, rank=2)
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, rank=3, gate="affine", adapter="b")
    loratrf.inject(model, targets=[r"layers\.\d+\.value"], dora=True, adapter="c")
    loratrf.inject(model, targets=[r"layers\.\d+\.up"], adapter="d")
    randomise_adapters(model, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear) and layer.parts("c") is not None:
                layer.parts("c").magnitude.mul_(1.5)
    return model.eval()


def alone(model, name, x):
    loratrf.set_adapter(model, name)
    return model(x)


def test_the_default_adapter_keeps_its_keys_and_a_new_one_does_not_run_until_chosen():
    single = Net()
    loratrf.inject(single, targets=TARGETS, filters=FILTERS)
    model = adapted()
    default_keys = {k for k in model.state_dict() if ".adapters." not in k and ".task_filters." not in k}
    assert default_keys == set(single.state_dict())
    assert "layers.0.value.adapters.b.lora.U" in model.state_dict()
    assert "layers.0.task_filters.b.task_vector" in model.state_dict()
    loratrf.set_adapter(model, "default")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in loratrf.walk.named_adapter_parameters(model, "default")
    }
    # the first adapter of a fresh model runs; a later one is added beside it, inactive
    fresh = Net()
    loratrf.inject(fresh, targets=TARGETS, adapter="x")
    loratrf.inject(fresh, targets=TARGETS, adapter="y")
    assert fresh.layers[0].value.active_adapter == "x" and fresh.layers[0].value.lora is None
    assert not fresh.layers[0].value.parts("y").lora.U.requires_grad


def test_switching_is_exact_and_none_is_the_base_model():
    torch.manual_seed(0)
    base = Net().double().eval()
    expected = base(ids)
    model = copy.deepcopy(base)
    loratrf.inject(model, targets=TARGETS, filters=FILTERS)
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, adapter="b")
    randomise_adapters(model)
    a = alone(model, "default", ids)
    b = alone(model, "b", ids)
    assert not torch.allclose(a, b)
    assert torch.equal(alone(model, "default", ids), a) and torch.equal(alone(model, "b", ids), b)
    assert torch.equal(alone(model, None, ids), expected)
    assert not any(p.requires_grad for p in model.parameters())


@given(order=st.lists(st.sampled_from([None, *NAMES]), min_size=1, max_size=8), seed=st.integers(0, 3))
def test_any_sequence_of_switches_is_exact(order, seed):
    """Whatever came before, adapter `name` computes bitwise what it computed the first time it
    ran, and that is what the base model with that adapter alone computes (from its file); None
    computes the base model exactly; only the active adapter's tensors train."""
    torch.manual_seed(seed)
    base = Net().double().eval()
    model = adapted(seed=seed)
    seen = {None: base(ids)}
    for name in order:
        out = alone(model, name, ids)
        if name not in seen:
            with tempfile.TemporaryDirectory() as folder:
                loratrf.save_adapter(model, Path(folder) / "a.safetensors", adapter=name)
                single = copy.deepcopy(base)
                loratrf.load_adapter(single, Path(folder) / "a.safetensors")
            torch.testing.assert_close(out, single(ids), rtol=1e-12, atol=1e-12)
        assert torch.equal(out, seen.setdefault(name, out)), name
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == ({n for n, _ in loratrf.walk.named_adapter_parameters(model, name)} if name else set())


def test_only_the_active_adapter_trains_and_trainable_base_parameters_stay():
    model = Net()
    loratrf.inject(model, targets=TARGETS, trainable=["head"])
    loratrf.inject(model, targets=TARGETS, trainable=["head"], adapter="b")  # each inject sets what trains
    for active in ("b", None, "default"):
        loratrf.set_adapter(model, active)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        expected = {n for n, _ in loratrf.walk.named_adapter_parameters(model, active)} if active else set()
        assert trainable == expected | {"head.weight", "head.bias"}


@given(names=st.lists(st.sampled_from([None, *NAMES]), min_size=1, max_size=6), seed=st.integers(0, 3))
def test_a_mixed_batch_computes_each_row_as_it_computes_alone(names, seed):
    model = adapted(seed=seed)
    x = torch.randint(0, 20, (len(names), 5), generator=torch.Generator().manual_seed(seed))
    expected = torch.stack([alone(model, name, x[i : i + 1])[0] for i, name in enumerate(names)])
    loratrf.set_adapter(model, "b")
    with loratrf.use_adapters(model, names):
        mixed = model(x)
    torch.testing.assert_close(mixed, expected, rtol=1e-12, atol=1e-12)
    assert all(layer.active_adapter == "b" and layer.rows is None for _, layer in loratrf.walk.named_lora_layers(model))
    assert torch.equal(model(x), alone(model, "b", x))


def test_a_mixed_batch_gives_each_adapter_the_gradient_of_its_own_rows():
    model = adapted().train()  # no dropout: train mode computes as eval mode
    names = ["b", "default", "b", None, "c"]
    x = torch.randint(0, 20, (5, 5))
    weights = torch.randn(5, 3, dtype=torch.float64)
    with loratrf.use_adapters(model, names):
        (model(x) * weights).sum().backward()
    mixed = {n: p.grad.clone() for n, p in loratrf.walk.named_adapter_parameters(model) if p.grad is not None}
    for n in ("b", "default", "c"):
        model.zero_grad()
        rows = [i for i, m in enumerate(names) if m == n]
        loratrf.set_adapter(model, n)
        (model(x[rows]) * weights[rows]).sum().backward()
        for key, p in loratrf.walk.named_adapter_parameters(model, n):
            torch.testing.assert_close(mixed[key], p.grad, rtol=1e-10, atol=1e-12)
    assert {k for k in mixed} == {
        k for n in ("b", "default", "c") for k, _ in loratrf.walk.named_adapter_parameters(model, n)
    }


def test_a_mixed_batch_of_a_config_built_bert_with_two_adapters_and_filters():
    from hf_architectures import bert, token_ids

    torch.manual_seed(0)
    model = bert().double().eval()
    preset = loratrf.presets.preset("bert", ("v", "f1"), filters=True)
    loratrf.inject(model, preset, rank=2)
    loratrf.inject(model, preset, rank=4, adapter="other")
    randomise_adapters(model)
    x = token_ids(batch=3)
    names = ["other", None, "default"]
    expected = torch.stack([alone(model, n, x[i : i + 1]).last_hidden_state[0] for i, n in enumerate(names)])
    with loratrf.use_adapters(model, names):
        mixed = model(input_ids=x).last_hidden_state
    torch.testing.assert_close(mixed, expected, rtol=1e-10, atol=1e-10)


@given(
    weights=st.dictionaries(
        st.sampled_from(["default", "d", "e"]), st.floats(-2, 2, allow_nan=False), min_size=1, max_size=3
    )
)
def test_a_combination_is_the_weighted_sum_of_the_updates(weights):
    torch.manual_seed(0)
    model = Net().double().eval()
    loratrf.inject(model, targets=TARGETS, rank=2, alpha=3.0)
    loratrf.inject(model, targets=[r"layers\.\d+\.up"], adapter="d", rank=3, rslora=True)
    loratrf.inject(model, targets=[r"layers\.\d+\.(up|down)"], adapter="e", rank=1, alpha=5.0)
    randomise_adapters(model)
    loratrf.combine_adapters(model, weights, name="sum")
    assert model.layers[0].up.active_adapter == "default"  # the active adapter stays
    loratrf.set_adapter(model, "sum")
    for _, layer in loratrf.walk.named_lora_layers(model):
        terms = [(w, layer.parts(n).lora) for n, w in weights.items() if layer.parts(n) is not None]
        if not terms:
            assert layer.parts("sum") is None
            continue
        # W0 + Σ w_i s_i B_i A_i, with B = Vᵀ [out, r] and A = Uᵀ [r, in]
        expected = layer.weight + sum(w * t.scale * (t.V.T @ t.U.T) for w, t in terms)
        torch.testing.assert_close(layer.merged_weight(), expected, rtol=1e-12, atol=1e-12)
        x = torch.randn(3, layer.in_features, dtype=torch.float64)
        combo = layer.parts("sum").lora
        reference = lora_reference(x, layer.weight, layer.bias, combo.U.T, combo.V.T, combo.scale)
        torch.testing.assert_close(layer(x), reference, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer(x), x @ expected.T + layer.bias, rtol=1e-12, atol=1e-12)


def test_a_named_adapter_saves_as_a_default_and_loads_under_any_name(tmp_path):
    model = adapted()
    path = tmp_path / "b.safetensors"
    loratrf.save_adapter(model, path, adapter="b")
    b_out = alone(model, "b", ids)
    keys = set(loratrf.adapter_state_dict(model, adapter="b"))
    assert keys and not any(".adapters." in k or "task_filters" in k for k in keys)
    torch.manual_seed(0)
    fresh = Net().double().eval()
    loratrf.load_adapter(fresh, path)  # as its default
    torch.testing.assert_close(fresh(ids), b_out, rtol=1e-12, atol=1e-12)
    assert set(loratrf.adapter_state_dict(fresh)) == keys
    loratrf.load_adapter(model, path, adapter="b2")  # beside the others
    assert model.layers[0].value.active_adapter == "b"
    torch.testing.assert_close(alone(model, "b2", ids), b_out, rtol=0, atol=0)
    loratrf.load_adapter(model, path, adapter="b2")  # over an adapter already holding it
    torch.testing.assert_close(alone(model, "b2", ids), b_out, rtol=0, atol=0)


def test_a_named_lora_adapter_exports_to_peft_and_imports_back(tmp_path):
    model = adapted()
    loratrf.export_peft(model, tmp_path, adapter="d")
    torch.manual_seed(0)
    fresh = Net().double().eval()
    loratrf.import_peft(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids), alone(model, "d", ids), rtol=1e-12, atol=1e-12)
    with pytest.raises(loratrf.AdapterFileError, match="task-aware filters"):
        loratrf.export_peft(model, tmp_path, adapter="b")
    with pytest.raises(loratrf.AdapterFileError, match="no LoRA layers of adapter 'z' to export; its LoRA adapters"):
        loratrf.export_peft(model, tmp_path, adapter="z")


def test_a_peft_folder_imports_as_a_named_adapter_beside_others(tmp_path):
    model = adapted()
    loratrf.export_peft(model, tmp_path, adapter="d")
    torch.manual_seed(0)
    other = Net().double().eval()  # adapted()'s base weights
    loratrf.inject(other, targets=TARGETS, filters=FILTERS)  # layers.*.up already hold "default"
    randomise_adapters(other, torch.Generator().manual_seed(1))
    before = other(ids)
    assert loratrf.import_peft(other, tmp_path, adapter="p") == ["layers.0.up", "layers.1.up"]
    assert other.layers[0].up.active_adapter == "default"  # the active adapter stays
    torch.testing.assert_close(other(ids), before, rtol=0, atol=0)
    torch.testing.assert_close(alone(other, "p", ids), alone(model, "d", ids), rtol=1e-12, atol=1e-12)
    with pytest.raises(loratrf.AdapterFileError, match="'layers.0.up' already has a LoRA adapter named 'p'"):
        loratrf.import_peft(other, tmp_path, adapter="p")


def test_gate_tools_act_on_the_named_or_the_active_adapter():
    model = adapted()
    loratrf.set_adapter(model, "b")
    seen = {}
    hooks = [
        f.register_forward_pre_hook(lambda _, a, host=host: seen.setdefault(host, a[0].detach()))
        for host, f in loratrf.walk.named_filters(model, "b")
    ]
    with loratrf.record_gates(model) as gates, loratrf.record_gates(model, adapter="default") as idle:
        model(ids)
    for hook in hooks:
        hook.remove()
    for host, h in seen.items():  # b's gates are affine: clamp(a cos(h, t) + b, 0, 1)
        f = filter_of(model.get_submodule(host), "b")
        cos = torch.nn.functional.cosine_similarity(h, f.task_vector.expand_as(h), dim=-1)
        expected = (f.gate_scale * cos + f.gate_offset).clamp(0, 1)
        torch.testing.assert_close(gates[host][0], expected.detach(), rtol=1e-12, atol=1e-12)
    assert set(seen) == set(gates) == {"layers.0", "layers.1"}
    assert all(calls == [] for calls in idle.values())  # the default adapter's filters did not run
    default_t = {host: f.task_vector.clone() for host, f in loratrf.walk.named_filters(model)}
    loratrf.calibrate_filters(model, ids)  # the active adapter's filters: b's, from the same h
    for host, h in seen.items():
        u = h / h.norm(dim=-1, keepdim=True)
        m = u.mean(dim=(0, 1))
        t = m / m.norm() / h.norm(dim=-1).mean()
        torch.testing.assert_close(filter_of(model.get_submodule(host), "b").task_vector, t, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(f.task_vector, default_t[host]) for host, f in loratrf.walk.named_filters(model))


def test_delete_restores_and_deleting_the_active_adapter_leaves_none_active():
    torch.manual_seed(0)
    base = Net().double().eval()
    expected = base(ids)
    model = copy.deepcopy(base)
    loratrf.inject(model, targets=TARGETS, filters=FILTERS)
    loratrf.inject(model, targets=[r"layers\.0\.up"], filters=[r"layers\.0"], adapter="b")
    randomise_adapters(model)
    b_out = alone(model, "b", ids)
    loratrf.delete_adapter(model, "default")
    assert type(model.layers[1].value) is nn.Linear and type(model.layers[0].up) is LoRALinear
    assert filter_of(model.layers[1]) is None and filter_of(model.layers[0], "b") is not None
    torch.testing.assert_close(model(ids), b_out, rtol=0, atol=0)
    loratrf.delete_adapter(model, "b")
    assert not any(isinstance(m, (LoRALinear, loratrf.TaskAwareFilter)) for m in model.modules())
    assert not model.layers[0]._forward_hooks
    assert torch.equal(model(ids), expected)


def test_merge_unload_and_summary_act_on_the_active_adapter():
    model = adapted()
    b_out = alone(model, "b", ids)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    loratrf.merge(model)
    torch.testing.assert_close(model(ids), b_out, rtol=1e-10, atol=1e-12)
    loratrf.unmerge(model)
    for n, p in model.state_dict().items():
        torch.testing.assert_close(p, before[n], rtol=1e-14, atol=1e-15)
    s = loratrf.summary(model)
    assert s.active == "b" and set(s.adapters) == set(NAMES) and "adapter 'b'" in str(s) and "(active)" in str(s)
    assert s.trainable == sum(p.numel() for _, p in loratrf.walk.named_adapter_parameters(model, "b"))
    loratrf.unload(model)  # merges "b", keeps its filters as the default's, drops the rest
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert filter_of(model.layers[0]) is not None and not hasattr(model.layers[0], "task_filters")
    torch.testing.assert_close(model(ids), b_out, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda m: loratrf.set_adapter(m, "z"),
            AdapterError,
            r"no adapter named 'z'; its adapters are \['default', 'b'",
        ),
        (lambda m: loratrf.delete_adapter(m, "z"), AdapterError, "no adapter named 'z'"),
        (lambda m: loratrf.save_adapter(m, "/tmp/x.safetensors", adapter="z"), AdapterError, "no adapter named 'z'"),
        (lambda m: loratrf.use_adapters(m, ["b", "z"]).__enter__(), AdapterError, "no adapter named 'z'"),
        (lambda m: loratrf.use_adapters(m, "b").__enter__(), AdapterError, "a sequence of adapter names"),
        (lambda m: loratrf.combine_adapters(m, {"z": 1.0}, "s"), AdapterError, "no adapter named 'z'"),
        (lambda m: loratrf.combine_adapters(m, {"d": 1.0}, "b"), AdapterError, "already holds an adapter named 'b'"),
        (lambda m: loratrf.combine_adapters(m, {"d": float("nan")}, "s"), AdapterError, "must be a finite number"),
        (lambda m: loratrf.combine_adapters(m, {"b": 0.5, "d": 0.5}, "s"), AdapterError, "a filter is not linear"),
        (lambda m: loratrf.combine_adapters(m, {"c": 0.5}, "s"), AdapterError, "DoRA adapters"),
        (
            lambda m: loratrf.inject(m, targets=[r"layers\.0\.up"], adapter="d"),
            loratrf.InjectionError,
            "'layers.0.up' already has a LoRA adapter named 'd'; inject once per module and adapter name",
        ),
        (
            lambda m: loratrf.inject(m, filters=[r"layers\.0"], adapter="b"),
            loratrf.InjectionError,
            "'layers.0' already has a task-aware filter of adapter 'b'",
        ),
        (lambda m: loratrf.record_gates(m, adapter="z").__enter__(), AdapterError, "no adapter named 'z'"),
        (
            lambda m: loratrf.record_gates(m, adapter="d").__enter__(),
            loratrf.FilterOutputError,
            r"adapter 'd' has no task-aware filters to record; these adapters have some: \['default', 'b'\]",
        ),
        (
            lambda m: loratrf.calibrate_filters(m, ids, adapter="b"),
            AdapterError,
            r"adapter 'b' is not the active one \('default'\), .*call loratrf.set_adapter\(model, 'b'\) first",
        ),
        (lambda m: loratrf.inject(m, targets=TARGETS, adapter="a.b"), loratrf.InjectionError, "an adapter name is"),
        (lambda m: loratrf.inject(m, targets=TARGETS, adapter="keys"), loratrf.InjectionError, "an adapter name is"),
    ],
)
def test_refusals_name_the_problem_and_change_nothing(call, error, message):
    model = adapted()
    before = {n: (p.clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(error, match=message):
        call(model)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], v) and after[n].requires_grad == g for n, (v, g) in before.items())
    assert all(layer.rows is None for _, layer in loratrf.walk.named_lora_layers(model))


def test_a_batch_of_another_size_names_both_numbers():
    model = adapted()
    with loratrf.use_adapters(model, ["b", "c", None]):
        with pytest.raises(AdapterError, match=r"given 3 adapter names, one per row.* got 4 rows"):
            model(ids)


def test_switching_or_mixing_while_merged_is_refused():
    model = adapted()
    loratrf.set_adapter(model, "b")
    loratrf.merge(model)
    loratrf.set_adapter(model, "b")  # the merged one: nothing changes
    for call in (
        lambda: loratrf.set_adapter(model, "default"),
        lambda: loratrf.set_adapter(model, None),
        lambda: loratrf.use_adapters(model, ["b"] * 4).__enter__(),
        lambda: loratrf.delete_adapter(model, "b"),
    ):
        with pytest.raises(MergeError, match="is merged; .*call loratrf.unmerge\\(model\\) first"):
            call()
    loratrf.delete_adapter(model, "d")  # another adapter may go
    # a new adapter would start from the merged weight (a fresh DoRA magnitude from its norms)
    with pytest.raises(loratrf.InjectionError, match=r"'layers.0.value' is merged \(adapter 'b' is folded into"):
        loratrf.inject(model, targets=[r"layers\.0\.value"], dora=True, adapter="e")
    assert "e" not in loratrf.walk.adapter_names(model)
    loratrf.unmerge(model)
    loratrf.set_adapter(model, "default")
