"""Complexity-aware training (Frank, Guenter, Sideris, arXiv 2411.09127) on secateurs groups.

Every unit of every gated group has a Bernoulli gate ξ_{g,i} ~ Bern(θ_{g,i}); a removable layer
(a residual branch that can be skipped) has a gate ξ_l shared by the groups inside it, and a unit
is active only if its layer is. The forward pass scales each unit's consumer columns by a fresh
sample (straight-through: the value is the sample, the gradient flows to θ). The regulariser is
the exact expected cost from the graph's polynomial (see ``expected_cost``):

    R = γ · [β · R(θ_layers) + (1 − β) · R(θ_units)],  R = α·E[FLOPs]/FLOPs₀ + (1−α)·E[params]/P₀

where each part takes the gradient only with respect to its own gates. θ takes projected
gradient steps, onto the box or, when a hard budget is stated instead of γ, onto the budget
linearised at the current θ (the ``Projection`` problem; bisection, or CVXPY with the layer →
unit hierarchy). A concave term κ·Σθ(1−θ) (our stand-in for the flattening hyperprior) pulls
probabilities to 0 or 1; a gate that reaches 0 is fixed there for good.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from secateurs.cost import Cost, CostModel
from secateurs.errors import InfeasibleBudgetError, ValidationError
from secateurs.graph.groups import Group
from secateurs.plan import PrunePlan
from secateurs.problems.projection import Projection
from secateurs.solvers import solve
from secateurs.training.expected_cost import expected_cost
from secateurs.training.gating import UnitScales
from secateurs.training.plans import plan_from_keep


class ComplexityAware:
    """Bernoulli gates on a model's prunable groups, trained with a complexity regulariser.

    Parameters
    ----------
    model : nn.Module
    groups : iterable of Group
        The prunable groups to gate (``graph.prunable_groups()``).
    cost_model : CostModel
        ``graph.cost_model``: exact params and FLOPs polynomials over group keep counts.
    strength, flops_priority, layer_balance : float
        The paper's γ (overall strength), α (FLOPs vs params) and β (layer vs unit terms).
    budget : mapping {"flops" or "params": fraction of the dense cost}, optional
        A hard budget: θ is projected onto it after every step instead of penalised (γ is then
        only used if also given).
    layers : mapping layer name → group names inside that removable block, optional
    lr : float
        Step size of the projected gradient step on θ.
    flatten : float
        Weight κ of the term pulling probabilities to 0/1.
    init : float
        Initial probability of every gate.
    inplace : bool
        Gate ``model`` itself; by default a deep copy, exposed as ``.model``.
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Iterable[Group],
        cost_model: CostModel,
        *,
        strength: float = 1.0,
        flops_priority: float = 0.5,
        layer_balance: float = 0.5,
        budget: Mapping[str, float] | None = None,
        layers: Mapping[str, Iterable[str]] | None = None,
        lr: float = 0.05,
        flatten: float = 0.01,
        init: float = 0.9,
        inplace: bool = False,
    ) -> None:
        for name, value in (("flops_priority", flops_priority), ("layer_balance", layer_balance), ("init", init)):
            if not 0.0 <= value <= 1.0:
                raise ValidationError(name, f"must be in [0, 1], got {value!r}")
        if strength < 0 or lr <= 0 or flatten < 0:
            raise ValidationError("strength" if strength < 0 else "lr" if lr <= 0 else "flatten", "must be positive")
        self.model = model if inplace else copy.deepcopy(model)
        self.groups = {g.name: g for g in groups}
        for g in self.groups.values():
            if not g.prunable:
                raise ValidationError("groups", f"group {g.name!r} is frozen ({g.reason}); it cannot be gated")
        self.cost_model = cost_model
        self.strength, self.alpha, self.beta = float(strength), float(flops_priority), float(layer_balance)
        self.lr, self.flatten = float(lr), float(flatten)
        self.relinearise = 3
        self.budget = self._check_budget(budget)
        self.layer_of: dict[str, str] = {}
        for layer, members in (layers or {}).items():
            for g in members:
                if g not in self.groups:
                    raise ValidationError("layers", f"layer {layer!r} names group {g!r}, which is not gated")
                self.layer_of[g] = layer
        self.theta = {g: torch.full((grp.size,), init, dtype=torch.float64, requires_grad=True)
                      for g, grp in self.groups.items()}
        self.layer_theta = {name: torch.tensor(init, dtype=torch.float64, requires_grad=True)
                            for name in dict.fromkeys(self.layer_of.values())}
        self.dead = {g: torch.zeros(grp.size, dtype=torch.bool) for g, grp in self.groups.items()}
        self.fixed_counts = {g: size for g, size in cost_model.sizes.items() if g not in self.groups}
        dense = cost_model()
        self.dense = {"flops": float(dense.flops), "params": float(dense.params)}
        self.scales = UnitScales(self.model, self.groups.values())
        self._hook = self.model.register_forward_pre_hook(self._sample)
        self.steps = 0

    def _check_budget(self, budget: Mapping[str, float] | None) -> dict[str, float]:
        out = dict(budget or {})
        for key, value in out.items():
            if key not in ("flops", "params"):
                raise ValidationError("budget", f"unknown budget {key!r} (use 'flops' or 'params')")
            if not 0.0 < value <= 1.0:
                raise ValidationError("budget", f"{key} must be a fraction in (0, 1], got {value!r}")
        return out

    def _sample(self, module: nn.Module, args: Any) -> None:
        """Draw gates for this forward (training) or use the rounded gates (eval)."""
        values = {}
        for g, theta in self.theta.items():
            p = theta
            if g in self.layer_of:
                p = p * self.layer_theta[self.layer_of[g]]
            p32 = p.to(torch.float32)
            sample = torch.bernoulli(p32.detach()) if module.training else (p32.detach() > 0.5).to(torch.float32)
            values[g] = sample + p32 - p32.detach()  # straight-through: value ξ, gradient wrt θ
        self.scales.set(values)

    def expected(self, what: str, *, units: bool = True, layers: bool = True) -> torch.Tensor:
        """E[FLOPs] or E[params] at the current probabilities (gradients to the chosen gates)."""
        polynomial = getattr(self.cost_model, what)
        unit = {g: t if units else t.detach() for g, t in self.theta.items()}
        layer = {n: t if layers else t.detach() for n, t in self.layer_theta.items()}
        return expected_cost(polynomial, unit, fixed=self.fixed_counts, layer_of=self.layer_of, layer_probs=layer)

    def _relative(self, *, units: bool, layers: bool) -> torch.Tensor:
        flops = self.expected("flops", units=units, layers=layers) / max(self.dense["flops"], 1.0)
        params = self.expected("params", units=units, layers=layers) / max(self.dense["params"], 1.0)
        return self.alpha * flops + (1 - self.alpha) * params

    def penalty(self) -> torch.Tensor:
        """The complexity regulariser plus the pull to 0/1; add it to the task loss."""
        total = torch.zeros((), dtype=torch.float64)
        if self.strength and not self.budget:
            unit_term = self._relative(units=True, layers=False)
            layer_term = self._relative(units=False, layers=True) if self.layer_theta else torch.zeros(())
            weight = self.beta if self.layer_theta else 0.0
            total = total + self.strength * (weight * layer_term + (1 - weight) * unit_term)
        for theta in [*self.theta.values(), *self.layer_theta.values()]:
            total = total + self.flatten * (theta * (1 - theta)).sum()
        return total.to(torch.float32)

    def step(self) -> None:
        """Projected gradient step on θ (call after the optimiser step, before zero_grad)."""
        with torch.no_grad():
            for g, theta in self.theta.items():
                if theta.grad is not None:
                    theta -= self.lr * theta.grad
                theta.clamp_(0.0, 1.0)
                theta[self.dead[g]] = 0.0
            for theta in self.layer_theta.values():
                if theta.grad is not None:
                    theta -= self.lr * theta.grad
                theta.clamp_(0.0, 1.0)
        if self.budget:
            for _ in range(self.relinearise):  # each pass re-linearises at the projected point
                self._project_onto_budget()
        with torch.no_grad():
            for g, theta in self.theta.items():
                self.dead[g] |= theta <= 1e-6  # a gate at 0 is removed for good
                theta.grad = None
            for theta in self.layer_theta.values():
                theta.grad = None
        self.steps += 1

    def _flat(self) -> tuple[list[tuple[str, str]], torch.Tensor]:
        keys = [("unit", g) for g in self.theta] + [("layer", n) for n in self.layer_theta]
        flat = torch.cat([self.theta[k].detach().reshape(-1) if kind == "unit" else self.layer_theta[k].detach().reshape(1)
                          for kind, k in keys])
        return keys, flat

    def _project_onto_budget(self) -> None:
        """Project θ onto each budget linearised at θ (exact for the linearisation)."""
        keys, flat = self._flat()
        rows, rhs = [], []
        for what, fraction in self.budget.items():
            params = [self.theta[k] if kind == "unit" else self.layer_theta[k] for kind, k in keys]
            value = self.expected(what)
            grads = torch.autograd.grad(value, params, allow_unused=True)
            c = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                           for gr, p in zip(grads, params, strict=True)])
            rows.append(c.numpy())
            rhs.append(fraction * self.dense[what] - float(value.detach()) + float(c @ flat))
        parent = None
        offsets, position = {}, 0
        for kind, k in keys:
            size = self.theta[k].numel() if kind == "unit" else 1
            offsets[(kind, k)] = position
            position += size
        if self.layer_theta:
            parent = -np.ones(position, dtype=np.int64)
            for g, layer in self.layer_of.items():
                start = offsets[("unit", g)]
                parent[start:start + self.theta[g].numel()] = offsets[("layer", layer)]
        fixed = {}
        for g in self.theta:
            for i in torch.nonzero(self.dead[g]).reshape(-1).tolist():
                fixed[offsets[("unit", g)] + i] = 0.0
        problem = Projection(flat.numpy(), costs=np.array(rows), budgets=np.array(rhs), parent=parent, fixed=fixed)
        simple = parent is None and len(rows) == 1 and bool(np.all(problem.costs >= 0))
        result = solve(problem, "bisection" if simple else "cvxpy")
        if not result.ok:
            raise ValidationError("budget", f"the gate projection failed: {result.status.value} {result.info}")
        new = torch.as_tensor(result.solution, dtype=torch.float64)
        with torch.no_grad():
            for kind, k in keys:
                start = offsets[(kind, k)]
                if kind == "unit":
                    self.theta[k].copy_(new[start:start + self.theta[k].numel()])
                else:
                    self.layer_theta[k].copy_(new[start])

    def keep(self) -> dict[str, list[int]]:
        """Units whose gate (times its layer's) is above ½; at least one per group."""
        out = {}
        for g, theta in self.theta.items():
            p = theta.detach() * (self.layer_theta[self.layer_of[g]].detach() if g in self.layer_of else 1.0)
            kept = torch.nonzero(p > 0.5).reshape(-1).tolist() or [int(torch.argmax(p))]
            out[g] = kept
        return out

    def finalize(self) -> PrunePlan:
        """The plan of kept units, within the hard budget when one was given; gates removed.

        ``secateurs.apply(self.model, plan)`` then gives the physically smaller model.
        """
        if self.steps == 0:
            raise ValidationError("finalize", "ComplexityAware was never stepped: call step() after each optimiser step")
        keep = self.keep()
        if self.budget:
            keep = self._meet_budget(keep)
        self.close()
        return plan_from_keep(self.groups, keep, {"method": "complexity_aware", "budget": self.budget, "steps": self.steps})

    def _meet_budget(self, keep: dict[str, list[int]]) -> dict[str, list[int]]:
        """Drop units until every budget holds: least probable per unit of relative cost saved."""
        counts = {g: len(units) for g, units in keep.items()}

        def excess(cost: Cost) -> bool:
            return any(getattr(cost, w) > f * self.dense[w] for w, f in self.budget.items())

        current = self.cost_model(counts)
        while excess(current):
            best: tuple[float, str, int, Cost] | None = None
            for g, units in keep.items():
                if len(units) <= 1:
                    continue
                trial = self.cost_model({**counts, g: counts[g] - 1})
                saved = sum((getattr(current, w) - getattr(trial, w)) / self.dense[w] for w in self.budget)
                weakest = min(units, key=lambda u, g=g: float(self.theta[g][u]))
                score = float(self.theta[g][weakest]) / max(saved, 1e-12)
                if best is None or score < best[0]:
                    best = (score, g, weakest, trial)
            if best is None:
                what, fraction = next(iter(self.budget.items()))
                least = getattr(self.cost_model(dict.fromkeys(keep, 1)), what)
                raise InfeasibleBudgetError(what, fraction * self.dense[what], least, "one unit kept per gated group")
            _, g, unit, current = best
            keep[g] = [u for u in keep[g] if u != unit]
            counts[g] -= 1
        return keep

    def close(self) -> None:
        """Remove the gates' hook and parametrisations from the model."""
        self._hook.remove()
        self.scales.remove()
