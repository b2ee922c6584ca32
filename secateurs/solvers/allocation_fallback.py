"""Solving an allocation inside a pipeline: a plan comes back whatever the named solver does.

``prune`` must not fail because a user's solver refuses a problem's shape (dp and residual
coupling) or runs out of time: it falls back to cpsat, then to greedy, and says which it used.
"""

from __future__ import annotations

from secateurs.errors import SolverRefusedError
from secateurs.problems.allocation import Allocation
from secateurs.solvers.registry import solve
from secateurs.solvers.result import Deadline, SolveResult, Status

__all__ = ["solve_allocation"]


def solve_allocation(problem: Allocation, solver: str, deadline: Deadline, seed: int) -> tuple[SolveResult, str]:
    """Solve, falling back to cpsat when the solver refuses the problem's shape, and to greedy when
    it ran out of time (or failed) without a plan; the note says which happened."""
    note = ""
    try:
        result = solve(problem, solver, time_limit=deadline.solver_limit(), seed=seed)
    except SolverRefusedError as exc:
        note = f"allocation solver {solver!r} refused ({exc}); used 'cpsat'"
        result = solve(problem, "cpsat", time_limit=deadline.solver_limit(), seed=seed)
    if not result.ok and result.status in (Status.LIMIT, Status.ERROR):
        note = f"allocation solver {result.solver!r} found no plan ({result.status.value}); used 'greedy'"
        result = solve(problem, "greedy", seed=seed)
    return result, note
