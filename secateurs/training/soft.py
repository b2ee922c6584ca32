"""Component-aware soft coefficients (Sundaram et al., arXiv 2507.14882) on secateurs groups.

Groups are partitioned into named components (encoder, latent, decoder, heads...): a group
belongs to the component whose module prefix its producers carry, and a group whose producers and
consumers lie in different components (a latent size) is its own component ``"<a>→<b>"`` unless
the user names it. Each unit gets a coefficient s ∈ [0, 1] that scales its channel (consumer
columns, see ``gating``). The coefficients are trained on the user's application loss by
projected gradient (globally normalised steps, ours, see ``steps``): after each step
they are projected (the ``Projection`` problem) onto

- every component's unit budget {Σ_{c} s = ρ_c·N_c} (one exact bisection per component), and/or
- a model-wide params/FLOPs budget, linearised at the soft keep counts k_g = Σ_i s_gi with the
  graph's exact polynomials (bisection; with both kinds, one QP in CVXPY where the unit budgets
  become Σ_c s ≤ ρ_c·N_c).

Budgets ramp from the dense model to their targets along ``schedule``, and an optional pull to
0/1 (``flatten``) makes the soft model end close to a pruned one.

Train the coefficients on the *frozen* model (build the optimiser without the model's weights, or
none at all): when the weights train too, the consumer columns absorb any scale, so ∂L/∂s carries
no signal and only the costs decide (``benchmarks/training.py`` trains them frozen for a third of
its epochs, then finalizes and fine-tunes). Fine-tune after ``finalize``.

``finalize`` turns coefficients into a plan with the allocation solvers: per group, keeping k
units loses the coefficients of the others, and the exact ``Allocation`` (``allocate_units``)
keeps the most coefficient mass within every component's unit budget and the model budget.
Each kept unit's coefficient is folded into its consumer columns of ``self.model``, so
``apply(self.model, plan)`` computes what the soft model did, less the dropped units.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Literal

import numpy as np
import torch
from torch import nn

from secateurs.cost import CostModel
from secateurs.errors import ValidationError, require_numbers
from secateurs.graph.groups import Group, check_channel_multiple, unit_multiple
from secateurs.hardware import model_device
from secateurs.plan import PrunePlan
from secateurs.problems.projection import Projection
from secateurs.solvers import solve
from secateurs.training.gating import UnitScales, fold_scales
from secateurs.training.pdp import DensitySchedule
from secateurs.training.plans import (
    UnitBudget,
    allocate_units,
    check_budget,
    check_reachable,
    gated_polynomial,
    plan_from_keep,
)
from secateurs.training.steps import ScaledStep

WHOLE_MODEL = "model"


def assign_components(groups: Iterable[Group], prefixes: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Map each group to a component: the one whose prefix its producer modules (or, without
    producers, all its modules) carry; a group spanning components gets its own ``"<a>→<b>"``."""
    table = {name: tuple(p for p in ps) for name, ps in prefixes.items()}

    def component_of(module: str) -> str | None:
        best = None
        for name, ps in table.items():
            for p in ps:
                if (module == p or module.startswith(p + ".") or p == "") and (best is None or len(p) > best[1]):
                    best = (name, len(p))
        return best[0] if best else None

    out: dict[str, str] = {}
    for g in groups:
        producers = {component_of(m.module) for m in g.producers()} or {component_of(m) for m in g.modules()}
        consumers = {component_of(m.module) for m in g.consumers()}
        if None in producers:
            raise ValidationError("components", f"group {g.name!r} has modules outside every component prefix")
        if len(producers) > 1:
            raise ValidationError("components", f"group {g.name!r} is produced in several components {sorted(producers)}")
        (home,) = producers
        others = sorted(c for c in consumers - {home} if c is not None)
        out[g.name] = home if not others else f"{home}→{others[0]}"
    return out


class SoftCoefficients:
    """Per-unit coefficients in [0, 1], optimised under per-component and model-wide budgets.

    Parameters
    ----------
    model : nn.Module
    groups : iterable of Group
        Prunable groups (``graph.prunable_groups()``).
    components : mapping component name → module prefixes, optional
        Default: one component ``"model"`` holding every group.
    keep : mapping component name → fraction of its units kept (ρ_c), or one float for all, optional
    cost_model : CostModel, optional
        ``graph.cost_model``; needed with ``budget``.
    budget : {"flops" | "params": fraction of the dense model's cost}, optional
        A model-wide budget, met exactly by ``finalize`` (give ``keep``, ``budget`` or both).
    lr : float
        Step size of the projected (globally normalised, see ``steps``) gradient step, in
        coefficient units.
    flatten : float
        Weight κ of a pull to 0/1 (the gradient of κ·Σ s(1−s), times the schedule's progress,
        applied in the step's normalised units) so the pruned model is the soft one (ours).
    schedule : DensitySchedule, optional
        How the budgets ramp from the dense model to their targets (default: at once).
    channel_multiple : int or "auto"
        The final plan keeps a multiple of this many channels per group (heads count their
        width), or all the units still in it: the vector width kernels run in (see
        ``secateurs.prune``); ``"auto"`` reads it off the model's device.
    inplace : bool
        Scale ``model`` itself; by default a deep copy, exposed as ``.model``.
    """

    def __init__(self, model: nn.Module, groups: Iterable[Group], components: Mapping[str, Iterable[str]] | None = None,
                 keep: float | Mapping[str, float] | None = None, *, cost_model: CostModel | None = None,
                 budget: Mapping[str, float] | None = None, lr: float = 0.02, flatten: float = 0.0,
                 schedule: DensitySchedule | None = None, channel_multiple: int | Literal["auto"] = 1,
                 inplace: bool = False) -> None:
        self.groups = {g.name: g for g in groups}
        if not self.groups:
            raise ValidationError("groups", "no groups to scale")
        for g in self.groups.values():
            if not g.prunable:
                raise ValidationError("groups", f"group {g.name!r} is frozen ({g.reason})")
        multiple = check_channel_multiple(channel_multiple, model_device(model))
        self.multiples = {g: unit_multiple(grp, multiple) for g, grp in self.groups.items()}
        self.component_of = assign_components(self.groups.values(), components or {WHOLE_MODEL: [""]})
        names = sorted(set(self.component_of.values()))
        self.budget = check_budget(budget)
        if keep is None and not self.budget:
            raise ValidationError("keep", "give per-component keep fractions (keep=), a model budget (budget=), or both")
        if self.budget and cost_model is None:
            raise ValidationError("cost_model", "a flops/params budget needs the graph's cost model")
        check_reachable(self.groups, cost_model, self.budget, multiples=self.multiples)
        require_numbers(lr=lr, flatten=flatten)
        if keep is None:
            fractions: dict[str, float] = {}
        elif not isinstance(keep, Mapping):
            require_numbers(keep=keep)
            fractions = {c: float(keep) for c in names}
        else:
            for c, v in keep.items():
                require_numbers(**{f"keep[{c!r}]": v})
            fractions = {str(c): float(v) for c, v in keep.items()}
            for c in names:
                if c not in fractions:
                    raise ValidationError("keep", f"no keep fraction for component {c!r} (components: {names})")
            for c in fractions:
                if c not in names:
                    raise ValidationError("keep", f"unknown component {c!r} (components: {names})")
        for c, value in fractions.items():
            if not 0.0 < value <= 1.0:
                raise ValidationError("keep", f"component {c!r}: fraction must be in (0, 1], got {value}")
        self.fractions = fractions
        if not lr > 0:
            raise ValidationError("lr", f"must be positive, got {lr}")
        self.lr = float(lr)
        if not flatten >= 0:
            raise ValidationError("flatten", f"must be non-negative, got {flatten!r}")
        self.flatten = float(flatten)
        self.schedule = schedule or DensitySchedule(warmup=0, ramp=0)
        self.cost_model = cost_model
        self.relinearise = 3
        self.model = model if inplace else copy.deepcopy(model)
        self.coefficients = {g: torch.ones(grp.size, requires_grad=True) for g, grp in self.groups.items()}
        self._optimizer = ScaledStep(list(self.coefficients.values()), lr=self.lr)
        self.scales = UnitScales(self.model, self.groups.values())
        self.scales.set(self.coefficients)
        self.steps = 0
        self._closed = False
        self._project()

    def components(self) -> list[str]:
        """Component names, sorted."""
        return sorted(set(self.component_of.values()))

    def members(self, component: str) -> list[str]:
        return [g for g, c in self.component_of.items() if c == component]

    def units_kept(self, component: str) -> int:
        """ρ_c · N_c rounded, at least one unit per group of the component."""
        groups = self.members(component)
        total = sum(self.groups[g].size for g in groups)
        return max(round(self.fractions[component] * total), len(groups))

    def _progress(self) -> float:
        return self.schedule.progress(self.steps)

    def units_now(self, component: str) -> float:
        """The component's unit budget at this step of the schedule (its size, ramping to ``units_kept``)."""
        total = sum(self.groups[g].size for g in self.members(component))
        return total - self._progress() * (total - self.units_kept(component))

    def parameters(self) -> list[torch.Tensor]:
        """The coefficients (for users who prefer their own optimiser over ``step``)."""
        return list(self.coefficients.values())

    # -- projection ------------------------------------------------------------------------

    def _unit_rows(self, order: list[str]) -> tuple[list[np.ndarray], list[float]]:
        rows, limits = [], []
        for component in self.fractions:
            chosen = set(self.members(component))
            rows.append(np.concatenate([np.full(self.groups[g].size, 1.0 if g in chosen else 0.0) for g in order]))
            limits.append(float(self.units_now(component)))
        return rows, limits

    def _cost_rows(self, order: list[str]) -> tuple[list[np.ndarray], list[float]]:
        """Model budgets linearised at the soft counts k_g = Σ_i s_gi (exact polynomials)."""
        assert self.cost_model is not None
        rows, limits = [], []
        dense = self.cost_model()
        counts = {g: self.coefficients[g].detach().double().sum().requires_grad_(True) for g in order}
        flat = np.concatenate([self.coefficients[g].detach().double().numpy() for g in order])
        for what, target in self.budget.items():
            fraction = 1.0 - self._progress() * (1.0 - target)
            polynomial = gated_polynomial(self.cost_model, what, order)
            value = torch.tensor(polynomial.constant, dtype=torch.float64)
            for g, a in polynomial.linear.items():
                value = value + a * counts[g]
            for (g, h), b in polynomial.bilinear.items():
                value = value + b * counts[g] * counts[h]
            grads = torch.autograd.grad(value, [counts[g] for g in order], allow_unused=True)
            c = np.concatenate([np.full(self.groups[g].size, 0.0 if gr is None else max(float(gr), 0.0))
                                for g, gr in zip(order, grads, strict=True)])
            rows.append(c)
            limits.append(fraction * float(getattr(dense, what)) - float(value.detach()) + float(c @ flat))
        return rows, limits

    def _set(self, order: list[str], values: np.ndarray) -> None:
        projected = torch.as_tensor(values, dtype=torch.float32)
        start = 0
        for g in order:
            size = self.groups[g].size
            self.coefficients[g].copy_(projected[start:start + size])
            start += size

    def _project(self) -> None:
        with torch.no_grad():
            if not self.budget:  # components are disjoint: one exact bisection each
                for component in self.fractions:
                    order = self.members(component)
                    flat = torch.cat([self.coefficients[g].detach().double() for g in order]).numpy()
                    problem = Projection(flat, total=float(self.units_now(component)))
                    self._set(order, solve(problem, "bisection").solution)
                return
            order = list(self.groups)
            for _ in range(self.relinearise):
                flat = torch.cat([self.coefficients[g].detach().double() for g in order]).numpy()
                with torch.enable_grad():
                    rows, limits = self._cost_rows(order)
                unit_rows, unit_limits = self._unit_rows(order)
                costs, budgets = np.array(rows + unit_rows), np.array(limits + unit_limits)
                if np.all(costs @ flat <= budgets + 1e-9 * np.maximum(1.0, np.abs(budgets))):
                    return
                problem = Projection(flat, costs=costs, budgets=budgets)
                result = solve(problem, "bisection" if costs.shape[0] == 1 else "cvxpy")
                if not result.ok:
                    raise ValidationError("budget", f"the coefficient projection failed: {result.status.value}")
                self._set(order, result.solution)

    # -- protocol --------------------------------------------------------------------------

    def penalty(self) -> torch.Tensor:
        """No regulariser: the budgets are held by projection (zero, for a uniform API)."""
        return torch.zeros(())

    def step(self) -> None:
        """Gradient step on the coefficients, then projection onto every budget."""
        if self._closed:
            raise ValidationError("step", "this SoftCoefficients was finalized; wrap the model again")
        self._optimizer.step(flatten=self.flatten * self._progress())
        with torch.no_grad():
            for s in self.coefficients.values():
                s.clamp_(0.0, 1.0)
        self._project()
        self._optimizer.zero_grad()
        self.steps += 1

    def keep(self) -> dict[str, list[int]]:
        """The most coefficient mass within every budget, exactly (the allocation solvers)."""
        unit_budgets = [UnitBudget(c, tuple(self.members(c)), self.units_kept(c)) for c in self.fractions]
        scores = {g: s.detach() for g, s in self.coefficients.items()}
        return allocate_units(scores, cost_model=self.cost_model, budget=self.budget, unit_budgets=unit_budgets,
                              multiples=self.multiples)

    def finalize(self) -> PrunePlan:
        """The plan of kept units; coefficients folded into consumer columns, parametrisations removed."""
        if self.steps == 0:
            raise ValidationError("finalize", "SoftCoefficients was never stepped: call step() after each optimiser step")
        if self._closed:
            raise ValidationError("finalize", "SoftCoefficients was already finalized")
        keep = self.keep()
        fold = {g: s.detach().clone() for g, s in self.coefficients.items()}
        self.scales.remove()
        self._closed = True
        fold_scales(self.model, self.groups, keep, fold)
        meta = {"method": "soft_coefficients", "keep": self.fractions, "budget": self.budget}
        return plan_from_keep(self.groups, keep, meta)

    def spent(self) -> dict[str, float]:
        """Σ s per component with a unit budget (``units_now`` after every projection, without a model budget)."""
        return {c: float(sum(float(self.coefficients[g].detach().sum()) for g in self.members(c))) for c in self.fractions}
