"""Solver registry and the built-in solvers (importing this package registers them)."""

# Built-in solver modules register themselves on import; add new ones to this list.
from secateurs.solvers import _builtin  # noqa: E402,F401
from secateurs.solvers.registry import (
    Problem,
    SolverSpec,
    available,
    compare,
    format_table,
    get,
    register,
    solve,
    specs,
)
from secateurs.solvers.result import Deadline, SolveResult, Status, Trace

__all__ = [
    "Deadline",
    "Problem",
    "SolveResult",
    "SolverSpec",
    "Status",
    "Trace",
    "available",
    "compare",
    "format_table",
    "get",
    "register",
    "solve",
    "specs",
]
