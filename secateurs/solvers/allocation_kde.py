"""FCPTS's differentiable allocation: one threshold per layer, KDE-smoothed, learned by gradient.

Per group ``g`` a threshold ``t_g ≥ 0`` on its unit scores ``s`` (weights, magnitudes or any
score given as ``Allocation.scores``; without scores an evenly spread grid on [-1, 1], so the
pruned fraction is ≈ t). The pruned fraction is ``r_g(t) = F_g(t) − F_g(−t)`` with ``F_g`` the
CDF of a Gaussian kernel density estimate of ``s`` (Silverman bandwidth), so
``∂r/∂t = p̂(t) + p̂(−t)`` never vanishes the way a hard count does. The keep count is
``k_g = lo_g + (hi_g − lo_g)·(1 − r_g)`` over the allowed range (ours: FCPTS keeps ``1 − r`` of
the layer; the affine map keeps every ``k`` allowed and the gradient alive).

The loss is the error table interpolated piecewise-linearly in ``k`` (costs too: exact for
linear and bilinear terms, whose tables are multilinear) plus the exact ℓ1 penalty
``μ·Σ_r max(0, cost_r − limit_r)/scale_r`` (FCPTS's ``λ|Σ N_l r_l/Σ N_l − R|`` made one-sided
because budgets are inequalities; above the optimal multiplier it meets the budget exactly; μ
is raised tenfold while the continuous plan still violates). Thresholds start from the uniform
keep fraction that meets the budgets (ERK reduces to uniform without layer shapes, which an
Allocation does not carry) and are optimised with Adam. The continuous plan is rounded to the
nearest allowed levels and repaired / polished by the greedy moves of ``greedy``.
Scores longer than ``sample`` are replaced by ``sample`` evenly spaced quantiles.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from secateurs.problems.allocation import Allocation, AllocationTables
from secateurs.solvers.allocation_baselines import LocalMoves
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status, Trace

_SQRT2 = math.sqrt(2.0)


class _Surrogate:
    """Differentiable error and costs of continuous keep counts, from the compiled tables."""

    def __init__(self, t: AllocationTables) -> None:
        self.t = t
        G, R = t.n, t.r
        lmax = max(2, max(lv.shape[0] for lv in t.levels))
        LV = np.zeros((G, lmax))
        E = np.zeros((G, lmax))
        U = np.zeros((R, G, lmax))
        for g, lv in enumerate(t.levels):
            L = lv.shape[0]
            LV[g, :L] = lv
            LV[g, L:] = lv[-1] + np.arange(1, lmax - L + 1)
            E[g, :L], E[g, L:] = t.error[g], t.error[g][-1]
            U[:, g, :L], U[:, g, L:] = t.unary[g], t.unary[g][:, -1:]
        self.lo = torch.tensor([lv[0] for lv in t.levels], dtype=torch.float64)
        self.hi = torch.tensor([lv[-1] for lv in t.levels], dtype=torch.float64)
        self.LV, self.E, self.U = (torch.tensor(a, dtype=torch.float64) for a in (LV, E, U))
        keys = sorted(t.pairs)
        self.ea = torch.tensor([g for g, _ in keys], dtype=torch.long)
        self.eb = torch.tensor([h for _, h in keys], dtype=torch.long)
        P = np.zeros((len(keys), R, lmax, lmax))
        for e, k in enumerate(keys):
            p = t.pairs[k]
            P[e] = np.pad(p, ((0, 0), (0, lmax - p.shape[1]), (0, lmax - p.shape[2])), mode="edge")
        self.P = torch.tensor(P, dtype=torch.float64)
        self.const = torch.tensor(t.constant, dtype=torch.float64)
        self.limit = torch.tensor(t.limit, dtype=torch.float64)
        self.scale = torch.tensor(t.scale, dtype=torch.float64)
        self.lmax = lmax

    def _where(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.searchsorted(self.LV, k.unsqueeze(1).contiguous(), right=True).squeeze(1) - 1
        idx = idx.clamp(0, self.lmax - 2)
        a = self.LV.gather(1, idx.unsqueeze(1)).squeeze(1)
        b = self.LV.gather(1, (idx + 1).unsqueeze(1)).squeeze(1)
        return idx, ((k - a) / (b - a)).clamp(0.0, 1.0)

    def __call__(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(error, costs (R,)) at continuous keep counts ``k`` (G,)."""
        idx, w = self._where(k)
        rows = torch.arange(k.shape[0])
        err = ((1 - w) * self.E[rows, idx] + w * self.E[rows, idx + 1]).sum()
        cost = self.const + ((1 - w) * self.U[:, rows, idx] + w * self.U[:, rows, idx + 1]).sum(dim=1)
        if self.P.shape[0]:
            ia, ib, wa, wb = idx[self.ea], idx[self.eb], w[self.ea], w[self.eb]
            e = torch.arange(self.P.shape[0])
            corner = ((1 - wa) * (1 - wb))[:, None] * self.P[e, :, ia, ib] + ((1 - wa) * wb)[:, None] * self.P[e, :, ia, ib + 1] \
                + (wa * (1 - wb))[:, None] * self.P[e, :, ia + 1, ib] + (wa * wb)[:, None] * self.P[e, :, ia + 1, ib + 1]
            cost = cost + corner.sum(dim=0)
        return err, cost

    def violation(self, cost: torch.Tensor) -> torch.Tensor:
        return (torch.relu(cost - self.limit) / self.scale).sum()


def _scores(problem: Allocation, sample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group score samples (G, m), normalised by max |s|, and Silverman bandwidths (G,)."""
    rows, bands = [], []
    m = sample
    for g in problem.groups:
        s = None if problem.scores is None else problem.scores.get(g)
        s = np.linspace(-1.0, 1.0, m) if s is None else np.quantile(np.asarray(s, dtype=np.float64), np.linspace(0, 1, m))
        s = s / max(float(np.abs(s).max()), 1e-300)
        sigma = float(s.std())
        iqr = float(np.subtract(*np.percentile(s, [75, 25]))) / 1.34
        spread = min(sigma, iqr) if iqr > 0 else sigma
        bands.append(max(0.9 * spread * m ** (-0.2), 1e-6))
        rows.append(s)
    return torch.tensor(np.array(rows), dtype=torch.float64), torch.tensor(bands, dtype=torch.float64)


def pruned_fraction(t: torch.Tensor, scores: torch.Tensor, band: torch.Tensor) -> torch.Tensor:
    """r(t) = F(t) − F(−t) for Gaussian-KDE CDFs F, one threshold per row of ``scores``."""
    def cdf(z: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1 + torch.erf(z / _SQRT2))

    return (cdf((t[:, None] - scores) / band[:, None]) - cdf((-t[:, None] - scores) / band[:, None])).mean(dim=1)


@register("kde", kinds=["allocation"], exact=False,
          options={"steps": 400, "lr": 0.1, "penalty": 1.0, "sample": 256, "polish": True},
          requires=("torch",),
          description="FCPTS: KDE-smoothed per-layer thresholds learned by gradient, rounded and repaired")
def kde(problem: Allocation, *, time_limit: float | None, seed: int, steps: int, lr: float, penalty: float,
        sample: int, polish: bool) -> SolveResult:
    """Differentiable allocation (see the module docstring).

    Options
    -------
    steps : int
        Adam steps per penalty level.
    lr : float
        Adam step size on the threshold parameters.
    penalty : float
        Initial ℓ1 penalty weight μ (raised ×10 up to three times while the budget is violated).
    sample : int
        Score quantiles per group used by the KDE.
    polish : bool
        After rounding, improve with greedy moves (repair always runs when rounding is infeasible).
    """
    torch.manual_seed(seed)
    deadline = Deadline(time_limit)
    t = problem.tables
    sur = _Surrogate(t)
    S, band = _scores(problem, sample)
    span = sum(float(e.max() - e.min()) for e in t.error) or 1.0

    def keep(tau: torch.Tensor) -> torch.Tensor:
        return sur.lo + (sur.hi - sur.lo) * (1 - pruned_fraction(tau, S, band))

    with torch.no_grad():  # uniform start: the largest common keep fraction whose plan fits
        lo_r, hi_r = 0.0, 1.0
        for _ in range(40):
            mid = 0.5 * (lo_r + hi_r)
            _, c = sur(sur.lo + (sur.hi - sur.lo) * mid)
            lo_r, hi_r = (mid, hi_r) if sur.violation(c) <= 0 else (lo_r, mid)
        target = torch.full((t.n,), 1 - lo_r, dtype=torch.float64)  # pruned fraction wanted
        a = torch.zeros(t.n, dtype=torch.float64)
        b = torch.full((t.n,), 1.0 + 10 * float(band.max()), dtype=torch.float64)
        for _ in range(50):
            mid = 0.5 * (a + b)
            below = pruned_fraction(mid, S, band) < target
            a, b = torch.where(below, mid, a), torch.where(below, b, mid)
        tau0 = 0.5 * (a + b)
    theta = torch.log(torch.expm1(tau0.clamp_min(1e-6))).requires_grad_(True)
    mu = float(penalty)
    done = 0
    for _level in range(4):
        optimiser = torch.optim.Adam([theta], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(int(steps), 1), eta_min=lr / 100)
        for _ in range(int(steps)):
            if deadline.expired():
                break
            optimiser.zero_grad()
            err, cost = sur(keep(torch.nn.functional.softplus(theta)))
            loss = err / span + mu * sur.violation(cost)
            loss.backward()
            optimiser.step()
            schedule.step()
            done += 1
        with torch.no_grad():
            err, cost = sur(keep(torch.nn.functional.softplus(theta)))
        if float(sur.violation(cost)) <= 1e-4 or deadline.expired():
            break
        mu *= 10
    with torch.no_grad():
        k = keep(torch.nn.functional.softplus(theta)).numpy()
        err, cost = sur(torch.tensor(k))
    x = np.array([int(np.argmin(np.abs(lv - kg))) for lv, kg in zip(t.levels, k, strict=True)], dtype=np.int64)
    info: dict[str, Any] = {"continuous_error": float(err), "continuous_costs": cost.tolist(), "penalty": mu,
                            "steps": done, "rounded_feasible": t.feasible(x), "uniform_start": lo_r}
    moves = LocalMoves(t, x)
    trace = Trace(deadline)
    if not moves.repair(deadline):
        status = Status.LIMIT if deadline.expired() else Status.ERROR  # not a proof of infeasibility
        return SolveResult(status, math.nan, None, iterations=done,
                           info={**info, "note": "repair found no feasible rounding; not a proof of infeasibility"})
    info["repaired_error"] = t.objective(moves.x)
    if polish:
        moves.improve(deadline)
    sol = problem.keep_of(moves.x)
    obj = problem.evaluate(sol)
    trace.record(obj)
    return SolveResult(Status.LIMIT if deadline.expired() else Status.FEASIBLE, obj, sol, iterations=done,
                       trace=trace.points, info=info)
