"""secateurs: prune PyTorch models by casting every pruning decision as a mathematical program."""

from __future__ import annotations

from secateurs import errors

# apply is imported eagerly: a lazy lookup would find the submodule secateurs.apply instead of
# the function once anything has imported that module.
from secateurs.apply import apply
from secateurs.budget import Budget
from secateurs.io import load, load_plan, save
from secateurs.oneshot import PruneResult, prune
from secateurs.plan import PrunePlan
from secateurs.solvers import SolveResult, Status, available, compare, solve

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "PrunePlan",
    "PruneResult",
    "SolveResult",
    "Status",
    "apply",
    "available",
    "compare",
    "errors",
    "load",
    "load_plan",
    "prune",
    "save",
    "solve",
]
