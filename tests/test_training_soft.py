"""Soft coefficients: components found from prefixes, budgets held exactly after every step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.errors import ValidationError
from secateurs.graph.groups import Group, Member
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


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValidationError, match=r"keep: no keep fraction for component 'encoder→decoder'"):
        SoftCoefficients(_AE(), _groups(), PREFIXES, {"encoder": 0.5, "decoder": 0.5})
    with pytest.raises(ValidationError, match=r"keep: component 'decoder': fraction must be in \(0, 1\]"):
        SoftCoefficients(_AE(), _groups(), PREFIXES, {"encoder": 0.5, "encoder→decoder": 1.0, "decoder": 0.0})
    with pytest.raises(ValidationError, match=r"finalize: SoftCoefficients was never stepped"):
        SoftCoefficients(_AE(), _groups(), PREFIXES, 0.5).finalize()
