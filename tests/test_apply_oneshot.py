"""Grouped convs end to end: consumer columns, one-shot prune() and apply on the ResNeXt reference model.

A grouped conv with g groups is g consumers sharing one support (one per block of output rows),
so the within-group input factor it reads is refit block by block; the within-group output factor
is refit in the 1x1 conv that reads it (strided columns).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from secateurs.apply import apply
from secateurs.budget import Budget
from secateurs.calibration import layer_rows
from secateurs.consumers import consumer_columns
from secateurs.graph import build, dense_counts
from secateurs.models.reference import REFERENCE_MODELS
from secateurs.oneshot import prune


def _calibration() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(3)]


def test_grouped_conv_is_one_consumer_per_block_and_each_block_reproduces_its_outputs() -> None:
    model = REFERENCE_MODELS["resnext"].build()
    x = _calibration()[0]
    graph = build(model, x)
    conv2 = model.block1.conv2
    found, skipped = consumer_columns(model, graph.group("block1.conv1:out"))
    assert not skipped and [c.module for c in found] == ["block1.conv2"] * conv2.groups
    captured: list[torch.Tensor] = []
    hook = conv2.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(x)
        out = conv2(captured[0])  # torch's grouped conv: the reference
    hook.remove()
    X = layer_rows(conv2, captured[0])
    flat_out = out.permute(0, 2, 3, 1).reshape(-1, conv2.out_channels)
    bias = conv2.bias if conv2.bias is not None else torch.zeros(conv2.out_channels)
    for c in found:
        start, stop = c.rows
        W = c.weight_block(conv2.weight)[:, c.weight_flat()]
        # every output of the block is the block's weights times its own input channels' columns
        torch.testing.assert_close(X[:, c.flat()] @ W.T + bias[start:stop], flat_out[:, start:stop],
                                   rtol=1e-5, atol=1e-5)
        assert c.width == 9 and c.columns.shape[0] == graph.group("block1.conv1:out").size
    found, skipped = consumer_columns(model, graph.group("block1.conv2:out"))
    assert not skipped and [c.module for c in found] == ["block1.conv3"]
    (consumer,) = found
    assert consumer.member.indices([1]) == [1, 5]  # within-group output 1 of each of 2 groups of 4
    captured: list[torch.Tensor] = []
    conv3 = model.block1.conv3
    hook = conv3.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model(x)
    hook.remove()
    inp = captured[0]
    X, W = layer_rows(conv3, inp), conv3.weight.reshape(conv3.weight.shape[0], -1)
    zeroed = inp.clone().index_fill_(1, torch.tensor([1, 5]), 0.0)
    cols = consumer.columns[1]
    torch.testing.assert_close((X - layer_rows(conv3, zeroed)) @ W.T, X[:, cols] @ W[:, cols].T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sequential", [True, False])
def test_oneshot_prunes_grouped_model_within_budget(sequential: bool) -> None:
    model = REFERENCE_MODELS["resnext"].build()
    calibration = _calibration()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, calibration, Budget(flops=0.5), progress=False, error_curve=False, sequential=sequential)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    dense, counted = dense_counts(model, calibration[0]), dense_counts(result.model, calibration[0])
    assert counted.flops <= 0.5 * dense.flops and result.report.total("flops").met
    for block, groups in ((result.model.block1, 2), (result.model.block2, 4)):
        conv: nn.Conv2d = block.conv2
        assert conv.groups == groups
        assert (conv.out_channels, conv.in_channels) == (conv.weight.shape[0], conv.weight.shape[1] * groups)
        assert conv.in_channels % groups == 0 and conv.out_channels % groups == 0
    reports = {g.name: g for g in result.report.groups}
    for name in ("block1.conv1:out", "block2.conv1:out"):  # refit through their grouped consumers
        assert "not refit" not in reports[name].note and reports[name].solver != "magnitude"
    x = torch.cat(calibration)
    with torch.no_grad():
        y = result.model.eval()(x)
        torch.testing.assert_close(apply(model, result.plan).eval()(x), y)  # the plan alone (refit included)
        dense_y = model(x)
    assert torch.isfinite(y).all() and float((y - dense_y).norm() / dense_y.norm()) < 0.5
    assert math.isclose(result.graph.cost(result.plan.kept_counts()).flops, counted.flops)
