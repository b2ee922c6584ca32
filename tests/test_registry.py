"""The solver registry: dispatch by name, object or callable; options; errors; compare."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import secateurs
from secateurs.errors import SolverError, UnknownOptionWarning, UnknownSolverError, ValidationError
from secateurs.problems import Projection
from secateurs.solvers import SolveResult, Status, format_table, get


@pytest.fixture
def problem() -> Projection:
    return Projection(np.array([0.9, 0.2, 0.7, 0.4]), costs=np.ones((1, 4)), budgets=[1.5])


def test_name_and_spec_give_the_same_answer(problem: Projection) -> None:
    by_name = secateurs.solve(problem, "bisection")
    by_spec = secateurs.solve(problem, get("bisection", problem))
    assert by_name.solver == by_spec.solver == "bisection"
    np.testing.assert_array_equal(by_name.solution, by_spec.solution)
    assert by_name.seconds > 0


def test_unknown_solver_lists_the_registered_ones(problem: Projection) -> None:
    with pytest.raises(UnknownSolverError, match=r"no solver 'nope' for projection problems; registered: .*bisection"):
        secateurs.solve(problem, "nope")


def test_unknown_option_warns_and_is_not_used(problem: Projection) -> None:
    with pytest.warns(UnknownOptionWarning, match=r"'bisection' does not take option 'colour'"):
        result = secateurs.solve(problem, "bisection", colour="red")
    assert result.status is Status.OPTIMAL


def test_known_option_is_passed(problem: Projection) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coarse = secateurs.solve(problem, "bisection", max_iter=0)
    assert coarse.iterations == 0


def test_plain_callable_returning_a_solution_is_checked_and_evaluated(problem: Projection) -> None:
    def halve(p: Projection) -> np.ndarray:
        return np.full(p.size, 0.25)

    result = secateurs.solve(problem, halve)
    assert result.status is Status.FEASIBLE and result.solver == "halve"
    assert result.objective == pytest.approx(problem.evaluate(np.full(4, 0.25)))

    def too_much(p: Projection) -> np.ndarray:
        return np.ones(p.size)

    bad = secateurs.solve(problem, too_much)
    # a wrong answer is an error naming what it broke, not a claim that the problem is infeasible
    assert bad.status is Status.ERROR and bad.solution is None and "budgets[0]" in bad.info["violations"][0]
    assert np.array_equal(bad.info["returned"], np.ones(4)) and not bad.ok


def test_callable_gets_time_limit_and_seed_only_if_it_takes_them(problem: Projection) -> None:
    seen: dict[str, object] = {}

    def mine(p: Projection, *, seed: int) -> SolveResult:
        seen["seed"] = seed
        theta = np.zeros(p.size)
        return SolveResult(Status.FEASIBLE, p.evaluate(theta), theta)

    secateurs.solve(problem, mine, time_limit=3.0, seed=7)
    assert seen == {"seed": 7}


def test_bad_arguments_are_typed_errors(problem: Projection) -> None:
    with pytest.raises(ValidationError, match=r"time_limit: must be positive"):
        secateurs.solve(problem, "bisection", time_limit=0)
    with pytest.raises(ValidationError, match=r"solver: expected a name"):
        secateurs.solve(problem, 42)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"problem: int is not a secateurs problem"):
        secateurs.solve(3, "bisection")
    with pytest.raises(SolverError, match=r"does not solve"):
        from dataclasses import replace

        spec = replace(get("bisection", problem), kinds=frozenset({"other"}))
        secateurs.solve(problem, spec)


def test_compare_reports_refusals_and_prints_a_table(problem: Projection, capsys: pytest.CaptureFixture[str]) -> None:
    results = secateurs.compare(problem, ["bisection", "cvxpy", "topk"], show=True)
    by_name = {r.solver: r for r in results}
    assert by_name["bisection"].objective == pytest.approx(by_name["cvxpy"].objective, abs=1e-7)
    assert by_name["topk"].status is Status.ERROR and "binary" in by_name["topk"].info["error"]
    out = capsys.readouterr().out
    assert "bisection" in out and "optimal" in out and "error" in out
    assert format_table(results).count("\n") == len(results) + 1


def test_gap_is_relative_and_infinite_without_a_bound() -> None:
    assert SolveResult(Status.FEASIBLE, 2.0, [], bound=1.0).gap == pytest.approx(0.5)
    assert math.isinf(SolveResult(Status.FEASIBLE, 2.0, []).gap)
