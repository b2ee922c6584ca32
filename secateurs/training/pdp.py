"""PDP: parameter-free differentiable pruning (Cho et al., NeurIPS 2023).

Each pruned tensor is reparametrised as m(w)·w with m(w) = σ((w² − t²)/τ). The threshold t is not
learned: every forward places it halfway between the smallest score the current target density
keeps and the largest it prunes (the projection of the score distribution onto the density, the
``topk`` projection), so PDP adds no trainable parameter. τ is expressed relative to t² because
the right temperature scales with the weights. Scores are w² per weight (unstructured), per block
of M along the input dimension (N:M), or a channel's squared L2 norm (channels).

The schedule is ours where the paper is terse: a dense warm-up, then one global magnitude sort
fixes each layer's final density, then every layer's density ramps linearly to it while τ decays
geometrically to ``tau_final``; once the ramp is over the mask is the hard top-K, so the last
steps train exactly the network ``finalize`` returns (a few epochs are too short for the weights
to polarise on their own, and a BatchNorm after a pruned channel makes its norm a free scale).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateurs.errors import ValidationError, require_numbers
from secateurs.plan import PrunePlan

Structure = Literal["unstructured", "n:m"]


@dataclass(frozen=True)
class DensitySchedule:
    """Dense for ``warmup`` steps, then a linear ramp to the final densities over ``ramp`` steps."""

    warmup: int = 0
    ramp: int = 100

    def progress(self, step: int) -> float:
        """0 during warm-up, rising linearly to 1 at the end of the ramp."""
        if step < self.warmup:
            return 0.0
        if self.ramp <= 0:
            return 1.0
        return min(1.0, (step - self.warmup + 1) / self.ramp)


def annealed(start: float, end: float | None, progress: float) -> float:
    """Geometric interpolation from ``start`` (progress 0) to ``end`` (progress 1); ``end=None``
    keeps ``start``."""
    if end is None or end == start:
        return start
    return start * (end / start) ** min(max(progress, 0.0), 1.0)


def keep_threshold(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Midpoint between the smallest kept and the largest pruned score (keep of numel kept)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if keep >= n:
        return flat.min() - 1.0  # everything kept: a threshold below every score
    if keep <= 0:
        return flat.max() + 1.0
    top = torch.topk(flat, keep + 1, sorted=True).values
    return 0.5 * (top[keep - 1] + top[keep])


class _SoftMask(nn.Module):
    """Parametrisation w ↦ m(w)·w whose threshold follows the controller's current density."""

    def __init__(self, controller: PDP, name: str) -> None:
        super().__init__()
        self._controller = [controller]  # a list, so the controller is not registered as a submodule
        self.name = name

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        controller = self._controller[0]
        if controller.current_density(self.name) >= 1.0 and not controller.hard:
            return weight
        return weight * controller.mask(self.name, weight)


class PDP:
    """Wrap a model so that training drives its weights towards a target density.

    Parameters
    ----------
    model : nn.Module
        Pruned modules default to every Linear and Conv weight.
    density : float
        Fraction of weights kept at the end, in (0, 1]. For ``structure="n:m"`` it is N/M.
    structure : {"unstructured", "n:m"}
    n, m : int
        The N:M pattern (N kept of every M consecutive inputs).
    tau, tau_final : float
        Temperature relative to t² (the sigmoid's width in units of the threshold's square) at
        the start and at the end of the ramp (geometric in between; ``tau_final=None`` keeps
        ``tau`` throughout, as in the paper). After the ramp the mask is hard (exact top-K).
    schedule : DensitySchedule
    modules : iterable of str, optional
        Dotted paths of the modules whose ``weight`` is pruned. By default every Linear and Conv;
        for N:M those whose inputs per output are not a multiple of M stay dense (``skipped``).
    inplace : bool
        Wrap ``model`` itself; by default a deep copy is wrapped and exposed as ``.model``.

    Use: build the optimiser on ``pdp.model.parameters()``, call ``pdp.step()`` after each
    optimiser step, and ``pdp.finalize()`` at the end for the hard masks.
    """

    def __init__(
        self,
        model: nn.Module,
        density: float | None = None,
        *,
        structure: Structure = "unstructured",
        n: int = 2,
        m: int = 4,
        tau: float = 0.05,
        tau_final: float | None = 0.002,
        schedule: DensitySchedule | None = None,
        modules: Iterable[str] | None = None,
        inplace: bool = False,
    ) -> None:
        require_numbers(density=density, n=n, m=m, tau=tau, tau_final=tau_final)
        if structure not in ("unstructured", "n:m"):
            raise ValidationError("structure", f"expected 'unstructured' or 'n:m', got {structure!r}")
        if structure == "n:m":
            if not (0 < n < m):
                raise ValidationError("n", f"N:M needs 0 < N < M, got {n}:{m}")
            density = n / m if density is None else density
            if not math.isclose(density, n / m):
                raise ValidationError("density", f"an {n}:{m} pattern keeps exactly {n / m}, not {density}")
        if density is None or not (0.0 < density <= 1.0):
            raise ValidationError("density", f"must be in (0, 1], got {density!r}")
        for label, value in (("tau", tau), ("tau_final", tau if tau_final is None else tau_final)):
            if not value > 0:
                raise ValidationError(label, f"must be positive, got {value!r}")
        self.model = model if inplace else copy.deepcopy(model)
        self.density = float(density)
        self.structure: Structure = structure
        self.n, self.m = n, m
        self.tau = float(tau)
        self.tau_final = None if tau_final is None else float(tau_final)
        self.schedule = schedule or DensitySchedule()
        self.steps = 0
        self.hard = False
        names = list(modules) if modules is not None else [
            name for name, module in self.model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
        ]
        self.layers: dict[str, nn.Module] = {}
        self.skipped: dict[str, str] = {}
        for name in names:
            try:
                module = self.model.get_submodule(name)
            except AttributeError as exc:
                raise ValidationError("modules", f"no module {name!r} in the model") from exc
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise ValidationError("modules", f"module {name!r} has no weight tensor")
            if structure == "n:m" and (weight.dim() < 2 or weight[0].numel() % m):
                why = f"{weight[0].numel()} inputs per output are not a multiple of M={m}"
                if modules is None:  # as one-shot N:M does: such a layer stays dense, and says so
                    self.skipped[name] = why
                    continue
                raise ValidationError("modules", f"module {name!r}: {why}")
            self.layers[name] = module
        if not self.layers:
            detail = "; ".join(f"{k!r}: {v}" for k, v in self.skipped.items())
            raise ValidationError("model", "no Linear or Conv weights to prune" + (f" (skipped {detail})" if detail else ""))
        self.final_density: dict[str, float] = {name: self.density for name in self.layers}
        self.keep_counts: dict[str, int] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self._allocated = structure == "n:m"  # N:M is uniform by construction
        if structure == "n:m":
            self.keep_counts = {name: module.weight.numel() * n // m for name, module in self.layers.items()}
        if self.schedule.warmup == 0 and not self._allocated:
            self._allocate()
        for name, module in self.layers.items():
            parametrize.register_parametrization(module, "weight", _SoftMask(self, name))

    def _raw(self, name: str) -> torch.Tensor:
        """The trained tensor under the parametrisation."""
        module = self.layers[name]
        if parametrize.is_parametrized(module, "weight"):
            return module.parametrizations.weight.original
        return module.weight

    def _allocate(self) -> None:
        """One global magnitude sort sets each layer's final density; Σ kept = round(density·N)."""
        with torch.no_grad():
            sizes = {name: self._raw(name).numel() for name in self.layers}
            total = sum(sizes.values())
            keep_total = round(self.density * total)
            scores = torch.cat([self._raw(name).detach().reshape(-1).abs().float().cpu() for name in self.layers])
            order = torch.argsort(scores, descending=True, stable=True)[:keep_total]
            owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes.values())))
            kept = torch.bincount(owner[order], minlength=len(sizes)).tolist()
        # Every layer keeps at least one weight (a dead layer disconnects the network); the
        # weights this adds are taken back from the layers that keep the most, so Σ stays exact.
        for i in range(len(kept)):
            if kept[i] == 0:
                kept[i] = 1
                kept[max(range(len(kept)), key=kept.__getitem__)] -= 1
        self.keep_counts = dict(zip(sizes, kept, strict=True))
        for name, size in sizes.items():
            self.final_density[name] = self.keep_counts[name] / size
        self._allocated = True

    def current_density(self, name: str) -> float:
        """This layer's target density at the current step of the schedule."""
        if self.hard:
            return self.final_density[name]
        progress = self.schedule.progress(self.steps)
        return 1.0 - progress * (1.0 - self.final_density[name])

    def _scores(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach() ** 2

    def current_tau(self) -> float:
        """τ at this step: geometric from ``tau`` to ``tau_final`` along the ramp."""
        return annealed(self.tau, self.tau_final, self.schedule.progress(self.steps))

    def mask(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The mask of layer ``name`` for the given weights: soft during the ramp, hard after it.

        The scores w² are not detached (PDP's gradient reaches w through m(w) too); the threshold
        is (it is an order statistic, not a parameter).
        """
        scores = weight**2
        progress = self.schedule.progress(self.steps)
        if self.hard or (progress >= 1.0 and self._allocated):
            return self._hard_mask(name, scores.detach())
        if self.structure == "n:m":
            # Active once warm-up ends (the sigmoid keeps it soft): per block of M consecutive
            # inputs, the threshold lies between the N-th and (N+1)-th largest score.
            if progress == 0.0:
                return torch.ones_like(weight)
            blocks = scores.detach().reshape(scores.shape[0], -1, self.m)
            top = torch.topk(blocks, self.n + 1, dim=-1, sorted=True).values
            t2 = 0.5 * (top[..., self.n - 1] + top[..., self.n])
            t2 = t2.unsqueeze(-1).expand_as(blocks).reshape_as(scores)
        else:
            keep = round(self.current_density(name) * scores.numel())
            t2 = keep_threshold(scores.detach(), max(keep, 1))
        temperature = self.current_tau() * torch.clamp(t2, min=torch.finfo(scores.dtype).tiny)
        return torch.sigmoid((scores - t2) / temperature)

    def _hard_mask(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """Exactly the top scores: per block for N:M, per layer's allocated count otherwise."""
        if self.structure == "n:m":
            blocks = scores.reshape(scores.shape[0], -1, self.m)
            index = torch.topk(blocks, self.n, dim=-1).indices
            hard = torch.zeros_like(blocks).scatter_(-1, index, 1.0)
            return hard.reshape_as(scores)
        flat = scores.reshape(-1)
        index = torch.topk(flat, self.keep_counts[name]).indices
        return torch.zeros_like(flat).scatter_(0, index, 1.0).reshape_as(scores)

    def penalty(self) -> torch.Tensor:
        """PDP has no regulariser: the mask itself does the work (zero, for a uniform API)."""
        return torch.zeros(())

    def step(self) -> None:
        """Advance the schedule by one optimiser step; allocate densities when warm-up ends."""
        if self.hard:
            raise ValidationError("step", "this PDP was finalized; wrap the model again")
        self.steps += 1
        if not self._allocated and self.steps >= self.schedule.warmup:
            self._allocate()

    def finalize(self) -> PrunePlan:
        """The pruned weights as a plan (``refit``: each weight times its hard 0/1 mask).

        The soft parametrisations are removed and ``self.model`` keeps the hard-masked weights;
        ``self.masks`` holds the boolean masks. Σ mask = round(density · N) exactly (unstructured)
        or exactly N of every M (N:M). Training also moved biases and norms, so apply the plan to
        the trained copy: ``secateurs.apply(self.model, plan, mode="mask")``. Once the ramp is
        over the forward already uses these masks, so the plan is the network last trained.
        """
        if self.steps == 0:
            raise ValidationError("finalize", "PDP was never stepped: call step() after each optimiser step first")
        if self.hard:
            raise ValidationError("finalize", "PDP was already finalized")
        if not self._allocated:
            self._allocate()
        self.hard = True
        refit: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, module in self.layers.items():
                self.masks[name] = self._hard_mask(name, self._scores(self._raw(name))).to(torch.bool)
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
                module.weight.mul_(self.masks[name].to(module.weight.dtype))
                refit[f"{name}.weight"] = module.weight.detach().clone()
        meta = {"method": "pdp", "structure": self.structure, "density": self.density}
        return PrunePlan({}, groups={}, refit=refit, meta=meta)
