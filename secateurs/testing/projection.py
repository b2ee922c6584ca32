"""Hypothesis strategies for Projection problems (gate projections)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from secateurs.problems.projection import Projection


@st.composite
def projections(
    draw: st.DrawFn,
    *,
    min_size: int = 1,
    max_size: int = 12,
    max_budgets: int = 1,
    hierarchy: bool = False,
    density: bool = False,
    binary: bool = False,
    fixed: bool = True,
) -> Projection:
    """Feasible Projection problems: θ₀ around [0, 1], non-negative costs, budgets that fixed
    entries never exceed, an optional forest hierarchy and an optional density (Σθ = total)."""
    n = draw(st.integers(min_size, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    theta0 = rng.normal(0.5, draw(st.sampled_from([0.1, 0.5, 2.0])), n)
    parent = None
    if hierarchy and n > 1:
        parent = -np.ones(n, dtype=np.int64)
        for i in range(1, n):
            if rng.random() < 0.6:
                parent[i] = int(rng.integers(0, i))
    fixed_entries: dict[int, float] = {}
    if fixed and n > 1:
        for i in rng.choice(n, size=int(rng.integers(0, max(1, n // 3) + 1)), replace=False):
            fixed_entries[int(i)] = 0.0 if (binary or rng.random() < 0.5) else float(rng.random())
        if parent is not None:  # a fixed entry may not exceed a fixed ancestor: fix it at 0
            for i in list(fixed_entries):
                p = int(parent[i])
                while p >= 0:
                    if p in fixed_entries:
                        fixed_entries[i] = 0.0
                    p = int(parent[p])
    lo, hi = Projection(theta0, parent=parent, fixed=fixed_entries).bounds()
    total = None
    if density:
        if binary:
            total = float(draw(st.integers(int(np.ceil(lo.sum())), int(np.floor(hi.sum())))))
        else:
            total = float(lo.sum() + (hi.sum() - lo.sum()) * rng.random())
    r = draw(st.integers(0, max_budgets))
    costs = rng.uniform(0.1, 3.0, (r, n))
    budgets = np.array([float(costs[j] @ lo + rng.random() * costs[j] @ (hi - lo)) for j in range(r)])
    return Projection(theta0, costs=costs, budgets=budgets, parent=parent, fixed=fixed_entries,
                      total=total, binary=binary)
