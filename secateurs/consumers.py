"""Where a group's units enter the layers that read them: columns of the unfolded input.

A consumer member says which input indices of a layer's weight a unit occupies. For a Linear the
weight's input index is the column of X; for a conv with kernel k·k it is input channel c, which
occupies columns c·k·k … c·k·k + k·k − 1 of the unfolded input (``calibration.layer_rows``).
Reconstruction needs, per consumer, those columns ordered unit by unit so each unit owns
``width`` consecutive columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from secateurs.graph.groups import Group, Member


@dataclass(frozen=True)
class ConsumerColumns:
    """The columns of ``module``'s unfolded input that each unit of a group occupies.

    ``columns`` is a (units × width) tensor; row u lists unit u's columns in increasing order.
    """

    module: str
    member: Member
    columns: torch.Tensor

    @property
    def width(self) -> int:
        return int(self.columns.shape[1])

    def flat(self) -> torch.Tensor:
        """Columns unit by unit (unit u at positions u·width … (u+1)·width − 1)."""
        return self.columns.reshape(-1)


def supports_reconstruction(module: nn.Module) -> bool:
    """Layers whose input can be unfolded into rows of X with W·x = weight.reshape(out, -1) @ x."""
    return isinstance(module, nn.Linear) or (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1)


def consumer_columns(model: nn.Module, group: Group) -> tuple[list[ConsumerColumns], list[str]]:
    """Columns per reconstructable consumer of ``group``, and the consumers that were skipped (why)."""
    found: list[ConsumerColumns] = []
    skipped: list[str] = []
    for member in group.consumers():
        module = model.get_submodule(member.module)
        if member.param != "weight" or member.dim != 1 or not supports_reconstruction(module):
            skipped.append(f"{member.module}.{member.param} (dim {member.dim}, {type(module).__name__})")
            continue
        kernel = math.prod(module.kernel_size) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1
        rows = []
        for u in range(group.size):
            idx = member.indices([u])
            rows.append([i * kernel + j for i in idx for j in range(kernel)])
        found.append(ConsumerColumns(member.module, member, torch.tensor(rows, dtype=torch.long)))
    return found, skipped
