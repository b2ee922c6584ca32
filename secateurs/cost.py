"""Exact cost polynomials in per-group keep counts (params, FLOPs).

Every structured cost secateurs models is a polynomial of degree at most two in the keep
counts: a constant (frozen parts), linear terms (biases, norms, depthwise convs, attention
score products) and bilinear terms (a conv's keep_in * keep_out * k*k*H*W). The graph builds
these; the allocation problem and the training regularisers consume them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Polynomial:
    """c + Σ a_g k_g + Σ b_{gh} k_g k_h over group names g, h (g == h allowed: a square)."""

    constant: float = 0.0
    linear: Mapping[str, float] = field(default_factory=dict)
    bilinear: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def variables(self) -> set[str]:
        names = set(self.linear)
        for g, h in self.bilinear:
            names.update((g, h))
        return names

    def evaluate(self, keep: Mapping[str, float]) -> float:
        """Value at ``keep`` (every variable of the polynomial must be given)."""
        missing = self.variables() - set(keep)
        if missing:
            raise KeyError(f"keep counts missing for groups: {sorted(missing)}")
        total = self.constant
        total += sum(a * keep[g] for g, a in self.linear.items())
        total += sum(b * keep[g] * keep[h] for (g, h), b in self.bilinear.items())
        return total

    def fix(self, values: Mapping[str, float]) -> Polynomial:
        """Substitute fixed keep counts (e.g. frozen groups at full size), folding terms down."""
        constant = self.constant
        linear: dict[str, float] = {}
        bilinear: dict[tuple[str, str], float] = {}
        for g, a in self.linear.items():
            if g in values:
                constant += a * values[g]
            else:
                linear[g] = linear.get(g, 0.0) + a
        for (g, h), b in self.bilinear.items():
            if g in values and h in values:
                constant += b * values[g] * values[h]
            elif g in values:
                linear[h] = linear.get(h, 0.0) + b * values[g]
            elif h in values:
                linear[g] = linear.get(g, 0.0) + b * values[h]
            else:
                bilinear[(g, h)] = bilinear.get((g, h), 0.0) + b
        return Polynomial(constant, linear, bilinear)

    def __add__(self, other: Polynomial) -> Polynomial:
        linear = dict(self.linear)
        for g, a in other.linear.items():
            linear[g] = linear.get(g, 0.0) + a
        bilinear = dict(self.bilinear)
        for gh, b in other.bilinear.items():
            bilinear[gh] = bilinear.get(gh, 0.0) + b
        return Polynomial(self.constant + other.constant, linear, bilinear)


@dataclass(frozen=True)
class Cost:
    """Parameters and FLOPs of a (pruned) model; FLOPs as ``FlopCounterMode`` counts them."""

    params: float
    flops: float


@dataclass(frozen=True)
class CostModel:
    """Params and FLOPs polynomials over group keep counts, plus each group's full size."""

    params: Polynomial
    flops: Polynomial
    sizes: Mapping[str, int]

    def full(self) -> dict[str, int]:
        return dict(self.sizes)

    def __call__(self, keep: Mapping[str, float] | None = None) -> Cost:
        """Cost at ``keep`` (missing groups keep all their units)."""
        counts = {**self.sizes, **(keep or {})}
        return Cost(params=self.params.evaluate(counts), flops=self.flops.evaluate(counts))
