"""Channel PDP: masks from producer norms, exact keep counts or budgets, no new parameters."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from training_fixtures import check_finalized_once, two_layer_mlp

from secateurs.apply import apply
from secateurs.cost import CostModel
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


def _chain() -> tuple[nn.Module, list[Group], CostModel]:
    """Two chained groups of 12 and 10 units (the shared MLP, narrower)."""
    return two_layer_mlp(12, 10)


def _train(pdp: ChannelPDP, steps: int, inputs: int = 6) -> None:
    torch.manual_seed(1)
    X = torch.randn(64, inputs)
    y = X[:, :3].argmax(1)
    opt = torch.optim.SGD(pdp.model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(pdp.model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pdp.step()


def test_scores_are_producer_norms_and_threshold_splits_top_k() -> None:
    model, groups = _setup()
    pdp = ChannelPDP(model, groups, 0.5, schedule=DensitySchedule(warmup=0, ramp=4))
    pdp.step()
    layer = pdp.model[0]
    expected = layer.weight.detach().pow(2).sum(1) + layer.bias.detach().pow(2)
    torch.testing.assert_close(pdp.scores("h").detach(), expected)
    keep = pdp.current_keep("h")
    assert keep == round(12 - 2 / 4 * 6)  # halfway along the ramp from 12 to 6 units
    mask = pdp.mask("h").detach()
    top = set(torch.topk(expected, keep).indices.tolist())
    assert {i for i in range(12) if mask[i] > 0.5} == top
    assert pdp.current_tau() == pytest.approx(0.05 * (0.002 / 0.05) ** 0.5)  # geometric from τ to τ_final


def test_training_keeps_exact_counts_and_adds_no_parameters() -> None:
    model, groups = _setup()
    pdp = ChannelPDP(model, groups, 0.25, schedule=DensitySchedule(warmup=2, ramp=5))
    assert len(list(pdp.model.parameters())) == len(list(model.parameters()))
    _train(pdp, 10)
    keep = pdp.finalize().keep
    assert len(keep["h"]) == 3 and keep["h"] == sorted(set(keep["h"]))
    assert not any("parametrizations" in k for k in pdp.model.state_dict())
    assert not pdp.model._forward_pre_hooks


def test_chained_groups_train_and_meet_a_flops_budget_exactly() -> None:
    model, groups, cost = _chain()
    pdp = ChannelPDP(model, groups, cost_model=cost, budget={"flops": 0.4}, schedule=DensitySchedule(warmup=0, ramp=4))
    counts = pdp.keep_counts
    assert cost(counts).flops <= 0.4 * cost().flops
    # The counts retain the most share of each group's score mass within the budget (brute force).
    shares = {g: torch.sort(pdp.scores(g).detach() / pdp.scores(g).detach().sum(), descending=True).values for g in counts}
    best = max(float(shares["h1"][:a].sum() + shares["h2"][:b].sum())
               for a, b in itertools.product(range(1, 13), range(1, 11)) if cost({"h1": a, "h2": b}).flops <= 0.4 * cost().flops)
    assert float(shares["h1"][:counts["h1"]].sum() + shares["h2"][:counts["h2"]].sum()) == pytest.approx(best)
    _train(pdp, 8)  # h2's producer is gated by h1: scores must read the raw weight (this crashed before)
    for g in groups:  # after the ramp the mask is the exact top-K
        mask = pdp.mask(g.name).detach()
        top = torch.topk(pdp.scores(g.name), counts[g.name]).indices
        assert set(torch.nonzero(mask).reshape(-1).tolist()) == set(top.tolist())
        assert torch.all((mask == 0) | (mask == 1))
    x = torch.randn(5, 6)
    pdp.model.eval()
    with torch.no_grad():
        soft = pdp.model(x)
    plan = pdp.finalize()
    small = apply(pdp.model, plan).eval()
    assert sum(p.numel() for p in small.parameters()) == cost(plan.kept_counts()).params
    torch.testing.assert_close(small(x), soft)  # the plan is the network trained in the hard phase


def test_finalize_before_the_ramp_ends_folds_the_soft_masks() -> None:
    model, groups, cost = _chain()
    pdp = ChannelPDP(model, groups, 0.5, schedule=DensitySchedule(warmup=0, ramp=100))
    _train(pdp, 3)
    x = torch.randn(5, 6)
    with torch.no_grad():  # the soft model at the final keep counts, dropped units zeroed by hand
        final = {g.name: pdp.mask(g.name, pdp.keep_counts[g.name]).detach().clone() for g in groups}
        keep = {g: torch.topk(pdp.scores(g), k).indices for g, k in pdp.keep_counts.items()}
        for g, m in final.items():
            dropped = torch.ones(m.numel(), dtype=torch.bool)
            dropped[keep[g]] = False
            m[dropped] = 0.0
        pdp.scales.set(final)
        pdp._hook.remove()
        pdp.model.eval()
        expected = pdp.model(x)
        pdp._hook = pdp.model.register_forward_pre_hook(pdp._refresh)
    plan = pdp.finalize()
    torch.testing.assert_close(apply(pdp.model, plan).eval()(x), expected)


def test_errors() -> None:
    model, groups = _setup()
    with pytest.raises(ValidationError, match=r"density: must be in \(0, 1\]"):
        ChannelPDP(model, groups, 0.0)
    with pytest.raises(ValidationError, match=r"density: give exactly one of density= or budget="):
        ChannelPDP(model, groups)
    with pytest.raises(ValidationError, match=r"cost_model: a flops/params budget needs"):
        ChannelPDP(model, groups, budget={"flops": 0.5})
    with pytest.raises(ValidationError, match=r"budget: unknown budget 'latency'"):
        ChannelPDP(model, groups, budget={"latency": 0.5})
    with pytest.raises(ValidationError, match=r"group 'c' has no producer weights"):
        ChannelPDP(model, [Group("c", 3, [Member("2", "weight", 1, "consumer")])], 0.5)
    with pytest.raises(ValidationError, match=r"finalize: ChannelPDP was never stepped"):
        ChannelPDP(model, groups, 0.5).finalize()
    check_finalized_once(ChannelPDP(model, groups, 0.5), "ChannelPDP")
