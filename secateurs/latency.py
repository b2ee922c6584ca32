"""Measured latency as a cost the allocation can budget: one table per layer over its groups' keep.

Latency is not a polynomial in the keep counts (caches, vector widths, thread splits), so it is
measured. Each Linear / Conv1d / Conv2d whose input or output channels belong to a prunable group
is rebuilt at a grid of narrower widths and timed alone on an input of the shape it sees in the
model (``torch.utils.benchmark.Timer``); the grid is made monotone (a wider layer is never
faster: timing noise is not allowed to reward width) and interpolated onto the allocation's keep
levels. Everything else (norms, activations, attention matmuls, the frozen layers) is one
constant: the dense model's measured latency minus its layers' dense times. That constant does
not shrink with pruning, so the modelled latency of a pruned model over-estimates the truth: a
plan under the modelled budget is under it in reality, up to timing noise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.interpolate import RegularGridInterpolator
from torch import nn
from torch.utils import benchmark

from secateurs.calibration import evaluating, forward_batch
from secateurs.errors import ValidationError
from secateurs.graph.groups import Group
from secateurs.problems.allocation import Latency, LatencyTerm

_TIMED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def seconds(fn: Any, *args: Any, min_run_time: float = 0.05) -> float:
    """Median wall seconds of ``fn(*args)`` without grad (torch's benchmark timer, current threads)."""
    with torch.no_grad():
        timer = benchmark.Timer(stmt="fn(*args)", globals={"fn": fn, "args": args},
                                num_threads=torch.get_num_threads())
        return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def model_seconds(model: nn.Module, inputs: Any, *, min_run_time: float = 0.2) -> float:
    """Median seconds of one forward of ``model`` on ``inputs`` in eval mode."""
    with evaluating(model):
        return seconds(forward_batch, model, inputs, min_run_time=min_run_time)


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
    """At most ``points`` measured keep counts from the least level up to the full ``size``."""
    lv = np.unique(np.append(np.asarray(levels, dtype=np.float64), float(size)))
    if lv.size <= points:
        return lv
    return np.unique(np.round(np.linspace(lv[0], lv[-1], points)))


def measure(model: nn.Module, groups: Sequence[Group], example_inputs: Any, levels: Mapping[str, Sequence[float]],
            *, points: int = 5, min_run_time: float = 0.02) -> tuple[Latency, float]:
    """The latency cost over ``levels`` (keep counts per allocated group) and the dense latency.

    Returns
    -------
    (Latency, float)
        The modelled latency (seconds; its value at full width equals the measured dense
        latency) and that measured dense latency.
    """
    dense = model_seconds(model, example_inputs)
    allocated = {g.name: g for g in groups if g.name in levels}
    terms: list[LatencyTerm] = []
    spent = 0.0
    for layer in _layers(model, list(allocated.values()), example_inputs):
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
        table = np.maximum.accumulate(np.maximum.accumulate(table, axis=0), axis=1)  # wider is never faster
        spent += float(table[-1, -1])
        targets = [np.asarray(sorted(levels[s[0].name]), dtype=np.float64) if s is not None else np.array([0.0])
                   for s in sides]
        if grids[0].size == 1 and grids[1].size == 1:
            full = np.full((targets[0].size, targets[1].size), table[0, 0])
        else:
            axes = [g for g in grids if g.size > 1]
            values = table.reshape([g.size for g in grids if g.size > 1])
            mesh = np.meshgrid(*[t for t, g in zip(targets, grids, strict=True) if g.size > 1], indexing="ij")
            full = RegularGridInterpolator(axes, values)(np.stack(mesh, axis=-1)).reshape(targets[0].size,
                                                                                         targets[1].size)
        terms.append(LatencyTerm(
            full,
            input=None if sides[0] is None else sides[0][0].name,
            output=None if sides[1] is None else sides[1][0].name,
            input_levels=targets[0] if sides[0] is not None else (),
            output_levels=targets[1] if sides[1] is not None else (),
        ))
    if not terms:
        raise ValidationError("budget.latency", "no Linear/Conv layer reads or writes a prunable group: "
                                                "there is no latency to trade")
    return Latency(terms, constant=max(dense - spent, 0.0)), dense


__all__ = ["measure", "model_seconds", "seconds"]
