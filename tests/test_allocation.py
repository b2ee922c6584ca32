"""Allocation problem: construction, validation, evaluate/check, budgets, from_graph."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest

from secateurs.cost import CostModel, Polynomial
from secateurs.errors import InfeasibleBudgetError, ValidationError
from secateurs.problems import Allocation, Budget, Latency, LatencyTerm
from secateurs.solvers import solve
from secateurs.testing.allocation import brute_force_allocation

LEVELS = {"a": [2, 4, 8], "b": [1, 2, 3, 4], "c": [4, 8]}
ERRORS = {"a": [3.0, 1.0, 0.0], "b": [4.0, 2.0, 1.0, 0.0], "c": [2.0, 0.0]}
FLOPS = Polynomial(5.0, {"a": 3.0}, {("a", "b"): 2.0, ("b", "c"): 1.0})


def chain(limit: float = 60.0, **kw: object) -> Allocation:
    return Allocation(LEVELS, ERRORS, [Budget("flops", FLOPS, limit)], **kw)  # type: ignore[arg-type]


def test_evaluate_check_and_report_compute_achieved_from_the_solution() -> None:
    p = chain()
    sol = {"a": 4, "b": 2, "c": 8}
    assert p.evaluate(sol) == pytest.approx(1.0 + 2.0 + 0.0)
    achieved = 5 + 3 * 4 + 2 * 4 * 2 + 2 * 8
    (rep,) = p.report(sol)
    assert (rep.name, rep.requested, rep.achieved, rep.satisfied) == ("flops", 60.0, achieved, True)
    assert p.check(sol) == []
    over = {"a": 8, "b": 4, "c": 8}
    (msg,) = p.check(over)
    assert re.search(r"budget 'flops': achieved 125 > requested 60 \(over by 65\)", msg)


def test_check_names_bounds_and_levels() -> None:
    p = chain(min_keep={"a": 4}, max_keep={"b": 3}, round_to={"c": 8})
    msgs = p.check({"a": 2, "b": 4, "c": 4})
    assert any(re.search(r"min_keep\['a'\]: keep 2 < 4 \(short by 2\)", m) for m in msgs)
    assert any(re.search(r"max_keep\['b'\]: keep 4 > 3 \(over by 1\)", m) for m in msgs)
    assert any(re.search(r"round_to\['c'\]: keep 4 is not a multiple of 8", m) for m in msgs)
    assert any(re.search(r"levels\['a'\]: keep 5 is not a candidate", m) for m in p.check({"a": 5, "b": 1, "c": 8}))
    assert p.check({"a": 4, "b": 1}) == ["solution['c']: missing group"]
    with pytest.raises(ValidationError, match=r"solution\['a'\].*not a candidate"):
        p.evaluate({"a": 5, "b": 1, "c": 8})


def test_allowed_levels_and_tables_follow_bounds() -> None:
    p = chain(min_keep={"a": 4}, round_to={"b": 2})
    t = p.tables
    assert [list(lv) for lv in t.levels] == [[4, 8], [2, 4], [4, 8]]
    x = t.index({"a": 8, "b": 2, "c": 4})
    assert t.costs(x)[0] == pytest.approx(FLOPS.evaluate({"a": 8, "b": 2, "c": 4}))
    assert p.interactions() == [("a", "b"), ("b", "c")]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"levels": {"a": []}, "errors": {"a": []}}, r"levels\['a'\]: empty candidate set"),
        ({"levels": {"a": [1, 2]}, "errors": {"a": [0.0, math.nan]}}, r"errors\['a'\]: non-finite value nan at position 1"),
        ({"levels": {"a": [1, 2]}, "errors": {"a": [0.0, math.inf]}}, r"errors\['a'\]: non-finite value inf"),
        ({"levels": {"a": [1, 2]}, "errors": {"a": [0.0]}}, r"errors\['a'\]: has 1 entries for 2 levels"),
        ({"levels": {"a": [1, 2]}, "errors": {"a": [0, 1], "z": [0, 1]}}, r"errors\['z'\]: unknown group"),
        ({"levels": {"a": [1, 1]}, "errors": {"a": [0, 1]}}, r"levels\['a'\]: duplicate candidate level"),
        ({"levels": {"a": [-1, 2]}, "errors": {"a": [0, 1]}}, r"levels\['a'\]: negative keep count"),
        ({"levels": {"a": [1, 2]}, "errors": {"a": [0, 1]}, "weights": {"a": -1.0}}, r"weights\['a'\]"),
        ({"levels": {"a": [1, 2]}, "errors": {"a": [0, 1]}, "min_keep": {"q": 1}}, r"min_keep\['q'\]: unknown group"),
        ({"levels": {"a": [1, 2]}, "errors": {"a": [0, 1]}, "min_keep": {"a": 3}},
         r"levels\['a'\]: no candidate level lies in \[3, inf\]"),
        ({"levels": {"a": [1, 3]}, "errors": {"a": [0, 1]}, "round_to": 2}, r"is a multiple of 2"),
    ],
)
def test_construction_errors_name_the_field(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValidationError, match=pattern):
        Allocation(**kwargs)


def test_negative_costs_and_unknown_groups_in_budgets() -> None:
    with pytest.raises(ValidationError, match=r"budgets\['p'\]\.cost\.linear\['a'\]: negative or non-finite coefficient -1"):
        Allocation({"a": [1, 2]}, {"a": [1, 0]}, [Budget("p", Polynomial(0, {"a": -1.0}), 5)])
    with pytest.raises(ValidationError, match=r"budgets\['p'\]\.cost\.bilinear.*negative"):
        Allocation({"a": [1, 2]}, {"a": [1, 0]}, [Budget("p", Polynomial(0, {}, {("a", "a"): -2.0}), 5)])
    with pytest.raises(ValidationError, match=r"budgets\['p'\]\.cost: unknown group 'zz'"):
        Allocation({"a": [1, 2]}, {"a": [1, 0]}, [Budget("p", Polynomial(0, {"zz": 1.0}), 5)])
    with pytest.raises(ValidationError, match=r"latency\.table: negative latency"):
        LatencyTerm([[-1.0]], "a", "b", [1], [1])
    with pytest.raises(ValidationError, match=r"terms\[0\]\.input_levels: level 2 of group 'a' has no latency entry"):
        Allocation({"a": [1, 2], "b": [1]}, {"a": [1, 0], "b": [0]},
                   [Budget("lat", Latency([LatencyTerm([[1.0]], "a", "b", [1], [1])]), 5)])
    with pytest.raises(ValidationError, match=r"budgets\['p'\]: duplicate budget name"):
        Allocation({"a": [1, 2]}, {"a": [1, 0]}, [Budget("p", Polynomial(0, {"a": 1.0}), 5)] * 2)


def test_infeasible_budget_states_the_exact_least_value() -> None:
    # least FLOPs on the chain: a=2, b=1, c=4 -> 5 + 6 + 4 + 4 = 19
    with pytest.raises(InfeasibleBudgetError, match=r"budget 'flops' cannot be met: requested 10, least achievable 19") as info:
        chain(limit=10.0)
    assert info.value.least == 19.0
    with pytest.raises(InfeasibleBudgetError, match=r"least achievable 27"):
        chain(limit=10.0, min_keep={"b": 2})  # bounds enter the least value: 5 + 3·2 + 2·2·2 + 2·4
    comp = Budget("enc", Polynomial(0, {"a": 1.0}), 9.0, ">=")
    with pytest.raises(InfeasibleBudgetError, match=r"budget 'enc'.*requested 9.*least achievable 8.*most achievable"):
        Allocation(LEVELS, ERRORS, [comp])


def test_least_on_a_cycle_matches_enumeration() -> None:
    cyc = Polynomial(0, {}, {("a", "b"): 1.0, ("b", "c"): 1.0, ("a", "c"): 1.0})
    p = Allocation(LEVELS, ERRORS, [Budget("f", cyc, 1e9)])
    least = min(cyc.evaluate({"a": a, "b": b, "c": c}) for a in LEVELS["a"] for b in LEVELS["b"] for c in LEVELS["c"])
    assert p.least("f") == pytest.approx(least)


def test_least_of_a_large_monotone_cycle_is_its_corner_without_a_mip(monkeypatch: pytest.MonkeyPatch) -> None:
    """FLOPs on residual blocks: 10**6 assignments (past enumeration), cyclic; the MIP agrees."""
    from secateurs.solvers import allocation_mip

    names = [f"g{i}" for i in range(6)]
    levels = {g: list(range(3, 13)) for g in names}
    cost = Polynomial(7.0, {g: 2.0 for g in names}, {(names[i], names[(i + 1) % 6]): 1.5 for i in range(6)}
                      | {("g0", "g3"): 0.5})
    budgets = [Budget("flops", cost, 1e9), Budget("keep", Polynomial(0, {g: 1.0 for g in names}), 20.0, ">=")]
    exact_flops = allocation_mip.minimise_row(Allocation(levels, {g: [0.0] * 10 for g in names}, budgets).tables, 0)[0]
    monkeypatch.setattr(allocation_mip, "minimise_row", lambda *a, **k: pytest.fail("the MIP was called"))
    p = Allocation(levels, {g: [0.0] * 10 for g in names}, budgets)
    assert p.tables.cycle_edge() is not None
    assert p.least("flops") == pytest.approx(cost.evaluate({g: 3 for g in names})) == pytest.approx(exact_flops)
    assert p.least("keep") == 6 * 12  # a '>=' row falls with every count: its most achievable is the top corner


def test_least_of_a_cycle_that_is_not_monotone_matches_enumeration() -> None:
    table = np.array([[4.0, 1.0], [2.0, 6.0], [5.0, 3.0]])  # a latency that is not monotone in a or c
    lat = Latency([LatencyTerm(table, "a", "c", [2, 4, 8], [4, 8]),
                   LatencyTerm(np.arange(12.0).reshape(3, 4)[::-1], "a", "b", [2, 4, 8], [1, 2, 3, 4]),
                   LatencyTerm([[1.0, 0.0], [0.5, 2.0], [3.0, 1.0], [0.0, 0.5]], "b", "c", [1, 2, 3, 4], [4, 8])])
    p = Allocation(LEVELS, ERRORS, [Budget("latency", lat, 1e9)])
    assert p.tables.cycle_edge() is not None
    least = min(lat.evaluate({"a": a, "b": b, "c": c}) for a in LEVELS["a"] for b in LEVELS["b"] for c in LEVELS["c"])
    assert p.least("latency") == pytest.approx(least)


def test_latency_table_is_a_pairwise_term() -> None:
    table = np.array([[1.0, 2.0], [3.0, 5.0], [4.0, 9.0]])
    lat = Latency([LatencyTerm(table, "a", "c", [2, 4, 8], [4, 8]),
                   LatencyTerm([0.5, 1.0, 1.5, 2.0], None, "b", (), [1, 2, 3, 4])], constant=1.0)
    p = Allocation(LEVELS, ERRORS, [Budget("latency", lat, 6.0)])
    sol = {"a": 4, "b": 2, "c": 8}
    assert p.report(sol)[0].achieved == pytest.approx(1.0 + 5.0 + 1.0)
    assert p.interactions() == [("a", "c")]
    opt, best = brute_force_allocation(p)
    r = solve(p, "dp")
    assert r.status.value == "optimal" and r.objective == pytest.approx(opt)
    assert p.check(r.solution) == [] and best is not None


def test_component_bound_via_fraction() -> None:
    params = Polynomial(10.0, {"a": 2.0, "b": 1.0, "c": 1.0}, {("a", "b"): 1.0})
    full = {"a": 8, "b": 4, "c": 8}
    enc = Budget.fraction("encoder", params, 0.6, full, sense=">=", component=["a"])
    assert enc.limit == pytest.approx(0.6 * (2 * 8 + 8 * 4))
    tight = Allocation(LEVELS, ERRORS, [Budget.fraction("params", params, 0.5, full), enc])
    assert brute_force_allocation(tight)[1] is None  # jointly infeasible: a status, not an exception
    assert solve(tight, "dp").status.value == "infeasible"
    p = Allocation(LEVELS, ERRORS, [Budget.fraction("params", params, 0.75, full), enc])
    r = solve(p, "dp")
    assert r.ok and p.check(r.solution) == []
    assert r.objective == pytest.approx(brute_force_allocation(p)[0])
    reps = {rep.name: rep for rep in p.report(r.solution)}
    assert reps["encoder"].achieved >= reps["encoder"].requested - 1e-9
    assert reps["params"].achieved <= reps["params"].requested + 1e-9


def test_unstructured_constructor() -> None:
    p = Allocation.unstructured({"l1": 100, "l2": 400}, [0.25, 0.5, 1.0], {"l1": [3, 1, 0], "l2": [2, 1, 0]}, density=0.5)
    assert list(p.levels["l2"]) == [100, 200, 400]
    r = solve(p, "dp")
    assert r.status.value == "optimal" and p.report(r.solution)[0].achieved <= 250


def _stub_graph() -> SimpleNamespace:
    groups = [SimpleNamespace(name=n, size=s, prunable=pr) for n, s, pr in
              (("in", 3, False), ("c1", 8, True), ("c2", 16, True), ("out", 10, False))]
    params = Polynomial(10.0, {"c1": 1.0, "c2": 1.0}, {("in", "c1"): 9.0, ("c1", "c2"): 9.0, ("c2", "out"): 1.0})
    flops = Polynomial(0.0, {}, {("in", "c1"): 900.0, ("c1", "c2"): 900.0, ("c2", "out"): 1.0})
    return SimpleNamespace(groups=groups, cost_model=CostModel(params, flops, {g.name: g.size for g in groups}))


def test_from_graph_with_a_stub() -> None:
    graph = _stub_graph()
    errors = {"c1": [3.0, 1.0, 0.5, 0.0], "c2": [2.0, 1.0, 0.5, 0.0]}
    p = Allocation.from_graph(graph, errors, flops=0.5, params=0.8, components={"head": (["c2"], 0.25)})
    assert list(p.levels["c1"]) == [2, 4, 6, 8] and list(p.levels["c2"]) == [4, 8, 12, 16]
    full = graph.cost_model.flops.evaluate(graph.cost_model.sizes)
    reps = {b.name: b for b in p.budgets}
    assert reps["flops"].limit == pytest.approx(0.5 * full)
    keep = {"c1": 4, "c2": 8}
    exact = graph.cost_model({"c1": 4, "c2": 8})
    assert reps["flops"].achieved(keep) == pytest.approx(exact.flops)  # frozen groups folded in exactly
    assert reps["params"].achieved(keep) == pytest.approx(exact.params)
    with pytest.raises(ValidationError, match=r"errors\['in'\]: group is frozen"):
        Allocation.from_graph(graph, {"in": [1.0, 0.0]})
    with pytest.raises(ValidationError, match=r"errors\['zz'\]: unknown group"):
        Allocation.from_graph(graph, {"zz": [1.0, 0.0]})


def test_from_graph_on_a_real_model() -> None:
    torch = pytest.importorskip("torch")
    from secateurs.graph import build

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 4))
    graph = build(model, torch.randn(1, 3, 8, 8))
    names = [g.name for g in graph.prunable_groups()]
    assert len(names) == 2
    errors = {g: [float(4 - i) for i in range(4)] for g in names}
    p = Allocation.from_graph(graph, errors, flops=0.5)
    r = solve(p, "dp")
    assert r.status.value == "optimal"
    achieved = graph.cost({g: int(k) for g, k in r.solution.items()}).flops
    assert p.report(r.solution)[0].achieved == pytest.approx(achieved)
    assert achieved <= 0.5 * graph.cost().flops + 1e-6

