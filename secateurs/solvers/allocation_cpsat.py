"""Exact allocation with OR-Tools CP-SAT, for any pairwise (bilinear, latency) structure.

One Boolean per (group, allowed level) with exactly one true per group; one Boolean per
(edge, level pair) tied to the two one-hots by marginal constraints (``Σ_j y_ij = x_i``,
``Σ_i y_ij = x_j``), which with one-hot ``x`` forces ``y_ij = x_i·x_j`` exactly. Every table
entry is then a coefficient.

CP-SAT needs integers, so:

- Errors are shifted by each group's minimum and scaled by ``S = 1e9 / Σ_g span_g``, then rounded.
  The reported objective is recomputed exactly with ``evaluate``; the bound is CP-SAT's bound
  unscaled minus the largest total rounding (``Σ_g max_i |round(S·e) − S·e| / S``), so it stays a
  valid bound on the true optimum. Errors far below the largest round to ties, so when the
  greedy hint's exact error is below that of CP-SAT's plan, the hint is returned.
- Each budget row is scaled by ``s_r = 10^d``: the smallest ``d`` that makes every coefficient an
  integer (then the row is exact), else the largest with ``s_r·Σ|coefficients| ≤ 1e15``, with
  coefficients rounded up and the right-hand side ``floor(s_r·(limit − constant + tol))``, ``tol``
  the problem's own feasibility slack. Then every CP-SAT-feasible plan passes ``check`` and, when
  ``s_r·tol ≥ active terms + 1``, every truly feasible plan stays feasible ("sandwiched"), so
  CP-SAT's optimum is the problem's. Otherwise the row is "conservative" and the result is never
  reported ``optimal``. ``info["scaling"]`` states what was done per row.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from secateurs.problems.allocation import Allocation, AllocationTables

# ortools must load before highspy (pulled in by cvxpy): libortools needs HiGHS symbols that
# highspy's build does not export. Importing it with the solver package keeps that order.
# The price: cvxpy (imported later) cannot load its HIGHS back end, which nothing here uses;
# its one-line import warning about that is filtered out.
try:
    from ortools.linear_solver import pywraplp as _pywraplp  # noqa: F401
    from ortools.sat.python import cp_model as _cp_model  # noqa: F401

    logging.getLogger("__cvxpy__").addFilter(lambda record: "importing solver HIGHS" not in record.getMessage())
except ImportError:  # pragma: no cover - ortools is optional; the registry reports it missing
    pass
from secateurs.solvers.allocation_baselines import greedy_plan, unbound_optimum
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status, Trace

_ROW_MAGNITUDE = 1e15
_OBJECTIVE_MAGNITUDE = 1e9


def row_scaling(t: AllocationTables, r: int) -> tuple[float, str]:
    """(s_r, mode) with mode in {'exact', 'sandwiched', 'conservative'} (see the module docstring)."""
    values = [u[r] for u in t.unary] + [p[r].ravel() for p in t.pairs.values()]
    flat = np.concatenate(values) if values else np.zeros(0)
    total = float(sum(np.abs(v).max() for v in values if v.size)) + 1.0
    dmax = int(math.floor(math.log10(_ROW_MAGNITUDE / total)))
    for d in range(0, max(dmax, 0) + 1):
        s = 10.0**d
        scaled = flat * s
        if np.all(np.abs(scaled - np.round(scaled)) <= 1e-9 * np.maximum(1.0, np.abs(scaled))):
            return s, "exact"
    s = 10.0**dmax
    active = t.n + len(t.pairs) + 1
    return s, ("sandwiched" if s * float(t.tol[r]) >= active + 1 else "conservative")


def _int(values: np.ndarray, s: float, mode: str) -> list[int]:
    scaled = values * s
    return [int(v) for v in (np.round(scaled) if mode == "exact" else np.ceil(scaled))]


@register("cpsat", kinds=["allocation"], exact=True, options={"workers": 1, "hint": True, "linearization": 2},
          requires=("ortools",),
          description="OR-Tools CP-SAT on one-hot levels and level-pair products; exact for any bilinear structure")
def cpsat(problem: Allocation, *, time_limit: float | None, seed: int, workers: int, hint: bool,
          linearization: int) -> SolveResult:
    """Exact allocation with CP-SAT (see the module docstring for the integer scaling).

    Options
    -------
    workers : int
        CP-SAT search workers (default 1: the machines running tests are shared).
    hint : bool
        Start from the greedy plan.
    linearization : int
        CP-SAT ``linearization_level`` (default 2: the marginal constraints enter its LP, whose
        bound is what proves optimality on large knapsack rows).
    """
    from ortools.sat.python import cp_model

    free = unbound_optimum(problem)
    if free is not None:
        return free
    deadline = Deadline(time_limit)
    t = problem.tables
    model = cp_model.CpModel()
    x = [[model.NewBoolVar(f"x[{t.names[g]},{i}]") for i in range(lv.shape[0])] for g, lv in enumerate(t.levels)]
    for g in range(t.n):
        model.AddExactlyOne(x[g])
    y: dict[tuple[int, int], list[list[Any]]] = {}
    for (g, h), p in t.pairs.items():
        yy = [[model.NewBoolVar(f"y[{g},{h},{i},{j}]") for j in range(p.shape[2])] for i in range(p.shape[1])]
        for i in range(p.shape[1]):
            model.Add(sum(yy[i]) == x[g][i])
        for j in range(p.shape[2]):
            model.Add(sum(yy[i][j] for i in range(p.shape[1])) == x[h][j])
        y[(g, h)] = yy
    scaling: dict[str, str] = {}
    exact_rows = True
    for r in range(t.r):
        s, mode = row_scaling(t, r)
        scaling[t.rows[r]] = f"x{s:.0e} {mode}"
        exact_rows &= mode != "conservative"
        terms = []
        for g in range(t.n):
            terms += [c * v for c, v in zip(_int(t.unary[g][r], s, mode), x[g], strict=True) if c]
        for (g, h), p in t.pairs.items():
            coeffs = _int(p[r].ravel(), s, mode)
            flat = [v for row in y[(g, h)] for v in row]
            terms += [c * v for c, v in zip(coeffs, flat, strict=True) if c]
        rhs = math.floor(s * (float(t.limit[r]) - float(t.constant[r]) + float(t.tol[r])))
        model.Add(sum(terms) <= rhs)
    offset, S = t.error_scaling(_OBJECTIVE_MAGNITUDE)
    rounding = 0.0
    objective = []
    for g, e in enumerate(t.error):
        scaled = (e - e.min()) * S
        ints = np.round(scaled)
        rounding += float(np.abs(ints - scaled).max())
        objective += [int(c) * v for c, v in zip(ints, x[g], strict=True) if c]
    model.Minimize(sum(objective))
    start = None
    if hint:
        start, _ = greedy_plan(t, deadline=deadline)
        if start is not None:
            for g in range(t.n):
                for i in range(len(x[g])):
                    model.AddHint(x[g][i], int(i == start[g]))
    solver = cp_model.CpSolver()
    solver.parameters.num_search_workers = max(1, int(workers))
    solver.parameters.random_seed = int(seed)
    solver.parameters.linearization_level = int(linearization)
    if time_limit is not None:
        solver.parameters.max_time_in_seconds = max(deadline.remaining(), 0.01)
    code = solver.Solve(model)
    info: dict[str, Any] = {"scaling": f"errors x{S:.3g} (offset {offset:.6g}); budgets: {scaling}",
                            "cp_sat_status": solver.StatusName(code), "rounding_in_bound": rounding / S}
    trace = Trace(deadline)
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        xs = np.array([next(i for i, v in enumerate(x[g]) if solver.BooleanValue(v)) for g in range(t.n)])
        if start is not None and t.feasible(start) and t.objective(start) < t.objective(xs):
            # errors far below the largest round to the same integers, and CP-SAT may return any of the
            # tied plans: on EfficientNet-B0 (random weights) one kept 1 of 480 channels at 2e5 times
            # the hint's error; the bound, taken from the rounded model, still holds
            xs = start
            info["note"] = "greedy hint kept: its exact error is below CP-SAT's plan's, which the rounding tied"
        sol = problem.keep_of(xs)
        obj = problem.evaluate(sol)
        trace.record(obj)
        bound = solver.BestObjectiveBound() / S + offset - rounding / S if exact_rows else -math.inf
        if code == cp_model.OPTIMAL and exact_rows:
            status = Status.OPTIMAL
        elif time_limit is not None and deadline.expired():
            status = Status.LIMIT
        else:
            status = Status.FEASIBLE
        if problem.check(sol):  # cannot happen with the rounding above; never report a violating plan
            return SolveResult(Status.ERROR, math.nan, None, info={**info, "violations": problem.check(sol)})
        return SolveResult(status, obj, sol, bound=min(bound, obj), iterations=int(solver.NumBranches()),
                           trace=trace.points, info=info)
    if code == cp_model.INFEASIBLE and exact_rows:
        return SolveResult(Status.INFEASIBLE, math.nan, None, info=info)
    status = Status.LIMIT if code == cp_model.UNKNOWN else Status.ERROR
    if code == cp_model.UNKNOWN and start is not None and t.feasible(start):
        sol = problem.keep_of(start)  # out of time before CP-SAT's first plan: the greedy hint is the incumbent
        obj = problem.evaluate(sol)
        trace.record(obj)
        return SolveResult(Status.LIMIT, obj, sol, bound=-math.inf, trace=trace.points,
                           info={**info, "note": "time limit before CP-SAT's first plan; greedy hint returned"})
    if code == cp_model.INFEASIBLE:
        info["note"] = "infeasible after conservative rounding of a budget; not a proof"
    return SolveResult(status, math.nan, None, info=info)
