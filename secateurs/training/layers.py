"""Removable layers found from the graph's structure: the residual branches complexity-aware gates can skip.

A residual add ``y = f(x) + s(x)`` has two arms that leave the same node (the *fork*, where the
two inputs' paths split) and meet again at the add. An arm is removable when it is a closed
sub-graph (only the fork feeds it, only the add reads it) and whole prunable groups live strictly
inside it: every node carrying a group's channels and every module holding its members is in the
arm. Emptying those groups leaves the arm computing a constant (its last layer's bias path), so
the add keeps its shape: that is the layer complexity-aware training gates (``layers=``).

An arm is offered only if everything its groups touch runs at zero width (``apply``'s zero-width
layers, activations, dropout, adds, flattening, adaptive average pooling); an arm whose emptied
channels would pass e.g. a max pool is left to its unit gates. Nested residuals give each group to
its innermost arm. Layers are named by the arm's modules' common prefix (``layer1``), with
``@<add node>`` when one prefix holds several arms (a transformer block's attention and MLP),
and by the add node alone when the arm's modules share no prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import networkx as nx
from torch import nn

from secateurs.apply import runs_at_zero_width
from secateurs.graph.groups import Group
from secateurs.module_sync import common_parent

if TYPE_CHECKING:
    from secateurs.graph.build import DependencyGraph

__all__ = ["residual_branches"]

_ADDS = ("operator.add", "operator.iadd", "torch.add", "Tensor.add", "Tensor.add_")
#: Parameter-free ops checked to run on tensors with zero channels (tests/test_apply.py).
_FUNCTIONS = ("relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "leaky_relu", "elu", "mish",
              "dropout", "add", "iadd", "mul", "flatten", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "contiguous")
_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.LeakyReLU, nn.ELU, nn.Mish,
            nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.Flatten, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def _zero_width_node(graph: DependencyGraph, node: str) -> bool:
    data = graph.nx.nodes[node]
    if data["op"] == "call_module":
        mod = graph.gm.get_submodule(data["module"])
        return runs_at_zero_width(mod) or type(mod) in _MODULES
    if data["op"] in ("call_function", "call_method"):
        return str(data["target"]).rpartition(".")[2] in _FUNCTIONS
    return False


def _arms(graph: DependencyGraph) -> list[tuple[str, set[str]]]:
    """(add node, interior nodes) of every closed arm of every two-input residual add."""
    g = graph.nx
    out = []
    for add, data in g.nodes(data=True):
        if data["op"] not in ("call_function", "call_method") or data["target"] not in _ADDS:
            continue
        inputs = list(g.predecessors(add))
        if len(inputs) != 2:
            continue
        fork = nx.lowest_common_ancestor(g, inputs[0], inputs[1])
        if fork is None:
            continue
        below = nx.descendants(g, fork)
        sides = [(nx.ancestors(g, x) | {x}) & below for x in inputs]
        for mine, other in ((sides[0], sides[1]), (sides[1], sides[0])):
            interior = mine - other
            closed = all(set(g.predecessors(n)) <= interior | {fork} and set(g.successors(n)) <= interior | {add}
                         for n in interior)
            if interior and closed:
                out.append((add, interior))
    return out


def _inside(graph: DependencyGraph, group: Group, interior: set[str]) -> bool:
    modules = {m.module for m in group.members}
    nodes = set(group.nodes) | {n for n, d in graph.nx.nodes(data=True) if d["module"] in modules}
    return bool(nodes) and nodes <= interior


def _prefix(graph: DependencyGraph, interior: set[str]) -> str:
    return common_parent([graph.nx.nodes[n]["module"] for n in interior if graph.nx.nodes[n]["module"]])


def residual_branches(graph: DependencyGraph) -> dict[str, list[str]]:
    """``{layer name: group names inside it}`` for every removable residual branch of ``graph``.

    The mapping is what ``ComplexityAware(layers=...)`` takes; ``ComplexityAware.from_graph``
    uses it when no layers are named. Empty when the model has no residual adds.
    """
    groups = graph.prunable_groups()
    innermost: dict[str, tuple[int, int]] = {}  # group -> (arm size, arm index)
    arms = _arms(graph)
    for i, (_, interior) in enumerate(arms):
        for group in groups:
            if _inside(graph, group, interior) and (group.name not in innermost or len(interior) < innermost[group.name][0]):
                innermost[group.name] = (len(interior), i)
    by_arm: dict[int, list[str]] = {}
    for group in groups:
        if group.name in innermost:
            by_arm.setdefault(innermost[group.name][1], []).append(group.name)
    named: dict[str, list[tuple[int, list[str]]]] = {}
    for i, members in by_arm.items():
        touched = {n for name in members for n in graph.group(name).nodes}
        modules = {m.module for name in members for m in graph.group(name).members}
        if not all(_zero_width_node(graph, n) for n in touched) or \
                not all(runs_at_zero_width(graph.gm.get_submodule(m)) for m in modules):
            continue
        named.setdefault(_prefix(graph, arms[i][1]), []).append((i, members))
    out: dict[str, list[str]] = {}
    for prefix, entries in named.items():
        for i, members in entries:
            add = arms[i][0]
            name = prefix if len(entries) == 1 and prefix else f"{prefix}@{add}" if prefix else add
            out[name] = members
    return out
