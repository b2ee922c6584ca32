"""``channel_multiple`` in the training-aware methods: final plans keep multiples of it, within the budget.

Each method is run briefly on the shared two-layer MLP (two 16-unit groups) with a multiple of 4,
and its plan is checked against the counts themselves, the exact cost model, and (for the
budgeted complexity-aware gates) a brute force over every pair of aligned keep counts.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from training_fixtures import two_layer_mlp

from secateurs.errors import ValidationError
from secateurs.training.complexity import ComplexityAware
from secateurs.training.pdp import DensitySchedule
from secateurs.training.pdp_channels import ChannelPDP
from secateurs.training.soft import SoftCoefficients

MULTIPLE = 4


def _fit(method, steps: int, penalty: bool = False) -> None:  # noqa: ANN001 - any of the three methods
    torch.manual_seed(1)
    X = torch.randn(256, 6)
    y = X[:, :3].argmax(1)
    opt = torch.optim.Adam(method.model.parameters(), 1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(method.model(X), y) + (method.penalty() if penalty else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step()


def _aligned(counts: dict[str, int]) -> bool:
    return all(k % MULTIPLE == 0 or k == 16 for k in counts.values())


def test_complexity_aware_budget_keeps_the_best_aligned_counts() -> None:
    model, groups, cost = two_layer_mlp()
    ca = ComplexityAware(model, groups, cost, budget={"flops": 0.3}, lr=0.1, channel_multiple=MULTIPLE)
    _fit(ca, 40, penalty=True)
    live = {g: ca._live(g) for g in ca.theta}  # units that died in training never come back
    theta = {g: t.detach().clone() for g, t in ca.theta.items()}
    plan = ca.finalize()
    counts = {g: len(plan.keep.get(g, range(16))) for g in theta}
    assert _aligned(counts) and cost(counts).flops <= 0.3 * cost().flops
    # Brute force over every pair of aligned counts the live units allow, the most probable first.
    best = max(sum(float(torch.sort(theta[g][live[g]], descending=True).values[:k].sum())
                   for g, k in zip(theta, ks, strict=True))
               for ks in itertools.product(*(range(MULTIPLE, live[g].numel() + 1, MULTIPLE) for g in theta))
               if cost(dict(zip(theta, ks, strict=True))).flops <= 0.3 * cost().flops)
    kept = {g: plan.keep.get(g, list(range(16))) for g in theta}
    assert sum(float(theta[g][units].sum()) for g, units in kept.items()) == pytest.approx(best, rel=1e-9)


def test_complexity_aware_penalty_rounds_counts_to_the_multiple() -> None:
    counts = {}
    for multiple in (1, MULTIPLE):  # the same training (seeded), with and without the multiple
        model, groups, cost = two_layer_mlp()
        ca = ComplexityAware(model, groups, cost, strength=0.5, lr=0.05, channel_multiple=multiple)
        _fit(ca, 20, penalty=True)
        plan = ca.finalize()
        counts[multiple] = {g: len(plan.keep.get(g, range(16))) for g in ("h1", "h2")}
    assert _aligned(counts[MULTIPLE]) and not _aligned(counts[1])  # the gates alone left an odd count
    assert all(abs(counts[MULTIPLE][g] - counts[1][g]) < MULTIPLE for g in ("h1", "h2"))  # within one multiple


@pytest.mark.parametrize("kwargs", [{"density": 0.3}, {"budget": {"flops": 0.3}}])
def test_channel_pdp_counts_are_multiples(kwargs: dict) -> None:
    model, groups, cost = two_layer_mlp()
    pdp = ChannelPDP(model, groups, cost_model=cost, schedule=DensitySchedule(warmup=0, ramp=4),
                     channel_multiple=MULTIPLE, **kwargs)
    _fit(pdp, 6)
    plan = pdp.finalize()
    counts = {g: len(plan.keep.get(g, range(16))) for g in ("h1", "h2")}
    assert _aligned(counts) and counts == pdp.keep_counts
    if "budget" in kwargs:
        assert cost(counts).flops <= 0.3 * cost().flops
    else:
        assert counts == {"h1": 4, "h2": 4}  # 0.3 x 16 = 4.8 -> the nearest multiple of 4


def test_soft_coefficients_budget_keeps_multiples() -> None:
    model, groups, cost = two_layer_mlp()
    soft = SoftCoefficients(model, groups, cost_model=cost, budget={"flops": 0.3}, lr=0.05,
                            channel_multiple=MULTIPLE)
    _fit(soft, 10)
    plan = soft.finalize()
    counts = {g: len(plan.keep.get(g, range(16))) for g in ("h1", "h2")}
    assert _aligned(counts) and cost(counts).flops <= 0.3 * cost().flops


@pytest.mark.parametrize("make", [
    lambda m, g, c: ComplexityAware(m, g, c, channel_multiple=0),
    lambda m, g, c: ChannelPDP(m, g, density=0.5, channel_multiple=2.0),
    lambda m, g, c: SoftCoefficients(m, g, keep=0.5, channel_multiple=-4),
])
def test_a_bad_channel_multiple_is_named(make) -> None:  # noqa: ANN001
    model, groups, cost = two_layer_mlp()
    with pytest.raises(ValidationError, match="channel_multiple: must be an integer >= 1"):
        make(model, groups, cost)


@pytest.mark.parametrize("make", [
    lambda m, g, c: ComplexityAware(m, g, c, channel_multiple="auto"),
    lambda m, g, c: ChannelPDP(m, g, density=0.5, channel_multiple="auto"),
    lambda m, g, c: SoftCoefficients(m, g, keep=0.5, channel_multiple="auto"),
])
def test_auto_reads_the_multiple_off_the_models_device(make, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    model, groups, cost = two_layer_mlp()
    assert make(model, groups, cost).multiples == {"h1": 8, "h2": 8}  # 16-unit groups on an 8-lane CPU
