"""Projection as a QP in CVXPY: any mix of budgets, density and hierarchy (binary via SCIP).

The returned bound is certified: the Lagrangian dual function evaluated at the solver's own
multipliers (clipped to their sign constraints), which lower-bounds the optimum for any
multipliers, so interior-point tolerances never make the bound wrong.
"""

from __future__ import annotations

import math

import cvxpy as cp
import numpy as np

from secateurs.errors import SolverError
from secateurs.problems.projection import Projection
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status


def _repair(problem: Projection, theta: np.ndarray) -> np.ndarray:
    """Remove solver round-off: clip to the box, then push children under their parents."""
    lo, hi = problem.bounds()
    theta = np.clip(theta, lo, hi)
    if problem.binary:
        theta = np.round(theta)
    if problem.has_hierarchy():
        assert problem.parent is not None
        order = _topological(problem.parent)
        for i in order:
            p = int(problem.parent[i])
            if p >= 0:
                theta[i] = min(theta[i], theta[p])
    return theta


def _topological(parent: np.ndarray) -> list[int]:
    """Entries ordered so that each comes after its parent."""
    depth = np.zeros(parent.shape[0], dtype=np.int64)
    for i in range(parent.shape[0]):
        node, d = i, 0
        while parent[node] >= 0:
            node, d = int(parent[node]), d + 1
        depth[i] = d
    return [int(i) for i in np.argsort(depth, kind="stable")]


@register("cvxpy", kinds=["projection"], exact=True,
          options={"backend": None, "verbose": False}, requires=("cvxpy",))
def solve_cvxpy(problem: Projection, *, time_limit: float | None, seed: int, backend: str | None,
                verbose: bool) -> SolveResult:
    """QP (Clarabel by default; SCIP for binary) over every constraint the problem has."""
    deadline = Deadline(time_limit)
    n = problem.size
    lo, hi = problem.bounds()
    theta = cp.Variable(n, boolean=problem.binary)
    constraints: list[cp.Constraint] = [theta >= lo, theta <= hi]
    budget_constraint = total_constraint = edge_constraint = None
    if problem.costs.shape[0]:
        budget_constraint = problem.costs @ theta <= problem.budgets
        constraints.append(budget_constraint)
    if problem.total is not None:
        total_constraint = cp.sum(theta) == problem.total
        constraints.append(total_constraint)
    children = np.flatnonzero(problem.parent >= 0) if problem.has_hierarchy() else np.zeros(0, dtype=np.int64)
    if children.size:
        assert problem.parent is not None
        edge_constraint = theta[children] <= theta[problem.parent[children]]
        constraints.append(edge_constraint)
    program = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(theta - problem.theta0)), constraints)
    name = backend or ("SCIP" if problem.binary else "CLARABEL")
    kwargs: dict[str, object] = {}
    if time_limit is not None and name == "SCIP":
        kwargs["scip_params"] = {"limits/time": max(deadline.remaining(), 0.01)}
    try:
        program.solve(solver=name, verbose=verbose, **kwargs)
    except cp.error.SolverError as exc:
        raise SolverError(f"cvxpy backend {name!r} failed on the projection: {exc}") from exc
    if program.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        return SolveResult(Status.INFEASIBLE, math.nan, None, info={"cvxpy_status": program.status})
    if theta.value is None:
        return SolveResult(Status.ERROR, math.nan, None, info={"cvxpy_status": program.status})
    solution = _repair(problem, np.asarray(theta.value, dtype=np.float64))
    violations = problem.check(solution)
    if violations:
        return SolveResult(Status.ERROR, math.nan, None, info={"cvxpy_status": program.status, "violations": violations})
    objective = problem.evaluate(solution)
    if problem.binary:
        bound = objective if program.status == cp.OPTIMAL else -math.inf
    else:
        bound = problem.lagrangian_bound(
            None if budget_constraint is None else np.asarray(budget_constraint.dual_value).ravel(),
            0.0 if total_constraint is None else float(np.asarray(total_constraint.dual_value).ravel()[0]),
            None if edge_constraint is None else np.asarray(edge_constraint.dual_value).ravel(),
        )
    status = Status.OPTIMAL if program.status == cp.OPTIMAL else Status.FEASIBLE
    return SolveResult(status, objective, solution, bound=min(bound, objective), iterations=1,
                       trace=[(deadline.elapsed(), objective)], info={"cvxpy_status": program.status, "backend": name})
