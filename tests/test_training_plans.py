"""Kept units from scores: the exact allocation against brute force over every keep count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secateurs.cost import CostModel, Polynomial
from secateurs.errors import InfeasibleBudgetError, ValidationError
from secateurs.training.plans import UnitBudget, allocate_units, check_budget
from secateurs.training.steps import ScaledStep


@st.composite
def unit_problems(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], CostModel, float, list[UnitBudget]]:
    """Scores for 1-3 gated groups, a frozen group at full size, bilinear costs, a FLOPs fraction."""
    sizes = {f"g{i}": draw(st.integers(1, 4)) for i in range(draw(st.integers(1, 3)))}
    names = list(sizes)
    sizes["frozen"] = 3
    coef = st.floats(0.0, 5.0)
    linear = {g: draw(coef) for g in [*names, "frozen"] if draw(st.booleans())}
    bilinear = {(g, h): draw(coef) for g, h in itertools.combinations([*names, "frozen"], 2) if draw(st.booleans())}
    flops = Polynomial(draw(coef), linear, bilinear)
    params = Polynomial(1.0, dict.fromkeys(names, 1.0))
    scores = {g: np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))) for g, n in sizes.items()
              if g != "frozen"}
    fraction = draw(st.floats(0.05, 1.0))
    caps = []
    if len(names) > 1 and draw(st.booleans()):
        chosen = tuple(names[:2])
        caps.append(UnitBudget("first two", chosen, draw(st.integers(2, sizes[chosen[0]] + sizes[chosen[1]]))))
    return scores, CostModel(params, flops, sizes), fraction, caps


def _brute_force(scores: dict[str, np.ndarray], cost: CostModel, fraction: float,
                 caps: list[UnitBudget]) -> float | None:
    """Most retained score over every keep count (≥ 1 per group) within the budgets, or None."""
    limit = fraction * cost().flops
    best = None
    names = list(scores)
    for counts in itertools.product(*(range(1, scores[g].size + 1) for g in names)):
        keep = dict(zip(names, counts, strict=True))
        if cost(keep).flops > limit + 1e-9 * max(1.0, limit):
            continue
        if any(sum(keep[g] for g in c.groups) > c.limit for c in caps):
            continue
        mass = sum(float(np.sort(scores[g])[::-1][: keep[g]].sum()) for g in names)
        best = mass if best is None else max(best, mass)
    return best


@given(unit_problems())
def test_allocation_keeps_the_most_score_within_every_budget(case: tuple) -> None:
    scores, cost, fraction, caps = case
    best = _brute_force(scores, cost, fraction, caps)
    if best is None:
        with pytest.raises(InfeasibleBudgetError):
            allocate_units(scores, cost_model=cost, budget={"flops": fraction}, unit_budgets=caps)
        return
    try:
        keep = allocate_units(scores, cost_model=cost, budget={"flops": fraction}, unit_budgets=caps)
    except InfeasibleBudgetError:  # each budget alone feasible is all Allocation checks up front
        pytest.fail("a feasible allocation was reported infeasible")
    counts = {g: len(units) for g, units in keep.items()}
    assert all(units == sorted(set(units)) and 0 <= min(units) and max(units) < scores[g].size for g, units in keep.items())
    assert cost(counts).flops <= fraction * cost().flops * (1 + 1e-9) + 1e-9
    assert all(sum(counts[g] for g in c.groups) <= c.limit for c in caps)
    mass = sum(float(scores[g][units].sum()) for g, units in keep.items())
    assert mass == pytest.approx(best, rel=1e-8, abs=1e-9)


def test_without_budgets_everything_is_kept_and_bad_budgets_are_named() -> None:
    keep = allocate_units({"a": torch.tensor([0.3, 0.9, 0.1])})
    assert keep == {"a": [0, 1, 2]}
    with pytest.raises(ValidationError, match=r"budget: unknown budget 'latency'"):
        check_budget({"latency": 0.5})
    with pytest.raises(ValidationError, match=r"budget: flops must be a fraction in \(0, 1\], got 1.5"):
        check_budget({"flops": 1.5})
    with pytest.raises(ValidationError, match=r"cost_model: a flops/params budget needs"):
        allocate_units({"a": torch.ones(2)}, budget={"flops": 0.5})
    cost = CostModel(Polynomial(10.0), Polynomial(10.0, {"a": 1.0}), {"a": 2})
    with pytest.raises(InfeasibleBudgetError, match=r"budget 'flops' cannot be met"):
        allocate_units({"a": torch.ones(2)}, cost_model=cost, budget={"flops": 0.5})


def test_scaled_step_keeps_relative_gradients_and_pulls_to_vertices() -> None:
    theta = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    step = ScaledStep([theta], lr=0.1)
    theta.grad = torch.tensor([1e-4, 2e-4, -1e-4], dtype=torch.float64)
    before = theta.detach().clone()
    step.step()
    moved = (before - theta.detach()).numpy()
    # First step: m̂ = g and √v̂ = RMS(g) over all entries, so the move is lr·g/RMS(g).
    g = np.array([1e-4, 2e-4, -1e-4])
    np.testing.assert_allclose(moved, 0.1 * g / np.sqrt(np.mean(g**2)), rtol=1e-9)
    pull = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    only = ScaledStep([pull], lr=0.1)
    only.step(flatten=1.0)  # no gradient: only the pull κ(1 − 2θ) towards the nearest vertex
    np.testing.assert_allclose(pull.detach().numpy(), [0.2 - 0.1 * 0.6, 0.5, 0.9 + 0.1 * 0.8])


@pytest.mark.parametrize("method", ["ChannelPDP", "ComplexityAware", "SoftCoefficients"])
def test_an_unreachable_budget_is_refused_before_training(method: str) -> None:
    """h1 = h2 = 1 costs 20 of 800 FLOPs: 1% cannot be met, and that is said at construction, not finalize."""
    from training_fixtures import two_layer_mlp

    from secateurs import training

    model, groups, cost = two_layer_mlp()
    with pytest.raises(InfeasibleBudgetError, match=r"budget 'flops' cannot be met: requested 8, least achievable 20"):
        getattr(training, method)(model, groups, cost_model=cost, budget={"flops": 0.01})
    assert getattr(training, method)(model, groups, cost_model=cost, budget={"flops": 0.03}) is not None


def test_removable_layers_count_as_gone_in_the_least_plan() -> None:
    """With h2's layer removable, the least plan drops it: 20 FLOPs becomes 12 (h1 = 1 alone)."""
    from training_fixtures import two_layer_mlp

    from secateurs.training import ComplexityAware

    model, groups, cost = two_layer_mlp()
    with pytest.raises(InfeasibleBudgetError, match=r"least achievable 12"):
        ComplexityAware(model, groups, cost, budget={"flops": 0.01}, layers={"block": ["h2"]})


def test_training_methods_name_bad_groups_and_cost_models() -> None:
    from training_fixtures import two_layer_mlp

    from secateurs.training import ChannelPDP, ComplexityAware

    model, _, cost = two_layer_mlp()
    _, wide_groups, wide_cost = two_layer_mlp(24, 16)  # groups of another (wider) model
    with pytest.raises(ValidationError, match=r"groups: group 'h1': its 24 units reach index 23 of '0.weight' dim 0, "
                                              r"which has size 16 \(groups made for another model\?\)"):
        ChannelPDP(model, wide_groups, density=0.5)
    with pytest.raises(ValidationError, match=r"cost_model: expected the graph's CostModel .*got NoneType"):
        ComplexityAware(model, wide_groups, None)  # type: ignore[arg-type]
