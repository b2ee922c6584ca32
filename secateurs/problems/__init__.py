"""secateurs.problems."""

from secateurs.problems.allocation import Allocation, Budget, BudgetReport, Latency, LatencyTerm  # noqa: E402,F401
from secateurs.problems.projection import Projection  # noqa: E402
from secateurs.problems.reconstruction import Reconstruction, ReconstructionStatistics  # noqa: E402,F401
