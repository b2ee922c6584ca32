"""A two-hidden-layer MLP with hand-written groups and cost model, shared by the gate tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from secateurs.cost import CostModel, Polynomial
from secateurs.errors import ValidationError
from secateurs.graph.groups import Group, Member


def two_layer_mlp(h1: int = 16, h2: int = 16) -> tuple[nn.Module, list[Group], CostModel]:
    """6 -> h1 -> h2 -> 3, its two hidden groups, and their exact params/FLOPs polynomials.

    Layer 2 consumes h1 and produces h2: its weight is both gated and scored.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 3))
    groups = [Group("h1", h1, [Member("0", "weight", 0, "producer"), Member("0", "bias", 0),
                               Member("2", "weight", 1, "consumer")]),
              Group("h2", h2, [Member("2", "weight", 0, "producer"), Member("2", "bias", 0),
                               Member("4", "weight", 1, "consumer")])]
    # Counted by hand for a batch of one: params 6h1 + h1 + h1h2 + h2 + 3h2 + 3; FLOPs 2(6h1 + h1h2 + 3h2).
    cost = CostModel(Polynomial(3, {"h1": 7, "h2": 4}, {("h1", "h2"): 1}),
                     Polynomial(0, {"h1": 12, "h2": 6}, {("h1", "h2"): 2}), {"h1": h1, "h2": h2})
    return model, groups, cost


def check_finalized_once(method: Any, name: str, suffix: str = "") -> None:
    """Step once and finalize; then finalizing again and stepping again are typed errors naming ``name``."""
    method.step()
    method.finalize()
    with pytest.raises(ValidationError, match=rf"finalize: {name} was already finalized{suffix}"):
        method.finalize()
    with pytest.raises(ValidationError, match=rf"step: this {name} was finalized{suffix}"):
        method.step()
