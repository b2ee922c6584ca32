"""The step on gate probabilities and soft coefficients: momentum, one global scale, a pull to 0/1.

Projected gradient on θ keeps unit i where its importance −∂L/∂θ_i beats λ·c_i, the multiplier
of the budget times the unit's marginal cost. The *relative* sizes of the gradients are the
importance signal, so the step must not rescale them per entry (Adam would make every unit with
a consistent sign look equally important, and the costs alone would then decide). What needs
normalising is only the overall scale (on the zoo CNNs ∂loss/∂θ is ~1e-4 while θ must travel
~1): the direction is the momentum average of the gradient divided by one running RMS over
all entries, so ``lr`` is a step in probability units (ours).

The pull to 0/1 (κ·Σθ(1−θ), our stand-in for the flattening hyperprior) is applied in the same
units, after the normalisation, so its weight means the same whatever the loss's scale.

Entries fixed for good (dead gates) can be left out of the running RMS (``live``): their
gradients are no signal, and a unit sliced out of the model has none at all, so leaving them
out makes a compacted run take the same steps as one that only gates its dead units.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ScaledStep:
    """θ ← θ − lr·(m̂/√v̂ + κ·(1 − 2θ)), m the momentum of ∂L/∂θ, v the running mean of its square
    over *all* entries (bias-corrected like Adam); entries without a gradient take only the pull."""

    def __init__(self, tensors: Sequence[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        self.tensors = list(tensors)
        self.lr = float(lr)
        self.betas = betas
        self.momentum = [torch.zeros_like(t) for t in self.tensors]
        self.square = 0.0
        self.count = 0

    @torch.no_grad()
    def step(self, flatten: float = 0.0, live: Sequence[torch.Tensor | None] | None = None) -> None:
        """One step; ``live[i]`` (a bool mask like ``tensors[i]``, or None for all) says which
        entries count in the running RMS."""
        grads = [t.grad if t.grad is not None else None for t in self.tensors]
        masks = list(live) if live is not None else [None] * len(self.tensors)
        present = [(g, m) for g, m in zip(grads, masks, strict=True) if g is not None]
        b1, b2 = self.betas
        if present:
            self.count += 1
            chosen = [g if m is None else g[m] for g, m in present]
            mean_square = float(sum(float((g.double() ** 2).sum()) for g in chosen) /
                                max(1, sum(g.numel() for g in chosen)))
            self.square = b2 * self.square + (1 - b2) * mean_square
            for m, g in zip(self.momentum, grads, strict=True):
                if g is not None:
                    m.mul_(b1).add_(g, alpha=1 - b1)
        scale = 0.0
        if self.count:
            v_hat = self.square / (1 - b2**self.count)
            scale = 1.0 / (max(v_hat, 0.0) ** 0.5 + 1e-30) / (1 - b1**self.count)
        for t, m in zip(self.tensors, self.momentum, strict=True):
            direction = m * scale if scale else torch.zeros_like(t)
            if flatten:
                direction = direction + flatten * (1 - 2 * t)
            t.sub_(self.lr * direction)

    def zero_grad(self) -> None:
        for t in self.tensors:
            t.grad = None
