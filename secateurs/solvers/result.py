"""The one result type every solver returns."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Status(str, Enum):
    """How a solve ended. Infeasible is a status, malformed input is an exception."""

    OPTIMAL = "optimal"
    FEASIBLE = "feasible"
    INFEASIBLE = "infeasible"
    LIMIT = "limit"
    ERROR = "error"


@dataclass
class SolveResult:
    """Objective, bound and solution of one solve.

    Attributes
    ----------
    status : Status
    objective : float
        Objective of ``solution`` as the problem's ``evaluate`` computes it (nan if none).
    bound : float
        A proven lower bound on the optimum (minimisation), ``-inf`` if none is known.
    seconds : float
        Wall time of the solve, filled in by :func:`secateurs.solve`.
    iterations : int
    solver : str
    solution : Any
        Problem-specific solution (kept units for Reconstruction, levels for Allocation...).
    trace : list of (seconds, objective)
        Incumbent objective over time.
    info : dict
        Solver-specific extras (scalings used, sub-solver status, ...).
    """

    status: Status
    objective: float
    solution: Any
    bound: float = -math.inf
    seconds: float = 0.0
    iterations: int = 0
    solver: str = ""
    trace: list[tuple[float, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """Relative gap (objective - bound) / max(|objective|, 1e-12); inf without a bound."""
        if not (math.isfinite(self.objective) and math.isfinite(self.bound)):
            return math.inf
        return max(self.objective - self.bound, 0.0) / max(abs(self.objective), 1e-12)

    @property
    def ok(self) -> bool:
        """True when the result carries a feasible solution."""
        return self.status in (Status.OPTIMAL, Status.FEASIBLE, Status.LIMIT) and self.solution is not None


class Deadline:
    """A wall-clock limit shared by a solver's loops; ``None`` means no limit."""

    def __init__(self, time_limit: float | None) -> None:
        self.start = time.perf_counter()
        self.time_limit = time_limit

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        if self.time_limit is None:
            return math.inf
        return max(self.time_limit - self.elapsed(), 0.0)

    def expired(self) -> bool:
        return self.time_limit is not None and self.elapsed() >= self.time_limit

    def solver_limit(self) -> float | None:
        """The time left, as a ``time_limit`` to hand a solver: None without a limit, and at least
        0.05 s, so a spent deadline still lets a solver return its first plan."""
        if self.time_limit is None:
            return None
        return max(self.remaining(), 0.05)


class Trace:
    """Records the incumbent objective over time (only improvements are kept)."""

    def __init__(self, deadline: Deadline) -> None:
        self.deadline = deadline
        self.points: list[tuple[float, float]] = []

    def record(self, objective: float) -> None:
        if not self.points or objective < self.points[-1][1]:
            self.points.append((self.deadline.elapsed(), float(objective)))
