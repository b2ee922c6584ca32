"""Hypothesis strategies for Projection problems (gate projections) and a solver conformance check."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

from secateurs.problems.projection import Projection
from secateurs.solvers import SolveResult, Status, solve
from secateurs.solvers.registry import SolverSpec
from secateurs.testing._conformance import check_reported, solve_or_refuse


@st.composite
def projections(
    draw: st.DrawFn,
    *,
    min_size: int = 1,
    max_size: int = 12,
    max_budgets: int = 1,
    hierarchy: bool = False,
    density: bool = False,
    binary: bool = False,
    fixed: bool = True,
) -> Projection:
    """Feasible Projection problems: θ₀ around [0, 1], non-negative costs (some exactly 0, as a
    dead gate's are), an optional forest hierarchy and an optional density (Σθ = total), and
    budgets drawn above one point that meets all of those, so every draw is jointly feasible."""
    n = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    theta0 = rng.normal(0.5, draw(st.sampled_from([0.1, 0.5, 2.0])), n)
    parent = None
    if hierarchy and n > 1:
        parent = -np.ones(n, dtype=np.int64)
        for i in range(1, n):
            if rng.random() < 0.6:
                parent[i] = int(rng.integers(0, i))
    fixed_entries: dict[int, float] = {}
    if fixed and n > 1:
        for i in rng.choice(n, size=int(rng.integers(0, max(1, n // 3) + 1)), replace=False):
            fixed_entries[int(i)] = 0.0 if (binary or rng.random() < 0.5) else float(rng.random())
        if parent is not None:  # a fixed entry may not exceed a fixed ancestor: fix it at 0
            for i in list(fixed_entries):
                p = int(parent[i])
                while p >= 0:
                    if p in fixed_entries:
                        fixed_entries[i] = 0.0
                    p = int(parent[p])
    lo, hi = Projection(theta0, parent=parent, fixed=fixed_entries).bounds()
    total = None
    if density:
        if binary:
            total = float(draw(st.integers(int(np.ceil(lo.sum())), int(np.floor(hi.sum())))))
        else:
            total = float(lo.sum() + (hi.sum() - lo.sum()) * rng.random())
    r = draw(st.integers(0, max_budgets))
    costs = rng.uniform(0.1, 3.0, (r, n))
    if r and rng.random() < 0.3:  # entries the budget does not charge (gates already removed, other components)
        costs[:, rng.random(n) < 0.3] = 0.0
    anchor = _feasible_point(lo, hi, total, binary)  # budgets are drawn above it: feasible jointly, not one by one
    budgets = np.array([float(costs[j] @ anchor + rng.random() * costs[j] @ (hi - anchor)) for j in range(r)])
    return Projection(theta0, costs=costs, budgets=budgets, parent=parent, fixed=fixed_entries,
                      total=total, binary=binary)


def _feasible_point(lo: np.ndarray, hi: np.ndarray, total: float | None, binary: bool) -> np.ndarray:
    """A point inside the box and hierarchy (``bounds`` nest children under parents) with Σθ = total."""
    if total is None:
        return lo
    if binary:  # lo, then free entries in index order (a parent's index is below its children's)
        point = lo.copy()
        for i in np.flatnonzero(hi > lo)[: int(round(total - lo.sum()))]:
            point[i] = 1.0
        return point
    span = hi.sum() - lo.sum()
    return lo + (hi - lo) * ((total - lo.sum()) / span if span > 0 else 0.0)


def check_projection_solver(
    solver: str | SolverSpec | Callable[..., Any],
    problem: Projection,
    *,
    reference: str | None = "cvxpy",
    tol: float = 1e-6,
    allow_refusal: bool = True,
    **options: Any,
) -> SolveResult | None:
    """Solve ``problem`` and assert what every projection solver owes its caller.

    - a :class:`SolveResult` whose solution meets every constraint (``check`` is empty) and whose
      objective equals ``problem.evaluate(solution)``;
    - the bound never exceeds the objective, and ``optimal`` comes with a tight bound;
    - the objective matches the ``reference`` solver's (an exact one) when both report optimal.

    Returns the result, or None when the solver refused the instance and ``allow_refusal``.
    """
    result = solve_or_refuse(problem, solver, allow_refusal=allow_refusal, **options)
    if result is None:
        return None
    name = result.solver
    check_reported(problem, result, tol=tol, abs_tol=1e-12)
    if result.status == Status.OPTIMAL:
        assert result.objective - result.bound <= tol * max(1.0, abs(result.objective)), \
            f"{name}: optimal with bound {result.bound} below objective {result.objective}"
        if reference is not None and reference != name:
            other = solve(problem, reference)
            if other.status == Status.OPTIMAL:
                assert math.isclose(result.objective, other.objective, rel_tol=tol, abs_tol=tol), \
                    f"{name}: objective {result.objective}, {reference} finds {other.objective}"
    return result
