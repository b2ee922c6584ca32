"""Channel spaces, index maps and their union-find: the algebra the coupling rules run on.

A *space* is a set of prunable units (a conv's output channels, attention heads). Every tensor
dimension the tracer sees is described by a :data:`DimInfo`: either :class:`Opaque` (no channel
structure, a constant size, with the reason it cannot be pruned when there is one) or a
``Layout``: a tuple of :class:`Term` that tile the dimension. A term names the indices
``offset + Σ_k i_k * stride_k`` over its axes; an axis is a space (its units) or a constant block.
Concatenation is several terms, a flatten is one term with several axes.

Coupling two dims unifies their spaces (union-find). Splitting a space (``chunk``, a ``view``
that separates heads from head_dim) *defines* it as a sum or a product of new spaces; the
definitions live on the union-find roots, so everything tied to a space sees its refinement.
Atomic roots (no definition) become the Groups.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from math import prod
from typing import Literal

import torch


@dataclass(frozen=True)
class Opaque:
    """A dimension with no channel structure; ``reason`` says why it can never be pruned."""

    reason: str | None = None


@dataclass(frozen=True)
class Axis:
    """One axis of a term: a space's units (``space`` set) or a constant block (``space`` None)."""

    space: int | None
    size: int
    stride: int


@dataclass(frozen=True)
class Term:
    """Indices ``offset + Σ i_k * axes[k].stride`` for ``i_k < axes[k].size``."""

    offset: int
    axes: tuple[Axis, ...]

    def numel(self) -> int:
        return prod(a.size for a in self.axes)

    def is_dense(self) -> bool:
        """True when the term covers ``[offset, offset + numel)`` exactly, row-major."""
        expect = 1
        for a in sorted((a for a in self.axes if a.size > 1), key=lambda a: a.stride):
            if a.stride != expect:
                return False
            expect *= a.size
        return True


Layout = tuple[Term, ...]
DimInfo = Opaque | Layout


def is_tensor_info(info: object) -> bool:
    """A tensor's info is a list of DimInfo, one per dim (tuples nest for tuple outputs, None else)."""
    return isinstance(info, list)


def has_tensor(shape: object) -> bool:
    """True when a probed value (a torch.Size, or tuples of them) holds at least one tensor."""
    if isinstance(shape, torch.Size):
        return True
    if isinstance(shape, (tuple, list)):
        return any(has_tensor(i) for i in shape)
    return False


def const_layout(size: int) -> Layout:
    return (Term(0, (Axis(None, size, 1),)),)


def space_layout(space: int, size: int) -> Layout:
    return (Term(0, (Axis(space, size, 1),)),)


def layout_spaces(info: DimInfo) -> list[int]:
    if isinstance(info, Opaque):
        return []
    return [a.space for t in info for a in t.axes if a.space is not None]


def layout_size(info: Layout) -> int:
    return sum(t.numel() for t in info)


class CouplingError(Exception):
    """Internal: an index map that cannot be expressed; the caller freezes and moves on."""


@dataclass
class Definition:
    """``kind`` sum: the space is its parts concatenated; prod: their row-major product."""

    kind: Literal["sum", "prod"]
    parts: tuple[int, ...]
    sizes: tuple[int, ...]
    node: str


@dataclass
class Spaces:
    """Union-find over spaces with sizes, origins, definitions, freeze reasons and flags."""

    size: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    origin: list[str | None] = field(default_factory=list)
    defs: dict[int, Definition] = field(default_factory=dict)
    frozen: dict[int, str] = field(default_factory=dict)
    flags: dict[int, set[str]] = field(default_factory=dict)
    part_of: dict[int, list[int]] = field(default_factory=dict)

    def new(self, size: int, origin: str | None = None, frozen: str | None = None) -> int:
        sid = len(self.size)
        self.size.append(size)
        self.parent.append(sid)
        self.origin.append(origin)
        if frozen:
            self.frozen[sid] = frozen
        return sid

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:
            self.parent[s], s = root, self.parent[s]
        return root

    def freeze(self, s: int, reason: str) -> None:
        self.frozen.setdefault(self.find(s), reason)

    def flag(self, s: int, name: str) -> None:
        self.flags.setdefault(self.find(s), set()).add(name)

    def has_flag(self, s: int, name: str) -> bool:
        return name in self.flags.get(self.find(s), set())

    def union(self, a: int, b: int, node: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            reason = f"channel sizes {self.size[ra]} and {self.size[rb]} disagree at node '{node}'"
            self.freeze(ra, reason)
            self.freeze(rb, reason)
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        if rb in self.flags:
            self.flags.setdefault(ra, set()).update(self.flags.pop(rb))
        da, db = self.defs.get(ra), self.defs.pop(rb, None)
        if db is None:
            return
        if da is None:
            self.defs[ra] = db
        elif da.kind == db.kind and da.sizes == db.sizes:
            for pa, pb in zip(da.parts, db.parts, strict=False):
                self.union(pa, pb, node)
        else:
            self.freeze(ra, f"channel maps from nodes '{da.node}' and '{db.node}' conflict at node '{node}'")

    def define(self, s: int, kind: Literal["sum", "prod"], sizes: tuple[int, ...], node: str) -> tuple[int, ...]:
        """Refine space ``s`` into parts of ``sizes`` (reusing a matching earlier refinement)."""
        root = self.find(s)
        old = self.defs.get(root)
        if old is not None:
            if old.kind == kind and old.sizes == sizes:
                return old.parts
            raise CouplingError(f"channel maps from nodes '{old.node}' and '{node}' conflict")
        origin = self.origin[s] if self.origin[s] is not None else self.origin[root]
        parts = tuple(self.new(n, origin) for n in sizes)
        for p in parts:
            self.part_of[p] = [root]
        self.defs[root] = Definition(kind, parts, sizes, node)
        return parts

    # -- expansion through definitions ---------------------------------------------------

    def expand_term(self, term: Term, depth: int = 0) -> list[Term]:
        """Rewrite ``term`` over atomic roots (spaces without a definition)."""
        if depth > 64:
            raise CouplingError("cyclic channel map")
        for k, ax in enumerate(term.axes):
            if ax.space is None:
                continue
            root = self.find(ax.space)
            d = self.defs.get(root)
            if d is None:
                if root != ax.space:
                    axes = term.axes[:k] + (Axis(root, ax.size, ax.stride),) + term.axes[k + 1 :]
                    return self.expand_term(Term(term.offset, axes), depth)
                continue
            rest_before, rest_after = term.axes[:k], term.axes[k + 1 :]
            out: list[Term] = []
            if d.kind == "prod":
                inner = [prod(d.sizes[j + 1 :]) for j in range(len(d.sizes))]
                new_axes = tuple(Axis(p, n, ax.stride * m) for p, n, m in zip(d.parts, d.sizes, inner, strict=False))
                out.extend(self.expand_term(Term(term.offset, rest_before + new_axes + rest_after), depth + 1))
            else:
                start = 0
                for p, n in zip(d.parts, d.sizes, strict=False):
                    t = Term(term.offset + start * ax.stride, rest_before + (Axis(p, n, ax.stride),) + rest_after)
                    out.extend(self.expand_term(t, depth + 1))
                    start += n
            return out
        return [term]

    def expand(self, layout: Layout) -> Layout:
        return tuple(t for term in layout for t in self.expand_term(term))

    def atoms(self, s: int, depth: int = 0) -> list[int]:
        """Atomic roots a space decomposes into (itself when it has no definition)."""
        if depth > 64:
            raise CouplingError("cyclic channel map")
        root = self.find(s)
        d = self.defs.get(root)
        if d is None:
            return [root]
        return [a for p in d.parts for a in self.atoms(p, depth + 1)]


def normalize(axes: tuple[Axis, ...]) -> tuple[Axis, ...]:
    """Drop size-1 axes and fuse adjacent constant axes (keeps structural comparison simple)."""
    kept = sorted((a for a in axes if a.size > 1), key=lambda a: -a.stride)
    out: list[Axis] = []
    for a in kept:
        if out and out[-1].space is None and a.space is None and out[-1].stride == a.stride * a.size:
            prev = out.pop()
            a = Axis(None, prev.size * a.size, a.stride)
        out.append(a)
    return tuple(out)


def merge_infos(infos: list[DimInfo], sizes: list[int]) -> DimInfo:
    """The layout of the dim obtained by flattening ``infos`` (row-major)."""
    for info in infos:
        if isinstance(info, Opaque) and info.reason is not None:
            return info
    layouts = [const_layout(n) if isinstance(i, Opaque) else i for i, n in zip(infos, sizes, strict=False)]
    muls = [prod(sizes[k + 1 :]) for k in range(len(sizes))]
    terms: list[Term] = []
    for combo in itertools.product(*layouts):
        offset = sum(t.offset * m for t, m in zip(combo, muls, strict=False))
        axes = tuple(Axis(a.space, a.size, a.stride * m) for t, m in zip(combo, muls, strict=False) for a in t.axes)
        terms.append(Term(offset, normalize(axes)))
    terms.sort(key=lambda t: t.offset)
    if all(a.space is None for t in terms for a in t.axes):
        return Opaque(None)
    return tuple(terms)


def member_maps(term: Term, axis_index: int, limit: int = 4096) -> list[tuple[int, int, int, int]]:
    """(offset, unit_stride, block, inner_stride) maps of one space axis of ``term``.

    Several inner axes (e.g. q/k/v blocks around heads) do not fit one Member; all but the
    largest are enumerated into separate offsets.
    """
    ax = term.axes[axis_index]
    inner = [a for k, a in enumerate(term.axes) if k != axis_index and a.size > 1]
    if not inner:
        return [(term.offset, ax.stride, 1, 1)]
    keep = max(inner, key=lambda a: (a.size, -a.stride))
    others = [a for a in inner if a is not keep]
    count = prod(a.size for a in others)
    if count > limit:
        raise CouplingError(f"index map needs {count} members")
    out = []
    for idx in itertools.product(*(range(a.size) for a in others)):
        off = term.offset + sum(i * a.stride for i, a in zip(idx, others, strict=False))
        out.append((off, ax.stride, keep.size, keep.stride))
    return sorted(out)
