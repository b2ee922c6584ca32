"""Linear algebra shared by the Reconstruction solvers (private: not a solver module)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from secateurs.errors import ValidationError
from secateurs.problems.reconstruction import Reconstruction
from secateurs.solvers.result import SolveResult, Status

Tensor = torch.Tensor


def positive_int(field: str, value: Any) -> int:
    """A solver option that counts something (a step, a batch): an integer ≥ 1, or a named error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValidationError(field, f"must be an integer >= 1, got {value!r}")
    return int(value)


def robust_cholesky(M: Tensor) -> Tensor:
    """Cholesky factor of a matrix that is positive definite up to rounding.

    Low-rank downdates can leave a tiny negative eigenvalue; add the least jitter that works.
    """
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return L
    scale = float(M.diagonal().abs().max()) if M.numel() else 1.0
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    for jitter in (1e-14, 1e-12, 1e-10, 1e-8, 1e-6):
        L, info = torch.linalg.cholesky_ex(M + jitter * max(scale, 1e-300) * eye)
        if int(info) == 0:
            return L
    raise torch.linalg.LinAlgError("matrix is not positive definite even after jitter")


def diag_blocks(M: Tensor, w: int) -> Tensor:
    """The (n, w, w) diagonal blocks of an (n*w, n*w) matrix."""
    n = M.shape[0] // w
    if w == 1:
        return M.diagonal().reshape(n, 1, 1)
    return M.reshape(n, w, n, w).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def block_quadratic(D: Tensor, B: Tensor, w: int) -> Tensor:
    """½ tr(B_Iᵀ D_I⁻¹ B_I) for every unit I: D (n, w, w) blocks, B (n*w, m) rows."""
    n = D.shape[0]
    if w == 1:
        return 0.5 * (B * B).sum(1) / D.reshape(n)
    Bb = B.reshape(n, w, B.shape[1])
    return 0.5 * (Bb * torch.linalg.solve(D, Bb)).sum((1, 2))


def finish(
    problem: Reconstruction,
    support: Any,
    status: Status,
    *,
    bound: float = -math.inf,
    iterations: int = 0,
    trace: list[tuple[float, float]] | None = None,
    info: dict[str, Any] | None = None,
    objective: float | None = None,
) -> SolveResult:
    """A SolveResult whose objective is ``problem.evaluate`` of the sorted support.

    Every Reconstruction solver reports through here, so the reported objective is the
    recomputed one by construction (solvers' incremental values can drift by rounding).
    """
    units = sorted(int(u) for u in support)
    value = problem.evaluate(units) if objective is None else objective
    info = dict(info or {})
    info.setdefault("relative_error", (value + problem.constant) / problem.constant if problem.constant > 0 else 0.0)
    return SolveResult(status, value, units, bound=bound, iterations=iterations, trace=list(trace or []), info=info)
