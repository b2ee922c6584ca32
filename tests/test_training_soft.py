"""Soft coefficients: components found from prefixes, budgets held exactly after every step."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from training_fixtures import check_finalized_once

from secateurs.apply import apply
from secateurs.errors import ValidationError
from secateurs.graph import build, dense_counts
from secateurs.graph.groups import Group, Member
from secateurs.training.pdp import DensitySchedule
from secateurs.training.soft import SoftCoefficients, assign_components


class _AE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.decoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _groups() -> list[Group]:
    def g(name: str, size: int, producer: str, consumer: str) -> Group:
        return Group(name, size, [Member(producer, "weight", 0, "producer"), Member(consumer, "weight", 1, "consumer")])

    return [g("enc", 16, "encoder.0", "encoder.2"), g("latent", 4, "encoder.2", "decoder.0"),
            g("dec", 16, "decoder.0", "decoder.2")]


PREFIXES = {"encoder": ["encoder"], "decoder": ["decoder"]}


def test_components_follow_prefixes_and_latent_is_its_own() -> None:
    assert assign_components(_groups(), PREFIXES) == {"enc": "encoder", "latent": "encoder→decoder", "dec": "decoder"}
    with pytest.raises(ValidationError, match=r"group 'enc' has modules outside every component prefix"):
        assign_components(_groups(), {"decoder": ["decoder"]})


def test_budgets_hold_after_every_step_and_finalize_keeps_the_largest() -> None:
    torch.manual_seed(0)
    model = _AE()
    keep = {"encoder": 0.5, "encoder→decoder": 0.5, "decoder": 0.25}
    soft = SoftCoefficients(model, _groups(), PREFIXES, keep, lr=0.05)
    X = torch.randn(64, 8)
    opt = torch.optim.Adam(soft.model.parameters(), 1e-2)
    for _ in range(15):
        loss = ((soft.model(X) - X) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        soft.step()
        for component, spent in soft.spent().items():
            assert spent == pytest.approx(soft.units_kept(component), abs=1e-4)
        assert all(float(s.detach().min()) >= 0 and float(s.detach().max()) <= 1 for s in soft.coefficients.values())
    coefficients = {g: s.detach().clone() for g, s in soft.coefficients.items()}
    kept = soft.finalize().keep
    assert len(kept["enc"]) == 8 and len(kept["latent"]) == 2 and len(kept["dec"]) == 4
    for g, units in kept.items():  # nothing dropped scores above anything kept (one group per component)
        dropped = [u for u in range(coefficients[g].numel()) if u not in units]
        assert float(coefficients[g][units].min()) >= float(coefficients[g][dropped].max())
    assert not any("parametrizations" in k for k in soft.model.state_dict())
    assert not any("parametrizations" in k for k in model.state_dict())


def _fit(soft: SoftCoefficients, steps: int, weights: bool = True) -> None:
    torch.manual_seed(0)
    X = torch.randn(64, 8)
    opt = torch.optim.Adam(soft.model.parameters(), 1e-2)
    for _ in range(steps):
        loss = ((soft.model(X) - X) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if weights:
            opt.step()
        soft.step()


def test_a_model_flops_budget_is_met_exactly_and_optimally() -> None:
    torch.manual_seed(0)
    model = _AE()
    x = torch.randn(2, 8)
    graph = build(model, (x,))
    soft = SoftCoefficients(model, graph.prunable_groups(), PREFIXES, cost_model=graph.cost_model, budget={"flops": 0.4},
                            lr=0.05, flatten=0.2, schedule=DensitySchedule(0, 10))
    _fit(soft, 20, weights=False)
    coefficients = {g: s.detach().clone() for g, s in soft.coefficients.items()}
    plan = soft.finalize()
    small = apply(soft.model, plan)
    assert dense_counts(small, (x,)).flops <= 0.4 * dense_counts(model, (x,)).flops  # counted, not modelled
    sizes = {g: c.numel() for g, c in coefficients.items()}
    best = max(sum(float(torch.sort(coefficients[g], descending=True).values[:k].sum()) for g, k in zip(sizes, ks, strict=True))
               for ks in itertools.product(*(range(1, n + 1) for n in sizes.values()))
               if graph.cost(dict(zip(sizes, ks, strict=True))).flops <= 0.4 * graph.cost().flops)
    kept = {g: plan.keep.get(g, list(range(n))) for g, n in sizes.items()}
    assert sum(float(coefficients[g][u].sum()) for g, u in kept.items()) == pytest.approx(best, rel=1e-6)


def test_finalize_folds_the_kept_coefficients() -> None:
    torch.manual_seed(0)
    model = _AE()
    groups = build(model, (torch.randn(2, 8),)).prunable_groups()  # with the biases apply must slice
    soft = SoftCoefficients(model, groups, PREFIXES, 0.5, lr=0.05)
    _fit(soft, 5)
    x = torch.randn(3, 8)
    keep = soft.keep()
    with torch.no_grad():  # the soft model with every dropped coefficient zeroed, by hand
        zeroed = {}
        for g, s in soft.coefficients.items():
            z = torch.zeros_like(s)
            z[keep[g]] = s.detach()[keep[g]]
            zeroed[g] = z
        soft.scales.set(zeroed)
        expected = soft.model(x)
        soft.scales.set(soft.coefficients)
    plan = soft.finalize()
    torch.testing.assert_close(apply(soft.model, plan)(x), expected)


def test_unit_and_model_budgets_together_and_the_ramp() -> None:
    torch.manual_seed(0)
    model = _AE()
    graph = build(model, (torch.randn(2, 8),))
    names = {g.name: g for g in graph.prunable_groups()}
    soft = SoftCoefficients(model, names.values(), PREFIXES, 0.5, cost_model=graph.cost_model, budget={"params": 0.6},
                            schedule=DensitySchedule(0, 4))
    assert soft.units_now("encoder") == pytest.approx(16 - 0.25 * 8)  # ramping from 16 to 8 units
    _fit(soft, 6)
    for c, spent in soft.spent().items():
        assert spent <= soft.units_kept(c) + 1e-4
    plan = soft.finalize()
    counts = {g: plan.kept_counts().get(g, n.size) for g, n in names.items()}
    assert graph.cost(counts).params <= 0.6 * graph.cost().params
    for c in soft.components():
        assert sum(counts[g] for g in soft.members(c)) <= soft.units_kept(c)


def test_default_component_is_the_whole_model() -> None:
    soft = SoftCoefficients(_AE(), _groups(), keep=0.5)
    assert soft.components() == ["model"] and soft.units_kept("model") == 18


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValidationError, match=r"keep: give per-component keep fractions"):
        SoftCoefficients(_AE(), _groups(), PREFIXES)
    with pytest.raises(ValidationError, match=r"keep: unknown component 'latent'"):
        SoftCoefficients(_AE(), _groups(), PREFIXES, {"encoder": 0.5, "encoder→decoder": 0.5, "decoder": 0.5, "latent": 1})
    with pytest.raises(ValidationError, match=r"cost_model: a flops/params budget needs"):
        SoftCoefficients(_AE(), _groups(), PREFIXES, budget={"flops": 0.5})
    check_finalized_once(SoftCoefficients(_AE(), _groups(), PREFIXES, 0.5), "SoftCoefficients")
    with pytest.raises(ValidationError, match=r"keep: no keep fraction for component 'encoder→decoder'"):
        SoftCoefficients(_AE(), _groups(), PREFIXES, {"encoder": 0.5, "decoder": 0.5})
    with pytest.raises(ValidationError, match=r"keep: component 'decoder': fraction must be in \(0, 1\]"):
        SoftCoefficients(_AE(), _groups(), PREFIXES, {"encoder": 0.5, "encoder→decoder": 1.0, "decoder": 0.0})
    with pytest.raises(ValidationError, match=r"finalize: SoftCoefficients was never stepped"):
        SoftCoefficients(_AE(), _groups(), PREFIXES, 0.5).finalize()
