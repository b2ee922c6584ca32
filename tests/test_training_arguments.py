"""Training methods reject arguments of the wrong type with a ValidationError naming the argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from secateurs.errors import ValidationError
from secateurs.graph import build
from secateurs.training import PDP, ChannelPDP, ComplexityAware, SoftCoefficients


def _net() -> tuple[nn.Module, Any]:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    return model, build(model, torch.randn(2, 4))


CASES: list[tuple[str, Callable[[nn.Module, Any], object]]] = [
    ("density", lambda m, g: PDP(m, "0.5")),  # type: ignore[arg-type]
    ("tau", lambda m, g: PDP(m, 0.5, tau="x")),  # type: ignore[arg-type]
    ("n", lambda m, g: PDP(m, structure="n:m", n="2")),  # type: ignore[arg-type]
    ("density", lambda m, g: PDP(m, True)),
    ("density", lambda m, g: ChannelPDP(m, g.prunable_groups(), "0.5")),  # type: ignore[arg-type]
    ("strength", lambda m, g: ComplexityAware(m, g.prunable_groups(), g.cost_model, strength="1")),  # type: ignore[arg-type]
    ("keep", lambda m, g: SoftCoefficients(m, g.prunable_groups(), keep="0.5")),  # type: ignore[arg-type]
    ("keep['model']", lambda m, g: SoftCoefficients(m, g.prunable_groups(), keep={"model": "x"})),  # type: ignore[dict-item]
    ("lr", lambda m, g: SoftCoefficients(m, g.prunable_groups(), keep=0.5, lr="x")),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("field", "make"), CASES)
def test_a_string_or_bool_where_a_number_goes_is_named(field: str, make: Callable[[nn.Module, Any], object]) -> None:
    model, graph = _net()
    with pytest.raises(ValidationError) as info:
        make(model, graph)
    assert info.value.args[0].startswith(f"{field}: expected a number, got ")
