"""Bugs the random-tree test (test_fuzz.py) found, each pinned by a small deterministic case."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loratrf
from loratrf import InjectionError, LoRALinear, TaskAwareFilter
from loratrf.filter import filter_of
from models import randomise_adapters

x = torch.randn(3, 4)


def count_filters(model):
    return sum(isinstance(m, TaskAwareFilter) for m in model.modules())


def test_a_lora_target_can_also_have_its_output_filtered(tmp_path):
    """The filter used to be attached to the replaced nn.Linear, which left the model: no filter
    ran, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    base.load_state_dict(model.state_dict())
    loratrf.inject(model, targets=["0"], filters=["0"])
    layer = model[0]
    assert isinstance(layer, LoRALinear) and filter_of(layer) is not None
    randomise_adapters(model)
    expected = torch.relu(layer.task_filter(layer.forward(x)))  # forward: without the hook
    y = model(x)
    torch.testing.assert_close(y, expected)
    loratrf.save_adapter(model, tmp_path / "a.pt")
    loratrf.load_adapter(base, tmp_path / "a.pt")
    assert torch.equal(base(x), y)
    loratrf.unload(model, merge=True, keep_filters=True)  # the filter moves to the plain nn.Linear
    assert type(model[0]) is nn.Linear and filter_of(model[0]) is not None
    torch.testing.assert_close(model(x), y)
    loratrf.unload(model, keep_filters=False)
    assert count_filters(model) == 0


def test_a_shared_host_matched_under_two_names_gets_one_filter():
    """It used to get two forward hooks, so its output was filtered twice."""
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    loratrf.inject(model, filters=["0|2"])
    assert count_filters(model) == 1 and len(shared._forward_hooks) == 1
    randomise_adapters(model)
    f, W, b = shared.task_filter, shared.weight, shared.bias
    once = f(F.linear(x, W, b))
    torch.testing.assert_close(model(x), f(F.linear(torch.relu(once), W, b)))  # filtered once per call


def test_a_shared_module_cannot_be_trainable_under_one_name_and_a_target_under_another():
    """Its base weight used to become trainable beside its adapter."""
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(InjectionError, match="either trainable or a LoRA target"):
        loratrf.inject(model, targets=["0"], trainable=["2"])
    assert type(model[0]) is nn.Linear and shared.weight.requires_grad


@pytest.mark.parametrize("value", [None, 3])
def test_pattern_lists_that_are_not_lists_are_injection_errors(value):
    """`targets=None` used to raise a bare TypeError from `tuple(None)`."""
    with pytest.raises(InjectionError, match="targets must be a list of regex strings"):
        loratrf.inject(nn.Sequential(nn.Linear(4, 4)), targets=value, filters=["0"])


@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8)])
def test_in_place_ops_on_adapter_outputs_keep_the_gradients(shape):
    """The fused Functions returned views of their results, and autograd refuses an in-place op
    on a Function's view output (`nn.ReLU(inplace=True)` after a LoRA layer, FSDP2's hooks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.ReLU(inplace=True))
    loratrf.inject(model, targets=["0"], filters=["2"])
    randomise_adapters(model)
    layer, host = model[0], model[2]
    T = host.task_filter.transform
    params = [layer.lora.U, layer.lora.V, host.task_filter.task_vector, T.U, T.V]
    h = torch.randn(shape, requires_grad=True)
    got = torch.autograd.grad(model(h).sum(), [h, *params])
    lora = F.linear(h, layer.weight, layer.bias) + layer.lora.scale * (h @ layer.lora.U) @ layer.lora.V
    hidden = F.linear(torch.relu(lora), host.weight, host.bias)
    t = host.task_filter.task_vector
    s = F.cosine_similarity(hidden, t.expand_as(hidden), dim=-1, eps=1e-8).clamp(0, 1).unsqueeze(-1)
    want = torch.autograd.grad(torch.relu(hidden + T.scale * (s * hidden) @ T.U @ T.V).sum(), [h, *params])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the fused and the plain path
def test_filter_outputs_are_fresh_tensors_not_views(dtype):
    """FSDP2 hooks a block's output, and an in-place op on a view of it drops the hook."""
    task_filter = TaskAwareFilter(8, 2, dtype=dtype)
    h = torch.randn(2, 3, 8, dtype=dtype, requires_grad=True)
    out = task_filter(h)
    assert out._base is None
    out.relu_().sum().backward()  # in place on the output, then back through the filter
    assert h.grad is not None
