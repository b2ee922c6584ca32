"""Removable layers found from the graph: the groups strictly inside a residual add's arm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from secateurs.graph import build
from secateurs.models.reference import REFERENCE_MODELS
from secateurs.training.layers import residual_branches


def _found(name: str) -> dict[str, list[str]]:
    ref = REFERENCE_MODELS[name]
    return residual_branches(build(ref.build(), ref.example_inputs()))


def test_resnet_branches_hold_the_groups_between_their_convs() -> None:
    assert _found("resnet_basic") == {"layer1": ["layer1.conv1:out"], "layer2": ["layer2.conv1:out"]}
    assert _found("resnet_bottleneck") == {"block1": ["block1.conv1:out", "block1.conv2:out"],
                                           "block2": ["block2.conv1:out", "block2.conv2:out"]}


def test_no_residual_add_no_layer() -> None:
    assert _found("vgg") == {} and _found("cnn1d") == {}


def test_transformer_blocks_offer_their_mlp_not_their_heads() -> None:
    """Attention heads cannot be emptied (no zero-width attention); the MLP hidden layer can."""
    assert _found("gpt") == {"blocks.0": ["blocks.0.fc1:out"], "blocks.1": ["blocks.1.fc1:out"]}


class _Blocks(nn.Module):
    """Two residual branches: one with a max pool on its inner channels (cannot run empty), one
    nested inside an outer skip (its group belongs to the innermost arm)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a1 = nn.Conv2d(4, 6, 3, padding=1)
        self.a2 = nn.Conv2d(6, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 5, 1)
        self.b2 = nn.Conv2d(5, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.stem(x))
        y = s + self.a2(F.max_pool2d(F.relu(self.a1(s)), 3, 1, 1))
        inner = y + self.b2(F.relu(self.b1(y)))
        z = s + inner  # an outer skip around both blocks
        return self.head(z.mean((2, 3)))


def test_branches_through_max_pool_are_skipped_and_nesting_picks_the_innermost() -> None:
    model = _Blocks().eval()
    found = residual_branches(build(model, torch.randn(2, 3, 6, 6)))
    assert found == {"add_1": ["b1:out"]}  # no common module prefix: named by its add node
