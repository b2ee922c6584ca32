"""Calibration statistics: unfolded rows reproduce the layer, streaming Gram equals the full one."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from secateurs.calibration import GramStatistics, collect, layer_rows
from secateurs.errors import ValidationError


def _reproduces(module: nn.Module, x: torch.Tensor) -> None:
    rows = layer_rows(module, x)
    flat = rows @ module.weight.reshape(module.weight.shape[0], -1).T + module.bias
    expected = module(x)
    batch, out = expected.shape[0], expected.shape[1]
    torch.testing.assert_close(flat.reshape(batch, -1, out).transpose(1, 2).reshape(expected.shape), expected,
                               rtol=1e-5, atol=1e-5)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.integers(1, 2), st.sampled_from([1, 2]))
def test_conv_rows_reproduce_the_conv(kernel: int, stride: int, padding: int, dilation: int, dims: int) -> None:
    torch.manual_seed(0)
    if dims == 2:
        conv: nn.Module = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
        x = torch.randn(2, 3, 9, 8)
    else:
        conv = nn.Conv1d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation)
        x = torch.randn(2, 3, 10)
    _reproduces(conv, x)


def test_linear_rows_flatten_leading_dims() -> None:
    linear = nn.Linear(5, 3)
    x = torch.randn(2, 7, 5)
    torch.testing.assert_close(layer_rows(linear, x) @ linear.weight.T + linear.bias, linear(x).reshape(-1, 3))


def test_streaming_gram_equals_the_full_gram_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).train()
    batches = [torch.randn(5, 6) for _ in range(4)]
    stats = collect(model, batches, ["2"])
    with torch.no_grad():
        hidden = torch.relu(model[0](torch.cat(batches))).double()
    torch.testing.assert_close(stats["2"].gram, hidden.T @ hidden)
    assert stats["2"].rows == 20 and stats["2"].gram.dtype == torch.float64
    assert model.training and not model[2]._forward_pre_hooks


def test_bad_calibration_is_rejected_naming_the_batch() -> None:
    model = nn.Sequential(nn.Linear(6, 2))
    with pytest.raises(ValidationError, match=r"calibration: no batches"):
        collect(model, [], ["0"])
    with pytest.raises(ValidationError, match=r"calibration: batch 1 contains NaN"):
        collect(model, [torch.randn(2, 6), torch.full((2, 6), float("nan"))], ["0"])
    with pytest.raises(ValidationError, match=r"calibration: batch 0 does not run through the model"):
        collect(model, [torch.randn(2, 5)], ["0"])
    with pytest.raises(ValidationError, match=r"calibration: batch 0 has an empty tensor"):
        collect(model, [torch.zeros(0, 6)], ["0"])
    assert not model[0]._forward_pre_hooks


def test_chunked_float32_products_match_float64_and_exact_mode_is_exact() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9000, 12, generator=g)  # three chunks of rows
    y = x + 0.1 * torch.randn(9000, 12, generator=g)
    fast, exact = GramStatistics(), GramStatistics(exact=True)
    for s in (fast, exact):
        s.update(x[:5000], y[:5000])
        s.update(x[5000:], y[5000:])
    x64, y64 = x.double(), y.double()
    torch.testing.assert_close(exact.gram, x64.T @ x64, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(exact.cross, x64.T @ y64, rtol=1e-12, atol=1e-9)
    for got, want in ((fast.gram, x64.T @ x64), (fast.cross, x64.T @ y64)):
        assert got.dtype == torch.float64
        assert float((got - want).norm() / want.norm()) < 1e-6
    assert fast.rows == exact.rows == 9000
    torch.testing.assert_close(fast.sums, x64.sum(0))
    with pytest.raises(ValidationError, match=r"target: shape \(3, 12\) differs from the input's \(2, 12\)"):
        GramStatistics().update(x[:2], y[:3])


@pytest.mark.parametrize("columns", [385, 1000])  # two row blocks (one of a single column), and three
def test_wide_grams_multiply_the_upper_blocks_and_come_out_exactly_symmetric(columns: int) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5000, columns, generator=g) * torch.linspace(0.1, 3.0, columns)  # rows in two chunks
    x64 = x.double()
    for exact, bound in ((True, 1e-12), (False, 1e-6)):
        s = GramStatistics(exact=exact)
        s.update(x[:4500])
        s.update(x[4500:])  # accumulates onto the first call's sums, lower blocks included
        want = x64.T @ x64
        assert s.gram.dtype == torch.float64 and torch.equal(s.gram, s.gram.T)
        assert float((s.gram - want).norm() / want.norm()) < bound
        assert float((s.gram - want).abs().max() / want.abs().max()) < bound
    ints = GramStatistics()
    ints.update(torch.randint(-3, 4, (50, 400), generator=g))  # integer inputs go through float64, exact
    counted = ints.gram.round()
    assert torch.equal(ints.gram, counted) and torch.equal(counted, counted.T)
