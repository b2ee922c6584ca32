"""How far apart repeated before/after timings of one pruned model land, per thread count and clock.

The CLI's table reports one speedup: dense and pruned timed in alternating rounds
(``secateurs.measure.compare_latency``), the median of the per-round ratios. On a shared machine
that figure moves between runs. This prunes each zoo CNN once (FLOPs budget, the CPU's channel
multiple), then repeats the same comparison ``--trials`` times under each scheme, all schemes taking
turns within a trial so they share the machine's moods:

- 2 threads, wall clock, 15 rounds of 5 forwards;
- 1 thread, wall clock, 15 rounds of 5 (what the CLI does by default since ``--threads``);
- 1 thread, the thread's CPU time (``time.thread_time``), 15 rounds of 5;
- 1 thread, wall clock, 75 rounds of 1 (finer interleaving).

Columns: the lowest and highest median speedup over the trials and their standard deviation, the
same for the ratio of the fastest rounds, and the median speedup against the FLOPs ratio.

Run: ``python benchmarks/timing_noise.py [--models mnist1d_cnn,digits_cnn] [--trials 8] [--flops 0.5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _tables import table

import secateurs
from secateurs.graph import dense_counts
from secateurs.measure import compare_latency
from secateurs.models import zoo
from secateurs.timing import steady_allocator, torch_threads

SCHEMES = {  # name: (threads, compare_latency keywords)
    "2 threads, wall, 15x5": (2, {"rounds": 15, "repeats": 5}),
    "1 thread, wall, 15x5": (1, {"rounds": 15, "repeats": 5}),
    "1 thread, cpu, 15x5": (1, {"rounds": 15, "repeats": 5, "clock": time.thread_time}),
    "1 thread, wall, 75x1": (1, {"rounds": 75, "repeats": 1}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist1d_cnn,digits_cnn")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--flops", type=float, default=0.5)
    args = parser.parse_args()
    steady_allocator()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} CPUs")
    for name in args.models.split(","):
        model, info = zoo.load(name)
        model.eval()
        result = secateurs.prune(model, info.calibration(512, 64), secateurs.Budget(flops=args.flops),
                                 channel_multiple="auto", progress=False)
        example = info.calibration(64, 64)[0]
        kept = dense_counts(result.model, example).flops / dense_counts(model, example).flops
        x = info.test_split().x_test
        seen: dict[str, list[tuple[float, float]]] = {k: [] for k in SCHEMES}
        for _ in range(args.trials):
            for scheme, (threads, keywords) in SCHEMES.items():
                with torch_threads(threads):
                    timed = compare_latency(model, result.model, x, **keywords)
                seen[scheme].append((timed.speedup, timed.dense / timed.pruned))
        rows = []
        for scheme, pairs in seen.items():
            medians, fastest = [m for m, _ in pairs], [f for _, f in pairs]
            rows.append([scheme, f"{min(medians):.2f}-{max(medians):.2f}x", f"{statistics.stdev(medians):.3f}",
                         f"{min(fastest):.2f}-{max(fastest):.2f}x", f"{statistics.stdev(fastest):.3f}",
                         f"{statistics.median(medians) * kept:.2f}"])
        load = " ".join(f"{v:.2f}" for v in os.getloadavg())
        print(f"\n## {name}: {args.trials} timings of one pair, {kept:.3f} of the FLOPs kept "
              f"(FLOPs ratio {1 / kept:.2f}), batch {x.shape[0]}; load average {load}")
        print(table(rows, ["scheme", "median speedup", "sd", "fastest-round ratio", "sd",
                           "speedup / FLOPs ratio"]))


if __name__ == "__main__":
    main()
