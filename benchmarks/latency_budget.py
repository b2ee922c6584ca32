"""What each kind of budget buys in measured CPU time, and at what accuracy, on the zoo CNNs.

A FLOPs budget counts convolutions and matrix products only. On the small zoo CNNs, norms,
activations and max pooling are about a third of the forward and shrink only with the channels,
not with the FLOPs; and oneDNN runs channels in blocks of the vector width (16 floats on
AVX-512), so a 25-channel conv costs what a 32-channel one does. For each CNN and budget fraction
``f`` this prints four plans:

- ``flops<=f``: the FLOPs-optimal plan at any channel count;
- ``flops<=f, xM``: the same with every pruned layer at a multiple of M channels
  (``prune(channel_multiple=M)``);
- ``flops<=f, latency<=f/0.8, xM``: also at most f/0.8 of the dense latency, which is what
  "speedup at least 0.8 × the FLOPs ratio" asks of a plan that keeps f of the FLOPs;
- ``latency<=f, xM``: the latency budget alone (``secateurs.latency``'s measured tables).

Columns: test accuracy without fine-tuning, FLOPs kept, the modelled latency against the modelled
limit the plan was allocated under (shifted from the request when prune's timing of the allocated
widths disagreed with the model) and the request, and the measured speedup over the dense
model (one thread, the whole test set as one batch; dense and pruned timed in alternating rounds
by ``secateurs.measure.compare_latency``; the speedup is the median of the per-round ratios, the
times each model's fastest round).

A second table checks the latency model and bounds what any plan can reach: every plan whose
widths are multiples of M channels (for MNIST-1D 2 x 2 x 2 x 4 = 32 plans), each sliced from the
dense model and timed against it, next to the latency ``secateurs.latency`` models for it. Its
last line is the best measured speedup / FLOPs ratio among the plans within the FLOPs budget.

``--models minilm`` runs the four plans on all-MiniLM-L6-v2 too (embedding cosine instead of
accuracy, timed on 8 sequences of 128 tokens; no every-plan table), about 5 minutes a budget.

Run: ``python benchmarks/latency_budget.py [--models mnist1d_cnn,digits_cnn] [--budgets 0.7,0.5]
[--channel-multiple auto|M] [--rounds 30] [--no-grid]``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable

import numpy as np
import torch
from _tables import table
from scipy.stats import spearmanr

import secateurs
from secateurs.apply import apply
from secateurs.cli import channel_multiple_arg
from secateurs.errors import InfeasibleBudgetError
from secateurs.graph import build, dense_counts
from secateurs.graph.groups import check_channel_multiple, keep_levels
from secateurs.latency import measure
from secateurs.measure import compare_latency, embedding_agreement, embeddings
from secateurs.models import text_batches, zoo
from secateurs.plan import PrunePlan


def plans(fraction: float, multiple: int) -> list[tuple[str, dict[str, float], int]]:
    """(label, Budget keywords, channel multiple) of the four plans compared at one fraction."""
    limit = min(fraction / 0.8, 1.0)
    return [(f"flops<={fraction:.0%}", {"flops": fraction}, 1),
            (f"flops<={fraction:.0%}, x{multiple}", {"flops": fraction}, multiple),
            (f"flops<={fraction:.0%}, latency<={limit:.1%}, x{multiple}", {"flops": fraction, "latency": limit},
             multiple),
            (f"latency<={fraction:.0%}, x{multiple}", {"latency": fraction}, multiple)]


def every_plan(name: str, multiple: int, fraction: float, rounds: int) -> None:
    """Every plan on multiples of ``multiple`` channels: modelled against measured latency."""
    model, info = zoo.load(name)
    x = info.test_split().x_test
    graph = build(model, x)
    groups = graph.prunable_groups()
    levels = {g.name: keep_levels(g, multiple) for g in groups}
    modelled, window = measure(model, groups, x, levels, points=max(len(v) for v in levels.values()))
    dense_seconds = window.dense
    dense_flops = graph.cost().flops
    rows, ratios, pairs = [], [], []
    for counts in itertools.product(*levels.values()):
        keep = dict(zip(levels, counts, strict=True))
        plan = PrunePlan({g: list(range(k)) for g, k in keep.items() if k < graph.group(g).size},
                         groups={g.name: g for g in groups})
        pruned = apply(model, plan)
        kept = graph.cost(keep).flops / dense_flops
        timed = compare_latency(model, pruned, x, rounds=rounds)
        model_speedup = dense_seconds / modelled.evaluate(keep)
        pairs.append((model_speedup, timed.speedup))
        if kept <= fraction:
            ratios.append((timed.speedup * kept, "/".join(map(str, counts))))
        rows.append(("/".join(map(str, counts)), f"{kept:.3f}", f"{model_speedup:.2f}x", f"{timed.speedup:.2f}x",
                     f"{timed.speedup * kept:.2f}"))
    rows.sort(key=lambda r: float(r[1]))
    m, t = np.array(pairs).T
    print(f"\n## {name}: every plan on multiples of {multiple} channels ({len(rows)} plans; dense "
          f"{1e3 * dense_seconds:.3f} ms as the tables measured it)")
    print(table(rows, ["widths", "FLOPs kept", "modelled speedup", "measured speedup", "speedup / FLOPs ratio"],
                right=True))
    best = max(ratios) if ratios else (float("nan"), "-")
    print(f"modelled vs measured speedup: median |error| {np.median(np.abs(m / t - 1)):.1%}, "
          f"Spearman {spearmanr(m, t).statistic:.2f}; best speedup / FLOPs ratio within {fraction:.0%} FLOPs: "
          f"{best[0]:.2f} ({best[1]})")


def subject(name: str) -> tuple[torch.nn.Module, list, object, Callable[[torch.nn.Module], str]]:
    """A zoo model, its calibration batches, the inputs it is timed on, and its quality measure.

    CNNs: 512 calibration images, timed on the whole test set, test accuracy. MiniLM: 128
    calibration sequences of 128 tokens, timed on 8 of them, embedding cosine to dense on 64
    held-out sequences.
    """
    model, info = zoo.load(name)
    if name == "minilm":
        held = text_batches(64, 32, split="test")
        dense = embeddings(model, held)
        calibration = info.calibration(128, 16)
        x = {k: v[:8] for k, v in calibration[0].items()}
        return model, calibration, x, lambda m: f"{embedding_agreement(dense, m, held)['cosine']:.4f}"
    split = info.test_split()
    return model, info.calibration(512, 64), split.x_test, lambda m: f"{zoo.accuracy(m, split.x_test, split.y_test):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mnist1d_cnn,digits_cnn")
    parser.add_argument("--budgets", default="0.7,0.5")
    parser.add_argument("--channel-multiple", type=channel_multiple_arg, default="auto",
                        help="the multiple of the x-rows and the grid: auto (the CPU's vector width) or a number")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-grid", action="store_true", help="skip the every-plan table")
    args = parser.parse_args()
    args.channel_multiple = check_channel_multiple(args.channel_multiple)  # "auto": this CPU's block
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        model, calibration, x, quality = subject(name)
        dense_flops = dense_counts(model, x).flops
        for fraction in (float(f) for f in args.budgets.split(",")):
            for label, budget, multiple in plans(fraction, args.channel_multiple):
                start = time.perf_counter()
                try:
                    result = secateurs.prune(model, calibration, secateurs.Budget(**budget), example_inputs=x,
                                             progress=False, error_curve=False, channel_multiple=multiple)
                except InfeasibleBudgetError as exc:
                    rows.append((name, label, "infeasible", "-", str(exc)[:40], "-", "-", "-", "-", "-", "-"))
                    continue
                seconds = time.perf_counter() - start
                timed = compare_latency(model, result.model, x, rounds=args.rounds)
                kept = dense_counts(result.model, x).flops / dense_flops
                modelled = "-"
                if "latency" in budget:
                    line = result.report.total("latency ms (modelled)")
                    asked = result.report.total("latency ms (measured)").requested
                    modelled = f"{line.achieved:.3f} / {line.requested:.3f} / {asked:.3f}"
                widths = "/".join(str(len(result.plan.keep.get(g.name, range(g.size)))) for g in
                                  result.graph.prunable_groups()) if result.graph is not None else "-"
                rows.append((name, label, quality(result.model),
                             f"{kept:.3f}", widths, modelled, f"{1e3 * timed.dense:.3f}", f"{1e3 * timed.pruned:.3f}",
                             f"{timed.speedup:.2f}x", f"{timed.speedup * kept:.2f}", f"{seconds:.1f}"))
        rows.append((name, "dense", quality(model), "1.000", "-", "-", "-",
                     "-", "1.00x", "-", "-"))
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs, 1 torch thread, "
          f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(table(rows, ["model", "budget", "accuracy / cosine", "FLOPs kept", "widths", "latency ms modelled / limit / requested",
                       "dense ms", "pruned ms", "speedup", "speedup / FLOPs ratio", "prune s"], right=True))
    if not args.no_grid:
        for name in [m for m in args.models.split(",") if m != "minilm"]:  # 12 groups: too many plans
            every_plan(name, args.channel_multiple, min(float(f) for f in args.budgets.split(",")), 9)


if __name__ == "__main__":
    main()
