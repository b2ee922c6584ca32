"""Exact projection onto the box and one linear constraint, by bisection on its multiplier.

θ(λ) = clip(θ₀ − λc, lo, hi) is the minimiser of the Lagrangian; cᵀθ(λ) is non-increasing in λ
when c ≥ 0, so the multiplier is found by bracketing and bisection, and then made exact by
solving the linear equation on the entries that are not clipped at that λ.
"""

from __future__ import annotations

import math

import numpy as np

from secateurs.errors import SolverRefusedError
from secateurs.problems.projection import Projection
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status


def _single_constraint(problem: Projection) -> tuple[np.ndarray, float, bool] | None:
    """(c, rhs, is_equality) of the one linear constraint, or None for a plain box."""
    rows = problem.costs.shape[0] + (problem.total is not None)
    if rows == 0:
        return None
    if rows > 1:
        raise SolverRefusedError(
            f"bisection handles one linear constraint; this projection has {problem.costs.shape[0]} budgets"
            f"{' and a total' if problem.total is not None else ''} (use 'cvxpy')"
        )
    if problem.total is not None:
        return np.ones(problem.size), float(problem.total), True
    c = problem.costs[0]
    if np.any(c < 0):
        raise SolverRefusedError("bisection needs non-negative budget costs (use 'cvxpy')")
    return c, float(problem.budgets[0]), False


@register("bisection", kinds=["projection"], exact=True, options={"tol": 1e-12, "max_iter": 200})
def solve_bisection(problem: Projection, *, time_limit: float | None, seed: int, tol: float,
                    max_iter: int) -> SolveResult:
    """Box + one budget (or Σθ = total): exact, with the multiplier as a certificate."""
    if problem.has_hierarchy():
        raise SolverRefusedError("bisection does not handle the θ_child ≤ θ_parent hierarchy (use 'cvxpy')")
    if problem.binary:
        raise SolverRefusedError("bisection projects onto the continuous box; binary projections need 'topk'")
    deadline = Deadline(time_limit)
    lo, hi = problem.bounds()
    theta0 = problem.theta0
    constraint = _single_constraint(problem)
    multiplier = 0.0
    iterations = 0
    theta = np.clip(theta0, lo, hi)
    if constraint is not None:
        c, rhs, equality = constraint

        def used(lam: float) -> float:
            return float(c @ np.clip(theta0 - lam * c, lo, hi))

        if equality or used(0.0) > rhs:
            # Bracket the multiplier: used() is non-increasing in λ.
            span = float(np.max(np.abs(theta0))) + 1.0
            scale = float(np.min(c[c > 0])) if np.any(c > 0) else 1.0
            left, right = -span / scale, span / scale
            if not equality:
                left = 0.0
            while used(right) > rhs and iterations < max_iter:
                right *= 2.0
                iterations += 1
            while used(left) < rhs and iterations < max_iter:
                left *= 2.0
                iterations += 1
            while right - left > tol * max(1.0, abs(right)) and iterations < max_iter:
                if deadline.expired():
                    break
                mid = 0.5 * (left + right)
                if used(mid) > rhs:
                    left = mid
                else:
                    right = mid
                iterations += 1
            multiplier = 0.5 * (left + right)
            # Exact finish: with the clipped set fixed, cᵀθ = rhs is linear in λ.
            raw = theta0 - multiplier * c
            free = (raw > lo) & (raw < hi) & (c != 0)
            denominator = float(c[free] @ c[free])
            if denominator > 0:
                clipped_use = float(c[~free] @ np.clip(raw, lo, hi)[~free])
                candidate = (float(c[free] @ theta0[free]) + clipped_use - rhs) / denominator
                trial = np.clip(theta0 - candidate * c, lo, hi)
                if abs(c @ trial - rhs) <= abs(used(multiplier) - rhs):
                    multiplier = candidate
            theta = np.clip(theta0 - multiplier * c, lo, hi)
            if not equality and c @ theta > rhs:  # float round-off: step to the feasible side
                multiplier = right
                theta = np.clip(theta0 - right * c, lo, hi)
    objective = problem.evaluate(theta)
    if problem.check(theta):
        return SolveResult(Status.INFEASIBLE, math.nan, None, iterations=iterations,
                           info={"violations": problem.check(theta)})
    if constraint is None:
        bound = objective
    elif problem.total is not None:
        bound = problem.lagrangian_bound(total_multiplier=multiplier)
    else:
        bound = problem.lagrangian_bound(budget_multipliers=np.array([multiplier]))
    status = Status.LIMIT if deadline.expired() else Status.OPTIMAL
    return SolveResult(status, objective, theta, bound=min(bound, objective), iterations=iterations,
                       trace=[(deadline.elapsed(), objective)], info={"multiplier": multiplier})
