"""Top-K: the exact projection onto binary vectors with a cardinality (PDP's density step).

With θ ∈ {0, 1} and Σθ = K, ½‖θ − θ₀‖² = const + Σ_{θᵢ=1} (½ − θ₀ᵢ), minimised by keeping the K
largest θ₀. With Σθ ≤ K only entries with θ₀ᵢ > ½ are worth keeping. PDP's threshold t is the
midpoint between the smallest kept and the largest dropped score, reported in ``info``.
"""

from __future__ import annotations

import math

import numpy as np

from secateurs.errors import SolverRefusedError
from secateurs.problems.projection import Projection
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status


def _cardinality(problem: Projection) -> tuple[int, bool]:
    """(K, equality) when the only linear constraint counts entries; refuse otherwise."""
    if problem.total is not None and problem.costs.shape[0] == 0:
        return int(round(problem.total)), True
    if problem.total is None and problem.costs.shape[0] == 1:
        c = problem.costs[0]
        if np.allclose(c, c[0]) and c[0] > 0:
            return int(math.floor(problem.budgets[0] / c[0] + 1e-9)), False
    raise SolverRefusedError("topk needs exactly one cardinality constraint (Σθ = K, or a budget with equal costs)")


@register("topk", kinds=["projection"], exact=True)
def solve_topk(problem: Projection, *, time_limit: float | None, seed: int) -> SolveResult:
    """Exact for binary projections with one cardinality constraint; respects fixed entries."""
    if not problem.binary:
        raise SolverRefusedError("topk solves binary projections (set binary=True); use 'bisection' for the box")
    if problem.has_hierarchy():
        raise SolverRefusedError("topk does not handle the hierarchy (use 'cvxpy' with SCIP)")
    deadline = Deadline(time_limit)
    k, equality = _cardinality(problem)
    lo, hi = problem.bounds()
    forced = int(lo.sum())
    free = np.flatnonzero(lo != hi)
    slots = k - forced
    order = free[np.argsort(-problem.theta0[free], kind="stable")]
    chosen = order[: max(slots, 0)]
    if not equality:
        chosen = chosen[problem.theta0[chosen] > 0.5]
    theta = lo.copy()
    theta[chosen] = 1.0
    violations = problem.check(theta)
    if violations:
        return SolveResult(Status.INFEASIBLE, math.nan, None, info={"violations": violations})
    kept = problem.theta0[theta == 1]
    dropped = problem.theta0[theta == 0]
    threshold = None
    if kept.size and dropped.size:
        threshold = 0.5 * (float(kept.min()) + float(dropped.max()))
    objective = problem.evaluate(theta)
    return SolveResult(Status.OPTIMAL, objective, theta, bound=objective, iterations=1,
                       trace=[(deadline.elapsed(), objective)], info={"threshold": threshold, "k": k})
