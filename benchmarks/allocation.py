"""Allocation solvers side by side: objective, gap to the exact optimum, budget, seconds.

Instances (seeded, synthetic but shaped like real ones):

- ``chain50``: 50 conv-like groups in a chain, 16 keep levels each, FLOPs bilinear in
  consecutive keep counts (``k_{l-1}·k_l·κ_l``), budget 50% of dense FLOPs; errors convex in the
  pruned fraction with per-layer sensitivity.
- ``resnet50``: the groups of a ResNet-50 at 224 x 224 (5 residual streams, 2 inner widths per
  bottleneck block: 37 groups, 32 keep levels each), FLOPs bilinear in the widths each conv
  joins, budget 50%. Each block's convs and shortcut close cycles (tree width 2): ``dp``
  eliminates them, and CP-SAT and the MIP solve the same problem; errors as in ``chain50``.
- ``resnet152``: the same with ResNet-152's 3, 8, 36 and 3 blocks per stage (105 groups).
- ``unstructured200``: 200 layers, 32 densities each, one nonzeros budget; each layer's error is
  the squared magnitude its pruned weights remove (magnitude pruning of a Gaussian, Laplace or
  Student-t sample scaled by a sensitivity), and the same sample is the ``kde`` solver's score.
  Run at 50% (reference), 30% (tighter) and 70% (looser) density.

Run: ``python benchmarks/allocation.py [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from secateurs.cost import Polynomial
from secateurs.problems.allocation import Allocation, Budget
from secateurs.solvers import SolveResult, solve


def chain_instance(groups: int = 50, levels: int = 16, fraction: float = 0.5, seed: int = 0) -> Allocation:
    """A chain of conv layers: group l is the output of layer l and the input of layer l+1."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([64, 128, 256, 384, 512], size=groups)
    names = [f"conv{i}" for i in range(groups)]
    lv = {g: [int(round(s * (i + 1) / levels)) for i in range(levels)] for g, s in zip(names, sizes, strict=True)}
    spatial = np.repeat([1024, 256, 64, 16, 4], math.ceil(groups / 5))[:groups]  # H·W shrinking by stage
    bilinear = {(names[i - 1], names[i]): float(9 * spatial[i]) for i in range(1, groups)}
    linear = {names[0]: float(3 * 9 * spatial[0])}  # first conv reads a fixed RGB input
    linear[names[-1]] = float(1000)  # classifier head
    flops = Polynomial(0.0, linear, bilinear)
    full = {g: lv[g][-1] for g in names}
    return Allocation(lv, _errors(rng, lv), [Budget.fraction("flops", flops, fraction, full)])


def _errors(rng: np.random.Generator, levels: dict[str, list[int]]) -> dict[str, list[float]]:
    """Errors convex in the pruned fraction, a lognormal sensitivity per group, a little noise."""
    errors = {}
    for g, lv in levels.items():
        rho = np.asarray(lv, float) / lv[-1]
        sens, power = rng.lognormal(0, 1), rng.uniform(1.5, 3.0)
        errors[g] = (sens * (1 - rho) ** power + rng.uniform(0, 0.01, len(lv)) * sens * (1 - rho)).tolist()
    return errors


def resnet_instance(levels: int = 32, fraction: float = 0.5, seed: int = 2, blocks: tuple[int, ...] = (3, 4, 6, 3)
                    ) -> Allocation:
    """A bottleneck ResNet's channel groups (ResNet-50 by default; ``blocks=(3, 8, 36, 3)`` is
    ResNet-152): residual streams ``r0``..``r4`` and each block's two inner widths."""
    rng = np.random.default_rng(seed)
    sizes = {"r0": 64}
    linear = {"r0": 3.0 * 49 * 112**2}  # the 7x7 stem conv on RGB at 112 x 112
    bilinear: dict[tuple[str, str], float] = {}
    stream, side = "r0", 56
    for s, (width, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True), start=1):
        out, out_side = f"r{s}", side if s == 1 else side // 2
        sizes[out] = 4 * width
        for b in range(count):
            g1, g2 = f"s{s}b{b}.conv1", f"s{s}b{b}.conv2"
            sizes[g1] = sizes[g2] = width
            reads, at = (stream, side) if b == 0 else (out, out_side)
            bilinear[(reads, g1)] = float(at**2)  # 1x1 conv
            bilinear[(g1, g2)] = 9.0 * out_side**2  # 3x3 conv (stride 2 in a stage's first block)
            bilinear[(g2, out)] = bilinear.get((g2, out), 0.0) + float(out_side**2)  # 1x1 conv
            if b == 0:
                bilinear[(stream, out)] = float(out_side**2)  # the projection shortcut
        stream, side = out, out_side
    linear["r4"] = 1000.0  # classifier
    lv = {g: [int(round(n * (i + 1) / levels)) for i in range(levels)] for g, n in sizes.items()}
    full = {g: n for g, n in sizes.items()}
    flops = Polynomial(0.0, linear, bilinear)
    return Allocation(lv, _errors(rng, lv), [Budget.fraction("flops", flops, fraction, full)])


def unstructured_instance(layers: int = 200, levels: int = 32, density: float = 0.5, seed: int = 1,
                          sample: int = 4096) -> Allocation:
    """Per-layer density allocation with magnitude-pruning errors and weight samples as scores."""
    rng = np.random.default_rng(seed)
    sizes = {f"layer{i}": int(rng.choice([9_408, 36_864, 147_456, 589_824, 2_359_296])) for i in range(layers)}
    densities = np.arange(1, levels + 1) / levels
    errors, scores = {}, {}
    for g in sizes:
        kind = rng.integers(0, 3)
        w = (rng.normal(size=sample) if kind == 0 else rng.laplace(size=sample) if kind == 1
             else rng.standard_t(3, size=sample)) * rng.lognormal(0, 0.5)
        sq = np.sort(w**2)  # ascending: magnitude pruning removes the smallest first
        removed = np.concatenate([[0.0], np.cumsum(sq)])
        kept = np.round(densities * sample).astype(int)
        errors[g] = (rng.lognormal(0, 1) * removed[sample - kept] / removed[-1]).tolist()
        scores[g] = w
    return Allocation.unstructured(sizes, densities, errors, density=density, scores=scores)


def _row(name: str, r: SolveResult, problem: Allocation, optimum: float) -> tuple[str, ...]:
    if not r.ok:
        return (name, r.status.value, "-", "-", "-", f"{r.seconds:.3f}")
    gap = (r.objective - optimum) / max(abs(optimum), 1e-12) if math.isfinite(optimum) else math.nan
    rep = problem.report(r.solution)[0]
    return (name, r.status.value, f"{r.objective:.6g}", f"{100 * gap:.3f}%",
            f"{rep.achieved:.6g} / {rep.requested:.6g}", f"{r.seconds:.3f}")


def table(title: str, problem: Allocation, solvers: list[tuple[str, dict]], time_limit: float) -> list[SolveResult]:
    results = []
    for name, options in solvers:
        results.append(solve(problem, name, time_limit=time_limit, **options))
    exact = [r for r, (n, _) in zip(results, solvers, strict=True) if n == "dp" and r.ok]
    optimum = exact[0].objective if exact else min((r.objective for r in results if r.ok), default=math.nan)
    rows = [("solver", "status", "objective", "gap", "achieved / requested", "seconds")]
    rows += [_row(n, r, problem, optimum) for r, (n, _) in zip(results, solvers, strict=True)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"\n## {title}")
    for k, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    for r, (n, _) in zip(results, solvers, strict=True):
        if n in ("cpsat", "mip") and r.ok:
            print(f"  {n}: bound {r.bound:.6g}, {r.info.get('scaling', r.info.get('backend', ''))}")
        if n == "dp" and r.ok:
            print(f"  dp: peak Pareto states {r.info.get('dp_states_peak', 0)}, "
                  f"Lagrangian bound {r.info['lagrangian_bound']:.6g}")
        if n == "kde" and r.ok:
            print(f"  kde: {r.info['steps']} Adam steps, final penalty {r.info['penalty']:g}, continuous error "
                  f"{r.info['continuous_error']:.6g}, after rounding+repair {r.info['repaired_error']:.6g}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller time limits")
    parser.add_argument("--time-limit", type=float, default=120.0)
    args = parser.parse_args()
    limit = 20.0 if args.quick else args.time_limit
    t0 = time.perf_counter()
    chain = chain_instance()
    print(f"chain50 built in {time.perf_counter() - t0:.2f}s")
    table("chain50: 50-group chain, bilinear FLOPs, 16 levels, FLOPs <= 50%", chain,
          [("dp", {}), ("cpsat", {}), ("mip", {}), ("kde", {}), ("greedy", {}), ("uniform", {})], limit)
    t0 = time.perf_counter()
    resnet = resnet_instance()
    print(f"\nresnet50 built in {time.perf_counter() - t0:.2f}s")
    table("resnet50: 37 groups with cycles (bottlenecks, shortcuts), bilinear FLOPs, 32 levels, FLOPs <= 50%",
          resnet, [("dp", {}), ("cpsat", {}), ("mip", {}), ("kde", {}), ("greedy", {}), ("uniform", {})], limit)
    t0 = time.perf_counter()
    deep = resnet_instance(blocks=(3, 8, 36, 3))
    print(f"\nresnet152 built in {time.perf_counter() - t0:.2f}s")
    table("resnet152: 105 groups with cycles, bilinear FLOPs, 32 levels, FLOPs <= 50% (no MIP: minutes)",
          deep, [("dp", {}), ("cpsat", {}), ("kde", {}), ("greedy", {}), ("uniform", {})], limit)
    for density, label in ((0.5, "reference"), (0.3, "tighter"), (0.7, "looser")):
        t0 = time.perf_counter()
        problem = unstructured_instance(density=density)
        print(f"\nunstructured200 @ {density:.0%} built in {time.perf_counter() - t0:.2f}s")
        table(f"unstructured200: 200 layers, 32 densities, nonzeros <= {density:.0%} ({label})", problem,
              [("dp", {}), ("cpsat", {}), ("mip", {}), ("kde", {}), ("greedy", {}), ("uniform", {})], limit)


if __name__ == "__main__":
    main()
