"""Consumer columns: the contribution of a unit's columns equals what the unit feeds the layer."""

from __future__ import annotations

import torch
from torch import nn

from secateurs.calibration import layer_rows
from secateurs.consumers import consumer_columns
from secateurs.graph import build


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.out(torch.relu(self.fc(self.pool(y).flatten(1))))


def test_unit_columns_carry_exactly_that_units_signal() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(2, 3, 6, 6)
    graph = build(model, x)
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: captured.__setitem__(n, a[0]))
             for n in ("conv2", "fc", "out")]
    model(x)
    for h in hooks:
        h.remove()
    checked = 0
    for group in graph.prunable_groups():
        found, skipped = consumer_columns(model, group)
        assert not skipped
        for consumer in found:
            module = model.get_submodule(consumer.module)
            X = layer_rows(module, captured[consumer.module])
            W = module.weight.reshape(module.weight.shape[0], -1)
            unit = 1
            cols = consumer.columns[unit]
            # Zero unit 1 in the consumer's input (independently, via the member's indices on the input).
            zeroed = captured[consumer.module].clone()
            zeroed.index_fill_(1, torch.tensor(consumer.member.indices([unit])), 0.0)
            X0 = layer_rows(module, zeroed)
            torch.testing.assert_close((X - X0) @ W.T, X[:, cols] @ W[:, cols].T, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 3  # conv1→conv2, conv2→fc (flatten blocks of 4), fc→out
