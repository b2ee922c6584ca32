"""Measured latency as a cost the allocation can budget: tables per layer and per group.

Latency is not a polynomial in the keep counts (caches, vector widths, thread splits), so it is
measured, in three parts:

1. each Linear / Conv1d / Conv2d whose input or output channels belong to a prunable group is
   rebuilt at the allocation's widths (at most ``points`` per side) and timed alone on an input
   of the shape it sees in the model (``torch.utils.benchmark``): a table over (input keep,
   output keep), so the bilinear cost of a layer between two pruned groups is captured; the
   grid is made monotone (a wider layer is never faster: timing noise must not reward width)
   and interpolated onto the allocation's keep levels;
2. each table is scaled so that its full width costs what the layer takes inside the model
   (forward hooks, :func:`module_seconds`): alone, a layer's input is hot in cache, and the
   first conv of the MNIST-1D CNN ran 2.6 times faster alone than in the model;
3. what the layers do not explain (norms, activations, pooling, attention matmuls on a group's
   channels) is fitted per group as a rate per unit, from whole-model timings with only that
   group narrowed, each timed back to back with the dense model (:class:`Window`). On small
   CNNs this is a third of the time, and without it a latency budget looked unreachable.

The rest of the forward (frozen layers, per-op overhead) is a constant. The model is first
order across groups outside the layer tables, and at full width it gives the measured time
exactly (rates that claim more than the time outside the tables holds are shrunk to it); far
from full width, savings on small models add up to less than their sum, which
:func:`secateurs.prune` corrects by timing the allocated widths.
Every part is measured: the report shows the measured latency of the pruned model next to the
modelled one.

Models with torch attention are timed as they will run once pruned
(:func:`~secateurs.module_sync.pruned_implementation`): pruned heads leave torch's fused kernels,
which call no Linear a hook could time. Timings go through :mod:`secateurs.timing`, which
keeps the allocator from page-faulting every forward.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.interpolate import RegularGridInterpolator
from torch import nn
from tqdm.auto import tqdm

from secateurs.apply import apply
from secateurs.calibration import batch_rows, evaluating, forward_batch, head_rows
from secateurs.errors import InvalidPlanError, ValidationError
from secateurs.graph.groups import Group
from secateurs.module_sync import pruned_implementation
from secateurs.plan import PrunePlan
from secateurs.problems.allocation import Latency, LatencyTerm
from secateurs.timing import seconds, synchronized

_TIMED = (nn.Linear, nn.Conv1d, nn.Conv2d)
POINTS = 5  # widths measured per side of a layer table; more levels are interpolated
_REST_WIDTHS = 2  # narrowed widths a rate is fitted from (each costs whole forwards; one alone was too noisy)
SLICE_ABOVE = 0.4  # seconds of one dense forward above which a latency fraction is measured on fewer rows
SLICE_TO = 0.2  # ... on the rows that make a dense forward about this long


def model_seconds(model: nn.Module, inputs: Any, *, min_run_time: float = 0.2) -> float:
    """Seconds of one forward of ``model`` on ``inputs`` in eval mode (fastest timer block)."""
    with evaluating(model):
        return seconds(forward_batch, model, inputs, min_run_time=min_run_time)


class Window:
    """Timings rescaled to the time window in which the dense model was measured.

    A shared machine's speed drifts by tens of percent over seconds (the dense MNIST-1D CNN took
    7.4 ms in one call of :func:`measure` and 9.6 ms in the next, steady allocator and all), so a
    table timed now and a dense latency timed a minute ago do not add up. Every later timing is
    taken next to a fresh timing of the dense model and multiplied by reference / fresh: a
    uniform change of speed cancels, and tables, rates and the limit share one unit.
    """

    def __init__(self, model: nn.Module, inputs: Any, *, min_run_time: float = 0.2) -> None:
        self.model, self.inputs = model, inputs
        self.dense = model_seconds(model, inputs, min_run_time=min_run_time)

    def model_seconds(self, other: nn.Module, rounds: int = 3) -> float:
        """``other``'s forward in reference-window seconds: the median ratio to the dense model
        over ``rounds`` back-to-back pairs of short timings, times the reference."""
        ratios = [model_seconds(other, self.inputs, min_run_time=0.05) /
                  model_seconds(self.model, self.inputs, min_run_time=0.05) for _ in range(rounds)]
        return float(np.median(ratios)) * self.dense


@dataclass(frozen=True)
class TimingBatch:
    """The inputs latency is measured on: the first ``rows`` of the ``size`` given."""

    inputs: Any
    rows: int
    size: int
    dense_seconds: float  # one dense forward on all ``size`` rows


def timing_batch(model: nn.Module, inputs: Any) -> TimingBatch:
    """The first rows of ``inputs`` that make one dense forward about :data:`SLICE_TO` seconds,
    when a forward on all of them takes over :data:`SLICE_ABOVE`; else ``inputs`` whole.

    A latency budget takes tens of whole forwards (tables, rate fits, the measured check):
    MiniLM on 64 × 128 tokens ran 1.3 s a forward and spent 9 minutes in its tables. A forward
    that long is compute-bound, so a fraction of its dense time carries over to fewer rows; a
    fast one is not cut, since on a small batch per-call overhead is all a timing sees. A model's
    first forward pays one-off costs (oneDNN compiles a kernel per conv shape: a small ResNet's
    first forward on 16 images took 0.56 s, later ones 16 ms), so a slow first timing is taken
    again and the faster kept, before any rows are cut.
    """
    once = model_seconds(model, inputs, min_run_time=0.0)
    if once > SLICE_ABOVE:
        once = min(once, model_seconds(model, inputs, min_run_time=0.0))
    try:
        size = batch_rows(inputs)
    except (StopIteration, TypeError, AttributeError, IndexError):
        return TimingBatch(inputs, 0, 0, once)  # no leading tensor dimension to cut
    if once <= SLICE_ABOVE or size < 2:
        return TimingBatch(inputs, size, size, once)
    rows = max(1, int(size * SLICE_TO / once))
    return TimingBatch(head_rows(inputs, rows, size), rows, size, once)


def module_seconds(model: nn.Module, inputs: Any, names: Sequence[str], *,
                   forwards: int = 20) -> tuple[dict[str, float], float]:
    """Seconds each named module takes inside a forward of the whole model, and that forward's.

    A layer timed alone runs faster than inside the model (its input hot in cache, no neighbour
    evicting its weights): on the MNIST-1D CNN the first conv took 0.30 ms alone and 0.78 ms in
    the model, the third 0.85 and 1.15. Forward hooks time each layer where it runs; each module
    and the whole forward take their fastest of ``forwards``, so the pair shares a time window.
    """
    modules = {name: model.get_submodule(name) for name in names}
    clock = synchronized(time.perf_counter)  # on a GPU, each reading waits for the kernels before it
    started: dict[str, float] = {}
    spent: dict[str, float] = {}
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(lambda _m, _a, n=name: started.__setitem__(n, clock())))
        handles.append(module.register_forward_hook(
            lambda _m, _a, _o, n=name: spent.__setitem__(n, spent.get(n, 0.0) + clock() - started[n])))
    best, whole = dict.fromkeys(names, float("inf")), float("inf")
    try:
        with evaluating(model), torch.no_grad():
            forward_batch(model, inputs)  # warm-up
            for _ in range(forwards):
                spent.clear()
                start = clock()
                forward_batch(model, inputs)
                whole = min(whole, clock() - start)
                for name in names:
                    best[name] = min(best[name], spent.get(name, 0.0))
    finally:
        for h in handles:
            h.remove()
    return best, whole


@dataclass(frozen=True)
class _Layer:
    """A timed layer: which group indexes its input and output dims, and how many indices per unit."""

    module: str
    input: Group | None
    output: Group | None
    in_per_unit: int
    out_per_unit: int
    shape: tuple[int, ...]  # its input in the model, on the example inputs
    calls: int


def _dim_group(groups: Sequence[Group], module: str, dim: int) -> tuple[Group | None, int]:
    """The prunable group with the most indices on ``module.weight`` dim ``dim`` (others stay whole)."""
    best: tuple[Group | None, int] = (None, 0)
    for g in groups:
        for m in g.members:
            if m.module == module and m.param == "weight" and m.dim == dim:
                per_unit = len(m.indices([0]))
                if best[0] is None or per_unit * g.size > best[1] * best[0].size:
                    best = (g, per_unit)
    return best


def _layers(model: nn.Module, groups: Sequence[Group], example_inputs: Any) -> list[_Layer]:
    shapes: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, _TIMED):
            def hook(_m: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                shapes.setdefault(_name, tuple(args[0].shape))
                calls[_name] = calls.get(_name, 0) + 1

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with evaluating(model):
            forward_batch(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name in shapes:
        module = model.get_submodule(name)
        if isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups != module.out_channels:
            continue  # grouped (not depthwise): its rebuilt width would need the group structure
        g_in, w_in = _dim_group(groups, name, 1)
        g_out, w_out = _dim_group(groups, name, 0)
        if g_in is None and g_out is None:
            continue
        out.append(_Layer(name, g_in, g_out, w_in, w_out, shapes[name], calls[name]))
    return out


def _narrow(module: nn.Module, drop_in: int, drop_out: int) -> nn.Module:
    """A fresh layer like ``module`` with ``drop_in`` fewer input and ``drop_out`` fewer output indices."""
    if isinstance(module, nn.Linear):
        return nn.Linear(module.in_features - drop_in, module.out_features - drop_out, bias=module.bias is not None)
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    out_channels = module.out_channels - drop_out
    depthwise = module.groups > 1
    in_channels = out_channels if depthwise else module.in_channels - drop_in
    return type(module)(in_channels, out_channels, module.kernel_size, stride=module.stride,  # type: ignore[arg-type]
                        padding=module.padding, dilation=module.dilation,  # type: ignore[arg-type]
                        groups=out_channels if depthwise else 1, bias=module.bias is not None)


def _input(module: nn.Module, shape: tuple[int, ...], drop_in: int, drop_out: int) -> torch.Tensor:
    dims = list(shape)
    channel = len(dims) - 1 if isinstance(module, nn.Linear) else 1
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1:
        dims[channel] = module.out_channels - drop_out  # depthwise: input channels follow the output
    else:
        dims[channel] -= drop_in
    return torch.randn(dims)


def _grid(levels: Sequence[float], size: int, points: int) -> np.ndarray:
    """At most ``points`` of the allocation's keep counts (and the full ``size``), spread evenly.

    Widths are measured only at counts a plan can take: kernels are blocked by the vector width
    (16 floats for oneDNN on AVX-512 here; a 17-channel conv took as long as a 32-channel one),
    so a width between two levels says little about either.
    """
    lv = np.unique(np.append(np.asarray(levels, dtype=np.float64), float(size)))
    if lv.size <= points:
        return lv
    targets = np.linspace(lv[0], lv[-1], points)
    return np.unique(lv[np.abs(lv[None, :] - targets[:, None]).argmin(axis=1)])


@dataclass
class _Table:
    """One layer's measured times on its grid, and the allocation-level table made from it."""

    layer: _Layer
    grids: list[np.ndarray]  # measured keep counts of (input, output); [0.0] for a fixed side
    table: np.ndarray

    def at(self, group: str, k: float) -> float:
        """The measured time with ``group`` at grid count ``k`` and every other side at full width."""
        i = -1 if self.layer.input is None or self.layer.input.name != group else int(np.searchsorted(self.grids[0], k))
        j = -1 if self.layer.output is None or self.layer.output.name != group else int(
            np.searchsorted(self.grids[1], k))
        return float(self.table[i, j])

    def term(self, levels: Mapping[str, Sequence[float]]) -> LatencyTerm:
        sides = (self.layer.input, self.layer.output)
        targets = [np.asarray(sorted(levels[g.name]), dtype=np.float64) if g is not None else np.array([0.0])
                   for g in sides]
        if all(g.size == 1 for g in self.grids):
            full = np.full((targets[0].size, targets[1].size), self.table[0, 0])
        else:
            axes = [g for g in self.grids if g.size > 1]
            values = self.table.reshape([g.size for g in self.grids if g.size > 1])
            mesh = np.meshgrid(*[t for t, g in zip(targets, self.grids, strict=True) if g.size > 1], indexing="ij")
            full = RegularGridInterpolator(axes, values)(np.stack(mesh, axis=-1)).reshape(targets[0].size,
                                                                                         targets[1].size)
        return LatencyTerm(full, input=None if sides[0] is None else sides[0].name,
                           output=None if sides[1] is None else sides[1].name,
                           input_levels=targets[0] if sides[0] is not None else (),
                           output_levels=targets[1] if sides[1] is not None else ())


def _layer_table(model: nn.Module, layer: _Layer, levels: Mapping[str, Sequence[float]], points: int,
                 min_run_time: float, inside: float) -> _Table:
    """Time the layer rebuilt at every grid width pair, alone, scaled so that full width costs
    ``inside`` (its time inside the model); monotone, so width is never rewarded."""
    module = model.get_submodule(layer.module)
    sides = [(g, per, _grid(levels[g.name], g.size, points)) if g is not None else None
             for g, per in ((layer.input, layer.in_per_unit), (layer.output, layer.out_per_unit))]
    grids = [s[2] if s is not None else np.array([0.0]) for s in sides]
    table = np.zeros((grids[0].size, grids[1].size))
    for i, k_in in enumerate(grids[0]):
        for j, k_out in enumerate(grids[1]):
            drop_in = 0 if sides[0] is None else int(sides[0][0].size - k_in) * sides[0][1]
            drop_out = 0 if sides[1] is None else int(sides[1][0].size - k_out) * sides[1][1]
            narrow = _narrow(module, drop_in, drop_out).eval()
            table[i, j] = layer.calls * seconds(narrow, _input(module, layer.shape, drop_in, drop_out),
                                                min_run_time=min_run_time)
    if table[-1, -1] > 0:
        table *= inside / table[-1, -1]
    table = np.maximum.accumulate(np.maximum.accumulate(table, axis=0), axis=1)
    return _Table(layer, grids, table)


def _rest_rate(model: nn.Module, group: Group, window: Window, tables: Sequence[_Table], grid: np.ndarray,
               full: float) -> float:
    """Seconds per unit of ``group`` spent outside its weight layers (norms, activations, pooling...).

    The whole model is timed with only ``group`` narrowed; what the layer tables do not explain,
    against ``full`` (the model at full width, in window seconds), is fitted as
    ``rate · (k − size)`` by least squares (elementwise work on a group's channels is linear in
    them). Never negative: noise must not make units look free to keep.
    """
    xs, ys = [], []
    for k in grid[:-1]:
        try:
            sliced = apply(model, PrunePlan({group.name: list(range(int(k)))}, groups={group.name: group}))
        except InvalidPlanError:
            continue  # a width the model cannot take alone (GroupNorm divisibility...): no sample
        explained = sum(t.at(group.name, k) - t.at(group.name, float(group.size)) for t in tables)
        xs.append(k - group.size)
        ys.append(window.model_seconds(sliced) - full - explained)
    if not xs:
        return 0.0
    x, y = np.asarray(xs), np.asarray(ys)
    return max(float((x * y).sum() / (x * x).sum()), 0.0)


def measure(model: nn.Module, groups: Sequence[Group], example_inputs: Any, levels: Mapping[str, Sequence[float]],
            *, points: int = POINTS, min_run_time: float = 0.02, progress: bool = False) -> tuple[Latency, Window]:
    """The latency cost over ``levels`` (keep counts per allocated group) and its time window.

    ``progress`` shows a bar over the layer tables and one over the groups' rates (tqdm).

    Returns
    -------
    (Latency, Window)
        The modelled latency (seconds of the window; its value at full width is the measured
        dense latency, ``window.dense``, or for a model with torch attention the time of its
        :func:`~secateurs.module_sync.pruned_implementation`) and the window, to time pruned models in
        the same unit.
    """
    window = Window(model, example_inputs)
    timed = pruned_implementation(model)  # pruned attention leaves torch's fused kernels: price that
    full = window.dense if timed is model else window.model_seconds(timed)
    allocated = {g.name: g for g in groups if g.name in levels}
    layers = _layers(timed, list(allocated.values()), example_inputs)
    inside, whole = module_seconds(timed, example_inputs, [layer.module for layer in layers])
    to_window = full / whole if whole > 0 else 1.0
    tables = [_layer_table(timed, layer, levels, points, min_run_time, to_window * inside[layer.module])
              for layer in tqdm(layers, desc="latency: layer tables", leave=False, disable=not progress)]
    terms = [t.term(levels) for t in tables]
    rest = max(full - sum(float(t.table[-1, -1]) for t in tables), 0.0)
    rates = {g.name: _rest_rate(timed, g, window, [t for t in tables if g in (t.layer.input, t.layer.output)],
                                _grid(levels[g.name], g.size, _REST_WIDTHS + 1), full)
             for g in tqdm(allocated.values(), desc="latency: group rates", leave=False, disable=not progress)}
    credit = sum(rate * allocated[g].size for g, rate in rates.items())
    # Fitted one group at a time, rates can claim more than the time outside the tables holds
    # (attention's in-projection is bilinear in heads and stream: each rate counts it): shrink
    # them to what it holds, so that the model still gives the measured full-width time.
    shrink = min(1.0, rest / credit) if credit > 0 else 1.0
    for g, rate in rates.items():
        if rate > 0:
            lv = np.asarray(sorted(levels[g]), dtype=np.float64)
            terms.append(LatencyTerm(shrink * rate * lv, output=g, output_levels=lv))
    if not terms:
        raise ValidationError("budget.latency", "no Linear/Conv layer reads or writes a prunable group: "
                                                "there is no latency to trade")
    return Latency(terms, constant=rest - shrink * credit), window


__all__ = ["TimingBatch", "Window", "measure", "model_seconds", "module_seconds", "seconds", "timing_batch"]
