"""Where a group's units enter the layers that read them: columns of the unfolded input.

A consumer member says which input indices of a layer's weight a unit occupies. For a Linear the
weight's input index is the column of X; for a conv with kernel k·k it is input channel c, which
occupies columns c·k·k … c·k·k + k·k − 1 of the unfolded input (``calibration.layer_rows``).
Reconstruction needs, per consumer, those columns ordered unit by unit so each unit owns
``width`` consecutive columns.

A grouped convolution (``groups = g``, input channels ``g·a``) is ``g`` consumers sharing one
support: block ``i`` is weight rows ``i·b … (i+1)·b − 1`` (``b`` outputs per group), reading
input channels ``i·a … (i+1)·a − 1``; a unit is one within-group input index ``j``, i.e. weight
column block ``j`` of every block and input channel ``i·a + j`` of block ``i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from secateurs.conv1d import input_dim, is_conv1d, weight_matrix
from secateurs.graph.groups import Group, Member
from secateurs.torch_transformer import PROJECTIONS, attention_blocks, is_projection, recomputable_attention


@dataclass(frozen=True)
class ConsumerColumns:
    """The columns of ``module``'s unfolded input that each unit of a group occupies.

    ``columns`` is a (units × width) tensor; row u lists unit u's columns of X in increasing
    order. ``weight_columns`` are the matching columns of ``weight.reshape(out, -1)`` (the same,
    except for a grouped convolution's blocks) and ``rows`` the weight rows this consumer
    computes (``None``: all). ``source`` is the name calibration collects its input under, when
    that is not ``module`` (an attention projection's q, k or v rows: ``"attn:key"``).
    """

    module: str
    member: Member
    columns: torch.Tensor
    weight_columns: torch.Tensor | None = None
    rows: tuple[int, int] | None = None
    source: str | None = None

    @property
    def input(self) -> str:
        """The calibration name of this consumer's input (see :func:`secateurs.calibration.collect`)."""
        return self.module if self.source is None else self.source

    @property
    def width(self) -> int:
        return int(self.columns.shape[1])

    def flat(self) -> torch.Tensor:
        """Columns of X unit by unit (unit u at positions u·width … (u+1)·width − 1)."""
        return self.columns.reshape(-1)

    def weight_flat(self) -> torch.Tensor:
        """The matching columns of ``weight.reshape(out, -1)``, unit by unit."""
        return (self.columns if self.weight_columns is None else self.weight_columns).reshape(-1)

    def weight_block(self, weight: torch.Tensor) -> torch.Tensor:
        """This consumer's (rows × unit columns) block of ``weight`` (a view of the flat weight)."""
        flat = weight.reshape(weight.shape[0], -1)
        start, stop = self.rows if self.rows is not None else (0, flat.shape[0])
        return flat[start:stop]


def supports_reconstruction(module: nn.Module) -> bool:
    """Layers whose input can be unfolded into rows of X with W·x = weight.reshape(out, -1) @ x."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or (
        isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1)


def _grouped(module: nn.Module) -> bool:
    """A grouped (not depthwise) Conv1d/Conv2d: several consumers sharing a support."""
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1
            and module.in_channels // module.groups > 1)


def _input_projection(module: nn.Module, member: Member) -> bool:
    """The input side of an nn.MultiheadAttention projection: the packed q/k/v weight is three
    consumers, its query, key and value rows, each reading that input of the attention call (a
    cross-attention's key and value are the encoder's memory, not the query); a separate
    ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` is one, reading its own input."""
    return (isinstance(module, nn.MultiheadAttention) and member.param in PROJECTIONS and member.dim == 1
            and recomputable_attention(module))


def consumer_weight(model: nn.Module, name: str) -> torch.Tensor:
    """A consumer's weight as (out, in ...): a layer's through :func:`weight_matrix`; an attention
    projection (``name`` is then its parameter path) as it is stored."""
    if is_projection(name):
        return model.get_parameter(name)
    return weight_matrix(model.get_submodule(name))


def consumer_columns(model: nn.Module, group: Group) -> tuple[list[ConsumerColumns], list[str]]:
    """Columns per reconstructable consumer of ``group``, and the consumers that were skipped (why)."""
    found: list[ConsumerColumns] = []
    skipped: list[str] = []
    for member in group.consumers():
        module = model.get_submodule(member.module)
        if _input_projection(module, member):
            path = f"{member.module}.{member.param}" if member.module else member.param
            columns = torch.tensor([member.indices([u]) for u in range(group.size)], dtype=torch.long)
            found.extend(ConsumerColumns(path, member, columns, source=block.source,
                                         rows=None if block.rows.start is None else (block.rows.start, block.rows.stop))
                         for block in attention_blocks(member.module, module) if block.param == path)
            continue
        grouped = _grouped(module)
        if member.param != "weight" or member.dim != input_dim(module) or not (supports_reconstruction(module) or grouped):
            skipped.append(f"{member.module}.{member.param} (dim {member.dim}, {type(module).__name__})")
            continue
        kernel = math.prod(module.kernel_size) if isinstance(module, (nn.Conv1d, nn.Conv2d)) else 1
        weight_rows = torch.tensor([[i * kernel + j for i in member.indices([u]) for j in range(kernel)]
                                    for u in range(group.size)], dtype=torch.long)
        if not grouped:
            found.append(ConsumerColumns(member.module, member, weight_rows))
            continue
        per_in, per_out = module.in_channels // module.groups, module.out_channels // module.groups
        for block in range(module.groups):  # block i reads input channels i·a + j
            found.append(ConsumerColumns(member.module, member, weight_rows + block * per_in * kernel, weight_rows,
                                         (block * per_out, (block + 1) * per_out)))
    return found, skipped
