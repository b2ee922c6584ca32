"""Run the calibration set through a model one traced node at a time, every batch in lockstep.

Sequential (OSSCAR-style) pruning solves each group on the inputs its layers see *after* the
groups before it were pruned and refit. Re-running the whole model once per group would cost one
forward per group; instead the fx graph is stepped node by node over all batches together, and
a callback runs before each node: it can read the inputs a layer is about to receive (for every
batch) and change that layer's weights before they are used. One forward in total.

The price is memory: the tensors alive at the current node are held for every batch (what
SparseGPT and OSSCAR do when they cache a layer's inputs for the whole calibration set). Values
are freed as soon as their last user has run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from secateurs.calibration import evaluating, input_source, validate_batch
from secateurs.errors import ValidationError
from secateurs.graph.build import _arguments, _trace


class Lockstep:
    """An fx trace of ``model`` and one interpreter state per calibration batch.

    ``model`` is traced afresh, so the trace calls ``model``'s own submodules: weights changed in
    place by a callback are what the following nodes compute with.
    """

    def __init__(self, model: nn.Module, batches: Iterable[Any]) -> None:
        self.model = model
        arguments = []
        for index, batch in enumerate(batches):
            validate_batch(batch, index)
            arguments.append(_arguments(model, batch))
        if not arguments:
            raise ValidationError("calibration", "no batches: give at least one calibration batch")
        self.gm = _trace(model, *arguments[0])
        self.nodes = list(self.gm.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.states = []
        for values, _ in arguments:
            state = fx.Interpreter(self.gm)
            state.args_iter = iter(values)
            self.states.append(state)
        self.calls: dict[str, list[fx.Node]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                self.calls.setdefault(str(n.target), []).append(n)
        self.done = -1  # index of the last node run
        self.outputs: list[Any] = []  # the model's output for each batch, once the pass has run

    def first_call(self, module: str) -> int | None:
        """Position of the first node that calls ``module`` (None when the trace never calls it);
        for an attention module's output projection, of the attention module's call."""
        nodes = self.calls.get(input_source(self.model, module).module)
        return self.position[nodes[0]] if nodes else None

    def inputs_of(self, module: str) -> list[torch.Tensor] | None:
        """The input of ``module``'s only call, per batch, if it can be computed yet
        (:func:`~secateurs.calibration.input_source` says from which call and how).

        None when the module is called more than once (its statistics would mix calls), never,
        or with an input not yet computed or not a tensor.
        """
        source = input_source(self.model, module)
        nodes = self.calls.get(source.module, [])
        if len(nodes) != 1 or not nodes[0].all_input_nodes:
            return None
        if any(self.position[n] > self.done for n in nodes[0].all_input_nodes):
            return None
        caller = self.model.get_submodule(source.module)
        values = []
        with torch.no_grad():
            for state in self.states:
                args, kwargs = state.fetch_args_kwargs_from_env(nodes[0])
                values.append(source.read(caller, tuple(args), dict(kwargs)))
        return values if all(isinstance(v, torch.Tensor) for v in values) else None

    def step(self, i: int) -> None:
        """Run node ``i`` for every batch and free the values nobody needs any more."""
        node = self.nodes[i]
        for state in self.states:
            try:
                state.env[node] = state.run_node(node)
                if node.op == "output":
                    self.outputs.append(state.env[node])
            except Exception as exc:
                raise ValidationError("calibration", f"node {node.name!r} failed in the layer-wise pass: {exc}") from exc
            for dead in state.user_to_last_uses.get(node, []):
                del state.env[dead]
        self.done = i


def run_together(locks: list[Lockstep], before: Callable[[int], None]) -> None:
    """Step traces of structurally identical models node by node together (eval mode, no grad).

    ``before(i)`` runs before node ``i`` of every trace; all traces have run node ``i - 1``.
    """
    if len({len(lock.nodes) for lock in locks}) != 1:
        raise ValidationError("model", "the traces to run together differ in length")
    try:
        with evaluating(*(lock.model for lock in locks)):
            for i in range(len(locks[0].nodes)):
                before(i)
                for lock in locks:
                    lock.step(i)
    finally:
        for lock in locks:
            for state in lock.states:
                state.env.clear()


__all__ = ["Lockstep", "run_together"]
