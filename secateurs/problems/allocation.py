"""Allocation: how much to keep where, under budgets (formulation 2 of DESIGN.md).

Choose one keep level ``k_g`` per group from its candidate levels, minimising
``Σ_g w_g · e_g(k_g)`` (an error table per group) subject to budgets on parameters, FLOPs,
nonzeros (polynomials of degree ≤ 2 in the keep counts) and latency (a measured table per layer
over its input and output groups' levels), per-group min/max keep, ``round_to`` multiples and
per-component bounds. It is a multiple-choice knapsack whose costs have pairwise terms.

Every solver works on :attr:`Allocation.tables`: the same data compiled onto the *allowed*
levels (candidates that pass min/max/round_to) as unary tables ``u_g[r, i]`` and pairwise tables
``P_gh[r, i, j]`` per budget row ``r``, every row written as ``cost ≤ limit`` (a ``>=`` bound is
negated). A polynomial's bilinear term ``b·k_g·k_h`` becomes ``b·outer(levels_g, levels_h)``; a
square becomes unary; a latency table becomes pairwise (or unary when one side is fixed).

Solutions are plain dicts ``group → keep count`` (the level's value, not its index): that is what
cost polynomials, plans and people read. :meth:`Allocation.keep_of` converts allowed-level
indices to that form.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal

import numpy as np

from secateurs.cost import Polynomial
from secateurs.errors import InfeasibleBudgetError, ValidationError
from secateurs.problems.elimination import MAX_CELLS, Elimination, decode, eliminate, messages

REL_TOL = 1e-9
"""Relative tolerance of every budget comparison (``achieved ≤ limit + REL_TOL·max(1, |limit|)``)."""

_BRUTE_LIMIT = 200_000


def tolerance(limit: float) -> float:
    """Slack allowed on a budget of size ``limit``: float sums in another order must still pass."""
    return REL_TOL * max(1.0, abs(limit))


def _position(levels: np.ndarray, value: float) -> int:
    """Index of ``value`` in the sorted ``levels``, or -1 when it is not one of them."""
    i = int(np.searchsorted(levels, value))
    for j in (i - 1, i):
        if 0 <= j < levels.shape[0] and abs(levels[j] - value) <= 1e-9 * max(1.0, abs(value)):
            return j
    return -1


# -- cost expressions -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LatencyTerm:
    """Measured latency of one layer as a table over (input group level, output group level).

    Parameters
    ----------
    table : array
        ``table[i, j]`` is the layer's latency when ``input`` keeps ``input_levels[i]`` and
        ``output`` keeps ``output_levels[j]``. With ``input=None`` (a fixed input) the table is a
        vector over output levels, and likewise with ``output=None``.
    input, output : str or None
        Group names (at least one).
    input_levels, output_levels : sequence of float
        The keep counts the rows/columns were measured at; they must cover every candidate level.
    """

    table: Any
    input: str | None = None
    output: str | None = None
    input_levels: Sequence[float] = ()
    output_levels: Sequence[float] = ()

    def __post_init__(self) -> None:
        table = np.asarray(self.table, dtype=np.float64)
        if self.input is None and self.output is None:
            raise ValidationError("latency.input", "a latency term needs an input or an output group")
        if self.input is None:
            table = table.reshape(1, -1)
        elif self.output is None:
            table = table.reshape(-1, 1)
        li = np.asarray(self.input_levels if self.input is not None else [0.0], dtype=np.float64)
        lo = np.asarray(self.output_levels if self.output is not None else [0.0], dtype=np.float64)
        if table.shape != (li.shape[0], lo.shape[0]):
            raise ValidationError("latency.table", f"expected shape ({li.shape[0]}, {lo.shape[0]}) from the level lists, "
                                                   f"got {tuple(table.shape)}")
        if not np.all(np.isfinite(table)):
            raise ValidationError("latency.table", "non-finite entry")
        if np.any(table < 0):
            raise ValidationError("latency.table", f"negative latency {table.min():.6g} makes no sense")
        for name, lv in (("input_levels", li), ("output_levels", lo)):
            if np.any(np.diff(lv) <= 0):
                raise ValidationError(f"latency.{name}", "must be strictly increasing")
        object.__setattr__(self, "table", table)
        object.__setattr__(self, "input_levels", li)
        object.__setattr__(self, "output_levels", lo)

    def variables(self) -> set[str]:
        return {g for g in (self.input, self.output) if g is not None}

    def value(self, keep: Mapping[str, float]) -> float:
        """Latency at ``keep``; a keep count that was never measured raises ``KeyError``."""
        i = 0 if self.input is None else _position(self.input_levels, keep[self.input])  # type: ignore[arg-type]
        j = 0 if self.output is None else _position(self.output_levels, keep[self.output])  # type: ignore[arg-type]
        if i < 0 or j < 0:
            raise KeyError(f"no latency measured for keep {self.input}={keep.get(self.input or '')}, "
                           f"{self.output}={keep.get(self.output or '')}")
        return float(self.table[i, j])


@dataclass(frozen=True, eq=False)
class Latency:
    """Total latency: ``constant`` plus one measured table per layer (a pairwise term)."""

    terms: Sequence[LatencyTerm]
    constant: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple(self.terms))

    def variables(self) -> set[str]:
        out: set[str] = set()
        for t in self.terms:
            out |= t.variables()
        return out

    def evaluate(self, keep: Mapping[str, float]) -> float:
        return float(self.constant + sum(t.value(keep) for t in self.terms))  # type: ignore[attr-defined]


CostExpression = Polynomial | Latency


def restrict(cost: Polynomial, groups: Iterable[str]) -> Polynomial:
    """The terms of ``cost`` that touch ``groups`` (a component's own params or FLOPs, no constant)."""
    chosen = set(groups)
    return Polynomial(
        0.0,
        {g: a for g, a in cost.linear.items() if g in chosen},
        {(g, h): b for (g, h), b in cost.bilinear.items() if g in chosen or h in chosen},
    )


# -- budgets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetReport:
    """Requested vs achieved for one budget; ``achieved`` is computed from the solution."""

    name: str
    sense: str
    requested: float
    achieved: float

    @property
    def satisfied(self) -> bool:
        tol = tolerance(self.requested)
        return self.achieved <= self.requested + tol if self.sense == "<=" else self.achieved >= self.requested - tol

    @property
    def excess(self) -> float:
        """By how much the bound is violated (≤ 0 when satisfied)."""
        return self.achieved - self.requested if self.sense == "<=" else self.requested - self.achieved

    def __str__(self) -> str:
        mark = "ok" if self.satisfied else f"VIOLATED by {self.excess:.6g}"
        return f"{self.name}: achieved {self.achieved:.6g} {self.sense} requested {self.requested:.6g} ({mark})"


@dataclass(frozen=True, eq=False)
class Budget:
    """One constraint ``cost(keep) <= limit`` (a budget) or ``>= limit`` (a component floor).

    Parameters
    ----------
    name : str
        Reported in violations and errors ("params", "flops", "encoder.params", ...).
    cost : Polynomial or Latency
        Params, FLOPs and nonzeros are polynomials in keep counts; latency is a table.
    limit : float
        The requested value.
    sense : "<=" or ">="
    component : tuple of str, optional
        The groups of a component bound (informational: ``cost`` already holds only its terms).
    """

    name: str
    cost: CostExpression
    limit: float
    sense: Literal["<=", ">="] = "<="
    component: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.sense not in ("<=", ">="):
            raise ValidationError(f"budgets[{self.name!r}].sense", f"must be '<=' or '>=', got {self.sense!r}")
        if not isinstance(self.cost, Polynomial | Latency):
            raise ValidationError(f"budgets[{self.name!r}].cost",
                                  f"expected a Polynomial or Latency, got {type(self.cost).__name__}")
        if not math.isfinite(float(self.limit)):
            raise ValidationError(f"budgets[{self.name!r}].limit", f"must be finite, got {self.limit!r}")
        object.__setattr__(self, "limit", float(self.limit))
        if self.component is not None:
            object.__setattr__(self, "component", tuple(self.component))

    @classmethod
    def fraction(cls, name: str, cost: CostExpression, fraction: float, full: Mapping[str, float], *,
                 sense: Literal["<=", ">="] = "<=", component: Iterable[str] | None = None) -> Budget:
        """A budget at ``fraction`` of the cost of the unpruned model (``full`` keep counts).

        With ``component``, the polynomial ``cost`` is first restricted to the terms touching those
        groups, so ``Budget.fraction("encoder", params, 0.6, sizes, sense=">=", component=enc)``
        reads "the encoder keeps at least 60% of its parameters".
        """
        groups = tuple(component) if component is not None else None
        if groups is not None:
            if not isinstance(cost, Polynomial):
                raise ValidationError(f"budgets[{name!r}].cost", "a component bound needs a Polynomial cost")
            cost = restrict(cost, groups)
        return cls(name, cost, float(fraction) * cost.evaluate(full), sense, groups)

    def achieved(self, keep: Mapping[str, float]) -> float:
        """The cost at ``keep``, computed from the solution (never copied from the request)."""
        return float(self.cost.evaluate(keep))

    def report(self, keep: Mapping[str, float]) -> BudgetReport:
        return BudgetReport(self.name, self.sense, self.limit, self.achieved(keep))


# -- compiled tables ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class AllocationTables:
    """The problem over allowed levels, every budget a row ``constant + Σ unary + Σ pairs ≤ limit``.

    Solvers index levels by position in ``levels[g]`` (ascending allowed keep counts); ``x`` is an
    int vector with one allowed-level index per group, in ``names`` order.
    """

    names: tuple[str, ...]
    levels: list[np.ndarray]
    error: list[np.ndarray]
    unary: list[np.ndarray]
    pairs: dict[tuple[int, int], np.ndarray]
    constant: np.ndarray
    limit: np.ndarray
    rows: tuple[str, ...]
    sign: np.ndarray

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def r(self) -> int:
        return int(self.limit.shape[0])

    @cached_property
    def tol(self) -> np.ndarray:
        return np.array([tolerance(abs(v)) for v in self.limit])

    @cached_property
    def neighbors(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.names]
        for g, h in self.pairs:
            out[g].append(h)
            out[h].append(g)
        return out

    @cached_property
    def scale(self) -> np.ndarray:
        """A magnitude per row (sum of the largest |entries|) for normalising violations."""
        s = np.abs(self.constant).copy()
        for u in self.unary:
            s += np.abs(u).max(axis=1) if u.size else 0.0
        for p in self.pairs.values():
            s += np.abs(p).reshape(p.shape[0], -1).max(axis=1)
        return np.maximum(np.maximum(s, np.abs(self.limit)), 1e-12)

    def pair(self, a: int, b: int) -> np.ndarray:
        """Pair table oriented (R, L_a, L_b)."""
        if a < b:
            return self.pairs[(a, b)]
        return self.pairs[(b, a)].transpose(0, 2, 1)

    def keep(self, x: Sequence[int] | np.ndarray) -> dict[str, float]:
        """Solution dict (keep counts) from allowed-level indices."""
        out: dict[str, float] = {}
        for g, i in enumerate(x):
            v = float(self.levels[g][int(i)])
            out[self.names[g]] = int(v) if v.is_integer() else v
        return out

    def index(self, keep: Mapping[str, float]) -> np.ndarray:
        """Allowed-level indices of a solution dict (ValueError if a count is not allowed)."""
        x = np.empty(self.n, dtype=np.int64)
        for g, name in enumerate(self.names):
            i = _position(self.levels[g], float(keep[name]))
            if i < 0:
                raise ValueError(f"group {name!r} keeps {keep[name]}, not an allowed level")
            x[g] = i
        return x

    def objective(self, x: Sequence[int] | np.ndarray) -> float:
        return float(sum(self.error[g][int(i)] for g, i in enumerate(x)))

    def costs(self, x: Sequence[int] | np.ndarray) -> np.ndarray:
        c = self.constant.copy()
        for g, i in enumerate(x):
            c += self.unary[g][:, int(i)]
        for (g, h), p in self.pairs.items():
            c += p[:, int(x[g]), int(x[h])]
        return c

    def error_scaling(self, magnitude: float) -> tuple[float, float]:
        """(offset, scale) for solvers that need errors on a fixed scale: ``scale · (e_g − min e_g)``
        has spans summing to ``magnitude``, and ``offset`` is Σ_g min e_g (1.0 when all are flat)."""
        offset = float(sum(float(e.min()) for e in self.error))
        span = float(sum(float(e.max() - e.min()) for e in self.error))
        return offset, (magnitude / span if span > 0 else 1.0)

    def feasible(self, x: Sequence[int] | np.ndarray) -> bool:
        return bool(np.all(self.costs(x) <= self.limit + self.tol))

    def violation(self, x: Sequence[int] | np.ndarray) -> float:
        """Σ_r max(0, cost_r − limit_r) / scale_r: zero exactly when feasible (within tolerance)."""
        over = self.costs(x) - self.limit
        over[over <= self.tol] = 0.0
        return float(np.sum(np.maximum(over, 0.0) / self.scale))

    def cycle_edge(self) -> tuple[str, str] | None:
        """A pair of groups whose pairwise term closes a cycle, or None when interactions form a forest."""
        root = list(range(self.n))

        def find(a: int) -> int:
            while root[a] != a:
                root[a] = root[root[a]]
                a = root[a]
            return a

        for g, h in sorted(self.pairs):
            a, b = find(g), find(h)
            if a == b:
                return self.names[g], self.names[h]
            root[a] = b
        return None

    @cached_property
    def elimination(self) -> Elimination:
        """The groups' min-fill elimination order over the pair tables (a tree DP on forests)."""
        return eliminate([lv.shape[0] for lv in self.levels], list(self.pairs))

    def minsum(self, node: list[np.ndarray], edge: Mapping[tuple[int, int], np.ndarray]) -> tuple[float, np.ndarray]:
        """Exact min over x of Σ node[g][x_g] + Σ edge[(g,h)][x_g, x_h] by bucket elimination.

        ``edge`` is keyed like ``pairs`` (g < h, shape (L_g, L_h)); missing edges count zero. Exact
        on any graph; fast while the elimination's tables stay small (see ``elimination``).
        """
        msgs = messages(self.elimination, [np.asarray(w, dtype=np.float64)[None] for w in node],
                        {k: np.asarray(w, dtype=np.float64)[None] for k, w in edge.items()}, outside=False)
        return float(msgs.total[0]), decode(self.elimination, msgs)

    def _monotone_corner(self, row: int) -> np.ndarray | None:
        """All-lowest (or all-highest) levels when every table of ``row`` rises (or falls) with
        every keep count, as params and FLOPs do: then no assignment costs less, cycles or not."""
        for direction in (1.0, -1.0):
            if all(np.all(direction * np.diff(u[row]) >= 0) for u in self.unary) and all(
                    np.all(direction * np.diff(p[row], axis=0) >= 0) and np.all(direction * np.diff(p[row], axis=1) >= 0)
                    for p in self.pairs.values()):
                return np.array([0 if direction > 0 else len(lv) - 1 for lv in self.levels], dtype=np.int64)
        return None

    def row_min(self, row: int) -> tuple[float, np.ndarray | None]:
        """Exact minimum of one row's cost: a corner when the row is monotone, else bucket
        elimination when its tables stay small, enumeration when the problem is small, else the MIP."""
        corner = self._monotone_corner(row)
        if corner is not None:
            return float(self.costs(corner)[row]), corner
        node = [u[row] for u in self.unary]
        edge = {k: p[row] for k, p in self.pairs.items() if np.any(p[row])}
        sub = AllocationTables(self.names, self.levels, self.error, self.unary,
                               {k: self.pairs[k] for k in edge}, self.constant, self.limit, self.rows, self.sign)
        if sub.elimination.largest()[1] <= MAX_CELLS:
            value, x = sub.minsum(node, edge)
            return value + float(self.constant[row]), x
        sizes = [lv.shape[0] for lv in self.levels]
        if math.prod(sizes) <= _BRUTE_LIMIT:
            best, arg = math.inf, None
            for x_t in itertools.product(*(range(s) for s in sizes)):
                v = float(self.costs(x_t)[row])
                if v < best:
                    best, arg = v, np.array(x_t)
            return best, arg
        from secateurs.solvers.allocation_mip import minimise_row  # cyclic interactions: exact MIP

        return minimise_row(self, row)


# -- the problem ----------------------------------------------------------------------------


def _vector(field_name: str, value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValidationError(field_name, f"non-finite value {array[bad[0]]} at position {int(bad[0])}")
    return array


@dataclass(frozen=True, eq=False)
class Allocation:
    """Choose a keep level per group minimising weighted error under budgets and bounds.

    Parameters
    ----------
    levels : mapping group → sequence of float
        Candidate keep counts (units kept, or nonzeros kept for unstructured layers); sorted on
        construction, duplicates rejected.
    errors : mapping group → sequence of float
        ``errors[g][i]`` is the error of keeping ``levels[g][i]`` (same order as given).
    budgets : sequence of Budget
        Any mix of params/FLOPs/nonzeros polynomials and latency tables, and component bounds.
    weights : mapping group → float, optional
        Per-group weight ``w_g ≥ 0`` of the error (default 1).
    min_keep, max_keep : mapping group → float
        Per-group bounds on the keep count.
    round_to : mapping group → int, or int
        Keep counts must be multiples (hardware widths, whole heads); an int applies to all groups.
    sizes : mapping group → float, optional
        Full size of each group (default: its largest candidate level); used by ``uniform``/``kde``.
    scores : mapping group → array, optional
        Per-unit scores (weights or magnitudes) whose distribution the ``kde`` solver thresholds.

    Raises
    ------
    ValidationError
        Empty candidate sets, NaN/inf errors, negative levels/weights/costs, unknown group names;
        the field is named.
    InfeasibleBudgetError
        A single budget that no allowed assignment meets. ``least`` is the exact extreme value of
        that budget's cost over allowed levels (the minimum for ``<=``, the maximum for ``>=``):
        its monotone corner when every table of it rises with every keep count (params, FLOPs),
        else by min-sum bucket elimination when the interactions have small tree width (forests,
        residual blocks), by enumeration when small, and otherwise by the MIP solver. Budgets that
        are each satisfiable but not jointly are not detected here; solvers then report
        ``infeasible``.

    Notes
    -----
    A solution is a dict ``group → keep count``. Levels are matched with relative tolerance 1e-9.
    """

    kind: ClassVar[str] = "allocation"

    levels: Mapping[str, Sequence[float]]
    errors: Mapping[str, Sequence[float]]
    budgets: Sequence[Budget] = ()
    weights: Mapping[str, float] | None = None
    min_keep: Mapping[str, float] = field(default_factory=dict)
    max_keep: Mapping[str, float] = field(default_factory=dict)
    round_to: Mapping[str, float] | int = field(default_factory=dict)
    sizes: Mapping[str, float] | None = None
    scores: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.levels, Mapping) or not self.levels:
            raise ValidationError("levels", "needs at least one group")
        names = tuple(str(g) for g in self.levels)
        known = set(names)
        if not isinstance(self.errors, Mapping):
            raise ValidationError("errors", f"expected a mapping group → errors, got {type(self.errors).__name__}")
        for g in self.errors:
            if g not in known:
                raise ValidationError(f"errors[{g!r}]", "unknown group (not in levels)")
        levels: dict[str, np.ndarray] = {}
        errors: dict[str, np.ndarray] = {}
        for g in names:
            lv = _vector(f"levels[{g!r}]", self.levels[g])
            if lv.size == 0:
                raise ValidationError(f"levels[{g!r}]", "empty candidate set")
            if np.any(lv < 0):
                raise ValidationError(f"levels[{g!r}]", f"negative keep count {lv.min():.6g}")
            if g not in self.errors:
                raise ValidationError(f"errors[{g!r}]", "missing: every group needs an error table")
            er = _vector(f"errors[{g!r}]", self.errors[g])
            if er.shape != lv.shape:
                raise ValidationError(f"errors[{g!r}]", f"has {er.size} entries for {lv.size} levels")
            order = np.argsort(lv, kind="stable")
            lv, er = lv[order], er[order]
            if np.any(np.diff(lv) <= 1e-12 * np.maximum(1.0, np.abs(lv[1:]))):
                raise ValidationError(f"levels[{g!r}]", "duplicate candidate level")
            levels[g], errors[g] = lv, er
        weights = {g: 1.0 for g in names}
        for g, w in dict(self.weights or {}).items():
            if g not in known:
                raise ValidationError(f"weights[{g!r}]", "unknown group")
            if not (math.isfinite(float(w)) and float(w) >= 0):
                raise ValidationError(f"weights[{g!r}]", f"must be finite and ≥ 0, got {w!r}")
            weights[g] = float(w)
        bounds: dict[str, dict[str, float]] = {}
        rounding = {g: float(self.round_to) for g in names} if isinstance(self.round_to, int | float) else dict(self.round_to)
        for fname, mapping in (("min_keep", self.min_keep), ("max_keep", self.max_keep), ("round_to", rounding)):
            clean: dict[str, float] = {}
            for g, v in dict(mapping).items():
                if g not in known:
                    raise ValidationError(f"{fname}[{g!r}]", "unknown group")
                v = float(v)
                if not math.isfinite(v) or v < 0 or (fname == "round_to" and v <= 0):
                    raise ValidationError(f"{fname}[{g!r}]", f"invalid value {v!r}")
                clean[g] = v
            bounds[fname] = clean
        sizes = {g: float(levels[g][-1]) for g in names}
        for g, s in dict(self.sizes or {}).items():
            if g not in known:
                raise ValidationError(f"sizes[{g!r}]", "unknown group")
            if not (math.isfinite(float(s)) and float(s) >= levels[g][-1]):
                raise ValidationError(f"sizes[{g!r}]", f"{s!r} is below the largest candidate level {levels[g][-1]:.6g}")
            sizes[g] = float(s)
        scores: dict[str, np.ndarray] | None = None
        if self.scores is not None:
            scores = {}
            for g, s in dict(self.scores).items():
                if g not in known:
                    raise ValidationError(f"scores[{g!r}]", "unknown group")
                arr = _vector(f"scores[{g!r}]", s)
                if arr.size == 0:
                    raise ValidationError(f"scores[{g!r}]", "empty")
                scores[g] = arr
        budgets = tuple(self.budgets)
        seen: set[str] = set()
        for b in budgets:
            if not isinstance(b, Budget):
                raise ValidationError("budgets", f"expected Budget objects, got {type(b).__name__}")
            if b.name in seen:
                raise ValidationError(f"budgets[{b.name!r}]", "duplicate budget name")
            seen.add(b.name)
            _validate_cost(b, known, levels)
        for attr, value in (("levels", levels), ("errors", errors), ("weights", weights), ("min_keep", bounds["min_keep"]),
                            ("max_keep", bounds["max_keep"]), ("round_to", bounds["round_to"]), ("sizes", sizes),
                            ("scores", scores), ("budgets", budgets)):
            object.__setattr__(self, attr, value)
        for g in names:
            if self.allowed(g).size == 0:
                raise ValidationError(f"levels[{g!r}]", f"no candidate level lies in [{self.min_keep.get(g, 0):.6g}, "
                                                        f"{self.max_keep.get(g, math.inf):.6g}] and is a multiple of "
                                                        f"{self.round_to.get(g, 1):.6g}")
        tables = self.tables
        for r, b in enumerate(budgets):
            least, _ = tables.row_min(r)
            if least > tables.limit[r] + tables.tol[r]:
                extreme = float(tables.sign[r] * least)
                note = ("no allowed keep levels reach it" if b.sense == "<=" else
                        f"a '>=' bound: {extreme:.6g} is the most achievable")
                raise InfeasibleBudgetError(b.name, b.limit, extreme, note)

    # -- structure --------------------------------------------------------------------------

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.levels)

    def allowed(self, group: str) -> np.ndarray:
        """Positions (in the sorted candidate levels) that pass min/max keep and round_to."""
        lv: np.ndarray = self.levels[group]  # type: ignore[assignment]
        ok = np.ones(lv.shape[0], dtype=bool)
        if group in self.min_keep:
            ok &= lv >= self.min_keep[group] - 1e-9 * max(1.0, self.min_keep[group])
        if group in self.max_keep:
            ok &= lv <= self.max_keep[group] + 1e-9 * max(1.0, self.max_keep[group])
        if group in self.round_to:  # type: ignore[operator]
            m = self.round_to[group]  # type: ignore[index]
            q = lv / m
            ok &= np.abs(q - np.round(q)) <= 1e-9 * np.maximum(1.0, np.abs(q))
        return np.flatnonzero(ok)

    @cached_property
    def tables(self) -> AllocationTables:
        """The compiled form every solver uses (see the module docstring)."""
        names = self.groups
        gi = {g: k for k, g in enumerate(names)}
        allowed = [self.allowed(g) for g in names]
        levels = [np.asarray(self.levels[g])[a] for g, a in zip(names, allowed, strict=True)]
        error = [self.weights[g] * np.asarray(self.errors[g])[a] for g, a in zip(names, allowed, strict=True)]  # type: ignore[index]
        R = len(self.budgets)
        unary = [np.zeros((R, lv.shape[0])) for lv in levels]
        pairs: dict[tuple[int, int], np.ndarray] = {}
        constant = np.zeros(R)
        limit = np.zeros(R)
        sign = np.ones(R)

        def add_pair(r: int, g: int, h: int, table: np.ndarray) -> None:
            if g > h:
                g, h, table = h, g, table.T
            if (g, h) not in pairs:
                pairs[(g, h)] = np.zeros((R, levels[g].shape[0], levels[h].shape[0]))
            pairs[(g, h)][r] += table

        for r, b in enumerate(self.budgets):
            s = 1.0 if b.sense == "<=" else -1.0
            sign[r], limit[r] = s, s * b.limit
            cost = b.cost
            if isinstance(cost, Polynomial):
                constant[r] += s * cost.constant
                for g, a in cost.linear.items():
                    unary[gi[g]][r] += s * a * levels[gi[g]]
                for (g, h), c in cost.bilinear.items():
                    if g == h:
                        unary[gi[g]][r] += s * c * levels[gi[g]] ** 2
                    else:
                        add_pair(r, gi[g], gi[h], s * c * np.outer(levels[gi[g]], levels[gi[h]]))
            else:
                constant[r] += s * cost.constant
                for t in cost.terms:
                    rows = [0] if t.input is None else [_position(t.input_levels, v) for v in levels[gi[t.input]]]  # type: ignore[arg-type]
                    cols = [0] if t.output is None else [_position(t.output_levels, v) for v in levels[gi[t.output]]]  # type: ignore[arg-type]
                    sub = s * t.table[np.ix_(rows, cols)]  # type: ignore[index]
                    if t.input is None or t.output is None or t.input == t.output:
                        g = gi[t.input or t.output]  # type: ignore[index]
                        unary[g][r] += np.diag(sub) if t.input == t.output else sub.reshape(-1)
                    else:
                        add_pair(r, gi[t.input], gi[t.output], sub)
        pairs = {k: p for k, p in pairs.items() if np.any(p)}
        return AllocationTables(names, levels, error, unary, pairs, constant, limit,
                                tuple(b.name for b in self.budgets), sign)

    def interactions(self) -> list[tuple[str, str]]:
        """Pairs of groups coupled by a bilinear or latency term (the graph dp eliminates; its tree width bounds dp)."""
        n = self.tables.names
        return [(n[g], n[h]) for g, h in sorted(self.tables.pairs)]

    def keep_of(self, indices: Sequence[int] | np.ndarray) -> dict[str, float]:
        """Solution dict from one allowed-level index per group (in ``groups`` order)."""
        return self.tables.keep(indices)

    def least(self, budget: str) -> float:
        """Exact least achievable value of a ``<=`` budget (the most achievable for ``>=``)."""
        r = self.tables.rows.index(budget)
        value, _ = self.tables.row_min(r)
        return float(self.tables.sign[r] * value)

    # -- evaluate / check -------------------------------------------------------------------

    def _indices(self, solution: Mapping[str, float]) -> dict[str, int]:
        if not isinstance(solution, Mapping):
            raise ValidationError("solution", f"expected a mapping group → keep count, got {type(solution).__name__}")
        out: dict[str, int] = {}
        for g in self.groups:
            if g not in solution:
                raise ValidationError(f"solution[{g!r}]", "missing group")
            i = _position(self.levels[g], float(solution[g]))  # type: ignore[arg-type]
            if i < 0:
                raise ValidationError(f"solution[{g!r}]", f"keep {solution[g]!r} is not a candidate level")
            out[g] = i
        return out

    def evaluate(self, solution: Mapping[str, float]) -> float:
        """Σ_g w_g · e_g(keep_g) at the candidate level each group keeps."""
        idx = self._indices(solution)
        return float(sum(self.weights[g] * self.errors[g][i] for g, i in idx.items()))  # type: ignore[index]

    def report(self, solution: Mapping[str, float]) -> list[BudgetReport]:
        """Requested vs achieved for every budget, achieved computed from ``solution``."""
        return [b.report(solution) for b in self.budgets]

    def check(self, solution: Mapping[str, float]) -> list[str]:
        """Every violated constraint, named, with by how much (empty when feasible)."""
        if not isinstance(solution, Mapping):
            return [f"solution: expected a mapping group → keep count, got {type(solution).__name__}"]
        out: list[str] = []
        unknown = sorted(set(map(str, solution)) - set(self.groups))
        if unknown:
            out.append(f"solution: unknown groups {unknown}")
        for g in self.groups:
            if g not in solution:
                out.append(f"solution[{g!r}]: missing group")
                continue
            k = float(solution[g])
            if _position(self.levels[g], k) < 0:  # type: ignore[arg-type]
                out.append(f"levels[{g!r}]: keep {k:.6g} is not a candidate level")
            if g in self.min_keep and k < self.min_keep[g] - 1e-9 * max(1.0, self.min_keep[g]):
                out.append(f"min_keep[{g!r}]: keep {k:.6g} < {self.min_keep[g]:.6g} (short by {self.min_keep[g] - k:.6g})")
            if g in self.max_keep and k > self.max_keep[g] + 1e-9 * max(1.0, self.max_keep[g]):
                out.append(f"max_keep[{g!r}]: keep {k:.6g} > {self.max_keep[g]:.6g} (over by {k - self.max_keep[g]:.6g})")
            if g in self.round_to:  # type: ignore[operator]
                m = self.round_to[g]  # type: ignore[index]
                if abs(k / m - round(k / m)) > 1e-9 * max(1.0, abs(k / m)):
                    out.append(f"round_to[{g!r}]: keep {k:.6g} is not a multiple of {m:.6g}")
        if out:
            return out
        for rep in self.report(solution):
            if not rep.satisfied:
                word = "over" if rep.sense == "<=" else "short"
                out.append(f"budget {rep.name!r}: achieved {rep.achieved:.6g} {'>' if rep.sense == '<=' else '<'} "
                           f"requested {rep.requested:.6g} ({word} by {abs(rep.excess):.6g})")
        return out

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def from_graph(
        cls,
        graph: Any,
        errors: Mapping[str, Sequence[float]],
        *,
        levels: Mapping[str, Sequence[float]] | None = None,
        params: float | None = None,
        flops: float | None = None,
        relative: bool = True,
        components: Mapping[str, tuple[Iterable[str], float]] | None = None,
        weights: Mapping[str, float] | None = None,
        min_keep: Mapping[str, float] | None = None,
        max_keep: Mapping[str, float] | None = None,
        round_to: Mapping[str, float] | int | None = None,
        scores: Mapping[str, Any] | None = None,
        budgets: Sequence[Budget] = (),
    ) -> Allocation:
        """Allocation over the groups of a ``DependencyGraph`` with its exact params/FLOPs polynomials.

        Parameters
        ----------
        graph : DependencyGraph (anything with ``.cost_model`` and ``.groups``)
        errors : mapping group → errors
            One table per group to allocate; each must be a prunable group of the graph. Every
            other group keeps all its units (its terms are folded into constants).
        levels : mapping group → keep counts, optional
            Default: ``len(errors[g])`` evenly spaced counts ending at the group's size
            (``round(size·(i+1)/L)``).
        params, flops : float, optional
            Budgets: fractions of the dense model's cost when ``relative`` (default), else absolute.
        components : mapping name → (groups, fraction), optional
            ``>=`` bounds: the component keeps at least ``fraction`` of its own parameters.
        budgets : sequence of Budget
            More budgets over the same groups (a measured latency table, say), kept as given.
        """
        model = graph.cost_model
        by_name = {g.name: g for g in graph.groups}
        for g in errors:
            if g not in by_name:
                raise ValidationError(f"errors[{g!r}]", "unknown group (not in the graph)")
            if not by_name[g].prunable:
                raise ValidationError(f"errors[{g!r}]", f"group is frozen ({getattr(by_name[g], 'reason', '')})")
        sizes = {name: float(s) for name, s in model.sizes.items()}
        fixed = {name: s for name, s in sizes.items() if name not in errors}
        if levels is None:
            levels = {}
            for g, e in errors.items():
                size, count = by_name[g].size, len(e)
                lv = [round(size * (i + 1) / count) for i in range(count)]
                if len(set(lv)) != count:
                    raise ValidationError(f"errors[{g!r}]", f"{count} levels do not fit a group of {size} units; pass levels")
                levels[g] = lv
        extra, budgets = list(budgets), []
        for name, poly, value in (("params", model.params, params), ("flops", model.flops, flops)):
            if value is None:
                continue
            reduced = poly.fix(fixed)
            limit = float(value) * poly.evaluate(sizes) if relative else float(value)
            budgets.append(Budget(name, reduced, limit))
        for name, (members, fraction) in dict(components or {}).items():
            members = tuple(members)
            for g in members:
                if g not in by_name:
                    raise ValidationError(f"components[{name!r}]", f"unknown group {g!r}")
            own = restrict(model.params, members)
            budgets.append(Budget(name, own.fix(fixed), float(fraction) * own.evaluate(sizes), ">=", members))
        return cls(levels, errors, budgets + extra, weights=weights, min_keep=dict(min_keep or {}),
                   max_keep=dict(max_keep or {}),
                   round_to=round_to if round_to is not None else {}, sizes={g: sizes[g] for g in errors}, scores=scores)

    @classmethod
    def unstructured(
        cls,
        sizes: Mapping[str, int],
        densities: Sequence[float],
        errors: Mapping[str, Sequence[float]],
        *,
        density: float,
        scores: Mapping[str, Any] | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> Allocation:
        """Per-layer density allocation: ``levels[g] = round(densities·sizes[g])`` nonzeros,
        one ``nonzeros`` budget ``Σ_g k_g ≤ density·Σ_g sizes[g]``."""
        dens = np.asarray(densities, dtype=np.float64)
        levels = {g: np.unique(np.round(dens * n)) for g, n in sizes.items()}
        for g, lv in levels.items():
            if lv.size != dens.size:
                raise ValidationError(f"sizes[{g!r}]", f"layer of {sizes[g]} weights cannot hold {dens.size} distinct densities")
        poly = Polynomial(0.0, {g: 1.0 for g in sizes}, {})
        budget = Budget("nonzeros", poly, float(density) * float(sum(sizes.values())))
        return cls(levels, errors, [budget], weights=weights, sizes={g: float(n) for g, n in sizes.items()}, scores=scores)


def _validate_cost(b: Budget, known: set[str], levels: Mapping[str, np.ndarray]) -> None:
    """Unknown groups, negative coefficients and unmeasured latency levels, named by field."""
    where = f"budgets[{b.name!r}].cost"
    for g in sorted(b.cost.variables()):
        if g not in known:
            raise ValidationError(where, f"unknown group {g!r}")
    if isinstance(b.cost, Polynomial):
        if not math.isfinite(b.cost.constant) or b.cost.constant < 0:
            raise ValidationError(f"{where}.constant", f"negative or non-finite cost {b.cost.constant!r} makes no sense")
        for g, a in b.cost.linear.items():
            if not math.isfinite(a) or a < 0:
                raise ValidationError(f"{where}.linear[{g!r}]", f"negative or non-finite coefficient {a!r}")
        for gh, c in b.cost.bilinear.items():
            if not math.isfinite(c) or c < 0:
                raise ValidationError(f"{where}.bilinear[{gh!r}]", f"negative or non-finite coefficient {c!r}")
    else:
        if not math.isfinite(b.cost.constant) or b.cost.constant < 0:
            raise ValidationError(f"{where}.constant", f"negative or non-finite latency {b.cost.constant!r}")
        for t, term in enumerate(b.cost.terms):
            for side, g, lv in (("input", term.input, term.input_levels), ("output", term.output, term.output_levels)):
                if g is None:
                    continue
                for v in levels[g]:
                    if _position(np.asarray(lv), float(v)) < 0:
                        raise ValidationError(f"{where}.terms[{t}].{side}_levels",
                                              f"level {v:.6g} of group {g!r} has no latency entry")
