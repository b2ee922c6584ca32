"""PDP on channels: the same parameter-free soft mask, on units of the graph's groups.

A unit's score is the squared L2 norm of everything its producers write for it (conv filters,
linear rows, head blocks); each forward places the threshold between the K-th and (K+1)-th score
of its group (K = the scheduled keep count) and scales the unit's consumer columns by
m = σ((s − t²)/(τ·t²)). The gradient reaches the producer weights through the scores, so
training itself decides which units survive. Densities are uniform per group (norms of different
layers are not comparable, unlike single weights), so each group keeps exactly round(ρ·size).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from secateurs.errors import ValidationError
from secateurs.graph.groups import Group
from secateurs.plan import PrunePlan
from secateurs.training.gating import UnitScales
from secateurs.training.pdp import DensitySchedule, keep_threshold
from secateurs.training.plans import plan_from_keep


class ChannelPDP:
    """PDP soft masks on whole units (channels, neurons, heads) of ``groups``.

    Parameters
    ----------
    model : nn.Module
    groups : iterable of Group
        Prunable groups (``graph.prunable_groups()``), each with producer members.
    density : float
        Fraction of each group's units kept at the end.
    tau : float
        Temperature relative to t².
    schedule : DensitySchedule
    inplace : bool
        Mask ``model`` itself; by default a deep copy, exposed as ``.model``.
    """

    def __init__(self, model: nn.Module, groups: Iterable[Group], density: float, *, tau: float = 0.05,
                 schedule: DensitySchedule | None = None, inplace: bool = False) -> None:
        if not 0.0 < density <= 1.0:
            raise ValidationError("density", f"must be in (0, 1], got {density!r}")
        if not tau > 0:
            raise ValidationError("tau", f"must be positive, got {tau!r}")
        self.model = model if inplace else copy.deepcopy(model)
        self.groups = {g.name: g for g in groups}
        self._producers: dict[str, list[tuple[str, str, int, torch.Tensor]]] = {}
        for g in self.groups.values():
            if not g.prunable:
                raise ValidationError("groups", f"group {g.name!r} is frozen ({g.reason})")
            if not g.producers():
                raise ValidationError("groups", f"group {g.name!r} has no producer weights to score its units")
            self._producers[g.name] = [
                (m.module, m.param, m.dim, torch.tensor([m.indices([u]) for u in range(g.size)], dtype=torch.long))
                for m in g.producers()
            ]
        self.density, self.tau = float(density), float(tau)
        self.schedule = schedule or DensitySchedule()
        self.steps = 0
        self.keep_counts = {g: max(1, round(self.density * grp.size)) for g, grp in self.groups.items()}
        self.scales = UnitScales(self.model, self.groups.values())
        self._hook = self.model.register_forward_pre_hook(self._refresh)

    def scores(self, name: str) -> torch.Tensor:
        """Squared L2 norm of each unit's producer slices (differentiable in the weights)."""
        total = None
        for module, param, dim, index in self._producers[name]:
            weight = getattr(self.model.get_submodule(module), param)
            moved = weight.movedim(dim, 0)
            per_unit = moved[index.reshape(-1).to(weight.device)].reshape(index.shape[0], -1).pow(2).sum(1)
            total = per_unit if total is None else total + per_unit
        assert total is not None
        return total

    def current_keep(self, name: str) -> int:
        size = self.groups[name].size
        progress = self.schedule.progress(self.steps)
        return max(1, round(size - progress * (size - self.keep_counts[name])))

    def mask(self, name: str) -> torch.Tensor:
        """Soft mask of group ``name``'s units at the current step."""
        scores = self.scores(name)
        keep = self.current_keep(name)
        if keep >= scores.numel():
            return torch.ones_like(scores)
        t2 = keep_threshold(scores.detach(), keep)
        return torch.sigmoid((scores - t2) / (self.tau * torch.clamp(t2, min=torch.finfo(scores.dtype).tiny)))

    def _refresh(self, module: nn.Module, args: Any) -> None:
        self.scales.set({g: self.mask(g) for g in self.groups})

    def penalty(self) -> torch.Tensor:
        """No regulariser (zero, for a uniform API)."""
        return torch.zeros(())

    def step(self) -> None:
        self.steps += 1

    def finalize(self) -> PrunePlan:
        """Exactly round(ρ·size) units per group, the highest scores; masks removed."""
        if self.steps == 0:
            raise ValidationError("finalize", "ChannelPDP was never stepped: call step() after each optimiser step")
        with torch.no_grad():
            keep = {g: sorted(torch.topk(self.scores(g), k).indices.tolist()) for g, k in self.keep_counts.items()}
        self._hook.remove()
        self.scales.remove()
        return plan_from_keep(self.groups, keep, {"method": "pdp_channels", "density": self.density})
