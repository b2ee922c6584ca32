"""Projection: the projected step of gate-based pruning as a small convex (or 0/1) program.

minimize ½‖θ − θ₀‖²  subject to  lo ≤ θ ≤ hi (box [0, 1] with fixed entries),
Cθ ≤ b (linear budgets), Σθ = total (optional density), θ_child ≤ θ_parent (a forest),
θ ∈ {0, 1} when ``binary``.

Complexity-aware training projects its Bernoulli probabilities onto the box and a linearised
cost budget with the layer→unit hierarchy; PDP's threshold is the projection of scores onto a
target density (binary + total: the top-K); soft coefficients project onto per-component budgets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from secateurs.errors import InfeasibleBudgetError, ValidationError

_TOL = 1e-7


def _as_vector(name: str, value: object, n: int | None = None) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1:
        raise ValidationError(name, f"expected a vector, got shape {tuple(array.shape)}")
    if n is not None and array.shape[0] != n:
        raise ValidationError(name, f"expected length {n} (len(theta0)), got {array.shape[0]}")
    if not np.all(np.isfinite(array)):
        raise ValidationError(name, f"non-finite value at index {int(np.flatnonzero(~np.isfinite(array))[0])}")
    return array


@dataclass(frozen=True, eq=False)
class Projection:
    """Euclidean projection of ``theta0`` onto box, budgets, density and hierarchy constraints.

    Parameters
    ----------
    theta0 : (n,) array
        The point to project (gate probabilities after a gradient step, scores, ...).
    costs : (r, n) array, optional
        One row per linear budget ``costs[j] @ θ ≤ budgets[j]``.
    budgets : (r,) array, optional
    parent : (n,) int array, optional
        ``parent[i]`` is the index whose value bounds θ_i from above, −1 for roots.
    fixed : mapping index → value, optional
        Entries held at a value in [0, 1] (a gate already removed is fixed at 0).
    total : float, optional
        Σθ must equal ``total`` (PDP's target density, in units).
    binary : bool
        Restrict θ to {0, 1}.
    """

    kind: ClassVar[str] = "projection"

    theta0: np.ndarray
    costs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    budgets: np.ndarray = field(default_factory=lambda: np.zeros(0))
    parent: np.ndarray | None = None
    fixed: Mapping[int, float] = field(default_factory=dict)
    total: float | None = None
    binary: bool = False

    def __post_init__(self) -> None:
        theta0 = _as_vector("theta0", self.theta0)
        n = theta0.shape[0]
        if n == 0:
            raise ValidationError("theta0", "is empty")
        costs = np.asarray(self.costs, dtype=np.float64)
        if costs.size == 0:
            costs = np.zeros((0, n))
        if costs.ndim == 1:
            costs = costs[None, :]
        if costs.ndim != 2 or costs.shape[1] != n:
            raise ValidationError("costs", f"expected shape (r, {n}), got {tuple(costs.shape)}")
        if not np.all(np.isfinite(costs)):
            raise ValidationError("costs", "non-finite coefficient")
        budgets = np.atleast_1d(np.asarray(self.budgets, dtype=np.float64))
        if budgets.shape != (costs.shape[0],):
            raise ValidationError("budgets", f"expected {costs.shape[0]} values (one per costs row), got {budgets.shape[0]}")
        if not np.all(np.isfinite(budgets)):
            raise ValidationError("budgets", "non-finite budget")
        parent = None
        if self.parent is not None:
            parent = np.asarray(self.parent, dtype=np.int64)
            if parent.shape != (n,):
                raise ValidationError("parent", f"expected length {n}, got shape {tuple(parent.shape)}")
            bad = np.flatnonzero((parent < -1) | (parent >= n) | (parent == np.arange(n)))
            if bad.size:
                raise ValidationError("parent", f"entry {int(bad[0])} has invalid parent {int(parent[bad[0]])}")
            _check_forest(parent)
        fixed = {int(i): float(v) for i, v in dict(self.fixed).items()}
        for i, v in fixed.items():
            if not 0 <= i < n:
                raise ValidationError("fixed", f"index {i} out of range [0, {n})")
            if not 0.0 <= v <= 1.0 or (self.binary and v not in (0.0, 1.0)):
                raise ValidationError("fixed", f"value {v} at index {i} is outside {'{0, 1}' if self.binary else '[0, 1]'}")
        if parent is not None:
            for i, v in fixed.items():
                p = int(parent[i])
                while p >= 0:  # a fixed entry may not exceed any fixed ancestor
                    if p in fixed and v > fixed[p]:
                        raise ValidationError("fixed", f"entry {i} fixed at {v} above its ancestor {p} fixed at {fixed[p]}")
                    p = int(parent[p])
        object.__setattr__(self, "theta0", theta0)
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "budgets", budgets)
        object.__setattr__(self, "parent", parent)
        object.__setattr__(self, "fixed", fixed)
        lo, hi = self.bounds()
        if self.total is not None:
            if not math.isfinite(self.total):
                raise ValidationError("total", f"must be a finite number, got {self.total}")
            if not (lo.sum() - _TOL <= self.total <= hi.sum() + _TOL):
                least = lo.sum() if self.total < lo.sum() else hi.sum()
                raise InfeasibleBudgetError("total", float(self.total), float(least), "fixed entries and the box bound Σθ")
            if self.binary and abs(self.total - round(self.total)) > _TOL:
                raise ValidationError("total", f"must be an integer for a binary projection, got {self.total}")
        for j in range(costs.shape[0]):
            least = float(np.minimum(costs[j] * lo, costs[j] * hi).sum())
            if least > budgets[j] + _TOL * max(1.0, abs(budgets[j])):
                raise InfeasibleBudgetError(f"budgets[{j}]", float(budgets[j]), least, "the fixed entries alone exceed it")

    @property
    def size(self) -> int:
        return int(self.theta0.shape[0])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-entry bounds: [0, 1], [v, v] where fixed, tightened by the hierarchy (a fixed
        ancestor caps its descendants; a fixed descendant lifts its ancestors)."""
        lo = np.zeros(self.size)
        hi = np.ones(self.size)
        for i, v in self.fixed.items():
            lo[i] = hi[i] = v
        if self.has_hierarchy():
            assert self.parent is not None
            for i in range(self.size):
                p = int(self.parent[i])
                while p >= 0:
                    hi[i] = min(hi[i], hi[p]) if p in self.fixed else hi[i]
                    lo[p] = max(lo[p], lo[i]) if i in self.fixed else lo[p]
                    p = int(self.parent[p])
        return lo, hi

    def has_hierarchy(self) -> bool:
        return self.parent is not None and bool(np.any(self.parent >= 0))

    def evaluate(self, solution: object) -> float:
        """½‖θ − θ₀‖²."""
        theta = np.asarray(solution, dtype=np.float64)
        return float(0.5 * np.sum((theta - self.theta0) ** 2))

    def check(self, solution: object, tol: float = 1e-6) -> list[str]:
        """Every violated constraint, named, with by how much."""
        theta = np.asarray(solution, dtype=np.float64)
        if theta.shape != (self.size,):
            return [f"solution has shape {tuple(theta.shape)}, expected ({self.size},)"]
        if not np.all(np.isfinite(theta)):
            return ["solution has non-finite entries"]
        out: list[str] = []
        lo, hi = self.bounds()
        below = lo - theta
        above = theta - hi
        if below.max() > tol:
            i = int(below.argmax())
            out.append(f"box: theta[{i}] = {theta[i]:.6g} below its lower bound {lo[i]:.6g}")
        if above.max() > tol:
            i = int(above.argmax())
            out.append(f"box: theta[{i}] = {theta[i]:.6g} above its upper bound {hi[i]:.6g}")
        for j in range(self.costs.shape[0]):
            used = float(self.costs[j] @ theta)
            if used > self.budgets[j] + tol * max(1.0, abs(self.budgets[j])):
                out.append(f"budgets[{j}]: uses {used:.6g} > {self.budgets[j]:.6g} (over by {used - self.budgets[j]:.3g})")
        if self.total is not None and abs(theta.sum() - self.total) > tol * max(1.0, self.total):
            out.append(f"total: Σθ = {theta.sum():.6g} ≠ {self.total:.6g}")
        if self.has_hierarchy():
            assert self.parent is not None
            children = np.flatnonzero(self.parent >= 0)
            excess = theta[children] - theta[self.parent[children]]
            if excess.size and excess.max() > tol:
                c = int(children[excess.argmax()])
                out.append(f"hierarchy: theta[{c}] = {theta[c]:.6g} above its parent theta[{int(self.parent[c])}]")
        if self.binary and np.any(np.minimum(np.abs(theta), np.abs(theta - 1)) > tol):
            out.append("binary: entries outside {0, 1}")
        return out

    def lagrangian_bound(self, budget_multipliers: np.ndarray | None = None, total_multiplier: float = 0.0,
                         edge_multipliers: np.ndarray | None = None) -> float:
        """A certified lower bound on the (continuous) optimum from any dual multipliers.

        For y ≥ 0 (budgets), μ free (total) and z ≥ 0 (one per child→parent edge, in the order of
        ``np.flatnonzero(parent >= 0)``), the Lagrangian separates over entries and its minimum over
        the box is attained at θ = clip(θ₀ − s, lo, hi) with s the aggregated multipliers.
        """
        lo, hi = self.bounds()
        shift = np.zeros(self.size)
        constant = 0.0
        if budget_multipliers is not None and self.costs.shape[0]:
            y = np.maximum(np.asarray(budget_multipliers, dtype=np.float64), 0.0)
            shift += self.costs.T @ y
            constant -= float(y @ self.budgets)
        if self.total is not None:
            shift += total_multiplier
            constant -= total_multiplier * self.total
        if edge_multipliers is not None and self.has_hierarchy():
            assert self.parent is not None
            z = np.maximum(np.asarray(edge_multipliers, dtype=np.float64), 0.0)
            children = np.flatnonzero(self.parent >= 0)
            np.add.at(shift, children, z)
            np.add.at(shift, self.parent[children], -z)
        theta = np.clip(self.theta0 - shift, lo, hi)
        return float(0.5 * np.sum((theta - self.theta0) ** 2) + shift @ theta + constant)


def _check_forest(parent: np.ndarray) -> None:
    """Raise if following parents ever loops (the hierarchy must be a forest)."""
    state = np.zeros(parent.shape[0], dtype=np.int8)  # 0 new, 1 on path, 2 done
    for start in range(parent.shape[0]):
        path = []
        node = start
        while node >= 0 and state[node] == 0:
            state[node] = 1
            path.append(node)
            node = int(parent[node])
        if node >= 0 and state[node] == 1:
            raise ValidationError("parent", f"the hierarchy has a cycle through entry {node}")
        for p in path:
            state[p] = 2
