"""Every reference model, with hypothesis choosing which units of which groups to remove.

For each drawn plan: slice and mask agree (unless a LayerNorm/GroupNorm normalises over a pruned
dim: its statistics then legitimately differ), the sliced model runs forward and backward, the
graph's cost equals the parameters and FlopCounterMode FLOPs counted on the sliced model, the
input model is bit-identical afterwards, and save/load reproduces the outputs exactly.
"""

from __future__ import annotations

import functools
import tempfile
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from secateurs.apply import apply
from secateurs.graph import DependencyGraph, build
from secateurs.graph.groups import Group
from secateurs.io import load, load_plan, save
from secateurs.models.reference import REFERENCE_MODELS
from secateurs.plan import PrunePlan

NAMES = sorted(REFERENCE_MODELS)


@functools.cache
def subject(name: str) -> tuple[nn.Module, Any, DependencyGraph, dict[str, torch.Tensor]]:
    """Model, inputs, graph and a snapshot of the state dict, built once per model."""
    ref = REFERENCE_MODELS[name]
    model = ref.build(seed=0)
    x = ref.example_inputs()
    graph = build(model, x)
    return model, x, graph, {k: v.clone() for k, v in model.state_dict().items()}


def args(x: Any) -> tuple[Any, ...]:
    return x if isinstance(x, tuple) else (x,)


def outputs(y: Any) -> tuple[torch.Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


def run(model: nn.Module, x: Any) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return outputs(model(*args(x)))


def normalises_pruned_dim(model: nn.Module, group: Group) -> bool:
    """A LayerNorm/GroupNorm member: its mean/variance run over the units being removed."""
    return any(isinstance(model.get_submodule(m.module) if m.module else model, (nn.LayerNorm, nn.GroupNorm))
               for m in group.members)


def counted(model: nn.Module, x: Any) -> tuple[int, int]:
    """Unique parameters and FlopCounterMode FLOPs (grad enabled: attention's regular path)."""
    params = sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once
    with FlopCounterMode(display=False) as fc:
        model(*args(x))
    return params, fc.get_total_flops()


@st.composite
def keeps(draw: st.DrawFn, graph: DependencyGraph) -> dict[str, list[int]]:
    """Kept units for a random subset of the prunable groups (at least one group, one unit each)."""
    groups = graph.prunable_groups()
    chosen = draw(st.lists(st.sampled_from(groups), min_size=1, max_size=len(groups), unique_by=lambda g: g.name))
    out = {}
    for g in chosen:
        kept = draw(st.lists(st.integers(0, g.size - 1), min_size=1, max_size=g.size, unique=True))
        out[g.name] = sorted(kept)
    return out


def test_every_reference_model_has_prunable_groups() -> None:
    for name in NAMES:
        graph = subject(name)[2]
        assert graph.prunable_groups(), name


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_slice_mask_cost_and_io(name: str, data: st.DataObject) -> None:
    model, x, graph, snap = subject(name)
    keep = data.draw(keeps(graph), label="keep")
    plan = PrunePlan.from_graph(graph, keep, meta={"model": name})
    sliced = apply(model, plan, graph=graph)
    masked = apply(model, plan, mode="mask")

    # the input model is bit-identical
    state = model.state_dict()
    assert state.keys() == snap.keys()
    assert all(torch.equal(state[k], snap[k]) for k in snap)

    # slice == mask where no norm's statistics see the removed units
    a, b = run(sliced, x), run(masked, x)
    exact = not any(normalises_pruned_dim(model, graph.group(n)) and len(k) < graph.group(n).size
                    for n, k in keep.items())
    for u, v in zip(a, b, strict=True):
        assert u.shape == v.shape
        if exact:
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5 * max(1.0, v.abs().max().item()))

    # the exact cost model against an independent count on the sliced model
    cost = graph.cost(plan.kept_counts())
    params, flops = counted(sliced, x)
    assert (cost.params, cost.flops) == (params, flops), f"{name} keep={plan.kept_counts()}"

    # save/load reproduces outputs exactly, and the plan
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp, sliced, plan)
        loaded = load(tmp, lambda: REFERENCE_MODELS[name].build(seed=1))
        assert load_plan(tmp).keep == plan.keep
    loaded.eval()
    for u, v in zip(run(loaded, x), a, strict=True):
        assert torch.equal(u, v)
    assert repr(loaded) == repr(sliced)

    # forward and backward in training mode (last: it updates BatchNorm statistics)
    sliced.train()
    loss = sum(y.float().square().mean() for y in outputs(sliced(*args(x))))
    loss.backward()
    for pname, p in sliced.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, pname
