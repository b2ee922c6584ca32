"""Exact dynamic programming for Allocation on forests of pairwise terms (separable, chains, trees).

Budgets are real-valued, so the DP never discretises them. It keeps, for every group ``g`` and
level ``j`` of ``g``, the Pareto set of (cost vector, error) pairs over the subtree of ``g``
with ``x_g = j``; a parent combines its children's sets (shifted by the edge table) by Minkowski
sums, and a virtual root combines the trees (for a separable problem this is the classic
sequential knapsack DP). Dominated points are dropped (any completion of a dominated point
is matched by its dominator), which alone makes the DP exact.

What makes it fast is bounding, as in Pisinger's MCKP algorithms. A Lagrangian multiplier
``λ ≥ 0`` (found by bisection for one budget, subgradient ascent for several) gives, for any
completion, ``error_rest ≥ min_rest(e + λ·cost) − λ·(limit − cost_so_far)``; the min over
everything outside a partial state is an exact tree min-sum (inside/outside messages). A state
whose bound reaches the incumbent's error (greedy + Lagrangian solutions) is dropped, and so is
one whose least possible completion cost (per budget, again by min-sum) already exceeds a limit.
States are compared with a relative slack of 1e-10 on the incumbent, so the result is optimal
to that precision; ``bound`` is reported as ``objective − slack``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from secateurs.errors import SolverRefusedError
from secateurs.problems.allocation import Allocation, AllocationTables
from secateurs.solvers.allocation_baselines import LocalMoves, greedy_plan
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status, Trace

_SLACK = 1e-10


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


def _messages(a: list[np.ndarray], W: list[np.ndarray | None], parent: list[int], kids: list[list[int]],
              post: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Min-sum on the rooted tree for K channels at once: msg[c] (K, L_parent) and outside[g] (K, L_g)."""
    n = len(a)
    inside = [x.copy() for x in a]
    msg: list[np.ndarray] = [np.zeros(0)] * n
    for g in post:
        for c in kids[g]:
            inside[g] += msg[c]
        p = parent[g]
        if p >= 0:
            msg[g] = (W[g] + inside[g][:, None, :]).min(axis=2)  # type: ignore[operator]
    outside: list[np.ndarray] = [np.zeros(0)] * n
    root = post[-1]
    outside[root] = np.zeros_like(a[root])
    for g in reversed(post):
        if not kids[g]:
            continue
        base = a[g] + outside[g] + sum(msg[c] for c in kids[g])
        for c in kids[g]:
            outside[c] = ((base - msg[c])[:, :, None] + W[c]).min(axis=1)  # type: ignore[operator]
    return msg, outside


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
    edge = t.cycle_edge()
    if edge is not None:
        raise SolverRefusedError(
            f"dp needs the pairwise cost terms to form a chain or tree; groups {edge[0]!r} and {edge[1]!r} "
            f"close a cycle (use cpsat or mip)")

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
                            "incumbent": incumbent}
    if math.isfinite(incumbent) and lag_bound >= incumbent - _SLACK * max(1.0, abs(incumbent)):
        return _finish(problem, ub_x, incumbent, info, trace, states=0)

    # rooted forest + virtual root V (one level) over the trees
    parent, children, order = t.forest()
    n = t.n
    V = n
    par = [p if p >= 0 else V for p in parent] + [-1]
    kids = [list(c) for c in children] + [[g for g in order if parent[g] < 0]]
    post = list(reversed(order)) + [V]
    L = [lv.shape[0] for lv in t.levels] + [1]
    e_node = list(t.error) + [np.zeros(1)]
    u_node = list(t.unary) + [np.zeros((R, 1))]
    Pc: list[np.ndarray | None] = [None] * (n + 1)
    for c in range(n):
        Pc[c] = t.pair(par[c], c) if par[c] != V else np.zeros((R, 1, L[c]))
    # channel 0: λ-weighted Lagrangian; channels 1..R: each budget's own cost
    a = [np.vstack([(e + lam @ u)[None, :], u]) for e, u in zip(e_node, u_node, strict=True)]
    W: list[np.ndarray | None] = [None if p is None else np.concatenate([np.tensordot(lam, p, axes=1)[None], p]) for p in Pc]
    msg, outside = _messages(a, W, par, kids, post)
    shift = float(lam @ (t.constant - t.limit))
    room = t.limit + t.tol - t.constant
    cut = incumbent - _SLACK * max(1.0, abs(incumbent)) if math.isfinite(incumbent) else math.inf

    sets: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    steps: dict[tuple[int, int], list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = {}
    peak = 0
    for p in post:
        if deadline.expired():
            info["note"] = "time limit during the DP; incumbent returned"
            return _finish(problem, ub_x, incumbent, info, trace, states=peak, status=Status.LIMIT, bound=lag_bound)
        level_sets: list[tuple[np.ndarray, np.ndarray]] = []
        for j in range(L[p]):
            rest = outside[p][:, j] + sum((msg[c][:, j] for c in kids[p]), np.zeros(R + 1))
            Sc = u_node[p][:, j][None, :].copy()
            Se = np.array([e_node[p][j]])
            ok = (Se + Sc @ lam + rest[0] + shift < cut) & np.all(Sc + rest[1:] <= room, axis=1)
            Sc, Se = Sc[ok], Se[ok]
            record: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
            for c in kids[p]:
                if Se.shape[0] == 0:
                    break
                parts = [(sets[c][i][0] + Pc[c][:, j, i], sets[c][i][1], i) for i in range(L[c]) if sets[c][i][1].size]  # type: ignore[index]
                if not parts:
                    Sc, Se = Sc[:0], Se[:0]
                    break
                Cc = np.concatenate([q[0] for q in parts])
                Ce = np.concatenate([q[1] for q in parts])
                Ci = np.concatenate([np.full(q[1].shape[0], q[2]) for q in parts])
                Ck = np.concatenate([np.arange(q[1].shape[0]) for q in parts])
                keep = pareto(Cc, Ce)
                Cc, Ce, Ci, Ck = Cc[keep], Ce[keep], Ci[keep], Ck[keep]
                rest = rest - msg[c][:, j]
                nS, nC = Se.shape[0], Ce.shape[0]
                cost = (Sc[:, None, :] + Cc[None, :, :]).reshape(-1, R)
                err = (Se[:, None] + Ce[None, :]).reshape(-1)
                ok = (err + cost @ lam + rest[0] + shift < cut) & np.all(cost + rest[1:] <= room, axis=1)
                idx = np.flatnonzero(ok)
                front = pareto(cost[idx], err[idx])
                idx = idx[front]
                record.append((c, idx // nC, idx % nC, Ci, Ck))
                Sc, Se = cost[idx], err[idx]
                del nS
            steps[(p, j)] = record
            level_sets.append((Sc, Se))
            peak = max(peak, Se.shape[0])
        sets[p] = level_sets
        for c in kids[p]:
            del sets[c]
    Sc, Se = sets[V][0]
    info["dp_states_peak"] = peak
    if Se.shape[0] == 0:  # every state was pruned: the incumbent is optimal, or nothing is feasible
        if ub_x is None:
            return SolveResult(Status.INFEASIBLE, math.nan, None, iterations=peak, trace=trace.points,
                               info={**info, "note": "proved: no assignment meets every budget"})
        return _finish(problem, ub_x, incumbent, info, trace, states=peak)
    best = int(np.argmin(Se))
    x = np.zeros(n, dtype=np.int64)
    stack = [(V, 0, best)]
    while stack:
        p, j, k = stack.pop()
        if p != V:
            x[p] = j
        for c, s_ptr, c_ptr, Ci, Ck in reversed(steps[(p, j)]):
            ck = int(c_ptr[k])
            stack.append((c, int(Ci[ck]), int(Ck[ck])))
            k = int(s_ptr[k])
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
        bound = obj - _SLACK * max(1.0, abs(obj))
    return SolveResult(status, obj, sol, bound=min(bound, obj), iterations=states, trace=trace.points, info=info)


@register("dp", kinds=["allocation"], exact=True,
          description="exact Pareto DP with Lagrangian bounding; separable, chain and tree interactions")
def dp(problem: Allocation, *, time_limit: float | None, seed: int) -> SolveResult:
    """Exact allocation by dynamic programming over a forest of pairwise terms.

    Raises
    ------
    SolverRefusedError
        When the bilinear/latency interactions contain a cycle; the message names the pair of
        groups that closes it.
    """
    return _solve(problem, Deadline(time_limit))
