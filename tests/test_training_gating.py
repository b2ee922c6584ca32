"""Scaling a unit's consumer columns by 0 equals removing the unit (checked against slicing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import ValidationError
from secateurs.graph.groups import Group, Member
from secateurs.training.gating import UnitScales


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()


def _hidden() -> Group:
    return Group("0:out", 8, [
        Member("0", "weight", 0, "producer"), Member("0", "bias", 0), Member("1", "weight", 0),
        Member("1", "bias", 0), Member("1", "running_mean", 0), Member("1", "running_var", 0),
        Member("3", "weight", 1, "consumer"),
    ])


def test_zero_scale_equals_removing_the_units() -> None:
    model = _model()
    x = torch.randn(5, 6)
    keep = [0, 2, 3, 7]
    gates = UnitScales(model, [_hidden()])
    gates.set({"0:out": torch.tensor([1.0 if i in keep else 0.0 for i in range(8)])})
    gated = model(x)
    small = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3)).eval()
    gates.remove()
    with torch.no_grad():  # slice by hand: an independent computation of the pruned model
        small[0].weight.copy_(model[0].weight[keep])
        small[0].bias.copy_(model[0].bias[keep])
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(small[1], name).copy_(getattr(model[1], name)[keep])
        small[3].weight.copy_(model[3].weight[:, keep])
        small[3].bias.copy_(model[3].bias)
    torch.testing.assert_close(gated, small(x))
    torch.testing.assert_close(model(x), _model()(x))  # removed: the original model is back


def test_soft_scales_get_gradients() -> None:
    model = _model()
    gates = UnitScales(model, [_hidden()])
    scale = torch.full((8,), 0.5, requires_grad=True)
    gates.set({"0:out": scale})
    model(torch.randn(4, 6)).sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


def test_bad_groups_are_rejected_without_leaving_parametrisations() -> None:
    model = _model()
    with pytest.raises(ValidationError, match=r"groups: module 'nope' is not in the model"):
        UnitScales(model, [_hidden(), Group("x", 2, [Member("nope", "weight", 1, "consumer")])])
    assert not any("parametrizations" in k for k in model.state_dict())
    with pytest.raises(ValidationError, match=r"group 'y' has no consumer layer"):
        UnitScales(model, [Group("y", 2, [Member("0", "weight", 0, "producer")])])
    gates = UnitScales(model, [_hidden()])
    with pytest.raises(ValidationError, match=r"scales: group '0:out' needs shape \(8,\)"):
        gates.set({"0:out": torch.ones(3)})
