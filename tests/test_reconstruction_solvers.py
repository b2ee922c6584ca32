"""Every registered Reconstruction solver on fixtures with known optima, plus properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import secateurs
from secateurs.errors import SolverRefusedError, UnknownOptionWarning, ValidationError
from secateurs.problems import Reconstruction
from secateurs.solvers import Status, specs
from secateurs.solvers.reconstruction_greedy import greedy_path
from secateurs.solvers.reconstruction_local_search import swap_scores
from secateurs.solvers.reconstruction_relaxation import project_capped_simplex
from secateurs.testing import canonical_problems, check_solver, random_reconstruction, reconstruction_problems
from secateurs.testing.reconstruction import brute_force_optimum

FIXTURES = canonical_problems()
OPTIMA = {name: brute_force_optimum(p) for name, p in FIXTURES.items()}
SOLVERS = [s.name for s in specs("reconstruction")]
EXACT = [s.name for s in specs("reconstruction") if s.exact]
HEURISTICS = [s.name for s in specs("reconstruction") if not s.exact]
TOL = 1e-7


def test_all_expected_solvers_are_registered() -> None:
    assert set(SOLVERS) >= {"magnitude", "magnitude_refit", "greedy", "local_search", "miqp", "enumerate",
                            "relaxation"}
    assert set(EXACT) == {"miqp", "enumerate"}
    assert set(secateurs.available(FIXTURES["plain"])) >= set(SOLVERS)


def test_diagonal_fixture_optimum_is_the_closed_form() -> None:
    # units worth 5, 1, 4, 3, 0.5, 2: keep the three largest, f = -(5 + 4 + 3) / 2
    value, support = OPTIMA["diagonal"]
    assert support == [0, 2, 3] and value == pytest.approx(-6.0)


@pytest.mark.parametrize("name", sorted(FIXTURES))
@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_on_fixture(solver: str, name: str) -> None:
    problem = FIXTURES[name]
    optimum, best = OPTIMA[name]
    result = secateurs.solve(problem, solver)
    tol = TOL * max(1.0, problem.constant)
    assert problem.check(result.solution) == []
    assert result.solution == sorted(result.solution)
    assert result.objective == pytest.approx(problem.evaluate(result.solution), abs=tol)
    assert result.objective >= optimum - tol
    assert result.bound <= optimum + tol
    assert result.solver == solver and result.seconds >= 0
    assert result.info["relative_error"] == pytest.approx(problem.relative_error(result.solution), abs=1e-9)
    if solver in EXACT:
        assert result.status is Status.OPTIMAL
        assert result.objective == pytest.approx(optimum, abs=tol)
        assert result.bound >= optimum - 1e-5 * max(1.0, abs(optimum))  # a proof, not just -inf
    if solver in ("greedy", "local_search") and name == "diagonal":
        assert result.solution == best  # separable units: greedy is exact


def test_check_solver_kit_accepts_registered_and_rejects_broken_solvers() -> None:
    assert len(check_solver("local_search")) == len(FIXTURES)

    def lying(problem: Reconstruction, **_: object) -> secateurs.SolveResult:
        support = list(range(problem.keep))
        return secateurs.SolveResult(Status.FEASIBLE, problem.evaluate(support) - 1.0, support)

    with pytest.raises(AssertionError, match="reported objective .* != evaluate"):
        check_solver(lying)

    def too_many(problem: Reconstruction, **_: object) -> list[int]:
        return list(range(min(problem.keep + 1, problem.num_units)))[:problem.keep] + [0]

    with pytest.raises(AssertionError, match="no feasible result|infeasible"):
        check_solver(too_many)

    def overclaiming(problem: Reconstruction, **_: object) -> secateurs.SolveResult:
        support = list(range(problem.keep))
        value = problem.evaluate(support)
        return secateurs.SolveResult(Status.FEASIBLE, value, support, bound=value)

    with pytest.raises(AssertionError, match="bound .* above the optimum"):
        check_solver(overclaiming)


def test_plain_callable_returning_a_support_is_wrapped() -> None:
    problem = FIXTURES["plain"]
    result = secateurs.solve(problem, lambda pr: list(range(pr.keep)))
    assert result.status is Status.FEASIBLE and result.objective == pytest.approx(problem.evaluate([0, 1, 2]))


def test_greedy_path_gives_every_level_with_exact_objectives() -> None:
    problem = random_reconstruction(11, units=9, unit_width=2, keep=3, inputs=2, correlated=True)
    path = greedy_path(problem)
    assert [k for k, _, _ in path] == list(range(9, 0, -1))
    for k, support, value in path:
        assert len(support) == k
        assert value == pytest.approx(problem.evaluate(support), abs=1e-8 * problem.constant)
    assert [s for _, s, _ in path][6] == secateurs.solve(problem, "greedy").solution
    # nested supports, objective non-decreasing as units go
    for (_, a, fa), (_, b, fb) in zip(path, path[1:], strict=False):
        assert set(b) < set(a) and fb >= fa - 1e-9 * problem.constant
    coarse = greedy_path(problem, step=3, stop=2)
    assert [k for k, _, _ in coarse] == [9, 6, 3, 2]


def test_greedy_path_compacts_on_large_problems() -> None:
    # 300 units forces several fold-and-compact rounds of the low-rank inverse
    problem = random_reconstruction(12, units=300, keep=20, outputs=5, rows=400, correlated=True)
    path = greedy_path(problem, stop=20)
    k, support, value = path[-1]
    assert k == 20 and value == pytest.approx(problem.evaluate(support), rel=1e-8)


def test_greedy_path_can_release_the_factors_it_starts_from(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two consumer inputs: each factor is released once its H⁻¹ is formed, the path unchanged,
    and none is computed again (releasing them all after the first had refactored the second)."""
    problem = random_reconstruction(14, units=40, unit_width=2, keep=5, inputs=2, correlated=True)
    kept = greedy_path(problem, step=3, stop=5)
    assert set(problem._factors) == {0, 1}
    factorised = []
    cholesky = torch.linalg.cholesky
    monkeypatch.setattr(torch.linalg, "cholesky", lambda a, **kw: factorised.append(a.shape) or cholesky(a, **kw))
    released = greedy_path(problem, step=3, stop=5, release_factors=True)
    monkeypatch.undo()
    assert factorised == []
    assert problem._factors == {}
    assert [(k, s) for k, s, _ in released] == [(k, s) for k, s, _ in kept]
    assert [v for _, _, v in released] == pytest.approx([v for _, _, v in kept], rel=1e-12)


def test_swap_scores_equal_brute_force_swaps() -> None:
    problem = random_reconstruction(13, units=6, unit_width=3, keep=3, inputs=2, correlated=True, condition=1.0)
    delta, kept, removed, f = swap_scores(problem, [0, 2, 5])
    assert f == pytest.approx(problem.evaluate([0, 2, 5]))
    for j, unit_in in enumerate(removed):
        for i, unit_out in enumerate(kept):
            after = problem.evaluate([u for u in kept if u != unit_out] + [unit_in])
            assert float(delta[j, i]) == pytest.approx(after - f, abs=1e-8 * problem.constant)


def test_local_search_limits_and_start() -> None:
    problem = random_reconstruction(14, units=40, keep=15, rows=60, correlated=True)
    capped = secateurs.solve(problem, "local_search", max_iter=1, start=list(range(15)))
    assert capped.iterations == 1 and capped.status is Status.LIMIT and capped.info["stopped"] == "max_iter"
    free = secateurs.solve(problem, "local_search", start=list(range(15)))
    assert free.status is Status.FEASIBLE and free.info["stopped"] == "local_optimum"
    assert free.objective <= capped.objective <= capped.info["start_objective"]
    trace = [v for _, v in free.trace]
    assert trace == sorted(trace, reverse=True) and trace[-1] == pytest.approx(free.objective)
    with pytest.raises(ValidationError, match=r"^start: cardinality"):
        secateurs.solve(problem, "local_search", start=[0, 1])


def test_enumerate_refuses_large_instances_naming_the_limit() -> None:
    problem = random_reconstruction(15, units=30, keep=15, rows=40)
    with pytest.raises(SolverRefusedError, match=r"C\(30, 15\) = 155,117,520 supports exceeds max_subsets=500,000"):
        secateurs.solve(problem, "enumerate")
    results = secateurs.compare(problem, ["greedy", "enumerate"])
    assert results[1].status is Status.ERROR and "max_subsets" in results[1].info["error"]


def test_unknown_option_warns() -> None:
    with pytest.warns(UnknownOptionWarning, match="'greedy' does not take option 'stpe'"):
        secateurs.solve(FIXTURES["plain"], "greedy", stpe=2)


def test_magnitude_reports_the_masked_error() -> None:
    problem = FIXTURES["correlated"]
    plain, refit = (secateurs.solve(problem, s) for s in ("magnitude", "magnitude_refit"))
    assert plain.solution == refit.solution and plain.objective == refit.objective
    assert plain.info["masked_objective"] >= plain.objective
    assert plain.info["masked_relative_error"] >= plain.info["relative_error"]


def test_relaxation_bound_certifies_a_gap_for_heuristics() -> None:
    problem = random_reconstruction(16, units=12, keep=5, correlated=True)
    optimum = secateurs.solve(problem, "enumerate").objective
    relaxed = secateurs.solve(problem, "relaxation")
    assert -problem.constant <= relaxed.bound <= optimum + 1e-9 * problem.constant
    assert math.isfinite(relaxed.gap)
    polished = secateurs.solve(problem, "relaxation", polish=True)
    assert polished.objective <= relaxed.objective + 1e-9 * problem.constant


@given(st.lists(st.floats(-3, 3), min_size=1, max_size=12), st.integers(1, 12))
def test_capped_simplex_projection_is_feasible_and_optimal(values: list[float], k: int) -> None:
    y = torch.tensor(values, dtype=torch.float64)
    z = project_capped_simplex(y, k)
    assert float(z.min()) >= 0 and float(z.max()) <= 1 and float(z.sum()) <= k + 1e-9
    # any other feasible point is no closer (check a few: the clipped and scaled-down versions)
    for other in (y.clamp(0, 1) * min(1.0, k / max(float(y.clamp(0, 1).sum()), 1e-12)), torch.zeros_like(y)):
        assert float(((z - y) ** 2).sum()) <= float(((other - y) ** 2).sum()) + 1e-9


# ---------------------------------------------------------------- hypothesis properties
@settings(max_examples=25)
@given(reconstruction_problems(max_units=7))
def test_properties_of_every_cheap_solver(problem: Reconstruction) -> None:
    tol = TOL * max(1.0, problem.constant)
    optimum = secateurs.solve(problem, "enumerate")
    assert optimum.status is Status.OPTIMAL
    results = {s: secateurs.solve(problem, s) for s in SOLVERS if s != "miqp"}
    for name, r in results.items():
        assert len(r.solution) == problem.keep and problem.check(r.solution) == [], name
        assert r.objective == pytest.approx(problem.evaluate(r.solution), abs=tol), name
        assert optimum.objective <= r.objective + tol, name  # exact <= every heuristic
        assert r.bound <= optimum.objective + tol, name
    assert results["local_search"].objective <= results["greedy"].objective + tol
    assert results["local_search"].info["start_objective"] == pytest.approx(results["greedy"].objective, abs=tol)


@settings(max_examples=6)
@given(reconstruction_problems(max_units=5, max_width=2, max_outputs=2, max_inputs=2))
def test_miqp_agrees_with_enumeration(problem: Reconstruction) -> None:
    exact = secateurs.solve(problem, "enumerate")
    mip = secateurs.solve(problem, "miqp")
    assert mip.status is Status.OPTIMAL
    assert mip.objective == pytest.approx(exact.objective, abs=1e-6 * max(1.0, problem.constant))
    assert mip.bound <= exact.objective + TOL * max(1.0, problem.constant)


def test_miqp_out_of_time_before_a_solution_is_a_limit_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """SCIP stopped by its time limit with no incumbent: CVXPY raises, miqp reports status limit."""
    import time

    import cvxpy as cp

    def slow_failure(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        time.sleep(0.05)
        raise cp.error.SolverError("Solver 'SCIP' failed. Try another solver.")

    monkeypatch.setattr(cp.Problem, "solve", slow_failure)
    problem = random_reconstruction(0, units=6, keep=3)
    result = secateurs.solve(problem, "miqp", time_limit=0.01)
    assert result.status is Status.LIMIT and result.solution is None and "time limit" in result.info["note"]
    with pytest.raises(secateurs.errors.SolverError, match=r"miqp: SCIP failed"):
        secateurs.solve(problem, "miqp")  # without a limit a failure is an error


@settings(max_examples=10)
@given(reconstruction_problems(max_units=6))
def test_user_style_check_solver_on_generated_problems(problem: Reconstruction) -> None:
    check_solver("local_search", problems=[problem])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_solvers_run_on_cuda() -> None:
    cpu = random_reconstruction(17, units=30, unit_width=2, keep=12, inputs=2, correlated=True)
    gpu = random_reconstruction(17, units=30, unit_width=2, keep=12, inputs=2, correlated=True, device="cuda")
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float64
    for solver in ("magnitude", "greedy", "local_search", "relaxation"):
        a, b = secateurs.solve(cpu, solver), secateurs.solve(gpu, solver)
        assert a.solution == b.solution, solver
        assert a.objective == pytest.approx(b.objective, rel=1e-9)
    (weights, _) = gpu.refit(b.solution)
    assert weights.device.type == "cuda"


@pytest.mark.parametrize(("w", "inputs"), [(1, 1), (3, 2)])
def test_incremental_swap_updates_match_refactorisation(w: int, inputs: int) -> None:
    from secateurs.solvers.reconstruction_local_search import _SwapState

    problem = random_reconstruction(18, units=9, unit_width=w, keep=4, inputs=inputs, correlated=True, condition=1.0)
    slots, nslots = torch.tensor([0, 3, 5, 8]), torch.tensor([1, 2, 4, 6, 7])

    def cols(units: torch.Tensor) -> torch.Tensor:
        return (units[:, None] * w + torch.arange(w)).reshape(-1)

    state = _SwapState(problem.hessians[0], problem.targets[0], w)
    state.refresh(cols(slots), cols(nslots))
    for a, b in [(1, 2), (3, 0), (1, 4)]:  # three swaps in a row, slots keep their positions
        slots[a], nslots[b] = nslots[b].clone(), slots[a].clone()
        state.swap(a, b, cols(slots), cols(nslots))
    fresh = _SwapState(problem.hessians[0], problem.targets[0], w)
    fresh.refresh(cols(slots), cols(nslots))
    for name in ("Hinv", "B", "A", "R", "X", "Hns", "Hnn"):
        torch.testing.assert_close(getattr(state, name), getattr(fresh, name), rtol=1e-7, atol=1e-9, msg=name)
    torch.testing.assert_close(state.scores(), fresh.scores(), rtol=1e-7, atol=1e-7 * problem.constant)


@pytest.mark.parametrize("solver", ["greedy", "local_search", "enumerate", "relaxation"])
def test_expired_time_limit_still_returns_a_feasible_support(solver: str) -> None:
    problem = random_reconstruction(19, units=16, keep=8, rows=30, correlated=True)
    result = secateurs.solve(problem, solver, time_limit=1e-9)
    assert result.ok and problem.check(result.solution) == []
    assert result.objective == pytest.approx(problem.evaluate(result.solution))
    assert result.status is Status.LIMIT


@pytest.mark.parametrize("method", ["uniform", "scaled", "sdp"])
def test_every_perspective_diagonal_gives_a_valid_bound(method: str) -> None:
    from secateurs.solvers.reconstruction_relaxation import perspective_diagonal

    problem = FIXTURES["ill_conditioned"]
    d = perspective_diagonal(problem.H, method)
    assert float(d.min()) >= 0
    assert float(torch.linalg.eigvalsh(problem.H - torch.diag(d))[0]) >= -1e-9 * float(problem.H.diagonal().max())
    result = secateurs.solve(problem, "relaxation", diagonal=method)
    assert -problem.constant <= result.bound <= OPTIMA["ill_conditioned"][0] + TOL * problem.constant


def test_malformed_solve_arguments_are_named() -> None:
    import numpy as np

    problem = Reconstruction.from_activations(torch.randn(32, 6, dtype=torch.float64),
                                              torch.randn(2, 6, dtype=torch.float64), keep=np.int64(3))
    assert problem.keep == 3 and secateurs.solve(problem, "enumerate").ok  # numpy integers are integers
    with pytest.raises(ValidationError, match=r"^time_limit: must be positive seconds, got '1'"):
        secateurs.solve(problem, "greedy", time_limit="1")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"^seed: must be an integer in \[0, 2\*\*31\)"):
        secateurs.solve(problem, "greedy", seed=2**70)
    with pytest.raises(ValidationError, match=r"^step: must be an integer >= 1, got 0"):
        secateurs.solve(problem, "greedy", step=0)
    with pytest.raises(ValidationError, match=r"^batch: must be an integer >= 1, got 0"):
        secateurs.solve(problem, "enumerate", batch=0)
