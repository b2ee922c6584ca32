"""Greedy backward elimination for Reconstruction (OBS-style, exact low-rank downdates).

Start from every unit kept, with H⁻¹ and the refit B = H⁻¹G. Removing a set I of columns from
the support S raises f by ½tr(B_Iᵀ[(H_SS⁻¹)_II]⁻¹B_I) and changes the inverse by a block
Sherman–Morrison (Schur complement) downdate

    H_S'S'⁻¹ = H_SS⁻¹ − C D⁻¹ Cᵀ,   C = (H_SS⁻¹)_{:,I},  D = (H_SS⁻¹)_II,
    B' = B − C D⁻¹ B_I.

Each stage removes the ``step`` units whose individual removal costs are least, then applies the
exact joint downdate, so the recorded objective of every level is exact (up to rounding).

Speed (ours): the downdates are not applied to the p x p inverse at every stage (that is p²
memory traffic per stage). We keep the inverse as ``Hi − U Uᵀ`` with U = C L⁻ᵀ (L = chol D)
collected column by column; only the diagonal blocks and B are updated eagerly. Every ``fold``
columns, U is folded into Hi and both are compacted to the surviving units.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from secateurs.problems.reconstruction import Reconstruction
from secateurs.solvers._reconstruction_common import (
    block_quadratic,
    diag_blocks,
    finish,
    positive_int,
    robust_cholesky,
)
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status, Trace

Tensor = torch.Tensor


class _Block:
    """Elimination state for one consumer input (its H⁻¹ in factored form and its refit B)."""

    def __init__(self, L: Tensor, G: Tensor, w: int, fold: int) -> None:
        """``L``: the Cholesky factor of this input's H (``Reconstruction.factor``)."""
        self.Hi = torch.cholesky_inverse(L)
        self.B = self.Hi @ G
        self.w = w
        self.U = torch.empty(L.shape[0], fold, dtype=L.dtype, device=L.device)
        self.t = 0
        self.D = diag_blocks(self.Hi, w).clone()

    def scores(self) -> Tensor:
        return block_quadratic(self.D, self.B, self.w)

    def remove(self, cols: Tensor) -> float:
        """Exact joint downdate for local columns ``cols``; returns the objective increase."""
        t = self.t
        C = self.Hi[:, cols]
        if t:
            C = C - self.U[:, :t] @ self.U[cols, :t].T
        L = robust_cholesky(C[cols])
        u = torch.linalg.solve_triangular(L, C.T, upper=False).T  # C L⁻ᵀ
        beta = torch.linalg.solve_triangular(L, self.B[cols], upper=False)  # L⁻¹ B_I
        self.B -= u @ beta
        self.B[cols] = 0.0
        r = u.shape[1]
        self.U[:, t:t + r] = u
        self.t = t + r
        n, w = self.D.shape[0], self.w
        if w == 1:
            self.D -= (u * u).sum(1).reshape(n, 1, 1)
        else:
            ub = u.reshape(n, w, r)
            self.D -= ub @ ub.transpose(1, 2)
            # removed units' blocks are now 0; make them harmless for the batched solve
            self.D[cols.reshape(-1, w)[:, 0] // w] = torch.eye(w, dtype=u.dtype, device=u.device)
        return 0.5 * float((beta * beta).sum())

    def compact(self, keep_cols: Tensor, keep_units: Tensor) -> None:
        """Fold U into Hi and drop the removed rows and columns."""
        t = self.t
        Hi = self.Hi[keep_cols[:, None], keep_cols]
        if t:
            Uk = self.U[keep_cols, :t]
            Hi.addmm_(Uk, Uk.T, alpha=-1)  # in place: ``Hi -= Uk @ Uk.T`` makes a product as large as Hi
        self.Hi = Hi
        self.B = self.B[keep_cols]
        self.D = self.D[keep_units]
        self.U = self.U[: keep_cols.shape[0]]
        self.t = 0


def greedy_path(
    problem: Reconstruction,
    *,
    step: int = 1,
    stop: int = 1,
    first_step: int | None = None,
    deadline: Deadline | None = None,
    last_only: bool = False,
    release_factors: bool = False,
) -> list[tuple[int, list[int], float]]:
    """Backward elimination from all units down to ``stop`` kept, recording every level.

    Parameters
    ----------
    problem : Reconstruction
    step : int
        Units removed per stage (1 is the accurate setting; larger is faster).
    stop : int
        Smallest keep level to reach (``problem.keep`` for the solver; 1 for an error curve).
    first_step : int, optional
        Units removed at the first stage (default ``step``): ``num_units % step`` puts every later
        level on a multiple of ``step``, as channel counts rounded to a vector width need.
    deadline : Deadline, optional
        When it expires the path ends early at the current level.
    last_only : bool
        Return only the final level (what the ``greedy`` solver needs; saves building g lists).
    release_factors : bool
        Forget ``problem``'s cached Cholesky factors once H⁻¹ is formed from them, for a caller
        that needs them no more: the path then holds H⁻¹ but not the factor beside it (p² floats,
        5 GB for a 25,088-column input).

    Returns
    -------
    list of (k, support, objective)
        From k = num_units (objective −c) down to ``stop``; supports are sorted unit lists and
        objectives are the exact refit objective accumulated stage by stage (equal to
        ``problem.evaluate(support)`` up to rounding).
    """
    g, w = problem.num_units, problem.unit_width
    if not 1 <= stop <= g:
        raise ValueError(f"stop must be in 1..{g}, got {stop}")
    step = max(1, int(step))
    first = step if first_step is None else int(first_step)
    if not 1 <= first <= step:
        raise ValueError(f"first_step must be in 1..{step}, got {first_step}")
    fold = max(256, 2 * step * w)
    blocks = []
    for i, G in enumerate(problem.targets):
        blocks.append(_Block(problem.factor(i), G, w, fold))
        if release_factors:  # this one only: the next input's factor is still to be used
            problem.release_factors(i)
    device = problem.device
    units = torch.arange(g, device=device)  # original index of each local unit
    alive = torch.ones(g, dtype=torch.bool, device=device)
    objective = -problem.constant
    levels: list[tuple[int, list[int], float]] = []  # (count, units removed at this stage, objective)
    count = g
    inf = torch.tensor(math.inf, dtype=problem.dtype, device=device)
    while count > stop:
        if deadline is not None and deadline.expired():
            break
        r = min(first if count == g else step, count - stop)
        scores = blocks[0].scores()
        for b in blocks[1:]:
            scores = scores + b.scores()
        scores = torch.where(alive, scores, inf)
        chosen = torch.topk(scores, r, largest=False).indices if r > 1 else scores.argmin().reshape(1)
        cols = (chosen[:, None] * w + torch.arange(w, device=device)).reshape(-1)
        for b in blocks:
            objective += b.remove(cols)
        alive[chosen] = False
        count -= r
        levels.append((count, units[chosen].tolist(), objective))
        if blocks[0].t + step * w > blocks[0].U.shape[1] and count > stop:
            keep_units = alive.nonzero().reshape(-1)
            keep_cols = (keep_units[:, None] * w + torch.arange(w, device=device)).reshape(-1)
            for b in blocks:
                b.compact(keep_cols, keep_units)
            units = units[keep_units]
            alive = torch.ones(units.shape[0], dtype=torch.bool, device=device)
    if last_only:
        removed_all = {u for _, removed_t, _ in levels for u in removed_t}
        final = levels[-1] if levels else (g, [], -problem.constant)
        return [(final[0], [u for u in range(g) if u not in removed_all], final[2])]
    # supports are built once at the end (not per stage): removal order defines every level
    path: list[tuple[int, list[int], float]] = [(g, list(range(g)), -problem.constant)]
    kept_set = set(range(g))
    for count_t, removed_t, objective_t in levels:
        kept_set.difference_update(removed_t)
        path.append((count_t, sorted(kept_set), objective_t))
    return path


@register(
    "greedy",
    kinds=["reconstruction"],
    exact=False,
    options={"step": 1},
    description="backward elimination with exact block Sherman–Morrison downdates",
)
def greedy(problem: Reconstruction, *, time_limit: float | None, seed: int, step: int = 1, **_: Any) -> SolveResult:
    """Backward elimination down to ``problem.keep`` units (``step`` removed per stage).

    With a time limit that expires, the remaining units are dropped by their current removal
    cost in one stage and the status is ``limit``.
    """
    step = positive_int("step", step)
    deadline = Deadline(time_limit)
    trace = Trace(deadline)
    path = greedy_path(problem, step=step, stop=problem.keep, deadline=deadline, last_only=True)
    k, support, _ = path[-1]
    status = Status.FEASIBLE
    if k > problem.keep:  # ran out of time: finish in one stage
        support = _finish_in_one_stage(problem, support)
        status = Status.LIMIT
    result = finish(problem, support, status, iterations=problem.num_units - k, trace=[], info={"step": step})
    trace.record(result.objective)
    result.trace = trace.points
    return result


def _finish_in_one_stage(problem: Reconstruction, support: list[int]) -> list[int]:
    """Keep the ``problem.keep`` units of ``support`` with the largest removal costs."""
    cols = problem.columns(support)
    w = problem.unit_width
    scores = None
    for H, G in zip(problem.hessians, problem.targets, strict=True):
        Hi = torch.cholesky_inverse(torch.linalg.cholesky(H[cols[:, None], cols]))
        s = block_quadratic(diag_blocks(Hi, w), Hi @ G[cols], w)
        scores = s if scores is None else scores + s
    assert scores is not None
    best = torch.topk(scores, problem.keep).indices.tolist()
    return sorted(support[i] for i in best)
