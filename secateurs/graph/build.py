"""``build(model, example_inputs)``: trace, couple channel spaces into Groups, price them exactly.

The three steps are kept apart so each can be checked on its own:

1. trace with ``torch.fx.symbolic_trace`` (torch.nn layers are leaves) and run the traced module
   once on the example inputs under ``ShapeProp`` and ``FlopCounterMode``, recording each node's
   output shape and the FLOPs the counter saw at that node;
2. the coupling rules (:mod:`secateurs.graph.coupling`) tie channel spaces and register which
   parameter dims each space indexes and which dimension sizes each counted op multiplies;
3. atomic spaces become Groups (one per connected component of tied spaces), and the
   registrations become Members and exact cost polynomials. Each modelled op's FLOPs were
   checked against the counter's number at full width, so ``cost(full)`` equals the count.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx, nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from secateurs.calibration import forward_batch
from secateurs.cost import Cost, CostModel, Polynomial
from secateurs.errors import TraceError, ValidationError, first_line
from secateurs.graph.coupling import Coupler, Info, op_name
from secateurs.graph.export import export_trace
from secateurs.graph.fixed_sizes import freeze_fixed_sizes
from secateurs.graph.groups import Group, Member
from secateurs.graph.spaces import CouplingError, Layout, Opaque, layout_size, member_maps
from secateurs.torch_transformer import slow_forward
from secateurs.window_attention import computing_twin

Mono = tuple[str, ...]
Poly = dict[Mono, float]


# -- tracing ------------------------------------------------------------------------------


def _arguments(model: nn.Module, example_inputs: Any) -> tuple[list[Any], dict[str, Any]]:
    """Positional values for every forward parameter, plus concrete (defaulted) ones for fx."""
    if isinstance(example_inputs, torch.Tensor):
        args: tuple[Any, ...] = (example_inputs,)
        kwargs: dict[str, Any] = {}
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    else:
        raise ValidationError("example_inputs", f"expected a tensor, a tuple of tensors or a dict, got "
                                                f"{type(example_inputs).__name__}")
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValidationError("example_inputs", f"do not match {type(model).__name__}.forward: {e}") from e
    values: list[Any] = []
    concrete: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            if name in bound.arguments:
                raise ValidationError("example_inputs", f"*args/**kwargs of {type(model).__name__}.forward "
                                                        "cannot be traced; name the inputs")
            continue
        if name in bound.arguments:
            values.append(bound.arguments[name])
        elif p.default is not p.empty:
            concrete[name] = p.default
            values.append(p.default)
        else:
            raise ValidationError("example_inputs", f"missing input {name!r} of {type(model).__name__}.forward")
    return values, concrete


class _Tracer(fx.Tracer):
    """symbolic_trace's tracer, but buffers stay named ``get_attr`` nodes: fx would otherwise fold
    arithmetic on them (FrozenBatchNorm2d's ``weight * (running_var + eps).rsqrt()``) into
    anonymous constants that no plan can slice."""

    proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # torch's Transformer containers are traced through to their layers (which have rules)
        return slow_forward(m) is None and super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        slow = slow_forward(m)
        return super().call_module(m, forward if slow is None else functools.partial(slow, m), args, kwargs)


def _trace(model: nn.Module, values: list[Any], concrete: dict[str, Any]) -> fx.GraphModule:
    """symbolic_trace ``model``; where fx cannot, ``torch.export`` on ``values``, rewritten to the same
    kind of graph (:mod:`secateurs.graph.export`): HuggingFace transformers models need it."""
    before = set(vars(model))
    try:
        tracer = _Tracer()
        graph = tracer.trace(model, concrete_args=concrete or None)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # fx raises many kinds; all mean the same thing to the caller
        fx_error = e
    finally:  # fx stores the tensor constants it meets on the traced root: take them off the user's model
        for name in set(vars(model)) - before:
            if name.startswith("_tensor_constant"):
                delattr(model, name)
    reason = first_line(fx_error)
    try:
        return export_trace(model, values, concrete)
    except TraceError as e:
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: {reason} (data-dependent control flow or an "
            f"untraceable call), and {e}; see the chained exceptions"
        ) from e


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    return None


class _NodeFailed(Exception):
    """A node raised while the probe ran it: which node, and torch's own error as the cause."""

    def __init__(self, node: fx.Node) -> None:
        super().__init__(node.name)
        self.node = node


class _Probe(fx.Interpreter):
    """Runs the traced model once, recording each node's output shapes and the FLOPs that
    FlopCounterMode counted there. (Not ShapeProp: it prints a traceback of its own on failure,
    and the error it raises names the node but drops torch's reason.)"""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter
        self.shapes: dict[str, Any] = {}
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        try:
            result = super().run_node(n)
        except Exception as e:
            raise _NodeFailed(n) from e
        self.flops[n.name] = self.counter.get_total_flops() - before
        self.shapes[n.name] = _shape_of(result)
        return result


def _probe(gm: fx.GraphModule, model: nn.Module, values: list[Any]) -> tuple[dict[str, Any], dict[str, int]]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # no running-statistics updates, no dropout: the model is never changed
    try:
        # with autograd on, as training and dense_counts run: without it nn.MultiheadAttention takes
        # an uncounted fused fast path, and scaled_dot_product_attention picks another kernel than
        # it does for a mask that needs grad (T5's position bias: counted matmuls, or nothing)
        with FlopCounterMode(display=False) as counter:
            probe = _Probe(gm, counter)
            probe.run(*values)
    except _NodeFailed as e:
        node, cause = e.node, e.__cause__
        reason = first_line(cause)
        what = f"{node.target} ({op_name(node, gm.get_submodule(node.target))})" if node.op == "call_module" else \
            op_name(node)
        raise TraceError(f"running {type(model).__name__} on the example inputs failed at node {node.name!r}, "
                         f"{what}: {reason}") from cause
    except Exception as e:
        raise TraceError(f"running {type(model).__name__} on the example inputs failed: "
                         f"{first_line(e)}") from e
    finally:
        for m, mode in modes:
            m.training = mode
    return probe.shapes, probe.flops


# -- polynomials over group names (any degree until the end) --------------------------------


def _mul(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for ma, ca in a.items():
        for mb, cb in b.items():
            m = tuple(sorted(ma + mb))
            out[m] = out.get(m, 0.0) + ca * cb
    return out


def _add(a: Poly, b: Poly, scale: float = 1.0) -> Poly:
    out = dict(a)
    for m, c in b.items():
        out[m] = out.get(m, 0.0) + scale * c
    return out


# -- the graph -------------------------------------------------------------------------------

_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm)  # BatchNorm and InstanceNorm normalise each channel alone
_CHANNEL_NORM_FUNCTIONS = (F.layer_norm, F.group_norm, torch.layer_norm, torch.group_norm)


@dataclass
class DependencyGraph:
    """Traced model, its Groups (decision variables) and their exact cost model."""

    nx: nx.DiGraph
    gm: fx.GraphModule
    groups: list[Group]
    example_inputs: Any
    cost_model: CostModel
    notes: dict[str, str] = field(default_factory=dict)

    def group(self, name: str) -> Group:
        """The group called ``name``; ValidationError names the unknown group otherwise."""
        for g in self.groups:
            if g.name == name:
                return g
        raise ValidationError("group", f"unknown group {name!r} (known: {', '.join(g.name for g in self.groups)})")

    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def normalisations(self, name: str) -> list[str]:
        """The LayerNorm / GroupNorm nodes whose output carries group ``name``.

        They normalise over the group's channels, so removing channels moves the kept ones' mean
        and variance: the kept channels change value there, which a reconstruction error computed
        on the unpruned inputs does not see.
        """
        carried = set(self.group(name).nodes)
        found = []
        for node in self.gm.graph.nodes:
            if node.name not in carried:
                continue
            if node.op == "call_module":
                if isinstance(self.gm.get_submodule(str(node.target)), _CHANNEL_NORMS):
                    found.append(str(node.target))
            elif node.op == "call_function" and node.target in _CHANNEL_NORM_FUNCTIONS:
                found.append(node.name)
        return found

    def _check_keep(self, keep: Mapping[str, float]) -> None:
        for name, k in keep.items():
            g = self.group(name)
            if not g.prunable and k != g.size:
                raise ValidationError(f"keep[{name!r}]", f"group is frozen ({g.reason}); it keeps all {g.size} units")
            if not 0 <= k <= g.size:
                raise ValidationError(f"keep[{name!r}]", f"{k} outside [0, {g.size}]")

    def cost(self, keep: Mapping[str, float] | None = None) -> Cost:
        """Params and FLOPs when each group keeps ``keep[name]`` units (missing: all)."""
        keep = dict(keep or {})
        self._check_keep(keep)
        return self.cost_model(keep)

    def marginal(self, name: str) -> Cost:
        """Params and FLOPs one unit of ``name`` costs at full width (the cost's derivative)."""
        g = self.group(name)
        sizes = self.cost_model.sizes

        def d(p: Polynomial) -> float:
            total = p.linear.get(g.name, 0.0)
            for (a, b), c in p.bilinear.items():
                if a == g.name:
                    total += c * sizes[b]
                if b == g.name:
                    total += c * sizes[a]
            return total

        return Cost(params=d(self.cost_model.params), flops=d(self.cost_model.flops))

    def __repr__(self) -> str:
        frozen = sum(not g.prunable for g in self.groups)
        return (f"DependencyGraph({self.gm.__class__.__name__}: {len(self.nx)} nodes, {len(self.groups)} groups, "
                f"{frozen} frozen)")


def build(model: nn.Module, example_inputs: Any, *, strict: bool = False) -> DependencyGraph:
    """Trace ``model`` on ``example_inputs`` and return its groups and exact cost model.

    Parameters
    ----------
    model:
        Any ``nn.Module`` torch.fx can trace; it is not modified (its train/eval mode is restored).
    example_inputs:
        A tensor, a tuple of tensors (positional) or a dict of keyword tensors.
    strict:
        Raise :class:`~secateurs.errors.UnsupportedOpError` at the first op without a coupling
        rule instead of freezing the groups it touches.
    """
    if not isinstance(model, nn.Module):
        raise ValidationError("model", f"expected an nn.Module, got {type(model).__name__}")
    model = computing_twin(model)  # torchvision's Swin attention, computed so that its heads show
    values, concrete = _arguments(model, example_inputs)
    gm = _trace(model, values, concrete)
    shapes, flops = _probe(gm, model, values)
    tensors = {n for n, _ in model.named_parameters(remove_duplicate=False)} | \
        {n for n, _ in model.named_buffers(remove_duplicate=False)}
    coupler = Coupler(gm, shapes, flops, strict, tensors)
    coupler.run()
    return _finalize(model, gm, coupler, example_inputs, shapes)


def _finalize(model: nn.Module, gm: fx.GraphModule, c: Coupler, example_inputs: Any,
              shapes: dict[str, Any]) -> DependencyGraph:
    sp = c.sp
    # frozen composites freeze their parts; per-head features are kept whole
    changed = True
    while changed:
        changed = False
        for root, d in list(sp.defs.items()):
            if sp.find(root) in sp.frozen:
                for p in d.parts:
                    if sp.find(p) not in sp.frozen:
                        sp.freeze(p, sp.frozen[sp.find(root)])
                        changed = True
    heads: dict[int, str] = {sp.find(s): path for s, path in c.mha_heads.items()}
    for d in sp.defs.values():
        if d.kind != "prod":
            continue
        roots = [sp.find(p) for p in d.parts]
        if any(sp.has_flag(r, "attn_batch") for r in roots):
            for r in roots:
                if sp.has_flag(r, "attn_batch"):
                    heads.setdefault(r, "")
                elif sp.has_flag(r, "mm_feature"):
                    sp.freeze(r, f"per-head features (head_dim) at node '{d.node}' are kept whole")

    freeze_fixed_sizes(model, c.fixed, sp, set(heads))

    # members of each atomic space, in registration order
    members: dict[int, list[Member]] = {}
    first: dict[int, int] = {}
    creator: dict[int, str] = {}
    for i, reg in enumerate(c.regs):
        try:
            terms = sp.expand(reg.layout)
        except CouplingError as e:
            for s in [a.space for t in reg.layout for a in t.axes if a.space is not None]:
                sp.freeze(s, f"{e} at node '{reg.node}'")
            continue
        for t in terms:
            roots = [a.space for a in t.axes if a.space is not None]
            for k, ax in enumerate(t.axes):
                if ax.space is None:
                    continue
                r = ax.space
                first.setdefault(r, i)
                if reg.creates:
                    creator.setdefault(r, reg.module)
                if roots.count(r) > 1:
                    sp.freeze(r, f"one unit indexes a diagonal of {reg.module}.{reg.param} at node '{reg.node}'")
                    continue
                try:
                    maps = member_maps(t, k)
                except CouplingError as e:
                    sp.freeze(r, f"{e} for {reg.module}.{reg.param} at node '{reg.node}'")
                    maps = []
                lst = members.setdefault(r, [])
                for off, us, block, inner in maps:
                    m = Member(reg.module, reg.param, reg.dim, reg.role, off, block,
                               None if us == block else us, inner, layout_size(reg.layout))
                    if m not in lst:
                        lst.append(m)

    order = sorted(members, key=lambda r: first[r])
    names: dict[int, str] = {}
    used: dict[str, int] = {}
    groups: list[Group] = []
    for r in order:
        ms = members[r]
        prods = [m for m in ms if m.role == "producer"]
        if r in heads:
            base = heads[r] or (prods[0].module.rpartition(".")[0] if prods else ms[0].module.rpartition(".")[0])
            name = f"{base}:heads"
        elif r in creator:
            name = f"{creator[r]}:out"
        elif sp.origin[r]:
            origin = sp.origin[r] or ""
            name = origin if ":" in origin else f"{origin}:out"
        else:
            name = f"{ms[0].module or ms[0].param}:in"
        if sp.has_flag(r, "group_factor"):  # the groups of a grouped conv / GroupNorm: ':out' names the rest
            name = f"{name}:groups"
        used[name] = used.get(name, 0) + 1
        if used[name] > 1:
            name = f"{name}#{used[name]}"
        names[r] = name
        width = max((m.block for m in prods), default=1)
        reason = sp.frozen.get(r, "")
        groups.append(Group(name, sp.size[r], ms, width, not reason, reason))

    # the networkx view: one node per fx node, and which groups its output carries
    g_nx = nx.DiGraph()
    by_root = {r: g for r, g in zip(order, groups, strict=False)}
    for node in gm.graph.nodes:
        mod = str(node.target) if node.op == "call_module" else None
        g_nx.add_node(node.name, op=node.op, target=_target_name(node, gm), module=mod,
                      shape=_plain_shape(shapes.get(node.name)))
        for a in node.all_input_nodes:
            g_nx.add_edge(a.name, node.name)
        for r in _roots(c, c.info.get(node.name)):
            if r in by_root and node.name not in by_root[r].nodes:
                by_root[r].nodes.append(node.name)

    cost_model = _cost_model(model, c, names, by_root)
    return DependencyGraph(g_nx, gm, groups, example_inputs, cost_model, dict(c.notes))


def _target_name(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op in ("call_function", "call_method", "call_module"):
        return op_name(node, gm.get_submodule(node.target) if node.op == "call_module" else None)
    return str(node.target)


def _plain_shape(s: Any) -> Any:
    if isinstance(s, torch.Size):
        return tuple(s)
    if isinstance(s, tuple):
        return tuple(_plain_shape(i) for i in s)
    return None


def _roots(c: Coupler, info: Info) -> list[int]:
    out: list[int] = []
    if isinstance(info, list):
        for d in info:
            if isinstance(d, Opaque):
                continue
            try:
                out.extend(a.space for t in c.sp.expand(d) for a in t.axes if a.space is not None)
            except CouplingError:
                pass
    elif isinstance(info, tuple):
        for i in info:
            out.extend(_roots(c, i))
    return out


def _cost_model(model: nn.Module, c: Coupler, names: dict[int, str], by_root: dict[int, Group]) -> CostModel:
    sp = c.sp

    def size_poly(f: Any) -> Poly:
        if isinstance(f, int):
            return {(): float(f)}
        total: Poly = {}
        lay: Layout = sp.expand(f)
        for t in lay:
            term: Poly = {(): 1.0}
            for a in t.axes:
                if a.space is not None and a.space in names:
                    term = _mul(term, {(names[a.space],): 1.0})
                else:
                    term = _mul(term, {(): float(a.size)})
            total = _add(total, term)
        return total

    params: Poly = {}
    for _, p in model.named_parameters():
        term: Poly = {(): 1.0}
        for d in range(p.dim()):
            lay = c.first_reg.get((id(p), d))
            try:
                term = _mul(term, size_poly(lay if lay is not None else int(p.shape[d])))
            except CouplingError:
                term = _mul(term, {(): float(p.shape[d])})
        params = _add(params, term)
    flops: Poly = {(): c.flop_const}
    for ft in c.flop_terms:
        term = {(): float(ft.coef)}
        for f in ft.factors:
            term = _mul(term, size_poly(f))
        flops = _add(flops, term)

    sizes = {g.name: g.size for g in by_root.values()}
    frozen = {g.name for g in by_root.values() if not g.prunable}
    group_of = {g.name: g for g in by_root.values()}

    def reduce(poly: Poly) -> Poly:
        out: Poly = {}
        for mono, coef in poly.items():
            vars_ = list(mono)
            while len(vars_) > 2:
                victim = next((v for v in vars_ if v in frozen), None)
                if victim is None:
                    victim = vars_[-1]
                    g = group_of[victim]
                    g.prunable, g.reason = False, f"cost term {'*'.join(mono)} has degree > 2"
                    frozen.add(victim)
                vars_.remove(victim)
                coef *= sizes[victim]
            key = tuple(sorted(vars_))
            out[key] = out.get(key, 0.0) + coef
        return out

    def to_polynomial(poly: Poly) -> Polynomial:
        poly = reduce(poly)
        const = 0.0
        lin: dict[str, float] = {}
        bil: dict[tuple[str, str], float] = {}
        for mono, coef in poly.items():
            if coef == 0:
                continue
            if len(mono) == 0:
                const += coef
            elif len(mono) == 1:
                lin[mono[0]] = lin.get(mono[0], 0.0) + coef
            else:
                bil[(mono[0], mono[1])] = bil.get((mono[0], mono[1]), 0.0) + coef
        return Polynomial(const, lin, bil)

    pp, fp = to_polynomial(params), to_polynomial(flops)
    return CostModel(pp, fp, sizes)


def dense_counts(model: nn.Module, example_inputs: Any) -> Cost:
    """Independent truth: parameter count and FlopCounterMode FLOPs of ``model`` as it is."""
    _arguments(model, example_inputs)  # the same checks build makes
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with FlopCounterMode(display=False) as fc:
            forward_batch(model, example_inputs)  # the user's arguments only: defaults stay the model's
    finally:
        for m, mode in modes:
            m.training = mode
    return Cost(params=float(sum(p.numel() for p in model.parameters())), flops=float(fc.get_total_flops()))


__all__ = ["DependencyGraph", "build", "dense_counts"]
