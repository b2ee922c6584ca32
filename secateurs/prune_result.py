"""What :func:`secateurs.prune` returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from secateurs.graph import DependencyGraph
from secateurs.plan import PrunePlan
from secateurs.report import PruneReport

__all__ = ["PruneResult"]


@dataclass
class PruneResult:
    """The pruned copy, the plan that makes it from the dense model, and the report."""

    model: nn.Module
    plan: PrunePlan
    report: PruneReport
    graph: DependencyGraph | None = None
