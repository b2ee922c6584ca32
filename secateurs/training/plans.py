"""Turn a training method's unit scores into kept units and a PrunePlan that ``apply`` uses alone.

Every training-aware method ends with one score per unit (a gate probability, a soft coefficient,
a normalised channel norm). Which units to keep under exact budgets is then an ``Allocation``
(formulation 2): per group, keeping the ``k`` best units loses the scores of the others, so
``e_g(k) = Σ_i s_gi − (sum of the k largest s_gi)``, and the graph's params/FLOPs polynomials
are the budgets. The exact allocation solvers answer it (``dp`` on chains and trees, ``cpsat``
when the cost interactions have a cycle), so the plan meets every budget by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from secateurs.cost import CostModel, Polynomial
from secateurs.errors import InfeasibleBudgetError, SolverError, SolverRefusedError, ValidationError
from secateurs.graph.groups import Group
from secateurs.plan import PrunePlan
from secateurs.problems.allocation import Allocation
from secateurs.problems.allocation import Budget as AllocationBudget
from secateurs.solvers import Status, solve

MEASURES = ("flops", "params")


def plan_from_keep(groups: Mapping[str, Group], keep: Mapping[str, list[int]], meta: Mapping[str, object]) -> PrunePlan:
    """A plan naming only the groups that lose units, with their definitions embedded; a group
    kept with no unit at all (a removed layer) is listed in ``allow_empty``."""
    pruned = {name: sorted(units) for name, units in keep.items() if len(units) < groups[name].size}
    empty = [name for name, units in pruned.items() if not units]
    return PrunePlan(pruned, groups={name: groups[name] for name in pruned}, meta=dict(meta), allow_empty=empty)


def check_budget(budget: Mapping[str, float] | None, field: str = "budget") -> dict[str, float]:
    """``{"flops" | "params": fraction in (0, 1]}``; anything else is a ValidationError naming it."""
    out: dict[str, float] = {}
    for key, value in dict(budget or {}).items():
        if key not in MEASURES:
            raise ValidationError(field, f"unknown budget {key!r} (use 'flops' or 'params')")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise ValidationError(field, f"{key} must be a fraction in (0, 1], got {value!r}")
        out[key] = float(value)
    return out


@dataclass(frozen=True)
class UnitBudget:
    """At most ``limit`` units kept in total over ``groups`` (a component's unit budget)."""

    name: str
    groups: tuple[str, ...]
    limit: int


def gated_polynomial(cost_model: CostModel, what: str, gated: Sequence[str],
                     fixed: Mapping[str, int] | None = None) -> Polynomial:
    """``cost_model``'s params or FLOPs with every group not in ``gated`` fixed at ``fixed[g]``
    (default: its full size)."""
    polynomial: Polynomial = getattr(cost_model, what)
    chosen = set(gated)
    counts = {**cost_model.sizes, **(fixed or {})}
    return polynomial.fix({g: float(s) for g, s in counts.items() if g not in chosen})


def allocate_units(
    scores: Mapping[str, torch.Tensor | np.ndarray],
    *,
    cost_model: CostModel | None = None,
    budget: Mapping[str, float] | None = None,
    unit_budgets: Sequence[UnitBudget] = (),
    min_keep: Mapping[str, int] | None = None,
    fixed: Mapping[str, int] | None = None,
    multiples: Mapping[str, int] | None = None,
    time_limit: float | None = None,
) -> dict[str, list[int]]:
    """The units to keep per group: the most score retained within every budget, exactly.

    Parameters
    ----------
    scores : mapping group → (size,) scores, higher = more worth keeping (at least 0)
    cost_model : CostModel, required with ``budget``
    budget : {"flops" | "params": fraction of the dense model's cost}
    unit_budgets : per-component caps on the number of kept units
    min_keep : per-group least number of units (default 1: a plan never empties a group)
    fixed : keep counts of groups outside ``scores`` (default their full size; 0 for a removed
        layer's groups); budgets stay fractions of the dense model
    multiples : per-group unit multiple (``channel_multiple`` of the methods, through
        ``unit_multiple``): a group keeps a multiple of it, or its whole size (from the cost
        model); all its scored units when fewer than one multiple are scored

    Raises
    ------
    InfeasibleBudgetError
        When no choice of at least ``min_keep`` units per group fits a budget (names it).
    """
    budget = check_budget(budget)
    if budget and cost_model is None:
        raise ValidationError("cost_model", "a flops/params budget needs the graph's cost model")
    names = list(scores)
    arrays = {g: np.asarray(torch.as_tensor(scores[g]).detach().double().cpu().numpy()).reshape(-1) for g in names}
    levels: dict[str, list[float]] = {}
    errors: dict[str, list[float]] = {}
    floor = {g: max(1, int((min_keep or {}).get(g, 1))) for g in names}
    for g in names:
        s = np.sort(np.maximum(arrays[g], 0.0))[::-1]
        kept = np.concatenate([[0.0], np.cumsum(s)])
        lo, m = min(floor[g], s.size), int((multiples or {}).get(g, 1))
        full = cost_model.sizes.get(g, s.size) if cost_model is not None else s.size
        counts = [k for k in range(lo, s.size + 1) if k % m == 0 or k == s.size == full] or [s.size]
        levels[g] = [float(k) for k in counts]
        errors[g] = [float(kept[-1] - kept[k]) for k in counts]
    rows: list[AllocationBudget] = []
    if budget:
        assert cost_model is not None
        dense = cost_model()
        for what, fraction in budget.items():
            polynomial = gated_polynomial(cost_model, what, names, fixed)
            rows.append(AllocationBudget(what, polynomial, fraction * float(getattr(dense, what))))
    for ub in unit_budgets:
        rows.append(AllocationBudget(f"units[{ub.name}]", Polynomial(0.0, dict.fromkeys(ub.groups, 1.0)), float(ub.limit)))
    if not rows:
        return {g: sorted(np.argsort(-arrays[g], kind="stable")[: arrays[g].size].tolist()) for g in names}
    problem = Allocation(levels, errors, rows)  # raises InfeasibleBudgetError naming the budget
    result = None
    for solver in ("dp", "cpsat"):
        try:
            result = solve(problem, solver, time_limit=time_limit)
        except SolverRefusedError:
            continue
        if result.ok:
            break
    if result is not None and result.status is Status.INFEASIBLE:
        first = rows[0]
        raise InfeasibleBudgetError(", ".join(b.name for b in rows), first.limit, problem.least(first.name),
                                    "each budget alone can be met, not all of them together")
    if result is None or not result.ok:
        status = "refused" if result is None else result.status.value
        raise SolverError(f"the allocation of kept units found no plan within the budgets ({status})")
    keep: dict[str, list[int]] = {}
    for g in names:
        k = int(round(result.solution[g]))
        keep[g] = sorted(np.argsort(-arrays[g], kind="stable")[:k].tolist())
    return keep


def check_reachable(groups: Mapping[str, Group], cost_model: CostModel | None, budget: Mapping[str, float],
                    *, multiples: Mapping[str, int] | None = None, removable: Sequence[str] = ()) -> None:
    """Raise :class:`InfeasibleBudgetError` at construction, not after a training run, when even the
    least plan (every group at its least level, every removable layer gone) misses the budget."""
    if not budget:
        return
    scores = {g: torch.ones(grp.size) for g, grp in groups.items() if g not in removable}
    allocate_units(scores, cost_model=cost_model, budget=budget, fixed=dict.fromkeys(removable, 0),
                   multiples=multiples)
