"""secateurs.problems: solver-agnostic formulations (data, evaluate, check; no solving)."""

from secateurs.problems.allocation import Allocation, Budget, BudgetReport, Latency, LatencyTerm
from secateurs.problems.projection import Projection
from secateurs.problems.reconstruction import Reconstruction, ReconstructionStatistics

__all__ = [
    "Allocation",
    "Budget",
    "BudgetReport",
    "Latency",
    "LatencyTerm",
    "Projection",
    "Reconstruction",
    "ReconstructionStatistics",
]
