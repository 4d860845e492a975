import pytest
import torch
from torch import nn

import loratrf
from loratrf import FilterOutputError
from models import Net

ids = torch.randint(0, 20, (4, 6))


class Shifted(nn.Module):
    """Hidden states that all lie near one direction, as in pretrained models."""

    def __init__(self, d=8):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.register_buffer("offset", torch.full((d,), 3.0))

    def forward(self, x):
        return self.proj(x) * 0.1 + self.offset


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
    model = nn.Sequential(nn.Linear(3, 3, bias=False))
    loratrf.inject(model, filters=["0"])
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
    tokens = torch.tensor([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    loratrf.calibrate_filters(model, tokens)
    mean_direction = torch.tensor([0.5, 0.5, 0.0]) / (0.5**0.5)
    torch.testing.assert_close(model[0].task_filter.task_vector, mean_direction / 3.5)


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
