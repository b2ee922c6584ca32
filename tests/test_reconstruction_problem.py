"""Reconstruction problem: constructors, statistics, refit and validation messages."""

from __future__ import annotations

import math

import pytest
import torch

from secateurs.errors import ValidationError
from secateurs.problems import Reconstruction, ReconstructionStatistics, reconstruction
from secateurs.testing import diagonal_reconstruction, random_reconstruction


def _data(seed: int = 0, n: int = 40, p: int = 6, m: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, generator=g, dtype=torch.float64), torch.randn(m, p, generator=g, dtype=torch.float64)


def test_from_activations_matches_definition() -> None:
    X, W = _data()
    prob = Reconstruction.from_activations(X, W, keep=3)
    lam = 0.01 * float((X.T @ X).diagonal().mean())
    assert prob.ridge == (pytest.approx(lam),)
    torch.testing.assert_close(prob.H, X.T @ X + lam * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(prob.G, prob.H @ W.T)
    assert prob.constant == pytest.approx(0.5 * float(torch.trace(W @ prob.H @ W.T)))
    assert prob.evaluate(range(6)) == pytest.approx(-prob.constant)
    assert prob.relative_error(range(6)) == pytest.approx(0.0, abs=1e-12)


def test_objective_plus_constant_is_reconstruction_error() -> None:
    X, W = _data(1)
    prob = Reconstruction.from_activations(X, W, keep=2, ridge=0.3)
    S = [1, 4]
    (B,) = prob.refit(S)
    assert B.shape == W.shape
    assert torch.all(B[:, [0, 2, 3, 5]] == 0)
    error = 0.5 * float(((X @ W.T - X @ B.T) ** 2).sum()) + 0.5 * 0.3 * float(((W - B) ** 2).sum())
    assert prob.evaluate(S) + prob.constant == pytest.approx(error, rel=1e-10)
    assert prob.relative_error(S) == pytest.approx(error / prob.constant, rel=1e-10)
    (Bc,) = prob.refit(S, compact=True)
    torch.testing.assert_close(Bc, B[:, S])
    # refit is the least-squares optimum: masked dense weights do no better
    assert prob.masked_objective(S) >= prob.evaluate(S) - 1e-9


def test_streaming_statistics_equal_one_shot() -> None:
    X, W = _data(2, n=100)
    stats = ReconstructionStatistics()
    for chunk in X.split(17):
        stats.update(chunk.reshape(-1, 1, 6))  # leading dims are flattened
    assert stats.rows == 100
    a = stats.problem(W, keep=4)
    b = Reconstruction.from_activations(X, W, keep=4)
    torch.testing.assert_close(a.H, b.H)
    assert a.evaluate([0, 1, 2, 3]) == pytest.approx(b.evaluate([0, 1, 2, 3]))


def test_from_hessian_with_g_or_w_agree_and_several_inputs_add() -> None:
    X, W = _data(3)
    X2, W2 = _data(4, m=2)
    a = Reconstruction.from_activations(X, W, keep=3)
    b = Reconstruction.from_hessian(a.H, a.G, keep=3)
    c = Reconstruction.from_hessian(a.H, W=W, keep=3)
    for prob in (b, c):
        assert prob.evaluate([0, 2, 5]) == pytest.approx(a.evaluate([0, 2, 5]))
    a2 = Reconstruction.from_activations(X2, W2, keep=3)
    both = Reconstruction.from_activations([X, X2], [W, W2], keep=3)
    assert both.evaluate([1, 3, 4]) == pytest.approx(a.evaluate([1, 3, 4]) + a2.evaluate([1, 3, 4]))
    assert Reconstruction.combine([a, a2]).evaluate([1, 3, 4]) == pytest.approx(both.evaluate([1, 3, 4]))
    assert len(both.refit([1, 3, 4])) == 2
    # consumers sharing one input stack their weights
    shared = Reconstruction.from_activations(X, [W, W[:1]], keep=3)
    assert shared.num_outputs == 4


def test_unit_width_blocks_and_with_keep() -> None:
    prob = random_reconstruction(0, units=4, unit_width=3, keep=2)
    assert prob.columns([0, 2]).tolist() == [0, 1, 2, 6, 7, 8]
    assert prob.with_keep(3).keep == 3 and prob.keep == 2
    assert prob.with_keep(3).hessians[0] is prob.hessians[0]


def test_cholesky_factors_are_those_of_the_hessians_and_shared_by_with_keep() -> None:
    X, W = _data(1, p=6)
    prob = Reconstruction.from_hessian([X.T @ X, 2 * X.T @ X], W=[W, W[:2]], keep=3, ridge=0.5)
    for i, H in enumerate(prob.hessians):
        L = prob.factor(i)
        assert torch.equal(L, torch.tril(L))
        assert torch.allclose(L @ L.T, H, rtol=1e-12, atol=1e-12)
        assert prob.with_keep(2).factor(i) is L
    first, second = prob.factor(0), prob.factor(1)
    prob.release_factors(1)  # that one only
    assert prob.factor(0) is first and prob.factor(1) is not second and torch.equal(prob.factor(1), second)
    prob.release_factors()
    assert prob.factor(0) is not first and torch.equal(prob.factor(0), first)
    combined = Reconstruction.combine([prob, prob])  # built unchecked: factors computed on demand
    assert torch.allclose(combined.factor(3), prob.factor(1), rtol=0, atol=0)


def test_hessians_within_rounding_of_symmetric_are_symmetrised() -> None:
    X, W = _data(p=5)
    H = X.T @ X + torch.eye(5, dtype=torch.float64)
    skewed = H.clone()
    skewed[0, 1] += 1e-10 * float(H.abs().max())  # a GEMM's rounding, below the 1e-8 tolerance
    for given in (H, skewed):
        prob = Reconstruction.from_hessian(given, W=W, keep=2)
        assert torch.equal(prob.H, prob.H.T)
        torch.testing.assert_close(prob.H, H, rtol=1e-9, atol=0)
        torch.testing.assert_close(prob.factor(0) @ prob.factor(0).T, prob.H)
    assert float(Reconstruction.from_hessian(skewed, W=W, keep=2).H[1, 0]) == (float(skewed[0, 1]) + float(H[1, 0])) / 2


@pytest.mark.parametrize("where", [(0, 6), (6, 0), (10, 3), (3, 10)])
def test_asymmetry_is_measured_across_row_blocks(monkeypatch: pytest.MonkeyPatch, where: tuple[int, int]) -> None:
    """The check reads H a block of rows at a time (3 rows of 11 here): an entry off its mirror in
    any block, above or below the diagonal, is found and measured as ``H - H.T`` whole says."""
    monkeypatch.setattr(reconstruction, "_ROWS_BLOCK", 33)
    X, W = _data(p=11, m=2)
    H = X.T @ X + torch.eye(11, dtype=torch.float64)
    H[where] += 0.5
    assert reconstruction._asymmetry(H) == float((H - H.T).abs().max()) == 0.5
    with pytest.raises(ValidationError, match=r"^H: is not symmetric \(max \|H - Hᵀ\| = 0\.5,"):
        Reconstruction.from_hessian(H, W=W, keep=2)


def test_check_names_each_violation() -> None:
    prob = random_reconstruction(0, units=5, keep=3)
    assert prob.check([0, 1, 4]) == []
    (msg,) = prob.check([0, 1])
    assert msg.startswith("cardinality")
    assert any(v.startswith("range") for v in prob.check([0, 1, 9]))
    assert any(v.startswith("duplicates") for v in prob.check([0, 1, 1]))
    assert prob.check("abc")[0].startswith("solution")


def test_diagonal_problem_is_separable() -> None:
    prob = diagonal_reconstruction([5.0, 1.0, 4.0], keep=2)
    assert prob.evaluate([0, 2]) == pytest.approx(-4.5)
    assert prob.constant == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda X, W: Reconstruction.from_activations(X, W[:, :5], keep=2), r"^W: shape \(3, 5\) does not match X's 6"),
        (lambda X, W: Reconstruction.from_activations(X, W, keep=0), r"^keep: must be between 1 and num_units=6, got 0"),
        (lambda X, W: Reconstruction.from_activations(X, W, keep=7), r"^keep: .*got 7"),
        (lambda X, W: Reconstruction.from_activations(X, W, keep=2.5), r"^keep: must be an integer"),
        (lambda X, W: Reconstruction.from_activations(X, W, keep=2, unit_width=4), r"^unit_width: 4 does not divide"),
        (lambda X, W: Reconstruction.from_activations(X, W, keep=2, ridge=-1.0), r"^ridge: must be a finite"),
        (lambda X, W: Reconstruction.from_activations(X.index_fill(0, torch.tensor([3]), math.nan), W, keep=2),
         r"^X: contains 6 non-finite"),
        (lambda X, W: Reconstruction.from_activations(X, W * math.inf, keep=2), r"^W: contains 18 non-finite"),
        (lambda X, W: Reconstruction.from_hessian(X.T @ X - 1e3 * torch.eye(6, dtype=X.dtype), W=W, keep=2),
         r"^H: is not positive definite \(smallest eigenvalue"),
        (lambda X, W: Reconstruction.from_hessian(X.T @ X + torch.triu(torch.ones(6, 6, dtype=X.dtype)), W=W,
                                                  keep=2), r"^H: is not symmetric"),
        (lambda X, W: Reconstruction.from_hessian(X.T @ X, torch.ones(5, 2, dtype=X.dtype), keep=2),
         r"^G: shape \(5, 2\) does not match H's \(6, 6\)"),
        (lambda X, W: Reconstruction.from_hessian(X.T @ X, keep=2), r"^G: give exactly one of G"),
        (lambda X, W: Reconstruction.from_hessian(X[:, :5].T @ X[:, :5], W=W, keep=2),
         r"^W: shape \(3, 6\) does not match H's 5 input columns"),
        (lambda X, W: ReconstructionStatistics().problem(W, keep=2), r"^X: no calibration rows"),
        (lambda X, W: ReconstructionStatistics().update(X).update(X[:, :4]), r"^X: shape \(40, 4\) has 4 features"),
        (lambda X, W: Reconstruction.combine([Reconstruction.from_activations(X, W, keep=2),
                                              Reconstruction.from_activations(X[:, :4], W[:, :4], keep=2)]),
         r"^problems\[1\]: 4 units of width 1 do not match problems\[0\]'s 6 units"),
    ],
)
def test_bad_input_raises_validation_error_naming_the_field(build: object, pattern: str) -> None:
    X, W = _data()
    with pytest.raises(ValidationError, match=pattern):
        build(X, W)  # type: ignore[operator]


def test_evaluate_rejects_bad_supports() -> None:
    prob = random_reconstruction(0, units=5, keep=3)
    with pytest.raises(ValidationError, match=r"^support: contains duplicate"):
        prob.evaluate([1, 1, 2])
    with pytest.raises(ValidationError, match=r"^support: unit indices must lie in 0..4"):
        prob.evaluate([1, 5, 2])
    assert prob.evaluate([]) == 0.0


def test_tensors_keep_dtype_choice_and_problem_is_frozen() -> None:
    X, W = _data()
    prob = Reconstruction.from_activations(X.float(), W.float(), keep=2)
    assert prob.dtype == torch.float64
    with pytest.raises(AttributeError):
        prob.keep = 3  # type: ignore[misc]


def test_malformed_activations_and_hessians_name_their_field() -> None:
    W = torch.randn(2, 6, dtype=torch.float64)
    with pytest.raises(ValidationError, match=r"^X: expected a tensor or array of numbers, got str"):
        Reconstruction.from_activations("abc", W, keep=2)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"^X: has no rows"):
        Reconstruction.from_activations(torch.randn(0, 6, dtype=torch.float64), W, keep=2)
    with pytest.raises(ValidationError, match=r"^H: must be a square \(p, p\) matrix, got shape \(5, 6\)"):
        Reconstruction.from_hessian(torch.randn(5, 6, dtype=torch.float64), W=W, keep=2)
