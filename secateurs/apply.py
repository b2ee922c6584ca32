"""Apply a PrunePlan to a torch model: physically slice it, or mask a same-shape copy.

The whole plan is checked against the model before anything is copied or cut, so an invalid plan
raises :class:`~secateurs.errors.InvalidPlanError` naming the group and leaves no trace. Work
happens on a deep copy; with ``inplace=True`` the finished copy's state is moved into the original
in one step, so a failure never leaves a half-pruned model behind.

After slicing, module attributes are re-derived from the new parameter shapes (in/out channels
and features, ``groups`` of depthwise convs, ``num_features``, ``normalized_shape``,
``num_channels``, ``embedding_dim``, attention heads; :mod:`secateurs.module_sync`), so the result trains and
prints truthfully.
Any other grouped conv keeps its ``groups``: a plan must take the same within-group channels from
every group.

A plan may keep *zero* units of the groups it lists in ``allow_empty`` (a removed residual branch).
Torch's own layers do not all run at zero width (a conv with 0 output channels raises, one with 0
input channels silently returns 0 channels instead of its bias, BatchNorm with 0 features raises),
so convs and batch norms left with a zero width become the stand-ins of :mod:`secateurs.modules`, which compute the
output shape and return the bias (or nothing) without a convolution: the sliced model then counts
exactly the params and FLOPs of the graph's polynomial at keep 0. Linear, LayerNorm, GroupNorm,
PReLU and Embedding work at zero width as they are; any other module left with a zero width is
an ``InvalidPlanError``. Parameter-free ops on the emptied channels must cope with empty tensors
(activations, adds, adaptive pooling do; max/avg pooling does not, which ``apply`` with
``graph=`` reports when it runs the result).

``narrow`` is the same slicing done in place, keeping every ``nn.Parameter`` object (only its
``.data`` and ``.grad`` change), for training that compacts a model whose optimiser holds its
parameters; ``widen`` undoes a sequence of narrowings (zeros where units were cut).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from secateurs.calibration import forward_batch
from secateurs.errors import InvalidPlanError, ValidationError, first_line
from secateurs.graph.groups import HEAD_ATTRIBUTES, Group, Member, validate_units
from secateurs.module_sync import sync_attributes, sync_heads
from secateurs.modules import (
    PrunedMultiheadAttention,
    ZeroWidthBatchNorm1d,
    ZeroWidthBatchNorm2d,
    ZeroWidthBatchNorm3d,
    ZeroWidthConv1d,
    ZeroWidthConv2d,
    ZeroWidthConv3d,
    conv_output_size,
    runs_at_zero_width,
    sync_zero_width,
)
from secateurs.plan import PrunePlan
from secateurs.torch_transformer import recomputable_attention

if TYPE_CHECKING:
    from secateurs.graph.build import DependencyGraph

__all__ = [
    "HEAD_ATTRIBUTES", "Narrowing", "PrunedMultiheadAttention", "ZeroWidthBatchNorm1d", "ZeroWidthBatchNorm2d",
    "ZeroWidthBatchNorm3d", "ZeroWidthConv1d", "ZeroWidthConv2d", "ZeroWidthConv3d", "apply", "conv_output_size",
    "cut_tensor", "mask_in_place", "member_tensor", "narrow", "runs_at_zero_width",
    "widen",
]

Mode = Literal["slice", "mask"]



# -- resolving and checking the plan ------------------------------------------------------------


@dataclass
class _Target:
    """One tensor (parameter or buffer) the plan cuts, wherever it is registered (tied weights)."""

    key: str
    shape: tuple[int, ...]
    is_param: bool
    locations: list[tuple[str, str]]
    removed: dict[int, set[int]] = field(default_factory=dict)
    groups: dict[int, set[str]] = field(default_factory=dict)

    def kept(self, dim: int) -> list[int]:
        gone = self.removed.get(dim, set())
        return [i for i in range(self.shape[dim]) if i not in gone]

    def new_shape(self) -> tuple[int, ...]:
        return tuple(n - len(self.removed.get(d, ())) for d, n in enumerate(self.shape))


def _key(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


def _aliases(model: nn.Module) -> dict[int, list[tuple[str, str, bool]]]:
    """Every (module path, name, is_param) under which each tensor is registered."""
    out: dict[int, list[tuple[str, str, bool]]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for name, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((path, name, True))
        for name, b in mod._buffers.items():
            if b is not None:
                out.setdefault(id(b), []).append((path, name, False))
    return out


def _tensor_at(model: nn.Module, module: str, param: str) -> Tensor | None:
    try:
        mod = model.get_submodule(module) if module else model
    except AttributeError:
        return None
    t = mod._parameters.get(param)
    if t is None:
        t = mod._buffers.get(param)
    return t


def member_tensor(model: nn.Module, group: Group, m: Member, made_for: str = "plan") -> Tensor:
    """The tensor ``m`` indexes in ``model``, checked to fit ``group`` (its dim, the size the graph saw,
    the reach of every unit); an :class:`InvalidPlanError` names the misfit."""
    name, key, hint = group.name, _key(m.module, m.param), f"({made_for} made for another model?)"
    t = _tensor_at(model, m.module, m.param)
    if t is None:
        try:
            model.get_submodule(m.module) if m.module else model
        except AttributeError:
            raise InvalidPlanError(f"group {name!r}: module {m.module!r} not found in {type(model).__name__}") from None
        raise InvalidPlanError(f"group {name!r}: {key!r} is not a parameter or buffer of {type(model).__name__}")
    if not 0 <= m.dim < t.dim():
        raise InvalidPlanError(f"group {name!r}: {key!r} has {t.dim()} dims, member indexes dim {m.dim}")
    if m.extent is not None and t.shape[m.dim] != m.extent:
        raise InvalidPlanError(f"group {name!r}: {key!r} dim {m.dim} has size {t.shape[m.dim]}, but the "
                               f"{made_for}'s graph saw {m.extent} {hint}")
    reach = max(m.indices(range(group.size)))
    if reach >= t.shape[m.dim]:
        raise InvalidPlanError(f"group {name!r}: its {group.size} units reach index {reach} of {key!r} dim {m.dim}, "
                               f"which has size {t.shape[m.dim]} {hint}")
    return t


def _resolve_groups(plan: PrunePlan, graph: DependencyGraph | None) -> dict[str, Group]:
    if graph is None and plan.groups is None:
        raise InvalidPlanError("the plan embeds no group definitions: pass graph=..., or build the plan with "
                               "PrunePlan.from_graph")
    out: dict[str, Group] = {}
    for name in plan.keep:
        if graph is not None:
            try:
                out[name] = graph.group(name)
            except ValidationError:
                known = ", ".join(g.name for g in graph.groups)
                raise InvalidPlanError(f"unknown group {name!r} (the graph has: {known})") from None
            made = plan.groups.get(name) if plan.groups is not None else None
            if made is not None and made.size != out[name].size:
                raise InvalidPlanError(f"group {name!r} has {made.size} units in the plan but {out[name].size} in "
                                       "the graph (plan made for another model?)")
        else:
            assert plan.groups is not None
            if name not in plan.groups:
                raise InvalidPlanError(f"unknown group {name!r}: the plan keeps units of it but does not define it")
            out[name] = plan.groups[name]
    return out


def _plan_targets(model: nn.Module, plan: PrunePlan, groups: Mapping[str, Group]) -> dict[int, _Target]:
    """Check every group, member and refit tensor against the model; return what each tensor loses."""
    aliases = _aliases(model)
    targets: dict[int, _Target] = {}
    emptied = {name for name in plan.keep if plan.empties(name) and groups[name].prunable}
    for name, kept in plan.keep.items():
        g = groups[name]
        if name not in emptied:
            validate_units(g, kept)
        keep_set = set(kept)
        removed = [u for u in range(g.size) if u not in keep_set]
        for m in g.members:
            key = _key(m.module, m.param)
            t = member_tensor(model, g, m)
            tgt = targets.get(id(t))
            if tgt is None:
                locs = [(p, n) for p, n, _ in aliases[id(t)]]
                tgt = targets[id(t)] = _Target(key, tuple(t.shape), isinstance(t, nn.Parameter), locs)
            if removed:
                tgt.removed.setdefault(m.dim, set()).update(m.indices(removed))
                tgt.groups.setdefault(m.dim, set()).add(name)
    for tgt in targets.values():
        for d, gone in tgt.removed.items():
            if len(gone) >= tgt.shape[d] and not tgt.groups[d] <= emptied:
                raise InvalidPlanError(f"group(s) {_names(tgt.groups[d])}: together they remove every index of "
                                       f"{tgt.key!r} dim {d}")
    if emptied:
        _check_zero_width(model, targets)
    _check_modules(model, targets)
    _check_refit(model, plan, targets, aliases)
    return {i: t for i, t in targets.items() if t.removed}


def _names(names: set[str]) -> str:
    return ", ".join(repr(n) for n in sorted(names))


def _check_zero_width(model: nn.Module, targets: Mapping[int, _Target]) -> None:
    """Every module a plan leaves with a zero-width tensor must run at zero width (see the module doc)."""
    empty = {i: tgt for i, tgt in targets.items() if any(len(g) >= tgt.shape[d] for d, g in tgt.removed.items())}
    if not empty:
        return
    for path, mod in model.named_modules():
        hit = [empty[id(t)] for t in (*mod._parameters.values(), *mod._buffers.values())
               if t is not None and id(t) in empty]
        if hit and not runs_at_zero_width(mod):
            names = _names({n for tgt in hit for d, ns in tgt.groups.items() if len(tgt.removed[d]) >= tgt.shape[d]
                            for n in ns})
            raise InvalidPlanError(f"group(s) {names}: {type(mod).__name__} {path or type(model).__name__!r} cannot "
                                   "run at zero width, so these groups cannot be emptied (keep at least one unit)")


def _check_modules(model: nn.Module, targets: Mapping[int, _Target]) -> None:
    """Module-level constraints a plan must respect (they cannot be seen from one member alone)."""
    for path, mod in model.named_modules():
        where = path or type(model).__name__
        if isinstance(mod, nn.GroupNorm) and mod.weight is not None and id(mod.weight) in targets:
            tgt = targets[id(mod.weight)]
            new = tgt.new_shape()[0]
            if new % mod.num_groups and mod.num_groups != mod.num_channels:
                raise InvalidPlanError(f"group(s) {_names(tgt.groups[0])}: GroupNorm {where!r} would keep {new} channels, "
                                       f"not a multiple of num_groups={mod.num_groups}")
        elif isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1:
            _check_grouped_conv(where, mod, targets)
        elif isinstance(mod, nn.MultiheadAttention):
            if not recomputable_attention(mod) and any(id(p) in targets for p in mod.parameters()):
                raise InvalidPlanError(f"MultiheadAttention {where!r}: bias_k/bias_v or add_zero_attn cannot be "
                                       "sliced (the pruned module computes attention without them)")
            projections = [(w, 3) for w in (mod.in_proj_weight,) if w is not None] or [
                (w, 1) for w in (mod.q_proj_weight, mod.k_proj_weight, mod.v_proj_weight)]
            for weight, blocks in projections:
                if weight is not None and id(weight) in targets:
                    tgt = targets[id(weight)]
                    if len(tgt.removed.get(0, ())) % (blocks * mod.head_dim):
                        raise InvalidPlanError(f"group(s) {_names(tgt.groups[0])}: MultiheadAttention {where!r} can "
                                               f"only lose whole heads of head_dim={mod.head_dim} in q, k and v alike")


def _brief(indices: set[int]) -> str:
    shown = sorted(indices)
    return "[" + ", ".join(map(str, shown[:8])) + (", ...]" if len(shown) > 8 else "]")


def _check_grouped_conv(where: str, mod: nn.modules.conv._ConvNd, targets: Mapping[int, _Target]) -> None:
    """A grouped conv stays grouped only if every group loses the same within-group channels.

    Weight dim 0 spans all channels (out; in when transposed), ``g`` blocks of ``n/g``: each block
    must lose the same offsets. Dim 1 is the within-group index itself and may lose any. The bias
    (out channels) must lose what the weight loses. A depthwise conv loses whole groups instead.
    """
    g = mod.groups
    w = targets.get(id(mod.weight))
    b = targets.get(id(mod.bias)) if mod.bias is not None else None
    if w is None and b is None:
        return
    names = _names({n for t in (w, b) if t is not None for ns in t.groups.values() for n in ns})
    head = f"group(s) {names}: grouped convolution {where!r} (groups={g})"
    lose = {d: (w.removed.get(d, set()) if w is not None else set()) for d in (0, 1)}
    bias = None if mod.bias is None else b.removed.get(0, set()) if b is not None else set()
    if g == mod.in_channels == mod.out_channels:  # depthwise: a channel is a group
        if lose[1] or (bias is not None and bias != lose[0]):
            raise InvalidPlanError(f"{head} can only be sliced along its channels, weight and bias alike")
        return

    def within(gone: set[int], size: int, what: str) -> set[int]:
        per = size // g
        offsets = {frozenset(i - k * per for i in gone if k * per <= i < (k + 1) * per) for k in range(g)}
        if len(offsets) > 1:
            raise InvalidPlanError(f"{head} must lose the same channels in each of its {g} groups of {per}; "
                                   f"{what} loses {_brief(gone)}")
        return set(next(iter(offsets)))

    within(lose[0], mod.weight.shape[0], f"{where}.weight dim 0")
    if bias is None:
        return
    if mod.transposed:  # bias: all out channels; weight dim 1: their within-group index
        if within(bias, mod.out_channels, f"{where}.bias") != lose[1]:
            raise InvalidPlanError(f"{head}: its bias and weight dim 1 lose different output channels")
    elif bias != lose[0]:
        raise InvalidPlanError(f"{head}: its bias and weight dim 0 lose different output channels")


def _check_refit(model: nn.Module, plan: PrunePlan, targets: dict[int, _Target],
                 aliases: Mapping[int, list[tuple[str, str, bool]]]) -> None:
    for key, value in (plan.refit or {}).items():
        module, _, param = key.rpartition(".")
        t = _tensor_at(model, module, param)
        if t is None:
            raise InvalidPlanError(f"refit[{key!r}]: no such parameter or buffer in {type(model).__name__}")
        tgt = targets.get(id(t))
        if tgt is None:
            tgt = targets[id(t)] = _Target(key, tuple(t.shape), isinstance(t, nn.Parameter),
                                           [(p, n) for p, n, _ in aliases[id(t)]])
        expected = tgt.new_shape()
        if tuple(value.shape) != expected:
            raise InvalidPlanError(f"refit[{key!r}]: shape {tuple(value.shape)}, but the sliced tensor has shape {expected}")


# -- slicing and masking --------------------------------------------------------------------


def _install(model: nn.Module, tgt: _Target, value: Tensor) -> None:
    """Register ``value`` under every name the tensor had (a tied weight stays tied)."""
    for path, name in tgt.locations:
        mod = model.get_submodule(path) if path else model
        if tgt.is_param:
            mod._parameters[name] = value  # type: ignore[assignment]
        else:
            mod._buffers[name] = value


def cut_tensor(value: Tensor, kept: Mapping[int, Sequence[int]]) -> Tensor:
    """``value`` keeping only the ``kept`` indices along each dim named (a fresh contiguous tensor)."""
    new = value.detach()
    for d in sorted(kept):
        new = new.index_select(d, torch.as_tensor(kept[d], dtype=torch.long, device=value.device))
    return new.clone(memory_format=torch.contiguous_format)


def _slice_tensors(model: nn.Module, targets: Mapping[int, _Target], *, reuse: bool = False) -> None:
    """Slice every target; ``reuse`` keeps the tensor objects (new ``.data``, ``.grad`` cut alike)."""
    for tgt in targets.values():
        path, name = tgt.locations[0]
        old = _tensor_at(model, path, name)
        assert old is not None
        kept = {d: tgt.kept(d) for d in tgt.removed}
        new = cut_tensor(old, kept)
        if reuse:
            grad = old.grad
            _set_data(old, new)
            if grad is not None:
                old.grad = cut_tensor(grad, kept)
            continue
        value = nn.Parameter(new, requires_grad=old.requires_grad) if tgt.is_param else new
        _install(model, tgt, value)


def _set_data(tensor: Tensor, value: Tensor) -> None:
    """``tensor.data = value`` for a new shape, dropping autograd's cached gradient accumulator.

    ``set_data`` keeps a live accumulator unless the dtype or device changes, and one kept alive
    by a graph the caller still holds (last step's ``loss``) expects the old shape, so the next
    backward would fail; passing through another dtype first makes torch drop it.
    """
    if tensor.requires_grad:
        tensor.grad = None
        tensor.data = value.new_empty(0, dtype=torch.float64 if value.dtype != torch.float64 else torch.float32)
    tensor.data = value


def _scatter(value: Tensor, shape: Sequence[int], kept: Mapping[int, Sequence[int]]) -> Tensor:
    """Inverse of ``cut_tensor``: a zero tensor of ``shape`` holding ``value`` at the ``kept`` indices."""
    new = value.detach()
    for d in sorted(kept):
        full_shape = list(new.shape)
        full_shape[d] = shape[d]
        full = torch.zeros(full_shape, dtype=new.dtype, device=new.device)
        new = full.index_copy_(d, torch.as_tensor(kept[d], dtype=torch.long, device=new.device), new)
    return new


def _mask_tensors(model: nn.Module, targets: Mapping[int, _Target]) -> None:
    with torch.no_grad():
        for tgt in targets.values():
            t = _tensor_at(model, *tgt.locations[0])
            assert t is not None
            for d, gone in tgt.removed.items():
                t.index_fill_(d, torch.tensor(sorted(gone), dtype=torch.long, device=t.device), 0)


def _refit(model: nn.Module, plan: PrunePlan, cuts: Mapping[int, _Target], mode: Mode) -> None:
    """Install refit tensors; in mask mode they are scattered back to the full shape (zeros elsewhere)."""
    for key, value in (plan.refit or {}).items():
        module, _, param = key.rpartition(".")
        old = _tensor_at(model, module, param)
        assert old is not None
        tgt = cuts[id(old)]
        new = value.detach().to(dtype=old.dtype, device=old.device).clone()
        if mode == "mask":
            new = _scatter(new, tgt.shape, {d: tgt.kept(d) for d in tgt.removed})
        installed = nn.Parameter(new, requires_grad=old.requires_grad) if tgt.is_param else new
        _install(model, tgt, installed)


# -- the entry point ------------------------------------------------------------------------------


def _verify(model: nn.Module, graph: DependencyGraph, mode: str) -> None:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            forward_batch(model, graph.example_inputs)
    except Exception as e:  # any failure means the plan did not produce a working model
        first = first_line(e)
        raise InvalidPlanError(f"the {mode}d model fails on the graph's example inputs: {first} "
                               "(the input model is unchanged)") from e
    finally:
        for m, training in modes:
            m.training = training


def _transplant(src: nn.Module, dst: nn.Module) -> None:
    """Make ``dst`` the finished model in one step (its class too, should the root have been swapped)."""
    state = dict(src.__dict__)
    dst.__class__ = src.__class__
    dst.__dict__.clear()
    dst.__dict__.update(state)


def apply(model: nn.Module, plan: PrunePlan, *, graph: DependencyGraph | None = None, mode: Mode = "slice",
          inplace: bool = False) -> nn.Module:
    """Prune ``model`` according to ``plan``: physically slice it, or zero the removed slices.

    Parameters
    ----------
    model:
        The dense model the plan's groups were found on. Never modified unless ``inplace``.
    plan:
        Kept units per group. Group definitions come from ``graph`` when given, else from the plan
        (see :meth:`PrunePlan.from_graph`).
    graph:
        The model's :class:`~secateurs.graph.DependencyGraph`. When given, the result is also run
        once on ``graph.example_inputs`` (eval mode, no grad) to prove it works.
    mode:
        ``"slice"``: a physically smaller model whose module attributes match its new shapes.
        ``"mask"``: a same-shape copy with exactly the removed slices of every member zeroed. It
        computes what the sliced model does except where a pruned group meets a normalisation
        over channels (LayerNorm, GroupNorm): the zeroed channels still count in its mean and
        variance there, so outputs differ (slice is the model you deploy).
    inplace:
        Move the result into ``model`` (after it was fully built and checked) and return ``model``.

    Returns
    -------
    nn.Module
        The pruned model (``model`` itself when ``inplace``).

    Raises
    ------
    InvalidPlanError
        Unknown group, unit out of range, unsorted or duplicate units, every unit removed (unless the
        group is in ``plan.allow_empty`` and its modules run at zero width), a frozen
        group pruned, a member's module or parameter missing, a GroupNorm left with a channel count
        its ``num_groups`` does not divide, a grouped conv whose groups would lose different channels
        (or whose bias and weight would disagree), a refit tensor of the wrong shape, or a result that
        fails on the graph's example inputs. Raised before ``model`` is touched.
    """
    if mode not in ("slice", "mask"):
        raise ValidationError("mode", f"expected 'slice' or 'mask', got {mode!r}")
    if not isinstance(plan, PrunePlan):
        raise ValidationError("plan", f"expected a PrunePlan, got {type(plan).__name__}")
    if not isinstance(model, nn.Module):
        raise ValidationError("model", f"expected an nn.Module, got {type(model).__name__}")
    groups = _resolve_groups(plan, graph)
    targets = _plan_targets(model, plan, groups)  # everything is checked before anything is copied
    work = copy.deepcopy(model)
    if mode == "slice":
        _slice_tensors(work, targets)
    else:
        _mask_tensors(work, targets)
    if plan.refit:
        _refit(work, plan, _refit_targets(model, work, plan, targets), mode)
    if mode == "slice":
        sync_attributes(work)
        sync_heads(work, plan, groups)
        sync_zero_width(work)
    if graph is not None:
        _verify(work, graph, mode)
    if inplace:
        _transplant(work, model)
        return model
    return work


def mask_in_place(model: nn.Module, plan: PrunePlan, groups: Mapping[str, Group] | None = None) -> None:
    """Zero the slices ``plan`` removes in ``model`` itself, keeping every tensor object.

    For passes that must keep module identities while they prune (sequential one-shot pruning
    runs an fx trace of the model it masks). The plan is checked first, as by :func:`apply`;
    ``groups`` defaults to the plan's embedded definitions.
    """
    resolved = dict(groups) if groups is not None else _resolve_groups(plan, None)
    _mask_tensors(model, _plan_targets(model, plan, resolved))


def _refit_targets(model: nn.Module, work: nn.Module, plan: PrunePlan,
                   targets: Mapping[int, _Target]) -> dict[int, _Target]:
    """Map each refit tensor of ``work`` (after slicing) to what is known about its cut."""
    aliases = _aliases(model)
    by_key = {t.key: t for t in targets.values()}
    for t in targets.values():
        for p, n in t.locations:
            by_key.setdefault(_key(p, n), t)
    out: dict[int, _Target] = {}
    for key in plan.refit or {}:
        module, _, param = key.rpartition(".")
        tgt = by_key.get(key)
        if tgt is None:
            orig = _tensor_at(model, module, param)
            assert orig is not None
            tgt = _Target(key, tuple(orig.shape), isinstance(orig, nn.Parameter),
                          [(p, n) for p, n, _ in aliases[id(orig)]])
        now = _tensor_at(work, module, param)
        assert now is not None
        out[id(now)] = tgt
    return out


# -- in place: narrowing a model under training, and widening it back ------------------------------


@dataclass
class Narrowing:
    """What :func:`narrow` did: each cut tensor (the same object, now narrower) with its former shape
    and the kept indices of every cut dim, the plan's groups renumbered for the narrower model
    (groups the plan emptied are left out), and the class and size attributes of each module it
    changed, as they were before (``widen`` restores them: shapes alone cannot tell a
    GroupNorm(2, 4) narrowed to 2 channels from a per-channel one)."""

    cuts: list[tuple[Tensor, tuple[int, ...], dict[int, list[int]]]]
    groups: dict[str, Group]
    modules: dict[str, tuple[type, dict[str, Any]]] = field(default_factory=dict)


def _fit_member(m: Member, per_unit: list[list[int]]) -> Member | None:
    """The Member whose units occupy exactly ``per_unit`` (sorted indices per unit), or None."""
    first = per_unit[0]
    inner = first[1] - first[0] if len(first) > 1 else m.inner_stride
    stride = per_unit[1][0] - first[0] if len(per_unit) > 1 else (m.unit_stride or m.block)
    candidate = Member(m.module, m.param, m.dim, m.role, first[0], m.block, None if stride == m.block else stride,
                       inner)
    if all(candidate.indices([u]) == idx for u, idx in enumerate(per_unit)):
        return candidate
    return None


def _renumber(model: nn.Module, plan: PrunePlan, groups: Mapping[str, Group],
              targets: Mapping[int, _Target]) -> dict[str, Group]:
    """The kept units of each group as units 0..k-1 of the sliced tensors (ranks among kept indices)."""
    out: dict[str, Group] = {}
    for name, kept in plan.keep.items():
        g = groups[name]
        if not kept:
            continue
        members = []
        for m in g.members:
            t = _tensor_at(model, m.module, m.param)
            tgt = targets.get(id(t))
            per_unit = [m.indices([u]) for u in kept]
            if tgt is not None and m.dim in tgt.removed:
                rank = {old: new for new, old in enumerate(tgt.kept(m.dim))}
                per_unit = [[rank[i] for i in idx] for idx in per_unit]
            fitted = _fit_member(m, per_unit)
            if fitted is None:
                raise InvalidPlanError(f"group {name!r}: its units in {_key(m.module, m.param)!r} dim {m.dim} have no "
                                       "regular layout after slicing")
            members.append(fitted)
        out[name] = Group(name, len(kept), members, g.unit_width, g.prunable, g.reason, list(g.nodes))
    return out


def narrow(model: nn.Module, plan: PrunePlan) -> Narrowing:
    """Slice ``model`` in place by ``plan`` (embedded groups), keeping every tensor object.

    The same checks and slicing as ``apply(mode="slice")``, but each ``nn.Parameter`` keeps its
    identity (its ``.data`` and ``.grad`` are replaced), so an optimiser built on the model's
    parameters still holds them; its per-parameter state is the caller's to cut alike (the
    returned ``cuts`` say how). Nothing is touched when the plan is invalid.

    Raises
    ------
    InvalidPlanError
        As :func:`apply`, or a group whose units would have no regular layout after slicing.
    ValidationError
        The plan carries refit tensors (narrowing keeps the trained values).
    """
    if not isinstance(plan, PrunePlan):
        raise ValidationError("plan", f"expected a PrunePlan, got {type(plan).__name__}")
    if plan.refit:
        raise ValidationError("plan", "narrow keeps the model's own values; a plan with refit tensors needs apply")
    groups = _resolve_groups(plan, None)
    targets = _plan_targets(model, plan, groups)
    renumbered = _renumber(model, plan, groups, targets)
    cuts = []
    for tgt in targets.values():
        t = _tensor_at(model, *tgt.locations[0])
        assert t is not None
        cuts.append((t, tgt.shape, {d: tgt.kept(d) for d in sorted(tgt.removed)}))
    before = {path: (type(mod), _size_attributes(mod)) for path, mod in model.named_modules()}
    _slice_tensors(model, targets, reuse=True)
    sync_attributes(model)
    sync_heads(model, plan, groups)
    sync_zero_width(model)
    modules: dict[str, tuple[type, dict[str, Any]]] = {}
    for path, mod in model.named_modules():  # only what this narrowing changed
        cls, attributes = before[path]
        changed = {k: v for k, v in attributes.items() if getattr(mod, k, None) != v}
        if changed or type(mod) is not cls:
            modules[path] = (cls, changed)
    return Narrowing(cuts, renumbered, modules)


def _size_attributes(mod: nn.Module) -> dict[str, Any]:
    """The plain int / int-tuple attributes of ``mod`` (channel, feature and head counts among them)."""
    def plain(v: Any) -> bool:
        return (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in v))
    return {k: v for k, v in vars(mod).items() if not k.startswith("_") and plain(v)}


def widen(model: nn.Module, tensors: Sequence[tuple[Tensor, Sequence[int], Mapping[int, Sequence[int]]]],
          modules: Mapping[str, tuple[type, Mapping[str, Any]]] | None = None) -> None:
    """Give each tensor back its ``shape``, its values at the ``kept`` indices and zeros elsewhere
    (in place, same objects; ``.grad`` dropped); restore the module classes and attributes of
    ``modules`` (``Narrowing.modules``, merged over narrowings keeping the earliest values), else
    re-derive them from the shapes."""
    for tensor, shape, kept in tensors:
        _set_data(tensor, _scatter(tensor, shape, kept))
        tensor.grad = None
    if modules is None:
        sync_attributes(model)
        sync_zero_width(model)
        return
    for path, mod in model.named_modules():
        if path in modules:
            cls, attributes = modules[path]
            mod.__class__ = cls
            for k, v in attributes.items():
                setattr(mod, k, v)
