"""Helpers for the graph tests: an independent slicer built only on ``Member.indices``.

A group's removed units are cut from every parameter its members name; the consumers' columns
of removed units are first zeroed in the wide model, so the wide and the sliced narrow model must
compute the same function. That checks every Member's indices, not only their counts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from secateurs.graph import DependencyGraph, build, dense_counts


def removed_indices(graph: DependencyGraph, removed: dict[str, list[int]]) -> dict[tuple[str, str, int], set[int]]:
    out: dict[tuple[str, str, int], set[int]] = {}
    for name, units in removed.items():
        for m in graph.group(name).members:
            out.setdefault((m.module, m.param, m.dim), set()).update(m.indices(units))
    return out


def slice_state(model: nn.Module, graph: DependencyGraph, removed: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    rm = removed_indices(graph, removed)
    out = {}
    for key, t in model.state_dict().items():
        mod, _, p = key.rpartition(".")
        for d in range(t.dim()):
            gone = rm.get((mod, p, d))
            if gone:
                keep = torch.tensor([i for i in range(t.shape[d]) if i not in gone], dtype=torch.long)
                t = t.index_select(d, keep)
        out[key] = t
    return out


def zero_consumers(model: nn.Module, graph: DependencyGraph, removed: dict[str, list[int]]) -> nn.Module:
    z = copy.deepcopy(model)
    with torch.no_grad():
        for name, units in removed.items():
            for m in graph.group(name).consumers():
                t = z.get_submodule(m.module).get_parameter(m.param) if m.module else z.get_parameter(m.param)
                t.index_fill_(m.dim, torch.tensor(m.indices(units), dtype=torch.long), 0.0)
    return z


def check_slice(make: Callable[..., nn.Module], wide: dict[str, Any], narrow: dict[str, Any], x: Any,
                removed: dict[str, list[int]]) -> DependencyGraph:
    """Wide model with ``removed`` units cut == narrow model (outputs, params, FLOPs)."""
    torch.manual_seed(0)
    model = make(**wide).eval()
    graph = build(model, x)
    zeroed = zero_consumers(model, graph, removed)
    small = make(**narrow).eval()
    small.load_state_dict(slice_state(zeroed, graph, removed))
    args = x if isinstance(x, tuple) else (x,)
    with torch.no_grad():
        a, b = zeroed(*args), small(*args)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
    keep = {n: graph.group(n).size - len(u) for n, u in removed.items()}
    assert graph.cost(keep) == dense_counts(small, x)
    return graph


def test_removed_indices_union_members() -> None:
    lin = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    g = build(lin, torch.randn(2, 3))
    rm = removed_indices(g, {"0:out": [1, 3]})
    assert rm[("0", "weight", 0)] == {1, 3}
    assert rm[("2", "weight", 1)] == {1, 3}
    assert rm[("0", "bias", 0)] == {1, 3}
