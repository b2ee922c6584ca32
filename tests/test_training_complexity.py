"""Complexity-aware gates: budgets met exactly, gates driven to 0/1, dead gates stay dead."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.apply import apply
from secateurs.cost import CostModel, Polynomial
from secateurs.errors import ValidationError
from secateurs.graph.groups import Group, Member
from secateurs.training.complexity import ComplexityAware


def _setup() -> tuple[nn.Module, list[Group], CostModel]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    groups = [Group("h1", 16, [Member("0", "weight", 0, "producer"), Member("0", "bias", 0),
                               Member("2", "weight", 1, "consumer")]),
              Group("h2", 16, [Member("2", "weight", 0, "producer"), Member("2", "bias", 0),
                               Member("4", "weight", 1, "consumer")])]
    # Counted by hand for a batch of one: params 6h1 + h1 + h1h2 + h2 + 3h2 + 3; FLOPs 2(6h1 + h1h2 + 3h2).
    cost = CostModel(Polynomial(3, {"h1": 7, "h2": 4}, {("h1", "h2"): 1}),
                     Polynomial(0, {"h1": 12, "h2": 6}, {("h1", "h2"): 2}), {"h1": 16, "h2": 16})
    return model, groups, cost


def _train(ca: ComplexityAware, steps: int) -> None:
    torch.manual_seed(1)
    X = torch.randn(256, 6)
    y = X[:, :3].argmax(1)
    opt = torch.optim.Adam(ca.model.parameters(), 1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(ca.model(X), y) + ca.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ca.step()


def test_hard_budget_is_met_and_the_input_model_is_untouched() -> None:
    model, groups, cost = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ca = ComplexityAware(model, groups, cost, budget={"flops": 0.3}, lr=0.1, flatten=0.0)
    _train(ca, 60)
    plan = ca.finalize()
    achieved = cost(plan.kept_counts())
    assert achieved.flops <= 0.3 * cost().flops
    assert all(units == sorted(set(units)) and units for units in plan.keep.values())
    smaller = apply(ca.model, plan)  # the plan alone slices the model; count its parameters
    assert sum(p.numel() for p in smaller.parameters()) == achieved.params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("parametrizations" in k for k in ca.model.state_dict())


def test_gates_converge_to_zero_or_one() -> None:
    model, groups, cost = _setup()
    ca = ComplexityAware(model, groups, cost, strength=1.0, flatten=0.3, lr=0.1, init=0.6)
    _train(ca, 80)
    theta = torch.cat([t.detach() for t in ca.theta.values()])
    assert torch.all((theta < 1e-6) | (theta > 1 - 1e-6))


def test_dead_gates_stay_dead_and_eval_uses_rounded_gates() -> None:
    model, groups, cost = _setup()
    ca = ComplexityAware(model, groups, cost, strength=0.0, flatten=0.0)
    with torch.no_grad():
        ca.theta["h1"][:4] = 0.0
    ca.step()
    assert ca.dead["h1"][:4].all()
    with torch.no_grad():
        ca.theta["h1"][:4] = 0.7
    ca.step()
    assert torch.all(ca.theta["h1"][:4] == 0)
    ca.model.eval()
    x = torch.randn(3, 6)
    out = ca.model(x)
    ca.close()
    with torch.no_grad():  # removing units 0..3 of h1 by hand gives the same eval output
        ca.model[2].weight[:, :4] = 0
    torch.testing.assert_close(out, ca.model(x))


def test_errors_name_the_problem() -> None:
    model, groups, cost = _setup()
    with pytest.raises(ValidationError, match=r"budget: unknown budget 'latency'"):
        ComplexityAware(model, groups, cost, budget={"latency": 0.5})
    with pytest.raises(ValidationError, match=r"flops_priority: must be in \[0, 1\]"):
        ComplexityAware(model, groups, cost, flops_priority=2.0)
    with pytest.raises(ValidationError, match=r"layers: layer 'block' names group 'h3', which is not gated"):
        ComplexityAware(model, groups, cost, layers={"block": ["h3"]})
    frozen = Group("f", 2, [Member("4", "weight", 1, "consumer")], prunable=False, reason="reaches model output")
    with pytest.raises(ValidationError, match=r"group 'f' is frozen \(reaches model output\)"):
        ComplexityAware(model, [frozen], cost)
    with pytest.raises(ValidationError, match=r"finalize: ComplexityAware was never stepped"):
        ComplexityAware(model, groups, cost).finalize()


def test_layer_gates_project_with_the_hierarchy() -> None:
    model, groups, cost = _setup()
    ca = ComplexityAware(model, groups, cost, budget={"flops": 0.4}, layers={"block": ["h2"]}, lr=0.1, flatten=0.0)
    _train(ca, 10)
    layer = float(ca.layer_theta["block"].detach())
    assert torch.all(ca.theta["h2"].detach() <= layer + 1e-6)  # θ_unit ≤ θ_layer after every projection
    expected = float(ca.expected("flops").detach())
    assert expected <= 0.4 * cost().flops * (1 + 1e-6)  # the projection holds the linearised budget at θ
    plan = ca.finalize()
    assert cost(plan.kept_counts()).flops <= 0.4 * cost().flops
