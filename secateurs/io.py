"""Save and load pruned models without pickling modules: plan JSON + safetensors state dict.

A pruned model's class is the dense model's class with smaller tensors, so it is rebuilt rather
than unpickled: ``load`` builds the dense model with the caller's factory, applies the saved plan
(slice) and loads the saved state dict strictly. The folder holds ``plan.json``,
``model.safetensors`` and, when the plan has refit tensors, ``refit.safetensors``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from secateurs.apply import apply
from secateurs.errors import InvalidPlanError, ValidationError
from secateurs.plan import PrunePlan

__all__ = ["PLAN_FILE", "REFIT_FILE", "STATE_FILE", "load", "load_plan", "save"]

PLAN_FILE = "plan.json"
STATE_FILE = "model.safetensors"
REFIT_FILE = "refit.safetensors"


def save(path: str | os.PathLike[str], model: nn.Module, plan: PrunePlan) -> Path:
    """Write a pruned model and the plan that made it into the folder ``path``.

    Parameters
    ----------
    path:
        A folder (created if missing; existing files of the same names are replaced).
    model:
        The pruned model (``apply(dense, plan)``, possibly fine-tuned since).
    plan:
        The plan, with embedded group definitions (:meth:`PrunePlan.from_graph`), so that
        :func:`load` needs no graph.

    Returns
    -------
    Path
        The folder.
    """
    if plan.groups is None:
        raise ValidationError("plan", "embeds no group definitions; build it with PrunePlan.from_graph so load "
                                      "can apply it without a graph")
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValidationError("path", f"{str(folder)!r} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    plan.to_json(folder / PLAN_FILE)
    # save_model drops the duplicate names of tied weights and records how to restore them
    save_model(model, str(folder / STATE_FILE), metadata={"format": "pt", "producer": "secateurs"})
    refit_file = folder / REFIT_FILE
    if plan.refit:
        save_file({k: v.detach().cpu().contiguous() for k, v in plan.refit.items()}, str(refit_file))
    elif refit_file.exists():
        refit_file.unlink()
    return folder


def load_plan(path: str | os.PathLike[str]) -> PrunePlan:
    """The plan saved in folder ``path``, with its refit tensors when there are any."""
    folder = Path(path)
    plan = PrunePlan.from_json(folder / PLAN_FILE)
    refit_file = folder / REFIT_FILE
    if refit_file.exists():
        plan.refit = load_file(str(refit_file))
    return plan


def load(path: str | os.PathLike[str], build_dense: Callable[[], nn.Module], *,
         device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save`: dense model, plan applied (slice), saved weights.

    Parameters
    ----------
    path:
        The folder :func:`save` wrote.
    build_dense:
        Builds the dense model the plan was made for (its weights do not matter: all are replaced).
    device:
        Where the loaded tensors go.

    Returns
    -------
    nn.Module
        The pruned model with the saved weights, in the mode ``build_dense`` left it in.

    Raises
    ------
    PlanFormatError
        The plan file is missing or malformed.
    InvalidPlanError
        The plan does not fit the dense model, or the saved weights do not fit the pruned model.
    """
    if isinstance(build_dense, nn.Module) or not callable(build_dense):
        raise ValidationError("build_dense", f"expected a callable that builds the dense model (a factory, e.g. "
                                             f"lambda: MyNet()), got {type(build_dense).__name__}")
    folder = Path(path)
    plan = load_plan(folder)
    model = apply(build_dense(), plan, mode="slice", inplace=True)
    state = folder / STATE_FILE
    if not state.exists():
        raise InvalidPlanError(f"{str(state)!r}: missing (the folder holds no saved weights)")
    try:
        load_model(model, str(state), strict=True, device=str(device))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise InvalidPlanError(f"{str(state)!r}: saved weights do not fit the pruned model: {first}") from e
    return model
