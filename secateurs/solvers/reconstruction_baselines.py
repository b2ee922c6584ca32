"""Magnitude baselines for Reconstruction: keep the units whose dense weights are largest.

Both keep the same units (largest Frobenius norm of each unit's dense weights over all
consumers). The reported objective is always ``problem.evaluate(solution)``, which refits; the
two differ only in what ``info`` adds: ``magnitude`` also reports the objective and relative
error of the dense weights merely masked (``info["masked_objective"]``, what magnitude pruning
without a refit gets), ``magnitude_refit`` reports the refit only.
"""

from __future__ import annotations

from typing import Any

import torch

from secateurs.problems.reconstruction import Reconstruction
from secateurs.solvers._reconstruction_common import finish
from secateurs.solvers.registry import register
from secateurs.solvers.result import SolveResult, Status


def magnitude_scores(problem: Reconstruction) -> torch.Tensor:
    """Squared Frobenius norm of each unit's dense weights, summed over consumers."""
    g, w = problem.num_units, problem.unit_width
    total = torch.zeros(g, dtype=problem.dtype, device=problem.device)
    for D in problem.dense:
        total += (D * D).reshape(g, w, -1).sum((1, 2))
    return total


def _top(problem: Reconstruction) -> list[int]:
    # stable on ties: the lower unit index wins
    scores = magnitude_scores(problem)
    order = torch.argsort(-scores, stable=True)
    return sorted(order[: problem.keep].tolist())


@register("magnitude", kinds=["reconstruction"], exact=False,
          description="largest unit weight norms; info reports the un-refit (masked) error")
def magnitude(problem: Reconstruction, *, time_limit: float | None, seed: int, **_: Any) -> SolveResult:
    """Keep the largest-norm units; objective with refit, masked objective in ``info``."""
    support = _top(problem)
    masked = problem.masked_objective(support)
    c = problem.constant
    return finish(problem, support, Status.FEASIBLE, iterations=1, info={
        "masked_objective": masked,
        "masked_relative_error": (masked + c) / c if c > 0 else 0.0,
    })


@register("magnitude_refit", kinds=["reconstruction"], exact=False,
          description="largest unit weight norms, then the closed-form refit")
def magnitude_refit(problem: Reconstruction, *, time_limit: float | None, seed: int, **_: Any) -> SolveResult:
    """Keep the largest-norm units and refit them (the refit is what ``evaluate`` reports)."""
    return finish(problem, _top(problem), Status.FEASIBLE, iterations=1)
