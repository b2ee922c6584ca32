"""Peak memory of channel pruning against the width of the widest consumer input.

A consumer input of p columns has a p × p float64 Gram (p²·8 bytes a copy); the channel path
holds a few copies at once, and ``secateurs.memory`` gives an input no Gram when
``GRAM_COPIES`` copies would not fit in the free memory. Each case runs in its own process
(the peak RSS of a process only grows) and prints the peak over the process's RSS before
``prune()``, in copies of the widest Gram:

- ``wide-C``: a conv of C channels flattened into a ``Linear`` of C·49 inputs and 16 outputs (VGG
  in miniature), pruned to half its parameters, which prunes the conv's channels: their group
  is the one whose problem reads the wide input, in the layer-wise pass too. Sequential and not;
- ``vgg11_bn``: VGG-11 with batch norm at 64 × 64 (its classifier reads 25,088 inputs), built
  here layer by layer with random weights: no weights are downloaded; channels at 50% of the
  FLOPs, and ``--unstructured`` adds it at 50% sparsity (``vgg11_bn-unstructured``).

Run: ``python benchmarks/memory.py [--out DIR] [--channels 64,128,160] [--no-vgg] [--unstructured]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tables import table  # noqa: E402


def _wide(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(channels * 49, 16), nn.ReLU(),
                         nn.Linear(16, 10))


def _vgg11_bn() -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(width, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            width = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(25088, 4096), nn.ReLU(True),
                         nn.Dropout(), nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000))


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(name: str, sequential: bool) -> dict[str, object]:
    """Prune one case in this process; what the table prints."""
    import secateurs
    from secateurs.memory import available_bytes, gram_bytes

    torch.manual_seed(0)
    structure = "unstructured" if name.endswith("-unstructured") else "channels"
    name = name.removesuffix("-unstructured")
    if name == "vgg11_bn":
        model, widest = _vgg11_bn().eval(), 25088
        batches = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    else:
        channels = int(name.split("-")[1])
        model, widest = _wide(channels).eval(), channels * 49
        batches = [torch.randn(16, 3, 14, 14) for _ in range(4)]
    available = available_bytes()
    base = _rss()
    start = time.perf_counter()
    budget = (secateurs.Budget(sparsity=0.5) if structure == "unstructured" else
              secateurs.Budget(flops=0.5) if name == "vgg11_bn" else secateurs.Budget(params=0.5))
    result = secateurs.prune(model, batches, budget, structure=structure, error_curve=False, progress=False,
                             sequential=sequential)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    copy = widest * widest * 8
    kept = result.report.total("nonzeros" if structure == "unstructured" else
                               "flops" if name == "vgg11_bn" else "params")
    widest_group = [g for g in result.report.groups if g.total == (512 if name == "vgg11_bn" else widest // 49)]
    wide_kept = f"{widest_group[-1].kept}/{widest_group[-1].total}" if structure == "channels" else "-"
    case = name if structure == "channels" else f"{name}-unstructured"
    label = ", ".join(f"{k} {v:.0%}" for k, v in (("flops", budget.flops), ("params", budget.params),
                                                   ("sparsity", budget.sparsity)) if v is not None)
    return {"case": case, "budget": label, "sequential": sequential, "widest input": widest,
            "Gram GB": copy / 1e9,
            "needs GB": gram_bytes(widest) / 1e9, "available GB": (available or 0) / 1e9,
            "refit": not any("GB available" in n for n in result.report.notes),  # no input was too wide
            "peak over start GB": (peak - base) / 1e9, "copies": (peak - base) / copy, "seconds": seconds,
            "kept": kept.achieved / kept.dense, "wide group kept": wide_kept,
            "output error": result.report.output_error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", default="64,128,160", help="conv widths of the wide-C cases")
    parser.add_argument("--no-vgg", action="store_true", help="skip VGG-11-BN (a minute, 5 GB or more)")
    parser.add_argument("--unstructured", action="store_true", help="also VGG-11-BN at 50%% sparsity")
    parser.add_argument("--out", default="benchmarks/out", help="folder for memory.json and memory.png")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    parser.add_argument("--sequential", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.sequential == "on")))
        return
    cases = [(f"wide-{c}", s) for c in args.channels.split(",") if c for s in ("on", "off")]
    cases += [] if args.no_vgg else [("vgg11_bn", "on")]
    cases += [("vgg11_bn-unstructured", "on")] if args.unstructured and not args.no_vgg else []
    rows = []
    for name, sequential in cases:
        child = subprocess.run([sys.executable, __file__, "--case", name, "--sequential", sequential],
                               capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if child.returncode != 0:
            print(f"{name}: failed\n{child.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"## peak memory of prune() (load average {load} on {os.cpu_count()} CPUs)")
    header = list(rows[0]) if rows else []
    print(table([[f"{v:.3g}" if isinstance(v, float) else v for v in r.values()] for r in rows], header))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sequential, marker in ((True, "o"), (False, "s")):
        pts = [(r["Gram GB"], r["peak over start GB"]) for r in rows if r["sequential"] is sequential]
        if pts:
            ax.scatter(*zip(*pts, strict=True), marker=marker, label=f"sequential={sequential}")
    for r in rows:
        if not r["refit"]:
            ax.annotate(f"{r['case']}: too wide, no Gram", (r["Gram GB"], r["peak over start GB"]),
                        textcoords="offset points", xytext=(-150, -4))
    if rows:
        top = max(r["Gram GB"] for r in rows if r["refit"]) if any(r["refit"] for r in rows) else 1.0
        ax.plot([0, top], [0, 5 * top], "k--", lw=1, label="5 copies (GRAM_COPIES)")
    ax.set_xlabel("one copy of the widest Gram (GB)")
    ax.set_ylabel("peak RSS over the start (GB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    print(f"wrote {out / 'memory.png'}")


if __name__ == "__main__":
    main()
