"""Random module trees and random pattern lists: every call either does what it says, with the
outputs preserved, or raises one of loratrf's own errors and leaves the model as it was.

An independent oracle (plain `re.fullmatch` over the tree's names, module identities and the
output widths measured by hooks on the base model) says which calls must be refused."""

import copy
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import loratrf
from loratrf import FilterOutputError, LoRALinear, LoRATRFError, LowRankTransform, TaskAwareFilter
from loratrf.filter import filter_of

D = 4


def first(x):
    return x[0] if isinstance(x, tuple) else x


class Seq(nn.Sequential):
    def forward(self, x):
        for m in self:
            x = first(m(x))
        return x


class Chain(nn.ModuleList):
    def forward(self, x):
        for m in self:
            x = first(m(x))
        return x


class Branches(nn.ModuleDict):
    def forward(self, x):
        for m in self.values():
            x = first(m(x))
        return x


class Pair(nn.Module):
    """Returns a tuple `(proj(x), sum(x))`."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return self.proj(x), x.sum()


class Affine(nn.Module):
    """A leaf with a `weight` that is not a linear layer."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return x * self.weight


def neck(width):
    """`D -> width -> D`: hidden states of another width inside the tree."""
    return Seq(nn.Linear(D, width), nn.ReLU(), nn.Linear(width, D))


LEAVES = {
    "lin": lambda: nn.Linear(D, D),
    "linnb": lambda: nn.Linear(D, D, bias=False),
    "relu": nn.ReLU,
    "norm": lambda: nn.LayerNorm(D),
    "affine": Affine,
    "pair": Pair,
    "neck2": lambda: neck(2),
    "neck6": lambda: neck(6),
    "shared": None,  # one Linear instance, registered wherever this leaf appears
}
trees = st.recursive(
    st.sampled_from(sorted(LEAVES)),
    lambda kids: st.tuples(st.sampled_from(["seq", "list", "dict"]), st.lists(kids, min_size=1, max_size=3)),
    max_leaves=8,
)


def build(tree, shared):
    if isinstance(tree, str):
        return shared if tree == "shared" else LEAVES[tree]()
    kind, kids = tree
    modules = [build(k, shared) for k in kids]
    if kind == "seq":
        return Seq(*modules)
    if kind == "list":
        return Chain(modules)
    return Branches({f"b{i}": m for i, m in enumerate(modules)})


def make_model(tree, seed):
    torch.manual_seed(seed)
    return Seq(build(tree, nn.Linear(D, D)), nn.Linear(D, D)).double()


def all_names(model):
    """Every qualified submodule name, a shared module under each of its names."""
    return [name for name, _ in model.named_modules(remove_duplicate=False) if name]


def output_widths(model, x):
    """Name -> width of the (first) tensor each module returns, measured on the base model."""
    widths, hooks = {}, []

    def record(name, out):
        widths[name] = first(out).shape[-1]

    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            hooks.append(module.register_forward_hook(lambda m, a, out, name=name: record(name, out)))
    model(x)
    for hook in hooks:
        hook.remove()
    return widths


# Patterns: derived from real names (exact, digits generalised, suffix wildcard, or a bare
# suffix that only matches part of a name), or random regex text, often invalid.
REGEX_TEXT = st.text(alphabet="0123.b*+?()[]|\\d", min_size=1, max_size=6)


def pattern_strategy(names, likely):
    """Mostly patterns derived from the `likely` names, else from any name, random regex text
    or a non-string."""

    def derive(args):
        name, how = args
        if how == "exact":
            return re.escape(name)
        if how == "digits":
            return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))
        if how == "suffix":
            return r".*" + re.escape(name.split(".")[-1])
        return name.split(".")[-1]  # a partial match

    hows = st.sampled_from(["exact", "exact", "digits", "suffix", "partial"])
    return st.sampled_from(["likely"] * 10 + ["any"] * 2 + ["text", "odd"]).flatmap(
        lambda kind: {
            "likely": st.tuples(st.sampled_from(likely or names), hows).map(derive),
            "any": st.tuples(st.sampled_from(names), hows).map(derive),
            "text": REGEX_TEXT,
            "odd": st.sampled_from([3, None, b"0"]),
        }[kind]
    )


def valid_regex(pattern):
    if not isinstance(pattern, str):
        return False
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def matches(patterns, names):
    return [n for n in names if any(re.fullmatch(p, n) for p in patterns)]


def holds_linear(module):
    return any(isinstance(m, nn.Linear) for m in module.modules())


def expected_refusal(model, targets, filters, trainable, filter_dim, rank):
    """Why `inject` must refuse these arguments, by the oracle's own reckoning, or None."""
    patterns = [*targets, *filters, *trainable]
    if not all(valid_regex(p) for p in patterns):
        return "pattern"
    if not targets and not filters:
        return "nothing"
    if rank < 1:
        return "rank"
    names = all_names(model)
    if any(not matches([p], names) for p in patterns):
        return "no match"
    modules = dict(model.named_modules(remove_duplicate=False))
    target_ids = {id(modules[n]) for n in matches(targets, names)}
    if any(type(modules[n]) is not nn.Linear for n in matches(targets, names)):
        return "not linear"
    if filter_dim is None and any(not holds_linear(modules[n]) for n in matches(filters, names)):
        return "width"
    for name in matches(trainable, names):
        if any(id(m) in target_ids for m in modules[name].modules()):
            return "trainable target"
    return None


def snapshot(model):
    """Everything a refused call must leave as it was."""
    return (
        [(name, id(m), len(m._forward_hooks)) for name, m in model.named_modules(remove_duplicate=False)],
        [(n, id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)],
    )


def assert_unchanged(model, before):
    modules, params = snapshot(model)
    assert modules == before[0]
    assert [(n, i, g) for n, i, g, _ in params] == [(n, i, g) for n, i, g, _ in before[1]]
    assert all(torch.allclose(a[3], b[3], rtol=0, atol=0, equal_nan=True) for a, b in zip(params, before[1]))


def refuses(call, model):
    """Run `call`; if it raises, it must be loratrf's error and `model` must be untouched."""
    before = snapshot(model)
    try:
        call()
    except LoRATRFError:
        assert_unchanged(model, before)
        return True
    return False


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@settings(max_examples=3 * settings.default.max_examples)  # a wide search space: more examples than the default
@given(trees, st.data())
def test_random_trees_and_patterns_never_crash_and_never_half_change(tree, data):
    seed = data.draw(st.integers(0, 2**16), label="seed")
    model = make_model(tree, seed)
    base = copy.deepcopy(model)
    names = all_names(model)
    linears = [n for n in names if type(model.get_submodule(n)) is nn.Linear]
    sizes = data.draw(st.sampled_from([(1, 0), (0, 1), (1, 1), (2, 1), (1, 2), (0, 0)]), label="sizes")
    hosts = [n for n in names if holds_linear(model.get_submodule(n))]
    targets = data.draw(st.lists(pattern_strategy(names, linears), min_size=sizes[0], max_size=sizes[0]), label="t")
    filters = data.draw(st.lists(pattern_strategy(names, hosts), min_size=sizes[1], max_size=sizes[1]), label="f")
    trainable = data.draw(st.lists(pattern_strategy(names, names), max_size=1), label="trainable")
    filter_dim = data.draw(st.sampled_from([None, None, None, 2, D, 6]), label="filter_dim")
    rank = data.draw(st.sampled_from([1, 2, 2, 2, 2, 2, 2, 0]), label="rank")
    x = torch.randn(3, D, dtype=torch.float64)
    y0 = model(x)
    widths = output_widths(base, x)

    base_modules = list(model.named_modules(remove_duplicate=False))
    why = expected_refusal(model, targets, filters, trainable, filter_dim, rank)
    event(f"inject: {why or 'done'}")

    def call():
        loratrf.inject(model, targets=targets, filters=filters, rank=rank, filter_dim=filter_dim, trainable=trainable)

    assert refuses(call, model) == (why is not None), why
    if why is not None:
        assert torch.equal(model(x), y0)
        return

    # Not a silent no-op: every matched module, under each of its names, now holds what was
    # asked for, and nothing else does.
    before = dict(base_modules)
    modules = dict(model.named_modules(remove_duplicate=False))
    target_ids = {id(before[n]) for n in matches(targets, names)}
    host_ids = {id(before[n]) for n in matches(filters, names)}
    lora_names = {n for n in names if isinstance(modules[n], LoRALinear)}
    assert lora_names == {n for n in names if id(before[n]) in target_ids}
    assert {n for n in names if filter_of(modules[n]) is not None} == {n for n in names if id(before[n]) in host_ids}
    assert sum(isinstance(m, TaskAwareFilter) for m in model.modules()) == len(host_ids)
    host_names = matches(filters, names)
    adapters = [m.lora if isinstance(m, LoRALinear) else m for m in model.modules()]
    adapters = [m for m in adapters if isinstance(m, (LowRankTransform, TaskAwareFilter))]
    trainable_ids = {id(p) for m in adapters for p in m.parameters()}
    trainable_ids |= {id(p) for name in matches(trainable, names) for p in modules[name].parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == trainable_ids

    if filter_dim is not None and any(widths[n] != filter_dim for n in host_names):
        try:
            model(x)
        except FilterOutputError:
            return  # the wrong width is named at the first forward
        raise AssertionError("a filter of the wrong width ran")
    assert torch.equal(model(x), y0)  # fresh adapters compute exactly the base model

    with torch.no_grad():
        for p in loratrf.adapter_state_dict(model).values():
            p.add_(torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(seed)))
    y1 = model(x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("weight", "bias"))}

    loratrf.merge(model)
    torch.testing.assert_close(model(x), y1, rtol=1e-10, atol=1e-10)
    loratrf.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-12, atol=1e-12)

    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if layers and data.draw(st.booleans(), label="poison"):
        with torch.no_grad():
            layers[-1].lora.V.view(-1)[0] = float("nan")
        assert refuses(lambda: loratrf.merge(model, safe=True), model)
        with torch.no_grad():
            layers[-1].lora.V.view(-1)[0] = 0.0
        y1 = model(x)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.pt"
        loratrf.save_adapter(model, path)
        fresh = copy.deepcopy(base)
        loratrf.load_adapter(fresh, path)
        torch.testing.assert_close(fresh(x), y1, rtol=0, atol=1e-12)
        loratrf.load_adapter(fresh, path)  # into a model already holding these adapters
        torch.testing.assert_close(fresh(x), y1, rtol=0, atol=1e-12)

        other = make_model(data.draw(trees, label="other tree"), seed)  # a file from another model
        if not refuses(lambda: loratrf.load_adapter(other, path), other):
            saved = loratrf.adapter_state_dict(model)
            loaded = loratrf.adapter_state_dict(other)
            assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    loratrf.unload(model, merge=True, keep_filters=True)  # plain modules, merged weights, filters kept
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert sum(isinstance(m, TaskAwareFilter) for m in model.modules()) == len(host_ids)
    torch.testing.assert_close(model(x), y1, rtol=1e-10, atol=1e-10)


@given(st.sampled_from([None, 3, 2.5, object()]), st.sampled_from(["targets", "filters", "trainable"]))
def test_pattern_lists_of_the_wrong_type_are_refused(value, field):
    model = make_model("lin", 0)
    arguments = {"targets": ["0"], "filters": [], "trainable": [], field: value}
    assert refuses(lambda: loratrf.inject(model, **arguments), model)
