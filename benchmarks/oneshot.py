"""One-shot pruning against its peers, on the real models, side by side in one run.

For each CNN (``mnist1d_cnn``, ``digits_cnn``) and each FLOPs budget (keep 70%, 50%, 30%):

- ``secateurs.prune`` (channels) on 512 calibration inputs from the training split;
- Torch-Pruning (``torch_pruning.pruner.MetaPruner``) with Magnitude (L2), Taylor, Hessian (OBD,
  per-sample squared gradients) and LAMP importance, uniform and global ratio, on the same
  calibration inputs (Taylor and Hessian use their training labels), the ratio bisected until its
  FLOPs match ours to 1%, both counted with ``secateurs.graph.dense_counts``;
- test accuracy without fine-tuning and after one epoch of fine-tuning on the training split
  (AdamW at a constant lr of 1e-4 and, separately, 1e-3; weight decay 1e-4, batch 64, same seed and
  data order for every method; the dense model gets the same epoch, as a reference).

Unstructured, at 30%, 50%, 70% sparsity of every Conv/Linear weight: ``secateurs.prune(...,
structure="unstructured")`` against ``torch.nn.utils.prune.global_unstructured`` (L1), the masks
held fixed during the same one-epoch fine-tuning.

MiniLM (all-MiniLM-L6-v2): secateurs with 512 calibration sequences of 128 tokens, and
Torch-Pruning on heads and FFN neurons (Magnitude, LAMP; Taylor and Hessian on a self-supervised
surrogate loss, see ``minilm_surrogate_losses``) at the same FLOPs: mean cosine of pruned to dense
sentence embeddings on held-out paragraphs and top-1 nearest-neighbour agreement; the wall time of
the whole prune. Every Torch-Pruning MiniLM is checked against the dense model with the same units
zeroed; a mismatch is printed, not hidden.

Latency: median CPU wall time of secateurs' pruned models against the dense model, 1 and 2 threads,
at batch 1 and at a batch where compute dominates, next to the FLOPs ratio. Stage wall times come
from ``report.stages``.

Tables go to stdout; ``benchmarks/out/oneshot_<model>.json`` keeps the numbers and PNG plots are
drawn from every JSON present (so parts run separately combine):
``oneshot_accuracy_<model>.png``, ``oneshot_minilm.png``, ``oneshot_speedup.png``.

Run: ``python benchmarks/oneshot.py [--models mnist1d_cnn,digits_cnn,minilm] [--budgets 0.7,0.5,0.3]
[--sparsities 0.3,0.5,0.7] [--quick] [--no-finetune] [--no-latency] [--no-tp] [--sequential on|off]
[--only-latency]``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _tables import table as aligned_table
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import prune as torch_prune

import secateurs
from secateurs import measure
from secateurs.cli import channel_multiple_arg
from secateurs.graph import dense_counts
from secateurs.models import data, zoo
from secateurs.timing import steady_allocator, torch_threads

OUT = Path(__file__).resolve().parent / "out"
table = partial(aligned_table, right=True)  # this script's numeric columns read best right-aligned
CNNS = ("mnist1d_cnn", "digits_cnn")
CRITERIA = ("magnitude", "taylor", "hessian", "lamp")
MODES = ("uniform", "global")
FT_LRS, FT_WD, FT_BATCH = (1e-4, 1e-3), 1e-4, 64


def ft_key(lr: float) -> str:
    """The result key of the accuracy after one epoch of fine-tuning at learning rate ``lr``."""
    return f"accuracy_ft_lr{lr:g}"


def ft_keys(row: dict[str, Any]) -> list[str]:
    return sorted((k for k in row if k.startswith("accuracy_ft_lr")), key=lambda k: float(k.removeprefix("accuracy_ft_lr")))


# -- small helpers -------------------------------------------------------------------------------


def load_text() -> str:
    """The machine's load average, to print next to every timing (the machine is shared)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def provenance() -> dict[str, Any]:
    """The commit of the secateurs actually imported, and whether its working tree differs from it.

    The checkout is shared with engineers editing the library, so the benchmark can be pointed at a
    clean export of one commit (``PYTHONPATH=DIR``, with the hash in ``DIR/COMMIT``).
    """
    where = Path(secateurs.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=False)
        except OSError:
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    stamp = where / "COMMIT"
    commit = stamp.read_text().strip() if stamp.is_file() else git("rev-parse", "--short", "HEAD")
    dirty = "" if stamp.is_file() else git("status", "--porcelain", "--", "secateurs")
    return {"commit": commit or "unknown", "dirty": dirty, "secateurs_path": str(where),
            "torch": torch.__version__, "torch_pruning": _tp_version(), "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def _tp_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        return "not installed"


def flops(model: nn.Module, inputs: Any) -> float:
    """FLOPs of one forward, counted on the model as it is (FlopCounterMode), same way for everyone."""
    return dense_counts(model, inputs).flops


def prune_kwargs(sequential: str, channel_multiple: int | str = 1) -> dict[str, Any]:
    """Extra keywords for ``secateurs.prune``: ``sequential`` and ``channel_multiple`` only when asked."""
    kwargs: dict[str, Any] = {} if channel_multiple == 1 else {"channel_multiple": channel_multiple}
    if sequential == "default":
        return kwargs
    if "sequential" not in inspect.signature(secateurs.prune).parameters:
        raise SystemExit("--sequential: this secateurs.prune has no 'sequential' parameter yet")
    return {**kwargs, "sequential": sequential == "on"}


def timed_prune(model: nn.Module, calibration: Any, budget: secateurs.Budget,
                **kwargs: Any) -> tuple[secateurs.PruneResult, float, float]:
    """``secateurs.prune`` with its wall time and the process CPU time (all threads) it took."""
    wall, cpu = time.perf_counter(), time.process_time()
    res = secateurs.prune(model, calibration, budget, progress=False, **kwargs)
    return res, time.perf_counter() - wall, time.process_time() - cpu


# -- Torch-Pruning ---------------------------------------------------------------------------------


def tp_importance(criterion: str) -> Any:
    """The Torch-Pruning importance object for a criterion name."""
    import torch_pruning as tp

    if criterion == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    if criterion == "hessian":
        return tp.importance.HessianImportance()
    if criterion == "lamp":
        return tp.importance.LAMPImportance(p=2)
    raise ValueError(f"unknown criterion {criterion!r}")


def mean_gradients(model: nn.Module, losses: Callable[[nn.Module], list[Tensor]]) -> dict[str, Tensor]:
    """Mean gradient of the batch losses (what TaylorImportance reads from ``.grad``)."""
    work = copy.deepcopy(model).eval()
    work.zero_grad()
    count = 0
    for loss in losses(work):
        loss.backward()
        count += 1
    return {n: p.grad.detach() / count for n, p in work.named_parameters() if p.grad is not None}


def fisher_diagonal(model: nn.Module, per_sample: Callable[[nn.Module], Any]) -> tuple[dict[str, Tensor], int]:
    """Mean of per-sample squared gradients (OBD's empirical Fisher), what HessianImportance reads.

    Torch-Pruning 1.6.1's ``HessianImportance.accumulate_grad`` keys its dictionaries by parameter
    but tests membership by name, so every call restarts the sum: it keeps only the last sample.
    We accumulate here instead and hand the mean to the importance through ``.grad`` (with an
    empty accumulator it uses ``.grad`` as the squared-gradient average).
    """
    work = copy.deepcopy(model).eval()
    sums: dict[str, Tensor] = {}
    count = 0
    for sample_losses in per_sample(work):
        for i, loss in enumerate(sample_losses):
            work.zero_grad()
            loss.backward(retain_graph=i + 1 < len(sample_losses))
            for n, p in work.named_parameters():
                if p.grad is not None:
                    sums[n] = sums[n] + p.grad.detach() ** 2 if n in sums else p.grad.detach() ** 2
            count += 1
    return {n: s / count for n, s in sums.items()}, count


@dataclass
class TPSetup:
    """How to run Torch-Pruning on one model: what to leave alone and how to fix up afterwards."""

    example: Any
    ignored: Callable[[nn.Module], list[nn.Module]]
    extra: Callable[[nn.Module], dict[str, Any]] = lambda m: {}
    after: Callable[[nn.Module, Any], None] = lambda m, p: None
    grads: dict[str, dict[str, Tensor]] = field(default_factory=dict)


def tp_prune(model: nn.Module, setup: TPSetup, criterion: str, mode: str, ratio: float) -> nn.Module:
    """A pruned copy of ``model`` by Torch-Pruning at one ratio (the input is not touched)."""
    import torch_pruning as tp

    work = copy.deepcopy(model).eval()
    grads = setup.grads.get(criterion, {})
    for name, p in work.named_parameters():
        p.grad = grads[name].clone() if name in grads else None
    example = setup.example
    if isinstance(example, dict):
        example = tuple(example.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(work, example, importance=tp_importance(criterion),
                                      global_pruning=mode == "global", pruning_ratio=ratio,
                                      ignored_layers=setup.ignored(work), **setup.extra(work))
        pruner.step()
    setup.after(work, pruner)
    for p in work.parameters():
        p.grad = None
    return work


@dataclass
class Match:
    """The Torch-Pruning model whose FLOPs came closest to the target, and how it was found."""

    model: nn.Module | None
    ratio: float
    flops: float
    mismatch: float  # (flops - target) / target
    trials: int
    error: str = ""


def match_flops(prune_at: Callable[[float], nn.Module], count: Callable[[nn.Module], float], target: float,
                *, tol: float = 0.01, iterations: int = 16) -> Match:
    """Bisect the pruning ratio until counted FLOPs are within ``tol`` of ``target`` (keep the closest)."""
    lo, hi = 0.0, 0.97
    best = Match(None, math.nan, math.nan, math.inf, 0)
    errors = []
    for trial in range(1, iterations + 1):
        ratio = 0.5 * (lo + hi)
        try:
            model = prune_at(ratio)
        except Exception as exc:  # noqa: BLE001 - Torch-Pruning fails in many ways at extreme ratios
            errors.append(f"ratio {ratio:.4f}: {type(exc).__name__}: {exc}")
            hi = ratio
            continue
        f = count(model)
        mismatch = (f - target) / target
        closer = abs(mismatch) < abs(best.mismatch) - 1e-12
        if closer or (math.isclose(abs(mismatch), abs(best.mismatch)) and mismatch < best.mismatch):
            best = Match(model, ratio, f, mismatch, trial)
        if abs(mismatch) <= tol:
            break
        if f > target:
            lo = ratio
        else:
            hi = ratio
        if hi - lo < 1e-5:
            break
    best.trials = trial
    if best.model is None:
        best.error = "; ".join(errors[-2:]) or "no ratio pruned"
    return best


# -- fine-tuning ---------------------------------------------------------------------------------


def finetune(model: nn.Module, split: data.DataSplit, lr: float, *, epochs: int = 1, seed: int = 0) -> nn.Module:
    """One epoch (by default) of AdamW on the training split: the same recipe for every method.

    Constant ``lr``; the checkpoints were trained with a one-cycle schedule that ends near 0, so at
    1e-3 one epoch already moves the dense model off its optimum (the dense row shows by how much).
    """
    work = masked_copy(model).train()
    opt = torch.optim.AdamW([p for p in work.parameters() if p.requires_grad], lr=lr, weight_decay=FT_WD)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(split.x_train.shape[0], generator=gen).split(FT_BATCH):
            opt.zero_grad()
            F.cross_entropy(work(split.x_train[idx]), split.y_train[idx]).backward()
            opt.step()
    return work.eval()


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv/Linear: the weights unstructured pruning counts (both methods prune the same set)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


def sparsity(model: nn.Module) -> float:
    """Fraction of zero Conv/Linear weights (``.weight`` is the masked one under torch's prune)."""
    zeros = total = 0
    for _, m in weight_modules(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / total


def masked_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on modules under torch's prune reparametrisation.

    Their ``weight`` is ``weight_orig * weight_mask`` with a grad_fn, which deepcopy refuses;
    recomputing it without grad makes it a leaf (the pre-forward hook recomputes it anyway).
    """
    with torch.no_grad():
        for _, m in weight_modules(model):
            if hasattr(m, "weight_orig") and hasattr(m, "weight_mask"):
                m.weight = m.weight_orig * m.weight_mask
    return copy.deepcopy(model)


def fix_masks(model: nn.Module) -> nn.Module:
    """A copy whose zero weights stay zero while fine-tuning (torch's prune reparametrisation)."""
    work = masked_copy(model)
    for _, m in weight_modules(work):
        if not torch_prune.is_pruned(m):
            torch_prune.custom_from_mask(m, "weight", mask=(m.weight != 0))
    return work


# -- latency -------------------------------------------------------------------------------------


def latency_pair(dense: nn.Module, pruned: nn.Module, inputs: Any, threads: int, repeats: int, *,
                 clock: Callable[[], float] = time.perf_counter, rounds: int = 3) -> tuple[float, float, float]:
    """Fastest-round dense and pruned seconds and the median per-round speedup, measured interleaved.

    ``secateurs.measure.compare_latency``: interleaving keeps a change of machine speed from
    favouring either model, and the allocator is kept from page-faulting every forward.
    """
    with torch_threads(threads):
        timed = measure.compare_latency(dense, pruned, inputs, rounds=rounds, repeats=repeats, clock=clock)
    return timed.dense, timed.pruned, timed.speedup


def latency_rows(name: str, dense: nn.Module, pruned: dict[float, tuple[nn.Module, float]],
                 batches: dict[str, Any], repeats: int, rounds: int = 3) -> list[dict[str, Any]]:
    """Latency of every pruned model at every batch: wall clock at 1 and 2 threads, and single-thread CPU time.

    The single-thread CPU time (``time.thread_time``) is the forward's own compute; on a shared,
    oversubscribed machine it is the number that says what the pruned model saves, while the wall
    clock also measures everyone else.
    """
    rows = []
    for budget, (model, flops_ratio) in pruned.items():
        for label, inputs in batches.items():
            for threads, clock_name, clock in ((1, "wall", time.perf_counter), (2, "wall", time.perf_counter),
                                               (1, "cpu", time.thread_time)):
                d, p, speedup = latency_pair(dense, model, inputs, threads, repeats, clock=clock, rounds=rounds)
                rows.append({"model": name, "budget": budget, "batch": label, "threads": threads,
                             "clock": clock_name, "dense_ms": 1e3 * d, "pruned_ms": 1e3 * p, "speedup": speedup,
                             "flops_ratio": flops_ratio, "load": os.getloadavg()[0]})
    return rows


def print_latency(rows: list[dict[str, Any]]) -> None:
    print(table([(r["model"], f"{r['budget']:.0%}", r["batch"], r["threads"], r.get("clock", "wall"),
                  f"{r['dense_ms']:.3f}", f"{r['pruned_ms']:.3f}", f"{r['speedup']:.2f}x", f"{r['flops_ratio']:.2f}x",
                  f"{r['speedup'] / r['flops_ratio']:.2f}", "yes" if r["speedup"] >= 0.8 * r["flops_ratio"] else "NO",
                  f"{r['load']:.1f}") for r in rows],
                ["model", "FLOPs kept", "batch", "threads", "clock", "dense ms", "pruned ms", "speedup",
                 "FLOPs ratio", "speedup/ratio", ">=0.8", "load"]))


# -- stages --------------------------------------------------------------------------------------


def stage_row(label: str, seconds: float, stages: dict[str, float]) -> dict[str, Any]:
    return {"run": label, "total": seconds, **stages}


def print_stages(rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in ("run", "total", "cpu", "load") and k not in keys]
    print(table([(r["run"], *(f"{r[k]:.2f}" if k in r else "-" for k in keys), f"{r['total']:.2f}",
                  f"{r.get('cpu', math.nan):.2f}", f"{r.get('load', math.nan):.1f}") for r in rows],
                ["secateurs run", *keys, "prune() wall s", "prune() CPU s", "load"]))


# -- CNNs ----------------------------------------------------------------------------------------


@dataclass
class Args:
    """Parsed command line."""

    models: list[str]
    budgets: list[float]
    sparsities: list[float]
    criteria: list[str]
    modes: list[str]
    quick: bool
    finetune: bool
    latency: bool
    tp: bool
    sequential: str
    out: Path
    only_latency: bool = False
    ft_lrs: tuple[float, ...] = FT_LRS
    channel_multiple: int | str = 1


def calibration_labels(info: zoo.ModelInfo, split: data.DataSplit, calibration: list[Tensor], n: int) -> Tensor:
    """Labels of the calibration inputs (the same seeded permutation ``calibration_batches`` draws)."""
    order = torch.randperm(split.x_train.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    if not torch.equal(torch.cat(calibration), split.x_train[order]):
        raise RuntimeError(f"{info.name}: cannot recover the calibration subset's labels")
    return split.y_train[order]


def cnn_setup(model: nn.Module, example: Tensor, calibration: list[Tensor], labels: list[Tensor],
              criteria: list[str]) -> tuple[TPSetup, dict[str, Any]]:
    """Torch-Pruning on a CNN: the classifier is left alone; Taylor/Hessian gradients on labelled data."""
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    setup = TPSetup(example=example, ignored=lambda m: [m.get_submodule(last)])
    notes: dict[str, Any] = {}
    if "taylor" in criteria:
        start = time.perf_counter()
        setup.grads["taylor"] = mean_gradients(
            model, lambda m: (F.cross_entropy(m(x), y) for x, y in zip(calibration, labels, strict=True)))
        notes["taylor_seconds"] = time.perf_counter() - start
    if "hessian" in criteria:
        start = time.perf_counter()
        setup.grads["hessian"], notes["hessian_samples"] = fisher_diagonal(
            model, lambda m: (F.cross_entropy(m(x), y, reduction="none")
                              for x, y in zip(calibration, labels, strict=True)))
        notes["hessian_seconds"] = time.perf_counter() - start
    return setup, notes


def run_cnn(name: str, args: Args) -> dict[str, Any]:
    """Structured and unstructured comparisons, fine-tuning, latency and stages on one CNN."""
    model, info = zoo.load(name)
    split = info.test_split()
    n_cal = 256 if args.quick else 512
    calibration = info.calibration(n_cal, 64)
    labels = list(calibration_labels(info, split, calibration, n_cal).split(64))
    example = split.x_test[:1]
    dense_flops = flops(model, example)
    dense_acc = zoo.accuracy(model, split.x_test, split.y_test)
    result: dict[str, Any] = {"model": name, "provenance": provenance(), "calibration": n_cal,
                              "dense": {"accuracy": dense_acc, "flops": dense_flops,
                                        "params": dense_counts(model, example).params},
                              "structured": [], "unstructured": [], "latency": [], "stages": []}
    if args.finetune:
        for lr in args.ft_lrs:
            result["dense"][ft_key(lr)] = zoo.accuracy(finetune(model, split, lr), split.x_test, split.y_test)
    print(f"\n# {name}: dense test accuracy {dense_acc:.4f}, {dense_flops:,.0f} FLOPs per input, "
          f"{n_cal} calibration inputs ({load_text()})")

    setup = None
    if args.tp:
        setup, notes = cnn_setup(model, example, calibration, labels, args.criteria)
        result["tp_notes"] = notes
    kwargs = prune_kwargs(args.sequential, args.channel_multiple)
    pruned_models: dict[float, tuple[nn.Module, float]] = {}
    for budget in args.budgets:
        res, seconds, cpu = timed_prune(model, calibration, secateurs.Budget(flops=budget), **kwargs)
        ours_flops = flops(res.model, example)
        pruned_models[budget] = (res.model, dense_flops / ours_flops)
        result["stages"].append({**stage_row(f"{name} flops={budget:g}", seconds, res.report.stages),
                                 "cpu": cpu, "load": os.getloadavg()[0]})
        rows = [{"method": "secateurs", "mode": "", "ratio": math.nan, "flops": ours_flops, "mismatch": 0.0,
                 "model": res.model}]
        if setup is not None:
            for criterion in args.criteria:
                for mode in args.modes:
                    m = match_flops(lambda r, c=criterion, md=mode: tp_prune(model, setup, c, md, r),
                                    lambda mm: flops(mm, example), ours_flops,
                                    iterations=10 if args.quick else 16)
                    rows.append({"method": f"tp-{criterion}", "mode": mode, "ratio": m.ratio, "flops": m.flops,
                                 "mismatch": m.mismatch, "model": m.model, "error": m.error, "trials": m.trials})
        for row in rows:
            mm = row.pop("model")
            row["budget"] = budget
            row["flops_fraction"] = row["flops"] / dense_flops if mm is not None else math.nan
            row["accuracy"] = zoo.accuracy(mm, split.x_test, split.y_test) if mm is not None else math.nan
            if args.finetune and mm is not None:
                for lr in args.ft_lrs:
                    row[ft_key(lr)] = zoo.accuracy(finetune(mm, split, lr), split.x_test, split.y_test)
            result["structured"].append(row)
        print_structured(name, budget, [r for r in result["structured"] if r["budget"] == budget], seconds,
                         result["dense"])

    for s in args.sparsities:
        res, seconds, cpu = timed_prune(model, calibration, secateurs.Budget(sparsity=s), structure="unstructured")
        result["stages"].append({**stage_row(f"{name} unstructured sparsity={s:g}", seconds, res.report.stages),
                                 "cpu": cpu, "load": os.getloadavg()[0]})
        theirs = copy.deepcopy(model)
        torch_prune.global_unstructured([(m, "weight") for _, m in weight_modules(theirs)],
                                        pruning_method=torch_prune.L1Unstructured, amount=s)
        for method, mm in (("secateurs", res.model), ("torch.nn.utils.prune L1 global", theirs)):
            row = {"method": method, "sparsity_requested": s, "sparsity": sparsity(mm),
                   "accuracy": zoo.accuracy(mm, split.x_test, split.y_test)}
            if args.finetune:
                for lr in args.ft_lrs:
                    tuned = finetune(fix_masks(mm), split, lr)
                    row[ft_key(lr)] = zoo.accuracy(tuned, split.x_test, split.y_test)
                    row["sparsity_ft"] = sparsity(tuned)
            result["unstructured"].append(row)
        print(f"\n## {name}: unstructured, sparsity {s:.0%} (secateurs prune {seconds:.1f}s, {load_text()})")
        rows = [r for r in result["unstructured"] if r["sparsity_requested"] == s]
        keys = ft_keys(rows[0])
        print(table([(r["method"], f"{r['sparsity']:.4f}", f"{r['accuracy']:.4f}", *(f"{r[k]:.4f}" for k in keys),
                      f"{r.get('sparsity_ft', math.nan):.4f}") for r in rows],
                    ["method", "sparsity", "acc (no FT)", *(ft_label(k) for k in keys), "sparsity after FT"]))

    if args.latency and pruned_models:
        big = split.x_test
        batches = {"1": split.x_test[:1], str(big.shape[0]): big}
        # millisecond forwards: many short interleaved rounds, as the shared machine's speed drifts 2-3x
        result["latency"] = latency_rows(name, model, pruned_models, batches, 10 if args.quick else 30,
                                         rounds=3 if args.quick else 9)
        print(f"\n## {name}: CPU latency of secateurs' pruned models (fastest rounds, median per-round speedup; {load_text()})")
        print_latency(result["latency"])
    print(f"\n## {name}: secateurs stage wall times (seconds; {load_text()})")
    print_stages(result["stages"])
    return result


def ft_label(key: str) -> str:
    return f"acc (1 epoch FT, lr {key.removeprefix('accuracy_ft_lr')})"


def print_structured(name: str, budget: float, rows: list[dict[str, Any]], seconds: float,
                     dense: dict[str, Any]) -> None:
    """The per-budget comparison table (dense first), with the best Torch-Pruning row named."""
    print(f"\n## {name}: channels, FLOPs budget {budget:.0%} of dense (secateurs prune {seconds:.1f}s, {load_text()})")
    keys = ft_keys(dense)
    lines = [("dense", "", "-", "1.0000", "", f"{dense['accuracy']:.4f}", *(f"{dense[k]:.4f}" for k in keys), "")]
    lines += [(r["method"], r["mode"], "-" if math.isnan(r["ratio"]) else f"{r['ratio']:.4f}",
               f"{r['flops_fraction']:.4f}", f"{100 * r['mismatch']:+.2f}%", f"{r['accuracy']:.4f}",
               *(f"{r.get(k, math.nan):.4f}" for k in keys), r.get("error", "")[:60]) for r in rows]
    print(table(lines, ["method", "ratio mode", "TP ratio", "FLOPs kept", "vs ours", "acc (no FT)",
                        *(ft_label(k) for k in keys), "note"]))
    ours = rows[0]["accuracy"]
    tp_rows = [r for r in rows[1:] if not math.isnan(r["accuracy"])]
    if tp_rows:
        best = max(tp_rows, key=lambda r: r["accuracy"])
        verdict = "secateurs better" if ours > best["accuracy"] else "secateurs NOT better"
        print(f"best Torch-Pruning without fine-tuning: {best['method']} ({best['mode']}) {best['accuracy']:.4f}; "
              f"secateurs {ours:.4f}: {verdict} ({100 * (ours - best['accuracy']):+.2f} points)")


# -- MiniLM --------------------------------------------------------------------------------------


def minilm_halves(batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split packed windows ``[CLS] w... [SEP]`` into two half-windows, each ``[CLS] half [SEP]``."""
    ids = batch["input_ids"]
    cls, sep, body = ids[:, :1], ids[:, -1:], ids[:, 1:-1]
    h = body.shape[1] // 2
    a, b = torch.cat([cls, body[:, :h], sep], 1), torch.cat([cls, body[:, h:], sep], 1)
    return ({"input_ids": a, "attention_mask": torch.ones_like(a)},
            {"input_ids": b, "attention_mask": torch.ones_like(b)})


def minilm_surrogate_losses(model: nn.Module, batch: dict[str, Tensor], scale: float = 20.0) -> Tensor:
    """Per-window in-batch contrastive loss: each first half must retrieve its own second half.

    MiniLM has no labels and no MLM head, and any distillation loss to the dense model has a zero
    gradient at the dense model; this is the multiple-negatives ranking loss sentence-transformers
    trains with (cosine similarities scaled by 20), on pairs made from our calibration windows.
    Taylor and Hessian importance use it; it is our choice, not Torch-Pruning's.
    """
    a, b = minilm_halves(batch)
    ea, eb = model(**a), model(**b)
    return F.cross_entropy(scale * ea @ eb.T, torch.arange(ea.shape[0]), reduction="none")


def minilm_tp_setup(example: dict[str, Tensor]) -> TPSetup:
    """Heads (all of q/k/v and the output projection's inputs) and FFN neurons; the residual stream stays."""
    from secateurs.models.minilm import BertLayer, BertSelfAttention

    def ignored(m: nn.Module) -> list[nn.Module]:
        out: list[nn.Module] = []
        for mod in m.modules():
            if isinstance(mod, BertSelfAttention):
                out.append(mod.out)
            if isinstance(mod, BertLayer):
                out.append(mod.output)
        return out

    def extra(m: nn.Module) -> dict[str, Any]:
        heads = {}
        for mod in m.modules():
            if isinstance(mod, BertSelfAttention):
                heads.update({mod.query: mod.num_heads, mod.key: mod.num_heads, mod.value: mod.num_heads})
        return {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False}

    def after(m: nn.Module, pruner: Any) -> None:
        for mod in m.modules():
            if isinstance(mod, BertSelfAttention):
                mod.num_heads = pruner.num_heads[mod.query]
                if mod.query.out_features != mod.num_heads * mod.head_dim:
                    raise RuntimeError(f"TP left {mod.query.out_features} query features for {mod.num_heads} heads")

    return TPSetup(example=example, ignored=ignored, extra=extra, after=after)


def tp_minilm_prune_at(model: nn.Module, setup: TPSetup, criterion: str, mode: str) -> Callable[[float], nn.Module]:
    """Prune heads and FFN neurons at one ratio (the head ratio is the same ratio)."""
    base_extra = setup.extra

    def at(ratio: float) -> nn.Module:
        local = copy.copy(setup)
        local.extra = lambda m: {**base_extra(m), "head_pruning_ratio": ratio}
        return tp_prune(model, local, criterion, mode, ratio)

    return at


def kept_rows(dense_weight: Tensor, pruned_weight: Tensor) -> list[int]:
    """Which rows of the dense weight a sliced weight kept (Torch-Pruning keeps rows unchanged)."""
    dist = torch.cdist(pruned_weight.double(), dense_weight.double())
    idx = dist.argmin(1)
    if float(dist.gather(1, idx[:, None]).max()) > 1e-6:
        raise RuntimeError("a pruned row matches no dense row")
    return idx.tolist()


def minilm_masked_check(dense: nn.Module, pruned: nn.Module, batch: dict[str, Tensor]) -> float:
    """Max |difference| of embeddings between a TP-pruned MiniLM and the dense one with the same units zeroed.

    Zeroing a head's value rows (and bias) removes that head's context, and zeroing an FFN neuron's
    input row (and bias) makes its GELU output 0, so the two models must agree if TP pruned q, k, v
    and the output projection consistently.
    """
    from secateurs.models.minilm import BertLayer

    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for (_, d), (_, p) in zip(((n, m) for n, m in masked.named_modules() if isinstance(m, BertLayer)),
                                  ((n, m) for n, m in pruned.named_modules() if isinstance(m, BertLayer)), strict=True):
            for lin_d, lin_p in ((d.attention.value, p.attention.value), (d.intermediate, p.intermediate)):
                keep = set(kept_rows(lin_d.weight, lin_p.weight))
                drop = [i for i in range(lin_d.out_features) if i not in keep]
                lin_d.weight[drop] = 0
                lin_d.bias[drop] = 0
        return float((masked.eval()(**batch) - pruned.eval()(**batch)).abs().max())


def run_minilm(args: Args) -> dict[str, Any]:
    """secateurs and Torch-Pruning on all-MiniLM-L6-v2: embedding agreement, wall time, latency."""
    t_all = time.perf_counter()
    model, info = zoo.load("minilm")
    n_cal = 128 if args.quick else 512
    calibration = info.calibration(n_cal, 32)
    setup_seconds = time.perf_counter() - t_all
    n_held = 64 if args.quick else 256
    held = data.text_batches(n_held, 32, split="test", packed=False)
    one = {k: v[:1] for k, v in calibration[0].items()}  # (1, 128): FLOPs per sequence
    dense_flops = flops(model, one)
    reference = measure.embeddings(model, held)
    result: dict[str, Any] = {"model": "minilm", "provenance": provenance(), "calibration": n_cal,
                              "held_out": n_held, "load_and_tokenise_s": setup_seconds,
                              "dense": {"flops": dense_flops, "params": dense_counts(model, one).params},
                              "structured": [], "latency": [], "stages": []}
    print(f"\n# minilm: {result['dense']['params']:,.0f} params, {dense_flops:,.0f} FLOPs per 128-token sequence; "
          f"{n_cal} calibration sequences of 128 tokens, {n_held} held-out paragraphs ({load_text()})")
    kwargs = prune_kwargs(args.sequential, args.channel_multiple)
    pruned_models: dict[float, tuple[nn.Module, float]] = {}
    ours: dict[float, float] = {}
    for budget in args.budgets:
        res, seconds, cpu = timed_prune(model, calibration, secateurs.Budget(flops=budget), **kwargs)
        f = flops(res.model, one)
        ours[budget] = f
        pruned_models[budget] = (res.model, dense_flops / f)
        agree = measure.embedding_agreement(reference, res.model, held)
        result["stages"].append({**stage_row(f"minilm flops={budget:g}", seconds, res.report.stages),
                                 "cpu": cpu, "load": os.getloadavg()[0]})
        result["structured"].append({"method": "secateurs", "mode": "", "budget": budget, "flops": f,
                                     "flops_fraction": f / dense_flops, "mismatch": 0.0, "seconds": seconds,
                                     "cpu_seconds": cpu,
                                     "params": dense_counts(res.model, one).params, **agree})
        print(f"secateurs flops={budget:g}: prune() {seconds:.1f}s wall, {cpu:.1f}s CPU ({load_text()}), "
              f"FLOPs kept {f / dense_flops:.4f}, cosine {agree['cosine']:.4f}, top-1 {agree['top1_agreement']:.4f}")
        print(res.report.table())

    if args.tp and ours:
        setup = minilm_tp_setup(one)
        criteria = list(args.criteria)
        start = time.perf_counter()
        if "taylor" in criteria:
            setup.grads["taylor"] = mean_gradients(
                model, lambda m: (minilm_surrogate_losses(m, b).mean() for b in calibration))
            result["taylor_seconds"] = time.perf_counter() - start
        if "hessian" in criteria:
            start = time.perf_counter()
            per_sample_batches = 1 if args.quick else 2  # per-sample backward passes cost a batch each
            setup.grads["hessian"], result["hessian_samples"] = fisher_diagonal(
                model, lambda m: (minilm_surrogate_losses(m, b) for b in calibration[:per_sample_batches]))
            result["hessian_seconds"] = time.perf_counter() - start
        check_batch = held[0]
        for budget, target in ours.items():
            for criterion in criteria:
                for mode in args.modes:
                    m = match_flops(tp_minilm_prune_at(model, setup, criterion, mode), lambda mm: flops(mm, one),
                                    target, iterations=8 if args.quick else 12)
                    row: dict[str, Any] = {"method": f"tp-{criterion}", "mode": mode, "budget": budget,
                                           "ratio": m.ratio, "flops": m.flops, "mismatch": m.mismatch,
                                           "flops_fraction": m.flops / dense_flops, "trials": m.trials,
                                           "error": m.error}
                    if m.model is not None:
                        row["masked_check_max_abs"] = minilm_masked_check(model, m.model, check_batch)
                        row.update(measure.embedding_agreement(reference, m.model, held))
                    else:
                        row.update({"cosine": math.nan, "top1_agreement": math.nan})
                    result["structured"].append(row)
    for budget in ours:
        rows = [r for r in result["structured"] if r["budget"] == budget]
        print(f"\n## minilm: heads + FFN, FLOPs budget {budget:.0%} of dense ({load_text()})")
        print(table([(r["method"], r["mode"], "-" if "ratio" not in r else f"{r['ratio']:.4f}",
                      f"{r['flops_fraction']:.4f}", f"{100 * r['mismatch']:+.2f}%", f"{r['cosine']:.4f}",
                      f"{r['top1_agreement']:.4f}",
                      "" if "masked_check_max_abs" not in r else
                      ("ok" if r["masked_check_max_abs"] < 1e-4 else f"WRONG ({r['masked_check_max_abs']:.2g})"),
                      r.get("error", "")[:50]) for r in rows],
                    ["method", "ratio mode", "TP ratio", "FLOPs kept", "vs ours", "cosine", "top-1 agree",
                     "output check", "note"]))
        tp_rows = [r for r in rows[1:] if not math.isnan(r["cosine"])]
        if tp_rows:
            best = max(tp_rows, key=lambda r: r["cosine"])
            print(f"best Torch-Pruning: {best['method']} ({best['mode']}) cosine {best['cosine']:.4f}; "
                  f"secateurs {rows[0]['cosine']:.4f}")
    if "taylor_seconds" in result:
        print(f"Taylor gradients (surrogate loss, {n_cal} sequences): {result['taylor_seconds']:.1f}s")
    if "hessian_seconds" in result:
        print(f"Hessian (per-sample squared gradients, {result['hessian_samples']} sequences): "
              f"{result['hessian_seconds']:.1f}s")

    if args.latency and pruned_models:
        batches = {"1x128": one, "8x128": {k: v[:8] for k, v in calibration[0].items()}}
        result["latency"] = latency_rows("minilm", model, pruned_models, batches, 5 if args.quick else 10,
                                         rounds=3 if args.quick else 9)
        print(f"\n## minilm: CPU latency of secateurs' pruned models (fastest rounds, median per-round speedup; {load_text()})")
        print_latency(result["latency"])
    print(f"\n## minilm: secateurs stage wall times (seconds; loading the model and tokenising the calibration "
          f"text took {setup_seconds:.1f}s more; {load_text()})")
    print_stages(result["stages"])
    return result


# -- plots ---------------------------------------------------------------------------------------


def plot_all(out: Path) -> list[Path]:
    """Accuracy vs FLOPs per CNN, MiniLM cosine vs FLOPs, speedup vs FLOPs ratio, from every JSON in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {p.stem.removeprefix("oneshot_"): json.loads(p.read_text()) for p in sorted(out.glob("oneshot_*.json"))}
    written = []
    for name, res in results.items():
        if name not in CNNS or not res["structured"]:
            continue
        keys = ft_keys(res["dense"])
        panels = [("accuracy", "channels, no fine-tuning")] + [(k, f"channels, 1 epoch FT, lr {k[14:]}") for k in keys]
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5 * (len(panels) + 1), 4.5))
        for ax, (key, title) in zip(axes, panels, strict=False):
            methods = sorted({(r["method"], r["mode"]) for r in res["structured"]}, key=lambda x: x != ("secateurs", ""))
            for method, mode in methods:
                rows = sorted((r for r in res["structured"] if (r["method"], r["mode"]) == (method, mode)
                               and key in r and not math.isnan(r[key])), key=lambda r: r["flops_fraction"])
                if rows:
                    ours = method == "secateurs"
                    ax.plot([r["flops_fraction"] for r in rows], [r[key] for r in rows],
                            marker="o" if ours else ".", lw=2.5 if ours else 1,
                            ls="-" if ours or mode == "global" else "--",
                            label=method if ours else f"{method} ({mode})")
            if key in res["dense"]:
                ax.axhline(res["dense"][key], color="k", lw=0.8, ls=":", label="dense (same treatment)")
            ax.set_xlabel("FLOPs kept (fraction of dense)")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{name}: {title}")
        axes[0].legend(fontsize=7)
        ax = axes[-1]
        for i, method in enumerate(sorted({r["method"] for r in res["unstructured"]})):
            rows = sorted((r for r in res["unstructured"] if r["method"] == method), key=lambda r: r["sparsity"])
            ax.plot([r["sparsity"] for r in rows], [r["accuracy"] for r in rows], marker="o", color=f"C{i}",
                    label=f"{method}")
            for k, ls in zip(ft_keys(rows[0]), ("--", ":", "-."), strict=False):
                ax.plot([r["sparsity"] for r in rows], [r.get(k, math.nan) for r in rows], marker="x", color=f"C{i}",
                        ls=ls, label=f"{method} + 1 epoch FT lr {k[14:]}")
        ax.axhline(res["dense"]["accuracy"], color="k", lw=0.8, ls=":", label="dense")
        ax.set_xlabel("sparsity (fraction of Conv/Linear weights zero)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name}: unstructured")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out / f"oneshot_accuracy_{name}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    if "minilm" in results and results["minilm"]["structured"]:
        res = results["minilm"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, key, label in ((axes[0], "cosine", "mean cosine to dense"),
                               (axes[1], "top1_agreement", "top-1 retrieval agreement")):
            for method, mode in sorted({(r["method"], r["mode"]) for r in res["structured"]}):
                rows = sorted((r for r in res["structured"] if (r["method"], r["mode"]) == (method, mode)
                               and not math.isnan(r[key])), key=lambda r: r["flops_fraction"])
                ours = method == "secateurs"
                ax.plot([r["flops_fraction"] for r in rows], [r[key] for r in rows], marker="o" if ours else ".",
                        lw=2.5 if ours else 1, label=method if ours else f"{method} ({mode})")
            ax.set_xlabel("FLOPs kept (fraction of dense)")
            ax.set_ylabel(label)
            ax.set_title(f"all-MiniLM-L6-v2: {label}")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(out / "oneshot_minilm.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    lat = [r for res in results.values() for r in res.get("latency", [])]
    if lat:
        fig, ax = plt.subplots(figsize=(6.5, 5))
        top = max(max(r["flops_ratio"] for r in lat), max(r["speedup"] for r in lat)) * 1.1
        ax.plot([1, top], [1, top], "k-", lw=0.8, label="speedup = FLOPs ratio")
        ax.plot([1, top], [0.8, 0.8 * top], "k:", lw=0.8, label="0.8 x FLOPs ratio (target)")
        series = sorted({(r["model"], r["batch"]) for r in lat})
        colours = {key: f"C{i % 10}" for i, key in enumerate(series)}
        styles = {(1, "wall"): "--", (2, "wall"): "-", (1, "cpu"): ":"}
        for key in sorted({(r["model"], r["batch"], r["threads"], r.get("clock", "wall")) for r in lat}):
            rows = sorted((r for r in lat if (r["model"], r["batch"], r["threads"], r.get("clock", "wall")) == key),
                          key=lambda r: r["flops_ratio"])
            ax.plot([r["flops_ratio"] for r in rows], [r["speedup"] for r in rows], marker="o", ms=4,
                    color=colours[key[:2]], ls=styles.get(key[2:], "-."),
                    label=f"{key[0]} batch {key[1]}, {key[2]} thread{'s' if key[2] > 1 else ''} {key[3]}")
        ax.set_xlabel("FLOPs ratio (dense / pruned)")
        ax.set_ylabel("measured speedup (dense / pruned latency)")
        ax.set_title("CPU latency vs FLOPs")
        ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(out / "oneshot_speedup.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


# -- main ----------------------------------------------------------------------------------------


def parse(argv: Sequence[str] | None = None) -> Args:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--models", default="mnist1d_cnn,digits_cnn,minilm", help="comma-separated zoo names")
    parser.add_argument("--budgets", default="0.7,0.5,0.3", help="FLOPs fractions kept (comma-separated)")
    parser.add_argument("--sparsities", default="0.3,0.5,0.7", help="unstructured sparsities (CNNs); '' for none")
    parser.add_argument("--criteria", default=",".join(CRITERIA), help="Torch-Pruning importance criteria")
    parser.add_argument("--modes", default=",".join(MODES), help="Torch-Pruning ratio modes (uniform, global)")
    parser.add_argument("--quick", action="store_true", help="fewer calibration/held-out samples, shorter searches")
    parser.add_argument("--no-finetune", action="store_true", help="skip the one-epoch fine-tuning")
    parser.add_argument("--ft-lr", default=",".join(f"{x:g}" for x in FT_LRS),
                        help="fine-tuning learning rates (one epoch each, AdamW; comma-separated)")
    parser.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--sequential", choices=["default", "on", "off"], default="default",
                        help="pass sequential= to secateurs.prune (default: the pipeline's own default)")
    parser.add_argument("--channel-multiple", type=channel_multiple_arg, default=1,
                        help="pass channel_multiple= to secateurs.prune (16: oneDNN's block on AVX-512; auto: "
                             "the CPU's vector width)")
    parser.add_argument("--out", default=str(OUT), help="folder for the JSON results and PNG plots")
    parser.add_argument("--only-latency", action="store_true",
                        help="prune with secateurs and measure latency only; replace just the latency rows of the JSON")
    ns = parser.parse_args(argv)
    if ns.only_latency:
        ns.no_tp, ns.no_finetune, ns.no_latency, ns.sparsities = True, True, False, ""

    def floats(text: str) -> list[float]:
        return [float(x) for x in text.split(",") if x.strip()]

    models = [m for m in ns.models.split(",") if m]
    unknown = [m for m in models if m not in zoo.names()]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {list(zoo.names())}")
    criteria = [c for c in ns.criteria.split(",") if c]
    if set(criteria) - set(CRITERIA):
        parser.error(f"criteria must be among {CRITERIA}")
    modes = [m for m in ns.modes.split(",") if m]
    if set(modes) - set(MODES):
        parser.error(f"modes must be among {MODES}")
    return Args(models, floats(ns.budgets), floats(ns.sparsities), criteria, modes, ns.quick, not ns.no_finetune,
                not ns.no_latency, not ns.no_tp, ns.sequential, Path(ns.out), ns.only_latency,
                tuple(floats(ns.ft_lr)), ns.channel_multiple)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    steady_allocator()  # as the CLI does: stage times without page faults, before the first latency row
    args.out.mkdir(parents=True, exist_ok=True)
    prov = provenance()
    dirty = f" (uncommitted changes in: {', '.join(prov['dirty'].splitlines())})" if prov["dirty"] else ""
    print(f"secateurs at commit {prov['commit']}{dirty} from {prov['secateurs_path']}; torch {prov['torch']}, "
          f"torch-pruning {prov['torch_pruning']}; {load_text()}; 2 threads except latency rows")
    if args.sequential != "default":
        print(f"secateurs.prune(..., sequential={args.sequential == 'on'})")
    if args.channel_multiple != 1:
        print(f"secateurs.prune(..., channel_multiple={args.channel_multiple!r})")
    start = time.perf_counter()
    for name in args.models:
        result = run_minilm(args) if name == "minilm" else run_cnn(name, args)
        path = args.out / f"oneshot_{name}.json"
        if args.only_latency and path.is_file():
            merged = json.loads(path.read_text())
            merged["latency"], merged["latency_provenance"] = result["latency"], result["provenance"]
            fresh = {r["run"] for r in result["stages"]}
            merged["stages"] = result["stages"] + [r for r in merged.get("stages", []) if r["run"] not in fresh]
            result = merged
        path.write_text(json.dumps(result, indent=1, default=float))
    for path in plot_all(args.out):
        print(f"wrote {path}")
    print(f"\ntotal {time.perf_counter() - start:.0f}s; {load_text()}")


if __name__ == "__main__":
    main()
