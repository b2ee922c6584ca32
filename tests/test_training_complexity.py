"""Complexity-aware gates: budgets met exactly, gates driven to 0/1, dead gates stay dead."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from training_fixtures import check_finalized_once, two_layer_mlp

from secateurs.apply import apply
from secateurs.errors import ValidationError
from secateurs.graph.groups import Group, Member
from secateurs.training.complexity import ComplexityAware
from secateurs.training.pdp import DensitySchedule


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
    model, groups, cost = two_layer_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ca = ComplexityAware(model, groups, cost, budget={"flops": 0.3}, lr=0.1, flatten=0.0)
    _train(ca, 60)
    theta = {g: t.detach().clone() for g, t in ca.theta.items()}
    plan = ca.finalize()
    achieved = cost({**cost.sizes, **plan.kept_counts()})
    assert achieved.flops <= 0.3 * cost().flops
    # The kept units retain the most probability mass of any choice within the exact budget:
    # brute force over every pair of keep counts, each group keeping its most probable units.
    best = max(sum(float(torch.sort(theta[g], descending=True).values[:k].sum()) for g, k in zip(theta, ks, strict=True))
               for ks in itertools.product(range(1, 17), repeat=2)
               if cost(dict(zip(theta, ks, strict=True))).flops <= 0.3 * cost().flops)
    kept = {g: plan.keep.get(g, list(range(16))) for g in theta}
    assert sum(float(theta[g][units].sum()) for g, units in kept.items()) == pytest.approx(best, rel=1e-9)
    assert all(units == sorted(set(units)) and units for units in plan.keep.values())
    smaller = apply(ca.model, plan)  # the plan alone slices the model; count its parameters
    assert sum(p.numel() for p in smaller.parameters()) == achieved.params
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("parametrizations" in k for k in ca.model.state_dict())


def test_gates_converge_to_zero_or_one() -> None:
    model, groups, cost = two_layer_mlp()
    ca = ComplexityAware(model, groups, cost, strength=1.0, flatten=0.3, lr=0.1, init=0.6)
    _train(ca, 80)
    theta = torch.cat([t.detach() for t in ca.theta.values()])
    assert torch.all((theta < 1e-6) | (theta > 1 - 1e-6))
    assert ca.undecided() == 0.0


def test_hard_budget_gates_converge_and_the_budget_ramps() -> None:
    model, groups, cost = two_layer_mlp()
    ca = ComplexityAware(model, groups, cost, budget={"flops": 0.4}, lr=0.1, flatten=0.5, init=1.0,
                         schedule=DensitySchedule(warmup=0, ramp=20))
    assert ca.budget_now()["flops"] == pytest.approx(1 - 0.6 / 20)  # step 0 is the first of the ramp
    _train(ca, 120)
    assert ca.budget_now()["flops"] == pytest.approx(0.4)
    # Gates are decided: dead ones at 0, live ones pushed under 1 only by the budget's shift, at
    # most one fractional gate per budget (the linear program's vertex has one).
    theta = {g: t.detach().clone() for g, t in ca.theta.items()}
    flat = torch.cat(list(theta.values()))
    assert int(((flat > 0.1) & (flat < 0.9)).sum()) <= 1
    assert float(ca.expected("flops").detach()) <= 0.4 * cost().flops * (1 + 1e-6)
    plan = ca.finalize()
    kept = {g: set(plan.keep.get(g, range(16))) for g in theta}
    assert cost({g: len(u) for g, u in kept.items()}).flops <= 0.4 * cost().flops
    for g, t in theta.items():  # the plan is the decided network
        assert {i for i in range(16) if t[i] > 0.9} <= kept[g]
        assert not {i for i in range(16) if t[i] < 0.1} & kept[g]


def test_penalty_is_the_weighted_expected_cost() -> None:
    model, groups, cost = two_layer_mlp()
    ca = ComplexityAware(model, groups, cost, strength=2.0, flops_priority=0.25, init=0.5)
    # No layer gates: the penalty is γ·(α·E[FLOPs]/FLOPs₀ + (1−α)·E[params]/P₀), computed by hand
    # from the polynomials with E[k] = 8 and E[k_h1·k_h2] = 64 (independent gates at ½).
    flops = 12 * 8 + 6 * 8 + 2 * 64
    params = 3 + 7 * 8 + 4 * 8 + 64
    dense = cost()
    expected = 2.0 * (0.25 * flops / dense.flops + 0.75 * params / dense.params)
    assert float(ca.penalty().detach()) == pytest.approx(expected, rel=1e-6)
    assert float(ComplexityAware(model, groups, cost, budget={"flops": 0.5}).penalty()) == 0.0


def test_layer_balance_splits_the_gradient_between_layer_and_unit_gates() -> None:
    model, groups, cost = two_layer_mlp()
    ca = ComplexityAware(model, groups, cost, strength=2.0, flops_priority=0.25, layer_balance=0.3, init=0.5,
                         layers={"block": ["h2"]})
    ca.penalty().backward()
    # By hand, all gates at ½ (Σθ = 8 per group), h2 inside the layer gate θ_l:
    # E[FLOPs] = 12Σθ1 + 6θ_lΣθ2 + 2θ_lΣθ1Σθ2, E[params] = 3 + 7Σθ1 + 4θ_lΣθ2 + θ_lΣθ1Σθ2.
    # ∂/∂θ_l: FLOPs 6·8 + 2·64 = 176, params 4·8 + 64 = 96; ∂/∂θ_h1,i: FLOPs 12 + 2·½·8 = 20,
    # params 7 + ½·8 = 11. Dense: FLOPs 800, params 435. β weighs the layer term, 1 − β the units.
    layer = 2.0 * 0.3 * (0.25 * 176 / 800 + 0.75 * 96 / 435)
    unit = 2.0 * 0.7 * (0.25 * 20 / 800 + 0.75 * 11 / 435)
    assert float(ca.layer_theta["block"].grad) == pytest.approx(layer, rel=1e-5)
    torch.testing.assert_close(ca.theta["h1"].grad, torch.full((16,), unit, dtype=torch.float64), rtol=1e-5, atol=0)


def test_dead_gates_stay_dead_and_eval_uses_rounded_gates() -> None:
    model, groups, cost = two_layer_mlp()
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
    model, groups, cost = two_layer_mlp()
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
    check_finalized_once(ComplexityAware(model, groups, cost), "ComplexityAware", " or closed")


def test_layer_gates_project_with_the_hierarchy() -> None:
    model, groups, cost = two_layer_mlp()
    ca = ComplexityAware(model, groups, cost, budget={"flops": 0.4}, layers={"block": ["h2"]}, lr=0.1, flatten=0.0)
    _train(ca, 10)
    layer = float(ca.layer_theta["block"].detach())
    assert torch.all(ca.theta["h2"].detach() <= layer + 1e-6)  # θ_unit ≤ θ_layer after every projection
    expected = float(ca.expected("flops").detach())
    assert expected <= 0.4 * cost().flops * (1 + 1e-6)  # the projection holds the linearised budget at θ
    plan = ca.finalize()
    assert cost(plan.kept_counts()).flops <= 0.4 * cost().flops
