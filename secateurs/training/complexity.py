"""Complexity-aware training (Frank, Guenter, Sideris, arXiv 2411.09127) on secateurs groups.

Every unit of every gated group has a Bernoulli gate ξ_{g,i} ~ Bern(θ_{g,i}); a removable layer
(a residual branch that can be skipped) has a gate ξ_l shared by the groups inside it, and a unit
is active only if its layer is. The forward pass scales each unit's consumer columns by a fresh
sample (straight-through: the value is the sample, the gradient flows to θ). The regulariser is
the exact expected cost from the graph's polynomial (see ``expected_cost``):

    R = γ · [β · R(θ_layers) + (1 − β) · R(θ_units)],  R = α·E[FLOPs]/FLOPs₀ + (1−α)·E[params]/P₀

where each part takes the gradient only with respect to its own gates; normalising by the dense
costs makes every gate's weight its share of the expected cost (the paper's per-layer weights).
θ takes projected gradient steps, onto the box or, when a hard budget is stated instead of γ,
onto the budget linearised at the current θ (the ``Projection`` problem; bisection, or CVXPY
with the layer → unit hierarchy), re-linearised a few times per step.

Ours, where the paper's body was not available:

- The step direction is the momentum of ∂L/∂θ over one global running RMS (``steps``), so
  ``lr`` is a step in probability units (∂loss/∂θ is ~1e-4 on the zoo CNNs) while the relative
  sizes of the gradients, which are the units' importances, are kept.
- In hard-budget mode the budget ramps linearly from the dense cost to the target over the
  ``schedule`` (as PDP's density does), so the network adapts while gates separate.
- E[loss] + γ·E[cost] is already multilinear in θ (expectations over independent Bernoullis), so
  its minima over the box are 0/1 vertices: that is what the flattening hyperprior secures in the
  paper. A concave term κ·Σθ(1−θ) (``flatten``, growing with the schedule's progress, applied
  in the step's normalised units) adds a pull to the nearest vertex so that a short training run
  ends with decided gates.
- A gate that reaches 0 is fixed there for good: never sampled again, left out of projections.
  A layer gate at 0 kills every unit of its groups.
- Dead units are sliced out of ``self.model`` while it trains (``compact``), so training gets
  cheaper as gates die. The slicing is ``apply``'s own (``secateurs.apply.narrow``), done in
  place on the same ``nn.Parameter`` objects, so the user's optimiser keeps working unchanged:
  a global ``torch.optim`` step pre-hook cuts every per-parameter state tensor of a compacted
  parameter (Adam's moments, SGD's momentum) the same way before that optimiser's next step, and
  a gradient still held is cut at once. We chose this over an explicit ``compact(optimizer)``
  call because the issue asks that training loops need no change. A dead layer's groups are
  emptied (``apply``'s zero-width layers), its residual branch then computing only its constant
  bias path. θ stays indexed by the original units (so plans, projections and ``dead`` keep their
  meaning); the gates read by the model and the expected cost are taken on the surviving units,
  emptied groups counting 0. ``close``/``finalize`` widen the model back to its original shapes
  (zeros in the cut slices, which every plan removes), so ``apply(self.model, plan)`` still works.
- ``finalize`` in hard-budget mode keeps the units of largest probability that fit the budget
  *exactly* (an Allocation over per-group keep counts with the graph's exact polynomials).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from secateurs.apply import cut_tensor, narrow, runs_at_zero_width, widen
from secateurs.cost import CostModel
from secateurs.errors import InvalidPlanError, ValidationError, require_numbers
from secateurs.graph.groups import Group, check_channel_multiple, unit_multiple
from secateurs.hardware import model_device
from secateurs.plan import PrunePlan
from secateurs.problems.projection import Projection
from secateurs.solvers import solve
from secateurs.training.expected_cost import expected_cost
from secateurs.training.gating import UnitScales
from secateurs.training.layers import residual_branches
from secateurs.training.pdp import DensitySchedule
from secateurs.training.plans import allocate_units, check_budget, check_reachable, plan_from_keep
from secateurs.training.steps import ScaledStep

if TYPE_CHECKING:
    from secateurs.graph.build import DependencyGraph

_DEAD = 1e-6


def _mixes_channels(model: nn.Module, path: str) -> bool:
    """Whether the module normalises across channels, so a gated unit still affects the others."""
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return False
    if isinstance(mod, nn.GroupNorm):
        return mod.num_groups != mod.num_channels
    rms = getattr(nn, "RMSNorm", None)
    return isinstance(mod, nn.LayerNorm) or (rms is not None and isinstance(mod, rms))


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
        not used), and ``finalize`` meets it exactly.
    layers : mapping layer name → group names inside that removable block, optional
        (``from_graph`` finds the residual branches when none are named). A layer whose gate
        dies, or is at most ½ at ``finalize``, is removed: the plan keeps none of its units, so
        every module its groups reach must run at zero width (checked), and so must the
        parameter-free ops between them (not checkable here: ``from_graph`` checks them on the
        graph; a max pool inside a branch you name yourself fails at the first forward after the
        layer died).
    lr : float
        Step size of the projected (globally normalised) gradient step on θ, in probability units.
    flatten : float
        Weight κ of the pull to 0/1 relative to the normalised task gradient (times the
        schedule's progress).
    init : float
        Initial probability of every gate.
    schedule : DensitySchedule, optional
        Hard-budget mode: how the budget ramps from the dense cost to the target (default: at once).
    compact : int
        Every this many steps, slice units whose gates died out of ``.model`` (0: never; dead
        units then stay in the model, gated at 0).
    channel_multiple : int or "auto"
        The final plan keeps a multiple of this many channels per group (heads count their
        width), or all the units still in it: the vector width kernels run in (see
        ``secateurs.prune``); ``"auto"`` reads it off the model's device.
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
        lr: float = 0.02,
        flatten: float = 0.0,
        init: float = 0.9,
        schedule: DensitySchedule | None = None,
        compact: int = 1,
        channel_multiple: int | Literal["auto"] = 1,
        inplace: bool = False,
    ) -> None:
        require_numbers(strength=strength, flops_priority=flops_priority, layer_balance=layer_balance, lr=lr,
                        flatten=flatten, init=init)
        for name, value in (("flops_priority", flops_priority), ("layer_balance", layer_balance), ("init", init)):
            if not 0.0 <= value <= 1.0:
                raise ValidationError(name, f"must be in [0, 1], got {value!r}")
        for name, value in (("strength", strength), ("flatten", flatten)):
            if not value >= 0:
                raise ValidationError(name, f"must be non-negative, got {value!r}")
        if not lr > 0:
            raise ValidationError("lr", f"must be positive, got {lr!r}")
        if isinstance(compact, bool) or not isinstance(compact, int) or compact < 0:
            raise ValidationError("compact", f"must be a non-negative number of steps, got {compact!r}")
        if not isinstance(cost_model, CostModel):
            raise ValidationError("cost_model", f"expected the graph's CostModel (graph.cost_model), got "
                                                f"{type(cost_model).__name__}")
        self.groups = {g.name: g for g in groups}
        if not self.groups:
            raise ValidationError("groups", "no groups to gate")
        for g in self.groups.values():
            if not g.prunable:
                raise ValidationError("groups", f"group {g.name!r} is frozen ({g.reason}); it cannot be gated")
            if g.name not in cost_model.sizes:
                raise ValidationError("groups", f"group {g.name!r} is not in the cost model")
        self.cost_model = cost_model
        multiple = check_channel_multiple(channel_multiple, model_device(model))
        self.multiples = {g: unit_multiple(grp, multiple) for g, grp in self.groups.items()}
        self.strength, self.alpha, self.beta = float(strength), float(flops_priority), float(layer_balance)
        self.lr, self.flatten = float(lr), float(flatten)
        self.schedule = schedule or DensitySchedule(warmup=0, ramp=0)
        self.relinearise = 3
        self.budget = check_budget(budget)
        self.layer_of: dict[str, str] = {}
        for layer, members in (layers or {}).items():
            for g in members:
                if g not in self.groups:
                    raise ValidationError("layers", f"layer {layer!r} names group {g!r}, which is not gated")
                if g in self.layer_of:
                    raise ValidationError("layers", f"group {g!r} is in two layers ({self.layer_of[g]!r}, {layer!r})")
                self.layer_of[g] = layer
        for g, layer in self.layer_of.items():  # a dead layer empties its groups: apply must be able to
            for m in self.groups[g].members:
                try:
                    mod = model.get_submodule(m.module)
                except AttributeError:
                    continue  # UnitScales names a missing module
                if not runs_at_zero_width(mod):
                    raise ValidationError("layers", f"layer {layer!r}: group {g!r} reaches {type(mod).__name__} "
                                                    f"{m.module!r}, which cannot run at zero width")
        check_reachable(self.groups, self.cost_model, self.budget, multiples=self.multiples,
                        removable=list(self.layer_of))
        self.model = model if inplace else copy.deepcopy(model)
        self.theta = {g: torch.full((grp.size,), init, dtype=torch.float64, requires_grad=True)
                      for g, grp in self.groups.items()}
        self.layer_theta = {name: torch.tensor(init, dtype=torch.float64, requires_grad=True)
                            for name in dict.fromkeys(self.layer_of.values())}
        self.dead = {g: torch.zeros(grp.size, dtype=torch.bool) for g, grp in self.groups.items()}
        self.layer_dead = dict.fromkeys(self.layer_theta, False)
        self.fixed_counts = {g: size for g, size in cost_model.sizes.items() if g not in self.groups}
        dense = cost_model()
        self.dense = {"flops": float(dense.flops), "params": float(dense.params)}
        self._optimizer = ScaledStep([*self.theta.values(), *self.layer_theta.values()], lr=self.lr)
        # what the model holds now: original indices of the units still in it, and the groups
        # renumbered for its (narrower) tensors; emptied groups leave `current`
        self.compact_every = compact
        self.present = {g: torch.arange(grp.size) for g, grp in self.groups.items()}
        self.current: dict[str, Group] = dict(self.groups)
        self._origin: dict[int, tuple[torch.Tensor, tuple[int, ...], dict[int, list[int]]]] = {}
        self._state_cuts: dict[int, tuple[torch.Tensor, list[tuple[tuple[int, ...], dict[int, list[int]]]]]] = {}
        self._optimizer_hook: RemovableHandle | None = None
        self._modules: dict[str, tuple[type, dict[str, Any]]] = {}  # classes, size attributes before narrowing
        self._stuck: dict[str, int] = {}  # group -> dead count at which the model could not lose them
        self._mixed = {g for g, grp in self.groups.items() if any(_mixes_channels(self.model, m.module) for m in grp.members)}
        self.scales = UnitScales(self.model, self.groups.values())
        self._hook = self.model.register_forward_pre_hook(self._sample)
        self.steps = 0
        self._closed = False

    @classmethod
    def from_graph(cls, model: nn.Module, graph: DependencyGraph, *,
                   layers: Mapping[str, Iterable[str]] | None = None, **options: Any) -> ComplexityAware:
        """Gate every prunable group of ``graph``; with no ``layers`` named, its residual branches
        (``secateurs.training.layers.residual_branches``) become the layer gates."""
        found = residual_branches(graph) if layers is None else layers
        return cls(model, graph.prunable_groups(), graph.cost_model, layers=found, **options)

    # -- forward ---------------------------------------------------------------------------

    def probabilities(self, group: str) -> torch.Tensor:
        """P(unit active) = θ_unit · θ_layer (differentiable)."""
        p = self.theta[group]
        if group in self.layer_of:
            p = p * self.layer_theta[self.layer_of[group]]
        return p

    def _sample(self, module: nn.Module, args: Any) -> None:
        """Draw gates for this forward (training) or use the rounded gates (eval), for the units
        the model still holds. Every original unit is drawn, sliced out or not, so a compacted run
        consumes the random stream as an uncompacted one does and draws the same gates."""
        values = {}
        for g in self.theta:
            p32 = self.probabilities(g).to(torch.float32)
            sample = torch.bernoulli(p32.detach()) if module.training else (p32.detach() > 0.5).to(torch.float32)
            if g in self.current:
                index = self.present[g]
                values[g] = sample[index] + p32[index] - p32[index].detach()  # straight-through: ξ, ∂/∂θ
        self.scales.set(values)

    # -- regulariser -----------------------------------------------------------------------

    def expected(self, what: str, *, units: bool = True, layers: bool = True) -> torch.Tensor:
        """E[FLOPs] or E[params] at the current probabilities (gradients to the chosen gates),
        over the units the model still holds; an emptied group counts 0."""
        polynomial = getattr(self.cost_model, what)
        unit = {g: (t if units else t.detach())[self.present[g]] for g, t in self.theta.items() if g in self.current}
        fixed = {**self.fixed_counts, **{g: 0 for g in self.theta if g not in self.current}}
        layer = {n: t if layers else t.detach() for n, t in self.layer_theta.items()}
        return expected_cost(polynomial, unit, fixed=fixed, layer_of=self.layer_of, layer_probs=layer)

    def _relative(self, *, units: bool, layers: bool) -> torch.Tensor:
        flops = self.expected("flops", units=units, layers=layers) / max(self.dense["flops"], 1.0)
        params = self.expected("params", units=units, layers=layers) / max(self.dense["params"], 1.0)
        return self.alpha * flops + (1 - self.alpha) * params

    def penalty(self) -> torch.Tensor:
        """The complexity regulariser (zero in hard-budget mode); add it to the task loss."""
        total = torch.zeros((), dtype=torch.float64)
        if self.strength and not self.budget:
            unit_term = self._relative(units=True, layers=False)
            layer_term = self._relative(units=False, layers=True) if self.layer_theta else torch.zeros(())
            weight = self.beta if self.layer_theta else 0.0
            total = total + self.strength * (weight * layer_term + (1 - weight) * unit_term)
        return total.to(torch.float32)

    # -- step ------------------------------------------------------------------------------

    def budget_now(self) -> dict[str, float]:
        """The hard budget at the current step of the schedule (fractions of the dense cost)."""
        progress = self.schedule.progress(self.steps)
        return {what: 1.0 - progress * (1.0 - fraction) for what, fraction in self.budget.items()}

    def step(self) -> None:
        """Projected gradient step on θ (call after the optimiser step, before zero_grad)."""
        if self._closed:
            raise ValidationError("step", "this ComplexityAware was finalized or closed; wrap the model again")
        live = [~self.dead[g] for g in self.theta] + [torch.tensor(not d) for d in self.layer_dead.values()]
        self._optimizer.step(flatten=self.flatten * self.schedule.progress(self.steps), live=live)
        with torch.no_grad():
            for g, theta in self.theta.items():
                theta.clamp_(0.0, 1.0)
                theta[self.dead[g]] = 0.0
            for name, theta in self.layer_theta.items():
                theta.clamp_(0.0, 0.0 if self.layer_dead[name] else 1.0)
        if self.budget:
            for _ in range(self.relinearise):  # each pass re-linearises at the projected point
                self._project_onto_budget()
        with torch.no_grad():
            for name, theta in self.layer_theta.items():
                if float(theta) <= _DEAD:  # a layer at 0 is removed for good, with all its units
                    self.layer_dead[name] = True
                    theta.zero_()
            for g, theta in self.theta.items():
                self.dead[g] |= theta <= _DEAD  # a gate at 0 is removed for good
                if g in self.layer_of and self.layer_dead[self.layer_of[g]]:
                    self.dead[g][:] = True
                theta[self.dead[g]] = 0.0
        self._optimizer.zero_grad()
        self.steps += 1
        if self.compact_every and self.steps % self.compact_every == 0:
            self.compact()

    # -- compaction ------------------------------------------------------------------------

    def _removed_layer(self, group: str, threshold: float = _DEAD) -> bool:
        layer = self.layer_of.get(group)
        return layer is not None and (self.layer_dead[layer] or float(self.layer_theta[layer].detach()) <= threshold)

    def compact(self) -> bool:
        """Slice the units whose gates died out of ``self.model``; returns whether anything was cut.

        Called by ``step`` every ``compact`` steps. Parameters stay the same objects (new
        ``.data``; gradients cut at once, optimiser state before its next step). A group whose
        units all died keeps the one ``keep`` would fall back to, unless its layer died: then it
        is emptied. A group normalised across its channels (LayerNorm, GroupNorm) is only emptied,
        never narrowed: its dead units still weigh in the norm's statistics, so slicing some out
        would change the forward. A group whose narrowing ``narrow`` refuses stays gated as it is
        and is tried again once more of its units have died.
        """
        if self._closed:
            raise ValidationError("compact", "this ComplexityAware was finalized or closed")
        keep: dict[str, list[int]] = {}
        emptied: list[str] = []
        for g in self.current:
            present = self.present[g]
            if self._stuck.get(g) == int(self.dead[g].sum()):
                continue
            if self._removed_layer(g):
                keep[g] = []
                emptied.append(g)
                continue
            if g in self._mixed:
                continue
            alive = torch.nonzero(~self.dead[g][present]).reshape(-1)
            if alive.numel() == 0:
                alive = torch.zeros(1, dtype=torch.long)
            if alive.numel() < present.numel():
                keep[g] = alive.tolist()
        if not keep:
            return False
        try:
            self._narrow(keep, emptied)
        except InvalidPlanError:  # one group holds the others back: narrow those that can go alone
            cut = False
            for g, units in keep.items():
                try:
                    self._narrow({g: units}, [g] if g in emptied else [])
                    cut = True
                except InvalidPlanError:
                    self._stuck[g] = int(self.dead[g].sum())
            return cut
        return True

    def _narrow(self, keep: Mapping[str, list[int]], emptied: list[str]) -> None:
        """Narrow the model to ``keep`` (positions among the units it holds; other groups whole)."""
        full = {g: keep.get(g, list(range(self.present[g].numel()))) for g in self.current}
        plan = PrunePlan(full, groups=self.current, allow_empty=emptied)
        self.scales.remove()
        try:
            narrowing = narrow(self.model, plan)
        except Exception:  # an invalid plan leaves the model untouched: gate it as before
            self.scales = UnitScales(self.model, self.current.values())
            raise
        for g, units in full.items():
            self.present[g] = self.present[g][torch.tensor(units, dtype=torch.long)]
        self.current = narrowing.groups
        for path, (cls, attributes) in narrowing.modules.items():  # the earliest value of each: the original
            _, first = self._modules.setdefault(path, (cls, {}))
            for k, v in attributes.items():
                first.setdefault(k, v)
        self.scales = UnitScales(self.model, self.current.values())
        for tensor, shape, kept in narrowing.cuts:
            origin = self._origin.get(id(tensor))
            if origin is None or origin[0] is not tensor:
                self._origin[id(tensor)] = (tensor, shape, {d: list(k) for d, k in kept.items()})
            else:
                for d, k in kept.items():
                    origin[2][d] = [origin[2][d][i] for i in k] if d in origin[2] else list(k)
            entry = self._state_cuts.setdefault(id(tensor), (tensor, []))
            entry[1].append((shape, kept))
        if self._optimizer_hook is None:  # a weak reference: an abandoned wrapper does not stay alive
            method = weakref.WeakMethod(self._before_optimizer_step)

            def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
                bound = method()
                if bound is not None:
                    bound(optimizer, args, kwargs)

            self._optimizer_hook = register_optimizer_step_pre_hook(hook)

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.sync_optimizer(optimizer)

    def sync_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Cut ``optimizer``'s per-parameter state tensors as their parameters were cut.

        Runs by itself before every ``torch.optim`` optimiser step; call it yourself only before
        reading or saving the state of an optimiser that has not stepped since a compaction.
        A state tensor is cut when it still has a parameter's former shape (Adam's moments,
        SGD's momentum, Adagrad's sums); other entries (step counts) are left alone.
        """
        for group in optimizer.param_groups:
            for param in group["params"]:
                entry = self._state_cuts.get(id(param))
                if entry is None or entry[0] is not param or not optimizer.state.get(param):
                    continue
                state = optimizer.state[param]
                for key, value in list(state.items()):
                    if not isinstance(value, torch.Tensor) or value.shape == param.shape:
                        continue
                    for shape, kept in entry[1]:
                        if tuple(value.shape) == tuple(shape):
                            value = cut_tensor(value, kept)
                    state[key] = value

    def _flat(self) -> tuple[list[tuple[str, str]], torch.Tensor]:
        keys = [("unit", g) for g in self.theta] + [("layer", n) for n in self.layer_theta]
        flat = torch.cat([self.theta[k].detach().reshape(-1) if kind == "unit" else self.layer_theta[k].detach().reshape(1)
                          for kind, k in keys])
        return keys, flat

    def _project_onto_budget(self) -> None:
        """Project θ onto each budget linearised at θ (exact for the linearisation)."""
        keys, flat = self._flat()
        rows, rhs = [], []
        target = self.budget_now()
        for what, fraction in target.items():
            params = [self.theta[k] if kind == "unit" else self.layer_theta[k] for kind, k in keys]
            value = self.expected(what)
            grads = torch.autograd.grad(value, params, allow_unused=True)
            c = torch.cat([(gr if gr is not None else torch.zeros_like(p)).reshape(-1)
                           for gr, p in zip(grads, params, strict=True)])
            rows.append(c.numpy())
            rhs.append(fraction * self.dense[what] - float(value.detach()) + float(c @ flat))
        offsets, position = {}, 0
        for kind, k in keys:
            offsets[(kind, k)] = position
            position += self.theta[k].numel() if kind == "unit" else 1
        parent = None
        if self.layer_theta:
            parent = -np.ones(position, dtype=np.int64)
            for g, layer in self.layer_of.items():
                start = offsets[("unit", g)]
                parent[start:start + self.theta[g].numel()] = offsets[("layer", layer)]
        fixed = {offsets[("layer", name)]: 0.0 for name, dead in self.layer_dead.items() if dead}
        for g in self.theta:
            for i in torch.nonzero(self.dead[g]).reshape(-1).tolist():
                fixed[offsets[("unit", g)] + i] = 0.0
        costs = np.maximum(np.array(rows), 0.0)  # E[cost] has non-negative coefficients; drop round-off
        rhs_array = np.array(rhs)
        if np.all(costs @ flat.numpy() <= rhs_array + 1e-9 * np.maximum(1.0, np.abs(rhs_array))):
            return  # already within the (linearised) budget: the projection is the identity
        problem = Projection(flat.numpy(), costs=costs, budgets=rhs_array, parent=parent, fixed=fixed)
        simple = parent is None and len(rows) == 1
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

    # -- results ---------------------------------------------------------------------------

    def undecided(self, tol: float = 0.01) -> float:
        """Fraction of unit gates not yet within ``tol`` of 0 or 1 (0 once training has converged;
        units sliced out are decided)."""
        p = torch.cat([self.probabilities(g).detach() for g in self.theta])
        return float(((p > tol) & (p < 1 - tol)).double().mean())

    def keep(self) -> dict[str, list[int]]:
        """Units whose gate (times its layer's) is above ½, in the original indices; at least one
        per group (the most probable unit still in the model), unless the group's layer gate is at
        most ½: the layer is then removed and the group keeps none. With a channel multiple, the
        count goes to the nearest multiple that the units still in the model allow (all of them
        when fewer are left, or when none was sliced out), the most probable units first."""
        out = {}
        for g in self.theta:
            if self._removed_layer(g, 0.5):
                out[g] = []
                continue
            present = self.present[g]
            p = self.probabilities(g).detach()[present]
            count, m, left = int((p > 0.5).sum()), self.multiples[g], p.numel()
            ceiling = left if left == self.groups[g].size or left < m else m * (left // m)
            count = min(max(m * round(count / m), m, 1), ceiling)
            chosen = torch.topk(p, count).indices
            out[g] = sorted(present[chosen].tolist())
        return out

    def _live(self, group: str) -> torch.Tensor:
        """Original indices of the units of ``group`` still in the model and not dead; when none
        is left, the one unit compaction keeps (the first still in the model)."""
        present = self.present[group]
        live = present[~self.dead[group][present]]
        return live if live.numel() else present[:1]

    def finalize(self) -> PrunePlan:
        """The plan of kept units, within the hard budget exactly when one was given; gates removed.

        Penalty mode keeps the units whose probability is above ½. Hard-budget mode keeps, among
        all choices that meet the budget under the graph's exact polynomials, the one retaining
        the most probability mass (``allocate_units``) among the units not dead (a gate at 0 never
        comes back, whether or not it was sliced out). ``secateurs.apply(self.model, plan)``
        then gives the physically smaller model.
        """
        if self.steps == 0:
            raise ValidationError("finalize", "ComplexityAware was never stepped: call step() after each optimiser step")
        if self._closed:
            raise ValidationError("finalize", "ComplexityAware was already finalized or closed")
        if self.budget:  # removed layers count 0; the others' live units compete (a dead one never returns)
            removed = {g: 0 for g in self.theta if self._removed_layer(g, 0.5)}
            candidates = {g: self._live(g) for g in self.theta if g not in removed}
            scores = {g: self.probabilities(g).detach()[units] for g, units in candidates.items()}
            chosen = allocate_units(scores, cost_model=self.cost_model, budget=self.budget, fixed=removed,
                                    multiples=self.multiples)
            keep = {g: [] if g in removed else sorted(candidates[g][chosen[g]].tolist()) for g in self.theta}
        else:
            keep = self.keep()
        self.close()
        return plan_from_keep(self.groups, keep, {"method": "complexity_aware", "budget": self.budget, "steps": self.steps})

    def close(self) -> None:
        """Remove the gates' hook and parametrisations from the model (the weights stay trained)
        and widen it back to its original shapes (zeros where units were sliced out)."""
        if not self._closed:
            self._hook.remove()
            self.scales.remove()
            if self._origin:
                widen(self.model, list(self._origin.values()), self._modules)
            if self._optimizer_hook is not None:
                self._optimizer_hook.remove()
            self._closed = True
