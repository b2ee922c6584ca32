"""Allocation solvers: conformance on generated problems, agreement with brute force and each other."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secateurs.cost import Polynomial
from secateurs.errors import SolverRefusedError
from secateurs.problems import Allocation, Budget
from secateurs.solvers import Status, available, solve
from secateurs.testing.allocation import allocations, brute_force_allocation, check_allocation_solver

EXACT = ["dp", "cpsat", "mip"]
HEURISTIC = ["greedy", "uniform", "kde"]
FAST_KDE = {"steps": 40, "sample": 64}


def test_every_allocation_solver_is_registered() -> None:
    p = Allocation({"a": [1, 2]}, {"a": [1.0, 0.0]})
    assert set(EXACT + HEURISTIC) <= set(available(p))


@settings(max_examples=30)
@given(allocations(max_groups=5, max_levels=4, max_budgets=3))
def test_exact_solvers_agree_with_brute_force_and_each_other(problem: Allocation) -> None:
    optimum, _ = brute_force_allocation(problem)
    values = {}
    for name in EXACT:  # dp eliminates every structure drawn here, cycles and dense ones too
        r = check_allocation_solver(name, problem, optimum=optimum, allow_refusal=name == "dp")
        if r is None:  # ... under one budget: several over cycles are refused
            assert name == "dp" and problem.tables.r > 1 and problem.tables.cycle_edge() is not None
            continue
        assert r.status.value == ("optimal" if math.isfinite(optimum) else "infeasible"), (name, r.status, r.info)
        values[name] = r.objective
    if math.isfinite(optimum):
        assert max(values.values()) - min(values.values()) <= 1e-6 * max(1.0, abs(optimum))


@settings(max_examples=25)
@given(allocations(max_groups=6, max_levels=4, max_budgets=2))
def test_heuristics_are_feasible_and_never_beat_the_optimum(problem: Allocation) -> None:
    optimum, _ = brute_force_allocation(problem)
    for name in HEURISTIC:
        r = check_allocation_solver(name, problem, optimum=optimum, **(FAST_KDE if name == "kde" else {}))
        assert r is not None
        if r.ok:
            assert r.objective >= optimum - 1e-9 * max(1.0, abs(optimum))


@settings(max_examples=20)
@given(allocations(min_groups=4, max_groups=9, max_levels=6, structures=("separable", "chain", "tree", "cycle", "residual"),
                   max_budgets=2, components=False))
def test_dp_matches_cpsat_on_larger_graphs(problem: Allocation) -> None:
    cyclic_under_several = problem.tables.r > 1 and problem.tables.cycle_edge() is not None
    d = check_allocation_solver("dp", problem, allow_refusal=cyclic_under_several)
    if d is None:
        return
    c = check_allocation_solver("cpsat", problem)
    assert d is not None and c is not None
    assert d.status == c.status
    if d.ok:
        assert d.objective == pytest.approx(c.objective, rel=1e-6, abs=1e-9)


def _cycle() -> Allocation:
    lv = {g: [1, 2, 3] for g in "abc"}
    err = {g: [2.0, 1.0, 0.0] for g in "abc"}
    flops = Polynomial(0, {}, {("a", "b"): 1.0, ("b", "c"): 1.0, ("a", "c"): 1.0})
    return Allocation(lv, err, [Budget("flops", flops, 14.0)])


def test_cpsat_out_of_time_returns_its_greedy_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    """CP-SAT stopped before its first plan (status UNKNOWN) still returns the greedy plan it was hinted."""
    from ortools.sat.python import cp_model

    problem = _cycle()
    monkeypatch.setattr(cp_model.CpSolver, "Solve", lambda self, model: cp_model.UNKNOWN)
    result = solve(problem, "cpsat", time_limit=0.5)
    greedy = solve(problem, "greedy")
    assert result.status is Status.LIMIT and result.ok and not problem.check(result.solution)
    assert result.solution == greedy.solution and result.bound == -math.inf


def test_heuristics_that_find_nothing_do_not_claim_infeasible() -> None:
    """Feasible only at (10, 1) behind a component floor: uniform and kde miss it, and say error."""
    levels = {"a": [1, 10], "b": [1, 10]}
    ab = Polynomial(0.0, {"a": 1.0, "b": 1.0}, {})
    problem = Allocation(levels, {"a": [5.0, 0.0], "b": [1.0, 0.0]},
                         [Budget("params", ab, 11.0), Budget("a_floor", Polynomial(0.0, {"a": 1.0}, {}), 10.0, ">=", ("a",))])
    optimum, _ = brute_force_allocation(problem)
    assert optimum == 1.0
    for name in available(problem):
        result = check_allocation_solver(name, problem, optimum=optimum, allow_refusal=True)
        assert result is None or result.status is not Status.INFEASIBLE
    assert solve(problem, "uniform").status is Status.ERROR


def test_dp_solves_a_cycle_exactly() -> None:
    problem = _cycle()
    assert problem.tables.cycle_edge() is not None
    optimum, _ = brute_force_allocation(problem)
    for name in ("dp", "cpsat", "mip"):
        r = check_allocation_solver(name, problem, optimum=optimum, allow_refusal=False)
        assert r is not None and r.status.value == "optimal" and r.objective == pytest.approx(optimum)


def _all_pairs(limit: float = 300.0, levels: int = 9) -> Allocation:
    """Six groups joined pairwise with 9 levels each: eliminating any group builds a 9**6 table."""
    names = [f"g{i}" for i in range(6)]
    flops = Polynomial(0, {}, {(a, b): 1.0 for i, a in enumerate(names) for b in names[i + 1:]})
    return Allocation({g: list(range(1, levels + 1)) for g in names},
                      {g: [float(levels - i) for i in range(levels)] for g in names}, [Budget("flops", flops, limit)])


def test_dp_refuses_interactions_of_large_tree_width_naming_the_groups() -> None:
    with pytest.raises(SolverRefusedError, match=r"eliminating 'g0' joins groups 'g0', 'g1', .*'g5' in a table of "
                                                 r"531,441 cells, more than 262,144 \(use cpsat or mip\)"):
        solve(_all_pairs(), "dp")


def test_dp_refuses_cycles_under_several_budgets_naming_them() -> None:
    problem = _cycle()
    keep = Polynomial(0, {g: 1.0 for g in "abc"})
    several = Allocation(problem.levels, problem.errors, [*problem.budgets, Budget("keep", keep, 7.0)])
    with pytest.raises(SolverRefusedError, match=r"cycles under one budget; this problem has 2 \(flops, keep\).*"
                                                 r"groups 'b' and 'c' close a cycle \(use cpsat or mip\)"):
        solve(several, "dp")
    optimum, _ = brute_force_allocation(several)
    assert solve(several, "cpsat").objective == pytest.approx(optimum)


def test_a_pipeline_falls_back_to_cpsat_when_dp_refuses() -> None:
    from secateurs.solvers.allocation_fallback import solve_allocation
    from secateurs.solvers.result import Deadline

    loose = _all_pairs(limit=1e6)  # a budget the widest levels meet: cpsat answers at once, dp still refuses
    result, note = solve_allocation(loose, "dp", Deadline(None), seed=0)
    assert note.startswith("allocation solver 'dp' refused (dp needs interactions of small tree width")
    assert note.endswith("used 'cpsat'") and result.solver == "cpsat" and result.status.value == "optimal"
    assert result.objective == 6 * 1.0 and result.solution == {f"g{i}": 9 for i in range(6)}


def test_cpsat_states_scaling_and_keeps_rounding_in_the_bound() -> None:
    p = Allocation({"a": [1, 2, 3], "b": [1, 2]}, {"a": [1 / 3, 1 / 7, 0.0], "b": [math.pi, 0.0]},
                   [Budget("params", Polynomial(0.5, {"a": 1.1, "b": 2.0}), 5.0)])
    r = solve(p, "cpsat")
    assert r.status.value == "optimal"
    assert "errors x" in r.info["scaling"] and "'params': 'x1e+01 exact'" in r.info["scaling"]
    assert r.bound <= r.objective and r.objective == pytest.approx(brute_force_allocation(p)[0])


@pytest.mark.parametrize("name", ["cpsat", "mip"])
def test_a_budget_that_does_not_bind_is_solved_without_the_model(name: str) -> None:
    errors = {"a": [0.5, 0.0, 0.1], "b": [0.3, 0.2, 0.0]}  # a's least error is not at its widest level
    flops = Polynomial(0.0, {"a": 1.0, "b": 1.0}, {("a", "b"): 0.5})
    for limit, binds in ((8.0, False), (7.0, True)):  # least errors at a=2, b=3 cost 2 + 3 + 0.5 * 2 * 3 = 8
        p = Allocation({"a": [1, 2, 3], "b": [1, 2, 3]}, errors, [Budget("flops", flops, limit)])
        optimum, _ = brute_force_allocation(p)
        r = solve(p, name)
        assert r.status.value == "optimal" and r.objective == pytest.approx(optimum)
        assert (r.info.get("note") == "no budget binds at the least-error levels") is not binds
        assert r.bound == pytest.approx(r.objective, rel=1e-6)


def test_mip_reports_a_proven_bound() -> None:
    p = _cycle()
    r = solve(p, "mip")
    assert r.info["backend"] in ("SCIP", "CBC")
    assert r.bound == pytest.approx(r.objective, rel=1e-6)


def test_mip_tells_apart_errors_far_under_its_tolerances() -> None:
    """Reconstruction errors are often 1e-9 per level beside a keep-nothing level 1e8 times
    larger; unscaled, the MIP stopped "optimal" above the optimum on half of these problems."""
    rng = np.random.default_rng(0)
    for _ in range(12):
        errors = {g: [1.0, *sorted(rng.uniform(0, 1e-8, 2), reverse=True), 0.0] for g in "abcdef"}
        flops = Polynomial(0.0, dict.fromkeys(errors, 1.0), {("a", "b"): 0.01, ("b", "c"): 0.01, ("c", "a"): 0.01})
        p = Allocation({g: [0, 1, 2, 3] for g in errors}, errors, [Budget("flops", flops, 10.0)])
        optimum, _ = brute_force_allocation(p)
        r = solve(p, "mip")
        assert r.status.value == "optimal"
        assert r.objective == pytest.approx(optimum, rel=1e-9, abs=0)
        assert r.bound <= optimum * (1 + 1e-9)


@given(st.integers(0, 3))
@settings(max_examples=4)
def test_kde_uses_scores_and_is_deterministic(seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = {f"l{i}": 1000 * (i + 1) for i in range(6)}
    dens = [0.125, 0.25, 0.5, 0.75, 1.0]
    errors = {g: [float(v) for v in np.sort(rng.uniform(0, 3, 5))[::-1]] for g in sizes}
    scores = {g: rng.normal(size=300) for g in sizes}
    p = Allocation.unstructured(sizes, dens, errors, density=0.4, scores=scores)
    a = solve(p, "kde", seed=seed, **FAST_KDE)
    b = solve(p, "kde", seed=seed, **FAST_KDE)
    assert a.ok and a.solution == b.solution and p.check(a.solution) == []
    assert a.objective >= solve(p, "dp").objective - 1e-9


def test_time_limited_solvers_still_return_valid_results() -> None:
    p = _cycle()
    for name in EXACT[1:] + HEURISTIC:
        r = check_allocation_solver(name, p, time_limit=5.0)
        assert r is not None and r.ok
