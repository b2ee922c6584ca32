"""The example training loop: the method's penalty joins the loss, step follows every update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.training import fit


class _Counting:
    """A stand-in method: a fixed penalty and a step counter."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.steps = 0

    def penalty(self) -> torch.Tensor:
        return torch.tensor(0.25)

    def step(self) -> None:
        self.steps += 1


def test_fit_adds_the_penalty_and_steps_after_every_batch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    method = _Counting(model)
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # nothing moves: losses can be recomputed
    history = fit(method, lambda: iter(data), nn.functional.cross_entropy, epochs=2, optimizer=frozen)
    with torch.no_grad():
        expected = sum(float(nn.functional.cross_entropy(model(x), y)) + 0.25 for x, y in data) / 3
    assert history == pytest.approx([expected, expected])
    assert method.steps == 6
