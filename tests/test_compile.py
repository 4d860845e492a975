"""torch.compile(fullgraph=True) of injected models: no graph breaks, the same outputs."""

import pytest
import torch

import loratrf
from loratrf import MergeError
from models import FILTERS, TARGETS, Net, randomise_adapters

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = Net(layers=2, d=16)
    loratrf.inject(net, targets=TARGETS, filters=FILTERS, rank=4)
    randomise_adapters(net)
    yield net
    torch._dynamo.reset()


def compiled(net, backend):
    torch._dynamo.reset()
    return torch.compile(net, fullgraph=True, backend=backend)  # fullgraph: a graph break raises


def adapter_grads(net):
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_compiled_model_matches_eager(model, merged, training):
    """aot_eager traces forward and backward (custom autograd Functions included) like
    inductor does, without generating C++, so all four cases stay fast."""
    if merged:
        loratrf.merge(model)
    model.train(training)
    # 64 tokens fold B A into the weights (fused path), 15 add the update after the base map
    ids = torch.randint(0, 20, (4, 16) if training else (3, 5))
    want = model(ids)
    got = compiled(model, "aot_eager")(ids)
    # float32 through different kernels (compiled graphs use F.linear where eager uses oneDNN)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if not training:
        return
    if merged:  # the refusal survives compilation, and happens at backward time
        with pytest.raises(MergeError, match="unmerge"):
            got.sum().backward()
        return
    want.sum().backward()
    eager = adapter_grads(model)
    model.zero_grad()
    got.sum().backward()
    for name, grad in adapter_grads(model).items():
        atol = 1e-5 * max(1.0, eager[name].abs().max().item())  # float32 sums of different order
        torch.testing.assert_close(grad, eager[name], rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_inductor_compiles_the_unmerged_model_for_inference(model):
    model.eval()
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, "inductor")(ids), model(ids), rtol=1e-5, atol=1e-5)
