"""``prune(channel_multiple=m)``: every pruned layer keeps a multiple of m channels (or all of them).

Kernels run channels in blocks of the vector width, so a width off the block buys no speed; the
option restricts the allocation's keep levels. Checked on the sliced model's own layer widths
(not the plan's bookkeeping), with budgets counted on the sliced model.
"""

from __future__ import annotations

import pytest
import torch

from secateurs.budget import Budget
from secateurs.errors import InfeasibleBudgetError, ValidationError
from secateurs.graph import build, dense_counts
from secateurs.graph.groups import keep_levels, unit_multiple
from secateurs.models import zoo
from secateurs.models.reference import REFERENCE_MODELS
from secateurs.oneshot import prune
from secateurs.solvers.reconstruction_greedy import greedy_path
from secateurs.testing import random_reconstruction


@pytest.fixture(scope="module")
def cnn() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model, info = zoo.load("mnist1d_cnn")
    return model, info.calibration(256, 64)


def _widths(model: torch.nn.Module) -> list[int]:
    """Output channels / features of every conv and linear layer but the classifier."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear))]
    return [m.out_channels if isinstance(m, torch.nn.Conv1d) else m.out_features for m in layers[:-1]]


@pytest.mark.parametrize("multiple", [8, 16])
def test_pruned_layers_keep_multiples_of_the_channel_multiple(cnn, multiple: int) -> None:
    model, calibration = cnn
    result = prune(model, calibration, Budget(flops=0.5), progress=False, error_curve=False, channel_multiple=multiple)
    dense_widths, widths = _widths(model), _widths(result.model)
    assert widths != dense_widths  # something was pruned
    for dense_width, width in zip(dense_widths, widths, strict=True):
        assert width % multiple == 0 or width == dense_width
    counted, dense = dense_counts(result.model, calibration[0]), dense_counts(model, calibration[0])
    assert counted.flops <= 0.5 * dense.flops and result.report.total("flops").achieved == counted.flops
    assert result.plan.meta["channel_multiple"] == multiple


def test_a_budget_below_the_least_multiple_names_it(cnn) -> None:
    model, calibration = cnn
    graph = build(model, calibration[0])
    least = graph.cost({g.name: 16 for g in graph.prunable_groups()}).flops  # every group at 16 channels
    with pytest.raises(InfeasibleBudgetError, match="least multiple of 16 channels") as info:
        prune(model, calibration, Budget(flops=0.9 * least / graph.cost().flops), progress=False,
              error_curve=False, channel_multiple=16)
    assert info.value.least == pytest.approx(least)
    prune(model, calibration, Budget(flops=1.01 * least / graph.cost().flops), progress=False,
          error_curve=False, channel_multiple=16)  # just above it is feasible


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_auto_is_the_cpus_vector_width(cnn, monkeypatch: pytest.MonkeyPatch, capability: str) -> None:
    """``"auto"`` gives the plan of the explicit multiple the CPU's lanes make, and says so."""
    model, calibration = cnn
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    lanes = {"AVX512": 16, "AVX2": 8}[capability]
    auto = prune(model, calibration, Budget(flops=0.5), progress=False, error_curve=False, channel_multiple="auto")
    explicit = prune(model, calibration, Budget(flops=0.5), progress=False, error_curve=False, channel_multiple=lanes)
    assert auto.plan.keep == explicit.plan.keep and auto.plan.meta["channel_multiple"] == lanes
    assert all(w % lanes == 0 or w == d for w, d in zip(_widths(auto.model), _widths(model), strict=True))
    assert any(f"multiples of {lanes} channels, the kernel block of the {capability} CPU" in n for n in auto.report.notes)
    assert not any("channel_multiple='auto'" in n for n in explicit.report.notes)


def test_an_infeasible_multiple_says_how_to_allow_any_width(cnn) -> None:
    model, calibration = cnn
    with pytest.raises(InfeasibleBudgetError, match=r"channel_multiple=1 \(--channel-multiple 1\) allows any width"):
        prune(model, calibration, Budget(flops=0.01), progress=False, error_curve=False, channel_multiple=16)


@pytest.mark.parametrize("bad", [0, -8, 2.5, True])
def test_channel_multiple_is_checked(cnn, bad: object) -> None:
    model, calibration = cnn
    with pytest.raises(ValidationError, match="channel_multiple: must be an integer >= 1"):
        prune(model, calibration, Budget(flops=0.5), channel_multiple=bad)  # type: ignore[arg-type]


def test_wide_units_count_their_channels() -> None:
    """Attention heads of head_dim channels: any head count is a multiple of 8 channels when 8 | head_dim."""
    ref = REFERENCE_MODELS["gpt"]
    graph = build(ref.build(), ref.example_inputs())
    heads = [g for g in graph.prunable_groups() if g.unit_width > 1]
    assert heads, "the gpt reference model has head groups"
    for g in heads:
        assert unit_multiple(g, g.unit_width) == 1 and keep_levels(g, g.unit_width) == list(range(1, g.size + 1))
        assert unit_multiple(g, 2 * g.unit_width) == 2
    channels = next(g for g in graph.prunable_groups() if g.unit_width == 1)
    assert keep_levels(channels, 4) == sorted({*range(4, channels.size + 1, 4), channels.size})


def test_greedy_path_first_step_aligns_later_levels() -> None:
    problem = random_reconstruction(21, units=11, keep=3, inputs=2, correlated=True)
    path = greedy_path(problem, step=4, stop=4, first_step=11 % 4)
    assert [k for k, _, _ in path] == [11, 8, 4]
    for k, support, value in path:
        assert len(support) == k and value == pytest.approx(problem.evaluate(support), abs=1e-8 * problem.constant)
    with pytest.raises(ValueError, match="first_step must be in 1..4"):
        greedy_path(problem, step=4, first_step=5)
