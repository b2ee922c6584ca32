"""Unstructured and N:M masks for one layer: reconstruction-aware scores, projections, refit.

Everything here works on one weight matrix W (out × p, a conv's weight reshaped) and the float64
Gram matrix H = XᵀX of its input. The score |W_ij|·‖X_j‖ (Wanda's) weighs a weight by how much
signal flows through its input; the mask is the projection of the scores onto the constraint set
(top-K for a density, top-N of every M for N:M); the optional refit solves, for each output row,
the least-squares problem min ‖X w − X ŵ‖² + λ‖w − ŵ‖² over weights supported on the mask.
"""

from __future__ import annotations

import torch

from secateurs.errors import ValidationError


def reconstruction_scores(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖ with ‖X_j‖² = (XᵀX)_jj."""
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValidationError("gram", f"shape {tuple(gram.shape)} does not match weight inputs {weight.shape[1]}")
    return weight.abs().to(torch.float64) * torch.sqrt(torch.clamp(torch.diagonal(gram), min=0.0)).unsqueeze(0)


def density_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask of exactly ``keep`` entries: the largest scores (ties by position)."""
    if not 0 <= keep <= scores.numel():
        raise ValidationError("keep", f"must be in [0, {scores.numel()}], got {keep}")
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean N:M mask: the N largest scores in every block of M consecutive inputs of a row."""
    if not 0 < n <= m:
        raise ValidationError("n", f"N:M needs 0 < N <= M, got {n}:{m}")
    if scores.shape[1] % m:
        raise ValidationError("m", f"{scores.shape[1]} inputs per row are not a multiple of M={m}")
    blocks = scores.reshape(scores.shape[0], -1, m)
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    mask.scatter_(-1, torch.topk(blocks, n, dim=-1).indices, True)
    return mask.reshape(scores.shape)


def masked_error(weight: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor) -> float:
    """½ tr(ΔW H ΔWᵀ) for ΔW = W − W⊙mask: the output error of pruning without refit."""
    delta = (weight.to(torch.float64) * (~mask))
    return 0.5 * float(torch.einsum("ij,jk,ik->", delta, gram, delta))


def refit_rows(weight: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor, ridge: float | None = None) -> torch.Tensor:
    """Per-row least-squares refit of W on its kept inputs (zeros elsewhere), in W's dtype.

    Row i solves (H_SS + λI) w_S = (H ŵ_i)_S + λ ŵ_S with S its kept inputs; λ defaults to
    0.01 · mean diag H, the same ridge the structured reconstruction uses.
    """
    h = gram.to(torch.float64)
    lam = 0.01 * float(torch.diagonal(h).mean()) if ridge is None else float(ridge)
    w = weight.to(torch.float64)
    target = w @ h  # row i: H ŵ_i
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        support = mask[i].nonzero().squeeze(1)
        if support.numel() == 0:
            continue
        h_ss = h[support][:, support]  # a copy: the ridge goes on in place
        h_ss.diagonal().add_(lam)
        rhs = (target[i, support] + lam * w[i, support])[:, None]
        # positive definite whenever λ > 0 or X_S has full rank: Cholesky, a quarter faster than LU
        factor, info = torch.linalg.cholesky_ex(h_ss)
        out[i, support] = (torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(h_ss, rhs))[:, 0]
    return out.to(weight.dtype)
