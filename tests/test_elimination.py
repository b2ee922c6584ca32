"""Bucket elimination: exact min-sum, inside/outside tables and widths, against enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs.problems import Allocation, Budget, Latency, LatencyTerm
from secateurs.problems.elimination import decode, eliminate, messages


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[int], list[tuple[int, int]], list[np.ndarray], dict[tuple[int, int], np.ndarray]]:
    """1–5 groups of 1–3 levels, any set of pairs, two channels of random tables."""
    n = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    all_pairs = [(g, h) for g in range(n) for h in range(g + 1, n)]
    pairs = [p for p in all_pairs if draw(st.booleans())]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    node = [rng.normal(size=(2, s)) for s in sizes]
    edge = {(g, h): rng.normal(size=(2, sizes[g], sizes[h])) for g, h in pairs}
    return sizes, pairs, node, edge


def _value(x: tuple[int, ...], node: list[np.ndarray], edge: dict[tuple[int, int], np.ndarray]) -> np.ndarray:
    return sum((w[:, x[g]] for g, w in enumerate(node)), np.zeros(2)) + sum(
        (w[:, x[g], x[h]] for (g, h), w in edge.items()), np.zeros(2))


@settings(max_examples=60, deadline=None)
@given(graphs())
def test_min_sum_inside_and_outside_match_enumeration(graph) -> None:
    sizes, pairs, node, edge = graph
    elim = eliminate(sizes, pairs)
    assert sorted(elim.order) == list(range(len(sizes)))
    msgs = messages(elim, node, edge)
    everything = {x: _value(x, node, edge) for x in itertools.product(*(range(s) for s in sizes))}
    best = np.min(np.stack(list(everything.values())), axis=0)
    assert msgs.total == pytest.approx(best)
    assert _value(tuple(decode(elim, msgs)), node, edge)[0] == pytest.approx(best[0])
    for v in range(len(sizes)):  # v's subtree and the rest meet only in v's scope
        for at in itertools.product(*(range(sizes[g]) for g in elim.scope[v])):
            fixed = [val for x, val in everything.items() if all(x[g] == a for g, a in zip(elim.scope[v], at, strict=True))]
            got = msgs.inside[v][(slice(None), *at)] + msgs.outside[v][(slice(None), *at)]
            assert got == pytest.approx(np.min(np.stack(fixed), axis=0))


def test_a_forest_is_eliminated_leaf_first_and_residual_blocks_within_three_groups() -> None:
    tree = [(0, 1), (1, 2), (1, 3), (3, 4), (5, 6)]
    elim = eliminate([4] * 7, tree)
    assert max(len(s) for s in elim.scope) == 1 and len(elim.roots) == 2
    # a stream (0) through two bottlenecks (1-2, 3-4), then a projection to a stream (7) via block 5-6
    residual = [(0, 1), (1, 2), (0, 2), (0, 3), (3, 4), (0, 4), (0, 5), (5, 6), (6, 7), (0, 7)]
    elim = eliminate([8] * 8, residual)
    assert max(len(s) for s in elim.scope) == 2 and elim.largest()[1] == 8**3


def test_least_of_a_large_cycle_that_is_not_monotone_needs_no_mip(monkeypatch: pytest.MonkeyPatch) -> None:
    """10**6 assignments of a ring of non-monotone latency tables: elimination, the MIP agrees."""
    from secateurs.solvers import allocation_mip

    rng = np.random.default_rng(5)
    names = [f"g{i}" for i in range(6)]
    levels = {g: list(range(1, 11)) for g in names}
    terms = [LatencyTerm(rng.uniform(0, 5, (10, 10)), names[i], names[(i + 1) % 6], levels[names[i]],
                         levels[names[(i + 1) % 6]]) for i in range(6)]
    errors = {g: [10.0 - i for i in range(10)] for g in names}
    budgets = [Budget("latency", Latency(terms), 1e9)]
    exact = allocation_mip.minimise_row(Allocation(levels, errors, budgets).tables, 0)[0]
    monkeypatch.setattr(allocation_mip, "minimise_row", lambda *a, **k: pytest.fail("the MIP was called"))
    problem = Allocation(levels, errors, budgets)
    assert problem.tables.cycle_edge() is not None
    assert problem.least("latency") == pytest.approx(exact)
