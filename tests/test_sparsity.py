"""Layer masks and refits against independent computations (explicit residuals, lstsq)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secateurs.errors import ValidationError
from secateurs.sparsity import density_mask, masked_error, nm_mask, reconstruction_scores, refit_rows


def _data(seed: int, out: int = 5, p: int = 12, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64), torch.randn(out, p, generator=g, dtype=torch.float64)


@given(st.integers(0, 1000), st.integers(0, 60))
def test_density_mask_keeps_exactly_the_top_scores(seed: int, keep: int) -> None:
    X, W = _data(seed)
    scores = reconstruction_scores(W, X.T @ X)
    mask = density_mask(scores, keep)
    assert int(mask.sum()) == keep
    if 0 < keep < scores.numel():
        assert scores[mask].min() >= scores[~mask].max()


@given(st.integers(0, 1000), st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4)]))
def test_nm_mask_is_exact_per_block(seed: int, nm: tuple[int, int]) -> None:
    n, m = nm
    X, W = _data(seed)
    scores = reconstruction_scores(W, X.T @ X)
    mask = nm_mask(scores, n, m)
    blocks, sblocks = mask.reshape(5, -1, m), scores.reshape(5, -1, m)
    assert torch.all(blocks.sum(-1) == n)
    kept_min = torch.where(blocks, sblocks, torch.inf).min(-1).values
    dropped_max = torch.where(blocks, -torch.inf, sblocks).max(-1).values
    assert torch.all(kept_min >= dropped_max)


@given(st.integers(0, 1000))
def test_masked_error_and_refit_match_explicit_least_squares(seed: int) -> None:
    X, W = _data(seed)
    H = X.T @ X
    mask = density_mask(reconstruction_scores(W, H), 30)
    explicit = 0.5 * float(((X @ W.T - X @ (W * mask).T) ** 2).sum())
    assert masked_error(W, H, mask) == pytest.approx(explicit, rel=1e-9)
    refit = refit_rows(W, H, mask, ridge=0.0)
    assert torch.all(refit[~mask] == 0)
    for i in range(W.shape[0]):
        support = mask[i].nonzero().squeeze(1)
        expected = torch.linalg.lstsq(X[:, support], X @ W[i]).solution
        torch.testing.assert_close(refit[i, support], expected, rtol=1e-7, atol=1e-8)
    refit_error = 0.5 * float(((X @ W.T - X @ refit.T) ** 2).sum())
    assert refit_error <= explicit * (1 + 1e-9)  # the refit is never worse than plain masking


def test_errors_name_the_field() -> None:
    X, W = _data(0)
    with pytest.raises(ValidationError, match=r"gram: shape \(3, 3\) does not match weight inputs 12"):
        reconstruction_scores(W, torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValidationError, match=r"keep: must be in \[0, 60\]"):
        density_mask(W.abs(), 61)
    with pytest.raises(ValidationError, match=r"m: 12 inputs per row are not a multiple of M=5"):
        nm_mask(W.abs(), 2, 5)
