"""Freeze the channels whose size the model's own code fixes in a reshape or a split.

The Coupler records each such size as it walks the graph (:class:`FixedSizeRecorder`, mixed into
it); once groups are known, :func:`freeze_fixed_sizes` decides which channels it pins.

torch.fx bakes python ints into the graph: ``x.reshape(n, self.c, -1)`` traces with ``self.c``
as the literal 32, and ``q.view(B, T, self.n_head, C // self.n_head)`` computes head_dim from
the residual width ``C``. Slicing weights changes neither the attribute nor the arithmetic, so
pruning those channels gives a model that fails (or, worse, silently regroups its features).

Two cases stay prunable, because apply keeps them in step:

* a literal that counts heads (or heads * head_dim) of a hand-written attention module whose
  head-count attribute (:data:`~secateurs.graph.groups.HEAD_ATTRIBUTES`) apply updates;
* a size read from the dim's own channels (``x.view(x.size(0), x.size(1), -1)``).

A size read off a dim that no plan changes (a constant-sized tensor's) is a constant too.

Anything else freezes the channels involved, naming the node and the constant.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from secateurs.graph.groups import HEAD_ATTRIBUTES, INNER_ATTRIBUTES
from secateurs.graph.spaces import DimInfo, Spaces, has_tensor, is_tensor_info, layout_spaces

#: Attribute set on graphs rewritten from torch.export. Export writes a size read from a static dim
#: (``k.shape[1]``) as a literal, as it writes a constant: it cannot tell them apart. A reshape whose
#: target has no -1 cannot regroup silently (a wrong constant changes the element count, and apply's
#: run of the sliced model fails), so its literals are taken as reads of the dims' own sizes.
EXPORTED = "_secateurs_exported"


@dataclass
class FixedSize:
    """A reshape or split at ``node`` whose target size for one dim comes from the model's code.

    ``literal`` is a constant the tracer baked in (``self.c``, ``self.n_embd``), or None when the
    size was computed from other tensors' sizes (``C // self.n_head``), which ``reads`` lists.
    Slicing the model changes neither, so the channels there can be pruned only where apply keeps
    the constant in step (head counts) or the size read is the dim's own.
    """

    node: str
    info: DimInfo
    literal: int | None
    reads: list[DimInfo]
    module: str
    split: bool = False


def enclosing_module(node: fx.Node) -> tuple[str, type | None]:
    """Path and class of the innermost module whose forward traced ``node`` ('' and None at the top)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    path, cls = next(reversed(stack.values()))
    return (path if isinstance(path, str) else ""), cls


class FixedSizeRecorder:
    """The Coupler's half that notes target sizes as it walks reshapes and splits (into ``fixed``)."""

    gm: fx.GraphModule
    shapes: dict[str, Any]
    info: dict[str, Any]
    fixed: list[FixedSize]

    def _targets(self, node: fx.Node) -> tuple[int, list[Any]] | None:
        """(first output dim, target size entries) of a view/reshape/unflatten, None for others."""
        t, a = node.target, node.args
        if node.op == "call_method" and t in ("view", "reshape"):
            rest = list(a[1:]) or list(node.kwargs.get("shape", node.kwargs.get("size", ())))
            if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
                rest = list(rest[0])
            return 0, rest
        if node.op == "call_function" and t is torch.reshape:
            shape = a[1] if len(a) > 1 else node.kwargs.get("shape")
            return (0, list(shape)) if isinstance(shape, (tuple, list)) else None
        if t in ("unflatten", torch.unflatten):
            base = 1 if node.op == "call_method" else 2
            if len(a) > base and isinstance(a[base], (tuple, list)) and isinstance(a[base - 1], int):
                return a[base - 1], list(a[base])
            return None
        if node.op == "call_module" and isinstance(mod := self.gm.get_submodule(node.target), nn.Unflatten):  # type: ignore[arg-type]
            return int(mod.dim), list(mod.unflattened_size)  # type: ignore[arg-type]
        return None

    def _arity(self, arg: Any) -> int:
        v = self.shapes.get(arg.name) if isinstance(arg, fx.Node) else None
        return len(v) if isinstance(v, tuple) else 1

    def _size_select(self, n: fx.Node) -> list[tuple[str, int]] | None:
        """(tensor node, dim) per element when ``n`` is ``x.size()``, ``x.shape`` or a slice or item of one."""
        if n.op == "call_method" and n.target == "size" and isinstance(n.args[0], fx.Node):
            rank = len(self.shapes.get(n.args[0].name) or ())
            d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            return [(n.args[0].name, d % rank)] if isinstance(d, int) and rank else \
                [(n.args[0].name, k) for k in range(rank)]
        if n.op == "call_function" and n.target is getattr and n.args[1] == "shape" and isinstance(n.args[0], fx.Node):
            rank = len(self.shapes.get(n.args[0].name) or ())
            return [(n.args[0].name, k) for k in range(rank)]
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node):
            whole = self._size_select(n.args[0])
            idx = n.args[1]
            if whole is None or not isinstance(idx, (int, slice)):
                return None
            return [whole[idx]] if isinstance(idx, int) else whole[idx]
        return None

    def _size_reads(self, arg: Any, depth: int = 0) -> list[tuple[str, int]]:
        """Every (tensor node, dim) whose size a python-int node was computed from."""
        if isinstance(arg, (tuple, list)):
            return [r for a in arg for r in self._size_reads(a, depth)]
        if not isinstance(arg, fx.Node) or depth > 32 or has_tensor(self.shapes.get(arg.name)):
            return []
        pure = self._size_select(arg)
        if pure is not None:
            return pure
        return [r for a in arg.all_input_nodes for r in self._size_reads(a, depth + 1)]

    def _dims_of(self, reads: list[tuple[str, int]]) -> list[DimInfo]:
        out = []
        for name, d in reads:
            info = self.info.get(name)
            if is_tensor_info(info) and d < len(info):
                out.append(info[d])
        return out

    def _fix(self, node: fx.Node, info: DimInfo, literal: int | None, reads: list[DimInfo], split: bool = False) -> None:
        if layout_spaces(info) or any(layout_spaces(r) for r in reads):
            self.fixed.append(FixedSize(node.name, info, literal, reads, enclosing_module(node)[0], split))

    def _record_split(self, node: fx.Node, info: DimInfo) -> None:
        """A split by a size (``split(self.n_embd)`` or one computed from shapes) fixes its pieces' width."""
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections",
                                                                          node.kwargs.get("split_size"))
        if isinstance(size, int) and not isinstance(size, bool):
            self._fix(node, info, size, [], split=True)
        elif isinstance(size, fx.Node):
            self._fix(node, info, None, self._dims_of(self._size_reads(size)), split=True)

    def _record_targets(self, node: fx.Node, out: list[DimInfo]) -> None:
        """Note every target size of a view/reshape/unflatten that is a literal or read from shapes."""
        found = self._targets(node)
        if found is None:
            return
        start, entries = found
        if getattr(self.gm, EXPORTED, False) and -1 not in entries:
            return  # see EXPORTED: with no -1 to absorb a change, a constant would fail apply's check loudly
        total = sum(self._arity(e) for e in entries)
        if start + total > len(out) or (start == 0 and total != len(out)):
            return  # cannot align entries with dims (an unpacked python sequence): nothing to check
        d = start
        for e in entries:
            k = self._arity(e)
            if isinstance(e, int) and not isinstance(e, bool):
                if e != -1:
                    self._fix(node, out[d], e, [])
            elif isinstance(e, fx.Node):
                pure = self._size_select(e)
                for i in range(k):
                    reads = [pure[i]] if pure is not None and len(pure) == k else self._size_reads(e)
                    self._fix(node, out[d + i], None, self._dims_of(reads))
            d += k


def _atoms(sp: Spaces, info: DimInfo) -> set[int]:
    return {a for s in layout_spaces(info) for a in sp.atoms(s)}


def _int_attributes(model: nn.Module, path: str) -> list[tuple[str, int]]:
    """(name, value) of every integer attribute of the module at ``path`` and of the modules above it."""
    found = []
    while True:
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            mod = None
        if mod is not None:
            found += [(a, v) for a, v in vars(mod).items() if isinstance(v, int) and not isinstance(v, bool)]
        if not path:
            return found
        path = path.rpartition(".")[0]


def _heads_in_step(model: nn.Module, f: FixedSize, live: set[int], sp: Spaces, heads: set[int]) -> bool:
    """True when every live space is a head count that apply rewrites in the module's attributes.

    The literal is then the head count itself (``view(B, T, self.num_heads, d)``), an attribute apply
    rewrites (``all_head_size``), or, in a reshape, a product apply's rewrite keeps in step
    (``self.num_heads * self.head_dim``): a value no other attribute holds. A literal equal to an
    attribute apply leaves alone (``self.embed_dim``, or any piece width of a split) is fixed.
    """
    if not live or not live <= heads or f.literal is None:
        return False
    attributes = _int_attributes(model, f.module)
    counts = {v for a, v in attributes if a in HEAD_ATTRIBUTES}
    if not all(sp.size[r] in counts for r in live):
        return False
    rewritten = {v for a, v in attributes if a in HEAD_ATTRIBUTES + INNER_ATTRIBUTES}
    if f.literal in rewritten:
        return True
    return not f.split and f.literal not in {v for a, v in attributes if a not in HEAD_ATTRIBUTES + INNER_ATTRIBUTES}


def freeze_fixed_sizes(model: nn.Module, fixed: list[FixedSize], sp: Spaces, heads: set[int]) -> None:
    """Freeze the atomic spaces whose sizes ``fixed`` pins, unless apply keeps them in step."""
    for f in fixed:
        own = _atoms(sp, f.info)
        live = {r for r in own if sp.find(r) not in sp.frozen}
        op = "split" if f.split else "reshape"
        if f.literal is not None:
            if live and not _heads_in_step(model, f, live, sp, heads):
                reason = f"{op} at node '{f.node}' fixes this size at {f.literal}, a constant in the model's code"
                for r in live:
                    sp.freeze(r, reason)
            continue
        read = set().union(*(_atoms(sp, r) for r in f.reads)) if f.reads else set()
        if read - own:
            reason = f"{op} at node '{f.node}' computes a size from these channels' count"
            for r in read | own:
                sp.freeze(r, reason)
        elif live and any(not _atoms(sp, r) for r in f.reads):  # read off a dim no plan changes: a constant
            reason = f"{op} at node '{f.node}' takes this size from a dim of fixed size"
            for r in live:
                sp.freeze(r, reason)
