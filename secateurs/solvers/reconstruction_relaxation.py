"""Perspective (Boolean) relaxation of Reconstruction: a certified lower bound at any size.

Split H = H₀ + δI with δ = λ_min(H) (≥ the ridge), so H₀ ⪰ 0, and put the δ-part in
perspective form: for z ∈ [0, 1]^g,

    φ(z) = min_B ½tr(BᵀH₀B) − tr(BᵀG) + ½δ Σ_I ‖B_I‖² / z_I = −½tr(Gᵀ(H₀ + δ D_z⁻¹)⁻¹G),

which equals f(S) at the indicator of S and is convex in z (Pilanci & Wainwright's Boolean
relaxation). Minimising φ over {0 ≤ z ≤ 1, Σz ≤ k} therefore bounds the optimum from below.
We minimise by projected gradient with backtracking, computing φ stably as
−½tr(GᵀY), Y = s∘(sH₀s + δI)⁻¹(s∘G), s = √z, with ∂φ/∂z_I = −‖(G − H₀Y)_I‖² / (2δ) (from
δD_z⁻¹Y = G − H₀Y; finite at z = 0). Every iterate certifies a bound through convexity:

    φ* ≥ φ(z) + min_{s feasible} ∇φ(z)ᵀ(s − z)          (Frank–Wolfe gap),

the minimum being attained by the k most negative partial derivatives. ``bound`` is the best
such value. The solution is z rounded to its k largest entries (optionally polished by
local search). This scales like a few p x p Cholesky factorisations per iteration, on any device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from secateurs.problems.reconstruction import Reconstruction
from secateurs.solvers._reconstruction_common import finish
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status, Trace

Tensor = torch.Tensor


def project_capped_simplex(y: Tensor, k: float) -> Tensor:
    """Euclidean projection onto {0 ≤ z ≤ 1, Σz ≤ k} (bisection on the multiplier)."""
    z = y.clamp(0, 1)
    if float(z.sum()) <= k:
        return z
    lo, hi = 0.0, float(y.max())
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float((y - mid).clamp(0, 1).sum()) > k:
            lo = mid
        else:
            hi = mid
    return (y - hi).clamp(0, 1)


class _Relaxation:
    """φ and its gradient for one problem (summed over consumer inputs)."""

    def __init__(self, problem: Reconstruction) -> None:
        self.problem = problem
        self.parts = []
        for H, G in zip(problem.hessians, problem.targets, strict=True):
            delta = float(torch.linalg.eigvalsh(H)[0]) * (1 - 1e-9)
            if delta <= 0:
                delta = 0.0
            H0 = H - delta * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            self.parts.append((H0, G, delta))

    def value_grad(self, z: Tensor) -> tuple[float, Tensor]:
        w = self.problem.unit_width
        d = z.repeat_interleave(w)
        s = d.clamp_min(0).sqrt()
        total = 0.0
        grad = torch.zeros_like(z)
        for H0, G, delta in self.parts:
            if delta <= 0:  # no strictly convex part: the relaxation says nothing (φ ≡ −c bound)
                Y = torch.cholesky_solve(G, torch.linalg.cholesky(H0))
                total -= 0.5 * float((G * Y).sum())
                continue
            K = s[:, None] * H0 * s[None, :]
            K.diagonal().add_(delta)
            L = torch.linalg.cholesky(K)
            Y = s[:, None] * torch.cholesky_solve(s[:, None] * G, L)
            total -= 0.5 * float((G * Y).sum())
            Rres = G - H0 @ Y
            grad -= ((Rres * Rres).sum(1) / (2 * delta)).reshape(-1, w).sum(1)
        return total, grad

    def certificate(self, value: float, grad: Tensor, z: Tensor, k: int) -> float:
        """φ(z) + min over the feasible set of the linearisation: a valid lower bound."""
        neg = torch.clamp(grad, max=0)
        best = torch.topk(neg, k, largest=False).values.sum()
        return value + float(best) - float((grad * z).sum())


@register(
    "relaxation",
    kinds=["reconstruction"],
    exact=False,
    options={"max_iter": 200, "rtol": 1e-6, "polish": False},
    description="perspective relaxation: certified lower bound, rounded support",
)
def relaxation(
    problem: Reconstruction,
    *,
    time_limit: float | None,
    seed: int,
    max_iter: int = 200,
    rtol: float = 1e-6,
    polish: bool = False,
    **_: Any,
) -> SolveResult:
    """Lower bound from the perspective relaxation; solution = rounded relaxed z.

    Parameters
    ----------
    max_iter : int
        Projected-gradient iterations (each: one p x p Cholesky per consumer input).
    rtol : float
        Stop when the relaxation's own gap (φ(z) − bound) falls below ``rtol · c``.
    polish : bool
        Run ``local_search`` from the rounded support.

    ``bound`` is the certified lower bound on the optimum of the original problem (valid at
    every iterate, so also when the time limit stops it: status ``limit``); status is
    ``optimal`` only when the rounded support meets it.
    """
    deadline = Deadline(time_limit)
    trace = Trace(deadline)
    g, k = problem.num_units, problem.keep
    relax = _Relaxation(problem)
    z = torch.full((g,), k / g, dtype=problem.dtype, device=problem.device)
    value, grad = relax.value_grad(z)
    bound = relax.certificate(value, grad, z, k)
    scale = max(problem.constant, 1e-300)
    step = 1.0 / max(float(grad.abs().max()), 1e-300)
    iters = 0
    timed_out = False
    for iters in range(1, max_iter + 1):  # noqa: B007 - reported
        if value - bound <= rtol * scale:
            break
        if deadline.expired():
            timed_out = True
            break
        while True:  # backtracking on the projected gradient step
            z_new = project_capped_simplex(z - step * grad, k)
            v_new, g_new = relax.value_grad(z_new)
            diff = z_new - z
            if v_new <= value + float((grad * diff).sum()) + float((diff * diff).sum()) / (2 * step) + 1e-15 * scale:
                break
            step *= 0.5
            if step < 1e-300:
                break
        z, value, grad = z_new, v_new, g_new
        bound = max(bound, relax.certificate(value, grad, z, k))
        step *= 2.0
    order = torch.argsort(-(z - 1e-12 * grad / max(float(grad.abs().max()), 1e-300)), stable=True)
    support = sorted(order[:k].tolist())
    info: dict[str, Any] = {"relaxed_value": value, "relaxed_z": z.detach().cpu().tolist()}
    if polish:
        from secateurs.solvers.reconstruction_local_search import local_search

        remaining = deadline.remaining()
        polished = local_search(problem, time_limit=None if math.isinf(remaining) else max(remaining, 1e-3),
                                seed=seed, start=support)
        support = polished.solution
        info["polish_swaps"] = polished.iterations
    result = finish(problem, support, Status.LIMIT if timed_out else Status.FEASIBLE, bound=bound,
                    iterations=iters, info=info)
    if result.objective - bound <= 1e-9 * scale:
        result.status = Status.OPTIMAL
    trace.record(result.objective)
    result.trace = trace.points
    return result
