"""Per-unit scales on a model's groups, applied where the units are read: consumer weights.

Every training-aware method here (complexity-aware gates, soft coefficients, PDP on channels)
multiplies each unit of a group by a value in [0, 1]. Scaling the *consumer* columns that read
the unit is exactly removing the unit from everything downstream (the ops between producer and
consumer act per channel), works the same for channels, neurons and heads, and needs no care for
batch norms or biases. The scales are a parametrisation (``torch.nn.utils.parametrize``), so the
user's optimiser and training loop need no change; the scales themselves are plain tensors the
caller owns (leaf tensors with ``requires_grad`` for soft coefficients, samples for gates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from secateurs.errors import ValidationError
from secateurs.graph.groups import Group, Member


@dataclass(frozen=True)
class _Target:
    group: str
    index: torch.Tensor  # (size, block) tensor indices along `dim` for each unit
    dim: int


class _ConsumerScale(nn.Module):
    """W ↦ W · s along the consumer dimension, s built from the current group scales."""

    def __init__(self, targets: list[_Target], scales: Callable[[str], torch.Tensor]) -> None:
        super().__init__()
        self.targets = targets
        self._scales = [scales]  # not a submodule

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for target in self.targets:
            values = self._scales[0](target.group).to(weight.dtype)
            full = torch.ones(weight.shape[target.dim], dtype=weight.dtype, device=weight.device)
            index = target.index.to(weight.device)
            full = full.index_put((index.reshape(-1),), values.repeat_interleave(index.shape[1]))
            shape = [1] * weight.dim()
            shape[target.dim] = -1
            weight = weight * full.reshape(shape)
        return weight


def _unit_index(member: Member, size: int) -> torch.Tensor:
    return torch.tensor([member.indices([u]) for u in range(size)], dtype=torch.long)


class UnitScales:
    """Install per-unit scales for ``groups`` on ``model`` (in place); ``remove()`` undoes it.

    ``scales[group name]`` is read on every forward, so assigning a new tensor (a fresh Bernoulli
    sample, an updated coefficient) takes effect at once.
    """

    def __init__(self, model: nn.Module, groups: Iterable[Group]) -> None:
        self.model = model
        self.groups = {g.name: g for g in groups}
        self.scales: dict[str, torch.Tensor] = {}
        by_param: dict[tuple[str, str], list[_Target]] = {}
        for group in self.groups.values():
            consumers = group.consumers()
            if not consumers:
                raise ValidationError("groups", f"group {group.name!r} has no consumer layer to scale")
            for member in consumers:
                by_param.setdefault((member.module, member.param), []).append(
                    _Target(group.name, _unit_index(member, group.size), member.dim))
            self.scales[group.name] = torch.ones(group.size)
        self._installed: list[tuple[nn.Module, str]] = []
        try:
            for (module_name, param), targets in by_param.items():
                try:
                    module = model.get_submodule(module_name)
                except AttributeError as exc:
                    raise ValidationError("groups", f"module {module_name!r} is not in the model") from exc
                if not isinstance(getattr(module, param, None), torch.Tensor):
                    raise ValidationError("groups", f"module {module_name!r} has no tensor {param!r}")
                parametrize.register_parametrization(module, param, _ConsumerScale(targets, self.scales.__getitem__),
                                                     unsafe=True)
                self._installed.append((module, param))
        except Exception:
            self.remove()
            raise

    def set(self, values: Mapping[str, torch.Tensor]) -> None:
        """Replace the scales of some groups (each a (size,) tensor)."""
        for name, value in values.items():
            if name not in self.groups:
                raise ValidationError("scales", f"unknown group {name!r}")
            size = self.groups[name].size
            if value.shape != (size,):
                raise ValidationError("scales", f"group {name!r} needs shape ({size},), got {tuple(value.shape)}")
            self.scales[name] = value

    def remove(self) -> None:
        """Take the parametrisations off, leaving the original (unscaled) weights."""
        for module, param in self._installed:
            if parametrize.is_parametrized(module, param):
                parametrize.remove_parametrizations(module, param, leave_parametrized=False)
        self._installed = []


def fold_scales(model: nn.Module, groups: Mapping[str, Group], keep: Mapping[str, Iterable[int]],
                values: Mapping[str, torch.Tensor]) -> None:
    """Multiply the consumer columns of each kept unit by its scale, in place (no parametrisation
    may be installed): the model then computes, on the kept units, what the scaled one did."""
    with torch.no_grad():
        for g, units in keep.items():
            for member in groups[g].consumers():
                weight = getattr(model.get_submodule(member.module), member.param)
                for u in units:
                    index = torch.tensor(member.indices([u]), dtype=torch.long, device=weight.device)
                    scaled = weight.index_select(member.dim, index) * values[g][u].to(weight.dtype)
                    weight.index_copy_(member.dim, index, scaled)
