"""What every solver's reported result must satisfy, whatever the problem kind."""

from __future__ import annotations

import math
from typing import Any

from secateurs.errors import SolverRefusedError
from secateurs.solvers import SolveResult, solve


def solve_or_refuse(problem: Any, solver: Any, *, allow_refusal: bool, **options: Any) -> SolveResult | None:
    """``solve``, asserting a SolveResult comes back; None when the solver refused and that is allowed."""
    try:
        result = solve(problem, solver, **options)
    except SolverRefusedError:
        if not allow_refusal:
            raise
        return None
    assert isinstance(result, SolveResult), f"solver returned {type(result).__name__}, not a SolveResult"
    return result


def check_reported(problem: Any, result: SolveResult, *, tol: float, abs_tol: float) -> None:
    """A feasible result: its solution satisfies ``check``, its objective is ``evaluate`` of it,
    and its bound is not above it."""
    if not result.ok:
        return
    name = result.solver
    violations = problem.check(result.solution)
    assert not violations, f"{name}: reported solution violates {violations}"
    value = problem.evaluate(result.solution)
    assert math.isclose(result.objective, value, rel_tol=1e-9, abs_tol=abs_tol), \
        f"{name}: objective {result.objective} but evaluate gives {value}"
    assert result.bound <= result.objective + tol * max(1.0, abs(result.objective)), \
        f"{name}: bound {result.bound} above objective {result.objective}"
