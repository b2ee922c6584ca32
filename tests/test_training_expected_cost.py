"""Expected cost under Bernoulli gates equals the brute-force expectation over all gate states."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from secateurs.cost import Polynomial
from secateurs.training.expected_cost import expected_cost


@st.composite
def gated_polynomials(draw: st.DrawFn) -> tuple[Polynomial, dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    sizes = {f"g{i}": draw(st.integers(1, 3)) for i in range(draw(st.integers(1, 3)))}
    names = list(sizes)
    coef = st.floats(0.0, 5.0)
    linear = {g: draw(coef) for g in names if draw(st.booleans())}
    bilinear = {(g, h): draw(coef) for g in names for h in names if g <= h and draw(st.booleans())}
    probs = {g: torch.tensor(draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)), dtype=torch.float64)
             for g, n in sizes.items()}
    layer_of = {g: draw(st.sampled_from(["A", "B"])) for g in names if draw(st.booleans())}
    layer_probs = {name: torch.tensor(draw(st.floats(0, 1)), dtype=torch.float64) for name in ("A", "B")}
    return Polynomial(draw(coef), linear, bilinear), probs, layer_of, layer_probs


def _brute_force(poly: Polynomial, probs: dict[str, torch.Tensor], layer_of: dict[str, str],
                 layer_probs: dict[str, torch.Tensor]) -> float:
    names = list(probs)
    units = [(g, i) for g in names for i in range(probs[g].numel())]
    layers = sorted(layer_probs)
    total = 0.0
    for unit_bits in itertools.product((0, 1), repeat=len(units)):
        p_units = 1.0
        for (g, i), bit in zip(units, unit_bits, strict=True):
            q = float(probs[g][i])
            p_units *= q if bit else 1 - q
        for layer_bits in itertools.product((0, 1), repeat=len(layers)):
            p = p_units
            on = {}
            for name, bit in zip(layers, layer_bits, strict=True):
                q = float(layer_probs[name])
                p *= q if bit else 1 - q
                on[name] = bit
            keep = {g: 0 for g in names}
            for (g, _), bit in zip(units, unit_bits, strict=True):
                keep[g] += bit * (on[layer_of[g]] if g in layer_of else 1)
            total += p * poly.evaluate(keep)
    return total


@given(gated_polynomials())
def test_expectation_is_exact(case: tuple) -> None:
    poly, probs, layer_of, layer_probs = case
    got = float(expected_cost(poly, probs, layer_of=layer_of, layer_probs=layer_probs))
    assert got == pytest.approx(_brute_force(poly, probs, layer_of, layer_probs), rel=1e-9, abs=1e-9)


def test_fixed_groups_enter_at_their_count_and_gradients_flow() -> None:
    poly = Polynomial(1.0, {"a": 2.0}, {("a", "b"): 3.0, ("b", "b"): 0.5})
    p = torch.tensor([0.5, 1.0], dtype=torch.float64, requires_grad=True)
    value = expected_cost(poly, {"a": p}, fixed={"b": 4})
    assert value.item() == pytest.approx(1 + 2 * 1.5 + 3 * 1.5 * 4 + 0.5 * 16)
    value.backward()
    torch.testing.assert_close(p.grad, torch.full((2,), 2.0 + 12.0, dtype=torch.float64))
    with pytest.raises(KeyError, match="no probabilities or fixed counts for groups: \\['b'\\]"):
        expected_cost(poly, {"a": p})
