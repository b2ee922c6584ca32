"""Hypothesis strategies for Allocation problems and a conformance check for allocation solvers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from secateurs.cost import Polynomial
from secateurs.problems.allocation import Allocation, Budget, Latency, LatencyTerm, restrict
from secateurs.solvers.registry import SolverSpec, get
from secateurs.solvers.result import SolveResult, Status
from secateurs.testing._conformance import check_reported, solve_or_refuse

STRUCTURES = ("separable", "chain", "tree", "cycle", "residual", "dense")
BUDGET_KINDS = ("params", "flops", "nonzeros", "latency")


def _edges(structure: str, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    if structure == "separable" or n == 1:
        return []
    if structure == "chain":
        return [(i, i + 1) for i in range(n - 1)]
    if structure == "tree":
        return [(int(rng.integers(0, i)), i) for i in range(1, n)]
    if structure == "residual":  # a stream g0 that blocks of two inner widths read and write (tree width 2)
        return [e for i in range(1, n, 2) for e in ((0, i), (i, i + 1), (0, i + 1)) if e[1] < n]
    if structure == "dense":  # every pair: tree width n - 1
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    edges = [(i, i + 1) for i in range(n - 1)]  # cycle
    if n >= 3:
        edges.append((0, n - 1))
    return edges


def _extremes(problem: Allocation, cost: Polynomial | Latency) -> tuple[float, float]:
    """Exact (min, max) of ``cost`` over the problem's allowed levels."""
    lo = Allocation(problem.levels, problem.errors, [Budget("probe", cost, 1e300)], min_keep=problem.min_keep,
                    max_keep=problem.max_keep, round_to=problem.round_to).least("probe")
    hi = Allocation(problem.levels, problem.errors, [Budget("probe", cost, -1e300, ">=")], min_keep=problem.min_keep,
                    max_keep=problem.max_keep, round_to=problem.round_to).least("probe")
    return lo, hi


@st.composite
def allocations(
    draw: st.DrawFn,
    *,
    min_groups: int = 1,
    max_groups: int = 5,
    max_levels: int = 4,
    structures: Sequence[str] = STRUCTURES,
    budget_kinds: Sequence[str] = BUDGET_KINDS,
    max_budgets: int = 2,
    bounds: bool = True,
    components: bool = True,
    weights: bool = True,
) -> Allocation:
    """Allocation problems whose every single budget is satisfiable (jointly they may not be).

    Groups ``g0..g{n-1}`` with 2–16 units, 1–``max_levels`` candidate keep counts, noisy mostly
    decreasing errors, pairwise terms along a separable/chain/tree/cycle/residual/dense structure, 1–``max_budgets``
    budgets among params (linear + bilinear + squares), FLOPs (bilinear), nonzeros (linear) and
    latency (tables on edges), optional min/max/round_to bounds and a ``>=`` component bound.
    Limits are drawn between the exact least and most achievable cost.
    """
    n = draw(st.integers(min_groups, max_groups))
    structure = draw(st.sampled_from(list(structures)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    names = [f"g{i}" for i in range(n)]
    levels: dict[str, list[int]] = {}
    errors: dict[str, list[float]] = {}
    for g in names:
        size = int(rng.integers(max(2, max_levels), 17))
        count = int(rng.integers(1, max_levels + 1))
        lv = sorted(int(v) for v in rng.choice(np.arange(1, size + 1), size=count, replace=False))
        levels[g] = lv
        base = np.cumsum(rng.exponential(1.0, count))[::-1] - rng.exponential(0.5)
        errors[g] = [float(v) for v in base + rng.normal(0, 0.3, count)]
    edges = _edges(structure, n, rng)
    min_keep: dict[str, float] = {}
    max_keep: dict[str, float] = {}
    round_to: dict[str, float] = {}
    if bounds:
        for g in names:
            lv = levels[g]
            roll = rng.random()
            if roll < 0.15:
                min_keep[g] = float(lv[int(rng.integers(0, len(lv)))])
            elif roll < 0.3:
                max_keep[g] = float(lv[int(rng.integers(0, len(lv)))])
            elif roll < 0.4 and any(v % 2 == 0 for v in lv):
                round_to[g] = 2.0
    w = {g: float(rng.choice([0.5, 1.0, 2.0])) for g in names} if weights and draw(st.booleans()) else None
    base = Allocation(levels, errors, weights=w, min_keep=min_keep, max_keep=max_keep, round_to=round_to)
    kinds = draw(st.lists(st.sampled_from(list(budget_kinds)), min_size=1, max_size=max_budgets, unique=True))
    budgets: list[Budget] = []
    params: Polynomial | None = None
    for kind in kinds:
        if kind == "latency":
            terms = []
            for a, b in edges:
                ga, gb = names[a], names[b]
                noise = rng.uniform(0, 3, (len(levels[ga]), len(levels[gb])))
                table = np.outer(levels[ga], levels[gb]) * rng.uniform(0.5, 2.0) + noise
                terms.append(LatencyTerm(table, ga, gb, levels[ga], levels[gb]))
            g0 = names[int(rng.integers(0, n))]
            terms.append(LatencyTerm(np.asarray(levels[g0], float) * 1.5, None, g0, (), levels[g0]))
            cost: Polynomial | Latency = Latency(terms, float(rng.uniform(0, 5)))
        else:
            linear = {g: float(rng.uniform(0.5, 5.0)) for g in names} if kind != "flops" else \
                {g: float(rng.uniform(0, 2.0)) for g in names if rng.random() < 0.5}
            if kind == "nonzeros":
                linear = {g: 1.0 for g in names}
            bilinear: dict[tuple[str, str], float] = {}
            if kind in ("params", "flops"):
                for a, b in edges:
                    bilinear[(names[a], names[b])] = float(rng.uniform(0.2, 3.0))
                if kind == "params" and rng.random() < 0.3:
                    g = names[int(rng.integers(0, n))]
                    bilinear[(g, g)] = float(rng.uniform(0.1, 1.0))
            cost = Polynomial(float(rng.uniform(0, 10)), linear, bilinear)
            if kind == "params":
                params = cost
        lo, hi = _extremes(base, cost)
        frac = draw(st.sampled_from([0.0, 0.05, 0.3, 0.6, 1.0]))
        budgets.append(Budget(kind, cost, lo + frac * (hi - lo)))
    if components and params is not None and n >= 2 and draw(st.booleans()):
        members = tuple(sorted(rng.choice(names, size=int(rng.integers(1, n)), replace=False).tolist()))
        own = restrict(params, members)
        lo, hi = _extremes(base, own)
        frac = draw(st.sampled_from([0.0, 0.3, 0.8]))
        budgets.append(Budget("component", own, lo + frac * (hi - lo), ">=", members))
    return Allocation(levels, errors, budgets, weights=w, min_keep=min_keep, max_keep=max_keep, round_to=round_to)


def brute_force_allocation(problem: Allocation, limit: int = 200_000) -> tuple[float, dict[str, float] | None]:
    """Exact optimum by enumerating every combination of allowed levels: (optimum or inf, solution)."""
    t = problem.tables
    sizes = [lv.shape[0] for lv in t.levels]
    if math.prod(sizes) > limit:
        raise ValueError(f"{math.prod(sizes)} combinations exceed the enumeration limit {limit}")
    best, arg = math.inf, None
    for x in itertools.product(*(range(s) for s in sizes)):
        if t.feasible(x):
            v = t.objective(x)
            if v < best:
                best, arg = v, x
    return best, (problem.keep_of(arg) if arg is not None else None)


def check_allocation_solver(
    solver: str | SolverSpec | Callable[..., Any],
    problem: Allocation,
    *,
    optimum: float | None = None,
    time_limit: float | None = None,
    seed: int = 0,
    allow_refusal: bool = True,
    **options: Any,
) -> SolveResult | None:
    """Solve ``problem`` and assert what every allocation solver owes its caller.

    - a :class:`SolveResult`; a reported solution meets every budget and bound (``check`` is
      empty) and its objective equals ``problem.evaluate(solution)``;
    - the bound never exceeds the objective; ``optimal`` comes with a tight bound;
    - with ``optimum`` known (``inf`` when infeasible): nobody beats it, no bound exceeds it, an
      exact solver reporting ``optimal`` matches it, and any solver reporting ``infeasible`` is
      right (a heuristic that finds nothing says ``error`` or ``limit``).

    Returns the result, or None when the solver refused the instance and ``allow_refusal``.
    """
    result = solve_or_refuse(problem, solver, allow_refusal=allow_refusal, time_limit=time_limit, seed=seed, **options)
    if result is None:
        return None
    name = result.solver
    exact = isinstance(solver, str) and get(solver, problem).exact
    tol = 1e-6
    check_reported(problem, result, tol=tol, abs_tol=1e-9)
    if result.status == Status.INFEASIBLE:
        assert result.solution is None, f"{name}: status infeasible but a solution is attached"
    if result.status == Status.OPTIMAL:
        assert result.gap <= 1e-6, f"{name}: optimal with gap {result.gap}"
    if optimum is not None:
        scale = tol * max(1.0, abs(optimum)) if math.isfinite(optimum) else 0.0
        if result.ok:
            assert math.isfinite(optimum), f"{name}: found {result.objective} on an infeasible problem"
            assert result.objective >= optimum - scale, f"{name}: objective {result.objective} beats the optimum {optimum}"
        if math.isfinite(result.bound) and math.isfinite(optimum):
            assert result.bound <= optimum + scale, f"{name}: bound {result.bound} above the optimum {optimum}"
        if exact and result.status == Status.OPTIMAL:
            assert math.isclose(result.objective, optimum, rel_tol=tol, abs_tol=tol), \
                f"{name}: 'optimal' {result.objective} but the optimum is {optimum}"
        if result.status == Status.INFEASIBLE:  # a property of the problem, whoever claims it
            assert not math.isfinite(optimum), f"{name}: claims infeasible but the optimum is {optimum}"
    return result
