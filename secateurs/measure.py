"""Before/after measurements of a model: parameters, FLOPs, CPU latency, task quality."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateurs.calibration import evaluating, forward_batch
from secateurs.errors import ValidationError
from secateurs.timing import steady_allocator, synchronized


def latency(model: nn.Module, inputs: Any, *, repeats: int = 20, warmup: int = 3,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of one forward on ``inputs`` (eval mode, no grad), wall clock by default.

    ``clock=time.thread_time`` measures the calling thread's CPU time instead: with one torch
    thread that is the forward's compute, unaffected by other processes taking the CPU away
    (on a shared machine the wall clock mostly measures the other processes). The allocator is
    made steady first (:func:`secateurs.timing.steady_allocator`), so page faults are not timed,
    and on a GPU the clock waits for the forward's kernels (:func:`secateurs.timing.synchronized`).
    """
    steady_allocator()
    clock = synchronized(clock)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + repeats):
                start = clock()
                forward_batch(model, inputs)
                if i >= warmup:
                    times.append(clock() - start)
    finally:
        model.train(was_training)
    return statistics.median(times)


@dataclass(frozen=True)
class LatencyComparison:
    """Two models timed in alternating rounds: the fastest round of each, and the typical ratio."""

    dense: float  # seconds, fastest round's median forward
    pruned: float
    speedup: float  # median over rounds of dense / pruned, each pair from the same time window
    rounds: int = 0
    repeats: int = 0
    spread: tuple[float, float] = (math.nan, math.nan)  # the per-round ratios' quartiles: how much rounds agree


def compare_latency(dense: nn.Module, pruned: nn.Module, inputs: Any, *, rounds: int = 15, repeats: int = 5,
                    clock: Callable[[], float] = time.perf_counter) -> LatencyComparison:
    """Time ``dense`` and ``pruned`` in alternating short rounds on ``inputs``.

    A shared machine's speed drifts between time windows, so two models timed a minute apart are
    not comparable; the ratio of two rounds run back to back is. The speedup is the median of those
    per-round ratios; the times are each model's fastest round.
    """
    if rounds < 1 or repeats < 1:
        raise ValidationError("rounds" if rounds < 1 else "repeats", f"must be at least 1, got {min(rounds, repeats)}")
    d, p = [], []
    for _ in range(rounds):
        d.append(latency(dense, inputs, repeats=repeats, warmup=1, clock=clock))
        p.append(latency(pruned, inputs, repeats=repeats, warmup=1, clock=clock))
    ratios = [a / b for a, b in zip(d, p, strict=True)]
    low, _, high = statistics.quantiles(ratios, n=4, method="inclusive") if rounds > 1 else ratios * 3
    return LatencyComparison(min(d), min(p), statistics.median(ratios), rounds, repeats, (low, high))


def compare_latency_within(dense: nn.Module, pruned: nn.Module, inputs: Any, *, seconds: float = 20.0,
                           clock: Callable[[], float] = time.perf_counter) -> LatencyComparison:
    """:func:`compare_latency` with the rounds (3 to 15) and repeats (1 to 5) that fit in about
    ``seconds``: a transformer's forward on a batch takes a second on a CPU, and 15 rounds of 5
    repeats of both models would take minutes. One dense forward, timed first, sets the pace."""
    if not seconds > 0:
        raise ValidationError("seconds", f"must be positive, got {seconds!r}")
    once = max(latency(dense, inputs, repeats=1, warmup=1, clock=clock), 1e-9)
    repeats = max(1, min(5, int(0.5 / once)))  # about half a second per model and round
    rounds = max(3, min(15, int(seconds / (2 * (repeats + 1) * once))))  # both models, warm-up included
    return compare_latency(dense, pruned, inputs, rounds=rounds, repeats=repeats, clock=clock)


def output_error(dense: nn.Module, pruned: nn.Module, batches: Iterable[Any], *,
                 dense_outputs: Sequence[Any] | None = None) -> float:
    """‖pruned(x) − dense(x)‖ / ‖dense(x)‖ (Frobenius, float64) over every batch and every
    floating tensor of the outputs (a tensor, or tuples, lists and dicts of them, as
    HuggingFace's outputs are), eval mode, no grad.

    The per-group errors of a prune report are each consumer's reconstruction error on its own
    inputs; this is what the pruned model does end to end, against the dense model it replaces.
    ``dense_outputs`` (one per batch, e.g. kept from a pass that already ran the dense model)
    saves the dense forwards; one whose tensors do not line up with the pruned outputs is
    computed again.
    """
    diff = total = 0.0
    with torch.no_grad(), evaluating(dense, pruned):
        for index, batch in enumerate(batches):
            got = _floating(forward_batch(pruned, batch))
            want = _floating(dense_outputs[index]) if dense_outputs is not None and index < len(dense_outputs) else []
            if [a.shape for a in want] != [b.shape for b in got]:
                want = _floating(forward_batch(dense, batch))
            if [a.shape for a in want] != [b.shape for b in got]:
                raise ValidationError("pruned", f"batch {index}: outputs shaped {[tuple(b.shape) for b in got]}, "
                                                f"the dense model's {[tuple(a.shape) for a in want]}")
            for a, b in zip(want, got, strict=True):
                a64 = a.to(torch.float64)
                diff += float((b.to(torch.float64) - a64).pow(2).sum())
                total += float(a64.pow(2).sum())
    if total == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / total)


def _floating(output: Any) -> list[torch.Tensor]:
    """The floating tensors in a model's output, in a fixed order."""
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for key in output for t in _floating(output[key])]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _floating(item)]
    return []


def embeddings(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings of every batch, concatenated (eval mode, no grad)."""
    with torch.no_grad():
        return torch.cat([model.eval()(**b) for b in batches])


def embedding_agreement(dense: nn.Module | torch.Tensor, pruned: nn.Module,
                        batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean cosine of pruned to dense sentence embeddings, and top-1 nearest-neighbour agreement.

    Retrieval: each held-out sentence queries all others; agreement is the share of queries
    whose nearest neighbour under the pruned model is the dense model's. ``dense`` may be the
    dense model or its :func:`embeddings` of ``batches``, so comparing many pruned models to one
    dense model runs the dense forward once.
    """
    a = dense if isinstance(dense, torch.Tensor) else embeddings(dense, batches)
    b = embeddings(pruned, batches)
    if a.shape != b.shape:
        raise ValidationError("dense", f"dense embeddings {tuple(a.shape)} do not match the pruned model's {tuple(b.shape)}")
    cosine = float(torch.nn.functional.cosine_similarity(a, b).mean())
    eye = torch.eye(a.shape[0], dtype=torch.bool)
    nn_dense = (a @ a.T).masked_fill(eye, -2).argmax(1)
    nn_pruned = (b @ b.T).masked_fill(eye, -2).argmax(1)
    return {"cosine": cosine, "top1_agreement": float((nn_dense == nn_pruned).float().mean())}
