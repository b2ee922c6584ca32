"""PDP: no new parameters, thresholds at the density's order statistic, exact hard densities."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from training_fixtures import check_finalized_once

from secateurs.apply import apply
from secateurs.errors import ValidationError
from secateurs.training.pdp import PDP, DensitySchedule


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 4))


def _train(pdp: PDP, steps: int) -> None:
    torch.manual_seed(1)
    X = torch.randn(128, 16)
    y = X[:, :4].argmax(1)
    opt = torch.optim.SGD(pdp.model.parameters(), lr=0.1)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(pdp.model(X), y) + pdp.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        pdp.step()


def test_adds_no_trainable_parameters_and_leaves_the_input_alone() -> None:
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pdp = PDP(model, 0.3)
    assert pdp.model is not model
    n_before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pdp.model.parameters()) == n_before
    assert len(list(pdp.model.parameters())) == len(list(model.parameters()))
    _train(pdp, 5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("parametrizations" in k for k in model.state_dict())


@given(st.floats(0.05, 0.95), st.integers(0, 3))
def test_hard_density_is_exactly_the_target(density: float, seed: int) -> None:
    pdp = PDP(_mlp(seed), density, schedule=DensitySchedule(warmup=2, ramp=3))
    _train(pdp, 6)
    plan = pdp.finalize()
    masks = pdp.masks
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == round(density * total)
    for name, mask in masks.items():  # the model's weights carry exactly the hard mask
        weight = pdp.model.get_submodule(name).weight
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))
        assert "parametrizations" not in dict(pdp.model.get_submodule(name).named_modules())
        torch.testing.assert_close(plan.refit[f"{name}.weight"], weight.detach())


def test_soft_mask_threshold_sits_between_kept_and_pruned() -> None:
    pdp = PDP(_mlp(), 0.25, schedule=DensitySchedule(warmup=0, ramp=4))
    _train(pdp, 2)
    for name in pdp.layers:
        weight = pdp._raw(name).detach()
        soft = pdp.mask(name, weight)
        keep = round(pdp.current_density(name) * weight.numel())
        top = torch.topk((weight**2).reshape(-1), keep).indices
        above = torch.zeros(weight.numel(), dtype=torch.bool)
        above[top] = True
        assert torch.equal(soft.reshape(-1) > 0.5, above)  # σ > ½ exactly on the top-K scores


def test_mask_is_differentiable_in_the_weights_and_hard_after_the_ramp() -> None:
    pdp = PDP(nn.Sequential(nn.Linear(8, 4)), 0.5, tau=0.1, tau_final=0.01, schedule=DensitySchedule(warmup=0, ramp=3))
    w = pdp._raw("0").detach().clone().requires_grad_(True)
    pdp.steps = 1  # mid-ramp: progress 2/3, density 1 − (2/3)·0.5, τ geometric between 0.1 and 0.01
    tau = 0.1 * (0.01 / 0.1) ** (2 / 3)
    assert pdp.current_tau() == pytest.approx(tau)
    keep = round(pdp.current_density("0") * 32)
    (pdp.mask("0", w) * w).sum().backward()
    # By hand: m = σ((w² − t²)/(τt²)), t² the midpoint of the keep-th and (keep+1)-th w²;
    # d(m·w)/dw = m + w·m(1 − m)·2w/(τt²) (t² is an order statistic, held fixed).
    s2 = w.detach() ** 2
    top = torch.sort(s2.reshape(-1), descending=True).values
    t2 = 0.5 * (top[keep - 1] + top[keep])
    m = torch.sigmoid((s2 - t2) / (tau * t2))
    torch.testing.assert_close(w.grad, m + w.detach() * m * (1 - m) * 2 * w.detach() / (tau * t2))
    pdp.steps = 3  # the ramp is over: the mask is the exact top-K, 0/1
    hard = pdp.mask("0", w.detach())
    assert torch.all((hard == 0) | (hard == 1)) and int(hard.sum()) == pdp.keep_counts["0"] == 16
    assert set(torch.nonzero(hard.reshape(-1)).reshape(-1).tolist()) == set(torch.topk(s2.reshape(-1), 16).indices.tolist())


def test_the_plan_is_the_trained_model() -> None:
    pdp = PDP(_mlp(), 0.3, schedule=DensitySchedule(warmup=1, ramp=3))
    _train(pdp, 6)
    x = torch.randn(7, 16)
    with torch.no_grad():
        trained = pdp.model(x)  # after the ramp the forward already uses the hard masks
    plan = pdp.finalize()
    torch.testing.assert_close(apply(pdp.model, plan, mode="mask")(x), trained)
    torch.testing.assert_close(pdp.model(x), trained)


def test_schedule_ramps_from_dense() -> None:
    pdp = PDP(_mlp(), 0.2, schedule=DensitySchedule(warmup=3, ramp=4))
    densities = []
    for _ in range(8):
        densities.append(pdp.current_density("0"))
        pdp.step()
    assert densities[:3] == [1.0, 1.0, 1.0]
    assert all(a >= b for a, b in zip(densities, densities[1:], strict=False))
    assert densities[-1] == pytest.approx(pdp.final_density["0"])


def test_n_m_pattern_is_exact_in_every_block() -> None:
    pdp = PDP(_mlp(), structure="n:m", n=2, m=4, schedule=DensitySchedule(warmup=1, ramp=2))
    _train(pdp, 4)
    pdp.finalize()
    for mask in pdp.masks.values():
        per_block = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert torch.all(per_block == 2)


def test_n_m_leaves_incompatible_layers_dense_by_default() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    pdp = PDP(model, structure="n:m", schedule=DensitySchedule(warmup=0, ramp=1))
    assert list(pdp.layers) == ["2"] and pdp.skipped == {"0": "6 inputs per output are not a multiple of M=4"}
    pdp.step()
    pdp.finalize()
    assert torch.equal(pdp.model[0].weight, model[0].weight)  # left dense and untouched
    assert torch.all((pdp.model[2].weight != 0).reshape(4, -1, 4).sum(-1) == 2)


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValidationError, match=r"density: must be in \(0, 1\]"):
        PDP(_mlp(), 1.5)
    with pytest.raises(ValidationError, match=r"density: an 2:4 pattern keeps exactly 0.5"):
        PDP(_mlp(), 0.3, structure="n:m")
    with pytest.raises(ValidationError, match=r"modules: module '0': 6 inputs per output are not a multiple of M=4"):
        PDP(nn.Sequential(nn.Linear(6, 4)), structure="n:m", modules=["0"])
    with pytest.raises(ValidationError, match=r"model: no Linear or Conv weights to prune \(skipped '0': 6 inputs"):
        PDP(nn.Sequential(nn.Linear(6, 4)), structure="n:m")
    with pytest.raises(ValidationError, match=r"modules: no module 'nope'"):
        PDP(_mlp(), 0.5, modules=["nope"])
    with pytest.raises(ValidationError, match=r"finalize: PDP was never stepped"):
        PDP(_mlp(), 0.5).finalize()
    check_finalized_once(PDP(_mlp(), 0.5), "PDP")
