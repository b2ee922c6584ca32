"""Every training-aware method on every reference model: a few steps, a plan, a budget met.

The achieved FLOPs are counted on the pruned model (``dense_counts``: FlopCounterMode), never
taken from the method; the input model is never touched; no parametrisation is left behind.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from secateurs.apply import apply
from secateurs.graph import build, dense_counts
from secateurs.models.reference import REFERENCE_MODELS
from secateurs.training import PDP, ChannelPDP, ComplexityAware, DensitySchedule, SoftCoefficients


def _loss(out: Any) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return sum((o.float().pow(2).mean() for o in outs), torch.zeros(()))


def _steps(wrapper: Any, args: tuple, steps: int = 3) -> None:
    opt = torch.optim.SGD(wrapper.model.parameters(), lr=0.01)
    wrapper.model.train()
    for _ in range(steps):
        loss = _loss(wrapper.model(*args)) + wrapper.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        wrapper.step()


@pytest.mark.parametrize("method", ["pdp_channels", "complexity_aware", "soft_coefficients"])
@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_structured_methods_meet_a_flops_budget(name: str, method: str) -> None:
    ref = REFERENCE_MODELS[name]
    model = ref.build()
    inputs = ref.example_inputs()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = build(model, args)
    groups = graph.prunable_groups()
    dense = dense_counts(model, args).flops
    least = graph.cost({g.name: 1 for g in groups}).flops
    fraction = 0.6 if least <= 0.6 * dense else (least + dense) / (2 * dense)
    budget = {"flops": fraction}
    torch.manual_seed(0)
    wrapper: Any
    if method == "pdp_channels":
        wrapper = ChannelPDP(model, groups, cost_model=graph.cost_model, budget=budget, schedule=DensitySchedule(0, 2))
    elif method == "complexity_aware":
        wrapper = ComplexityAware(model, groups, graph.cost_model, budget=budget, lr=0.1, flatten=0.5)
    else:
        wrapper = SoftCoefficients(model, groups, cost_model=graph.cost_model, budget=budget, lr=0.1, flatten=0.5)
    _steps(wrapper, args)
    plan = wrapper.finalize()
    small = apply(wrapper.model, plan).eval()
    assert dense_counts(small, args).flops <= fraction * dense * (1 + 1e-9)
    assert not any("parametrizations" in k for k in wrapper.model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        small(*args)


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_pdp_hard_density_is_exact_on_every_reference_model(name: str) -> None:
    ref = REFERENCE_MODELS[name]
    inputs = ref.example_inputs()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    pdp = PDP(ref.build(), 0.3, schedule=DensitySchedule(1, 2))
    _steps(pdp, args)
    plan = pdp.finalize()
    total = sum(m.numel() for m in pdp.masks.values())
    assert sum(int(m.sum()) for m in pdp.masks.values()) == round(0.3 * total)
    assert not any(isinstance(v, nn.Parameter) for v in plan.refit.values())
    pdp.model.eval()  # dropout and batch statistics off: both forwards are deterministic
    with torch.no_grad():
        torch.testing.assert_close(_loss(apply(pdp.model, plan, mode="mask").eval()(*args)), _loss(pdp.model(*args)))
