"""A minimal training loop for examples and benchmarks (users keep their own loops).

Every training-aware method is an object with ``.model``, ``penalty()``, ``step()`` and
``finalize()``; ``fit`` shows the four calls in their places.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn


class Method(Protocol):
    model: nn.Module

    def penalty(self) -> torch.Tensor: ...

    def step(self) -> None: ...


def fit(
    method: Method,
    batches: Callable[[], Iterable[tuple[Any, torch.Tensor]]],
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[float]:
    """Train ``method.model`` for ``epochs`` over ``batches()``; returns the mean loss per epoch.

    ``batches`` is called once per epoch and yields ``(inputs, targets)``; ``loss_fn(outputs,
    targets)`` is the task loss, to which the method's penalty is added.
    """
    model = method.model
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    history = []
    for _ in range(epochs):
        model.train()
        total, count = 0.0, 0
        for inputs, targets in batches():
            outputs = model(inputs)
            loss = loss_fn(outputs, targets) + method.penalty().to(outputs.dtype)
            opt.zero_grad()
            loss.backward()
            opt.step()
            method.step()
            total += float(loss.detach())
            count += 1
        history.append(total / max(count, 1))
    return history
