"""Trace what torch.fx cannot: ``torch.export``, rewritten into the graph symbolic_trace would give.

HuggingFace ``transformers`` models (BERT, GPT-2, ViT...) build masks and shapes with Python
logic that ``torch.fx.symbolic_trace`` cannot follow, and transformers 5 no longer ships an fx
tracer of its own. ``torch.export`` traces them, but at the ATen level: every parameter is a graph
input and every layer is inlined. The coupling rules read torch-level graphs (``call_module`` of
leaf layers, ``F.linear``, ``x.view(...)``), so this module rewrites the exported graph into one:

* parameter and buffer inputs become ``get_attr`` nodes that name the model's own tensors;
* each call of a leaf layer (Linear, Conv, norms, Embedding, activations, pooling...) whose nodes
  take one tensor in and give one tensor out becomes ``call_module`` of that layer, as
  symbolic_trace leaves it: statistics hooks and apply see the real module;
* other ATen ops become the torch function or method that computes the same thing
  (``aten.view`` -> ``x.view(size)``, ``aten.sym_size`` -> ``x.size(d)``); an op with no such
  twin stays an ATen call, which the coupling rules treat as unknown (its channels freeze).

A forward with a ``use_cache`` argument the caller left out (transformers decoders) is traced with
``use_cache=False``: the cache object is an output export cannot flatten, and the graph is only
read for its layers. The batch and sequence dims are exported as dynamic (``Dim.AUTO``), so the
graph runs on calibration batches of other sizes (an image's height and width stay fixed). The
rewritten graph is checked against the model's own output on the example inputs; a mismatch is a
:class:`~secateurs.errors.TraceError`.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from secateurs.conv1d import is_conv1d
from secateurs.errors import TraceError, first_line
from secateurs.graph.fixed_sizes import EXPORTED

aten = torch.ops.aten

#: Layers that take one tensor and return one: each call is collapsed back into ``call_module``
#: (so is transformers' Conv1D, recognised by :func:`~secateurs.conv1d.is_conv1d`).
LEAF_LAYERS: tuple[type, ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.PReLU, nn.Flatten, nn.Unflatten,
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Mish, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d,
)

Call = tuple[str, Any, tuple[Any, ...], dict[str, Any]]  # (fx op, target, args, kwargs)


def _function(fn: Callable[..., Any]) -> Callable[[tuple[Any, ...], dict[str, Any]], Call]:
    """An ATen op whose schema lists the same arguments in the same order as ``fn``."""
    return lambda a, k: ("call_function", fn, a, k)


def _method(name: str, keep: int | None = None) -> Callable[[tuple[Any, ...], dict[str, Any]], Call]:
    """An ATen op that is the tensor method ``name`` (its first ``keep`` arguments, all by default)."""
    return lambda a, k: ("call_method", name, a if keep is None else a[:keep], k if keep is None else {})


def _to(a: tuple[Any, ...], k: dict[str, Any]) -> Call:
    """``aten.to`` / ``aten._to_copy``: a dtype or device change, as ``x.to(...)``."""
    kwargs = {n: k[n] for n in ("dtype", "device") if k.get(n) is not None}
    return "call_method", "to", a[:3] if len(a) > 1 else a[:1], kwargs


def _index_prefix(x: fx.Node, dim: int) -> tuple[slice, ...]:
    """``[:, :, ...`` up to ``dim`` (negative dims count from the end of ``x``'s rank)."""
    return (slice(None),) * (dim % x.meta["val"].dim())


def _slice(a: tuple[Any, ...], k: dict[str, Any]) -> Call:
    """``aten.slice(x, dim, start, end, step)`` as ``x[:, ..., start:end:step]``."""
    x, dim, start, end, step = (list(a) + [None, 0, None, None, 1][len(a):])[:5]
    end = None if isinstance(end, int) and end >= 2**62 else end  # aten writes "to the end" as INT64_MAX
    return "call_function", operator.getitem, (x, (*_index_prefix(x, dim), slice(start or None, end, step))), {}


def _select(a: tuple[Any, ...], k: dict[str, Any]) -> Call:
    """``aten.select(x, dim, index)`` as ``x[:, ..., index]``."""
    x, dim, index = a
    return "call_function", operator.getitem, (x, (*_index_prefix(x, dim), index)), {}


def _index(a: tuple[Any, ...], k: dict[str, Any]) -> Call:
    """``aten.index(x, [None, idx])`` (advanced indexing) as ``x[:, idx]``."""
    x, indices = a
    return "call_function", operator.getitem, (x, tuple(slice(None) if i is None else i for i in indices)), {}


def _layer_norm(a: tuple[Any, ...], k: dict[str, Any]) -> Call:
    return "call_function", F.layer_norm, a[:5], {}  # drops cudnn_enable


def _batch_norm(a: tuple[Any, ...], k: dict[str, Any]) -> Call:
    x, w, b, mean, var, training, momentum, eps = a[:8]
    return "call_function", F.batch_norm, (x, mean, var, w, b, training, momentum, eps), {}


def _softmax(a: tuple[Any, ...], k: dict[str, Any]) -> Call:
    return "call_function", torch.softmax, a[:2], {}  # drops half_to_float


def _pad(a: tuple[Any, ...], k: dict[str, Any]) -> Call:
    return "call_function", F.pad, a[:2], {"value": a[2]} if len(a) > 2 else {}


_SAME_ARGUMENTS: dict[Any, Callable[..., Any]] = {
    aten.add: torch.add, aten.sub: torch.sub, aten.mul: torch.mul, aten.div: torch.div, aten.pow: torch.pow,
    aten.neg: torch.neg, aten.abs: torch.abs, aten.exp: torch.exp, aten.log: torch.log, aten.sqrt: torch.sqrt,
    aten.rsqrt: torch.rsqrt, aten.erf: torch.erf, aten.sin: torch.sin, aten.cos: torch.cos,
    aten.square: torch.square, aten.relu: torch.relu, aten.sigmoid: torch.sigmoid, aten.tanh: torch.tanh,
    aten.clamp: torch.clamp, aten.clamp_min: torch.clamp_min, aten.clamp_max: torch.clamp_max,
    aten.where: torch.where, aten.maximum: torch.maximum, aten.minimum: torch.minimum,
    aten.masked_fill: torch.masked_fill, aten.softmax: torch.softmax, aten.log_softmax: torch.log_softmax,
    aten.gelu: F.gelu, aten.silu: F.silu, aten.hardtanh: F.hardtanh, aten.leaky_relu: F.leaky_relu,
    aten.hardswish: F.hardswish, aten.hardsigmoid: F.hardsigmoid, aten.mish: F.mish, aten.elu: F.elu,
    aten.dropout: F.dropout,
    aten.mean: torch.mean, aten.sum: torch.sum, aten.amax: torch.amax, aten.amin: torch.amin,
    aten.var: torch.var, aten.std: torch.std, aten.linalg_vector_norm: torch.linalg.vector_norm,
    aten.reshape: torch.reshape, aten.flatten: torch.flatten, aten.unflatten: torch.unflatten,
    aten.squeeze: torch.squeeze, aten.unsqueeze: torch.unsqueeze, aten.permute: torch.permute,
    aten.transpose: torch.transpose, aten.t: torch.t, aten.movedim: torch.movedim,
    aten.cat: torch.cat, aten.stack: torch.stack, aten.gather: torch.gather,
    aten.split: torch.split, aten.split_with_sizes: torch.split,
    aten.chunk: torch.chunk, aten.unbind: torch.unbind,
    aten.matmul: torch.matmul, aten.bmm: torch.bmm, aten.mm: torch.mm, aten.linear: F.linear,
    aten.scaled_dot_product_attention: F.scaled_dot_product_attention,
    aten.max_pool1d: F.max_pool1d, aten.max_pool2d: F.max_pool2d, aten.max_pool3d: F.max_pool3d,
    aten.avg_pool1d: F.avg_pool1d, aten.avg_pool2d: F.avg_pool2d, aten.avg_pool3d: F.avg_pool3d,
    aten.adaptive_avg_pool1d: F.adaptive_avg_pool1d, aten.adaptive_avg_pool2d: F.adaptive_avg_pool2d,
    aten.pad: F.pad, aten.roll: torch.roll,
}

_TWINS: dict[Any, Callable[[tuple[Any, ...], dict[str, Any]], Call]] = {
    **{op: _function(fn) for op, fn in _SAME_ARGUMENTS.items()},
    aten.view: _method("view"), aten._unsafe_view: _method("view"), aten.expand: _method("expand", 2),
    aten.expand_as: _method("expand_as"),
    aten.sym_size: _method("size"), aten.contiguous: _method("contiguous", 1), aten.clone: _method("clone", 1),
    aten.detach: _method("detach"), aten.to: _to, aten._to_copy: _to,
    aten.slice: _slice, aten.select: _select, aten.index: _index, aten.layer_norm: _layer_norm, aten.batch_norm: _batch_norm,
    aten._softmax: _softmax, aten.constant_pad_nd: _pad,
    # in place (``x += residual``): the tensor methods of the same name
    **{getattr(aten, name): _method(name) for name in ("add_", "sub_", "mul_", "div_", "relu_", "clamp_", "sigmoid_",
                                                       "tanh_", "exp_")},
}

_DROPPED = {aten._assert_tensor_metadata, aten._assert_scalar, aten.sym_constrain_range_for_size}


def _is_tensor(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), torch.Tensor)


def _leaf(module: nn.Module) -> bool:
    """A layer the coupling rules know as a whole. As symbolic_trace does, only torch.nn's own classes:
    a subclass defined elsewhere may override forward (transformers' ConvNextLayerNorm normalises
    dim 1 of NCHW), so its ops are kept and read one by one."""
    if is_conv1d(module):
        return True
    own = type(module).__module__.startswith(("torch.nn.", "torch.ao.nn."))
    return own and isinstance(module, LEAF_LAYERS) and not any(True for _ in module.children())


def _layer_calls(graph: fx.Graph, model: nn.Module,
                 owner: dict[str, int]) -> tuple[dict[fx.Node, tuple[str, fx.Node]], set[fx.Node]]:
    """Each collapsible leaf-layer call, as the node that gives its output -> (module path, tensor
    input), and the call's other nodes (dropped: the ``call_module`` computes them).

    ``owner`` maps placeholder names to the id of the module-parameter they are. A call is the run
    of nodes tagged with the same nn_module_stack entry (``@1`` tags a second call); it collapses
    when it reads exactly one tensor from outside (besides its own parameters) and exactly one of
    its tensors is used outside.
    """
    runs: dict[str, list[fx.Node]] = {}
    paths: dict[str, str] = {}
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if node.op != "call_function" or not stack:
            continue
        key, (path, _) = next(reversed(stack.items()))
        runs.setdefault(key, []).append(node)
        paths[key] = path
    calls: dict[fx.Node, tuple[str, fx.Node]] = {}
    inner: set[fx.Node] = set()
    for key, nodes in runs.items():
        try:
            module = model.get_submodule(paths[key])
        except AttributeError:
            continue
        if not _leaf(module):
            continue
        own = {id(t) for t in [*module.parameters(), *module.buffers()]}
        inside = set(nodes)
        inputs = {a for n in nodes for a in n.all_input_nodes
                  if a not in inside and _is_tensor(a) and owner.get(a.name) not in own}
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(inputs) == 1 and len(outputs) == 1 and _is_tensor(outputs[0]):
            calls[outputs[0]] = (paths[key], inputs.pop())
            inner |= inside - {outputs[0]}
    return calls, inner


def _rewrite(ep: torch.export.ExportedProgram, model: nn.Module, names: list[str]) -> fx.GraphModule:
    """The torch-level graph of ``ep``, taking one input per name in ``names`` (the forward's)."""
    sig = ep.graph_signature
    tensors: dict[str, Any] = {}  # get_attr target -> object, for the GraphModule's root
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    owner = {name: id(named[path]) for name, path in fqn.items() if path in named}
    old = ep.graph_module.graph
    calls, skip = _layer_calls(old, model, owner)
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = {name: g.placeholder(name) for name in names}

    def arg(a: Any) -> Any:
        return fx.map_arg(a, lambda n: env[n])

    for node in old.nodes:
        if node in skip:
            continue
        if node.op == "placeholder":
            if node.name in fqn:
                path = fqn[node.name]
                tensors[path] = named.get(path, ep.state_dict.get(path, ep.constants.get(path)))
                env[node] = g.get_attr(path)
            elif node.name in sig.inputs_to_lifted_tensor_constants:
                const = sig.inputs_to_lifted_tensor_constants[node.name]
                target = f"_lifted_tensor_constant_{len(tensors)}"
                tensors[target] = ep.constants[const]
                env[node] = g.get_attr(target)
            elif node.name in inputs:
                env[node] = inputs[node.name]
            else:
                raise TraceError(f"torch.export gave input {node.name!r} that is not an argument of "
                                 f"{type(model).__name__}.forward (pass each input as its own tensor)")
        elif node.op == "output":
            g.output(arg(node.args[0]))
            continue
        elif node.op == "get_attr":  # a higher-order op's body (autocast, set_grad_enabled regions)
            tensors[str(node.target)] = getattr(ep.graph_module, str(node.target))
            env[node] = g.node_copy(node, lambda n: env[n])
        elif node in calls:
            path, x = calls[node]
            tensors[path] = model.get_submodule(path)
            env[node] = g.call_module(path, (env[x],))
        elif node.op == "call_function" and getattr(node.target, "overloadpacket", None) in _DROPPED:
            continue
        elif node.op == "call_function" and getattr(node.target, "overloadpacket", None) in _TWINS:
            op, target, a, k = _TWINS[node.target.overloadpacket](tuple(node.args), dict(node.kwargs))
            env[node] = g.create_node(op, target, arg(a), arg(k))
        else:
            env[node] = g.node_copy(node, lambda n: env[n])
        env[node].meta = dict(node.meta)
    for n in [n for n in g.nodes if n.op == "get_attr" and not n.users]:
        g.erase_node(n)  # the parameters of collapsed layers: only their call_module reads them
    g.lint()
    used = {str(n.target) for n in g.nodes if n.op in ("get_attr", "call_module")}
    gm = fx.GraphModule({t: v for t, v in tensors.items() if t in used}, g, type(model).__name__)
    setattr(gm, EXPORTED, True)
    return gm


def _dynamic(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Dims export may keep symbolic (Dim.AUTO; it makes static what the model pins): the batch, and
    every dim of token ids, masks and sequences (rank <= 3), whose length calibration varies. An
    image's height and width stay as given: symbolic sizes through window padding cost Swin 40-110 s
    of export, and calibration images share one size."""
    def dims(v: torch.Tensor) -> dict[int, Any]:
        every = not v.is_floating_point() or v.dim() <= 3
        return {d: Dim.AUTO for d in range(v.dim() if every else min(v.dim(), 1))}

    return {name: dims(v) if isinstance(v, torch.Tensor) else None for name, v in kwargs.items()}


def export_trace(model: nn.Module, values: list[Any], concrete: dict[str, Any]) -> fx.GraphModule:
    """``torch.export`` ``model`` and rewrite the graph to the torch level.

    ``values`` holds one value per forward parameter, in order (as fx's traced module takes them),
    ``concrete`` the defaulted ones, which are not passed to the model. The model is exported in
    eval mode and left as it was; TraceError if export fails or the rewritten graph does not
    compute what the model does on ``values``.
    """
    names = [n for n, p in inspect.signature(model.forward).parameters.items()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    kwargs = {n: v for n, v in zip(names, values, strict=True) if n not in concrete}
    if "use_cache" in concrete and concrete["use_cache"] is not False:
        kwargs["use_cache"] = False  # a transformers KV cache is an output object export cannot flatten
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        try:
            ep = torch.export.export(model, (), kwargs, dynamic_shapes=_dynamic(kwargs), strict=False)
        except Exception as e:  # export raises many kinds; all mean the same to the caller
            reason = first_line(e)
            raise TraceError(f"torch.export cannot trace {type(model).__name__} either: {reason}") from e
        gm = _rewrite(ep, model, names)
        with torch.no_grad():
            expected = [v for v in pytree.tree_leaves(model(**kwargs)) if isinstance(v, torch.Tensor)]
            got = [v for v in pytree.tree_leaves(gm(*values)) if isinstance(v, torch.Tensor)]
    finally:
        for m, mode in modes:
            m.training = mode
    if len(got) != len(expected) or not all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
        for a, b in zip(got, expected, strict=False)
    ):
        raise TraceError(f"the graph torch.export gave for {type(model).__name__} does not reproduce its outputs "
                         "after secateurs rewrote it; please report this model")
    return gm


__all__ = ["LEAF_LAYERS", "export_trace"]
