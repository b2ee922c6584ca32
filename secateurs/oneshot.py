"""One-shot pruning: calibration → error curves → allocation → per-group solves and refit → model.

Channels (structured), in one pass over the calibration data:

1. trace the model into groups (``graph.build``) and reject a budget no plan can meet;
2. accumulate XᵀX of every layer that reads a prunable group (``calibration.collect``);
3. per group, an OSSCAR ``Reconstruction`` over the columns its units occupy in each consumer
   (other inputs of the consumer are held at their dense values); one greedy backward path gives
   the refit error of every keep level;
4. an ``Allocation`` over those error curves under the graph's exact params/FLOPs polynomials
   picks a keep level per group (``dp`` by default, exact on forests and residual blocks;
   ``cpsat`` when dp refuses interactions of larger tree width);
5. per group, the reconstruction solver (``local_search`` by default, started from the greedy
   support) picks the units, and the consumers are refit in closed form;
6. the plan is applied to a copy: a physically smaller model, verified by a forward pass.

Unstructured and N:M: per-layer masks from reconstruction-aware scores |W|·‖X‖, per-layer
densities from the allocation solvers (unstructured), and an optional per-row least-squares refit.

The allocation compares groups by their refit error in the units of their consumers' outputs,
as a share of all consumers' dense output energy: ``e_g(k) = (f_g(k) + c_g) / Σ_h c_h``, so a
unit of output error costs the same wherever it arises. This weighting is our choice. (Weighting
each group's own relative error ``(f_g + c_g)/c_g`` equally, which the report still shows per
group, did worse: on all-MiniLM-L6-v2 at 50% FLOPs the embedding cosine to dense was 0.80 against
0.86, on the digits CNN at 30% FLOPs test accuracy 0.982 against 0.987.) A group without a
reconstructable consumer has a magnitude curve (share of its weight energy), weighted like an
average group.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.apply import apply, mask_in_place
from secateurs.budget import Budget
from secateurs.calibration import GramStatistics, collect, row_reader
from secateurs.consumers import ConsumerColumns, consumer_columns, consumer_weight
from secateurs.cost import Cost
from secateurs.errors import InfeasibleBudgetError, SolverError, UnknownSolverError, ValidationError
from secateurs.graph import DependencyGraph, build, dense_counts
from secateurs.graph.build import _arguments
from secateurs.graph.groups import Group, check_channel_multiple, keep_levels, unit_multiple
from secateurs.hardware import describe, model_device
from secateurs.latency import POINTS as LATENCY_POINTS
from secateurs.latency import Window, timing_batch
from secateurs.latency import measure as measure_latency
from secateurs.layerwise import Lockstep, run_together
from secateurs.measure import output_error
from secateurs.memory import available_bytes, max_gram_columns, need
from secateurs.plan import PrunePlan
from secateurs.problems.allocation import Allocation, Latency
from secateurs.problems.allocation import Budget as CostBudget
from secateurs.problems.reconstruction import Reconstruction
from secateurs.prune_result import PruneResult
from secateurs.report import BudgetLine, GroupReport, PruneReport
from secateurs.solvers import Deadline, SolveResult, Status, solve
from secateurs.solvers.allocation_fallback import solve_allocation
from secateurs.solvers.reconstruction_greedy import greedy_path
from secateurs.solvers.registry import lookup
from secateurs.torch_transformer import is_projection
from secateurs.weight_pruning import prune_weights
from secateurs.window_attention import computing_twin

log = logging.getLogger("secateurs")

STRUCTURES = ("channels", "unstructured", "n:m")
LATENCY_CHECKS = 6  # allocations a latency budget may take to be met as measured (see _meet_measured_latency)
LATENCY_MARGIN = 0.03  # share under a latency limit the timed plans aim for: timing one model twice differs
LATENCY_SLACK = 0.05  # a plan measured this share under that aim or closer is not loosened further
LATENCY_ROUNDS = 5  # back-to-back pairs with the dense model per timed plan (the median ratio counts)


@dataclass
class _GroupWork:
    """A group's reconstruction problem, its consumers and its greedy error path."""

    group: Group
    problem: Reconstruction | None
    consumers: list[ConsumerColumns]
    path: dict[int, tuple[list[int], float]]
    note: str = ""
    scored_by: str = "magnitude"  # what ranks the units of a group without a problem (its report's solver)


def prune(
    model: nn.Module,
    calibration: Iterable[Any],
    budget: Budget | None,
    *,
    example_inputs: Any = None,
    reconstruction: str = "local_search",
    allocation: str = "dp",
    structure: str = "channels",
    sequential: bool = True,
    nm: tuple[int, int] = (2, 4),
    levels: int = 32,
    channel_multiple: int | Literal["auto"] = 1,
    refit: bool = True,
    error_curve: bool = True,
    progress: bool = True,
    time_limit: float | None = None,
    seed: int = 0,
) -> PruneResult:
    """Prune a copy of ``model`` to ``budget`` using ``calibration`` batches.

    Parameters
    ----------
    model : nn.Module
        Never modified.
    calibration : iterable of batches
        Tensors, tuples of tensors (positional inputs) or dicts (keyword inputs). With
        ``sequential=False`` it is read once, streaming: statistics do not grow with the number
        of batches; the sequential pass holds the batches (and their live activations). Each
        consumer input of p columns has a p × p float64 Gram, and the channel path holds about
        five copies of it at once (six are counted, for a margin). An input too wide for that to
        fit in the free memory of the model's device (VGG's 25,088-input classifier on a 24 GB
        machine) keeps only the Gram's diagonal: its consumer is not refit, a group only it
        reads is scored on that diagonal, and the report's notes name it (:mod:`secateurs.memory`).
    budget : Budget
        ``Budget(flops=0.5)``, ``Budget(params=0.6)``, ``Budget(latency=0.6)`` (measured on
        ``example_inputs``) for channels; ``Budget(sparsity=0.7)`` for
        unstructured; ``None`` (or the matching sparsity) for N:M.
    example_inputs : optional
        Inputs to trace with, and that a latency budget is measured on; default the first
        calibration batch. Latency takes tens of whole forwards on them (rate fits, the measured
        check), so give a transformer a few sequences: MiniLM on 64 × 128 tokens (1.3 s a
        forward) spent 9 minutes in its tables, on 8 sequences about one; a small CNN's timings need a
        large batch instead, or per-call overhead is all they measure.
    reconstruction, allocation : str
        Solver names (``secateurs.solvers.available(problem)`` lists them).
    structure : {"channels", "unstructured", "n:m"}
    sequential : bool
        Channels: solve each group on the inputs of the model with every earlier group already
        pruned and refit (OSSCAR's layer-by-layer order), in one layer-wise pass that holds the
        calibration set's live activations at one point of the graph. False: every group is
        solved on the dense model's statistics, streaming (memory independent of the batches).
    nm : (N, M)
        The N:M pattern for ``structure="n:m"``.
    levels : int
        Keep levels per group (channels) or densities per layer (unstructured) offered to the
        allocation.
    channel_multiple : int or "auto"
        Channels: every pruned layer keeps a multiple of this many channels (or all of them).
        CPU and GPU kernels work in blocks of the vector width (oneDNN on AVX-512: 16 floats), and
        a width off the block runs as slowly as the next multiple up: a 17-channel conv took as
        long as a 32-channel one here. A unit wider than one channel (an attention head) counts
        its channels: heads of 32 channels take any head count for a multiple of 8. ``"auto"``:
        the block of the model's device (:func:`secateurs.hardware.vector_channels`: 16 on
        AVX-512, 8 on AVX2 and CUDA); plans then differ between machines. The default 1 keeps
        any width, so plans are the same everywhere.
    refit : bool
        Least-squares refit of the weights reading pruned inputs (always on for channels, where
        it is OSSCAR's closed form; optional per row for unstructured / N:M).
    error_curve : bool
        Also solve the allocation at other budgets for the report's error-vs-budget curve.
    progress : bool
        Progress bars per stage (tqdm) and per-group log lines (logger ``secateurs``).
    time_limit : float, optional
        Seconds for the solving: the allocation, the error curve (at most a fifth of what is left)
        and the per-group solves get what remains and fall back to greedy plans and supports when
        it runs out (said in the report's notes); the layer-wise pass then stops collecting
        statistics and refits on the dense model's. Tracing, calibration statistics, the greedy
        error paths and latency tables always run to the end, so a run can take longer than this.
    """
    if structure not in STRUCTURES:
        raise ValidationError("structure", f"expected one of {STRUCTURES}, got {structure!r}")
    if budget is not None and not isinstance(budget, Budget):
        raise ValidationError("budget", f"expected a secateurs.Budget, got {type(budget).__name__}")
    if not isinstance(model, nn.Module):
        raise ValidationError("model", f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValidationError("levels", f"must be an integer >= 2, got {levels!r}")
    multiple = check_channel_multiple(channel_multiple, model_device(model))
    if time_limit is not None and not time_limit > 0:
        raise ValidationError("time_limit", f"must be positive seconds, got {time_limit!r}")
    if structure == "channels" and (budget is None or not (budget.structured() or budget.timed())):
        raise ValidationError("budget", "channel pruning needs Budget(flops=...), Budget(params=...) and/or "
                                        "Budget(latency=...)")
    if structure == "unstructured" and (budget is None or budget.sparsity is None):
        raise ValidationError("budget", "unstructured pruning needs Budget(sparsity=...)")
    if structure == "n:m":
        if not (isinstance(nm, (tuple, list)) and len(nm) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                         for v in nm)):
            raise ValidationError("nm", f"expected a pair of integers (N, M), got {nm!r}")
        n, m = nm
        if not 0 < n < m:
            raise ValidationError("nm", f"N:M needs 0 < N < M, got {n}:{m}")
        if budget is not None and (budget.sparsity is None or not math.isclose(budget.sparsity, 1 - n / m)):
            raise ValidationError("budget", f"an {n}:{m} pattern removes exactly {1 - n / m:g} of the weights")
    _check_solver("allocation", allocation, "allocation")
    if structure == "channels":
        _check_solver("reconstruction", reconstruction, "reconstruction")
    replayable = calibration if isinstance(calibration, (list, tuple)) else None
    try:
        batches = iter(calibration)
    except TypeError:
        raise ValidationError("calibration", f"expected an iterable of batches, got {type(calibration).__name__}") from None
    try:
        first = next(batches)
    except StopIteration:
        raise ValidationError("calibration", "no batches: give at least one calibration batch") from None
    calibration = itertools.chain([first], batches)
    if example_inputs is None:
        _check_first_batch(model, first)
    dense = model
    model = computing_twin(model)  # torchvision's Swin attention: its heads' output seen by hooks
    deadline = Deadline(time_limit)
    if structure == "channels":
        assert budget is not None
        result = _prune_channels(model, calibration, budget, first if example_inputs is None else example_inputs,
                                 reconstruction, allocation, levels, error_curve, progress, deadline, seed,
                                 sequential=sequential, channel_multiple=multiple,
                                 auto_multiple=channel_multiple == "auto")
    else:
        result = prune_weights(model, calibration, budget, structure, nm, allocation, levels, refit, progress,
                               deadline, seed)
    if result.report.output_error is None:  # the layer-wise pass measures it on the batches it holds
        if replayable is None:
            result.report.notes.append("output error not measured: the calibration batches were a one-pass "
                                       "iterable (pass a list to measure it)")
        else:
            _measure_output_error(result.report, dense, result.model, replayable)
    return result


def _measure_output_error(report: PruneReport, dense: nn.Module, pruned: nn.Module, batches: Sequence[Any],
                          dense_outputs: Sequence[Any] | None = None) -> None:
    """The report's output error and its stage time; a note instead if the outputs cannot be
    compared (the pruned model is whole and sound either way, so the run does not fail here)."""
    started = time.perf_counter()
    try:
        report.output_error = output_error(dense, pruned, batches, dense_outputs=dense_outputs)
    except ValidationError as exc:
        report.notes.append(f"output error not measured: {str(exc).splitlines()[0]}")
    report.stages["output error"] = time.perf_counter() - started


def _check_first_batch(model: nn.Module, first: Any) -> None:
    """The first batch is also the tracing input: say so, and how to drop a DataLoader's labels."""
    try:
        _arguments(model, first)
    except ValidationError as e:
        cause = str(e.__cause__) if e.__cause__ is not None else str(e).partition(": ")[2]
        hint = ""
        if isinstance(first, (tuple, list)):
            hint = (f"; a {type(first).__name__} batch of {len(first)} is taken as positional inputs, so drop a "
                    "DataLoader's labels: (x for x, _ in loader)")
        raise ValidationError("calibration", f"batch 0 does not match {type(model).__name__}.forward: {cause}{hint}") \
            from e


def _check_solver(field: str, name: Any, kind: str) -> None:
    """An unknown solver name fails before any work (statistics, curves), naming the registered ones."""
    if not isinstance(name, str):  # solver objects and callables are solve()'s to check
        return
    try:
        lookup(name, kind)
    except UnknownSolverError as e:
        raise UnknownSolverError(f"{field}: {e}") from None


# -- channels ------------------------------------------------------------------------------------


def _check_feasible(graph: DependencyGraph, budget: Budget, dense: Cost, limits: dict[str, float],
                    channel_multiple: int) -> None:
    """Reject a budget below the cost of keeping the least level of every prunable group, saying
    what that least is as a fraction of the dense model, and when the value asked for was read as
    an absolute count (above 1) that a fraction was perhaps meant."""
    least = graph.cost({g.name: keep_levels(g, channel_multiple)[0] for g in graph.prunable_groups()})
    what = "one unit kept in every prunable group" if channel_multiple == 1 else (
        f"every prunable group at its least multiple of {channel_multiple} channels; channel_multiple=1 "
        "(--channel-multiple 1) allows any width")
    for name, limit in limits.items():
        lowest, total = getattr(least, name), getattr(dense, name)
        if lowest > limit:
            asked = budget.structured()[name]
            read = "" if asked <= 1 else (f"; {asked:g} is above 1, so it was read as an absolute count, not a "
                                          "fraction of the dense model")
            raise InfeasibleBudgetError(name, limit, lowest, f"{lowest / total:.3g} of the dense {total:,.0f}, "
                                                             f"with {what}{read}")


def _group_problem(model: nn.Module, group: Group, stats: dict[str, GramStatistics], *,
                   release: frozenset[str] = frozenset()) -> tuple[Reconstruction | None, list[ConsumerColumns], str]:
    """The OSSCAR problem of one group over its consumers' columns (or None, with why).

    The statistics of the inputs in ``release`` (the layer-wise pass's fresh ones, which nothing
    else reads) are dropped as soon as the problem has its copies of them: a Gram and its cross
    term are p² floats each, and they would otherwise sit beside the problem's H and factor.
    """
    found, skipped = consumer_columns(model, group)
    notes = [f"not refit: {s}" for s in skipped]
    wide = {c.input: stats[c.input] for c in found if stats[c.input].too_wide}
    if wide:
        notes.append("not refit, too wide for the memory: " + ", ".join(
            f"{name} ({need(s.columns)}; {s.max_columns:,} columns fit)" for name, s in sorted(wide.items())))
    usable = [c for c in found if stats[c.input].rows > 0 and c.input not in wide]
    unseen = sorted({c.input for c in found if stats[c.input].rows == 0})
    if unseen:
        notes.append(f"not refit, no input seen on the calibration data (never called): {', '.join(unseen)}")
    widths = sorted({c.width for c in usable})
    if len(widths) > 1:  # one problem needs one unit width; keep the consumers of the first
        notes.append(f"consumers of widths {widths[1:]} are pruned but not refit")
        usable = [c for c in usable if c.width == widths[0]]
    if not usable:  # the caller picks the error curve, and says which
        return None, [], "; ".join(notes + ["no reconstructable consumer"])
    hessians, targets, weights = [], [], []
    for index, c in enumerate(usable):
        gram, cross = stats[c.input].gram, stats[c.input].cross
        last = c.input in release and all(d.input != c.input for d in usable[index + 1:])
        assert gram is not None
        cols = c.flat().to(gram.device)
        h = gram[cols[:, None], cols]  # one copy (no row-gathered half-way one), so the ridge goes on in place
        ridge = 0.01 * float(torch.diagonal(h).mean()) or 1e-8
        h.diagonal().add_(ridge)
        weight = consumer_weight(model, c.module).detach()
        dense = c.weight_block(weight)[:, c.weight_flat().to(weight.device)].to(gram).T  # Ŵ, p x m
        if last:  # each drop as soon as its copy is made: the cross term's copy comes next
            stats[c.input].gram = gram = None
        # G = (XᵀX_target + λI)·Ŵ: the target is the dense layer's output on the dense model's inputs
        # when those were recorded (sequential pruning), else on the same inputs (G = HŴ).
        if cross is None:
            targets.append(None)
        else:
            target = cross[cols[:, None], cols]
            target.diagonal().add_(ridge)
            targets.append(target @ dense)
            del target  # p² floats; the problem needs only G
        hessians.append(h)
        weights.append(dense.T)
        if last:
            stats[c.input].cross = cross = None
    if all(t is None for t in targets):  # G = HŴ: the problem computes it, and Ŵ needs no solve
        problem = Reconstruction.from_hessian(hessians, W=weights, unit_width=widths[0], keep=group.size)
    else:
        targets = [h @ w.T if t is None else t for h, w, t in zip(hessians, weights, targets, strict=True)]
        problem = Reconstruction.from_hessian(hessians, G=targets, unit_width=widths[0], keep=group.size)
    return problem, usable, "; ".join(notes)


def _magnitude_path(model: nn.Module, group: Group) -> dict[int, tuple[list[int], float]]:
    """Fallback error curve: the share of producer weight energy dropped when keeping the top k."""
    energy = torch.zeros(group.size, dtype=torch.float64)
    for member in group.producers():
        weight = getattr(model.get_submodule(member.module), member.param).detach().to(torch.float64)
        moved = weight.movedim(member.dim, 0)
        for u in range(group.size):
            energy[u] += moved[member.indices([u])].pow(2).sum()
    return _energy_path(energy)


def _diagonal_consumers(found: list[ConsumerColumns], stats: dict[str, GramStatistics]) -> list[ConsumerColumns]:
    """The consumers whose too-wide inputs kept the Gram's diagonal, when their units are alike
    (one unit width); else none, and the group falls back to its producers' weight magnitude."""
    wide = [c for c in found if stats[c.input].squares is not None]
    return wide if wide and len({c.width for c in wide}) == 1 else []


def _diagonal_path(model: nn.Module, group: Group, consumers: list[ConsumerColumns],
                   stats: dict[str, GramStatistics]) -> dict[int, tuple[list[int], float]]:
    """Error curve of a group whose consumers' inputs are too wide for a Gram: unit u's energy is
    Σ over its columns j of ‖Ŵ_j‖²·Σx_j², the output energy it carries when the inputs are taken
    as uncorrelated (the Gram's diagonal, which those inputs keep). Like Wanda's |W|·‖x‖, and
    data-aware where the producer's weight magnitude is not; there is no refit to count."""
    energy = torch.zeros(group.size, dtype=torch.float64)
    for c in consumers:
        squares = stats[c.input].squares
        assert squares is not None
        weight = consumer_weight(model, c.module).detach()
        block = c.weight_block(weight)[:, c.weight_flat().to(weight.device)].to(torch.float64)
        per_column = block.pow(2).sum(0).cpu() * squares[c.flat().to(squares.device)].cpu()
        energy += per_column.reshape(group.size, c.width).sum(1)
    return _energy_path(energy)


def _energy_path(energy: torch.Tensor) -> dict[int, tuple[list[int], float]]:
    """Keep the k units of most energy, for every k: the share of the energy left out is the error."""
    order = torch.argsort(energy, descending=True).tolist()
    total = float(energy.sum()) or 1.0
    return {k: (sorted(order[:k]), 1.0 - float(energy[order[:k]].sum()) / total) for k in range(1, len(order) + 1)}


def _error_path(work: _GroupWork, levels: int, multiple: int) -> None:
    """Greedy backward path with about ``levels`` levels, each a multiple of ``multiple`` units
    (or the whole group): relative error and support per k.

    The problem's Cholesky factors are released: the path is their last user, and every group's
    would add up (the final solve factors the kept columns afresh)."""
    assert work.problem is not None
    problem = work.problem
    n = problem.num_units
    if multiple > n:
        work.path = {n: (list(range(n)), 0.0)}
        problem.release_factors()
        return
    step = multiple * max(1, math.ceil(n / levels / multiple))
    first = n % step or step  # later levels fall on multiples of the step
    c = problem.constant if problem.constant > 0 else 1.0
    work.path = {k: (support, (objective + problem.constant) / c)
                 for k, support, objective in greedy_path(problem, step=step, stop=multiple, first_step=first,
                                                          release_factors=True)}


def _allocate(graph: DependencyGraph, works: list[_GroupWork], limits: dict[str, float], solver: str,
              deadline: Deadline, seed: int, latency: Latency | None) -> tuple[SolveResult, Allocation, str]:
    """Keep level per group from the error curves under the exact cost polynomials (and latency)."""
    levels = {w.group.name: sorted(w.path) for w in works}
    energies = [w.problem.constant for w in works if w.problem is not None and w.problem.constant > 0]
    typical = sum(energies) / len(energies) if energies else 1.0
    total = sum(energies) or 1.0

    def share(w: _GroupWork) -> float:  # converts a group's relative error into a share of the total
        energy = w.problem.constant if w.problem is not None and w.problem.constant > 0 else typical
        return energy / total

    errors = {w.group.name: [max(w.path[k][1], 0.0) * share(w) for k in levels[w.group.name]] for w in works}
    timed = [CostBudget("latency_seconds", latency, limits["latency"])] if latency is not None else []
    problem = Allocation.from_graph(graph, errors, levels=levels, relative=False, budgets=timed,
                                    flops=limits.get("flops"), params=limits.get("params"))
    result, note = solve_allocation(problem, solver, deadline, seed)
    if not result.ok:
        raise SolverError(f"allocation found no plan within the budget ({result.status.value}): {result.info}")
    return result, problem, note


def _counts_seconds(model: nn.Module, graph: DependencyGraph, solution: Mapping[str, float], window: Window) -> float:
    """Measured seconds (in ``window``'s unit) of ``model`` sliced to the keep counts of ``solution``:
    which units a group keeps does not change its time, so its first ones stand in for the solve's."""
    counts = {g: int(round(k)) for g, k in solution.items()}
    plan = PrunePlan.from_graph(graph, {g: list(range(k)) for g, k in counts.items() if k < graph.group(g).size})
    return window.model_seconds(apply(model, plan), rounds=LATENCY_ROUNDS)


def _meet_measured_latency(model: nn.Module, graph: DependencyGraph, works: list[_GroupWork],
                           limits: dict[str, float], solver: str, deadline: Deadline, seed: int, latency: Latency,
                           window: Window, first: tuple[SolveResult, Allocation],
                           report: PruneReport) -> tuple[SolveResult, Allocation, float]:
    """Re-allocate under a shifted modelled limit until the allocated widths, sliced and timed, run
    within the requested latency (less ``LATENCY_MARGIN``) and at most ``LATENCY_SLACK`` under it.

    The model is first order across groups: on small, overhead-bound models savings add up to
    less than their sum (a 2-layer torch encoder modelled at 0.70 of its dense time measured
    0.82), and shrunk rates can make it pessimistic (a plan modelled at 0.50 measured 0.36, pruned
    more than asked). Each round shifts the last plan's modelled time by its miss, kept between the
    modelled limits known too loose and too tight (else halfway). Of the plans timed, the one with
    the least allocated error within the limit is kept, else the fastest; the notes say which.
    Returns it with the modelled limit it was allocated under.
    """
    requested = limits["latency"]
    limit = (1 - LATENCY_MARGIN) * requested  # the final timing of the pruned model is a fresh sample
    full = {g.name: g.size for g in graph.prunable_groups()}
    tried, modelled_limit = first, requested
    loose, tight = math.inf, -math.inf  # modelled limits whose plans measured over / within the limit
    timed: list[tuple[float, tuple[SolveResult, Allocation], float]] = []
    for rounds in range(1, LATENCY_CHECKS + 1):
        seconds = _counts_seconds(model, graph, tried[0].solution, window)
        timed.append((seconds, tried, modelled_limit))
        if (1 - LATENCY_SLACK) * limit <= seconds <= limit or rounds == LATENCY_CHECKS or deadline.expired():
            break
        if seconds > limit:
            loose = min(loose, modelled_limit)
        else:
            tight = max(tight, modelled_limit)
        modelled_limit = latency.evaluate({**full, **tried[0].solution}) + (limit - seconds)
        if not tight < modelled_limit < loose:
            modelled_limit = ((tight + loose) / 2 if math.isfinite(tight + loose)
                              else tight + (limit - seconds) if seconds < limit else loose - (seconds - limit))
        try:
            again = _allocate(graph, works, {**limits, "latency": modelled_limit}, solver, deadline, seed, latency)[:2]
        except (InfeasibleBudgetError, SolverError):
            break  # the model has no plan that fast: keep what was timed
        if again[0].solution == tried[0].solution:
            break  # another budget binds (FLOPs, params), or the levels are too coarse to move
        tried = again
    within = [(s, t, m) for s, t, m in timed if s <= limit]
    best_seconds, best, best_limit = (min(within, key=lambda w: (w[1][0].objective, w[0])) if within
                                      else min(timed, key=lambda w: w[0]))
    if len(timed) > 1 or not within:
        report.notes.append(
            f"latency: {len(timed)} allocation(s) timed against {1e3 * limit:.4g} ms ({LATENCY_MARGIN:.0%} under the "
            f"{1e3 * requested:.4g} ms requested, for timing noise); kept the one measured at {1e3 * best_seconds:.4g} "
            "ms" + (" (least error within it)" if within else ", the fastest: none was measured within it") +
            f", allocated under a modelled limit of {1e3 * best_limit:.4g} ms")
    return best[0], best[1], best_limit


CURVE_POINTS = 9  # budgets from 20% to 100% of the dense cost
CURVE_SHARE = 2.0  # without a time limit, each budget's solve may take this many times the allocation's
CURVE_MIN_SECONDS = 2.0  # ... the whole curve at least this long
CURVE_MAX_SECONDS = 30.0  # ... and at most this long


def _curve(graph: DependencyGraph, works: list[_GroupWork], limits: dict[str, float], dense: dict[str, float],
           solver: str, seed: int, latency: Latency | None, deadline: Deadline, allocation_seconds: float
           ) -> tuple[list[tuple[float, float]], str]:
    """Allocated error at budgets from 20% to 100% of the dense cost (the first budget named), and
    a note when the curve is not exact.

    The curve is a report's diagnostic, so it gets a time share: a fifth of what remains of a
    time limit, else twice the main allocation's time per budget (2 to 30 s in all), split evenly
    over the budgets still to solve. On a forest of pairwise costs the exact DP takes milliseconds
    a point and the share never binds; on a ResNet-50's residual blocks it takes about 2 s a
    point (CP-SAT, before dp eliminated cycles, took 33 s and the nine points 260 s). A point
    whose solve stops at its share is the best plan found (an upper bound on the error), and the
    note names those budgets.
    """
    name = next(iter(limits))
    points: list[tuple[float, float]] = []
    limited = deadline.time_limit is not None
    total = max(deadline.remaining(), 0.0) / 5 if limited else max(
        CURVE_MIN_SECONDS, min(CURVE_MAX_SECONDS, CURVE_POINTS * CURVE_SHARE * allocation_seconds))
    share = Deadline(total)
    unproven: list[float] = []
    fractions = np.linspace(0.2, 1.0, CURVE_POINTS)
    for index, fraction in enumerate(fractions):
        if limited and share.expired():
            return points, f"error curve: {len(points)} of {CURVE_POINTS} budgets within its share of the time limit"
        scaled = {**limits, name: float(fraction) * dense[name]}
        point = Deadline(max(share.remaining(), 0.0) / (len(fractions) - index))
        try:
            result, _, _ = _allocate(graph, works, scaled, solver, point, seed, latency)
        except (InfeasibleBudgetError, SolverError):
            continue
        points.append((float(fraction), float(result.objective)))
        if result.status is Status.LIMIT or result.solver == "greedy" != solver:  # out of time, or its fallback
            unproven.append(float(fraction))
    if unproven:
        named = ", ".join(f"{f:.0%}" for f in unproven)
        return points, (f"error curve: at {named} of the dense {name} the plans are the best found within the "
                        f"curve's {total:.1f} s share, not proven optimal")
    return points, ""


def _write_refit(work_model: nn.Module, work: _GroupWork, support: list[int]) -> None:
    """Write the closed-form refit of every consumer into the (dense-shaped) working model."""
    assert work.problem is not None
    refits = work.problem.refit(support)
    with torch.no_grad():
        for consumer, new in zip(work.consumers, refits, strict=True):
            weight = consumer_weight(work_model, consumer.module)
            block = consumer.weight_block(weight)  # a view: writing it writes the weight
            block[:, consumer.weight_flat().to(weight.device)] = new.to(dtype=weight.dtype, device=weight.device)


def _prune_channels(model: nn.Module, calibration: Iterable[Any], budget: Budget, example_inputs: Any,
                    reconstruction: str, allocation: str, levels: int, error_curve: bool, progress: bool,
                    deadline: Deadline, seed: int, *, sequential: bool, channel_multiple: int,
                    auto_multiple: bool = False) -> PruneResult:
    report = PruneReport("channels")
    if auto_multiple:
        report.notes.append(f"channel_multiple='auto': widths kept at multiples of {channel_multiple} channels, "
                            f"the kernel block of the {describe(model_device(model))}")
    clock = Deadline(None)

    def stage(name: str, start: float) -> None:
        report.stages[name] = clock.elapsed() - start

    start = clock.elapsed()
    graph = build(model, example_inputs)
    dense = graph.cost()
    limits = budget.limits(dense)
    _check_feasible(graph, budget, dense, limits, channel_multiple)
    groups = graph.prunable_groups()
    if not groups:
        raise ValidationError("model", "no prunable group: every group is frozen (see secateurs inspect)")
    stage("graph", start)

    start = clock.elapsed()
    modules = sorted({c.input for g in groups for c in consumer_columns(model, g)[0]})
    cached = list(calibration) if sequential else []  # the layer-wise pass reads the batches again
    available = available_bytes(model_device(model))
    stats = collect(model, tqdm(cached or calibration, desc="calibration", leave=False, disable=not progress), modules,
                    max_columns=max_gram_columns(available))
    wide = sorted(name for name, s in stats.items() if s.too_wide)
    if wide:
        assert available is not None
        report.notes.append(f"memory: {len(wide)} consumer input(s) too wide for their Gram and the solves' copies of "
                            f"it to fit in the {available / 1e9:.3g} GB available ({', '.join(wide)}): their "
                            "consumers are not refit, and a group read by no other consumer is scored on the "
                            "Gram's diagonal (output energy per unit, inputs taken as uncorrelated)")
    stage("statistics", start)

    start = clock.elapsed()
    works = []
    for group in tqdm(groups, desc="error curves", leave=False, disable=not progress):
        problem, consumers, note = _group_problem(model, group, stats)
        work = _GroupWork(group, problem, consumers, {}, note)
        if problem is None:
            allowed = keep_levels(group, channel_multiple)
            wide = _diagonal_consumers(consumer_columns(model, group)[0], stats)
            if wide:
                path, work.scored_by = _diagonal_path(model, group, wide, stats), "diagonal"
                work.note += ": error curve from the Gram's diagonal"
            else:
                path = _magnitude_path(model, group)
                work.note += ": magnitude error curve"
            work.path = {k: v for k, v in path.items() if k in allowed}
        else:
            _error_path(work, levels, unit_multiple(group, channel_multiple))
        works.append(work)
    stage("error curves", start)

    latency, window = None, None
    dense_values = {"flops": dense.flops, "params": dense.params}
    if budget.timed():
        start = clock.elapsed()
        timing = example_inputs
        if budget.latency is not None:  # a fraction carries over to fewer rows of a slow forward; milliseconds do not
            cut = timing_batch(model, example_inputs)
            timing = cut.inputs
            if cut.rows < cut.size:
                report.notes.append(f"latency: measured on the first {cut.rows} of {cut.size} samples: a dense forward "
                                    f"on all of them took {cut.dense_seconds:.2f} s, and latency takes tens of forwards "
                                    "(pass a smaller example_inputs to choose the batch)")
        latency, window = measure_latency(model, groups, timing, {w.group.name: sorted(w.path) for w in works},
                                          progress=progress)
        dense_values["latency"] = window.dense
        limits["latency"] = budget.latency_limit(dense_values["latency"])
        stage("latency tables", start)
        if any(len(w.path) > LATENCY_POINTS for w in works):  # more levels than the tables measure
            report.notes.append(f"latency: some keep levels lie between measured widths ({LATENCY_POINTS} per layer) "
                                "and are interpolated; the measured check times the plan itself")

    start = clock.elapsed()
    result, alloc_problem, alloc_note = _allocate(graph, works, limits, allocation, deadline, seed, latency)
    modelled_limit = limits.get("latency")
    if latency is not None and window is not None:
        result, alloc_problem, modelled_limit = _meet_measured_latency(
            model, graph, works, limits, allocation, deadline, seed, latency, window, (result, alloc_problem), report)
    keep_counts = {g: int(round(k)) for g, k in result.solution.items()}
    report.allocation = {"solver": result.solver, "status": result.status.value, "objective": result.objective,
                         "bound": result.bound, "seconds": result.seconds,
                         "budgets": [str(b) for b in alloc_problem.report(result.solution)]}
    if alloc_note:
        report.notes.append(alloc_note)
    stage("allocation", start)
    if error_curve:
        start = clock.elapsed()
        report.error_curve, curve_note = _curve(graph, works, limits, dense_values, allocation, seed, latency,
                                                deadline, report.stages["allocation"])
        if curve_note:
            report.notes.append(curve_note)
        stage("error curve", start)

    start = clock.elapsed()
    work_model = copy.deepcopy(model)
    solver = _GroupSolver(reconstruction, deadline, seed)
    if sequential:
        keep, dense_outputs = _solve_layerwise(model, work_model, works, keep_counts, stats, cached, solver, report,
                                               progress)
    else:
        keep, dense_outputs = {}, []
        for work in tqdm(works, desc="solves", leave=False, disable=not progress):
            support = solver(work, keep_counts[work.group.name], report)
            if support is not None:
                keep[work.group.name] = support
                if work.problem is not None:
                    _write_refit(work_model, work, support)
    if solver.fell_back:
        report.notes.append("time limit reached: the remaining groups use their greedy supports" + (
            ", refit on the dense model's statistics (the layer-wise pass stopped collecting them)"
            if sequential else ""))
    renormalised = {name: graph.normalisations(name) for name in keep}
    renormalised = {name: norms for name, norms in renormalised.items() if norms}
    if renormalised:
        named = "; ".join(f"{name} by {', '.join(norms)}" for name, norms in renormalised.items())
        report.notes.append(f"renormalised over their kept channels: {named}. The kept channels change value "
                            "there, which these groups' relative errors do not count; the output error does")
    stage("solves", start)

    start = clock.elapsed()
    plan = PrunePlan.from_graph(graph, keep, meta={"structure": "channels", "allocation": allocation,
                                                   "reconstruction": reconstruction, "sequential": sequential,
                                                   "channel_multiple": channel_multiple, "budget": limits})
    pruned = apply(work_model, plan, graph=graph, mode="slice", inplace=True)
    plan.refit = _consumer_tensors(pruned, works, keep)
    stage("apply", start)
    if cached:  # the layer-wise pass ran the dense model on these batches: its outputs are kept
        _measure_output_error(report, model, pruned, cached, dense_outputs)

    counted = dense_counts(pruned, example_inputs)
    predicted = graph.cost({g: len(u) for g, u in keep.items()})
    for name in ("params", "flops"):
        report.totals.append(BudgetLine(name, getattr(dense, name), getattr(counted, name), limits.get(name)))
        if not math.isclose(getattr(counted, name), getattr(predicted, name), rel_tol=1e-9):
            report.notes.append(f"{name}: counted {getattr(counted, name):.0f} on the pruned model, "
                                f"cost model said {getattr(predicted, name):.0f}")
            limit = limits.get(name)
            if limit is not None and getattr(counted, name) > limit * (1 + 1e-9):
                raise SolverError(f"budget '{name}' is not met: the pruned model counts {getattr(counted, name):.0f}, "
                                  f"above the limit {limit:.0f}, where the cost model said "
                                  f"{getattr(predicted, name):.0f} (an op the cost model misses; the input model "
                                  "is unchanged)")
    if latency is not None and window is not None:
        modelled = latency.evaluate({**{g.name: g.size for g in groups}, **keep_counts})
        requested = 1e3 * limits["latency"]
        assert modelled_limit is not None
        report.totals.append(BudgetLine("latency ms (modelled)", 1e3 * dense_values["latency"], 1e3 * modelled,
                                        1e3 * modelled_limit))  # the request, unless the measured check shifted it
        report.totals.append(BudgetLine("latency ms (measured)", 1e3 * dense_values["latency"],
                                        1e3 * window.model_seconds(pruned), requested))
    return PruneResult(pruned, plan, report, graph)


class _GroupSolver:
    """The final solve of one group at its allocated keep level, recorded in the report."""

    def __init__(self, reconstruction: str, deadline: Deadline, seed: int) -> None:
        self.reconstruction, self.deadline, self.seed = reconstruction, deadline, seed
        self.fell_back = False

    def __call__(self, work: _GroupWork, k: int, report: PruneReport) -> list[int] | None:
        """Kept units (None when the group keeps all), from ``work.problem`` as it is now."""
        name, size = work.group.name, work.group.size
        solver_name, seconds, note = "greedy", 0.0, ""
        if k >= size:
            support, error = list(range(size)), 0.0
        elif work.problem is None:
            (support, error), solver_name = work.path[k], work.scored_by
        else:
            support = work.path[k][0]  # greedy on the dense statistics: a start as good as greedy afresh
            if self.deadline.expired():
                self.fell_back = True
            else:
                options = {"start": support} if self.reconstruction == "local_search" else {}
                if options:  # from a start, local search factors the kept columns only: the whole
                    work.problem.release_factors()  # H's factor (p² floats) would sit beside its state
                try:
                    solved = solve(work.problem.with_keep(k), self.reconstruction,
                                   time_limit=self.deadline.solver_limit(), seed=self.seed, **options)
                except SolverError as exc:  # refused (too large to enumerate) or failed: greedy stands
                    note = f"{self.reconstruction}: {str(exc).splitlines()[0]}; kept the greedy support"
                else:
                    if solved.ok:
                        support, solver_name, seconds = list(solved.solution), solved.solver, solved.seconds
            error = work.problem.relative_error(support)
            work.problem.release_factors()  # the solve was their last user (a fresh problem's come from its check)
        report.groups.append(GroupReport(name, k, size, float(error), solver_name, seconds,
                                         "; ".join(n for n in (work.note, note) if n)))
        log.info("%s: keep %d/%d, relative error %.4g (%s, %.3fs)", name, k, size, error, solver_name, seconds)
        return None if k >= size else sorted(support)


def _solve_layerwise(model: nn.Module, work_model: nn.Module, works: list[_GroupWork], keep_counts: dict[str, int],
                     stats: dict[str, GramStatistics], calibration: list[Any], solver: _GroupSolver,
                     report: PruneReport, progress: bool) -> tuple[dict[str, list[int]], list[Any]]:
    """OSSCAR's sequential pass: each group is solved on the inputs of the partly pruned model.

    One layer-wise pass over the calibration set (:class:`~secateurs.layerwise.Lockstep`): just
    before the first layer that reads a group runs, the Gram matrices of the group's consumers
    are re-accumulated from the inputs they are about to receive (every earlier group already
    pruned, masked and refit in ``work_model``), the group is solved, its removed slices are
    zeroed and its consumers refit; then the pass goes on. The refit target is the dense
    layer's output on the dense model's inputs, min ‖X_p·B − X_d·Ŵ‖² + λ‖B − Ŵ‖² (the dense
    model runs alongside), so each refit also absorbs the error of the groups before it. Once the
    time limit is spent, no more statistics are collected: a group then keeps its greedy support
    and is refit on the dense model's statistics, as without the layer-wise pass. A
    consumer whose input is not computed yet at that point (it reads the group further
    downstream, e.g. along a residual stream) keeps its dense statistics. The report's stages
    split the pass into its statistics, its solves and the forward passes. Returns the kept
    units per group and the dense model's output on each batch.
    """
    lock, reference = Lockstep(work_model, calibration), Lockstep(model, calibration)
    last = len(lock.nodes)

    def position(work: _GroupWork) -> int:
        calls = [lock.first_call(c.input) for c in work.consumers] or [lock.first_call(m.module)
                                                                        for m in work.group.members]
        found = [c for c in calls if c is not None]
        return min(found) if found else last

    at = {id(w): position(w) for w in works}
    pending = sorted(works, key=lambda w: at[id(w)])
    keep: dict[str, list[int]] = {}
    bar = tqdm(total=len(pending), desc="solves (layer-wise)", leave=False, disable=not progress)

    clock = {"statistics": 0.0, "solves": 0.0}

    def handle(work: _GroupWork) -> None:
        k = keep_counts[work.group.name]
        started = time.perf_counter()
        if k < work.group.size and work.problem is not None and not solver.deadline.expired():
            seen = {name: (lock.inputs_of(name), reference.inputs_of(name))
                    for name in dict.fromkeys(c.input for c in work.consumers)}
            renewed = {name: pair for name, pair in seen.items() if pair[0] is not None and pair[1] is not None}
            refreshed = sum(c.input in renewed for c in work.consumers)
            fresh = dict(stats)
            if refreshed:
                work.problem = None  # its H (p² floats) would sit beside the fresh statistics and the new H
                for name, (inputs, dense_inputs) in renewed.items():
                    fresh[name], rows = GramStatistics(), row_reader(work_model, name)
                    for x, y in zip(inputs, dense_inputs, strict=True):
                        fresh[name].update(rows(x), rows(y))
                problem, consumers, _ = _group_problem(model, work.group, fresh, release=frozenset(renewed))
                work.problem = problem  # the same consumers as before, now on fresh statistics
                if problem is not None:
                    work.consumers = consumers
                    if refreshed < len(consumers):
                        work.note = "; ".join(n for n in (work.note, f"{len(consumers) - refreshed} consumer(s) "
                                                          "on dense statistics (input not yet computed)") if n)
            del fresh
        solving = time.perf_counter()
        clock["statistics"] += solving - started
        support = solver(work, k, report)
        clock["solves"] += time.perf_counter() - solving
        if support is not None:
            keep[work.group.name] = support
            mask_in_place(work_model, PrunePlan({work.group.name: support}), {work.group.name: work.group})
            if work.problem is not None:
                _write_refit(work_model, work, support)
        bar.update(1)

    def before(i: int) -> None:
        while pending and at[id(pending[0])] <= i:
            handle(pending.pop(0))

    started = time.perf_counter()
    try:
        run_together([lock, reference], before)
        while pending:
            handle(pending.pop(0))
    finally:
        bar.close()
    report.stages["solves: layer-wise statistics"] = clock["statistics"]
    report.stages["solves: solvers"] = clock["solves"]
    report.stages["solves: forward passes"] = time.perf_counter() - started - clock["statistics"] - clock["solves"]
    return keep, reference.outputs


def _consumer_tensors(pruned: nn.Module, works: list[_GroupWork], keep: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """The refit consumer weights as they are in the sliced model (what ``apply`` installs)."""
    # a weight can be several consumers (q, k and v rows of one projection, blocks of a grouped conv): one copy
    paths = {c.module if is_projection(c.module) else f"{c.module}.weight"
             for work in works if work.group.name in keep for c in work.consumers}
    return {path: pruned.get_parameter(path).detach().clone() for path in sorted(paths)}


__all__ = ["Budget", "PruneResult", "prune"]
