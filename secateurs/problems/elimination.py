"""Bucket elimination over the groups' pairwise interactions: an order, and exact min-sum with
inside and outside tables.

Why: allocation costs couple groups in pairs (a conv joins its input and its output widths). On
a forest, min-sum is a tree DP, but residual networks close cycles: a bottleneck's two inner
widths with the stream they read and write, a projection shortcut beside its block. Those
graphs still have tree width 2, so eliminating one group at a time in a min-fill order keeps
every table over at most three groups: exact, and as cheap as a few dense numpy reductions.

A bucket is one group ``v``. It holds the unary table of ``v``, the pair tables whose other group
is eliminated after ``v``, and its children's messages. Its message is the min over ``v`` of their
sum, a table over ``scope[v]`` (the groups ``v`` is still joined to when it goes), sent to the
bucket of the first of them to go (``parent[v]``; -1 when ``scope[v]`` is empty: a root).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np

__all__ = ["Elimination", "Messages", "eliminate", "messages", "spread", "decode"]

MAX_CELLS = 1 << 18
"""Largest bucket table (levels of a group times those of its scope) the solvers accept."""


@dataclass(frozen=True)
class Elimination:
    """An elimination order and, per group, its bucket: the scope of its message, where the message
    goes, which buckets send to it and which pair tables it holds. Scopes are in elimination order."""

    order: tuple[int, ...]
    scope: tuple[tuple[int, ...], ...]
    parent: tuple[int, ...]
    children: tuple[tuple[int, ...], ...]
    pairs: tuple[tuple[tuple[int, int], ...], ...]
    sizes: tuple[int, ...]

    def bucket(self, v: int) -> tuple[int, ...]:
        """The groups of ``v``'s bucket table, ``v`` first (its axes after the channel axis)."""
        return (v, *self.scope[v])

    def cells(self, v: int) -> int:
        return math.prod(self.sizes[g] for g in self.bucket(v))

    def largest(self) -> tuple[int, int]:
        """The group whose bucket table is largest and its cells ((-1, 0) when there are no groups)."""
        v = max(range(len(self.order)), key=self.cells, default=-1)
        return v, (self.cells(v) if v >= 0 else 0)

    @property
    def roots(self) -> tuple[int, ...]:
        return tuple(v for v in self.order if self.parent[v] < 0)


def eliminate(sizes: Sequence[int], pairs: Sequence[tuple[int, int]]) -> Elimination:
    """A greedy min-fill order (ties: the smaller bucket table, then the lower index).

    On a forest it takes leaves first (no fill), which is the tree DP; on series-parallel graphs
    (residual blocks) it never builds a bucket over more than three groups.
    """
    n = len(sizes)
    adjacent: list[set[int]] = [set() for _ in range(n)]
    for g, h in pairs:
        adjacent[g].add(h)
        adjacent[h].add(g)
    alive = set(range(n))
    order: list[int] = []
    joined: list[tuple[int, ...]] = [()] * n
    while alive:
        def price(v: int) -> tuple[int, int, int]:
            fill = sum(1 for a, b in combinations(adjacent[v], 2) if b not in adjacent[a])
            return fill, sizes[v] * math.prod(sizes[w] for w in adjacent[v]), v

        v = min(alive, key=price)
        order.append(v)
        joined[v] = tuple(adjacent[v])
        for a, b in combinations(adjacent[v], 2):
            adjacent[a].add(b)
            adjacent[b].add(a)
        for w in adjacent[v]:
            adjacent[w].discard(v)
        adjacent[v] = set()
        alive.discard(v)
    position = {v: i for i, v in enumerate(order)}
    scope = [tuple(sorted(joined[v], key=position.__getitem__)) for v in range(n)]
    parent = [s[0] if s else -1 for s in scope]
    children: list[list[int]] = [[] for _ in range(n)]
    for v in order:
        if parent[v] >= 0:
            children[parent[v]].append(v)
    held: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for g, h in pairs:
        held[g if position[g] < position[h] else h].append((g, h))
    return Elimination(tuple(order), tuple(scope), tuple(parent), tuple(tuple(c) for c in children),
                       tuple(tuple(p) for p in held), tuple(int(s) for s in sizes))


def spread(table: np.ndarray, scope: Sequence[int], target: Sequence[int]) -> np.ndarray:
    """``table`` (K, *levels of scope) as a view that broadcasts against (K, *levels of target);
    ``scope`` must be a subset of ``target``."""
    perm, slots = _plan(tuple(scope), tuple(target))
    moved = table.transpose(perm) if perm else table
    shape = [1] * (1 + len(target))
    shape[0] = table.shape[0]
    for slot, size in zip(slots, moved.shape[1:], strict=True):
        shape[slot] = size
    return moved.reshape(shape)


@lru_cache(maxsize=4096)
def _plan(scope: tuple[int, ...], target: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The axis order that puts ``scope``'s axes in ``target``'s order (empty when it already is)
    and where each lands in the broadcast shape."""
    place = [target.index(g) for g in scope]
    order = sorted(range(len(scope)), key=place.__getitem__)
    perm = () if order == list(range(len(scope))) else (0, *(1 + i for i in order))
    return perm, tuple(1 + place[i] for i in order)


@dataclass(frozen=True)
class Messages:
    """Per group ``v``: ``bucket[v]`` (K, L_v, *L[scope]) sums v's tables and its children's
    messages; ``inside[v]`` (K, *L[scope]) is its min over ``v`` (the best of v's subtree for each
    value of its scope); ``outside[v]`` is the best of everything else for that value. ``total``
    (K,) is the exact minimum of each channel."""

    bucket: list[np.ndarray]
    inside: list[np.ndarray]
    outside: list[np.ndarray]
    total: np.ndarray


def messages(elim: Elimination, node: Sequence[np.ndarray], edge: Mapping[tuple[int, int], np.ndarray], *,
             outside: bool = True) -> Messages:
    """Min-sum of ``Σ node[g][:, x_g] + Σ edge[(g, h)][:, x_g, x_h]`` for K channels at once (each
    channel its own problem): ``node[g]`` is (K, L_g), ``edge`` is keyed like the pairs (K, L_g, L_h);
    a missing edge counts zero."""
    n = len(elim.order)
    k = node[0].shape[0] if n else 1
    bucket: list[np.ndarray] = [np.zeros(0)] * n
    inside: list[np.ndarray] = [np.zeros(0)] * n
    total = np.zeros(k)
    for v in elim.order:
        axes = elim.bucket(v)
        acc = np.zeros((k, *(elim.sizes[g] for g in axes)))
        acc += spread(node[v], (v,), axes)
        for key in elim.pairs[v]:
            if key in edge:
                acc += spread(edge[key], key, axes)
        for c in elim.children[v]:
            acc += spread(inside[c], elim.scope[c], axes)
        bucket[v] = acc
        inside[v] = acc.min(axis=1)
        if elim.parent[v] < 0:
            total += inside[v]
    out: list[np.ndarray] = [np.zeros(0)] * n
    if outside:
        for v in reversed(elim.order):
            p = elim.parent[v]
            if p < 0:
                out[v] = total - inside[v]
                continue
            axes = elim.bucket(p)
            full = bucket[p] + spread(out[p], elim.scope[p], axes) - spread(inside[v], elim.scope[v], axes)
            drop = tuple(1 + i for i, g in enumerate(axes) if g not in elim.scope[v])
            out[v] = full.min(axis=drop)
    return Messages(bucket, inside, out, total)


def decode(elim: Elimination, msgs: Messages, channel: int = 0) -> np.ndarray:
    """An assignment attaining ``msgs.total[channel]``: each group's best level given the groups
    decoded before it (reverse elimination order)."""
    x = np.zeros(len(elim.order), dtype=np.int64)
    for v in reversed(elim.order):
        at = tuple(int(x[g]) for g in elim.scope[v])
        x[v] = int(np.argmin(msgs.bucket[v][(channel, slice(None), *at)]))
    return x
