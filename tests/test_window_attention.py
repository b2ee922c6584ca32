"""torchvision's Swin window attention: heads found, pruned and run (against a stand-in of its class)."""

from __future__ import annotations

import copy
import io
import sys
import types

import pytest
import torch

import secateurs
from secateurs import window_attention as wa
from secateurs.apply import apply
from secateurs.graph import build, dense_counts
from secateurs.plan import PrunePlan
from tests.swin_fixtures import (
    SWIN_MODULE,
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    TinySwin,
)

INPUT = (2, 3, 14, 14)  # a 7 x 7 map: padded to 9 x 9 for 3 x 3 windows, and shifted in the second block


def _model(v2: bool, seed: int = 0) -> TinySwin:
    torch.manual_seed(seed)
    model = TinySwin(v2=v2).eval()
    with torch.no_grad():  # a key bias the V2 forward must ignore
        for block in model.blocks:
            block.attn.qkv.bias.normal_()
    return model


@pytest.mark.parametrize("v2", [False, True])
def test_the_computing_twin_gives_the_reference_outputs_and_leaves_the_model_alone(v2: bool) -> None:
    model = _model(v2)
    before = copy.deepcopy(model.state_dict())
    twin = wa.computing_twin(model)
    assert twin is not model
    assert all(type(b.attn).__name__.startswith("Pruned") for b in twin.blocks)
    assert type(model.blocks[0].attn) in (ShiftedWindowAttention, ShiftedWindowAttentionV2)
    x = torch.randn(INPUT)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("v2", [False, True])
def test_the_graph_finds_each_blocks_heads(v2: bool) -> None:
    model = _model(v2)
    graph = build(model, torch.randn(INPUT))
    heads = [g for g in graph.prunable_groups() if g.name.endswith(":heads")]
    assert len(heads) == 2
    for group in heads:
        assert group.size == 4 and group.unit_width == 4  # 4 heads of 16 / 4 channels
        modules = {m.module for m in group.members}
        prefix = next(iter(modules)).split(".attn")[0] + ".attn"
        assert {f"{prefix}.qkv", f"{prefix}.proj"} <= modules
    assert type(model.blocks[0].attn) in (ShiftedWindowAttention, ShiftedWindowAttentionV2)  # traced a copy


def _masked(model: TinySwin, block: int, dropped: list[int]) -> TinySwin:
    """The dense model with heads ``dropped`` of one block silenced: their values and the output
    projection's columns that read them are zero, so they add nothing to the block's output."""
    masked = copy.deepcopy(model)
    attn = masked.blocks[block].attn
    inner, hd = attn.qkv.weight.shape[0] // 3, attn.qkv.weight.shape[0] // 3 // attn.num_heads
    with torch.no_grad():
        for h in dropped:
            rows = slice(2 * inner + h * hd, 2 * inner + (h + 1) * hd)
            attn.qkv.weight[rows] = 0
            attn.qkv.bias[rows] = 0
            attn.proj.weight[:, h * hd:(h + 1) * hd] = 0
    return masked


@pytest.mark.parametrize("v2", [False, True])
def test_sliced_heads_compute_what_the_dense_model_does_with_them_silenced(v2: bool) -> None:
    model = _model(v2)
    x = torch.randn(INPUT)
    graph = build(model, x)
    group = next(g for g in graph.prunable_groups() if g.name.endswith(":heads") and ".1." in g.members[0].module)
    plan = PrunePlan.from_graph(graph, {group.name: [0, 2]})
    pruned = apply(model, plan, graph=graph, mode="slice")
    attn = pruned.blocks[1].attn
    assert attn.num_heads == 2 and attn.qkv.weight.shape == (24, 16) and attn.proj.weight.shape == (16, 8)
    if v2:
        assert attn.logit_scale.shape == (2, 1, 1) and attn.cpb_mlp[2].weight.shape[0] == 2
    else:
        assert attn.relative_position_bias_table.shape[1] == 2
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _masked(model, 1, [1, 3])(x), rtol=1e-5, atol=1e-5)
    assert type(model.blocks[1].attn) in (ShiftedWindowAttention, ShiftedWindowAttentionV2)
    assert model.blocks[1].attn.num_heads == 4


@pytest.mark.parametrize("v2", [False, True])
def test_prune_meets_a_flops_budget_by_pruning_heads(v2: bool) -> None:
    model = _model(v2)
    before = copy.deepcopy(model.state_dict())
    calibration = [torch.randn(INPUT) for _ in range(3)]
    result = secateurs.prune(model, calibration, secateurs.Budget(flops=0.6), progress=False, error_curve=False)
    counted = dense_counts(result.model, calibration[0])
    dense = dense_counts(model, calibration[0])
    assert counted.flops <= 0.6 * dense.flops
    flops = next(t for t in result.report.totals if t.name == "flops")
    assert flops.achieved == counted.flops
    for name, keep in result.plan.keep.items():
        if name.endswith(":heads"):
            block = int(name.split(".")[1])
            attn = result.model.blocks[block].attn
            assert attn.num_heads == len(keep) and attn.qkv.weight.shape[0] == 3 * 4 * len(keep)
    assert any(n.endswith(":heads") and len(k) < 4 for n, k in result.plan.keep.items())
    with torch.no_grad():
        assert result.model(calibration[0]).shape == (2, 5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.blocks[0].attn) in (ShiftedWindowAttention, ShiftedWindowAttentionV2)


def test_a_pruned_model_unpickles_in_a_process_that_has_not_made_its_class(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(False)
    x = torch.randn(INPUT)
    graph = build(model, x)
    group = next(g for g in graph.prunable_groups() if g.name.endswith(":heads"))
    pruned = apply(model, PrunePlan.from_graph(graph, {group.name: [1, 3]}), graph=graph, mode="slice")
    buffer = io.BytesIO()
    torch.save(pruned, buffer)
    fake = types.ModuleType(SWIN_MODULE)  # what importing torchvision's module gives
    fake.ShiftedWindowAttention = ShiftedWindowAttention  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, SWIN_MODULE, fake)
    monkeypatch.delitem(vars(wa), "PrunedShiftedWindowAttention")  # as in a fresh process
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.blocks[0].attn).__name__ == "PrunedShiftedWindowAttention"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x))
