"""A stateful property test: random sequences of inject, train, merge, unmerge, save/load and
unload, with the model checked after every step against a shadow reference.

The shadow is written here in plain torch from the formulas, never through loratrf's forward:

- a LoRA layer computes `y = x W0ᵀ + b + s · (x Aᵀ) Bᵀ` with `s = alpha/r` (`alpha/sqrt(r)`
  with rslora), where loratrf stores `U = Aᵀ [in, r]` and `V = Bᵀ [r, out]`;
- a filter on a module's output `h [..., d]` computes `out = h + s · ((σ ⊙ h) U) V` with
  `σ = clamp(cos(h, t), 0, 1)` (or `clamp(h·t, 0, 1)`) and `s = alpha/r` (rslora is LoRA's
  option; filters always scale by `alpha/r`).

The shadow keeps its own copy of every base parameter (taken when the model is built, and
updated only where the sequence says a base value changes: `unload(merge=True)` folds the
updates in, training moves the `trainable` modules, loading copies the file's trainable
tensors), its own record of which adapters exist with which options and which layers are
merged, and reads only the current adapter tensors (`U`, `V`, task vectors) off the model.
It recomputes the whole model's output from those by hand.

Tolerances come from float64 rounding (unit roundoff EPS = 2^-53):
- a merge or an unmerge rounds each weight once and computes `s · U V` with `r` products,
  so it moves a weight at most `(r + 2) · EPS · M` from the exact value, where
  `M = |W0| + s |U| |V|` elementwise; the shadow adds `WEIGHT_SAFETY` times that bound to
  each weight's error budget per merge or unmerge, and demands bit-identity while the
  budget is zero (nothing merged since the base value was set);
- outputs pass through about ten layers of short sums, softmax, layer norm and tanh, whose
  rounding is ~1e-15 relative to the values' size; OUTPUT_RTOL = 1e-10 leaves a margin of
  10^5 for the amplification of that rounding and of the weights' merge rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from reference import filter_reference, lora_reference
from torch import nn

import loratrf
from loratrf import AdapterFileError, InjectionError, LoRALinear, LoRATRFError, MergeError
from loratrf.filter import filter_host_output
from loratrf.walk import named_adapter_parameters, named_filters, named_lora_layers

# The adapter file's name. save_adapter is to write safetensors, and the file will then be
# named "adapter.safetensors"; until load_adapter reads that format back, torch.load
# misreads the suffix, so the test writes "adapter.pt".
ADAPTER_FILE = "adapter.safetensors"

D_IN, D, FFN, D_OUT = 5, 6, 7, 4  # all different, so a transposed factor cannot pass
BATCH, SEQ = 2, 3
EPS = torch.finfo(torch.float64).eps / 2  # unit roundoff
WEIGHT_SAFETY = 8
OUTPUT_RTOL = 1e-10
GRAD_RTOL = 1e-9  # a backward is about twice as deep as the forward it differentiates


class Attention(nn.Module):
    """Single-head attention returning `(output, weights)`: filters act on the first element."""

    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(D, D), nn.Linear(D, D, bias=False), nn.Linear(D, D)

    def forward(self, x):
        weights = torch.softmax(self.query(x) @ self.key(x).transpose(-1, -2) / math.sqrt(D), -1)
        return weights @ self.value(x), weights


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.norm = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, FFN), nn.Linear(FFN, D)

    def forward(self, x):
        x = self.norm(x + self.attn(x)[0])
        return x + self.fc2(torch.tanh(self.fc1(x)))


class Model(nn.Module):
    """`[batch, seq, D_IN] -> [batch, seq, D_OUT]`: embed, two blocks, head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D_IN, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, D_OUT)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def block_names(i):
    return [f"blocks.{i}.attn.{p}" for p in ("query", "key", "value")] + [f"blocks.{i}.fc1", f"blocks.{i}.fc2"]


LINEARS = ["embed", *block_names(0), *block_names(1), "head"]
FILTER_HOSTS = [
    "embed",
    *(f"blocks.{i}{suffix}" for i in (0, 1) for suffix in ("", ".attn", ".attn.value", ".fc1", ".fc2")),
    "head",
]
HOST_WIDTH = {h: FFN if h.endswith("fc1") else D_OUT if h == "head" else D for h in FILTER_HOSTS}
TRAINABLE_MODULES = ["head", "blocks.1.norm"]
SECOND = "second"  # an adapter that stays inactive: it changes no output, and every operation must step around it


# ---------------------------------------------------------------- the shadow's records


@dataclasses.dataclass
class LoraRecord:
    rank: int
    alpha: float
    rslora: bool
    init: str
    merged: bool = False

    @property
    def scale(self):
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank

    def options(self):
        return (self.rank, self.alpha, self.rslora, self.init)


@dataclasses.dataclass
class FilterRecord:
    dim: int
    rank: int
    alpha: float
    similarity: str
    task_init: str
    init: str

    @property
    def scale(self):
        return self.alpha / self.rank

    def options(self):
        return dataclasses.astuple(self)


def layer_options(layer: LoRALinear):
    t = layer.lora
    return (t.rank, t.alpha, t.rslora, t.init)


def filter_options(f):
    t = f.transform
    return (f.dim, t.rank, t.alpha, f.similarity, f.task_init, t.init)


@dataclasses.dataclass
class Shadow:
    """What the model must be: base values, adapters and their options, merge states."""

    base: dict[str, torch.Tensor]  # every base parameter's value (unmerged), float64
    err: dict[str, torch.Tensor]  # elementwise rounding budget of each base weight; absent = 0
    lora: dict[str, LoraRecord]
    filters: dict[str, FilterRecord]
    trainable: set[str]  # base parameters left trainable (inject's `trainable`, a file's)
    second: set[str] = dataclasses.field(default_factory=set)  # layers holding the inactive adapter SECOND

    def fresh(self) -> Shadow:
        """The shadow of a fresh base model built from `base` and loaded with these adapters."""
        lora = {n: dataclasses.replace(r, merged=False) for n, r in self.lora.items()}
        return Shadow(dict(self.base), {}, lora, dict(self.filters), set(self.trainable))  # files hold no SECOND

    def adapter_names(self):
        names = {f"{n}.lora.{f}" for n in self.lora for f in "UV"}
        names |= {f"{h}.task_filter.{t}" for h in self.filters for t in ("task_vector", "transform.U", "transform.V")}
        return names

    # ------------------------------------------------------------ the reference forward

    def forward(self, model: nn.Module, x: torch.Tensor, live: bool = False) -> torch.Tensor:
        """The model's output from the formulas. Adapter tensors are read off `model`; base
        values are the shadow's, or with `live` the model's own Parameters where they are
        trainable, so that autograd through this gives reference gradients."""
        params = dict(model.named_parameters())

        def P(name):
            if name in self.base and not (live and name in self.trainable):
                return self.base[name]
            return params[name] if live else params[name].detach()

        def filtered(host, h):
            if host not in self.filters:
                return h
            f, pre = self.filters[host], f"{host}.task_filter"
            t, U, V = P(f"{pre}.task_vector"), P(f"{pre}.transform.U"), P(f"{pre}.transform.V")
            return filter_reference(h, t, U, V, f.scale, f.similarity)

        def linear(name, x):
            W, b = P(f"{name}.weight"), self.base.get(f"{name}.bias")
            b = None if b is None else P(f"{name}.bias")
            if name in self.lora:
                U, V = P(f"{name}.lora.U"), P(f"{name}.lora.V")
                y = lora_reference(x, W, b, U.T, V.T, self.lora[name].scale)
            else:
                y = x @ W.T if b is None else x @ W.T + b
            return filtered(name, y)

        def layer_norm(name, x):
            mean = x.mean(-1, keepdim=True)
            var = ((x - mean) ** 2).mean(-1, keepdim=True)
            return (x - mean) / torch.sqrt(var + 1e-5) * P(f"{name}.weight") + P(f"{name}.bias")

        def attention(name, x):
            q, k, v = (linear(f"{name}.{p}", x) for p in ("query", "key", "value"))
            weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
            return filtered(name, weights @ v)  # a filter acts on the tuple's first element

        def block(name, x):
            x = layer_norm(f"{name}.norm", x + attention(f"{name}.attn", x))
            x = x + linear(f"{name}.fc2", torch.tanh(linear(f"{name}.fc1", x)))
            return filtered(name, x)

        h = linear("embed", x)
        for i in range(2):
            h = block(f"blocks.{i}", h)
        return linear("head", h)

    # ------------------------------------------------------------ merge rounding

    def delta_and_bound(self, model, name):
        """`s · (U V)ᵀ` in the weight's layout, and the most one merge or unmerge may move
        the weight away from the exact `W ± delta` (see the module docstring)."""
        layer = model.get_submodule(name)
        U, V, s = layer.lora.U.detach(), layer.lora.V.detach(), self.lora[name].scale
        delta = s * (U @ V).T
        magnitude = self.base[f"{name}.weight"].abs() + s * (U.abs() @ V.abs()).T
        return delta, WEIGHT_SAFETY * (self.lora[name].rank + 2) * EPS * magnitude

    def add_rounding(self, name, bound):
        key = f"{name}.weight"
        self.err[key] = self.err.get(key, torch.zeros_like(bound)) + bound

    # ------------------------------------------------------------ checks

    def check_structure(self, model):
        layers = dict(named_lora_layers(model))
        assert set(layers) == set(self.lora) | self.second
        for name, layer in layers.items():
            assert (layer.parts(SECOND) is not None) == (name in self.second), name
            if name not in self.lora:
                assert not layer.merged and layer.parts("default") is None, name
                continue
            assert layer.merged == self.lora[name].merged, name
            assert layer_options(layer) == self.lora[name].options(), name
            assert layer.dropout == 0.0
        for name in LINEARS:
            expected = LoRALinear if name in self.lora or name in self.second else nn.Linear
            assert type(model.get_submodule(name)) is expected, name
        filters = dict(named_filters(model))
        assert set(filters) == set(self.filters)
        for host, f in filters.items():
            assert filter_options(f) == self.filters[host].options(), host
        for name, module in model.named_modules():  # one filter hook per host, none left behind
            hooks = [h for h in module._forward_hooks.values() if h is filter_host_output]
            assert len(hooks) == (name in self.filters), name
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == self.adapter_names() | self.trainable  # the inactive SECOND trains nothing
        params = dict(model.named_parameters())
        assert set(params) == set(self.base) | self.adapter_names() | set(dict(named_adapter_parameters(model, SECOND)))
        assert all(p.dtype == torch.float64 for p in params.values())  # adapters in the weights' dtype

    def check_base(self, model):
        """Base values bit-identical to the shadow's while nothing has been merged since they
        were set; within the rounding budget otherwise; `W0 + delta` where merged."""
        params = dict(model.named_parameters())
        for key, expected in self.base.items():
            actual = params[key].detach()
            name, _, kind = key.rpartition(".")
            budget = self.err.get(key)
            if kind == "weight" and name in self.lora and self.lora[name].merged:
                delta, _ = self.delta_and_bound(model, name)
                assert budget is not None
                assert bool(((actual - (expected + delta)).abs() <= budget).all()), f"merged {key}"
            elif budget is None:
                assert torch.equal(actual, expected), f"{key} is not bit-identical to its base value"
            else:
                assert bool(((actual - expected).abs() <= budget).all()), f"{key} drifted past its rounding"

    def check_output(self, model, x):
        with torch.no_grad():
            assert_outputs_close(model(x), self.forward(model, x))

    def check_all(self, model, x):
        self.check_structure(model)
        self.check_base(model)
        self.check_output(model, x)


def assert_outputs_close(actual, expected, rtol=OUTPUT_RTOL):
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


def snapshot(model):
    """Everything a refused call must leave as it was."""
    modules = [(n, type(m), getattr(m, "merged", None), len(m._forward_hooks)) for n, m in model.named_modules()]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return modules, state, grads


def assert_unchanged(model, before):
    modules, state, grads = snapshot(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert grads == before[2]


@dataclasses.dataclass
class SavedAdapter:
    shadow: Shadow  # the saving model's records, as a fresh load would have them
    tensors: dict[str, torch.Tensor]  # what the file holds


# ---------------------------------------------------------------- the machine

INJECT_ARGUMENTS = {
    "modules": st.one_of(  # (LoRA targets, filter hosts), not both empty
        st.tuples(
            st.lists(st.sampled_from(LINEARS), unique=True, min_size=1, max_size=4),
            st.lists(st.sampled_from(FILTER_HOSTS), unique=True, max_size=3),
        ),
        st.tuples(st.just([]), st.lists(st.sampled_from(FILTER_HOSTS), unique=True, min_size=1, max_size=3)),
    ),
    "rank": st.integers(1, 4),
    "alpha": st.sampled_from([0.5, 1.0, 3.0, 16.0]),
    "rslora": st.booleans(),
    "filter_rank": st.none() | st.integers(1, 3),
    "filter_alpha": st.none() | st.sampled_from([0.5, 2.0]),
    "similarity": st.sampled_from(["cosine", "dot"]),
    "task_init": st.sampled_from(["normal", "ones"]),
    "init": st.sampled_from(["kaiming", "gaussian"]),
    "trainable": st.lists(st.sampled_from(TRAINABLE_MODULES), unique=True, max_size=2),
    "seed": st.integers(0, 2**16),
}


class AdapterLifecycle(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="loratrf-stateful-"))
        self.saved: SavedAdapter | None = None

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(seed=st.integers(0, 2**16), first=st.none() | st.fixed_dictionaries(INJECT_ARGUMENTS))
    def build(self, seed, first):
        """The base model, and with `first` a first injection and a training step, so that most
        sequences start with adapters whose updates are not zero."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = Model().double()
            with torch.no_grad():  # layer norms away from their (1, 0) init
                for block in self.model.blocks:
                    block.norm.weight.uniform_(0.5, 1.5)
                    block.norm.bias.uniform_(-0.5, 0.5)
            self.x = torch.randn(BATCH, SEQ, D_IN, dtype=torch.float64)
            self.target = torch.randn(BATCH, SEQ, D_OUT, dtype=torch.float64)
        base = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.shadow = Shadow(base, {}, {}, {}, set(base))  # a plain model trains everything
        if first is not None:
            self.inject(**first)
            self.train_step("adamw", 0.1)

    def fresh_base(self) -> Model:
        """A new base model holding the shadow's base values, without adapters."""
        model = Model().double()
        model.load_state_dict(self.shadow.base)
        return model

    @invariant()
    def model_matches_shadow(self):
        self.shadow.check_all(self.model, self.x)

    # ------------------------------------------------------------ inject

    @rule(**INJECT_ARGUMENTS)
    def inject(
        self, modules, rank, alpha, rslora, filter_rank, filter_alpha, similarity, task_init, init, trainable, seed
    ):
        shadow, (targets, hosts) = self.shadow, modules
        reasons = [f"{t} already has LoRA" for t in targets if t in shadow.lora]
        # a plain Linear carrying a filter (kept by unload) can be a target again: its filter moves over
        reasons += [f"{h} already has a filter" for h in hosts if h in shadow.filters]
        if "head" in trainable and ("head" in targets or "head" in shadow.lora or "head" in shadow.second):
            reasons.append("head both trainable and a LoRA layer")
        kwargs = {
            "targets": [t.replace(".", r"\.") for t in targets],
            "filters": [h.replace(".", r"\.") for h in hosts],
            "rank": rank,
            "alpha": alpha,
            "rslora": rslora,
            "filter_rank": filter_rank,
            "filter_alpha": filter_alpha,
            "similarity": similarity,
            "task_init": task_init,
            "init": init,
            "trainable": [m.replace(".", r"\.") for m in trainable],
        }
        before = snapshot(self.model)
        with torch.no_grad():
            y0 = self.model(self.x)
        if reasons:
            event("inject refused: " + reasons[0].partition(" ")[2])
            with pytest.raises(InjectionError), torch.random.fork_rng(devices=[]):
                loratrf.inject(self.model, **kwargs)
            assert_unchanged(self.model, before)
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loratrf.inject(self.model, **kwargs)
        with torch.no_grad():
            assert torch.equal(self.model(self.x), y0), "fresh adapters changed the output"
        for t in targets:
            shadow.lora[t] = LoraRecord(rank, float(alpha), rslora, init)
        for h in hosts:
            shadow.filters[h] = FilterRecord(
                HOST_WIDTH[h], filter_rank or rank, float(filter_alpha or alpha), similarity, task_init, init
            )
        shadow.trainable = {f"{m}.{p}" for m in trainable for p in ("weight", "bias")}

    @rule(modules=st.lists(st.sampled_from(LINEARS), unique=True, min_size=1, max_size=4), rank=st.integers(1, 3))
    def inject_second_adapter(self, modules, rank):
        """A second adapter, inactive, on modules the default adapter may or may not cover;
        merge, unmerge, save, load and unload must go on as if it were not there."""
        shadow = self.shadow
        if not shadow.lora and not shadow.filters:  # alone, the new adapter would become the active one
            return
        kwargs = {"targets": [t.replace(".", r"\.") for t in modules], "rank": rank, "adapter": SECOND}
        merged = [t for t in modules if t in shadow.lora and shadow.lora[t].merged]
        if any(t in shadow.second for t in modules) or merged:
            event("second adapter refused")
            before = snapshot(self.model)
            with pytest.raises(InjectionError):
                loratrf.inject(self.model, **kwargs)
            assert_unchanged(self.model, before)
            return
        loratrf.inject(self.model, **kwargs)
        event("second adapter" + " on modules without the default" * any(t not in shadow.lora for t in modules))
        shadow.second |= set(modules)
        shadow.trainable = set()  # inject leaves trainable only the base modules its call names

    # ------------------------------------------------------------ training

    @rule(optimizer=st.sampled_from(["sgd", "adamw"]), lr=st.sampled_from([0.02, 0.1]))
    def train_step(self, optimizer, lr):
        """One step on an MSE loss; the gradients are checked against the shadow's first."""
        model, shadow = self.model, self.shadow
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            event("nothing to train")
            return
        loss = F.mse_loss(model(self.x), self.target)
        if any(r.merged for r in shadow.lora.values()):
            before = snapshot(model)
            with pytest.raises(MergeError):
                torch.autograd.grad(loss, params)
            assert_unchanged(model, before)
            event("training a merged model refused")
            return
        grads = torch.autograd.grad(loss, params)
        expected = torch.autograd.grad(
            F.mse_loss(shadow.forward(model, self.x, live=True), self.target), params, allow_unused=True
        )
        for g, e in zip(grads, expected):
            assert_outputs_close(g, torch.zeros_like(g) if e is None else e, GRAD_RTOL)
        for p, g in zip(params, grads):
            p.grad = g
        if optimizer == "sgd":
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # steps of at most lr: values stay O(1)
            opt = torch.optim.SGD(params, lr=lr)
        else:
            opt = torch.optim.AdamW(params, lr=lr)  # a first Adam step moves each value by about lr
        opt.step()
        for p in params:
            p.grad = None
        params = dict(model.named_parameters())
        for name in shadow.trainable:
            shadow.base[name] = params[name].detach().clone()

    # ------------------------------------------------------------ merge, unmerge

    def trained(self, names):
        return any(bool(self.model.get_submodule(n).lora.V.detach().any()) for n in names)

    @rule()
    def merge(self):
        bounds = {n: self.shadow.delta_and_bound(self.model, n)[1] for n, r in self.shadow.lora.items() if not r.merged}
        if self.trained(bounds):
            event("merge of trained updates")
        loratrf.merge(self.model)
        for name, bound in bounds.items():
            self.shadow.add_rounding(name, bound)
            self.shadow.lora[name].merged = True

    @rule()
    def unmerge(self):
        bounds = {n: self.shadow.delta_and_bound(self.model, n)[1] for n, r in self.shadow.lora.items() if r.merged}
        if self.trained(bounds):
            event("unmerge of trained updates")
        loratrf.unmerge(self.model)
        for name, bound in bounds.items():
            self.shadow.add_rounding(name, bound)
            self.shadow.lora[name].merged = False

    # ------------------------------------------------------------ adapter files

    def save(self) -> Path | None:
        """save_adapter, or its refusal when there is no adapter; the file's expected content
        is remembered for the load rules."""
        path = self.dir / ADAPTER_FILE
        if not self.shadow.lora and not self.shadow.filters:
            before = snapshot(self.model)
            with pytest.raises(AdapterFileError):
                loratrf.save_adapter(self.model, path)
            assert_unchanged(self.model, before)
            event("save refused: no adapter")
            return None
        loratrf.save_adapter(self.model, path)
        params = dict(self.model.named_parameters())
        names = self.shadow.adapter_names() | self.shadow.trainable
        self.saved = SavedAdapter(self.shadow.fresh(), {n: params[n].detach().clone() for n in names})
        return path

    @rule(continue_with_fresh=st.booleans(), seed=st.integers(0, 2**16))
    def save_and_load_into_fresh_base(self, continue_with_fresh, seed):
        path = self.save()
        if path is None:
            return
        fresh = self.fresh_base()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loratrf.load_adapter(fresh, path)
        fresh_shadow = self.saved.shadow
        fresh_params = dict(fresh.named_parameters())
        for name, tensor in self.saved.tensors.items():
            assert torch.equal(fresh_params[name], tensor), name
        fresh_shadow.check_all(fresh, self.x)
        with torch.no_grad():
            assert_outputs_close(fresh(self.x), self.model(self.x))
        event("load into a fresh base" + " of trained updates" * self.trained(fresh_shadow.lora))
        if continue_with_fresh:
            event("continuing with the loaded model")
            self.model, self.shadow = fresh, copy.deepcopy(fresh_shadow)

    @rule()
    def save_only(self):
        self.save()

    @rule(seed=st.integers(0, 2**16))
    def load_saved_into_current_model(self, seed):
        """load_adapter into the model itself, which may hold some, all or none of the file's
        adapters (with the same options, or other ones), merged or not."""
        if self.saved is None:
            return
        shadow, saved = self.shadow, self.saved.shadow
        path = self.dir / ADAPTER_FILE
        mismatched = [n for n, r in saved.lora.items() if n in shadow.lora and shadow.lora[n].options() != r.options()]
        mismatched += [h for h, r in saved.filters.items() if h in shadow.filters and shadow.filters[h] != r]
        # a plain Linear carrying a filter (kept by unload) takes the file's LoRA: its filter moves over
        # inject refuses a module that is both trainable and a LoRA layer; a file must too
        lora_layers = set(shadow.lora) | shadow.second | set(saved.lora)
        conflicts = [n for n in saved.trainable if n.rpartition(".")[0] in lora_layers]
        merged = [n for n in saved.lora if n in shadow.lora and shadow.lora[n].merged]
        before = snapshot(self.model)
        if mismatched or conflicts:
            event("load into the current model refused")
            with pytest.raises(AdapterFileError if mismatched else LoRATRFError):
                loratrf.load_adapter(self.model, path)
            assert_unchanged(self.model, before)
            return
        bounds = {n: shadow.delta_and_bound(self.model, n)[1] for n in merged}
        event("load into the current model" + ", into merged layers" * bool(merged))
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                loratrf.load_adapter(self.model, path)
        except LoRATRFError:
            if not merged:
                raise
            # refusing to load into merged layers is one right answer; the model must be untouched
            assert_unchanged(self.model, before)
            event("load into a merged model refused")
            return
        params = dict(self.model.named_parameters())
        for name, tensor in self.saved.tensors.items():
            assert torch.equal(params[name], tensor), name
        for name, record in saved.lora.items():
            if name not in shadow.lora:
                shadow.lora[name] = dataclasses.replace(record)
        for name in merged:  # the load may unmerge (and re-merge): each way is one more rounding
            layer = self.model.get_submodule(name)
            shadow.lora[name].merged = layer.merged
            _, new_bound = shadow.delta_and_bound(self.model, name)
            shadow.add_rounding(name, 2 * (bounds[name] + new_bound))
        shadow.filters.update({h: dataclasses.replace(r) for h, r in saved.filters.items()})
        shadow.trainable = set(saved.trainable)
        for name in saved.trainable:
            shadow.base[name] = self.saved.tensors[name].clone()

    # ------------------------------------------------------------ unload

    @rule(merge=st.booleans(), keep_filters=st.booleans())
    def unload(self, merge, keep_filters):
        model, shadow = self.model, self.shadow
        layers = dict(named_lora_layers(model))
        filters = dict(named_filters(model))
        deltas = {n: shadow.delta_and_bound(model, n) for n in layers if n in shadow.lora}
        if layers or filters:
            event(f"unload(merge={merge}, keep_filters={keep_filters})" + " of trained updates" * self.trained(deltas))
        assert loratrf.unload(model, merge=merge, keep_filters=keep_filters) is model
        for name, layer in layers.items():
            plain = model.get_submodule(name)
            assert type(plain) is nn.Linear and plain.weight is layer.weight and plain.bias is layer.bias, name
            if name not in shadow.lora:  # it held SECOND alone, which unload drops
                continue
            delta, bound = deltas[name]
            key = f"{name}.weight"
            if shadow.lora[name].merged != merge:  # unload merges or unmerges it now
                shadow.add_rounding(name, bound)
            if merge:  # the folded weight becomes the new base value, once checked
                assert bool(((plain.weight - (shadow.base[key] + delta)).abs() <= shadow.err[key]).all()), key
                shadow.base[key] = plain.weight.detach().clone()
                shadow.err.pop(key)
        shadow.lora, shadow.second = {}, set()
        if keep_filters:
            assert all(f is dict(named_filters(model))[h] for h, f in filters.items())
        else:
            shadow.filters = {}


TestAdapterLifecycle = AdapterLifecycle.TestCase
TestAdapterLifecycle.settings = settings(stateful_step_count=12, deadline=None)


# ---------------------------------------------------------------- minimal cases of what the machine checks


def test_load_adapter_into_merged_layers_keeps_their_weights_consistent(tmp_path):
    """load_adapter into a model that already holds the file's LoRA layer, merged: either a
    refusal that changes nothing, or the layer computes `W0 + s B A` of the LOADED factors and
    unmerge gives `W0` back. (Found by the machine: the new factors were copied in under the
    merged weight, which still held the old update, and unmerge then subtracted the new one.
    loratrf now refuses with a MergeError.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    w0 = model[0].weight.detach().clone()
    loratrf.inject(model, targets=["0"], rank=1, alpha=1.0)
    layer = model[0]
    with torch.no_grad():
        layer.lora.V.fill_(1.0)
    path = tmp_path / ADAPTER_FILE
    loratrf.save_adapter(model, path)
    with torch.no_grad():
        layer.lora.V.fill_(2.0)  # the update moves on after saving, as training would
    loratrf.merge(model)
    before = snapshot(model)
    try:
        loratrf.load_adapter(model, path)
    except LoRATRFError:
        assert_unchanged(model, before)
        return
    assert torch.equal(layer.lora.V, torch.ones_like(layer.lora.V))
    delta = (layer.lora.U @ layer.lora.V).T.detach()
    torch.testing.assert_close(layer.weight.detach(), w0 + delta if layer.merged else w0, rtol=0, atol=1e-12)
    loratrf.unmerge(model)
    torch.testing.assert_close(layer.weight.detach(), w0, rtol=0, atol=1e-12)


def test_load_adapter_does_not_make_a_lora_base_weight_trainable(tmp_path):
    """A file's trainable module that is now a LoRA layer: inject refuses a module that is both
    ("make a module either trainable or a LoRA target, not both"), and so must load_adapter,
    changing nothing. (Found by the machine: the load succeeded and left `1.weight`, the LoRA
    layer's base weight, with requires_grad=True.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)).double()
    loratrf.inject(model, targets=["0"], trainable=["1"])
    path = tmp_path / ADAPTER_FILE
    loratrf.save_adapter(model, path)  # the file: LoRA on "0"; "1.weight", "1.bias" trainable
    loratrf.inject(model, targets=["1"])  # "1" becomes a LoRA layer, its base frozen
    before = snapshot(model)
    with pytest.raises(LoRATRFError):
        loratrf.load_adapter(model, path)
    assert_unchanged(model, before)
