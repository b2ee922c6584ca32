"""OSSCAR local search for Reconstruction: best-improvement swaps scored all at once.

A swap drops a kept unit I and adds a removed unit J. With Hinv = H_SS⁻¹, B = Hinv G_S,
A = H_NS Hinv (N: removed columns), R = G_N − A G_S (residual correlations) and Schur
complements S_J = H_JJ − (A H_SN)_JJ, the objective change of the swap (I out, J in) is

    Δ(I, J) = ½tr(B_Iᵀ D_I⁻¹ B_I) − ½tr(S'_JI⁻¹ R'_JI R'_JIᵀ),   D_I = Hinv_II,
    M = A_JI D_I⁻¹,  R' = R_J + M B_I,  S' = S_J + M A_JIᵀ,

(removal cost, then the gain of adding J to S \\ I after the exact downdate). Every quantity is a
block of A, R Bᵀ, B Bᵀ or R Rᵀ, so all |N|·|S| swaps are scored with a few matrix products per
iteration, no loop over pairs. The factorisation of H_SS is recomputed from scratch after each
swap (k³, the same order as forming A), so rounding never accumulates; each accepted swap is
checked against the exactly recomputed objective.
"""

from __future__ import annotations

from typing import Any

import torch

from secateurs.problems.reconstruction import Reconstruction
from secateurs.solvers._reconstruction_common import diag_blocks, finish
from secateurs.solvers.reconstruction_greedy import greedy_path
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status, Trace

Tensor = torch.Tensor


def _block_swap_scores(
    H: Tensor, G: Tensor, kept_cols: Tensor, out_cols: Tensor, w: int
) -> tuple[Tensor, float]:
    """Δ for every (removed J, kept I) pair of one consumer input, and f(S) for it.

    Returns ``(delta, f)`` with delta of shape (num removed units, num kept units).
    """
    Hss = H[kept_cols][:, kept_cols]
    L = torch.linalg.cholesky(Hss)
    Gs = G[kept_cols]
    Z = torch.linalg.solve_triangular(L, Gs, upper=False)
    f = -0.5 * float((Z * Z).sum())
    Hinv = torch.cholesky_inverse(L)
    B = Hinv @ Gs
    Hns = H[out_cols][:, kept_cols]
    A = Hns @ Hinv
    R = G[out_cols] - A @ Gs
    X = R @ B.T  # cross inner products R_J B_Iᵀ
    gs, gn = kept_cols.shape[0] // w, out_cols.shape[0] // w
    if w == 1:
        h = Hinv.diagonal()
        bb = (B * B).sum(1)
        rr = (R * R).sum(1)
        s = H[out_cols, out_cols] - (A * Hns).sum(1)
        t = A / h
        num = rr[:, None] + 2 * t * X + t * t * bb[None, :]
        den = s[:, None] + t * A
        removal = 0.5 * bb / h
        return removal[None, :] - 0.5 * num / den, f
    D = diag_blocks(Hinv, w)  # (gs, w, w)
    m = B.shape[1]
    Bb = B.reshape(gs, w, m)
    Rb = R.reshape(gn, w, m)
    BB = Bb @ Bb.transpose(1, 2)  # (gs, w, w)
    RR = Rb @ Rb.transpose(1, 2)  # (gn, w, w)
    removal = 0.5 * torch.linalg.solve(D, BB).diagonal(dim1=1, dim2=2).sum(1)
    Hjj = diag_blocks(H[out_cols][:, out_cols], w)
    Sj = Hjj - torch.einsum("gak,gbk->gab", A.reshape(gn, w, -1), Hns.reshape(gn, w, -1))
    Ab = A.reshape(gn, w, gs, w).permute(0, 2, 1, 3)  # (gn, gs, w, w): A_JI
    Xb = X.reshape(gn, w, gs, w).permute(0, 2, 1, 3)  # R_J B_Iᵀ
    Dinv = torch.linalg.inv(D)
    M = Ab @ Dinv[None]  # (gn, gs, w, w)
    Mt = M.transpose(-1, -2)
    P = RR[:, None] + Xb @ Mt + M @ Xb.transpose(-1, -2) + M @ BB[None] @ Mt
    Sp = Sj[:, None] + M @ Ab.transpose(-1, -2)
    gain = 0.5 * torch.linalg.solve(Sp, P).diagonal(dim1=-2, dim2=-1).sum(-1)
    return removal[None, :] - gain, f


def swap_scores(problem: Reconstruction, support: list[int]) -> tuple[Tensor, list[int], list[int], float]:
    """Objective change of every single swap from ``support``, summed over consumer inputs.

    Returns
    -------
    delta : Tensor (removed units, kept units)
        ``delta[j, i]``: change of f when kept unit ``kept[i]`` is replaced by ``removed[j]``.
    kept, removed : list of int
    objective : float
        f(support), computed from the same factorisation.
    """
    kept = sorted(support)
    kept_set = set(kept)
    removed = [u for u in range(problem.num_units) if u not in kept_set]
    kc, oc = problem.columns(kept), problem.columns(removed)
    total: Tensor | None = None
    f = 0.0
    for H, G in zip(problem.hessians, problem.targets, strict=True):
        d, fb = _block_swap_scores(H, G, kc, oc, problem.unit_width)
        total = d if total is None else total + d
        f += fb
    assert total is not None
    return total, kept, removed, f


@register(
    "local_search",
    kinds=["reconstruction"],
    exact=False,
    options={"max_iter": 10_000, "start": None, "start_step": 1, "tol": 1e-10},
    description="OSSCAR best-improvement swaps from greedy, scored with low-rank updates",
)
def local_search(
    problem: Reconstruction,
    *,
    time_limit: float | None,
    seed: int,
    max_iter: int = 10_000,
    start: list[int] | None = None,
    start_step: int = 1,
    tol: float = 1e-10,
    **_: Any,
) -> SolveResult:
    """Best-improvement swap local search.

    Parameters
    ----------
    max_iter : int
        Most swaps (status ``limit`` when reached before a local optimum).
    start : list of int, optional
        Starting support; default the greedy solution (with ``start_step`` units per stage).
    tol : float
        A swap must improve f by more than ``tol · c`` (c = the problem's constant).

    Status is ``feasible`` at a local optimum (no swap improves), ``limit`` when the time limit
    or ``max_iter`` stopped it; ``info["stopped"]`` says which.
    """
    deadline = Deadline(time_limit)
    trace = Trace(deadline)
    if problem.keep == problem.num_units:
        value = problem.evaluate(range(problem.num_units))
        return finish(problem, range(problem.num_units), Status.OPTIMAL, bound=value, objective=value,
                      info={"stopped": "local_optimum", "start_objective": value, "swaps": 0})
    if start is None:
        support = greedy_path(problem, step=start_step, stop=problem.keep)[-1][1]
    else:
        violations = problem.check(start)
        if violations:
            from secateurs.errors import ValidationError

            raise ValidationError("start", "; ".join(violations))
        support = sorted(int(u) for u in start)
    threshold = tol * max(problem.constant, 1e-300)
    stopped = "local_optimum"
    swaps = 0
    delta, kept, removed, f = swap_scores(problem, support)
    trace.record(f)
    start_objective = f
    while True:
        if swaps >= max_iter:
            stopped = "max_iter"
            break
        if deadline.expired():
            stopped = "time_limit"
            break
        best = int(torch.argmin(delta))
        if not float(delta.reshape(-1)[best]) < -threshold:
            break
        j, i = divmod(best, delta.shape[1])
        candidate = sorted([u for u in kept if u != kept[i]] + [removed[j]])
        new_delta, new_kept, new_removed, new_f = swap_scores(problem, candidate)
        if not new_f < f - threshold:  # the predicted improvement did not survive rounding
            break
        swaps += 1
        delta, kept, removed, f = new_delta, new_kept, new_removed, new_f
        trace.record(f)
    status = Status.FEASIBLE if stopped == "local_optimum" else Status.LIMIT
    return finish(problem, kept, status, iterations=swaps, trace=trace.points,
                  info={"stopped": stopped, "start_objective": start_objective, "swaps": swaps})
