"""Expected params/FLOPs under independent Bernoulli gates, differentiable in the probabilities.

The cost is a polynomial of degree two in the keep counts k_g = Σ_i ξ_l(g)·ξ_{g,i}. With unit
gates ξ_{g,i} ~ Bern(θ_{g,i}) and an optional layer gate ξ_l ~ Bern(θ_l) shared by every group
inside a removable block l (ξ_l² = ξ_l), the expectation is exact:

    E[k_g]       = θ_l(g) · Σ_i θ_{g,i}
    E[k_g k_h]   = Π_{l ∈ {l(g), l(h)}} θ_l · (Σθ_g)(Σθ_h)                      (g ≠ h)
    E[k_g²]      = θ_l(g) · ((Σθ_g)² + Σ θ_{g,i}(1 − θ_{g,i}))

so the regulariser of complexity-aware training is a multilinear function of θ whose minima over
the box are 0/1 vertices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from secateurs.cost import Polynomial


def expected_cost(
    polynomial: Polynomial,
    unit_probs: Mapping[str, torch.Tensor],
    *,
    fixed: Mapping[str, float] | None = None,
    layer_of: Mapping[str, str] | None = None,
    layer_probs: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """E[polynomial(k)] for gated groups ``unit_probs`` and deterministic counts ``fixed``.

    Parameters
    ----------
    polynomial : Polynomial
        Params or FLOPs over group keep counts (``graph.cost_model.params``).
    unit_probs : mapping group → (size,) tensor of probabilities
    fixed : mapping group → keep count, for groups without gates (frozen ones, at full size)
    layer_of : mapping group → layer name, for groups inside a removable block
    layer_probs : mapping layer name → scalar tensor
    """
    fixed = dict(fixed or {})
    layer_of = dict(layer_of or {})
    layer_probs = dict(layer_probs or {})
    missing = polynomial.variables() - set(unit_probs) - set(fixed)
    if missing:
        raise KeyError(f"no probabilities or fixed counts for groups: {sorted(missing)}")
    reference = next(iter(unit_probs.values()), None)
    dtype = reference.dtype if reference is not None else torch.float64
    device = reference.device if reference is not None else None

    def mean(g: str) -> torch.Tensor:
        if g in fixed:
            return torch.tensor(float(fixed[g]), dtype=dtype, device=device)
        return unit_probs[g].sum()

    def layers(*groups: str) -> torch.Tensor:
        names = {layer_of[g] for g in groups if g in layer_of and g not in fixed}
        out = torch.ones((), dtype=dtype, device=device)
        for name in sorted(names):
            out = out * layer_probs[name]
        return out

    total = torch.tensor(float(polynomial.constant), dtype=dtype, device=device)
    for g, a in polynomial.linear.items():
        total = total + a * layers(g) * mean(g)
    for (g, h), b in polynomial.bilinear.items():
        if g == h and g not in fixed:
            p = unit_probs[g]
            second = p.sum() ** 2 + (p * (1 - p)).sum()
        else:
            second = mean(g) * mean(h)
        total = total + b * layers(g, h) * second
    return total
