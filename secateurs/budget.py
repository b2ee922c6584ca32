"""What the user asks for: a budget on FLOPs, parameters, latency or sparsity, relative or absolute.

A value in (0, 1] is a fraction of the dense model; a value above 1 is an absolute count.
Latency is measured, not counted: ``latency`` is a fraction of the dense model's measured CPU
latency on the example inputs, ``latency_ms`` an absolute number of milliseconds; both are timed
on the caller's torch threads (``torch.get_num_threads()``; :func:`secateurs.timing.torch_threads`
sets them for a block), and the speedup a plan gets changes with them.
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
    """``Budget(flops=0.5)``, ``Budget(params=0.6)``, ``Budget(flops=1.2e6)``, ``Budget(latency=0.6)``,
    ``Budget(sparsity=0.7)``.

    Parameters
    ----------
    flops, params : float, optional
        Keep at most this fraction (≤ 1) or this absolute number (> 1) of the dense cost. FLOPs
        are counted on one forward of ``prune``'s ``example_inputs`` (by default the first
        calibration batch), so an absolute FLOPs figure is per *that batch*: pass
        ``example_inputs`` of batch 1 to budget FLOPs per sample. Fractions do not depend on it.
    latency : float, optional
        At most this fraction, in (0, 1], of the dense model's measured latency.
    latency_ms : float, optional
        At most this many milliseconds (give ``latency`` or ``latency_ms``, not both).
    sparsity : float, optional
        Fraction of prunable weights removed, in [0, 1) (unstructured pruning).
    """

    flops: float | None = None
    params: float | None = None
    sparsity: float | None = None
    latency: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("flops", self.flops), ("params", self.params), ("sparsity", self.sparsity),
                                   ("latency", self.latency), ("latency_ms", self.latency_ms)) if v is not None}
        if not given:
            raise ValidationError("budget", "name at least one of flops=, params=, latency=, latency_ms=, sparsity=")
        for name, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValidationError(f"budget.{name}", f"must be a finite number, got {value!r}")
            if value <= 0 and name != "sparsity":
                raise ValidationError(f"budget.{name}", f"must be positive, got {value!r}")
        if self.latency is not None and self.latency > 1.0:
            raise ValidationError("budget.latency", f"is a fraction of the dense latency in (0, 1], got {self.latency!r}; "
                                                    "use latency_ms= for milliseconds")
        if self.latency is not None and self.latency_ms is not None:
            raise ValidationError("budget", "give latency= (a fraction) or latency_ms=, not both")
        if self.sparsity is not None:
            if not 0.0 <= self.sparsity < 1.0:
                raise ValidationError("budget.sparsity", f"must be a fraction in [0, 1), got {self.sparsity!r}")
            if self.structured() or self.timed():
                raise ValidationError("budget", "sparsity is for unstructured pruning; do not combine it with "
                                                "flops/params/latency")

    def structured(self) -> dict[str, float]:
        """The structured budgets given, by name ("flops", "params")."""
        return {k: float(v) for k, v in (("flops", self.flops), ("params", self.params)) if v is not None}

    def timed(self) -> bool:
        """True when a latency budget is given."""
        return self.latency is not None or self.latency_ms is not None

    def latency_limit(self, dense_seconds: float) -> float:
        """The latency limit in seconds, given the dense model's measured latency."""
        if self.latency_ms is not None:
            return self.latency_ms / 1e3
        if self.latency is None:
            raise ValidationError("budget", "no latency budget given")
        return self.latency * dense_seconds

    @staticmethod
    def absolute(value: float, dense: float) -> float:
        """A fraction of ``dense`` (value ≤ 1) or the value itself (> 1)."""
        return value * dense if value <= 1.0 else value

    def limits(self, dense: Cost) -> dict[str, float]:
        """Absolute limits for each structured budget, given the dense model's cost."""
        return {name: self.absolute(value, getattr(dense, name)) for name, value in self.structured().items()}
