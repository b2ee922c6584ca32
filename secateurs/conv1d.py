"""transformers' ``Conv1D`` (GPT-2, GPT-Neo's relatives): a Linear whose weight is stored (in, out).

GPT-2 computes every projection as ``addmm(bias, x, weight)`` with ``weight`` of shape
(in_features, out_features), the transpose of ``nn.Linear``'s. secateurs recognises it by its
shape of class (name ``Conv1D``, ``nf`` output features, a 2-D weight) so that transformers stays
an optional dependency; everything that reads a layer's weight as (out, in) goes through
:func:`weight_matrix`.
"""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (and any layer built the same way)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """``module``'s weight as (out, in ...): a view for Conv1D, so writing it writes the layer."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.T if is_conv1d(module) else weight


def input_dim(module: nn.Module) -> int:
    """The weight dim that indexes the layer's inputs (0 for Conv1D, 1 for Linear and convs)."""
    return 0 if is_conv1d(module) else 1


__all__ = ["input_dim", "is_conv1d", "weight_matrix"]
