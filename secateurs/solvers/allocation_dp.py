"""Exact dynamic programming for Allocation by bucket elimination of the groups' pairwise terms.

Budgets are real-valued, so the DP never discretises them. It eliminates groups one at a time
in a min-fill order (``problems.elimination``): group ``v``'s bucket keeps, for every assignment
of the groups ``v`` is still joined to, the Pareto set of (cost vector, error) pairs over the
groups eliminated into it, combining its children's sets by Minkowski sums and taking the union
over ``v``'s levels. On a forest that is the tree DP (for a separable problem, the classic
sequential knapsack DP); residual networks (a bottleneck's inner widths and the stream they read
and write, a projection shortcut) have tree width 2, so no bucket spans more than three groups.
Dominated points are dropped (any completion of a dominated point is matched by its dominator),
which alone makes the DP exact.

What makes it fast is bounding, as in Pisinger's MCKP algorithms. A Lagrangian multiplier
``λ ≥ 0`` (found by bisection for one budget, subgradient ascent for several) gives, for any
completion, ``error_rest ≥ min_rest(e + λ·cost) − λ·(limit − cost_so_far)``; the min over
everything outside a partial state is exact min-sum (inside/outside messages of the same
elimination). A state whose bound reaches the incumbent's error (greedy + Lagrangian solutions)
is dropped, and so is one whose least possible completion cost (per budget, again by min-sum)
already exceeds a limit. States are compared with a relative slack of 1e-10 on the incumbent, so
the result is optimal to that precision; ``bound`` is reported as ``objective − slack``.

Bounding is only as strong as the Lagrangian duality gap: every plan within it survives, and the
Pareto sets of a wide subtree can grow into the millions. Torchvision's EfficientNet-V2-S (random
weights, one FLOPs budget) left a gap of 3.2% and fronts of 88,000 plans per assignment, and ran
for hours. The DP counts the candidate sums it forms and refuses the problem past
``MAX_CANDIDATES`` (a few seconds of work), so a pipeline moves on to cpsat, which solved that
problem in 29 s. The deadline is checked at every join.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from secateurs.errors import SolverRefusedError
from secateurs.problems.allocation import Allocation, AllocationTables
from secateurs.problems.elimination import MAX_CELLS, Elimination, Messages, messages, spread
from secateurs.solvers.allocation_baselines import LocalMoves, greedy_plan
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status, Trace

_SLACK = 1e-10  # relative: errors of 1e-10 in all (nearly unpruned layers) are still told apart
MAX_CANDIDATES = 60_000_000  # candidate plans (sums of two partial plans) formed before dp refuses


def pareto(cost: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (cost vector ≤ and error ≤, one copy of ties)."""
    n = err.shape[0]
    if n <= 1:
        return np.arange(n)
    if cost.shape[1] == 0:
        return np.array([int(np.argmin(err))])
    if cost.shape[1] == 1:
        order = np.lexsort((err, cost[:, 0]))
        e = err[order]
        prev = np.concatenate([[np.inf], np.minimum.accumulate(e)[:-1]])
        return order[e < prev]
    order = np.lexsort(tuple(cost[:, k] for k in range(cost.shape[1] - 1, -1, -1)) + (err,))
    kept: list[int] = []
    kc = np.empty((0, cost.shape[1]))
    for i in order:
        if kc.shape[0] and np.any(np.all(kc <= cost[i], axis=1)):
            continue
        kept.append(int(i))
        kc = np.vstack([kc, cost[i]])
    return np.array(kept, dtype=np.int64)


def lagrangian(t: AllocationTables, lam: np.ndarray) -> tuple[float, np.ndarray]:
    """D(λ) = min_x e(x) + λ·(cost(x) − limit), a lower bound for every λ ≥ 0, and its minimiser."""
    node = [e + lam @ u for e, u in zip(t.error, t.unary, strict=True)]
    edge = {k: np.tensordot(lam, p, axes=1) for k, p in t.pairs.items()}
    value, x = t.minsum(node, edge)
    return value + float(lam @ (t.constant - t.limit)), x


def multipliers(t: AllocationTables, deadline: Deadline, iterations: int = 60
                ) -> tuple[np.ndarray, float, np.ndarray | None, float, int]:
    """Best multiplier found, its bound D(λ), the best feasible Lagrangian minimiser and its error."""
    R = t.r
    best_x: np.ndarray | None = None
    ub = math.inf
    evaluations = 0

    def visit(lam: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        nonlocal best_x, ub, evaluations
        evaluations += 1
        d, x = lagrangian(t, lam)
        c = t.costs(x)
        if np.all(c <= t.limit + t.tol):
            obj = t.objective(x)
            if obj < ub:
                best_x, ub = x, obj
        return d, x, c

    lam = np.zeros(R)
    d, _, c = visit(lam)
    best_lam, best_d = lam, d
    if np.all(c <= t.limit + t.tol):
        return best_lam, best_d, best_x, ub, evaluations
    err_span = sum(float(e.max() - e.min()) for e in t.error) + 1e-12
    if R == 1:
        lo, hi = 0.0, err_span / float(t.scale[0])
        for _ in range(200):
            d, _, c = visit(np.array([hi]))
            if d > best_d:
                best_lam, best_d = np.array([hi]), d
            if c[0] <= t.limit[0] + t.tol[0] or deadline.expired():
                break
            lo, hi = hi, hi * 4
        for _ in range(iterations):
            if deadline.expired() or hi - lo <= 1e-12 * hi:
                break
            mid = 0.5 * (lo + hi)
            d, _, c = visit(np.array([mid]))
            if d > best_d:
                best_lam, best_d = np.array([mid]), d
            if c[0] <= t.limit[0] + t.tol[0]:
                hi = mid
            else:
                lo = mid
        return best_lam, best_d, best_x, ub, evaluations
    scale = t.scale
    mu = np.zeros(R)  # multipliers on normalised rows: λ = μ / scale
    theta, stall = 1.0, 0
    for _ in range(3 * iterations):
        if deadline.expired():
            break
        d, _, c = visit(mu / scale)
        if d > best_d + 1e-12 * max(1.0, abs(best_d)):
            best_lam, best_d, stall = mu / scale, d, 0
        else:
            stall += 1
            if stall >= 8:
                theta, stall = theta / 2, 0
        g = (c - t.limit) / scale
        norm = float(g @ g)
        if norm <= 0 or theta < 1e-8:
            break
        target = ub if math.isfinite(ub) else best_d + 0.1 * abs(best_d) + err_span * 0.01
        mu = np.maximum(0.0, mu + theta * max(target - d, 1e-12 * err_span) / norm * g)
    return best_lam, best_d, best_x, ub, evaluations


class _Frontier(NamedTuple):
    """A Pareto set of partial plans: cost rows (n, R), errors (n,) and where each came from (n, m)."""

    cost: np.ndarray
    err: np.ndarray
    origin: np.ndarray


class _Bounds(NamedTuple):
    """What prunes a partial plan: ``err + λ·cost + rest[0] + shift`` must stay under ``cut`` and
    ``cost + rest[1:]`` within ``room``, ``rest`` being the least of everything not yet in the plan."""

    lam: np.ndarray
    shift: float
    room: np.ndarray
    cut: float

    def keep(self, cost: np.ndarray, err: np.ndarray, rest: np.ndarray) -> np.ndarray:
        """Which of the points (cost (n, R), err (n,)) survive; ``rest`` is (R + 1,) or one column per point."""
        return (err + cost @ self.lam + rest[0] + self.shift < self.cut) & np.all(cost + rest[1:].T <= self.room, axis=1)


def _join(front: _Frontier, other: _Frontier, rest: np.ndarray, bounds: _Bounds, work: _Work) -> _Frontier:
    """The Pareto set of every sum of a point of ``front`` and one of ``other`` that the bounds keep;
    each origin row gains the index of its ``other`` point."""
    n, m = front.err.shape[0], other.err.shape[0]
    work.add(n * m)
    if n == 0 or m == 0:
        return _Frontier(front.cost[:0], front.err[:0], np.zeros((0, front.origin.shape[1] + 1), dtype=np.int64))
    cost = (front.cost[:, None, :] + other.cost[None, :, :]).reshape(n * m, -1)
    err = (front.err[:, None] + other.err[None, :]).reshape(-1)
    idx = np.flatnonzero(bounds.keep(cost, err, rest))
    idx = idx[pareto(cost[idx], err[idx])]
    origin = np.column_stack([front.origin[idx // m], idx % m])
    return _Frontier(cost[idx], err[idx], origin)


def _project(axes: tuple[int, ...], scope: tuple[int, ...], at: tuple[int, ...]) -> tuple[int, ...]:
    """The levels of ``scope``'s groups within an assignment ``at`` of ``axes``."""
    return tuple(at[axes.index(g)] for g in scope)


def _leaf_frontiers(cost: np.ndarray, err: np.ndarray, outside: np.ndarray, shape: tuple[int, ...], bounds: _Bounds
                    ) -> dict[tuple[int, ...], _Frontier]:
    """A childless bucket under one budget, every assignment of its scope at once: the kept levels
    of v, sorted by cost, whose error is below every cheaper one's (what ``pareto`` keeps)."""
    levels = shape[0]
    c = cost.reshape(levels, -1).T  # (assignments, levels of v)
    e = np.broadcast_to(err, shape).reshape(levels, -1).T
    rest = outside.reshape(2, -1).T  # (assignments, channels): the λ channel and the budget's
    ok = (e + c * bounds.lam[0] + rest[:, :1] + bounds.shift < bounds.cut) & (c + rest[:, 1:] <= bounds.room[0])
    order = np.lexsort((e, c), axis=-1)
    e_sorted = np.where(np.take_along_axis(ok, order, axis=1), np.take_along_axis(e, order, axis=1), np.inf)
    best_before = np.concatenate([np.full((e.shape[0], 1), np.inf), np.minimum.accumulate(e_sorted, axis=1)[:, :-1]], axis=1)
    front = e_sorted < best_before
    rows, where = np.nonzero(front)
    chosen = order[rows, where]
    bounds_at = np.searchsorted(rows, np.arange(e.shape[0] + 1))
    out: dict[tuple[int, ...], _Frontier] = {}
    for m, at_scope in enumerate(np.ndindex(*shape[1:])):
        j = chosen[bounds_at[m]:bounds_at[m + 1]]
        out[at_scope] = _Frontier(c[m, j][:, None], e[m, j], j[:, None])
    return out


class _OutOfTime(Exception):
    """The deadline passed inside a bucket."""


class _TooManyCandidates(Exception):
    """The candidate plans formed passed ``MAX_CANDIDATES``."""


class _Work:
    """Counts the candidate plans the DP forms, and checks the deadline as it goes: one join of
    two large fronts takes seconds, so the deadline is checked at every join, not per bucket."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline
        self.candidates = 0
        self.group = -1  # the group whose bucket is being built

    def add(self, candidates: int) -> None:
        self.candidates += candidates
        if self.candidates > MAX_CANDIDATES:
            raise _TooManyCandidates
        if self.deadline.expired():
            raise _OutOfTime


def _bucket_frontiers(t: AllocationTables, elim: Elimination, msgs: Messages, v: int,
                      sets: dict[int, dict[tuple[int, ...], _Frontier]], bounds: _Bounds, work: _Work
                      ) -> dict[tuple[int, ...], _Frontier]:
    """Group ``v``'s message as Pareto sets: for each assignment of its scope, the plans of v's
    subtree (v's level first in each origin row, then one point index per child) the bounds keep."""
    axes = elim.bucket(v)
    shape = tuple(elim.sizes[g] for g in axes)
    err = np.broadcast_to(spread(t.error[v][None], (v,), axes)[0], shape)
    cost = np.zeros((t.r, *shape))
    cost += spread(t.unary[v], (v,), axes)
    for key in elim.pairs[v]:
        cost += spread(t.pairs[key], key, axes)
    kids = sorted(elim.children[v], key=lambda c: len(elim.scope[c]))  # those over v alone first
    kid_inside = [spread(msgs.inside[c], elim.scope[c], axes) for c in kids]
    outside = spread(msgs.outside[v], elim.scope[v], axes)
    work.group = v
    work.add(0)
    if not kids and t.r == 1:
        return _leaf_frontiers(cost[0], err, outside, shape, bounds)
    k = t.r + 1
    out: dict[tuple[int, ...], _Frontier] = {}
    for at_scope in np.ndindex(*shape[1:]):
        work.add(shape[0])
        c0 = cost[(slice(None), slice(None), *at_scope)].T  # every level of v at once: (L_v, R)
        e0 = err[(slice(None), *at_scope)]
        kid_rest = [np.broadcast_to(w[(slice(None), slice(None), *(0 if s == 1 else a for s, a in zip(w.shape[2:], at_scope,
                                                                                                     strict=True)))],
                                    (k, shape[0])) for w in kid_inside]
        rest = outside[(slice(None), slice(None), *at_scope)] + sum(kid_rest, np.zeros((k, 1)))
        js = np.flatnonzero(bounds.keep(c0, e0, rest))
        if not kids:
            js = js[pareto(c0[js], e0[js])]
            out[at_scope] = _Frontier(c0[js], e0[js], js[:, None])
            continue
        # the first child's set shifted by v's own point, for every kept level of v at once
        first = [sets[kids[0]][_project(axes, elim.scope[kids[0]], (int(j), *at_scope))] for j in js]
        work.add(sum(f.err.shape[0] for f in first))
        owner = np.repeat(np.arange(js.shape[0]), [f.err.shape[0] for f in first])
        c = np.concatenate([f.cost for f in first] or [np.zeros((0, t.r))]) + c0[js[owner]]
        e = np.concatenate([f.err for f in first] or [np.zeros(0)]) + e0[js[owner]]
        origin = np.column_stack([js[owner], np.concatenate([np.arange(f.err.shape[0]) for f in first] or [np.zeros(0, int)])])
        rest = rest - kid_rest[0]
        ok = np.flatnonzero(bounds.keep(c, e, rest[:, js[owner]]))
        c, e, origin, owner = c[ok], e[ok], origin[ok], owner[ok]
        if len(kids) > 1:  # the other children join level by level
            parts: list[_Frontier] = []
            for i, j in enumerate(js):
                mine = np.flatnonzero(owner == i)
                mine = mine[pareto(c[mine], e[mine])]
                front = _Frontier(c[mine], e[mine], origin[mine])
                left = rest[:, j]
                at = (int(j), *at_scope)
                for child, w in zip(kids[1:], kid_rest[1:], strict=True):
                    if front.err.shape[0] == 0:
                        break
                    left = left - w[:, j]
                    front = _join(front, sets[child][_project(axes, elim.scope[child], at)], left, bounds, work)
                if front.err.shape[0]:  # an emptied front stopped short of the last children
                    parts.append(front)
            c = np.concatenate([f.cost for f in parts] or [c[:0]])
            e = np.concatenate([f.err for f in parts] or [e[:0]])
            origin = np.concatenate([f.origin for f in parts] or [np.zeros((0, 1 + len(kids)), dtype=np.int64)])
        keep = pareto(c, e)
        out[at_scope] = _Frontier(c[keep], e[keep], origin[keep])
    if kids:  # origin columns follow the kids' order; store them in children order
        order = [1 + kids.index(c) for c in elim.children[v]]
        out = {key: _Frontier(f.cost, f.err, f.origin[:, [0, *order]]) for key, f in out.items()}
    return out


def _solve(problem: Allocation, deadline: Deadline) -> SolveResult:
    t = problem.tables
    trace = Trace(deadline)
    R = t.r
    if R == 0 or not np.any(np.isfinite(t.limit)):
        x = np.array([int(np.argmin(e)) for e in t.error])
        sol = problem.keep_of(x)
        obj = problem.evaluate(sol)
        trace.record(obj)
        return SolveResult(Status.OPTIMAL, obj, sol, bound=obj, trace=trace.points, info={"note": "no budgets"})
    elim = t.elimination
    widest, cells = elim.largest()
    if cells > MAX_CELLS:
        names = ", ".join(repr(t.names[g]) for g in elim.bucket(widest))
        raise SolverRefusedError(
            f"dp needs interactions of small tree width; eliminating {t.names[widest]!r} joins groups {names} "
            f"in a table of {cells:,} cells, more than {MAX_CELLS:,} (use cpsat or mip)")
    cycle = t.cycle_edge() if R > 1 else None
    if cycle is not None:
        raise SolverRefusedError(
            f"dp solves interactions with cycles under one budget; this problem has {R} ({', '.join(t.rows)}), whose "
            f"Pareto sets over cycles grow past what it can enumerate, and groups {cycle[0]!r} and {cycle[1]!r} close "
            "a cycle (use cpsat or mip)")

    lam, lag_bound, x_lag, ub, evals = multipliers(t, deadline)
    incumbent, ub_x = math.inf, None
    if x_lag is not None:
        m = LocalMoves(t, x_lag)
        m.improve(deadline)
        if t.feasible(m.x):
            incumbent, ub_x = t.objective(m.x), m.x.copy()
    x_g, _ = greedy_plan(t, deadline=deadline)
    if x_g is not None and t.objective(x_g) < incumbent:
        incumbent, ub_x = t.objective(x_g), x_g
    if math.isfinite(incumbent):
        trace.record(incumbent)
    info: dict[str, Any] = {"multiplier": lam.tolist(), "lagrangian_bound": lag_bound, "lagrangian_evaluations": evals,
                            "incumbent": incumbent, "elimination_cells": cells}
    if math.isfinite(incumbent) and lag_bound >= incumbent - _SLACK * abs(incumbent):
        return _finish(problem, ub_x, incumbent, info, trace, states=0)

    # channel 0: λ-weighted Lagrangian; channels 1..R: each budget's own cost
    node = [np.vstack([(e + lam @ u)[None, :], u]) for e, u in zip(t.error, t.unary, strict=True)]
    edge = {k: np.concatenate([np.tensordot(lam, p, axes=1)[None], p]) for k, p in t.pairs.items()}
    msgs = messages(elim, node, edge)
    cut = incumbent - _SLACK * abs(incumbent) if math.isfinite(incumbent) else math.inf
    bounds = _Bounds(lam, float(lam @ (t.constant - t.limit)), t.limit + t.tol - t.constant, cut)

    sets: dict[int, dict[tuple[int, ...], _Frontier]] = {}
    peak = 0
    work = _Work(deadline)
    roots = elim.roots
    front = _Frontier(np.zeros((1, R)), np.zeros(1), np.zeros((1, 0), dtype=np.int64))
    rest = sum((msgs.inside[r] for r in roots), np.zeros(R + 1))
    try:
        for v in elim.order:
            sets[v] = _bucket_frontiers(t, elim, msgs, v, sets, bounds, work)
            peak = max(peak, max((f.err.shape[0] for f in sets[v].values()), default=0))
        for r in roots:
            work.group = r
            rest = rest - msgs.inside[r]
            front = _join(front, sets[r][()], rest, bounds, work)
    except _OutOfTime:
        info["note"] = "time limit during the DP; incumbent returned"
        return _finish(problem, ub_x, incumbent, info, trace, states=peak, status=Status.LIMIT, bound=lag_bound)
    except _TooManyCandidates:
        gap = (f"a gap of {(incumbent - lag_bound) / max(abs(incumbent), 1e-300):.2%} to the incumbent"
               if math.isfinite(incumbent) else "no incumbent to bound by")
        raise SolverRefusedError(
            f"dp formed more than {MAX_CANDIDATES:,} candidate plans by group {t.names[work.group]!r}: its Lagrangian "
            f"bound leaves {gap}, and too many plans within it stay undominated (use cpsat or mip)") from None
    info["dp_states_peak"] = peak
    info["dp_candidates"] = work.candidates
    if front.err.shape[0] == 0:  # every state was pruned: the incumbent is optimal, or nothing is feasible
        if ub_x is None:
            return SolveResult(Status.INFEASIBLE, math.nan, None, iterations=peak, trace=trace.points,
                               info={**info, "note": "proved: no assignment meets every budget"})
        return _finish(problem, ub_x, incumbent, info, trace, states=peak)
    best = int(np.argmin(front.err))
    x = np.zeros(t.n, dtype=np.int64)
    stack = [(r, (), int(k)) for r, k in zip(roots, front.origin[best], strict=True)]
    while stack:
        v, at_scope, k = stack.pop()
        row = sets[v][at_scope].origin[k]
        x[v] = int(row[0])
        at = (x[v], *at_scope)
        for c, kc in zip(elim.children[v], row[1:], strict=True):
            stack.append((c, _project(elim.bucket(v), elim.scope[c], at), int(kc)))
    obj = t.objective(x)
    if ub_x is not None and incumbent <= obj:
        x = ub_x
    return _finish(problem, x, min(obj, incumbent), info, trace, states=peak)


def _finish(problem: Allocation, x: np.ndarray | None, value: float, info: dict[str, Any], trace: Trace, *,
            states: int, status: Status = Status.OPTIMAL, bound: float | None = None) -> SolveResult:
    if x is None:
        return SolveResult(Status.LIMIT if status == Status.LIMIT else Status.INFEASIBLE, math.nan, None,
                           bound=-math.inf if bound is None else bound, iterations=states, trace=trace.points, info=info)
    sol = problem.keep_of(x)
    obj = problem.evaluate(sol)
    trace.record(obj)
    if bound is None:
        bound = obj - _SLACK * abs(obj)
    return SolveResult(status, obj, sol, bound=min(bound, obj), iterations=states, trace=trace.points, info=info)


@register("dp", kinds=["allocation"], exact=True,
          description="exact Pareto DP with Lagrangian bounding by bucket elimination; forests and residual (tree-width-2) "
                      "interactions")
def dp(problem: Allocation, *, time_limit: float | None, seed: int) -> SolveResult:
    """Exact allocation by dynamic programming, eliminating groups along their pairwise terms.

    Raises
    ------
    SolverRefusedError
        When eliminating the interactions needs a table of more than ``MAX_CELLS`` cells (tree
        width too large for the groups' levels); the message names the groups it would join. Also
        when interactions with cycles come with several budgets (their Pareto sets grow too
        large); the message names the pair of groups that closes a cycle. And when it has formed
        more than ``MAX_CANDIDATES`` candidate plans (a wide duality gap); the message names the
        group and the gap.
    """
    return _solve(problem, Deadline(time_limit))
