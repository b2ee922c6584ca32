"""PDP on channels: the same parameter-free soft mask, on units of the graph's groups.

A unit's score is the squared L2 norm of everything its producers write for it (conv filters,
linear rows, head blocks); each forward places the threshold between the K-th and (K+1)-th score
of its group (K = the scheduled keep count) and scales the unit's consumer columns by
m = σ((s − t²)/(τ·t²)). The gradient reaches the producer weights through the scores, so
training itself decides which units survive.

How many units each group keeps (ours; norms of different layers are not comparable, unlike
single weights):

- ``density=ρ``: every group keeps exactly round(ρ·size);
- ``budget={"flops": f}`` (or params): when warm-up ends, an ``Allocation`` over per-group keep
  counts under the graph's exact polynomials, each group's error being the share of its score
  mass that the dropped units carry (``allocate_units``), so the plan meets the budget exactly.

τ decays geometrically from ``tau`` to ``tau_final`` along the ramp and, once the ramp is over,
the mask is the hard top-K (ours: a few epochs are too short for the weights to polarise on their
own, and with a BatchNorm after the producer a unit's norm is a free scale the network uses to
park kept units on the sigmoid's slope). ``finalize`` before the ramp ends folds each kept
unit's soft mask value into its consumer columns, so the pruned model computes what the soft one
did less the dropped units.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateurs.apply import member_tensor
from secateurs.cost import CostModel
from secateurs.errors import InvalidPlanError, ValidationError, require_numbers
from secateurs.graph.groups import Group, check_channel_multiple, unit_multiple
from secateurs.hardware import model_device
from secateurs.plan import PrunePlan
from secateurs.training.gating import UnitScales, fold_scales
from secateurs.training.pdp import DensitySchedule, annealed, keep_threshold
from secateurs.training.plans import allocate_units, check_budget, plan_from_keep


def _raw(module: nn.Module, param: str) -> torch.Tensor:
    """The trained tensor itself: a producer that also reads a gated group is parametrised, and
    its scaled view would tie this step's scores to the previous step's masks (and their graph)."""
    if parametrize.is_parametrized(module, param):
        return getattr(module.parametrizations, param).original
    return getattr(module, param)


class ChannelPDP:
    """PDP soft masks on whole units (channels, neurons, heads) of ``groups``.

    Parameters
    ----------
    model : nn.Module
    groups : iterable of Group
        Prunable groups (``graph.prunable_groups()``), each with producer members.
    density : float, optional
        Fraction of each group's units kept at the end (give this or ``budget``).
    cost_model : CostModel, optional
        ``graph.cost_model``; needed with ``budget``.
    budget : {"flops" | "params": fraction of the dense cost}, optional
        Keep counts per group chosen to meet it exactly (see the module docstring).
    tau, tau_final : float
        Temperature relative to t² at the start and the end of the ramp (``tau_final=None``
        keeps ``tau`` throughout, as in the paper); after the ramp the mask is hard.
    schedule : DensitySchedule
    channel_multiple : int or "auto"
        The final plan keeps a multiple of this many channels per group (heads count their
        width), or all the units still in it: the vector width kernels run in (see
        ``secateurs.prune``); ``"auto"`` reads it off the model's device.
    inplace : bool
        Mask ``model`` itself; by default a deep copy, exposed as ``.model``.
    """

    def __init__(self, model: nn.Module, groups: Iterable[Group], density: float | None = None, *,
                 cost_model: CostModel | None = None, budget: Mapping[str, float] | None = None,
                 tau: float = 0.05, tau_final: float | None = 0.002, schedule: DensitySchedule | None = None,
                 channel_multiple: int | Literal["auto"] = 1, inplace: bool = False) -> None:
        require_numbers(density=density, tau=tau, tau_final=tau_final)
        self.budget = check_budget(budget)
        if (density is None) == (not self.budget):
            raise ValidationError("density", "give exactly one of density= or budget=")
        if density is not None and not 0.0 < density <= 1.0:
            raise ValidationError("density", f"must be in (0, 1], got {density!r}")
        if self.budget and cost_model is None:
            raise ValidationError("cost_model", "a flops/params budget needs the graph's cost model")
        for name, value in (("tau", tau), ("tau_final", tau if tau_final is None else tau_final)):
            if not value > 0:
                raise ValidationError(name, f"must be positive, got {value!r}")
        self.groups = {g.name: g for g in groups}
        if not self.groups:
            raise ValidationError("groups", "no groups to mask")
        self._producers: dict[str, list[tuple[str, str, int, torch.Tensor]]] = {}
        for g in self.groups.values():
            if not g.prunable:
                raise ValidationError("groups", f"group {g.name!r} is frozen ({g.reason})")
            if not g.producers():
                raise ValidationError("groups", f"group {g.name!r} has no producer weights to score its units")
            for m in g.producers():  # groups of another model would index past (or short of) these tensors
                try:
                    member_tensor(model, g, m, made_for="groups")
                except InvalidPlanError as e:
                    raise ValidationError("groups", str(e)) from None
            self._producers[g.name] = [
                (m.module, m.param, m.dim, torch.tensor([m.indices([u]) for u in range(g.size)], dtype=torch.long))
                for m in g.producers()
            ]
        multiple = check_channel_multiple(channel_multiple, model_device(model))
        self.multiples = {g: unit_multiple(grp, multiple) for g, grp in self.groups.items()}
        self.model = model if inplace else copy.deepcopy(model)
        self.density = None if density is None else float(density)
        self.cost_model = cost_model
        self.tau, self.tau_final = float(tau), None if tau_final is None else float(tau_final)
        self.schedule = schedule or DensitySchedule()
        self.steps = 0
        self.keep_counts: dict[str, int] = {}
        if self.density is not None:
            self.keep_counts = {g: min(max(m * round(self.density * grp.size / m), m, 1), grp.size)
                                for (g, grp), m in zip(self.groups.items(), self.multiples.values(), strict=True)}
        elif self.schedule.warmup == 0:
            self._allocate()
        self.scales = UnitScales(self.model, self.groups.values())
        self._hook = self.model.register_forward_pre_hook(self._refresh)
        self._closed = False

    def _allocate(self) -> None:
        """Keep counts within the budget: drop the least share of each group's score mass."""
        with torch.no_grad():
            shares = {}
            for g in self.groups:
                s = self.scores(g).detach().double()
                shares[g] = s / s.sum() if float(s.sum()) > 0 else torch.full_like(s, 1.0 / s.numel())
        keep = allocate_units(shares, cost_model=self.cost_model, budget=self.budget, multiples=self.multiples)
        self.keep_counts = {g: len(units) for g, units in keep.items()}

    def scores(self, name: str) -> torch.Tensor:
        """Squared L2 norm of each unit's producer slices (differentiable in the weights)."""
        total = None
        for module, param, dim, index in self._producers[name]:
            weight = _raw(self.model.get_submodule(module), param)
            moved = weight.movedim(dim, 0)
            per_unit = moved[index.reshape(-1).to(weight.device)].reshape(index.shape[0], -1).pow(2).sum(1)
            total = per_unit if total is None else total + per_unit
        assert total is not None
        return total

    def current_tau(self) -> float:
        """τ at this step: geometric from ``tau`` to ``tau_final`` along the schedule."""
        return annealed(self.tau, self.tau_final, self.schedule.progress(self.steps))

    def current_keep(self, name: str) -> int:
        size = self.groups[name].size
        if not self.keep_counts:  # still in warm-up with a budget: nothing allocated yet
            return size
        progress = self.schedule.progress(self.steps)
        return max(1, round(size - progress * (size - self.keep_counts[name])))

    def mask(self, name: str, keep: int | None = None) -> torch.Tensor:
        """Mask of group ``name``'s units: soft during the ramp, the hard top-K once it is over.

        ``keep`` overrides the scheduled keep count (``finalize`` asks for the final one).
        """
        scores = self.scores(name)
        keep = self.current_keep(name) if keep is None else keep
        if keep >= scores.numel():
            return torch.ones_like(scores)
        if self.keep_counts and self.schedule.progress(self.steps) >= 1.0:
            hard = torch.zeros_like(scores)
            return hard.index_fill_(0, torch.topk(scores.detach(), keep).indices, 1.0)
        t2 = keep_threshold(scores.detach(), keep)
        return torch.sigmoid((scores - t2) / (self.current_tau() * torch.clamp(t2, min=torch.finfo(scores.dtype).tiny)))

    def _refresh(self, module: nn.Module, args: Any) -> None:
        self.scales.set({g: self.mask(g) for g in self.groups})

    def penalty(self) -> torch.Tensor:
        """No regulariser (zero, for a uniform API)."""
        return torch.zeros(())

    def step(self) -> None:
        """Advance the schedule by one optimiser step; allocate keep counts when warm-up ends."""
        if self._closed:
            raise ValidationError("step", "this ChannelPDP was finalized; wrap the model again")
        self.steps += 1
        if not self.keep_counts and self.steps >= self.schedule.warmup:
            self._allocate()

    def finalize(self) -> PrunePlan:
        """Exactly the allocated number of units per group, the highest scores; masks removed.

        Each kept unit's soft mask value is folded into its consumer columns of ``self.model``
        (``apply(self.model, plan)`` is then the soft model less the dropped units).
        """
        if self.steps == 0:
            raise ValidationError("finalize", "ChannelPDP was never stepped: call step() after each optimiser step")
        if self._closed:
            raise ValidationError("finalize", "ChannelPDP was already finalized")
        if not self.keep_counts:
            self._allocate()
        with torch.no_grad():
            keep = {g: sorted(torch.topk(self.scores(g), k).indices.tolist()) for g, k in self.keep_counts.items()}
            fold = {g: self.mask(g, self.keep_counts[g]).detach() for g in self.groups}  # all 1 after the ramp
        self._hook.remove()
        self.scales.remove()
        self._closed = True
        fold_scales(self.model, self.groups, keep, fold)
        meta = {"method": "pdp_channels", "density": self.density, "budget": self.budget, "keep_counts": self.keep_counts}
        return plan_from_keep(self.groups, keep, meta)

