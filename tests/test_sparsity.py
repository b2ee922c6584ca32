"""Layer masks and refits against independent computations (explicit residuals, lstsq)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import secateurs.sparsity
from secateurs.errors import ValidationError
from secateurs.sparsity import (
    density_mask,
    masked_error,
    nm_mask,
    quadratic_trace,
    reconstruction_scores,
    refit_rows,
)


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


@pytest.mark.parametrize(("rows", "ridge"), [(64, None), (64, 0.0), (8, 0.0)])
def test_refit_rows_is_the_ridge_least_squares_whichever_side_is_smaller(
        rows: int, ridge: float | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows keeping far more inputs than they remove go through (H + λI)⁻¹ (the removed side), the
    others through H_SS (the kept side); with λ = 0 and fewer samples than inputs H is singular
    and every row takes the kept side. Each row must be the least-squares solution regardless."""
    X, W = _data(7, out=70, p=12, n=rows)
    H = X.T @ X
    g = torch.Generator().manual_seed(1)
    kept = [0, 1, 5, 6, 7, 11, 12] if rows >= 12 else [0, 1, 3, 5, 6, 7, 8]  # at most n kept when λ = 0
    mask = torch.zeros(70, 12, dtype=torch.bool)
    for i in range(70):
        mask[i, torch.randperm(12, generator=g)[:kept[i % 7]]] = True
    inverses: list[torch.Tensor | None] = []
    real_inverse = secateurs.sparsity._ridge_inverse
    monkeypatch.setattr(secateurs.sparsity, "_ridge_inverse", lambda *a: inverses.append(real_inverse(*a)) or inverses[-1])
    lam = 0.01 * float(H.diagonal().mean()) if ridge is None else ridge
    refit = refit_rows(W, H, mask, ridge=ridge)
    assert len(inverses) == 1 and (inverses[0] is None) == (rows < 12)  # the removed side was taken, or could not be
    assert torch.all(refit[~mask] == 0)
    for i in range(70):
        support = mask[i].nonzero().squeeze(1)
        if support.numel() == 0:
            continue
        # min ‖X_S w − X ŵ‖² + λ‖w − ŵ‖²: the ridge's rows pull each kept weight toward ŵ
        design = torch.cat([X[:, support], lam ** 0.5 * torch.eye(12, dtype=torch.float64)[:, support]])
        goal = torch.cat([X @ W[i], lam ** 0.5 * W[i]])
        expected = torch.linalg.lstsq(design, goal).solution
        torch.testing.assert_close(refit[i, support], expected, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("columns", [7, 512, 513, 1100])  # one block, exactly one, one and a column, three
def test_quadratic_trace_from_the_upper_blocks_equals_the_full_form(columns: int) -> None:
    g = torch.Generator().manual_seed(columns)
    X = torch.randn(40, columns, generator=g, dtype=torch.float64)
    delta = torch.randn(6, columns, generator=g, dtype=torch.float64)
    H = X.T @ X
    H = (H + H.T) / 2
    explicit = float(((delta @ X.T) ** 2).sum())  # ‖Δ Xᵀ‖²: never forms H
    assert quadratic_trace(delta, H) == pytest.approx(explicit, rel=1e-10)


@given(st.integers(0, 1000))
def test_a_diagonal_gram_gives_what_the_diagonal_matrix_gives(seed: int) -> None:
    """A 1-D gram (what an input too wide for its Gram keeps) is the diagonal H = diag(Σx²): scores,
    errors and refits equal those of the full-matrix path on that diagonal matrix."""
    X, W = _data(seed)
    diagonal = (X * X).sum(0)
    H = torch.diag(diagonal)
    torch.testing.assert_close(reconstruction_scores(W, diagonal), reconstruction_scores(W, H), rtol=0, atol=0)
    mask = density_mask(reconstruction_scores(W, diagonal), 30)
    assert masked_error(W, diagonal, mask) == pytest.approx(masked_error(W, H, mask), rel=1e-12)
    torch.testing.assert_close(refit_rows(W, diagonal, mask), refit_rows(W, H, mask), rtol=1e-10, atol=1e-12)
    assert torch.equal(refit_rows(W, diagonal, mask), W * mask)
    with pytest.raises(ValidationError, match=r"^gram: shape \(11,\) does not match weight inputs 12"):
        reconstruction_scores(W, diagonal[:11])
