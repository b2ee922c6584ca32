"""Solvers registered by name with what they can do; ``solve`` and ``compare`` dispatch here."""

from __future__ import annotations

import importlib.util
import inspect
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from secateurs.errors import (
    SolverError,
    SolverUnavailableError,
    UnknownOptionWarning,
    UnknownSolverError,
    ValidationError,
)
from secateurs.solvers.result import SolveResult, Status

SolverFunction = Callable[..., SolveResult]


@runtime_checkable
class Problem(Protocol):
    """What every formulation offers: a ``kind`` tag, ``evaluate`` and ``check``."""

    kind: str

    def evaluate(self, solution: Any) -> float: ...

    def check(self, solution: Any) -> list[str]: ...


@dataclass(frozen=True)
class SolverSpec:
    """A registered solver.

    ``function(problem, *, time_limit, seed, **options)`` must return a :class:`SolveResult`.
    ``options`` maps each accepted option to its default; anything else warns.
    """

    name: str
    function: SolverFunction
    kinds: frozenset[str]
    exact: bool
    options: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    description: str = ""

    def missing(self) -> list[str]:
        """Optional modules this solver needs that are not importable."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


_REGISTRY: dict[str, SolverSpec] = {}


def register(
    name: str,
    *,
    kinds: Iterable[str],
    exact: bool,
    options: Mapping[str, Any] | None = None,
    requires: Iterable[str] = (),
    description: str = "",
) -> Callable[[SolverFunction], SolverFunction]:
    """Decorator registering ``function`` as solver ``name`` for the given problem kinds.

    The same name may serve several problem kinds (``greedy`` for Reconstruction and
    Allocation); each registration adds its kinds under a per-kind entry.
    """

    def decorate(function: SolverFunction) -> SolverFunction:
        spec = SolverSpec(
            name=name,
            function=function,
            kinds=frozenset(kinds),
            exact=exact,
            options=dict(options or {}),
            requires=tuple(requires),
            description=description or (inspect.getdoc(function) or "").split("\n")[0],
        )
        for kind in spec.kinds:
            key = f"{kind}:{name}"
            if key in _REGISTRY and _REGISTRY[key].function is not function:
                raise SolverError(f"solver {name!r} is already registered for {kind!r}")
            _REGISTRY[key] = spec
        return function

    return decorate


def _load_builtin_solvers() -> None:
    # Importing the package registers every built-in solver module.
    import secateurs.solvers  # noqa: F401


def _kind_of(problem: Any) -> str:
    kind = getattr(problem, "kind", None)
    if not isinstance(kind, str):
        raise ValidationError("problem", f"{type(problem).__name__} is not a secateurs problem (no 'kind')")
    return kind


def specs(kind: str | None = None) -> list[SolverSpec]:
    """Every registered solver, optionally only those for one problem kind."""
    _load_builtin_solvers()
    return [s for key, s in sorted(_REGISTRY.items()) if kind is None or key.startswith(kind + ":")]


def lookup(name: str, kind: str) -> SolverSpec:
    """The spec registered as ``name`` for problems of ``kind``, or an error listing the registered ones."""
    _load_builtin_solvers()
    spec = _REGISTRY.get(f"{kind}:{name}")
    if spec is None:
        names = ", ".join(s.name for s in specs(kind)) or "none"
        raise UnknownSolverError(f"no solver {name!r} for {kind} problems; registered: {names}")
    return spec


def get(name: str, problem: Any) -> SolverSpec:
    """The spec registered as ``name`` for ``problem``'s kind, or a clear error."""
    return lookup(name, _kind_of(problem))


def available(problem: Any) -> list[str]:
    """Names of the registered solvers that can take ``problem`` (dependencies installed)."""
    return [s.name for s in specs(_kind_of(problem)) if not s.missing()]


def _split_options(spec: SolverSpec, options: Mapping[str, Any]) -> dict[str, Any]:
    accepted = {k: v for k, v in options.items() if k in spec.options}
    for unknown in sorted(set(options) - set(spec.options)):
        warnings.warn(
            f"solver {spec.name!r} does not take option {unknown!r}; it is not used "
            f"(accepted: {', '.join(sorted(spec.options)) or 'none'})",
            UnknownOptionWarning,
            stacklevel=3,
        )
    return {**spec.options, **accepted}


def _from_callable(function: Callable[..., Any], problem: Any, options: dict[str, Any]) -> SolveResult:
    """Run a user's callable; a bare solution is wrapped and evaluated by the problem."""
    params = inspect.signature(function).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {k: v for k, v in options.items() if takes_any or k in params}
    for unknown in sorted(set(options) - set(accepted) - {"time_limit", "seed"}):
        warnings.warn(f"callable solver does not take option {unknown!r}; it is not used",
                      UnknownOptionWarning, stacklevel=4)
    out = function(problem, **accepted)
    if isinstance(out, SolveResult):
        return out
    violations = problem.check(out)
    if violations:  # a wrong answer, not a property of the problem: error, with what it broke
        return SolveResult(Status.ERROR, math.nan, None, info={"violations": violations, "returned": out})
    return SolveResult(Status.FEASIBLE, float(problem.evaluate(out)), out)


def solve(
    problem: Any,
    solver: str | SolverSpec | Callable[..., Any] = "local_search",
    *,
    time_limit: float | None = None,
    seed: int = 0,
    **options: Any,
) -> SolveResult:
    """Solve ``problem`` with a registered solver name, a :class:`SolverSpec` or a callable.

    Parameters
    ----------
    problem : Reconstruction, Allocation, Projection, ...
    solver : str, SolverSpec or callable
        A callable receives ``(problem, **options)`` and may return a ``SolveResult`` or a bare
        solution, which is then checked and evaluated.
    time_limit : float, optional
        Seconds; solvers return their incumbent with status ``limit`` when it runs out.
    seed : int
        For every randomised choice.
    **options
        Solver options; options a solver does not take raise an ``UnknownOptionWarning``.
    """
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, numbers.Real)
                                   or not time_limit > 0):
        raise ValidationError("time_limit", f"must be positive seconds, got {time_limit!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**31:
        raise ValidationError("seed", f"must be an integer in [0, 2**31) (CP-SAT's and SCIP's range), got {seed!r}")
    start = time.perf_counter()
    if isinstance(solver, str):
        spec: SolverSpec | None = get(solver, problem)
    elif isinstance(solver, SolverSpec):
        spec = solver
    elif callable(solver):
        spec = None
    else:
        raise ValidationError("solver", f"expected a name, a SolverSpec or a callable, got {type(solver).__name__}")

    if spec is None:
        result = _from_callable(solver, problem, {"time_limit": time_limit, "seed": seed, **options})  # type: ignore[arg-type]
        name = getattr(solver, "__name__", type(solver).__name__)
    else:
        kind = _kind_of(problem)
        if kind not in spec.kinds:
            raise SolverError(f"solver {spec.name!r} does not solve {kind} problems (it solves {sorted(spec.kinds)})")
        missing = spec.missing()
        if missing:
            raise SolverUnavailableError(f"solver {spec.name!r} needs {', '.join(missing)}, which is not installed")
        result = spec.function(problem, time_limit=time_limit, seed=seed, **_split_options(spec, options))
        name = spec.name
    result.seconds = time.perf_counter() - start
    result.solver = result.solver or name
    return result


def compare(
    problem: Any,
    solvers: Iterable[str | SolverSpec | Callable[..., Any]] | None = None,
    *,
    time_limit: float | None = None,
    seed: int = 0,
    show: bool = False,
    skip_refused: bool = True,
    **options: Any,
) -> list[SolveResult]:
    """Run several solvers on one problem; optionally print a side-by-side table.

    Solvers that refuse the instance (too large to enumerate, wrong structure) are reported
    with status ``error`` and the reason in ``info["error"]`` when ``skip_refused``.
    """
    from secateurs.errors import SolverRefusedError

    chosen = list(solvers) if solvers is not None else available(problem)
    results: list[SolveResult] = []
    for s in chosen:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnknownOptionWarning)
                results.append(solve(problem, s, time_limit=time_limit, seed=seed, **options))
        except SolverRefusedError as exc:
            if not skip_refused:
                raise
            name = s if isinstance(s, str) else getattr(s, "name", getattr(s, "__name__", "?"))
            results.append(SolveResult(Status.ERROR, math.nan, None, solver=str(name), info={"error": str(exc)}))
    if show:
        print(format_table(results))
    return results


def format_table(results: Iterable[SolveResult]) -> str:
    """A plain-text table: solver, status, objective, bound, gap, seconds, iterations."""
    rows = [("solver", "status", "objective", "bound", "gap", "seconds", "iters")]
    for r in results:
        rows.append((
            r.solver,
            r.status.value,
            f"{r.objective:.6g}",
            f"{r.bound:.6g}" if math.isfinite(r.bound) else "-",
            f"{100 * r.gap:.3g}%" if math.isfinite(r.gap) else "-",
            f"{r.seconds:.3f}",
            str(r.iterations),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
