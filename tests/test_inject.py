import collections
import copy
import json
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loratrf
from loratrf import FilterOutputError, InjectionConfig, InjectionError, LoRALinear, TaskAwareFilter
from models import FILTERS, TARGETS, Block, Net, randomise_adapters

D = 6


class Chain(nn.ModuleList):
    def forward(self, x):
        for m in self:
            x = m(x)
        return x


class Branches(nn.ModuleDict):
    def forward(self, x):
        for m in self.values():
            x = m(x)
        return x


LEAVES = {
    "lin": lambda: nn.Linear(D, D),
    "linnb": lambda: nn.Linear(D, D, bias=False),
    "relu": nn.ReLU,
    "norm": lambda: nn.LayerNorm(D),
}
trees = st.recursive(
    st.sampled_from(sorted(LEAVES)),
    lambda kids: st.tuples(st.sampled_from(["seq", "list", "dict"]), st.lists(kids, min_size=1, max_size=3)),
    max_leaves=10,
)


def build(tree):
    if isinstance(tree, str):
        return LEAVES[tree]()
    kind, kids = tree
    modules = [build(k) for k in kids]
    if kind == "seq":
        return nn.Sequential(*modules)
    if kind == "list":
        return Chain(modules)
    return Branches({f"b{i}": m for i, m in enumerate(modules)})


def pattern_for(name, how):
    """A regex derived from a module name: exact, digits generalised, or a suffix wildcard."""
    if how == "exact":
        return re.escape(name)
    if how == "digits":
        return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))
    return r".*" + re.escape(name.split(".")[-1])


@given(trees, st.data())
def test_random_trees_get_exactly_the_matched_modules(tree, data):
    model = nn.Sequential(build(tree))
    names = [n for n, _ in model.named_modules() if n]
    chosen = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=4))
    hows = data.draw(
        st.lists(st.sampled_from(["exact", "digits", "suffix"]), min_size=len(chosen), max_size=len(chosen))
    )
    patterns = [pattern_for(n, h) for n, h in zip(chosen, hows)]
    matched = [n for n in names if any(re.fullmatch(p, n) for p in patterns)]
    modules = dict(model.named_modules())
    before = {n: m for n, m in modules.items()}
    x = torch.randn(3, D)
    y0 = model(x)
    if any(not isinstance(modules[n], nn.Linear) for n in matched):
        with pytest.raises(InjectionError, match="LoRA targets must be"):
            loratrf.inject(model, targets=patterns)
        assert dict(model.named_modules()) == before  # refused calls change nothing
        assert all(p.requires_grad for p in model.parameters())
        return
    loratrf.inject(model, targets=patterns, rank=2)
    after = dict(model.named_modules())
    for name, module in before.items():
        if name in matched:
            assert isinstance(after[name], LoRALinear) and after[name].weight is module.weight
        else:
            assert after[name] is module
    assert torch.equal(model(x), y0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora.{uv}" for n in matched for uv in "UV"}


ids = torch.randint(0, 20, (2, 5))


def test_an_injected_model_starts_equal_to_its_base():
    model = Net()
    base_out = model(ids)
    config = loratrf.inject(model, targets=TARGETS, filters=FILTERS)
    assert torch.equal(model(ids), base_out)
    assert config.targets == tuple(TARGETS) and config.filters == tuple(FILTERS)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6
    assert sum(isinstance(m, TaskAwareFilter) for m in model.modules()) == 2


def test_filters_act_on_each_layer_output():
    model = Net()
    loratrf.inject(model, filters=FILTERS)
    randomise_adapters(model)
    seen = {}
    model.layers[0].register_forward_hook(lambda m, a, out: seen.setdefault("layer0", out))
    model.layers[1].register_forward_pre_hook(lambda m, a: seen.setdefault("into1", a[0]))
    model(ids)
    assert torch.equal(seen["layer0"], seen["into1"])  # what layer 1 gets is the filtered output
    raw = Block.forward(model.layers[0], model.embed(ids))
    torch.testing.assert_close(seen["into1"], model.layers[0].task_filter(raw))
    assert not torch.allclose(seen["into1"], raw)


def test_state_dict_keeps_base_keys_and_adds_adapter_keys():
    model = Net()
    base_keys = list(model.state_dict())
    base_state = copy.deepcopy(model.state_dict())
    loratrf.inject(model, targets=TARGETS, filters=FILTERS)
    keys = list(model.state_dict())
    assert [k for k in keys if k in base_keys] == base_keys
    extra = set(keys) - set(base_keys)
    assert extra == {k for k in keys if ".lora." in k or ".task_filter." in k}
    assert "layers.0.value.lora.U" in extra and "layers.1.task_filter.task_vector" in extra
    randomise_adapters(model)
    adapter_before = {k: v.clone() for k, v in loratrf.adapter_state_dict(model).items()}
    result = model.load_state_dict(base_state, strict=True)  # a base checkpoint loads strictly
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in loratrf.adapter_state_dict(model).items():
        assert torch.equal(v, adapter_before[k])  # ...and leaves the adapters alone


def test_a_state_dict_with_part_of_an_adapter_fails_strict_loading():
    model = Net()
    loratrf.inject(model, targets=TARGETS)
    state = model.state_dict()
    del state["layers.0.value.lora.V"]
    with pytest.raises(RuntimeError, match=r"layers\.0\.value\.lora\.V"):
        model.load_state_dict(state, strict=True)


def test_full_state_dict_round_trip_into_an_injected_model():
    model = Net()
    loratrf.inject(model, targets=TARGETS, filters=FILTERS)
    randomise_adapters(model)
    other = Net()
    loratrf.inject(other, targets=TARGETS, filters=FILTERS)
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(other(ids), model(ids))


def test_freezes_everything_but_adapters_and_trainable_modules():
    model = Net()
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, trainable=["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".lora." in n or ".task_filter." in n} | {
        "head.weight",
        "head.bias",
    }
    model(ids).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_trainable_module_holding_a_lora_target_is_refused():
    with pytest.raises(InjectionError, match="either trainable or a LoRA target"):
        loratrf.inject(Net(), targets=TARGETS, trainable=[r"layers\.0"])


def test_config_round_trips_through_json_and_redoes_the_injection():
    model = Net()
    config = loratrf.inject(model, targets=TARGETS, filters=FILTERS, rank=4, alpha=8, filter_rank=2, similarity="dot")
    text = config.to_json()
    assert json.loads(text)["filter_rank"] == 2
    again = InjectionConfig.from_json(text)
    assert again == config
    other = Net()
    loratrf.inject(other, **again.to_dict())
    assert [(n, type(m)) for n, m in other.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    assert other.layers[0].task_filter.similarity == "dot" and other.layers[0].up.lora.rank == 4


def test_inject_takes_a_config_with_overrides():
    config = InjectionConfig(targets=TARGETS, filters=FILTERS, rank=4, similarity="dot")
    model = Net()
    applied = loratrf.inject(model, config, rank=2, alpha=3.0)
    assert applied == InjectionConfig(targets=TARGETS, filters=FILTERS, rank=2, alpha=3.0, similarity="dot")
    layer, task_filter = model.layers[1].up, model.layers[1].task_filter
    assert (layer.lora.rank, layer.lora.alpha, layer.lora.scale) == (2, 3.0, 1.5)
    assert (task_filter.transform.rank, task_filter.similarity) == (2, "dot")
    with pytest.raises(InjectionError, match=r"unknown InjectionConfig option\(s\) \['ranks'\]"):
        loratrf.inject(Net(), config, ranks=2)
    with pytest.raises(InjectionError, match="inject's second argument is an InjectionConfig"):
        loratrf.inject(Net(), TARGETS)
    with pytest.raises(InjectionError, match="rank must be an integer >= 1, got 0"):
        loratrf.inject(Net(), config, rank=0)


def test_unknown_config_keys_are_named():
    with pytest.raises(InjectionError, match="unknown InjectionConfig option.*'ranks'"):
        InjectionConfig.from_dict({"targets": ["x"], "ranks": 4})


def test_a_pattern_matching_nothing_lists_the_nearest_names():
    with pytest.raises(InjectionError) as info:
        loratrf.inject(Net(), targets=[r"layer\.\d+\.value"])
    message = str(info.value)
    assert "matches no module name" in message and "Nearest module names:" in message
    nearest = re.findall(r"'([^']+)'", message.split("Nearest module names:")[1])
    assert 1 <= len(nearest) <= 5 and "layers.0.value" in nearest


def test_a_pattern_matching_only_part_of_a_name_says_fullmatch():
    with pytest.raises(InjectionError, match=r"WHOLE name.*\.\*value"):
        loratrf.inject(Net(), targets=["value"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=TARGETS, rank=0), "rank must be an integer >= 1"),
        (dict(targets=TARGETS, rank=True), "rank must be an integer"),
        (dict(targets=TARGETS, alpha=0), "alpha must be a finite number > 0"),
        (dict(targets=TARGETS, dropout=1.5), "dropout"),
        (dict(filters=FILTERS, filter_rank=-1), "filter_rank"),
        (dict(filters=FILTERS, similarity="euclid"), "similarity must be one of"),
        (dict(targets=["layers.(0"]), "not a valid regular expression"),
        (dict(targets=[3]), "regex strings"),
        (dict(), "nothing to inject"),
        (dict(targets=TARGETS, adapter_dtype="int8"), "floating-point torch dtype"),
    ],
)
def test_bad_options_are_refused_before_anything_changes(kwargs, message):
    model = Net()
    with pytest.raises(InjectionError, match=message):
        loratrf.inject(model, **kwargs)
    assert not any(isinstance(m, (LoRALinear, TaskAwareFilter)) for m in model.modules())


def test_unsupported_target_types_name_the_supported_ones():
    with pytest.raises(InjectionError, match=r"'layers\.0\.norm' is a LayerNorm; LoRA targets must be nn\.Linear"):
        loratrf.inject(Net(), targets=[r"layers\.0\.(norm|value)"])


def test_linear_subclass_with_its_own_forward_is_refused_but_plain_subclasses_work():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Tagged(nn.Linear):
        pass

    model = nn.Sequential(Scaled(4, 4), Tagged(4, 4))
    with pytest.raises(InjectionError, match="its own forward"):
        loratrf.inject(model, targets=["0"])
    x = torch.randn(2, 4)
    y = model(x)
    loratrf.inject(model, targets=["1"])
    assert isinstance(model[1], LoRALinear) and torch.equal(model(x), y)


def test_injecting_twice_is_refused():
    model = Net()
    loratrf.inject(model, targets=TARGETS, filters=FILTERS)
    with pytest.raises(InjectionError, match="already has a LoRA adapter"):
        loratrf.inject(model, targets=[r"layers\.0\.value"])
    with pytest.raises(InjectionError, match="already has a task-aware filter"):
        loratrf.inject(model, filters=[r"layers\.0"])
    loratrf.inject(model, targets=[r"layers\.0\.query"])  # other modules still can be adapted
    assert isinstance(model.layers[0].query, LoRALinear)


def test_one_bad_pattern_among_good_ones_leaves_the_model_untouched():
    model = Net()
    with pytest.raises(InjectionError):
        loratrf.inject(model, targets=TARGETS + ["nothing"], filters=FILTERS)
    assert not any(isinstance(m, (LoRALinear, TaskAwareFilter)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_hooked_targets_are_refused():
    model = Net()
    model.layers[0].value.register_forward_hook(lambda *a: None)
    with pytest.raises(InjectionError, match="has hooks registered"):
        loratrf.inject(model, targets=TARGETS)


def test_multihead_attention_out_proj_is_refused_with_the_reason():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    for kwargs in (dict(targets=[r"self_attn\.out_proj"]), dict(filters=[r"self_attn\.out_proj"])):
        with pytest.raises(InjectionError, match="never calls out_proj"):
            loratrf.inject(layer, **kwargs)


@pytest.mark.parametrize("padding_mask", [False, True])
def test_transformer_encoder_fast_path_cannot_skip_adapters(padding_mask):
    """In eval mode PyTorch's encoder runs a fused kernel that reads linear1/linear2 weights
    directly (and may pass nested tensors between layers); after inject the adapters must
    still count there. Training mode (dropout 0) never takes that path: it is the reference."""
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if padding_mask else None
    valid = ~mask if padding_mask else torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        base = encoder.eval()(x, src_key_padding_mask=mask)
    loratrf.inject(encoder, targets=[r"layers\.\d+\.linear[12]"], filters=[r"layers\.1"])
    randomise_adapters(encoder)
    reference = encoder.train()(x, src_key_padding_mask=mask).detach()
    assert not torch.allclose(reference[valid], base[valid])
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, src_key_padding_mask=mask)[valid], reference[valid])
    torch.testing.assert_close(encoder(x, src_key_padding_mask=mask)[valid].detach(), reference[valid])
    loratrf.unload(encoder, merge=False, keep_filters=False)
    assert all(layer.activation_relu_or_gelu == 1 for layer in encoder.layers) and encoder.use_nested_tensor


def test_filter_width_is_read_off_the_module_or_asked_for():
    model = Net()
    loratrf.inject(model, filters=[r"layers\.\d+", "embed"])
    assert model.layers[0].task_filter.dim == 8 and model.embed.task_filter.dim == 8
    with pytest.raises(InjectionError, match="pass filter_dim="):
        loratrf.inject(Net(), filters=[r"layers\.0\.norm"])
    with_dim = Net()
    loratrf.inject(with_dim, filters=[r"layers\.0\.norm"], filter_dim=8)
    assert with_dim.layers[0].norm.task_filter.dim == 8


def test_a_wrong_filter_width_fails_at_the_first_forward():
    model = Net()
    loratrf.inject(model, filters=[r"layers\.0\.up"], filter_dim=8)  # up outputs 16 features
    with pytest.raises(FilterOutputError, match="filter_dim=16"):
        model(ids)


class Pair(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.proj, self.kind = nn.Linear(4, 4), kind

    def forward(self, x):
        y, extra = self.proj(x), x.sum()
        if self.kind == "tuple":
            return y, extra
        if self.kind == "list":
            return [y, extra]
        if self.kind == "namedtuple":
            return collections.namedtuple("Out", "hidden extra")(y, extra)
        return {"hidden": y}


@pytest.mark.parametrize("kind", ["tuple", "list", "namedtuple"])
def test_sequence_outputs_have_their_first_element_filtered(kind):
    host = Pair(kind)
    model = nn.Sequential(host)
    loratrf.inject(model, filters=["0"])
    randomise_adapters(model)
    x = torch.randn(3, 4)
    out = model(x)
    assert type(out).__name__ == {"tuple": "tuple", "list": "list", "namedtuple": "Out"}[kind]
    torch.testing.assert_close(out[0], host.task_filter(host.proj(x)))
    assert torch.equal(out[1], x.sum())


def test_other_outputs_get_a_clear_error():
    model = nn.Sequential(Pair("dict"))
    loratrf.inject(model, filters=["0"], filter_dim=4)
    with pytest.raises(FilterOutputError, match="returned dict"):
        model(torch.randn(3, 4))


def test_a_module_registered_twice_is_replaced_everywhere():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(2, 4)
    y = model(x)
    loratrf.inject(model, targets=["0"])
    assert model[0] is model[2] and isinstance(model[0], LoRALinear)
    assert torch.equal(model(x), y)


def test_bfloat16_model_gets_float32_adapters_unless_told():
    model = Net().to(torch.bfloat16)
    loratrf.inject(model, targets=TARGETS, filters=FILTERS)
    assert model.layers[0].value.lora.U.dtype == torch.float32
    assert model.layers[0].task_filter.task_vector.dtype == torch.float32
    model(ids).float().sum().backward()
    same = Net().to(torch.bfloat16)
    loratrf.inject(same, targets=TARGETS, filters=FILTERS, adapter_dtype="bfloat16")
    assert same.layers[0].value.lora.U.dtype == torch.bfloat16


def test_meta_device_injection_allocates_nothing():
    with torch.device("meta"):
        model = Net(layers=3, d=64)
    loratrf.inject(model, targets=TARGETS, filters=FILTERS)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    loratrf.reset_adapters(model)
    reference = Net(layers=3, d=64)
    model.load_state_dict(reference.state_dict(), strict=True)
    long_ids = torch.randint(0, 20, (2, 7))
    assert torch.equal(model(long_ids), reference(long_ids))
