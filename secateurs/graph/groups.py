"""Group variables: coupled channel spaces that must be pruned together.

A Group is one decision variable of every formulation. Its members say, for each parameter or
buffer the group touches, which tensor indices each unit occupies, so that ``apply`` can slice
or mask without knowing how the coupling was found.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from secateurs.errors import ValidationError
from secateurs.hardware import vector_channels

#: Integer attributes of hand-written attention modules that count heads (apply updates them when
#: heads go, so a ``view(B, T, self.num_heads, head_dim)`` keeps working).
HEAD_ATTRIBUTES = ("num_heads", "n_heads", "num_attention_heads", "n_head", "heads")
#: Integer attributes that count heads * head_dim features (updated too; ``head_dim`` itself stays).
INNER_ATTRIBUTES = ("all_head_size", "inner_dim", "attn_dim", "split_size")

Role = Literal["producer", "consumer", "passthrough"]


@dataclass(frozen=True)
class Member:
    """One tensor dimension of one parameter/buffer that a group's units index.

    Unit ``u`` occupies the indices ``offset + u * unit_stride + j * inner_stride`` for
    ``j in range(block)`` along ``dim`` of ``module``'s ``param``. This covers plain channels
    (block 1), concat/split offsets, heads (block = head_dim), flattened conv maps
    (block = H*W) and channels-last flattening (unit_stride 1, inner_stride C).

    ``role`` says how the layer uses the dimension: ``producer`` (an output dim of a weight
    layer), ``consumer`` (an input dim of a weight layer, the rows OSSCAR refits) or
    ``passthrough`` (biases, norm affines, running statistics, embeddings' feature dim).
    """

    module: str
    param: str
    dim: int
    role: Role = "passthrough"
    offset: int = 0
    block: int = 1
    unit_stride: int | None = None
    inner_stride: int = 1
    #: the tensor's size along ``dim`` when the graph was built (None: unknown); apply refuses a
    #: model whose tensor differs, so a plan never lands on a wider model of the same class
    extent: int | None = field(default=None, compare=False)

    def indices(self, units: Iterable[int]) -> list[int]:
        """Sorted tensor indices along ``dim`` occupied by ``units``."""
        stride = self.block if self.unit_stride is None else self.unit_stride
        out = [self.offset + u * stride + j * self.inner_stride for u in units for j in range(self.block)]
        return sorted(out)


@dataclass
class Group:
    """A decision variable: ``size`` units of width ``unit_width`` pruned together.

    ``prunable`` is False for groups that reach a model input/output or an op the tracer does
    not understand; ``reason`` then names the node responsible.
    """

    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    unit_width: int = 1
    prunable: bool = True
    reason: str = ""
    nodes: list[str] = field(default_factory=list)

    def members_of(self, role: Role) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def modules(self) -> list[str]:
        """Dotted paths of every module this group touches, in first-seen order."""
        seen: dict[str, None] = {}
        for m in self.members:
            seen.setdefault(m.module, None)
        return list(seen)

    def consumers(self) -> list[Member]:
        """Members whose layer reads the group as input (what a reconstruction refits)."""
        return self.members_of("consumer")

    def producers(self) -> list[Member]:
        return self.members_of("producer")


def check_channel_multiple(value: object, device: torch.device | str | None = None) -> int:
    """``channel_multiple`` as given to ``prune`` and the training methods: an integer >= 1, or
    ``"auto"``: the channel block of ``device``'s kernels (:func:`secateurs.hardware.vector_channels`)."""
    if value == "auto":
        return vector_channels(device)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError("channel_multiple", f"must be an integer >= 1 or 'auto', got {value!r}")
    return value


def unit_multiple(group: Group, channel_multiple: int) -> int:
    """Units of ``group`` whose channels make a multiple of ``channel_multiple`` (heads count their width)."""
    return channel_multiple // math.gcd(channel_multiple, group.unit_width)


def keep_levels(group: Group, channel_multiple: int) -> list[int]:
    """The keep counts a plan may give ``group``: multiples of its unit multiple, and the whole group."""
    step = unit_multiple(group, channel_multiple)
    return sorted({*range(step, group.size + 1, step), group.size})


def validate_units(group: Group, units: Sequence[int]) -> None:
    """Raise InvalidPlanError unless ``units`` are sorted, unique, non-empty and in range."""
    from secateurs.errors import InvalidPlanError

    if not group.prunable and list(units) != list(range(group.size)):
        raise InvalidPlanError(f"group {group.name!r} is frozen ({group.reason}); it cannot be pruned")
    if len(units) == 0:
        raise InvalidPlanError(f"group {group.name!r}: every unit removed (keep at least one of {group.size})")
    bad = [u for u in units if not (0 <= int(u) < group.size)]
    if bad:
        raise InvalidPlanError(f"group {group.name!r}: unit index {bad[0]} out of range [0, {group.size})")
    if list(units) != sorted(set(int(u) for u in units)):
        raise InvalidPlanError(f"group {group.name!r}: kept units must be sorted and unique")
