import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loratrf
from loratrf import FilterOutputError
from models import FILTERS, TARGETS, Net, randomise_adapters
from reference import filter_reference

ids = torch.randint(0, 20, (4, 6))


class Shifted(nn.Module):
    """Hidden states that all lie near one direction, as in pretrained models."""

    def __init__(self, d=8):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.register_buffer("offset", torch.full((d,), 3.0))

    def forward(self, x):
        return self.proj(x) * 0.1 + self.offset


def identity_model(d=3):
    """One bias-free identity linear with a filter on it: the filter sees exactly the input."""
    model = nn.Sequential(nn.Linear(d, d, bias=False))
    loratrf.inject(model, filters=["0"])
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(d))
    return model


def clamped_cosine(h, t):
    """The paper's gate, written out: clamp(h·t / (|h| |t|), 0, 1) per token."""
    h, t = h.double(), t.double()
    return (h @ t / (h.norm(dim=-1) * t.norm()).clamp_min(1e-8)).clamp(0.0, 1.0)


# --- record_gates -----------------------------------------------------------------------


def test_record_gates_records_the_clamped_cosine_of_each_hosts_output_per_call():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    loratrf.inject(model, filters=["0", "1"])
    randomise_adapters(model)
    f0, f1 = model[0].task_filter, model[1].task_filter
    x = torch.randn(3, 5, 8)
    with loratrf.record_gates(model) as gates:
        out = model(x)
        model(x[:1])
    h0 = x @ model[0].weight.T + model[0].bias
    filtered = filter_reference(h0, f0.task_vector, f0.transform.U, f0.transform.V, f0.transform.scale)
    h1 = filtered.float() @ model[1].weight.T + model[1].bias
    assert set(gates) == {"0", "1"} and len(gates["0"]) == len(gates["1"]) == 2
    assert gates["0"][0].shape == (3, 5) and gates["0"][1].shape == (1, 5)
    torch.testing.assert_close(gates["0"][0].double(), clamped_cosine(h0, f0.task_vector))
    torch.testing.assert_close(gates["1"][0].double(), clamped_cosine(h1, f1.task_vector), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gates["0"][1], gates["0"][0][:1])
    assert not gates["0"][0].requires_grad
    reference = filter_reference(h1, f1.task_vector, f1.transform.U, f1.transform.V, f1.transform.scale)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


def test_a_host_called_twice_per_forward_records_twice():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    loratrf.inject(model, filters=["0"])
    with loratrf.record_gates(model) as gates:
        model(torch.randn(2, 4))
    assert list(gates) == ["0"] and len(gates["0"]) == 2


@given(st.integers(0, 2**16), st.sampled_from(["cosine", "dot"]), st.booleans())
def test_outputs_and_gradients_are_unchanged_inside_and_nothing_stays_behind(seed, similarity, double):
    torch.manual_seed(seed)
    model = Net()
    loratrf.inject(model, targets=TARGETS, filters=FILTERS, similarity=similarity)
    randomise_adapters(model)
    if double:  # float64 takes the fused path, float32 too; both must be untouched
        model.double()
    x = torch.randint(0, 20, (3, 5))

    def run():
        model.zero_grad()
        out = model(x)
        out.pow(2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    before, grads_before = run()
    with loratrf.record_gates(model) as gates:
        inside, grads_inside = run()
    assert torch.equal(inside, before)
    assert grads_inside.keys() == grads_before.keys()
    assert all(torch.equal(grads_inside[n], grads_before[n]) for n in grads_before)
    assert all(len(calls) == 1 for calls in gates.values())
    run()  # outside: nothing is recorded, and no hook is left on any filter
    assert all(len(calls) == 1 for calls in gates.values())
    assert all(not f._forward_pre_hooks for _, f in loratrf.walk.named_filters(model))


def test_the_hooks_go_even_when_the_forward_fails():
    model = Net()
    loratrf.inject(model, filters=FILTERS)
    with pytest.raises(IndexError), loratrf.record_gates(model):
        model(torch.full((1, 2), 99))  # out of the embedding's range
    assert all(not f._forward_pre_hooks for _, f in loratrf.walk.named_filters(model))


def test_record_gates_refuses_a_model_without_filters():
    with (
        pytest.raises(FilterOutputError, match="no task-aware filters to record; inject filters first"),
        loratrf.record_gates(Net()),
    ):
        pass


# --- gate_statistics --------------------------------------------------------------------


def test_gate_statistics_of_a_hand_computed_case_leave_padding_out():
    s = torch.tensor([[0.0, 0.5, 1.0, 0.9], [0.2, 0.4, 0.7, 0.7], [0.3, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])
    stats = loratrf.gate_statistics({"layer": [s]}, mask, torch.tensor([1, 0, 0]))["layer"]
    assert stats.tokens == 6 and stats.sentences == 2  # one-token sentences have no spread
    assert math.isclose(stats.mean, (0.0 + 0.5 + 1.0 + 0.2 + 0.4 + 0.3) / 6)
    assert math.isclose(stats.open, 5 / 6)
    std_first = math.sqrt(((0 - 0.5) ** 2 + 0 + (1 - 0.5) ** 2) / 3)
    assert math.isclose(stats.spread, (std_first + 0.1) / 2)
    assert stats.class_means == pytest.approx(((0.2 + 0.4 + 0.3) / 3, 0.5))


def test_gate_statistics_pool_the_calls_and_default_to_every_token():
    calls = [torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]])]
    stats = loratrf.gate_statistics({"h": calls})["h"]
    assert (stats.tokens, stats.sentences) == (5, 2)
    assert math.isclose(stats.mean, 2.5 / 5) and math.isclose(stats.open, 4 / 5)
    assert math.isclose(stats.spread, (0.5 + 0.0) / 2) and stats.class_means is None


def test_gate_statistics_refuse_what_does_not_fit():
    s = {"h": [torch.zeros(2, 3)]}
    with pytest.raises(FilterOutputError, match="no gates to summarise"):
        loratrf.gate_statistics({})
    with pytest.raises(FilterOutputError, match="'h' recorded no gate"):
        loratrf.gate_statistics({"h": []})
    with pytest.raises(FilterOutputError, match=r"masks holds 2 tensor\(s\) but the filters recorded 1 call"):
        loratrf.gate_statistics(s, [torch.ones(2, 3)] * 2)
    with pytest.raises(FilterOutputError, match=r"a mask of shape \(2, 4\) does not fit the gates of 'h'"):
        loratrf.gate_statistics(s, torch.ones(2, 4))
    with pytest.raises(FilterOutputError, match=r"labels of shape \(3,\) do not fit.*shape \(2,\)"):
        loratrf.gate_statistics(s, labels=torch.tensor([0, 1, 0]))


# --- calibrate_filters: the mean start --------------------------------------------------


def test_a_filter_pointing_away_from_every_token_never_trains_until_calibrated():
    model = nn.Sequential(Shifted(), nn.Linear(8, 2))
    loratrf.inject(model, filters=["0"])
    task_filter = model[0].task_filter
    with torch.no_grad():
        task_filter.task_vector.fill_(-1.0)  # opposite to the shared direction: every gate is 0
    x = torch.randn(16, 8)
    model(x).pow(2).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in task_filter.parameters())  # dead
    model.zero_grad()
    before = model(x)
    live = loratrf.calibrate_filters(model, x)
    assert live == {"0": 1.0}
    assert torch.equal(model(x), before)  # calibration changes no output
    model(x).pow(2).sum().backward()
    assert task_filter.transform.V.grad.abs().sum() > 0


def test_the_task_vector_is_the_mean_token_direction_over_the_mean_norm():
    model = identity_model()
    tokens = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    loratrf.calibrate_filters(model, tokens)
    mean_direction = torch.tensor([0.5, 0.5, 0.0]) / (0.5**0.5)
    torch.testing.assert_close(model[0].task_filter.task_vector, mean_direction / 3.5)


def test_the_token_mask_keeps_padding_out_of_the_mean():
    model = identity_model()
    tokens = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]], [[0.0, 0.0, 9.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[1, 1], [0, 0]])  # the second sentence is all padding
    loratrf.calibrate_filters(model, tokens, token_mask=mask)
    torch.testing.assert_close(model[0].task_filter.task_vector, torch.tensor([1.0, 1.0, 0.0]) / 2**0.5 / 3.5)


def test_calibration_keeps_the_mode_and_reports_each_filter():
    model = Net()
    loratrf.inject(model, filters=[r"layers\.\d+"])
    model.train()
    live = loratrf.calibrate_filters(model, ids)
    assert model.training and set(live) == {"layers.0", "layers.1"}
    assert all(0.5 < fraction <= 1.0 for fraction in live.values())


def test_calibration_refuses_models_without_filters_or_filters_that_did_not_run():
    with pytest.raises(FilterOutputError, match="no task-aware filters"):
        loratrf.calibrate_filters(Net(), ids)
    model = Shifted(4)
    model.unused = nn.Linear(4, 4)  # registered, never called
    loratrf.inject(model, filters=["proj", "unused"])
    with pytest.raises(FilterOutputError, match=r"did not run.*'unused'"):
        loratrf.calibrate_filters(model, torch.randn(2, 4))
    model = Shifted(4)
    loratrf.inject(model, filters=["proj"])
    nn.init.zeros_(model.proj.bias)
    with pytest.raises(FilterOutputError, match="only zero vectors"):
        loratrf.calibrate_filters(model, torch.zeros(2, 4))


# --- calibrate_filters: the contrastive start -------------------------------------------


def test_two_classes_give_the_difference_of_the_class_mean_directions():
    model = identity_model()
    # sentence 0 (class 0): tokens along e1 and e2; sentence 1 (class 1): along e2 and e3
    tokens = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]], [[0.0, 4.0, 0.0], [0.0, 0.0, 4.0]]])
    live = loratrf.calibrate_filters(model, tokens, start="contrastive", labels=torch.tensor([0, 1]))
    difference = torch.tensor([0.0, 0.5, 0.5]) - torch.tensor([0.5, 0.5, 0.0])  # m_1 - m_0
    expected = difference / difference.norm() / 3.0  # over the mean norm (2 + 2 + 4 + 4) / 4
    torch.testing.assert_close(model[0].task_filter.task_vector, expected)
    assert live == {"0": 0.25}  # only the e3 token lies on t's side (e2 is orthogonal to t)


def test_more_classes_take_the_leading_principal_direction_of_the_class_means():
    model = identity_model()
    units = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-0.6, 0.8, 0.0]])  # one class each
    tokens = (units * torch.tensor([[2.0], [3.0], [5.0]])).unsqueeze(1)  # [3 sentences, 1 token, 3]
    loratrf.calibrate_filters(model, tokens, start="contrastive", labels=torch.tensor([7, 2, 5]))
    means = units[[1, 2, 0]]  # class ids in sorted order: 2, 5, 7
    centred = means - means.mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)
    direction = vectors[:, -1]  # the covariance's leading eigenvector
    projections = centred @ direction
    if projections.max() < -projections.min():  # the furthest class on the positive side
        direction = -direction
    torch.testing.assert_close(model[0].task_filter.task_vector, direction / (10 / 3))
    assert direction[0] > 0  # class 7 (e1) lies furthest from the others


@given(st.integers(0, 2**16), st.integers(0, 3))
def test_the_contrastive_start_opens_the_gates_of_the_planted_class(seed, shared):
    """Tokens share a dominant direction (as in pretrained models); class 1's sentences carry a
    planted direction on top. The contrastive start gives their tokens the larger gates, where
    the mean start, dominated by the shared direction, barely tells the classes apart."""
    g = torch.Generator().manual_seed(seed)
    d, n, length = 16, 24, 5
    common, planted = torch.randn(d, generator=g), torch.randn(d, generator=g)
    labels = torch.arange(n) % 2
    tokens = torch.randn(n, length, d, generator=g) + shared * common
    tokens = tokens + 2.0 * labels[:, None, None] * planted
    model = identity_model(d)
    loratrf.calibrate_filters(model, tokens, start="contrastive", labels=labels)
    with loratrf.record_gates(model) as gates:
        model(tokens)
    stats = loratrf.gate_statistics(gates, labels=labels)["0"]
    negative, positive = stats.class_means
    assert positive > negative + 0.1


def test_contrastive_labels_may_be_given_per_token_and_respect_the_mask():
    model = identity_model()
    tokens = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]]])
    per_token = torch.tensor([[0, 1, 1]])
    loratrf.calibrate_filters(
        model, tokens, start="contrastive", labels=per_token, token_mask=torch.tensor([[1, 1, 0]])
    )
    expected = torch.tensor([-1.0, 1.0, 0.0]) / 2**0.5 / 3.0  # e2 - e1 over the mean norm (2 + 4) / 2
    torch.testing.assert_close(model[0].task_filter.task_vector, expected)


def test_the_contrastive_start_refuses_labels_it_cannot_use():
    model = identity_model()
    x = torch.randn(4, 2, 3)
    before = model[0].task_filter.task_vector.clone()
    with pytest.raises(FilterOutputError, match=r"start must be one of \('mean', 'contrastive'\), got 'median'"):
        loratrf.calibrate_filters(model, x, start="median")
    with pytest.raises(FilterOutputError, match="start='contrastive' needs labels"):
        loratrf.calibrate_filters(model, x, start="contrastive")
    with pytest.raises(FilterOutputError, match="labels are used by start='contrastive' only"):
        loratrf.calibrate_filters(model, x, labels=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(FilterOutputError, match=r"labels hold one class only \(\[1\]\)"):
        loratrf.calibrate_filters(model, x, start="contrastive", labels=torch.ones(4, dtype=torch.long))
    with pytest.raises(FilterOutputError, match="labels must be integer class ids, got dtype torch.float32"):
        loratrf.calibrate_filters(model, x, start="contrastive", labels=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(FilterOutputError, match=r"labels of shape \(3,\) do not fit the hidden states of '0'.*\(4,\)"):
        loratrf.calibrate_filters(model, x, start="contrastive", labels=torch.tensor([0, 1, 0]))
    with pytest.raises(FilterOutputError, match=r"token_mask of shape \(4,\) does not fit the hidden states of '0'"):
        loratrf.calibrate_filters(model, x, token_mask=torch.ones(4))
    with pytest.raises(FilterOutputError, match="the real tokens reaching '0' belong to one class only"):
        loratrf.calibrate_filters(
            model,
            x,
            start="contrastive",
            labels=torch.tensor([0, 1, 0, 1]),
            token_mask=torch.tensor([[1, 1], [0, 0]] * 2),
        )
    assert torch.equal(model[0].task_filter.task_vector, before)  # refusals change nothing


def test_calibration_changes_no_output_for_either_start():
    model = Net()
    loratrf.inject(model, targets=TARGETS, filters=FILTERS)
    before = model(ids)
    loratrf.calibrate_filters(model, ids, start="contrastive", labels=torch.tensor([0, 1, 0, 1]))
    assert torch.equal(model(ids), before)
    assert F.cosine_similarity(model.layers[0].task_filter.task_vector, model.layers[1].task_filter.task_vector, 0) < 1


# --- the affine gate: s = clamp(a · cos(h, t) + b, 0, 1) ----------------------------------


def affine_reference(h, t, U, V, scale, a, b):
    """The filter with the affine gate, written out: s = clamp(a cos(h, t) + b, 0, 1), out = h + (s h) (scale U V)."""
    h, t, U, V = (x.double() for x in (h, t, U, V))
    s = (a * F.cosine_similarity(h, t.expand_as(h), dim=-1, eps=1e-8) + b).clamp(0, 1)
    return h + (s[..., None] * h) @ (scale * U @ V)


def trained_pair(dim, rank, dtype=torch.float64):
    """A paper-gated and an affine-gated filter with the same (trained-looking) tensors."""
    paper = loratrf.TaskAwareFilter(dim, rank, dtype=dtype)
    affine = loratrf.TaskAwareFilter(dim, rank, gate="affine", dtype=dtype)
    with torch.no_grad():
        paper.transform.V.normal_()
        affine.load_state_dict(
            {**paper.state_dict(), "gate_scale": affine.gate_scale, "gate_offset": affine.gate_offset}
        )
    return paper, affine


@given(st.integers(2, 24), st.integers(1, 4), st.lists(st.integers(1, 4), max_size=2), st.integers(0, 2**16))
def test_the_affine_gate_at_a_1_b_0_is_the_papers_gate(dim, rank, lead, seed):
    torch.manual_seed(seed)
    paper, affine = trained_pair(dim, rank)
    h = torch.randn(*lead, dim, dtype=torch.float64) + torch.rand(()) * 3 * paper.task_vector.detach()
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    out_paper, out_affine = paper(h1), affine(h2)  # the fused kernel against the plain path
    torch.testing.assert_close(out_affine, out_paper, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out_paper)
    (out_paper * g).sum().backward()
    (out_affine * g).sum().backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-9, atol=1e-9)
    for name in ("task_vector", "transform.U", "transform.V"):
        p1, p2 = paper.get_parameter(name), affine.get_parameter(name)
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-9, atol=1e-9)


@given(st.floats(0.1, 20.0), st.floats(-2.0, 1.0), st.integers(0, 2**16))
def test_the_affine_gate_matches_its_formula_and_trains_a_and_b(a, b, seed):
    torch.manual_seed(seed)
    _, f = trained_pair(6, 2)
    with torch.no_grad():
        f.gate_scale.fill_(a)
        f.gate_offset.fill_(b)
    h = torch.randn(3, 4, 6, dtype=torch.float64)
    expected = affine_reference(h, f.task_vector, f.transform.U, f.transform.V, f.transform.scale, a, b)
    torch.testing.assert_close(f(h), expected, rtol=1e-10, atol=1e-10)
    s = (a * F.cosine_similarity(h, f.task_vector.expand_as(h), dim=-1) + b).clamp(0, 1)
    torch.testing.assert_close(f.relevance(h).squeeze(-1), s, rtol=1e-10, atol=1e-10)
    f(h).pow(2).sum().backward()
    inside = ((s > 0) & (s < 1)).any()  # a and b get gradient where some gate is strictly inside (0, 1)
    assert bool(f.gate_scale.grad != 0) == bool(inside) and bool(f.gate_offset.grad != 0) == bool(inside)


def test_the_affine_gate_is_an_injection_option_saved_with_the_adapter(tmp_path):
    model = Net()
    config = loratrf.inject(model, targets=TARGETS, filters=FILTERS, gate="affine")
    task_filter = model.layers[0].task_filter
    assert config.gate == "affine" and task_filter.spec.gate == "affine"
    assert {"layers.0.task_filter.gate_scale", "layers.0.task_filter.gate_offset"} <= set(
        loratrf.adapter_state_dict(model)
    )
    assert loratrf.summary(model).filter == 2 * (8 + 2 * 8 * 8 + 2)  # t, U, V, a, b per filter
    with torch.no_grad():
        task_filter.gate_scale.fill_(3.0)
        task_filter.gate_offset.fill_(-0.25)
    randomise_adapters(model)
    loratrf.save_adapter(model, tmp_path / "a.safetensors")
    other = Net()
    other.load_state_dict(model.state_dict(), strict=False)
    loratrf.load_adapter(other, tmp_path / "a.safetensors")
    assert other.layers[0].task_filter.gate == "affine" and other.layers[0].task_filter.gate_scale.item() == 3.0
    assert torch.equal(other(ids), model(ids))
    paper = Net()
    loratrf.inject(paper, filters=FILTERS)
    assert not hasattr(paper.layers[0].task_filter, "gate_scale")  # the paper's filter holds t, U, V only
    with pytest.raises(loratrf.InjectionError, match=r"gate must be one of \('paper', 'affine'\), got 'sigmoid'"):
        loratrf.inject(Net(), filters=FILTERS, gate="sigmoid")
    with pytest.raises(loratrf.InjectionError, match="gate must be one of"):
        loratrf.TaskAwareFilter(4, gate="centred")


def test_record_gates_reports_the_affine_gate():
    model = identity_model(4)
    loratrf.unload(model, keep_filters=False)
    loratrf.inject(model, filters=["0"], gate="affine")
    f = model[0].task_filter
    with torch.no_grad():
        f.gate_scale.fill_(4.0)
        f.gate_offset.fill_(-0.5)
    x = torch.randn(2, 3, 4)
    with loratrf.record_gates(model) as gates:
        model(x)
    expected = (4.0 * F.cosine_similarity(x, f.task_vector.expand_as(x), dim=-1) - 0.5).clamp(0, 1)
    torch.testing.assert_close(gates["0"][0], expected)


def test_gate_range_maps_the_cosine_quantiles_onto_the_gates_range():
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    loratrf.inject(model, filters=["0"], gate="affine")
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
    # unit tokens at angles whose cosines with the mean direction t = e1 are 1, 0.8, 0.6, 0.4, 0.2, 0
    cosines = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0])
    tokens = torch.stack([cosines, (1 - cosines**2).sqrt()], -1)
    tokens = torch.cat([tokens, tokens * torch.tensor([1.0, -1.0])])  # mirrored, so the mean direction is e1
    live = loratrf.calibrate_filters(model, tokens, gate_range=(0.25, 0.75))
    f = model[0].task_filter
    torch.testing.assert_close(f.task_vector, torch.tensor([1.0, 0.0]))  # mean norm 1
    low, high = torch.quantile(torch.cat([cosines, cosines]), torch.tensor([0.25, 0.75]))  # 0.2 and 0.8
    torch.testing.assert_close(f.gate_scale, 1 / (high - low))
    torch.testing.assert_close(f.gate_offset, -low / (high - low))
    s = f.relevance(tokens).squeeze(-1)
    torch.testing.assert_close(s[:6], ((cosines - 0.2) / 0.6).clamp(0, 1))
    assert live == {"0": pytest.approx(8 / 12)}  # the cosines above 0.2: 1, 0.8, 0.6, 0.4, twice


def test_gate_range_is_refused_where_it_cannot_apply():
    paper = identity_model()
    x = torch.randn(4, 3)
    with pytest.raises(FilterOutputError, match=r"the filters on \['0'\] have the paper's gate.*gate='affine'"):
        loratrf.calibrate_filters(paper, x, gate_range=(0.5, 0.95))
    affine = nn.Sequential(nn.Linear(3, 3))
    loratrf.inject(affine, filters=["0"], gate="affine")
    for bad in ((0.9, 0.5), (0.5,), (-0.1, 0.5), (0.5, 1.5), "wide", (True, 0.5)):
        with pytest.raises(
            FilterOutputError, match=r"gate_range must be two quantiles \(q0, q1\) with 0 <= q0 < q1 <= 1"
        ):
            loratrf.calibrate_filters(affine, x, gate_range=bad)
    assert affine[0].task_filter.gate_scale.item() == 1.0  # refusals change nothing
