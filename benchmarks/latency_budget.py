"""FLOPs budgets against latency budgets: what each buys in measured CPU time, and at what accuracy.

A FLOPs budget counts convolutions and matrix products only; on the small zoo CNNs norms,
activations and max pooling are half the forward, so halving FLOPs does not halve latency.
``Budget(latency=f)`` measures instead (``secateurs.latency``: per-layer tables and a per-group
rate for everything else, on the example inputs). For each zoo CNN and budget fraction this prints
the secateurs plan under ``Budget(flops=f)`` and under ``Budget(latency=f)``: test accuracy without
fine-tuning, FLOPs kept, the modelled latency against the request, and the measured speedup over
the dense model (single thread, the whole test set as one batch, dense and pruned timed in
alternating short rounds, fastest round of each: the machine is shared).

Run: ``python benchmarks/latency_budget.py [--models mnist1d_cnn,digits_cnn] [--budgets 0.7,0.5] [--rounds 40]``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _tables import table

import secateurs
from secateurs.graph import dense_counts
from secateurs.measure import latency
from secateurs.models import zoo


def best_latency(dense: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, rounds: int) -> tuple[float, float]:
    """Fastest short round of each model over alternating rounds.

    On this shared VM the median of ten forwards of one model swings 5x between rounds (5.6 to
    33.6 ms for the dense MNIST-1D CNN, idle machine); interference only ever adds time, so the
    fastest of many short rounds is the least disturbed estimate of each model's own cost.
    """
    d, p = [], []
    for _ in range(rounds):
        d.append(latency(dense, x, repeats=3, warmup=1))
        p.append(latency(pruned, x, repeats=3, warmup=1))
    return min(d), min(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist1d_cnn,digits_cnn")
    parser.add_argument("--budgets", default="0.7,0.5")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        model, info = zoo.load(name)
        split = info.test_split()
        x = split.x_test  # the whole test set: compute, not per-call overhead, dominates
        calibration = info.calibration(512, 64)
        dense_flops = dense_counts(model, x).flops
        for fraction in (float(f) for f in args.budgets.split(",")):
            for kind in ("flops", "latency"):
                start = time.perf_counter()
                result = secateurs.prune(model, calibration, secateurs.Budget(**{kind: fraction}), example_inputs=x,
                                         progress=False, error_curve=False)
                seconds = time.perf_counter() - start
                t_dense, t_pruned = best_latency(model, result.model, x, args.rounds)
                flops_ratio = dense_flops / dense_counts(result.model, x).flops
                modelled = "-"
                if kind == "latency":
                    line = result.report.total("latency ms (modelled)")
                    modelled = f"{line.achieved:.3f} / {line.requested:.3f}"
                rows.append((name, f"{kind} <= {fraction:.0%}", f"{zoo.accuracy(result.model, split.x_test, split.y_test):.4f}",
                             f"{1 / flops_ratio:.3f}", modelled, f"{1e3 * t_dense:.3f}", f"{1e3 * t_pruned:.3f}",
                             f"{t_dense / t_pruned:.2f}x", f"{t_dense / t_pruned / flops_ratio:.2f}", f"{seconds:.1f}"))
        rows.append((name, "dense", f"{zoo.accuracy(model, split.x_test, split.y_test):.4f}", "1.000", "-", "-", "-",
                     "1.00x", "-", "-"))
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs, 1 torch thread")
    print(table(rows, ["model", "budget", "accuracy", "FLOPs kept", "latency ms modelled / requested",
                       "dense ms", "pruned ms", "speedup", "speedup / FLOPs ratio", "prune s"], right=True))


if __name__ == "__main__":
    main()
