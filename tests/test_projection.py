"""Projection: exact solvers agree, KKT conditions hold, bounds are certified, errors are clear."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import secateurs
from secateurs.errors import InfeasibleBudgetError, SolverRefusedError, ValidationError
from secateurs.problems import Projection
from secateurs.solvers import Status
from secateurs.testing.projection import check_projection_solver, projections


def _kkt_residual(problem: Projection, theta: np.ndarray, multiplier: float, c: np.ndarray) -> float:
    """How far θ is from clip(θ₀ − λc) (stationarity + box complementarity)."""
    lo, hi = problem.bounds()
    return float(np.max(np.abs(theta - np.clip(problem.theta0 - multiplier * c, lo, hi))))


@given(projections(max_budgets=1))
def test_bisection_satisfies_kkt_and_agrees_with_cvxpy(problem: Projection) -> None:
    fast = secateurs.solve(problem, "bisection")
    qp = secateurs.solve(problem, "cvxpy")
    assert fast.status is Status.OPTIMAL and not problem.check(fast.solution)
    assert qp.status is Status.OPTIMAL and not problem.check(qp.solution)
    assert fast.objective == pytest.approx(qp.objective, abs=1e-6, rel=1e-6)
    lam = fast.info["multiplier"]
    if problem.costs.shape[0]:
        c = problem.costs[0]
        assert lam >= 0
        slack = problem.budgets[0] - c @ fast.solution
        assert lam * slack == pytest.approx(0.0, abs=1e-6 * max(1.0, lam))  # complementary slackness
        assert _kkt_residual(problem, fast.solution, lam, c) < 1e-8
    assert fast.bound <= fast.objective + 1e-12 and fast.gap < 1e-8


@given(projections(max_budgets=1, density=True))
def test_density_projection_is_exact(problem: Projection) -> None:
    if problem.costs.shape[0]:
        with pytest.raises(SolverRefusedError, match="one linear constraint"):
            secateurs.solve(problem, "bisection")
        return
    fast = secateurs.solve(problem, "bisection")
    qp = secateurs.solve(problem, "cvxpy")
    assert fast.solution.sum() == pytest.approx(problem.total, abs=1e-8)
    assert fast.objective == pytest.approx(qp.objective, abs=1e-6)
    assert _kkt_residual(problem, fast.solution, fast.info["multiplier"], np.ones(problem.size)) < 1e-8


@given(projections(max_budgets=2, hierarchy=True, density=False))
def test_cvxpy_hierarchy_is_feasible_with_a_certified_tight_bound(problem: Projection) -> None:
    result = secateurs.solve(problem, "cvxpy")
    assert result.status is Status.OPTIMAL
    assert problem.check(result.solution) == []
    # The bound is the dual function at the solver's multipliers: valid for any multipliers,
    # so bound <= objective always, and a tiny gap certifies optimality independently.
    assert result.bound <= result.objective + 1e-12
    assert result.objective - result.bound < 1e-5 * max(1.0, result.objective)


@given(projections(max_size=8, binary=True, density=True, max_budgets=0))
def test_topk_matches_brute_force(problem: Projection) -> None:
    result = secateurs.solve(problem, "topk")
    best = min(
        problem.evaluate(np.array(bits, dtype=float))
        for bits in itertools.product((0.0, 1.0), repeat=problem.size)
        if not problem.check(np.array(bits, dtype=float))
    )
    assert result.objective == pytest.approx(best, abs=1e-12)
    assert problem.check(result.solution) == []
    if result.info["threshold"] is not None:  # PDP's t separates kept from dropped free scores
        kept = result.solution == 1
        free = np.array([i not in problem.fixed for i in range(problem.size)])
        if (kept & free).any() and (~kept & free).any():
            assert problem.theta0[kept & free].min() >= problem.theta0[~kept & free].max()


@given(st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_lagrangian_bound_never_exceeds_the_optimum(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    problem = Projection(rng.normal(0.5, 1.0, n), costs=rng.uniform(0.1, 2, (1, n)), budgets=[0.3 * n])
    optimum = secateurs.solve(problem, "bisection").objective
    for _ in range(5):  # arbitrary multipliers: still a lower bound
        assert problem.lagrangian_bound(rng.uniform(0, 5, 1)) <= optimum + 1e-9


def test_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match=r"theta0: non-finite value at index 1"):
        Projection(np.array([0.1, np.nan]))
    with pytest.raises(ValidationError, match=r"costs: expected shape \(r, 3\)"):
        Projection(np.zeros(3), costs=np.ones((1, 2)), budgets=[1.0])
    with pytest.raises(ValidationError, match=r"parent: the hierarchy has a cycle"):
        Projection(np.zeros(3), parent=np.array([1, 2, 0]))
    with pytest.raises(ValidationError, match=r"fixed: entry 1 fixed at 1.0 above its ancestor 0"):
        Projection(np.zeros(2), parent=np.array([-1, 0]), fixed={0: 0.0, 1: 1.0})
    with pytest.raises(InfeasibleBudgetError, match=r"budgets\[0\].*requested 1, least achievable 2"):
        Projection(np.zeros(3), costs=np.array([[2.0, 1.0, 1.0]]), budgets=[1.0], fixed={0: 1.0})
    with pytest.raises(InfeasibleBudgetError, match=r"'total'.*requested 5, least achievable 3"):
        Projection(np.zeros(3), total=5)


def test_solvers_refuse_what_they_cannot_solve() -> None:
    hier = Projection(np.zeros(3), parent=np.array([-1, 0, 0]), costs=np.ones((1, 3)), budgets=[1.0])
    with pytest.raises(SolverRefusedError, match="hierarchy"):
        secateurs.solve(hier, "bisection")
    with pytest.raises(SolverRefusedError, match="binary"):
        secateurs.solve(Projection(np.zeros(3), total=1), "topk")
    assert {"bisection", "cvxpy", "topk"} <= set(secateurs.available(hier))


@given(st.sampled_from(["bisection", "cvxpy", "topk"]), st.booleans(), st.booleans(), st.data())
def test_every_solver_passes_the_conformance_check(solver: str, density: bool, binary: bool, data: st.DataObject) -> None:
    problem = data.draw(projections(max_size=8, max_budgets=0 if binary else 1, density=density or binary, binary=binary))
    reference = "cvxpy" if not problem.binary else None  # binary: SCIP; topk is checked against brute force above
    check_projection_solver(solver, problem, reference=reference)


def test_zero_cost_entries_are_clipped_independently_of_the_multiplier() -> None:
    problem = Projection(np.array([0.9, 0.8, 1.4, -0.2]), costs=np.array([[1.0, 0.0, 2.0, 1.0]]), budgets=[0.5])
    result = secateurs.solve(problem, "bisection")
    lam = result.info["multiplier"]
    # Entries the budget does not charge are just clipped; the others are clip(θ₀ − λc) with the
    # budget tight (θ₃ clips to 0): (0.9 − λ) + 2·(1.4 − 2λ) = 0.5 gives λ = 0.64, θ₀ = 0.26, θ₂ = 0.12.
    np.testing.assert_allclose(result.solution, [0.26, 0.8, 0.12, 0.0], atol=1e-9)
    assert lam == pytest.approx(0.64)
    assert problem.check(result.solution) == []


@given(st.data())
def test_projections_strategy_draws_jointly_feasible_problems(data: st.DataObject) -> None:
    """Independent check by an LP (scipy's HiGHS) over box, fixed entries, hierarchy, density and budgets."""
    from scipy.optimize import linprog

    from secateurs.testing import projections

    p = data.draw(projections(max_size=8, max_budgets=2, hierarchy=data.draw(st.booleans()), density=True))
    n = p.size
    rows, rhs = [], []
    for c, b in zip(p.costs, p.budgets, strict=True):
        rows.append(c)
        rhs.append(b)
    if p.parent is not None:
        for i, parent in enumerate(p.parent):
            if parent >= 0:
                row = np.zeros(n)
                row[i], row[parent] = 1.0, -1.0
                rows.append(row)
                rhs.append(0.0)
    bounds = [(v, v) if i in p.fixed else (0.0, 1.0) for i, v in ((i, p.fixed.get(i)) for i in range(n))]
    lp = linprog(np.zeros(n), A_ub=np.array(rows) if rows else None, b_ub=np.array(rhs) if rhs else None,
                 A_eq=np.ones((1, n)), b_eq=[p.total], bounds=bounds, method="highs")
    assert lp.status == 0, f"drawn problem is infeasible: {p}"


def test_a_nan_total_is_a_malformed_field_not_an_infeasible_budget() -> None:
    with pytest.raises(ValidationError, match=r"^total: must be a finite number, got nan"):
        Projection(np.zeros(3), total=float("nan"))
