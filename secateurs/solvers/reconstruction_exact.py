"""Exact Reconstruction solvers: exhaustive enumeration and a big-M MIQP (CVXPY + SCIP)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch

from secateurs.errors import SolverError, SolverRefusedError
from secateurs.problems.reconstruction import Reconstruction
from secateurs.solvers._reconstruction_common import finish, positive_int
from secateurs.solvers.registry import register
from secateurs.solvers.result import Deadline, SolveResult, Status, Trace

Tensor = torch.Tensor


def _batched_objectives(problem: Reconstruction, subsets: Tensor) -> Tensor:
    """f for a batch of supports (b, k) at once with batched Cholesky factorisations."""
    w = problem.unit_width
    cols = (subsets[:, :, None] * w + torch.arange(w, device=subsets.device)).reshape(subsets.shape[0], -1)
    total = torch.zeros(subsets.shape[0], dtype=problem.dtype, device=problem.device)
    for H, G in zip(problem.hessians, problem.targets, strict=True):
        Hs = H[cols[:, :, None], cols[:, None, :]]
        L = torch.linalg.cholesky(Hs)
        Z = torch.linalg.solve_triangular(L, G[cols], upper=False)
        total -= 0.5 * (Z * Z).sum((1, 2))
    return total


@register(
    "enumerate",
    kinds=["reconstruction"],
    exact=True,
    options={"max_subsets": 500_000, "batch": 4096},
    description="exhaustive search over every support (tiny problems only)",
)
def enumerate_supports(
    problem: Reconstruction,
    *,
    time_limit: float | None,
    seed: int,
    max_subsets: int = 500_000,
    batch: int = 4096,
    **_: Any,
) -> SolveResult:
    """Evaluate all C(g, k) supports in batches; optimal with bound = objective.

    Raises
    ------
    SolverRefusedError
        When C(g, k) exceeds ``max_subsets`` (the message names both).
    """
    max_subsets, batch = positive_int("max_subsets", max_subsets), positive_int("batch", batch)
    g, k = problem.num_units, problem.keep
    count = math.comb(g, k)
    if count > max_subsets:
        raise SolverRefusedError(
            f"enumerate: C({g}, {k}) = {count:,} supports exceeds max_subsets={max_subsets:,}; "
            "use miqp, local_search or raise max_subsets"
        )
    deadline = Deadline(time_limit)
    trace = Trace(deadline)
    best_value, best_support = math.inf, None
    combos = itertools.combinations(range(g), k)
    done = 0
    while True:
        chunk = list(itertools.islice(combos, batch))
        if not chunk:
            break
        subsets = torch.tensor(chunk, dtype=torch.long, device=problem.device)
        values = _batched_objectives(problem, subsets)
        i = int(torch.argmin(values))
        if float(values[i]) < best_value:
            best_value, best_support = float(values[i]), chunk[i]
            trace.record(best_value)
        done += len(chunk)
        if deadline.expired() and done < count:
            assert best_support is not None
            return finish(problem, best_support, Status.LIMIT, iterations=done, trace=trace.points,
                          info={"enumerated": done, "total": count})
    assert best_support is not None
    result = finish(problem, best_support, Status.OPTIMAL, iterations=count, trace=trace.points,
                    info={"enumerated": count, "total": count})
    # Exhaustive: the optimum is the bound (up to the rounding of the two evaluations).
    result.bound = min(result.objective, best_value)
    return result


def big_m(problem: Reconstruction) -> list[np.ndarray]:
    """A valid bound M[i, j] on |B_ij| for every refit of every support, per consumer input.

    For a fixed support S ∋ i, column j of the refit solves min ½bᵀH_SS b − bᵀg_S, whose optimum
    is f_j(S) = −½ b*ᵀH_SS b*. Dropping units only raises f_j, so f_j(S) ≥ f_j(all) = −c_j with
    c_j = ½ŵ_jᵀHŵ_j, hence b*ᵀH_SS b* ≤ 2c_j, and maximising b_i over that ellipsoid gives
    |b*_i| ≤ sqrt(2c_j (H_SS⁻¹)_ii). Finally (H_SS⁻¹)_ii = 1 / (H_ii − h_iᵀH_{S∖i}⁻¹h_i) grows as S
    grows (the subtracted projection only gets larger), so (H_SS⁻¹)_ii ≤ (H⁻¹)_ii, and

        M_ij = sqrt(2 c_j (H⁻¹)_ii)   (≤ sqrt(2c_j / λ_min(H)) ≤ sqrt(2c_j / λ), λ the ridge).

    The bound does not cut off the optimal B of any support, so the big-M model is exact. A 1%
    margin covers rounding.
    """
    out = []
    for H, G, D in zip(problem.hessians, problem.targets, problem.dense, strict=True):
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(H)).diagonal().clamp_min(0)
        cj = 0.5 * (D * G).sum(0).clamp_min(0)
        out.append((1.01 * torch.sqrt(2 * hinv[:, None] * cj[None, :]) + 1e-12).cpu().numpy())
    return out


@register(
    "miqp",
    kinds=["reconstruction"],
    exact=True,
    options={"verbose": False, "gap": 0.0},
    requires=("cvxpy", "pyscipopt"),
    description="big-M mixed-integer QP in CVXPY solved by SCIP, with SCIP's proven bound",
)
def miqp(
    problem: Reconstruction,
    *,
    time_limit: float | None,
    seed: int,
    verbose: bool = False,
    gap: float = 0.0,
    **_: Any,
) -> SolveResult:
    """min Σ ½‖LᵀB‖² − tr(BᵀG)  s.t.  |B_ij| ≤ M_ij z_u(i),  Σz = k,  z ∈ {0,1}^g.

    The model has p·m continuous variables (p·m per consumer input), so it suits small layers
    (tens of units, a few outputs). For SCIP's numerics the model is solved in scaled variables
    B̃ = Diag(√H_ii)·B with the objective divided by c (both undone in the result). ``bound`` is
    SCIP's dual bound; status ``optimal`` means SCIP closed the gap to ``gap`` (relative, 0 by
    default).
    """
    import cvxpy as cp

    deadline = Deadline(time_limit)
    trace = Trace(deadline)
    g, w = problem.num_units, problem.unit_width
    z = cp.Variable(g, boolean=True)
    expand = np.kron(np.eye(g), np.ones((w, 1)))  # column -> unit incidence (p x g)
    objective = 0
    constraints = [cp.sum(z) == problem.keep]
    variables = []
    unit = max(problem.constant, 1e-300)
    for H, G, M in zip(problem.hessians, problem.targets, big_m(problem), strict=True):
        Hn, Gn = H.detach().cpu().numpy(), G.detach().cpu().numpy()
        sc = np.sqrt(np.diag(Hn))
        Hn = Hn / sc[:, None] / sc[None, :] / unit
        Gn = Gn / sc[:, None] / unit
        M = M * sc[:, None]
        L = np.linalg.cholesky((Hn + Hn.T) / 2)
        B = cp.Variable(Gn.shape)
        variables.append(B)
        objective = objective + 0.5 * cp.sum_squares(L.T @ B) - cp.sum(cp.multiply(B, Gn))
        Zc = cp.reshape(expand @ z, (expand.shape[0], 1), order="F")  # (p, 1) unit indicator per column
        bound = cp.multiply(Zc @ np.ones((1, Gn.shape[1])), M)
        constraints += [B <= bound, B >= -bound]
    program = cp.Problem(cp.Minimize(objective), constraints)
    params: dict[str, Any] = {"limits/gap": float(gap), "randomization/randomseedshift": int(seed)}
    if time_limit is not None:
        params["limits/time"] = float(max(time_limit, 0.01))
    try:
        program.solve(solver=cp.SCIP, verbose=verbose, scip_params=params)
    except cp.error.SolverError as exc:
        if time_limit is not None and deadline.expired():  # out of time before SCIP's first solution
            return SolveResult(Status.LIMIT, math.nan, None, trace=trace.points,
                               info={"note": f"time limit before SCIP found a solution ({exc})"})
        raise SolverError(f"miqp: SCIP failed: {exc}") from exc
    stats = program.solver_stats.extra_stats or {}
    model = stats.get("model")
    scip_status = str(stats.get("scip_status", program.status))
    if z.value is None:
        if time_limit is not None and (deadline.expired() or scip_status in ("timelimit", "time_limit")):
            return SolveResult(Status.LIMIT, math.nan, None, trace=trace.points,
                               info={"scip_status": scip_status, "note": "time limit before SCIP found a solution"})
        raise SolverError(f"miqp: SCIP returned no solution (status {scip_status})")
    support = np.argsort(-np.asarray(z.value))[: problem.keep].tolist()
    dual = -math.inf
    if model is not None:
        try:
            dual = float(model.getDualbound())
        except Exception:  # noqa: BLE001 - SCIP may not expose it after some statuses
            dual = -math.inf
    # CVXPY may hand SCIP a shifted objective; align SCIP's dual bound with the CVXPY value.
    if model is not None and program.value is not None and math.isfinite(dual):
        try:
            dual += float(program.value) - float(model.getPrimalbound())
        except Exception:  # noqa: BLE001
            pass
    dual *= unit  # back from the scaled objective
    optimal = program.status == cp.OPTIMAL and scip_status == "optimal"
    result = finish(problem, support, Status.OPTIMAL if optimal else Status.LIMIT,
                    iterations=int(program.solver_stats.num_iters or 0),
                    info={"scip_status": scip_status,
                          "cvxpy_value": None if program.value is None else float(program.value) * unit})
    # SCIP works to feasibility tolerance 1e-6; keep the bound honest below the exact value.
    result.bound = min(dual, result.objective) - 1e-6 * max(1.0, abs(result.objective)) if math.isfinite(dual) \
        else -math.inf
    trace.record(result.objective)
    result.trace = trace.points
    return result
