"""Freeze the channels whose size the model's own code fixes in a reshape or a split.

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

from torch import nn

from secateurs.graph.coupling import FixedSize
from secateurs.graph.groups import HEAD_ATTRIBUTES, INNER_ATTRIBUTES
from secateurs.graph.spaces import DimInfo, Spaces, layout_spaces


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
