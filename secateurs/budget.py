"""What the user asks for: a budget on FLOPs, parameters or sparsity, relative or absolute.

A value in (0, 1] is a fraction of the dense model; a value above 1 is an absolute count.
``sparsity`` is the fraction of weights removed (unstructured and N:M pruning). The achieved
values a report shows are always computed from the pruned model or the plan, never copied from
here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secateurs.cost import Cost
from secateurs.errors import ValidationError


@dataclass(frozen=True)
class Budget:
    """``Budget(flops=0.5)``, ``Budget(params=0.6)``, ``Budget(flops=1.2e6)``, ``Budget(sparsity=0.7)``.

    Parameters
    ----------
    flops, params : float, optional
        Keep at most this fraction (≤ 1) or this absolute number (> 1) of the dense cost.
    sparsity : float, optional
        Fraction of prunable weights removed, in [0, 1) (unstructured pruning).
    """

    flops: float | None = None
    params: float | None = None
    sparsity: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("flops", self.flops), ("params", self.params), ("sparsity", self.sparsity))
                 if v is not None}
        if not given:
            raise ValidationError("budget", "name at least one of flops=, params=, sparsity=")
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValidationError(f"budget.{name}", f"must be a finite number, got {value!r}")
            if value <= 0 and name != "sparsity":
                raise ValidationError(f"budget.{name}", f"must be positive, got {value!r}")
        if self.sparsity is not None:
            if not 0.0 <= self.sparsity < 1.0:
                raise ValidationError("budget.sparsity", f"must be a fraction in [0, 1), got {self.sparsity!r}")
            if self.flops is not None or self.params is not None:
                raise ValidationError("budget", "sparsity is for unstructured pruning; do not combine it with flops/params")

    def structured(self) -> dict[str, float]:
        """The structured budgets given, by name ("flops", "params")."""
        return {k: float(v) for k, v in (("flops", self.flops), ("params", self.params)) if v is not None}

    @staticmethod
    def absolute(value: float, dense: float) -> float:
        """A fraction of ``dense`` (value ≤ 1) or the value itself (> 1)."""
        return value * dense if value <= 1.0 else value

    def limits(self, dense: Cost) -> dict[str, float]:
        """Absolute limits for each structured budget, given the dense model's cost."""
        return {name: self.absolute(value, getattr(dense, name)) for name, value in self.structured().items()}
