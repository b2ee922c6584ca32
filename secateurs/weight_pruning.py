"""Unstructured and N:M pruning: per-layer densities, reconstruction-aware masks, row refits.

Every Linear / Conv weight, and each q, k and v block of an attention projection, is one matrix
W with the Gram H = XᵀX of the input it reads. Masks keep the largest |W_ij|·‖X_j‖ (at the
density the allocation gives the matrix under the global sparsity, FCPTS-style, or N in every M
inputs), then each row is refit by least squares on its kept inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.apply import apply
from secateurs.budget import Budget
from secateurs.calibration import collect
from secateurs.consumers import consumer_weight, supports_reconstruction
from secateurs.conv1d import is_conv1d
from secateurs.errors import SolverError, ValidationError
from secateurs.hardware import model_device
from secateurs.memory import available_bytes, max_gram_columns, need
from secateurs.plan import PrunePlan
from secateurs.problems.allocation import Allocation
from secateurs.prune_result import PruneResult
from secateurs.report import BudgetLine, GroupReport, PruneReport
from secateurs.solvers import Deadline
from secateurs.solvers.allocation_fallback import solve_allocation
from secateurs.sparsity import (
    density_mask,
    masked_error,
    nm_mask,
    quadratic_trace,
    reconstruction_scores,
    refit_rows,
)
from secateurs.torch_transformer import WeightRows, projection_blocks

__all__ = ["prune_weights"]


def _weight_layers(model: nn.Module) -> list[str]:
    """Every Linear / Conv (groups = 1) whose weight a per-layer mask and refit can handle."""
    return [name for name, module in model.named_modules() if supports_reconstruction(module)]


def _weight_entries(model: nn.Module) -> list[WeightRows]:
    """Every Linear / Conv, then the query, key and value blocks of each attention's projections:
    the matrices the unstructured / N:M path masks."""
    return [*(WeightRows(name, f"{name}.weight", None, name) for name in _weight_layers(model)),
            *projection_blocks(model)]


def _matrix(model: nn.Module, entry: WeightRows) -> torch.Tensor:
    """(out, in ...) as the layer computes it (Conv1D's stored transpose undone), or the block's rows."""
    if entry.rows is None:
        return consumer_weight(model, entry.name)
    return model.get_parameter(entry.param)[entry.rows]


def _unpruned_weights(model: nn.Module, covered: set[str]) -> str:
    """Matrix weights (parameter paths) outside ``covered``, with their sizes, or ''."""
    left = [(n, p.numel()) for n, p in model.named_parameters() if p.dim() >= 2 and n not in covered
            and not isinstance(model.get_submodule(n.rpartition(".")[0]) if "." in n else model, nn.Embedding)]
    return ", ".join(f"{n} ({k} weights)" for n, k in left)


def prune_weights(model: nn.Module, calibration: Iterable[Any], budget: Budget | None, structure: str,
                   nm: tuple[int, int], allocation: str, levels: int, refit: bool, progress: bool,
                   deadline: Deadline, seed: int) -> PruneResult:
    report = PruneReport(structure)
    clock = Deadline(None)
    entries = {e.name: e for e in _weight_entries(model)}
    if not entries:
        raise ValidationError("model", "no Linear or Conv layer to prune")
    start = clock.elapsed()
    batches = tqdm(calibration, desc="calibration", leave=False, disable=not progress)
    available = available_bytes(model_device(model))
    stats = collect(model, batches, [e.source for e in entries.values()], max_columns=max_gram_columns(available))
    report.stages["statistics"] = clock.elapsed() - start

    start = clock.elapsed()
    data = {}
    energies: dict[str, float] = {}
    for name, entry in entries.items():
        weight = _matrix(model, entry).detach()
        flat = weight.reshape(weight.shape[0], -1).to(torch.float64)
        seen = stats[entry.source]
        gram = seen.gram
        if seen.squares is not None:  # too wide: a 1-D gram, its diagonal alone
            assert available is not None
            gram = seen.squares
            report.notes.append(f"{name}: its {need(seen.columns)}, over the {available / 1e9:.3g} GB available; "
                                "scored on the Gram's diagonal (inputs taken as uncorrelated) and not refit")
        if gram is None:  # no activations seen
            where = "" if entry.rows is None else f" ({entry.source.rpartition(':')[0]!r} was not)"
            report.notes.append(f"{name}: never called on the calibration data{where}, so no calibration "
                                "signal; pruned by magnitude")
            gram = torch.ones(flat.shape[1], dtype=torch.float64)  # H = I, as its diagonal
        data[name] = (flat, gram, reconstruction_scores(flat, gram))
        energies[name] = 0.5 * quadratic_trace(flat, gram) or 1.0  # ½‖XŴᵀ‖²: what errors are relative to
    n, m = nm
    masks: dict[str, torch.Tensor] = {}
    if structure == "n:m":
        for name, (flat, _, scores) in data.items():
            if flat.shape[1] % m:
                report.notes.append(f"{name}: {flat.shape[1]} inputs per output are not a multiple of {m}; left dense")
                continue
            masks[name] = nm_mask(scores, n, m)
        if not masks:
            raise ValidationError("nm", f"no layer has a multiple of {m} inputs per output, so none can take "
                                        f"{n}:{m} (the model would come back dense)")
    else:
        assert budget is not None and budget.sparsity is not None
        densities = np.linspace(1.0 / levels, 1.0, levels)
        sizes = {name: flat.numel() for name, (flat, _, _) in data.items()}
        errors = {}
        total = sum(sizes.values())
        for name, (flat, gram, scores) in data.items():
            counts = np.unique(np.round(densities * flat.numel()))
            # + a tie-break far below any real error: where removing weights costs nothing (a 3x3 conv
            # on 1x1 maps uses only its centre tap) keep the densest level, not the sparsest, so the
            # sparsity asked for is what is removed
            errors[name] = [masked_error(flat, gram, density_mask(scores, int(c))) / energies[name]
                            + 1e-9 * (flat.numel() - c) / total for c in counts]
        problem = Allocation.unstructured(sizes, densities, errors, density=1.0 - budget.sparsity)
        result, note = solve_allocation(problem, allocation, deadline, seed)
        if note:
            report.notes.append(note)
        if not result.ok:
            raise SolverError(f"allocation found no densities within the budget ({result.status.value})")
        report.allocation = {"solver": result.solver, "status": result.status.value, "objective": result.objective,
                             "bound": result.bound, "seconds": result.seconds}
        for name, (_, _, scores) in data.items():
            masks[name] = density_mask(scores, int(round(result.solution[name])))
    report.stages["masks"] = clock.elapsed() - start

    start = clock.elapsed()
    new_weights: dict[str, torch.Tensor] = {}
    for name in tqdm(list(masks), desc="refit", leave=False, disable=not progress):
        flat, gram, _ = data[name]
        entry = entries[name]
        weight = _matrix(model, entry)
        new = refit_rows(flat, gram, masks[name]) if refit else flat * masks[name]
        stored = new.reshape(weight.shape).to(weight.dtype)
        if entry.rows is not None:  # rows of an attention projection: written into its parameter
            whole = new_weights.setdefault(entry.param, model.get_parameter(entry.param).detach().clone())
            whole[entry.rows] = stored
        else:
            transposed = is_conv1d(model.get_submodule(name))  # transformers' Conv1D stores (in, out)
            new_weights[entry.param] = stored.T if transposed else stored
        delta = flat - new.to(torch.float64)
        error = 0.5 * quadratic_trace(delta, gram) / energies[name]
        kept = int(masks[name].sum())
        how = "refit" if refit and gram.ndim == 2 else "mask"  # a diagonal H refits nothing
        report.groups.append(GroupReport(name, kept, masks[name].numel(), error, how, 0.0))
    report.stages["refit"] = clock.elapsed() - start

    covered = {e.param for e in entries.values()}
    skipped = _unpruned_weights(model, covered)
    if skipped:
        report.notes.append(f"not pruned (only Linear and Conv weights are): {skipped}")
    meta = {"structure": structure, "nm": list(nm) if structure == "n:m" else None}
    plan = PrunePlan({}, groups={}, refit=new_weights, meta=meta)
    pruned = apply(model, plan, mode="mask")
    total = sum(flat.numel() for flat, _, _ in data.values())
    achieved = sum(int((pruned.get_parameter(param) != 0).sum()) for param in covered)
    requested = None if budget is None or budget.sparsity is None else (1 - budget.sparsity) * total
    if structure == "n:m":
        requested = sum(masks[name].numel() * n / m for name in masks) + (total - sum(masks[k].numel() for k in masks))
    report.totals.append(BudgetLine("nonzeros", float(total), float(achieved), requested))
    return PruneResult(pruned, plan, report, None)
