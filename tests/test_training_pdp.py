"""PDP: no new parameters, thresholds at the density's order statistic, exact hard densities."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

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
    pdp = PDP(_mlp(), 0.25, schedule=DensitySchedule(warmup=0, ramp=1))
    _train(pdp, 1)
    for name in pdp.layers:
        weight = pdp._raw(name).detach()
        soft = pdp.mask(name, weight)
        keep = round(pdp.current_density(name) * weight.numel())
        top = torch.topk((weight**2).reshape(-1), keep).indices
        above = torch.zeros(weight.numel(), dtype=torch.bool)
        above[top] = True
        assert torch.equal(soft.reshape(-1) > 0.5, above)  # σ > ½ exactly on the top-K scores


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
