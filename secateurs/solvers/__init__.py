"""Solver registry and the built-in solvers (importing this package registers them)."""

# Importing _builtin imports every solver module, each of which registers itself.
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
