"""Component-aware soft coefficients (Sundaram et al., arXiv 2507.14882) on secateurs groups.

Groups are partitioned into named components (encoder, latent, decoder, heads...): a group
belongs to the component whose module prefix its producers carry, and a group whose producers and
consumers lie in different components (a latent size) is its own component unless the user names
it. Each unit gets a coefficient s ∈ [0, 1] that scales its channel (consumer columns, see
``gating``). The coefficients are trained on the user's application loss by projected gradient:
after each step, every component's coefficients are projected onto {0 ≤ s ≤ 1, Σ s = ρ_c·N_c}
(the ``Projection`` problem with a density, solved exactly by bisection), so the soft model always
spends exactly the component's budget. ``finalize`` keeps the units with the largest coefficients
within each component's budget.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from secateurs.errors import ValidationError
from secateurs.graph.groups import Group
from secateurs.plan import PrunePlan
from secateurs.problems.projection import Projection
from secateurs.solvers import solve
from secateurs.training.gating import UnitScales
from secateurs.training.plans import plan_from_keep


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
    """Per-unit coefficients in [0, 1], optimised under per-component keep fractions.

    Parameters
    ----------
    model : nn.Module
    groups : iterable of Group
        Prunable groups (``graph.prunable_groups()``).
    components : mapping component name → module prefixes
    keep : mapping component name → fraction of its units kept (ρ_c), or one float for all
    lr : float
        Step size of the projected gradient step on the coefficients.
    inplace : bool
        Scale ``model`` itself; by default a deep copy, exposed as ``.model``.
    """

    def __init__(self, model: nn.Module, groups: Iterable[Group], components: Mapping[str, Iterable[str]],
                 keep: float | Mapping[str, float], *, lr: float = 0.05, inplace: bool = False) -> None:
        self.groups = {g.name: g for g in groups}
        for g in self.groups.values():
            if not g.prunable:
                raise ValidationError("groups", f"group {g.name!r} is frozen ({g.reason})")
        self.component_of = assign_components(self.groups.values(), components)
        names = sorted(set(self.component_of.values()))
        fractions = {c: float(keep) for c in names} if isinstance(keep, (int, float)) else dict(keep)
        for c in names:
            if c not in fractions:
                raise ValidationError("keep", f"no keep fraction for component {c!r} (components: {names})")
            if not 0.0 < fractions[c] <= 1.0:
                raise ValidationError("keep", f"component {c!r}: fraction must be in (0, 1], got {fractions[c]}")
        self.fractions = fractions
        if lr <= 0:
            raise ValidationError("lr", f"must be positive, got {lr}")
        self.lr = float(lr)
        self.model = model if inplace else copy.deepcopy(model)
        self.coefficients = {g: torch.ones(grp.size, requires_grad=True) for g, grp in self.groups.items()}
        self.scales = UnitScales(self.model, self.groups.values())
        self.scales.set(self.coefficients)
        self.steps = 0
        self._project()

    def members(self, component: str) -> list[str]:
        return [g for g, c in self.component_of.items() if c == component]

    def units_kept(self, component: str) -> int:
        """ρ_c · N_c rounded, at least one unit per group of the component."""
        groups = self.members(component)
        total = sum(self.groups[g].size for g in groups)
        return max(round(self.fractions[component] * total), len(groups))

    def parameters(self) -> list[torch.Tensor]:
        """The coefficients (for users who prefer their own optimiser over ``step``)."""
        return list(self.coefficients.values())

    def _project(self) -> None:
        with torch.no_grad():
            for component in self.fractions:
                groups = self.members(component)
                if not groups:
                    continue
                flat = torch.cat([self.coefficients[g].detach().double() for g in groups]).numpy()
                problem = Projection(flat, total=float(self.units_kept(component)))
                projected = torch.as_tensor(solve(problem, "bisection").solution, dtype=torch.float32)
                start = 0
                for g in groups:
                    size = self.groups[g].size
                    self.coefficients[g].copy_(projected[start:start + size])
                    start += size

    def penalty(self) -> torch.Tensor:
        """No regulariser: the budget is held by projection (zero, for a uniform API)."""
        return torch.zeros(())

    def step(self) -> None:
        """Gradient step on the coefficients, then projection onto every component's budget."""
        with torch.no_grad():
            for s in self.coefficients.values():
                if s.grad is not None:
                    s -= self.lr * s.grad
                    s.grad = None
        self._project()
        self.steps += 1

    def keep(self) -> dict[str, list[int]]:
        """The largest coefficients within each component's unit budget (≥ 1 unit per group)."""
        out: dict[str, list[int]] = {}
        for component in self.fractions:
            groups = self.members(component)
            budget = self.units_kept(component)
            chosen = {g: [int(torch.argmax(self.coefficients[g]))] for g in groups}
            candidates = [(float(self.coefficients[g].detach()[u]), g, u) for g in groups
                          for u in range(self.groups[g].size) if u != chosen[g][0]]
            candidates.sort(key=lambda t: (-t[0], t[1], t[2]))
            for _, g, u in candidates[: budget - len(groups)]:
                chosen[g].append(u)
            out.update({g: sorted(units) for g, units in chosen.items()})
        return out

    def finalize(self) -> PrunePlan:
        """The plan of kept units; the coefficients' parametrisations are removed from the model."""
        if self.steps == 0:
            raise ValidationError("finalize", "SoftCoefficients was never stepped: call step() after each optimiser step")
        keep = self.keep()
        self.scales.remove()
        return plan_from_keep(self.groups, keep, {"method": "soft_coefficients", "keep": self.fractions})

    def spent(self) -> dict[str, float]:
        """Σ s per component (equals its unit budget after every projection)."""
        return {c: float(sum(float(self.coefficients[g].detach().sum()) for g in self.members(c))) for c in self.fractions}
