"""Consumer inputs too wide for their Gram to fit in memory: the Gram's diagonal only, no refit, and
the run goes on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from secateurs import memory, oneshot, weight_pruning
from secateurs.budget import Budget
from secateurs.calibration import GramStatistics, collect
from secateurs.graph import build, dense_counts


def _wide_model() -> nn.Sequential:
    """A VGG in miniature: conv channels flattened into a Linear of 8 × 49 = 392 inputs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                         nn.Linear(392, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 3, 7, 7, generator=g) for _ in range(3)]


def test_gram_bytes_and_the_widest_input_that_fits_agree() -> None:
    for columns in (1, 100, 392, 25_088):
        need = memory.gram_bytes(columns)
        assert need == memory.GRAM_COPIES * 8 * columns**2
        assert memory.max_gram_columns(need) == columns
        assert memory.max_gram_columns(need - 1) == columns - 1
    assert memory.max_gram_columns(None) is None
    assert memory.max_gram_columns(0) == 0


def test_meminfo_is_read_in_bytes(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683784 kB\nMemFree:  100 kB\nMemAvailable:   23764464 kB\n")
    assert memory._meminfo_available(meminfo) == 23764464 * 1024
    meminfo.write_text("MemTotal: 1 kB\n")
    assert memory._meminfo_available(meminfo) is None
    assert memory._meminfo_available(tmp_path / "absent") is None
    assert (memory.available_bytes("cpu") or 1) > 0


def _linear_inputs(model: nn.Sequential, batches: list[torch.Tensor]) -> torch.Tensor:
    """What the wide Linear (``model[4]``) reads, every calibration row, from a hook of our own."""
    seen: list[torch.Tensor] = []
    handle = model[4].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().double()))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return torch.cat(seen)


def test_collect_keeps_only_the_diagonal_of_a_too_wide_input_and_the_others_grams() -> None:
    model, batches = _wide_model(), _batches()
    full = collect(model, batches, ["0", "4", "6"])
    capped = collect(model, batches, ["0", "4", "6"], max_columns=100)
    wide = capped["4"]
    assert wide.too_wide and wide.gram is None and wide.columns == 392 and wide.max_columns == 100
    assert wide.rows == full["4"].rows == 48
    assert wide.squares is not None and full["4"].squares is None
    torch.testing.assert_close(wide.squares, _linear_inputs(model, batches).pow(2).sum(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(wide.squares, full["4"].gram.diagonal(), rtol=1e-5, atol=0)
    for name in ("0", "6"):  # 27 and 16 columns: under the cap, the same Grams
        assert not capped[name].too_wide
        assert torch.equal(capped[name].gram, full[name].gram)


@pytest.mark.parametrize("sequential", [True, False])
def test_a_consumer_too_wide_for_memory_is_pruned_without_refit_within_budget(
        monkeypatch: pytest.MonkeyPatch, sequential: bool) -> None:
    model, batches = _wide_model(), _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(oneshot, "available_bytes", lambda device: memory.gram_bytes(100))
    result = oneshot.prune(model, batches, Budget(flops=0.5), progress=False, error_curve=False,
                           sequential=sequential)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    dense, counted = dense_counts(model, batches[0]), dense_counts(result.model, batches[0])
    assert counted.flops <= 0.5 * dense.flops
    assert result.report.total("flops").achieved == counted.flops
    (note,) = [n for n in result.report.notes if n.startswith("memory:")]
    assert "1 consumer input(s) too wide" in note and "(4)" in note
    groups = {g.name: g for g in result.report.groups}
    conv = next(g for name, g in groups.items() if g.total == 8)  # the conv's channels, read by the wide Linear
    assert "not refit, too wide for the memory: 4 (392 input columns" in conv.note and "100 columns fit" in conv.note
    assert conv.solver == "diagonal" and "error curve from the Gram's diagonal" in conv.note
    # the channels kept carry the most output energy through the wide Linear, inputs taken as uncorrelated
    energy = (model[4].weight.detach().double().pow(2).sum(0) * _linear_inputs(model, batches).pow(2).sum(0))
    energy = energy.reshape(8, 49).sum(1)
    assert 0 < conv.kept < 8
    assert sorted(result.plan.keep[conv.name]) == sorted(torch.topk(energy, conv.kept).indices.tolist())
    dropped = 1 - float(energy[result.plan.keep[conv.name]].sum() / energy.sum())
    assert conv.relative_error == pytest.approx(dropped, rel=1e-9)
    hidden = next(g for name, g in groups.items() if g.total == 16)  # read by the last Linear: still refit
    assert "too wide" not in hidden.note
    # the wide Linear keeps its dense weights on the kept channels' columns: nothing was refit
    kept_channels = result.plan.keep.get(conv.name, list(range(8)))
    kept_hidden = result.plan.keep.get(hidden.name, list(range(16)))
    columns = torch.tensor([c * 49 + s for c in kept_channels for s in range(49)])
    assert torch.equal(result.model[4].weight, model[4].weight[kept_hidden][:, columns])
    assert not torch.equal(result.model[6].weight, model[6].weight[:, kept_hidden])  # the last Linear was refit
    with torch.no_grad():
        assert result.model(batches[0]).shape == (16, 10)


def test_unstructured_scores_a_too_wide_input_on_its_diagonal_and_refits_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = _wide_model(), _batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(weight_pruning, "available_bytes", lambda device: memory.gram_bytes(100))
    result = oneshot.prune(model, batches, Budget(sparsity=0.5), structure="unstructured", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    weights = ("0.weight", "4.weight", "6.weight")
    total = sum(model.get_parameter(w).numel() for w in weights)
    nonzeros = sum(int((result.model.get_parameter(w) != 0).sum()) for w in weights)
    assert nonzeros <= 0.5 * total and result.report.total("nonzeros").achieved == nonzeros
    (note,) = [n for n in result.report.notes if n.startswith("4: its 392 input columns")]
    assert "scored on the Gram's diagonal" in note and "not refit" in note
    layers = {g.name: g for g in result.report.groups}
    assert layers["4"].solver == "mask" and layers["6"].solver == "refit"  # the narrow ones keep their Grams
    # the wide Linear keeps its largest |W|·‖x‖ (from the raw inputs) and their dense values
    dense, pruned = model[4].weight.detach(), result.model[4].weight.detach()
    kept = pruned != 0
    scores = dense.abs().double() * _linear_inputs(model, batches).pow(2).sum(0).sqrt()
    assert kept.sum() == layers["4"].kept and 0 < layers["4"].kept < dense.numel()
    assert scores[kept].min() >= scores[~kept].max()
    assert torch.equal(pruned[kept], dense[kept])


def test_the_layer_wise_pass_drops_its_fresh_statistics_once_the_problem_has_its_copies() -> None:
    """``release`` names statistics nobody else reads (the layer-wise pass's fresh ones): they are
    dropped as soon as they are copied, and the problem is the one built without dropping them."""
    model, batches = _wide_model(), _batches()
    group = next(g for g in build(model, batches[0]).prunable_groups() if g.size == 8)
    inputs, dense_inputs = _linear_inputs(model, batches[:1]), _linear_inputs(model, batches[1:2])
    kept, fresh = GramStatistics(), GramStatistics()
    for stats in (kept, fresh):
        stats.update(inputs, dense_inputs)  # a cross term, as the layer-wise pass records one
    before, _, _ = oneshot._group_problem(model, group, {"4": kept})
    after, _, _ = oneshot._group_problem(model, group, {"4": fresh}, release=frozenset({"4"}))
    assert before is not None and after is not None
    assert fresh.gram is None and fresh.cross is None
    assert kept.gram is not None and kept.cross is not None  # not released: left as it was
    assert torch.equal(before.H, after.H) and torch.equal(before.G, after.G)
