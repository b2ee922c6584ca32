"""Channel PDP: masks from producer norms, exact keep counts, no new parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import ValidationError
from secateurs.graph.groups import Group, Member
from secateurs.training.pdp import DensitySchedule
from secateurs.training.pdp_channels import ChannelPDP


def _setup() -> tuple[nn.Module, list[Group]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    group = Group("h", 12, [Member("0", "weight", 0, "producer"), Member("0", "bias", 0, "producer"),
                            Member("2", "weight", 1, "consumer")])
    return model, [group]


def test_scores_are_producer_norms_and_threshold_splits_top_k() -> None:
    model, groups = _setup()
    pdp = ChannelPDP(model, groups, 0.5, schedule=DensitySchedule(warmup=0, ramp=1))
    pdp.step()
    layer = pdp.model[0]
    expected = layer.weight.detach().pow(2).sum(1) + layer.bias.detach().pow(2)
    torch.testing.assert_close(pdp.scores("h").detach(), expected)
    mask = pdp.mask("h").detach()
    top = set(torch.topk(expected, 6).indices.tolist())
    assert {i for i in range(12) if mask[i] > 0.5} == top


def test_training_keeps_exact_counts_and_adds_no_parameters() -> None:
    model, groups = _setup()
    pdp = ChannelPDP(model, groups, 0.25, schedule=DensitySchedule(warmup=2, ramp=5))
    assert len(list(pdp.model.parameters())) == len(list(model.parameters()))
    X = torch.randn(64, 6)
    y = X[:, :3].argmax(1)
    opt = torch.optim.SGD(pdp.model.parameters(), lr=0.1)
    for _ in range(10):
        loss = nn.functional.cross_entropy(pdp.model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pdp.step()
    keep = pdp.finalize().keep
    assert len(keep["h"]) == 3 and keep["h"] == sorted(set(keep["h"]))
    assert not any("parametrizations" in k for k in pdp.model.state_dict())
    assert not pdp.model._forward_pre_hooks


def test_errors() -> None:
    model, groups = _setup()
    with pytest.raises(ValidationError, match=r"density: must be in \(0, 1\]"):
        ChannelPDP(model, groups, 0.0)
    with pytest.raises(ValidationError, match=r"group 'c' has no producer weights"):
        ChannelPDP(model, [Group("c", 3, [Member("2", "weight", 1, "consumer")])], 0.5)
    with pytest.raises(ValidationError, match=r"finalize: ChannelPDP was never stepped"):
        ChannelPDP(model, groups, 0.5).finalize()
