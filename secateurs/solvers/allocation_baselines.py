"""Allocation baselines: ``greedy`` (best marginal error per unit of cost) and ``uniform``.

The greedy moves here are also the repair/improve step of the ``kde`` solver and the incumbent
of ``dp``: one implementation, maintained incrementally so that a move costs O(G·L·R) numpy work.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from secateurs.problems.allocation import Allocation, AllocationTables
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status, Trace

_EPS = 1e-15


class LocalMoves:
    """An assignment ``x`` (allowed-level indices) with the cost change of every single-group move.

    ``Q[r, g, i]`` holds group ``g``'s pairwise terms at level ``i`` against its neighbours'
    current levels, so the change of moving ``g`` to ``i`` is ``(U + Q)[:, g, i] − (U + Q)[:, g, x_g]``.
    """

    def __init__(self, tables: AllocationTables, x: np.ndarray) -> None:
        self.t = tables
        G, R = tables.n, tables.r
        lmax = max(lv.shape[0] for lv in tables.levels)
        self.valid = np.zeros((G, lmax), dtype=bool)
        self.E = np.full((G, lmax), np.inf)
        self.U = np.zeros((R, G, lmax))
        for g in range(G):
            L = tables.levels[g].shape[0]
            self.valid[g, :L] = True
            self.E[g, :L] = tables.error[g]
            self.U[:, g, :L] = tables.unary[g]
        self.x = np.asarray(x, dtype=np.int64).copy()
        self.Q = np.zeros((R, G, lmax))
        for (g, h), p in tables.pairs.items():
            self.Q[:, g, : p.shape[1]] += p[:, :, self.x[h]]
            self.Q[:, h, : p.shape[2]] += p[:, self.x[g], :]
        self.c = tables.costs(self.x)
        self.rows = np.arange(G)
        self.moves = 0

    def deltas(self) -> tuple[np.ndarray, np.ndarray]:
        """(ΔE (G, L), ΔC (R, G, L)) of every single-group move; invalid levels get ΔE = inf."""
        C = self.U + self.Q
        cur = C[:, self.rows, self.x]
        dE = self.E - self.E[self.rows, self.x][:, None]
        return dE, C - cur[:, :, None]

    def violation_after(self, dC: np.ndarray) -> np.ndarray:
        t = self.t
        over = self.c[:, None, None] + dC - t.limit[:, None, None]
        over = np.where(over <= t.tol[:, None, None], 0.0, over)
        return (over / t.scale[:, None, None]).sum(axis=0)

    def violation(self) -> float:
        over = self.c - self.t.limit
        over[over <= self.t.tol] = 0.0
        return float(np.sum(over / self.t.scale))

    def apply(self, g: int, i: int, dC: np.ndarray | None = None) -> None:
        old = int(self.x[g])
        if old == i:
            return
        for h in self.t.neighbors[g]:
            p = self.t.pair(h, g)  # (R, L_h, L_g)
            self.Q[:, h, : p.shape[1]] += p[:, :, i] - p[:, :, old]
        self.x[g] = i
        self.c = self.t.costs(self.x) if dC is None else self.c + dC[:, g, i]
        self.moves += 1

    def repair(self, deadline: Deadline | None = None) -> bool:
        """Reduce the violation by the move with the best violation drop per unit of error added."""
        limit = 50 * sum(lv.shape[0] for lv in self.t.levels) + 100
        while (v := self.violation()) > 0:
            if limit == 0 or (deadline is not None and deadline.expired()):
                return False
            limit -= 1
            dE, dC = self.deltas()
            gain = v - self.violation_after(dC)
            ok = self.valid & (gain > 1e-12 * max(v, 1e-300))
            if not ok.any():
                return False
            score = np.where(dE <= 0, 1e300 * gain, gain / np.maximum(dE, _EPS))
            score = np.where(ok, score, -np.inf)
            g, i = np.unravel_index(int(np.argmax(score)), score.shape)
            self.apply(int(g), int(i), dC)
        self.c = self.t.costs(self.x)  # exact, not accumulated
        return self.violation() == 0

    def improve(self, deadline: Deadline | None = None) -> None:
        """While feasible, take the move with the best error drop per unit of normalised cost added."""
        t = self.t
        for _ in range(50 * sum(lv.shape[0] for lv in t.levels) + 100):
            if deadline is not None and deadline.expired():
                break
            dE, dC = self.deltas()
            newc = self.c[:, None, None] + dC
            feasible = np.all(newc <= (t.limit + t.tol)[:, None, None], axis=0)
            ok = self.valid & feasible & (dE < -1e-12 * np.maximum(1.0, np.abs(self.E[self.rows, self.x]))[:, None])
            if not ok.any():
                break
            added = (np.maximum(dC, 0.0) / t.scale[:, None, None]).sum(axis=0)
            score = np.where(ok, -dE / np.maximum(added, _EPS), -np.inf)
            g, i = np.unravel_index(int(np.argmax(score)), score.shape)
            self.apply(int(g), int(i), dC)
        self.c = t.costs(self.x)


def least_error_levels(tables: AllocationTables) -> np.ndarray:
    """Every group at its least-error level (the widest among ties)."""
    return np.array([len(e) - 1 - int(np.argmin(e[::-1])) for e in tables.error], dtype=np.int64)


def unbound_optimum(problem: Allocation) -> SolveResult | None:
    """The optimum when no budget binds: every group at its least-error level, if that plan meets
    every budget (None otherwise). An exact solver's model of a ResNet-50 allocation took CP-SAT
    over 7 s to solve at 100% of the dense FLOPs, where this check proves it at once."""
    x = least_error_levels(problem.tables)
    if not problem.tables.feasible(x):
        return None
    solution = problem.keep_of(x)
    objective = problem.evaluate(solution)
    return SolveResult(Status.OPTIMAL, objective, solution, bound=objective, trace=[(0.0, objective)],
                       info={"note": "no budget binds at the least-error levels"})


def greedy_plan(tables: AllocationTables, start: np.ndarray | None = None,
                deadline: Deadline | None = None) -> tuple[np.ndarray | None, int]:
    """Greedy repair from ``start`` (default: every group at its least-error level), then improve.

    Returns (x or None when repair got stuck, number of moves).
    """
    if start is None:
        start = least_error_levels(tables)
    moves = LocalMoves(tables, start)
    if not moves.repair(deadline):
        return None, moves.moves
    moves.improve(deadline)
    if not tables.feasible(moves.x):
        return None, moves.moves
    return moves.x, moves.moves


def _result(problem: Allocation, x: np.ndarray | None, status: Status, trace: Trace, iterations: int,
            info: dict[str, Any]) -> SolveResult:
    if x is None:  # a heuristic that finds nothing proves nothing: out of time is a limit, else an error
        return SolveResult(Status.LIMIT if status is Status.LIMIT else Status.ERROR, math.nan, None,
                           iterations=iterations, info=info)
    solution = problem.keep_of(x)
    objective = problem.evaluate(solution)
    trace.record(objective)
    return SolveResult(status, objective, solution, iterations=iterations, trace=trace.points, info=info)


@register("greedy", kinds=["allocation"], exact=False,
          description="best marginal error per unit of cost: repair from least-error levels, then improve")
def greedy(problem: Allocation, *, time_limit: float | None, seed: int) -> SolveResult:
    """Greedy marginal allocation.

    Start with every group at its least-error level; while a budget is exceeded, take the move
    with the largest violation drop per unit of error added; then, while some move lowers the
    error and stays feasible, take the one with the best error drop per unit of normalised cost.
    Reports ``error`` (``limit`` once out of time) with no solution when repair gets stuck: that
    proves nothing about the problem, which may still be feasible.
    """
    deadline = Deadline(time_limit)
    x, moves = greedy_plan(problem.tables, deadline=deadline)
    status = Status.LIMIT if deadline.expired() else Status.FEASIBLE
    info = {"note": "repair got stuck; not a proof of infeasibility"} if x is None else {}
    return _result(problem, x, status, Trace(deadline), moves, info)


def uniform_candidates(problem: Allocation) -> tuple[np.ndarray, np.ndarray]:
    """Every uniform keep fraction ρ and the allowed-level indices it gives (largest level ≤ ρ·size)."""
    t = problem.tables
    sizes = np.array([problem.sizes[g] for g in t.names], dtype=np.float64)  # type: ignore[index]
    ratios = np.unique(np.concatenate([lv / max(s, _EPS) for lv, s in zip(t.levels, sizes, strict=True)]))
    X = np.empty((ratios.shape[0], t.n), dtype=np.int64)
    for g, lv in enumerate(t.levels):
        idx = np.searchsorted(lv, ratios * sizes[g] * (1 + 1e-12), side="right") - 1
        X[:, g] = np.clip(idx, 0, lv.shape[0] - 1)
    return ratios, X


def batch_costs(t: AllocationTables, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Objectives (M,) and costs (M, R) of M assignments at once."""
    obj = np.zeros(X.shape[0])
    C = np.tile(t.constant, (X.shape[0], 1))
    for g in range(t.n):
        obj += t.error[g][X[:, g]]
        C += t.unary[g][:, X[:, g]].T
    for (g, h), p in t.pairs.items():
        C += p[:, X[:, g], X[:, h]].T
    return obj, C


@register("uniform", kinds=["allocation"], exact=False,
          description="one keep fraction for every group: the best feasible uniform allocation")
def uniform(problem: Allocation, *, time_limit: float | None, seed: int) -> SolveResult:
    """Uniform allocation: every group keeps the largest allowed level ≤ ρ·size for a common ρ.

    Every distinct ρ at which some group's level changes is tried; the feasible one with the
    least error wins (for ordinary ``<=`` budgets that is the largest feasible ρ).
    """
    deadline = Deadline(time_limit)
    t = problem.tables
    ratios, X = uniform_candidates(problem)
    obj, C = batch_costs(t, X)
    feasible = np.all(C <= t.limit + t.tol, axis=1)
    if not feasible.any():
        return _result(problem, None, Status.ERROR, Trace(deadline), len(ratios),
                       {"note": "no uniform keep fraction meets every budget (a non-uniform plan may)"})
    k = int(np.flatnonzero(feasible)[np.argmin(obj[feasible])])
    return _result(problem, X[k], Status.FEASIBLE, Trace(deadline), len(ratios), {"fraction": float(ratios[k])})
