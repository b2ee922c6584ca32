"""Hypothesis strategies for Reconstruction problems and a conformance kit for any solver.

Use them to property-test your own solver::

    from hypothesis import given
    from secateurs.testing import check_solver, reconstruction_problems

    check_solver(my_solver)                      # canonical problems, optimum by enumeration

    @given(reconstruction_problems(max_units=7))
    def test_mine(problem):
        check_solver(my_solver, problems=[problem])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

from secateurs.problems.reconstruction import Reconstruction
from secateurs.solvers.registry import SolverSpec, solve
from secateurs.solvers.result import SolveResult

Solver = str | SolverSpec | Callable[..., Any]


def random_reconstruction(
    seed: int,
    *,
    units: int = 6,
    unit_width: int = 1,
    keep: int = 3,
    outputs: int = 3,
    rows: int | None = None,
    inputs: int = 1,
    correlated: bool = False,
    condition: float = 0.0,
    device: torch.device | str | None = None,
) -> Reconstruction:
    """A seeded random problem (numpy generator, so it is identical on every platform).

    Parameters
    ----------
    seed : int
    units, unit_width, keep, outputs : int
        g, w, k and m (outputs per consumer input).
    rows : int, optional
        Calibration rows n (default 3p); n < p makes XᵀX singular, the ridge repairs it.
    inputs : int
        Consumer inputs (each its own X and W; their objectives add).
    correlated : bool
        X = Z·(I + 0.9·mixing): strongly correlated columns, as real activations are.
    condition : float
        Column scales spread over 10^±condition (ill-conditioning).
    """
    rng = np.random.default_rng(seed)
    p = units * unit_width
    n = 3 * p if rows is None else rows
    xs, ws = [], []
    for _ in range(inputs):
        X = rng.standard_normal((n, p))
        if correlated:
            X = X @ (np.eye(p) + 0.9 * rng.standard_normal((p, p)))
        if condition:
            X = X * 10.0 ** rng.uniform(-condition, condition, size=p)
        xs.append(torch.tensor(X, device=device))
        ws.append(torch.tensor(rng.standard_normal((outputs, p)), device=device))
    if inputs == 1:
        return Reconstruction.from_activations(xs[0], ws[0], unit_width=unit_width, keep=keep)
    return Reconstruction.from_activations(xs, ws, unit_width=unit_width, keep=keep)


@st.composite
def reconstruction_problems(
    draw: st.DrawFn,
    *,
    min_units: int = 2,
    max_units: int = 8,
    max_width: int = 3,
    max_outputs: int = 4,
    max_inputs: int = 2,
    device: torch.device | str | None = None,
) -> Reconstruction:
    """Valid Reconstruction problems: sizes, unit widths, several consumer inputs, correlated
    and ill-conditioned activations, fewer rows than columns, every keep level.

    Sizes are drawn by hypothesis (so they shrink); the numbers come from a drawn seed.
    """
    g = draw(st.integers(min_units, max_units))
    w = draw(st.integers(1, max_width))
    k = draw(st.integers(1, g))
    m = draw(st.integers(1, max_outputs))
    inputs = draw(st.integers(1, max_inputs))
    p = g * w
    rows = draw(st.sampled_from([max(1, p // 2), p, 3 * p]))
    correlated = draw(st.booleans())
    condition = draw(st.sampled_from([0.0, 0.0, 1.0, 3.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return random_reconstruction(seed, units=g, unit_width=w, keep=k, outputs=m, rows=rows, inputs=inputs,
                                 correlated=correlated, condition=condition, device=device)


def diagonal_reconstruction(values: Sequence[float], keep: int) -> Reconstruction:
    """A problem whose optimum is known in closed form: H = I, unit i worth ½·values[i].

    With H diagonal the units do not interact, f(S) = −½ Σ_{i∈S} ‖G_i‖²/H_ii, so the optimum keeps
    the ``keep`` largest values. Ties are the caller's business.
    """
    v = torch.tensor([math.sqrt(max(x, 0.0)) for x in values], dtype=torch.float64)
    return Reconstruction.from_hessian(torch.eye(len(values), dtype=torch.float64), v[:, None], keep=keep)


def canonical_problems() -> dict[str, Reconstruction]:
    """Small deterministic problems covering widths, several inputs, correlation and conditioning."""
    return {
        "diagonal": diagonal_reconstruction([5.0, 1.0, 4.0, 3.0, 0.5, 2.0], keep=3),
        "plain": random_reconstruction(1, units=6, keep=3),
        "width3": random_reconstruction(2, units=5, unit_width=3, keep=2, outputs=4),
        "two_inputs": random_reconstruction(3, units=7, unit_width=2, keep=3, inputs=2),
        "correlated": random_reconstruction(4, units=8, keep=4, correlated=True),
        "ill_conditioned": random_reconstruction(5, units=7, keep=3, correlated=True, condition=3.0),
        "few_rows": random_reconstruction(6, units=8, keep=5, rows=4),
        "keep_one": random_reconstruction(7, units=6, keep=1, correlated=True),
        "keep_all": random_reconstruction(8, units=4, unit_width=2, keep=4),
    }


def brute_force_optimum(problem: Reconstruction, max_subsets: int = 20_000) -> tuple[float, list[int]]:
    """The optimum by evaluating every support with ``problem.evaluate`` (independent of solvers)."""
    count = math.comb(problem.num_units, problem.keep)
    if count > max_subsets:
        raise ValueError(f"C({problem.num_units}, {problem.keep}) = {count} supports is too many to enumerate")
    best = min(itertools.combinations(range(problem.num_units), problem.keep), key=problem.evaluate)
    return problem.evaluate(best), list(best)


def check_solver(
    solver: Solver,
    problems: Iterable[Reconstruction] | None = None,
    *,
    exact: bool | None = None,
    rtol: float = 1e-7,
    max_subsets: int = 20_000,
    **options: Any,
) -> list[SolveResult]:
    """Assert that ``solver`` behaves on Reconstruction problems; return its results.

    Checks, for every problem: the result carries a solution that satisfies ``check``; the
    reported objective equals ``problem.evaluate(solution)``; the objective is not below the
    optimum and the bound is not above it (optimum by brute force when C(g, k) ≤ ``max_subsets``);
    when ``exact`` (default: the registered spec's flag, False for callables) the objective
    equals the optimum.

    Parameters
    ----------
    solver : str, SolverSpec or callable
        Anything :func:`secateurs.solve` accepts.
    problems : iterable of Reconstruction, optional
        Default :func:`canonical_problems`.
    exact : bool, optional
    rtol : float
        Tolerance relative to max(1, c).
    **options
        Passed to the solver.

    Raises
    ------
    AssertionError
        Naming the solver, the problem and the failed property.
    """
    items = list(canonical_problems().items()) if problems is None else [
        (f"problem[{i}]", p) for i, p in enumerate(problems)
    ]
    if exact is None:
        if isinstance(solver, SolverSpec):
            exact = solver.exact
        elif isinstance(solver, str):
            from secateurs.solvers.registry import get

            exact = get(solver, items[0][1]).exact if items else False
        else:
            exact = False
    label = solver if isinstance(solver, str) else getattr(solver, "name", getattr(solver, "__name__", "solver"))
    results = []
    for name, problem in items:
        where = f"solver {label!r} on {name} ({problem!r})"
        result = solve(problem, solver, **options)
        assert result.solution is not None and result.ok, f"{where}: no feasible result (status {result.status})"
        violations = problem.check(result.solution)
        assert not violations, f"{where}: infeasible solution {result.solution}: {violations}"
        tol = rtol * max(1.0, abs(problem.constant))
        recomputed = problem.evaluate(result.solution)
        assert abs(result.objective - recomputed) <= tol, (
            f"{where}: reported objective {result.objective!r} != evaluate(solution) {recomputed!r}"
        )
        assert not (result.bound > result.objective + tol), (
            f"{where}: bound {result.bound!r} above its own objective {result.objective!r}"
        )
        if math.comb(problem.num_units, problem.keep) <= max_subsets:
            optimum, best = brute_force_optimum(problem, max_subsets)
            assert result.objective >= optimum - tol, (
                f"{where}: objective {result.objective!r} below the optimum {optimum!r} (impossible)"
            )
            assert not (result.bound > optimum + tol), (
                f"{where}: bound {result.bound!r} above the optimum {optimum!r} (support {best})"
            )
            if exact:
                assert result.objective <= optimum + tol, (
                    f"{where}: exact solver's objective {result.objective!r} misses the optimum {optimum!r}"
                )
        results.append(result)
    return results
