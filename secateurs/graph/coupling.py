"""Coupling rules: walk the traced graph and say how each op ties its inputs' channel spaces.

One rule per op family. A rule reads the :data:`~secateurs.graph.spaces.DimInfo` of its inputs,
registers the parameters it touches (which dim of which tensor each space indexes, and whether
the layer produces, consumes or passes it through), records the FLOPs it performs as a product of
dimension sizes, and returns the DimInfo of its output. An op without a rule freezes every space
it touches (or raises in strict mode): what we do not understand, we do not prune.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from math import prod
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.operator_schemas import get_signature_for_torch_op

from secateurs.conv1d import is_conv1d
from secateurs.errors import UnsupportedOpError
from secateurs.graph.fixed_sizes import FixedSize, FixedSizeRecorder, enclosing_module
from secateurs.graph.groups import Role
from secateurs.graph.spaces import (
    Axis,
    CouplingError,
    DimInfo,
    Layout,
    Opaque,
    Spaces,
    Term,
    const_layout,
    has_tensor,
    is_tensor_info,
    layout_size,
    layout_spaces,
    merge_infos,
    space_layout,
)

Info = Any  # list[DimInfo] for a tensor, tuple of Info for a tuple, None otherwise
Factor = Any  # int | Layout: one dimension size in a FLOPs product


@dataclass
class Registration:
    """``module.param`` has dim ``dim`` laid out as ``layout``; one Member per atomic space."""

    module: str
    param: str
    dim: int
    role: Role
    layout: Layout
    key: int
    node: str
    creates: bool = False  # this use creates the space (layer outputs, embedding features): names groups


@dataclass
class FlopTerm:
    """``coef * Π factors`` FLOPs at ``node``; a factor is a constant or a dim's layout."""

    node: str
    coef: float
    factors: list[Factor]


_ELEMENTWISE_FN: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.neg, operator.pos, operator.iadd, operator.imul, operator.isub, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.where, torch.maximum,
    torch.minimum, torch.pow, torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.neg,
    torch.abs, torch.sqrt, torch.rsqrt, torch.clamp, torch.clip, torch.square, torch.erf, torch.sin,
    torch.cos, torch.softmax, torch.log_softmax, torch.clamp_min, torch.clamp_max, torch.zeros_like,
    torch.ones_like, torch.rand_like,
    torch.randn_like, torch.full_like, torch.masked_fill, torch.lerp, torch.addcmul,
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.selu, F.celu, F.mish,
    F.softplus, F.hardswish, F.hardsigmoid, F.hardtanh, F.softmax, F.log_softmax, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.normalize, F.glu,
}
_ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "truediv", "pow", "neg", "relu", "sigmoid", "tanh", "exp", "log",
    "abs", "sqrt", "rsqrt", "clamp", "clip", "square", "erf", "sin", "cos", "softmax", "log_softmax",
    "masked_fill", "add_", "mul_", "sub_", "div_", "relu_", "clamp_", "maximum", "minimum", "where",
    "lerp", "addcmul", "sigmoid_", "tanh_", "exp_", "clamp_min", "clamp_max",
}
_FIRST_ARG_METHODS = {
    "contiguous", "float", "double", "half", "bfloat16", "to", "type", "type_as", "clone", "detach",
    "requires_grad_", "cpu", "cuda",
}
_REDUCE_FN = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp, torch.norm,
              torch.linalg.vector_norm}
_NORMS = {torch.norm, "norm", torch.linalg.vector_norm}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm", "max", "min", "prod"}
_RESHAPE_FN = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, torch.mm}
_POOL_FN = {
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.upsample, F.pad,
}
#: Functions fx keeps whole (``torch.fx.wrap``) that pass channels through unchanged: torchvision's
#: stochastic depth scales whole samples (identity in eval), on every residual of EfficientNet/ConvNeXt/Swin.
_CHANNEL_PRESERVING_FUNCTIONS = {"torchvision.ops.stochastic_depth.stochastic_depth"}
_NON_TENSOR_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "item", "tolist", "__len__"}

_IDENTITY_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Mish, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax,
    nn.Softmax2d,
)
_POOL_MODULES: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d,
)
_NORM_MODULES: tuple[type, ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)

_NAMES: dict[int, str] = {}


def op_name(node: fx.Node, module: nn.Module | None = None) -> str:
    """A readable name for the op at ``node`` (``torch.fft.fft``, ``Tensor.roll``, ``nn.Bilinear``)."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        cls = type(module)
        prefix = "nn." if cls.__module__.startswith("torch.nn") else f"{cls.__module__}."
        return prefix + cls.__qualname__
    if not _NAMES:
        import torch.fft
        import torch.linalg
        import torch.special

        spaces = [("operator", operator), ("torch", torch), ("torch.fft", torch.fft), ("torch.linalg", torch.linalg),
                  ("torch.special", torch.special), ("torch.nn.functional", F)]
        for ns_name, ns in spaces:
            for attr, val in vars(ns).items():
                if callable(val) and not attr.startswith("_"):
                    _NAMES.setdefault(id(val), f"{ns_name}.{attr}")
    target = node.target
    if id(target) in _NAMES:
        return _NAMES[id(target)]
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__name__', str(target))}"


class Coupler(FixedSizeRecorder):
    """Runs the coupling rules over ``gm`` in topological order (see module docstring)."""

    def __init__(self, gm: fx.GraphModule, shapes: dict[str, Any], flops: dict[str, int], strict: bool,
                 tensors: set[str]) -> None:
        self.gm = gm
        self.tensors = tensors  # the user's parameters and buffers; gm also holds plain tensors and fx's constants
        self.shapes = shapes
        self.measured = flops
        self.strict = strict
        self.sp = Spaces()
        self.info: dict[str, Info] = {}
        self.regs: list[Registration] = []
        self.first_reg: dict[tuple[int, int], Layout] = {}
        self.flop_terms: list[FlopTerm] = []
        self.flop_const = 0.0
        self.params = {id(p): n for n, p in gm.named_parameters()}
        self.buffers = {id(b): n for n, b in gm.named_buffers()}
        self.notes: dict[str, str] = {}  # node -> why its FLOPs are a constant
        self.mha_heads: dict[int, str] = {}  # space -> MHA module path
        self.fixed: list[FixedSize] = []  # target sizes written in the model's code (see FixedSize)

    # -- helpers ------------------------------------------------------------------------

    def _val(self, arg: Any, table: dict[str, Any]) -> Any:
        if isinstance(arg, fx.Node):
            return table.get(arg.name)
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._val(a, table) for a in arg)
        return None

    def inf(self, arg: Any) -> Info:
        return self._val(arg, self.info)

    def shp(self, arg: Any) -> Any:
        return self._val(arg, self.shapes)

    def freeze(self, info: Any, reason: str) -> None:
        """Freeze every space reachable in ``info`` (a DimInfo, or any nesting of them)."""
        if info is None or isinstance(info, Opaque):
            return
        if isinstance(info, tuple) and info and isinstance(info[0], Term):
            for s in layout_spaces(info):
                self.sp.freeze(s, reason)
            return
        if isinstance(info, (list, tuple)):
            for i in info:
                self.freeze(i, reason)

    def as_layout(self, info: DimInfo, size: int, node: fx.Node) -> Layout:
        """The layout of a dim a layer indexes; a structureless dim becomes a frozen space."""
        if not isinstance(info, Opaque):
            return info
        reason = info.reason or f"channels without structure at node '{node.name}'"
        return space_layout(self.sp.new(size, None, frozen=reason), size)

    def tie(self, a: DimInfo, b: DimInfo, node: fx.Node) -> DimInfo:
        """Couple two dims that must be pruned identically; returns the tied dim's info."""
        if a == b:
            return a
        if isinstance(a, Opaque) or isinstance(b, Opaque):
            op_ = a if isinstance(a, Opaque) else b
            other = b if op_ is a else a
            reason = op_.reason or f"meets a dim without channel structure at node '{node.name}'"
            if not isinstance(other, Opaque):
                self.freeze([other], reason)
                return Opaque(reason)
            return a if a.reason else b
        try:
            if self._tie_layouts(a, b, node):
                return a
        except CouplingError:
            pass
        reason = f"channel maps do not match at node '{node.name}'"
        self.freeze([a, b], reason)
        return Opaque(reason)

    def _tie_layouts(self, a: Layout, b: Layout, node: fx.Node) -> bool:
        A, B = self.sp.expand(a), self.sp.expand(b)
        if self._same_shape(A, B):
            for ta, tb in zip(A, B, strict=False):
                for xa, xb in zip(ta.axes, tb.axes, strict=False):
                    if xa.space is not None:
                        self.sp.union(xa.space, xb.space, node.name)  # type: ignore[arg-type]
            return True
        for P, O in ((A, B), (B, A)):
            if len(P) == 1 and len(P[0].axes) == 1 and P[0].axes[0].space is not None and P[0].axes[0].stride == 1:
                return self._refine(P[0].axes[0].space, O, node)
        return False

    @staticmethod
    def _same_shape(A: Layout, B: Layout) -> bool:
        if len(A) != len(B):
            return False
        for ta, tb in zip(A, B, strict=False):
            if ta.offset != tb.offset or len(ta.axes) != len(tb.axes):
                return False
            for xa, xb in zip(ta.axes, tb.axes, strict=False):
                if xa.size != xb.size or xa.stride != xb.stride or (xa.space is None) != (xb.space is None):
                    return False
        return True

    def _refine(self, s: int, other: Layout, node: fx.Node) -> bool:
        """Define plain space ``s`` as a sum or product so that it can tie with ``other``."""
        if not all(t.is_dense() for t in other):
            return False
        if len(other) > 1:
            sizes = tuple(t.numel() for t in other)
            parts = self.sp.define(s, "sum", sizes, node.name)
            for p, n, t in zip(parts, sizes, other, strict=False):
                shifted = (Term(0, t.axes),)
                if not self._tie_layouts(space_layout(p, n), shifted, node):
                    return False
            return True
        axes = other[0].axes
        if other[0].offset != 0 or len(axes) < 2:
            return False
        factors = self.sp.define(s, "prod", tuple(a.size for a in axes), node.name)
        for f, ax in zip(factors, axes, strict=False):
            if ax.space is None:
                self.sp.freeze(f, f"meets a dim without channel structure at node '{node.name}'")
            else:
                self.sp.union(f, ax.space, node.name)
        return True

    def register(self, node: fx.Node, module: str, param: str, dim: int, role: Role, layout: Layout,
                 creates: bool | None = None) -> None:
        """Record that ``module.param`` dim ``dim`` is laid out as ``layout`` (ties shared tensors)."""
        owner = self.gm.get_submodule(module) if module else self.gm
        tensor = getattr(owner, param, None)
        if not isinstance(tensor, torch.Tensor):
            return
        key = (id(tensor), dim)
        if key in self.first_reg:
            self.tie(self.first_reg[key], layout, node)
        else:
            self.first_reg[key] = layout
        creates = role == "producer" if creates is None else creates
        self.regs.append(Registration(module, param, dim, role, layout, id(tensor), node.name, creates))

    def factor(self, info: DimInfo, size: int) -> Factor:
        return size if isinstance(info, Opaque) else info

    def add_flops(self, node: fx.Node, coef: float, factors: Iterable[Factor], touched: Info = None) -> None:
        """Record a FLOPs term and check it against what FlopCounterMode counted for the node."""
        factors = list(factors)
        dense = coef * prod(f if isinstance(f, int) else layout_size(f) for f in factors)
        measured = self.measured.get(node.name, 0)
        if dense == measured:
            if dense:
                self.flop_terms.append(FlopTerm(node.name, coef, factors))
            return
        self.const_flops(node, touched, f"counted {measured}, modelled {dense:g}")

    def const_flops(self, node: fx.Node, touched: Info, why: str) -> None:
        measured = self.measured.get(node.name, 0)
        if not measured:
            return
        reason = f"FLOPs at node '{node.name}' not modelled ({why})"
        if self.strict:
            raise UnsupportedOpError(node.name, op_name(node, self._module(node)), reason)
        self.flop_const += measured
        self.notes[node.name] = reason
        self.freeze(touched, reason)

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]

    def unknown(self, node: fx.Node, why: str = "") -> Info:
        """Freeze everything an op without a rule touches; strict mode raises instead, unless the op
        touches no channels at all (``torch.arange``, ``torch.zeros``: nothing to freeze)."""
        name = op_name(node, self._module(node))
        inputs = [self.inf(a) for a in node.all_input_nodes]
        if self.strict and any(layout_spaces(d) for i in inputs if is_tensor_info(i) for d in i):
            raise UnsupportedOpError(node.name, name, why)
        reason = f"unsupported op {name!r} at node '{node.name}'" + (f" ({why})" if why else "")
        self.freeze(inputs, reason)
        self.flop_const += self.measured.get(node.name, 0)
        return self._opaque_like(self.shapes.get(node.name), reason)

    def _opaque_like(self, shape: Any, reason: str | None, keep_ones: bool = False) -> Info:
        if isinstance(shape, torch.Size):
            return [Opaque(reason if n > 1 or keep_ones else None) for n in shape]
        if isinstance(shape, (tuple, list)):
            return tuple(self._opaque_like(s, reason, keep_ones) for s in shape)
        return None

    # -- the walk -----------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            _positional(node)
            regs, terms, const = len(self.regs), len(self.flop_terms), self.flop_const
            try:
                self.info[node.name] = self.visit(node)
            except (IndexError, KeyError, TypeError, ValueError, AttributeError) as e:
                # a call the rule did not foresee (an unusual signature): undo its partial work and
                # treat the op as unknown, rather than failing the whole trace with a bare error
                del self.regs[regs:], self.flop_terms[terms:]
                self.flop_const = const
                self.info[node.name] = self.unknown(node, f"its coupling rule failed: {type(e).__name__}: {e}")

    def visit(self, node: fx.Node) -> Info:
        shape = self.shapes.get(node.name)
        if node.op == "placeholder":
            return self._opaque_like(shape, f"reaches model input '{node.name}'", keep_ones=True)
        if node.op == "get_attr":
            return self.get_attr(node, shape)
        if node.op == "output":
            self.freeze(self.inf(node.args[0]), f"reaches model output '{node.name}'")
            return None
        if node.op == "call_module":
            mod = self.gm.get_submodule(node.target)  # type: ignore[arg-type]
            return self.call_module(node, mod, shape)
        if not has_tensor(shape):
            return None  # sizes, dims, python scalars: no channels
        return self.call(node, shape)

    def get_attr(self, node: fx.Node, shape: Any) -> Info:
        if not isinstance(shape, torch.Size):
            return None
        path, _, name = str(node.target).rpartition(".")
        out: list[DimInfo] = []
        named = str(node.target) in self.tensors
        for d, n in enumerate(shape):
            if n == 1:
                out.append(Opaque(None))
                continue
            if not named:  # a plain tensor attribute or a constant fx folded: no plan can slice it
                reason = f"tensor constant '{node.target}' (not a parameter or buffer) at node '{node.name}'"
                out.append(space_layout(self.sp.new(n, str(node.target), frozen=reason), n))
                continue
            lay = space_layout(self.sp.new(n, str(node.target)), n)
            self.register(node, path, name, d, "passthrough", lay)
            out.append(lay)
        return out

    # -- modules --------------------------------------------------------------------------

    def call_module(self, node: fx.Node, mod: nn.Module, shape: Any) -> Info:
        path = str(node.target)
        x = self.inf(node.args[0]) if node.args else None
        xs = self.shp(node.args[0]) if node.args else None
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                            nn.ConvTranspose3d)) and is_tensor_info(x):
            return self.conv(node, path, mod, x, xs, shape)
        if isinstance(mod, nn.Linear) and is_tensor_info(x):
            return self.linear(node, path, mod.weight, mod.bias is not None, x, xs, shape, "weight", "bias")
        if is_conv1d(mod) and is_tensor_info(x):
            return self.linear(node, path, mod.weight, mod.bias is not None, x, xs, shape, "weight", "bias",
                               transposed=True)
        if isinstance(mod, nn.MultiheadAttention):
            return self.mha(node, path, mod, shape)
        if not is_tensor_info(x) and not isinstance(mod, nn.MultiheadAttention):
            return self.unknown(node, "input is not a tensor")
        if isinstance(mod, _NORM_MODULES):
            out = list(x)
            if len(xs) >= 2:
                lay = self.as_layout(x[1], xs[1], node)
                out[1] = lay
                for p in ("weight", "bias", "running_mean", "running_var"):
                    if getattr(mod, p, None) is not None:
                        self.register(node, path, p, 0, "passthrough", lay)
            self.const_flops(node, x, "normalisation")
            return out
        if isinstance(mod, nn.LayerNorm):
            out = list(x)
            if mod.elementwise_affine:
                k = len(mod.normalized_shape)
                for i in range(k):
                    d = len(xs) - k + i
                    lay = self.as_layout(x[d], xs[d], node)
                    out[d] = lay
                    for p in ("weight", "bias"):
                        if getattr(mod, p, None) is not None:
                            self.register(node, path, p, i, "passthrough", lay)
            return out
        if isinstance(mod, nn.GroupNorm):
            return self.group_norm(node, path, mod, x, xs)
        if isinstance(mod, nn.Embedding):
            e = self.sp.new(mod.embedding_dim, path)
            lay = space_layout(e, mod.embedding_dim)
            self.register(node, path, "weight", 1, "passthrough", lay, creates=True)
            vocab = self.sp.new(mod.num_embeddings, f"{path}:vocab", frozen=f"embedding rows are indexed by token ids at node "
                                                                  f"'{node.name}'")
            self.register(node, path, "weight", 0, "passthrough", space_layout(vocab, mod.num_embeddings))
            return list(x) + [lay]
        if isinstance(mod, nn.PReLU):
            out = list(x)
            if mod.num_parameters > 1 and len(xs) >= 2:
                out[1] = self.as_layout(x[1], xs[1], node)
                self.register(node, path, "weight", 0, "passthrough", out[1])
            return out
        if isinstance(mod, _IDENTITY_MODULES):
            return list(x)
        if isinstance(mod, _POOL_MODULES):
            return self.spatial_op(node, x, xs, shape, _last_dims(len(xs), _spatial_dims(mod)))
        if isinstance(mod, (nn.Flatten, nn.Unflatten)):
            return self.reshape(node, x, xs, shape)
        return self.unknown(node)

    def conv(self, node: fx.Node, path: str, mod: Any, x: list[DimInfo], xs: torch.Size, shape: torch.Size) -> Info:
        transposed = isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        nsp = len(mod.kernel_size)
        cdim = len(xs) - nsp - 1
        w_in, w_out = (0, 1) if transposed else (1, 0)
        g = mod.groups
        cin, cout = mod.in_channels, mod.out_channels
        out: list[DimInfo] = [x[d] for d in range(cdim)] + [Opaque(None)] * (nsp + 1)
        for d in range(cdim + 1, len(xs)):  # cutting a spatial "channel" would change the conv's output size
            if not isinstance(x[d], Opaque):
                self.freeze([x[d]], f"spatial dim of conv input at node '{node.name}'")
        if g == 1:
            lin = self.as_layout(x[cdim], cin, node)
            self.register(node, path, "weight", w_in, "consumer", lin)
            lout = space_layout(self.sp.new(cout, path), cout)
            self.register(node, path, "weight", w_out, "producer", lout)
            wf: list[Factor] = [lout, lin] if not transposed else [lin, lout]
        elif g == cin == cout:
            lin = self.as_layout(x[cdim], cin, node)
            self.register(node, path, "weight", 0, "passthrough", lin)
            lout = lin
            wf = [lin, 1]
        else:
            lout, wf = self.grouped_conv(node, path, g, cin, cout, x[cdim], transposed)
        if mod.bias is not None:
            self.register(node, path, "bias", 0, "passthrough", lout)
        out[cdim] = lout
        batch: Factor = 1 if cdim == 0 else self.factor(x[0], xs[0])
        spatial = xs[cdim + 1 :] if transposed else shape[cdim + 1 :]
        self.add_flops(node, 2 * prod(mod.kernel_size) * prod(spatial), [batch, *wf], [x, out])
        return out

    def grouped_conv(self, node: fx.Node, path: str, g: int, cin: int, cout: int, xin: DimInfo,
                     transposed: bool) -> tuple[Layout, list[Factor]]:
        """A grouped conv (1 < groups, not depthwise): channels = g ⊗ (c/g) on both sides (row-major).

        The weight's full dim (out channels; in channels when transposed) is indexed by the whole
        layout, its ``c/g`` dim by the within-group factor alone. The group factors stay whole
        (frozen) and are tied in to out: group i reads group i. The within-group factors are free:
        out's is a new space of this conv, nothing ties it to the input's (each output channel of a
        group reads every input channel of that group). Returns the output layout and the weight's
        FLOPs factors (within-group in x full out; full in x within-group out when transposed).
        """
        kept = f"grouped convolution (groups={g}) at node '{node.name}' keeps its groups whole"
        lin = self.as_layout(xin, cin, node)
        lout = space_layout(self.sp.new(cout, path), cout)
        g_out, j_out = self.split_info(lout, [g, cout // g], node)  # a fresh space always factors
        try:
            g_in, j_in = self.split_info(lin, [g, cin // g], node)
        except CouplingError as e:
            reason = f"grouped convolution (groups={g}) at node '{node.name}' cannot split its input channels ({e})"
            self.freeze([lin], reason)
            g_in = j_in = Opaque(reason)
        for part in (g_in, g_out):
            for s in layout_spaces(part):
                self.sp.flag(s, "group_factor")
        self.freeze([g_in, g_out], kept)
        if not isinstance(g_in, Opaque):
            self.tie(g_in, g_out, node)
        full, within, role = (lin, j_out, "producer") if transposed else (lout, j_in, "consumer")
        self.register(node, path, "weight", 0, "consumer" if transposed else "producer", full)
        if not isinstance(within, Opaque):  # c/g == 1 or an input that could not be split: a constant
            self.register(node, path, "weight", 1, role, within)
        width = (cout if transposed else cin) // g
        wf: list[Factor] = [full, self.factor(within, width)]
        return lout, wf

    def linear(self, node: fx.Node, path: str, weight: torch.Tensor, has_bias: bool, x: list[DimInfo],
               xs: torch.Size, shape: torch.Size, wname: str, bname: str, wlay: list[DimInfo] | None = None,
               transposed: bool = False) -> Info:
        """``x @ weight.T + bias``; ``transposed``: the weight is stored (in, out) (transformers' Conv1D)."""
        w_in, w_out = (0, 1) if transposed else (1, 0)
        n_in, n_out = weight.shape[w_in], weight.shape[w_out]
        if wlay is None:
            lin = self.as_layout(x[-1], n_in, node)
            self.register(node, path, wname, w_in, "consumer", lin)
            lout = space_layout(self.sp.new(n_out, path), n_out)
            self.register(node, path, wname, w_out, "producer", lout)
            if has_bias:
                self.register(node, path, bname, 0, "passthrough", lout)
        else:  # functional linear on get_attr weights: tie the weight's dims
            lin = self.as_layout(self.tie(x[-1], wlay[1], node), n_in, node)
            lout = self.as_layout(wlay[0], n_out, node)
        out = list(x[:-1]) + [lout]
        lead = [self.factor(i, n) for i, n in zip(x[:-1], xs[:-1], strict=False)]
        self.add_flops(node, 2, [*lead, lin, lout], [x, out])
        return out

    def group_norm(self, node: fx.Node, path: str, mod: nn.GroupNorm, x: list[DimInfo], xs: torch.Size) -> Info:
        out = list(x)
        g, c = mod.num_groups, mod.num_channels
        lay = self.as_layout(x[1], c, node)
        out[1] = lay
        if 1 < g < c:
            try:  # channels c = g ⊗ (c/g): only the within-group factor may shrink
                parts = self.split_info(lay, [g, c // g], node)
                for s in layout_spaces(parts[0]):
                    self.sp.flag(s, "group_factor")
                self.freeze([parts[0]], f"GroupNorm num_groups={g} at node '{node.name}' is kept whole")
            except CouplingError:
                self.freeze([lay], f"GroupNorm groups at node '{node.name}'")
        if mod.affine:
            self.register(node, path, "weight", 0, "passthrough", lay)
            self.register(node, path, "bias", 0, "passthrough", lay)
        return out

    def mha(self, node: fx.Node, path: str, mod: nn.MultiheadAttention, shape: Any) -> Info:
        """nn.MultiheadAttention: embed dims in/out are channel spaces, heads are their own space."""
        args = list(node.args) + [None] * 3
        q = args[0] if args[0] is not None else node.kwargs.get("query")
        k = args[1] if args[1] is not None else node.kwargs.get("key")
        v = args[2] if args[2] is not None else node.kwargs.get("value")
        if mod.bias_k is not None or mod.add_zero_attn:
            return self.unknown(node, "bias_k / bias_v or add_zero_attn are not modelled")
        qi, ki, vi = self.inf(q), self.inf(k), self.inf(v)
        qs, ks = self.shp(q), self.shp(k)
        if not (is_tensor_info(qi) and is_tensor_info(ki) and is_tensor_info(vi)):
            return self.unknown(node)
        e, h = mod.embed_dim, mod.num_heads
        hd = e // h
        heads = self.sp.new(h, path)
        self.mha_heads[heads] = path
        hl: Layout = tuple(Term(j * e, (Axis(heads, h, hd), Axis(None, hd, 1))) for j in range(3))
        if mod._qkv_same_embed_dim:  # one packed projection: q, k and v streams read the same columns
            emb = self.tie(self.tie(qi[-1], ki[-1], node), vi[-1], node)
            lin = lin_k = lin_v = self.as_layout(emb, e, node)
            self.register(node, path, "in_proj_weight", 1, "consumer", lin)
            self.register(node, path, "in_proj_weight", 0, "producer", hl)
        else:  # kdim / vdim: three projections, each on its own stream, rows the same heads
            lin = self.as_layout(qi[-1], e, node)
            lin_k = self.as_layout(ki[-1], mod.kdim, node)
            lin_v = self.as_layout(vi[-1], mod.vdim, node)
            for param, layout in (("q_proj_weight", lin), ("k_proj_weight", lin_k), ("v_proj_weight", lin_v)):
                self.register(node, path, param, 1, "consumer", layout)
                self.register(node, path, param, 0, "producer", hl[:1])
        if mod.in_proj_bias is not None:
            self.register(node, path, "in_proj_bias", 0, "passthrough", hl)
        self.register(node, f"{path}.out_proj", "weight", 1, "consumer", hl[:1])
        lout = space_layout(self.sp.new(e, f"{path}.out_proj"), e)
        self.register(node, f"{path}.out_proj", "weight", 0, "producer", lout)
        if mod.out_proj.bias is not None:
            self.register(node, f"{path}.out_proj", "bias", 0, "passthrough", lout)
        out_main = list(qi[:-1]) + [lout]
        weights_shape = shape[1] if isinstance(shape, tuple) else None
        out_w = self._opaque_like(weights_shape, None) if weights_shape is not None else None
        # FLOPs: in-projection (q from query, k/v from key/value), scores and mix, out-projection
        bf = mod.batch_first
        tq, tk = (qs[1], ks[1]) if bf and len(qs) == 3 else (qs[0], ks[0])
        nb = qs[0] if bf and len(qs) == 3 else (qs[1] if len(qs) == 3 else 1)
        hdf = hl[:1]
        lead_q = [self.factor(i, n) for i, n in zip(qi[:-1], qs[:-1], strict=False)]
        lead_k = [self.factor(i, n) for i, n in zip(ki[:-1], ks[:-1], strict=False)]
        base = [
            FlopTerm(node.name, 2, [*lead_q, lin, hdf]),
            FlopTerm(node.name, 2, [*lead_k, lin_k, hdf]),
            FlopTerm(node.name, 2, [*lead_k, lin_v, hdf]),
            FlopTerm(node.name, 2, [*lead_q, hdf, lout]),
        ]
        core = FlopTerm(node.name, 4 * nb * tq * tk, [hdf])
        self._check_alternatives(node, [base + [core], base], [qi, ki, vi, out_main])
        return (out_main, out_w)

    def _check_alternatives(self, node: fx.Node, options: list[list[FlopTerm]], touched: Info) -> None:
        """Keep the first set of FLOPs terms whose dense value matches the counted FLOPs."""
        measured = self.measured.get(node.name, 0)
        for terms in options:
            dense = sum(t.coef * prod(f if isinstance(f, int) else layout_size(f) for f in t.factors) for t in terms)
            if dense == measured:
                self.flop_terms.extend(terms)
                return
        self.const_flops(node, touched, f"counted {measured}")

    # -- functions and methods ---------------------------------------------------------------

    def call(self, node: fx.Node, shape: Any) -> Info:
        t = node.target
        m = node.op == "call_method"
        x0 = self.inf(node.args[0]) if node.args else None
        if not m and t is operator.getitem:
            return self.getitem(node, shape)
        if not m and t is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT") and is_tensor_info(x0):
            return list(reversed(x0)) if node.args[1] == "T" else [*x0[:-2], x0[-1], x0[-2]]  # .T / .mT
        if not m and f"{getattr(t, '__module__', '')}.{getattr(t, '__qualname__', '')}" in _CHANNEL_PRESERVING_FUNCTIONS:
            return list(x0) if is_tensor_info(x0) else self.unknown(node)
        if (m and t in _ELEMENTWISE_METHODS) or (not m and t in _ELEMENTWISE_FN):
            return self.broadcast(node, shape)
        if m and t in _FIRST_ARG_METHODS:
            return list(x0) if is_tensor_info(x0) else self.unknown(node)
        if (m and t in _RESHAPE_METHODS) or (not m and t in _RESHAPE_FN):
            return self.reshape(node, x0, self.shp(node.args[0]), shape)
        if (m and t in ("permute", "transpose", "t", "swapaxes", "movedim")) or (
            not m and t in (torch.permute, torch.transpose, torch.t, torch.swapaxes, torch.movedim)
        ):
            return self.permute(node, x0, shape)
        if (m and t in _REDUCE_METHODS) or (not m and t in _REDUCE_FN):
            return self.reduce(node, x0, self.shp(node.args[0]), shape)
        if not m and t in (torch.cat, torch.concat, torch.concatenate):
            return self.cat(node, shape)
        if not m and t is torch.stack:
            return self.stack(node, shape)
        if not m and t is torch.gather:
            return self.gather(node, shape)
        if (m and t in ("split", "chunk", "tensor_split", "unbind")) or (
            not m and t in (torch.split, torch.chunk, torch.unbind)
        ):
            return self.split(node, shape)
        if (m and t in ("matmul", "bmm", "mm")) or (not m and t in _MATMUL):
            return self.matmul(node, shape)
        if not m and t is F.linear:
            return self.functional_linear(node, shape)
        if not m and t is F.layer_norm:
            return self.functional_layer_norm(node, shape)
        if not m and t is F.batch_norm:
            return self.functional_batch_norm(node, shape)
        if not m and t is F.scaled_dot_product_attention:
            return self.sdpa(node, shape)
        if (not m and t in _POOL_FN) or (m and t in ("expand", "expand_as", "broadcast_to", "repeat")):
            if m:
                return self.expand(node, x0, self.shp(node.args[0]), shape)
            xs = self.shp(node.args[0])
            changed = _padded_dims(node, len(xs)) if t is F.pad else _last_dims(len(xs), len(xs) - 2)
            return self.spatial_op(node, x0, xs, shape, changed)
        if (m and t == "roll") or (not m and t is torch.roll):
            return self.spatial_op(node, x0, self.shp(node.args[0]), shape, _rolled_dims(node, len(shape)), "rolled")
        return self.unknown(node)

    def broadcast(self, node: fx.Node, shape: Any) -> Info:
        """Elementwise ops: dims aligned from the right are tied (size-1 dims broadcast)."""
        if not isinstance(shape, torch.Size):
            return self.unknown(node)
        ops = [a for a in [*node.args, *node.kwargs.values()] if isinstance(a, fx.Node)]
        ops = [a for a in ops if isinstance(self.shapes.get(a.name), torch.Size)]
        out: list[DimInfo] = []
        nd = len(shape)
        for k in range(nd):
            if shape[k] == 1:
                out.append(Opaque(None))
                continue
            cur: DimInfo | None = None
            for a in ops:
                s, i = self.shapes[a.name], self.info.get(a.name)
                d = k - (nd - len(s))
                if d < 0 or s[d] == 1 or not is_tensor_info(i):
                    continue
                cur = i[d] if cur is None else self.tie(cur, i[d], node)
            out.append(cur if cur is not None else Opaque(None))
        self.const_flops(node, [self.inf(a) for a in ops], "elementwise op counted")
        return out

    def reshape(self, node: fx.Node, x: Info, xs: Any, shape: Any) -> Info:
        """view/reshape/flatten: dims are matched by products; merged dims multiply, split dims factor."""
        if not is_tensor_info(x) or not isinstance(shape, torch.Size):
            return self.unknown(node)
        ii = [d for d, n in enumerate(xs) if n != 1]
        oo = [d for d, n in enumerate(shape) if n != 1]
        out: list[DimInfo] = [Opaque(None)] * len(shape)
        i = j = 0
        while i < len(ii) and j < len(oo):
            idims, odims = [ii[i]], [oo[j]]
            pi, pj = xs[ii[i]], shape[oo[j]]
            while pi != pj:
                if pi < pj:
                    i += 1
                    idims.append(ii[i])
                    pi *= xs[ii[i]]
                else:
                    j += 1
                    odims.append(oo[j])
                    pj *= shape[oo[j]]
            i += 1
            j += 1
            merged = x[idims[0]] if len(idims) == 1 else merge_infos([x[d] for d in idims], [xs[d] for d in idims])
            if len(odims) == 1:
                out[odims[0]] = merged
                continue
            try:
                parts = self.split_info(merged, [shape[d] for d in odims], node)
            except CouplingError as e:
                reason = f"reshape at node '{node.name}' cannot map channels ({e})"
                self.freeze([merged], reason)
                parts = [Opaque(reason)] * len(odims)
            for d, p in zip(odims, parts, strict=False):
                out[d] = p
        self._record_targets(node, out)
        return out

    def split_info(self, info: DimInfo, sizes: list[int], node: fx.Node) -> list[DimInfo]:
        """Split one dim into ``sizes`` (row-major), factoring spaces where a boundary cuts one."""
        if isinstance(info, Opaque):
            return [info] * len(sizes)
        lay = self.sp.expand(info)
        if len(lay) != 1 or lay[0].offset != 0 or not lay[0].is_dense():
            raise CouplingError("concatenated or strided channels")
        queue = [(a.space, a.size) for a in sorted(lay[0].axes, key=lambda a: -a.stride) if a.size > 1]
        result: list[DimInfo] = []
        for target in sizes:
            need, cur = target, []
            while need > 1:
                s, n = queue.pop(0)
                if n <= need:
                    if need % n:
                        raise CouplingError(f"size {n} does not divide {need}")
                    cur.append((s, n))
                    need //= n
                else:
                    if n % need:
                        raise CouplingError(f"size {need} does not divide {n}")
                    if s is None:
                        a, b = None, None
                    else:
                        a, b = self.sp.define(s, "prod", (need, n // need), node.name)
                    cur.append((a, need))
                    queue.insert(0, (b, n // need))
                    need = 1
            if all(s is None for s, _ in cur):
                result.append(Opaque(None))
                continue
            axes, stride = [], 1
            for s, n in reversed(cur):
                axes.insert(0, Axis(s, n, stride))
                stride *= n
            result.append((Term(0, tuple(axes)),))
        return result

    def permute(self, node: fx.Node, x: Info, shape: Any) -> Info:
        if not is_tensor_info(x):
            return self.unknown(node)
        nd = len(x)
        t = node.target
        rest = [a for a in node.args[1:]]
        if t in ("t", torch.t):
            order = list(range(nd))[::-1]
        elif t in ("transpose", "swapaxes", torch.transpose, torch.swapaxes):
            a0 = rest[0] if rest else node.kwargs.get("dim0", 0)
            a1 = rest[1] if len(rest) > 1 else node.kwargs.get("dim1", 1)
            a, b = a0 % nd, a1 % nd
            order = list(range(nd))
            order[a], order[b] = order[b], order[a]
        elif t in ("movedim", torch.movedim):
            src, dst = rest[0] % nd, rest[1] % nd
            order = list(range(nd))
            order.pop(src)
            order.insert(dst, src)
        else:
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            if not dims:
                dims = node.kwargs.get("dims", list(range(nd)))
            order = [d % nd for d in dims]
        return [x[d] for d in order]

    def reduce(self, node: fx.Node, x: Info, xs: Any, shape: Any) -> Info:
        if not is_tensor_info(x):
            return self.unknown(node)
        at = 2 if node.target in _NORMS else 1  # norms take the order (p) before the dims
        dims: Any = node.args[at] if len(node.args) > at else node.kwargs.get("dim", None)
        keep = node.kwargs.get("keepdim", node.args[at + 1] if len(node.args) > at + 1
                               and isinstance(node.args[at + 1], bool) else False)
        nd = len(xs)
        red = _dim_set(dims, nd)
        if red is None:
            return self.unknown(node)
        out = [Opaque(None) if d in red else x[d] for d in range(nd) if keep or d not in red]
        if isinstance(shape, tuple) and not isinstance(shape, torch.Size):
            return tuple(list(out) for _ in shape)
        return out

    def cat(self, node: fx.Node, shape: Any) -> Info:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        infos = [self.inf(a) for a in tensors]
        shapes = [self.shp(a) for a in tensors]
        if not all(is_tensor_info(i) for i in infos):
            return self.unknown(node)
        nd = len(shape)
        dim %= nd
        out: list[DimInfo] = []
        for d in range(nd):
            if d != dim:
                cur = infos[0][d]
                for i in infos[1:]:
                    cur = self.tie(cur, i[d], node) if shape[d] != 1 else cur
                out.append(cur)
                continue
            if any(isinstance(i[d], Opaque) and i[d].reason for i in infos):
                reason = next(i[d].reason for i in infos if isinstance(i[d], Opaque) and i[d].reason)
                self.freeze([i[d] for i in infos], reason)
                out.append(Opaque(reason))
                continue
            terms, off = [], 0
            for i, s in zip(infos, shapes, strict=False):
                lay = const_layout(s[d]) if isinstance(i[d], Opaque) else i[d]
                terms.extend(Term(t.offset + off, t.axes) for t in lay)
                off += s[d]
            out.append(tuple(terms) if any(a.space is not None for t in terms for a in t.axes) else Opaque(None))
        return out

    def stack(self, node: fx.Node, shape: Any) -> Info:
        tensors = node.args[0]
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(shape)
        infos = [self.inf(a) for a in tensors]
        if not all(is_tensor_info(i) for i in infos):
            return self.unknown(node)
        out = list(infos[0])
        for i in infos[1:]:
            out = [self.tie(a, b, node) for a, b in zip(out, i, strict=False)]
        out.insert(dim, Opaque(None))
        return out

    def gather(self, node: fx.Node, shape: Any) -> Info:
        """``torch.gather(x, dim, index)``: dim ``dim`` of ``x`` is read at run-time positions (frozen);
        every other dim is read position for position where index spans it whole, else frozen."""
        x, dim, index = node.args[0], node.args[1], node.args[2]
        xi, ii, xs, is_ = self.inf(x), self.inf(index), self.shp(x), self.shp(index)
        if not (is_tensor_info(xi) and is_tensor_info(ii) and isinstance(dim, int)) or len(xs) != len(is_):
            return self.unknown(node)
        dim %= len(xs)
        out: list[DimInfo] = []
        for k in range(len(xs)):
            if k == dim or xs[k] != is_[k]:
                why = f"gathered at run-time positions at node '{node.name}'" if k == dim else \
                    f"partly gathered at node '{node.name}'"
                if not isinstance(xi[k], Opaque):
                    self.freeze([xi[k]], why)
                out.append(ii[k])
            else:
                out.append(self.tie(xi[k], ii[k], node) if is_[k] != 1 else xi[k])
        return out

    def select(self, info: DimInfo, start: int, stop: int, node: fx.Node) -> DimInfo:
        """The channels ``[start, stop)`` of a dim (cutting a space into a sum where needed)."""
        if isinstance(info, Opaque):
            return info
        lay = self.sp.expand(info)
        out: list[Term] = []
        for t in lay:
            lo, hi = t.offset, t.offset + t.numel()
            if hi <= start or lo >= stop:
                continue
            if not t.is_dense():
                raise CouplingError("slicing strided channels")
            if start <= lo and hi <= stop:
                out.append(Term(lo - start, t.axes))
                continue
            if len(t.axes) != 1:
                raise CouplingError("slicing through a flattened block")
            ax = t.axes[0]
            cuts = sorted({0, max(start - lo, 0), min(stop - lo, ax.size), ax.size})
            sizes = tuple(b - a for a, b in zip(cuts, cuts[1:], strict=False) if b > a)
            if ax.space is None:
                parts: tuple[int | None, ...] = (None,) * len(sizes)
            else:
                parts = self.sp.define(ax.space, "sum", sizes, node.name)
            pos = lo
            for p, n in zip(parts, sizes, strict=False):
                if start <= pos and pos + n <= stop:
                    out.append(Term(pos - start, (Axis(p, n, 1),)))
                pos += n
        if not any(a.space is not None for t in out for a in t.axes):
            return Opaque(None)
        return tuple(out)

    def split(self, node: fx.Node, shape: Any) -> Info:
        """split/chunk/unbind: each piece selects a channel range; equal chunks are tied."""
        x = self.inf(node.args[0])
        xs = self.shp(node.args[0])
        if not is_tensor_info(x) or not isinstance(shape, (tuple, list)):
            return self.unknown(node)
        t = node.target
        nd = len(xs)
        if t in ("unbind", torch.unbind):
            dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % nd
            if not isinstance(x[dim], Opaque):
                reason = f"channels unbound one by one at node '{node.name}'"
                self.freeze([x[dim]], reason)
            return tuple([d for k, d in enumerate(x) if k != dim] for _ in shape)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim %= nd
        sizes = [s[dim] for s in shape]
        # chunk, or split by one size (a literal or computed from the shape): equal pieces stay equal
        tied = t in ("chunk", torch.chunk) or isinstance(node.args[1], (int, fx.Node))
        equal = len(set(sizes)) == 1
        pieces: list[DimInfo] = []
        start = 0
        try:
            for n in sizes:
                pieces.append(self.select(x[dim], start, start + n, node))
                start += n
        except CouplingError as e:
            reason = f"split at node '{node.name}' cannot map channels ({e})"
            self.freeze([x[dim]], reason)
            pieces = [Opaque(reason)] * len(sizes)
        if t not in ("chunk", torch.chunk, "tensor_split"):
            self._record_split(node, x[dim])
        if tied and equal:
            for p in pieces[1:]:
                self.tie(pieces[0], p, node)
        elif not isinstance(x[dim], Opaque):
            how = f"sizes {sizes}" if not tied else f"unequal pieces {sizes}"
            self.freeze(pieces, f"split at node '{node.name}' has fixed {how}")
        out = []
        for p in pieces:
            o = list(x)
            o[dim] = p
            out.append(o)
        return tuple(out)

    def getitem(self, node: fx.Node, shape: Any) -> Info:
        src = self.inf(node.args[0])
        idx = node.args[1]
        if isinstance(src, tuple) and isinstance(idx, int):
            return src[idx] if -len(src) <= idx < len(src) else None
        if isinstance(src, tuple) and isinstance(idx, slice):
            return src[idx]
        if not is_tensor_info(src):
            if isinstance(shape, torch.Size):
                return self.unknown(node)
            return None
        xs = self.shp(node.args[0])
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(isinstance(i, fx.Node) for i in items):
            return self.tensor_index(node, src, xs, items, shape)
        if any(not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in items):
            return self.unknown(node, "tensor indexing")
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        out: list[DimInfo] = []
        d = 0
        for it in items:
            if it is Ellipsis:
                for _ in range(len(xs) - n_real):
                    out.append(src[d])
                    d += 1
            elif it is None:
                out.append(Opaque(None))
            elif isinstance(it, int):
                if not isinstance(src[d], Opaque):
                    self.freeze([src[d]], f"integer index into channels at node '{node.name}'")
                d += 1
            elif any(isinstance(b, fx.Node) for b in (it.start, it.stop, it.step)):
                reason = f"slice with bounds computed at run time at node '{node.name}'"  # x[:, :seq_len]
                if not isinstance(src[d], Opaque):
                    self.freeze([src[d]], reason)
                out.append(Opaque(reason))
                d += 1
            else:
                start, stop, step = it.indices(xs[d])
                if (start, stop, step) == (0, xs[d], 1):
                    out.append(src[d])
                elif step != 1:
                    reason = f"strided slice of channels at node '{node.name}'"
                    self.freeze([src[d]], reason)
                    out.append(Opaque(reason))
                else:
                    try:
                        sel = self.select(src[d], start, stop, node)
                        if not isinstance(src[d], Opaque):
                            self.freeze([sel], f"slice [{start}:{stop}] at node '{node.name}' has fixed bounds")
                        out.append(sel)
                    except CouplingError as e:
                        reason = f"slice at node '{node.name}' cannot map channels ({e})"
                        self.freeze([src[d]], reason)
                        out.append(Opaque(reason))
                d += 1
        out.extend(src[d:])
        return out

    def tensor_index(self, node: fx.Node, src: list[DimInfo], xs: Any, items: list[Any], shape: Any) -> Info:
        """``x[:, ..., idx]`` with one integer index tensor after full slices (a relative-position
        bias table read by a position index): the indexed dim freezes, the dims before and after it
        pass through, and the index's own dims take its place."""
        position = next(i for i, it in enumerate(items) if isinstance(it, fx.Node))
        before, index = items[:position], items[position]
        if any(it != slice(None) for it in before) or any(it != slice(None) for it in items[position + 1:]):
            return self.unknown(node, "tensor indexing beside other indices")
        ii, ishape = self.inf(index), self.shp(index)
        expected = (*xs[:position], *(ishape or ()), *xs[position + 1:])
        if not is_tensor_info(ii) or not isinstance(shape, torch.Size) or tuple(shape) != expected:
            return self.unknown(node, "tensor indexing (a mask, or an index of another shape)")
        if not isinstance(src[position], Opaque):
            self.freeze([src[position]], f"tensor index into channels at node '{node.name}'")
        return [*src[:position], *ii, *src[position + 1:]]

    def matmul(self, node: fx.Node, shape: Any) -> Info:
        """Batched matmul: batch dims and the contraction tie; rows from A, columns from B."""
        a, b = node.args[0], node.args[1]
        ai, bi, as_, bs = self.inf(a), self.inf(b), self.shp(a), self.shp(b)
        if not (is_tensor_info(ai) and is_tensor_info(bi)) or len(as_) < 2 or len(bs) < 2:
            return self.unknown(node, "matmul with a vector operand")
        k = self.tie(ai[-1], bi[-2], node)
        nb = len(shape) - 2
        batch: list[DimInfo] = []
        for j in range(nb):
            da, db = j - (nb - (len(as_) - 2)), j - (nb - (len(bs) - 2))
            cur: DimInfo | None = None
            for info, s, dd in ((ai, as_, da), (bi, bs, db)):
                if dd >= 0 and s[dd] != 1:
                    cur = info[dd] if cur is None else self.tie(cur, info[dd], node)
            batch.append(cur if cur is not None else Opaque(None))
        for dinfo in batch:
            for s in layout_spaces(dinfo):
                self.sp.flag(s, "attn_batch")
        for dinfo in (ai[-1], ai[-2], bi[-1], bi[-2]):
            for s in layout_spaces(dinfo):
                self.sp.flag(s, "mm_feature")
        out = batch + [ai[-2], bi[-1]]
        factors = [self.factor(i, n) for i, n in zip(batch, shape[:nb], strict=False)]
        factors += [self.factor(ai[-2], as_[-2]), self.factor(k, as_[-1]), self.factor(bi[-1], bs[-1])]
        self.add_flops(node, 2, factors, [ai, bi])
        return out

    def functional_linear(self, node: fx.Node, shape: Any) -> Info:
        x = self.inf(node.args[0])
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        wi = self.inf(w)
        if not (is_tensor_info(x) and is_tensor_info(wi)) or not isinstance(w, fx.Node):
            return self.unknown(node)
        wt = self._tensor_of(w)
        if wt is None or wt.dim() != 2:
            return self.unknown(node, "weight is not a parameter")
        out = self.linear(node, "", wt, False, x, self.shp(node.args[0]), shape, "", "", wlay=wi)
        bi = self.inf(b)
        if is_tensor_info(bi):
            out[-1] = self.tie(out[-1], bi[0], node)
        self._set_roles(w, {0: "producer", 1: "consumer"})
        return out

    def _tie_vectors(self, lay: DimInfo, vectors: Iterable[Any], node: fx.Node) -> DimInfo:
        """Tie ``lay`` to dim 0 of every per-channel vector argument given (affine, statistics)."""
        for v in vectors:
            info = self.inf(v)
            if is_tensor_info(info):
                lay = self.tie(lay, info[0], node)
        return lay

    def functional_layer_norm(self, node: fx.Node, shape: Any) -> Info:
        """``F.layer_norm`` over the last dim (timm's and torchvision's LayerNorm2d call it directly)."""
        a, kw = node.args, node.kwargs
        x, xs = self.inf(a[0]), self.shp(a[0])
        normalized = a[1] if len(a) > 1 else kw.get("normalized_shape")
        if not is_tensor_info(x) or not isinstance(normalized, (tuple, list, torch.Size)) or len(normalized) != 1:
            return self.unknown(node, "layer_norm over several dims")
        d = len(xs) - 1
        affine = (a[2] if len(a) > 2 else kw.get("weight"), a[3] if len(a) > 3 else kw.get("bias"))
        lay = self._tie_vectors(self.as_layout(x[d], xs[d], node), affine, node)
        owner = enclosing_module(node)[1]
        if isinstance(normalized[0], int) and not (isinstance(owner, type) and issubclass(owner, nn.LayerNorm)):
            self._fix(node, lay, normalized[0], [])  # apply re-derives normalized_shape of nn.LayerNorm only
        out = list(x)
        out[d] = lay
        return out

    def functional_batch_norm(self, node: fx.Node, shape: Any) -> Info:
        """``F.batch_norm`` (timm's BatchNormAct2d calls it): statistics and affine index dim 1."""
        x, xs = self.inf(node.args[0]), self.shp(node.args[0])
        if not is_tensor_info(x) or len(xs) < 2:
            return self.unknown(node, "input is not a batch of channels")
        # running_mean, running_var, weight, bias (any may be None)
        lay = self._tie_vectors(self.as_layout(x[1], xs[1], node), node.args[1:5], node)
        out = list(x)
        out[1] = lay
        self.const_flops(node, x, "normalisation")
        return out

    def _tensor_of(self, node: fx.Node) -> torch.Tensor | None:
        if node.op != "get_attr":
            return None
        obj: Any = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None

    def _set_roles(self, w: fx.Node, roles: dict[int, Role]) -> None:
        for r in self.regs:
            if r.node == w.name and r.dim in roles:
                r.role = roles[r.dim]

    def sdpa(self, node: fx.Node, shape: Any) -> Info:
        q, k, v = (self.inf(a) for a in node.args[:3])
        qs, ks, vs = (self.shp(a) for a in node.args[:3])
        if not all(is_tensor_info(i) for i in (q, k, v)) or len(qs) != 4:
            return self.unknown(node)
        batch = []
        mask = node.args[3] if len(node.args) > 3 else None
        mi, ms = self.inf(mask), self.shp(mask)
        for d in range(len(qs) - 2):
            batch.append(self.tie(self.tie(q[d], k[d], node), v[d], node))
            # an additive mask with a dim per head (T5's relative position bias) is indexed by the heads too
            m = d - (len(qs) - len(ms)) if is_tensor_info(mi) else -1
            if m >= 0 and ms[m] != 1:
                batch[-1] = self.tie(batch[-1], mi[m], node)
            # atoms: grouped-query attention refines the query heads into kv groups x repeats
            for atom in {a for s in layout_spaces(batch[-1]) for a in self.sp.atoms(s)}:
                self.sp.flag(atom, "attn_batch")
        e = self.tie(q[-1], k[-1], node)
        self.tie(k[-2], v[-2], node)
        for dinfo in (q[-1], v[-1]):
            for s in layout_spaces(dinfo):
                self.sp.flag(s, "mm_feature")
        out = batch + [q[-2], v[-1]]
        bf = [self.factor(i, n) for i, n in zip(batch, qs[:-2], strict=False)]
        scale = 2 * qs[-2] * ks[-2]
        terms = [FlopTerm(node.name, scale, [*bf, self.factor(e, qs[-1])]),
                 FlopTerm(node.name, scale, [*bf, self.factor(v[-1], vs[-1])])]
        self._check_alternatives(node, [terms, []], [q, k, v])
        return out

    def spatial_op(self, node: fx.Node, x: Info, xs: Any, shape: Any, changed: set[int],
                   verb: str = "resized") -> Info:
        """Pooling/padding/resizing/rolling: the ``changed`` dims lose structure, the others pass through."""
        if not is_tensor_info(x) or not isinstance(shape, torch.Size) or len(xs) != len(shape):
            return self.unknown(node)
        out = [Opaque(None) if d in changed else x[d] for d in range(len(shape))]
        for d in sorted(changed):
            if not isinstance(x[d], Opaque):
                reason = f"channels {verb} at node '{node.name}'"
                self.freeze([x[d]], reason)
        self.const_flops(node, x, "pooling counted")
        return out

    def expand(self, node: fx.Node, x: Info, xs: Any, shape: Any) -> Info:
        if not is_tensor_info(x) or not isinstance(shape, torch.Size):
            return self.unknown(node)
        lead = len(shape) - len(xs)
        out: list[DimInfo] = [Opaque(None)] * lead
        for d, n in enumerate(xs):
            if n == shape[lead + d]:
                out.append(x[d])
            else:
                if not isinstance(x[d], Opaque):
                    self.freeze([x[d]], f"channels repeated at node '{node.name}'")
                # a dim of its own (frozen), so that a reshape merging it keeps the other dim's channels:
                # grouped-query attention repeats each kv head for several query heads this way
                m = shape[lead + d]
                out.append(space_layout(self.sp.new(m, node.name, frozen=f"repeats made at node '{node.name}'"), m))
        return out


def _signatures(target: Any) -> list[inspect.Signature]:
    """torch's schemas for a builtin op, else the Python signature (``F.batch_norm`` is a function)."""
    found = get_signature_for_torch_op(target)
    if found:
        return list(found)
    try:
        return [inspect.signature(target)]
    except (TypeError, ValueError):
        return []


def _positional(node: fx.Node) -> None:
    """Rewrite tensor keyword arguments as positional ones (``F.linear(input=x, weight=w)``), which
    is what the rules read; the first of the op's signatures that binds says where."""
    if node.op != "call_function" or not any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return
    for sig in _signatures(node.target):
        try:
            bound = sig.bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        positional = [p for p in sig.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        given = [i for i, p in enumerate(positional) if p.name in bound.arguments]
        upto = (given[-1] + 1) if given else 0
        args = tuple(bound.arguments[p.name] if p.name in bound.arguments else p.default for p in positional[:upto])
        node.args = args
        node.kwargs = {k: v for k, v in bound.arguments.items() if k not in {p.name for p in positional[:upto]}}
        return


def _last_dims(rank: int, count: int) -> set[int]:
    return set(range(max(rank - count, 0), rank))


def _dim_set(dims: Any, rank: int) -> set[int] | None:
    """A ``dim`` argument as a set of dims (None: all of them); None when it is not known ints."""
    if dims is None:
        return set(range(rank))
    if isinstance(dims, int):
        return {dims % rank}
    if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
        return {d % rank for d in dims}
    return None


def _padded_dims(node: fx.Node, rank: int) -> set[int]:
    """The dims ``F.pad`` changes: its pairs run from the last dim back; a (0, 0) pair leaves a dim
    (Swin pads height and width of a channels-last map, not its channels). An amount known only at
    run time counts as a change."""
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if not isinstance(pad, (list, tuple)) or not pad:
        return set(range(rank))
    return {rank - 1 - i // 2 for i, amount in enumerate(pad) if not (isinstance(amount, int) and amount == 0)}


def _rolled_dims(node: fx.Node, rank: int) -> set[int]:
    """The dims ``torch.roll`` / ``Tensor.roll`` moves elements along; all of them when it rolls
    the flattened tensor (no ``dims``)."""
    rolled = _dim_set(node.args[2] if len(node.args) > 2 else node.kwargs.get("dims"), rank)
    return set(range(rank)) if rolled is None else rolled


def _spatial_dims(mod: nn.Module) -> int:
    name = type(mod).__name__
    for n in (1, 2, 3):
        if name.endswith(f"{n}d"):
            return n
    return 2


__all__ = ["Coupler", "FlopTerm", "Registration", "op_name"]
