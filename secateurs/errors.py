"""Typed errors: every message names the field, node, budget or solver at fault."""

from __future__ import annotations

import numbers


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its class name when empty): what a one-line error quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def require_numbers(**values: object) -> None:
    """A ``ValidationError`` naming the first argument that is not a real number (a string, a bool),
    before a comparison with it would raise a bare TypeError. ``None`` passes: optional arguments."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ValidationError(name, f"expected a number, got {type(value).__name__} {value!r}")


class SecateursError(Exception):
    """Base class of every error secateurs raises on purpose."""


class ValidationError(SecateursError, ValueError):
    """Malformed input: ``field`` names the argument or attribute at fault."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"{field}: {message}")


class TraceError(SecateursError):
    """torch.fx could not trace the model; the message says where and why."""


class UnsupportedOpError(SecateursError):
    """strict mode met an op whose channel coupling secateurs does not know."""

    def __init__(self, node: str, op: str, message: str = "") -> None:
        self.node = node
        self.op = op
        detail = f": {message}" if message else ""
        super().__init__(f"unsupported op {op!r} at graph node {node!r}{detail}")


class InvalidPlanError(SecateursError, ValueError):
    """A prune plan that cannot be applied (unknown group, bad index, frozen group...)."""


class PlanFormatError(InvalidPlanError):
    """A serialised plan with an unknown schema version or malformed content."""


class InfeasibleBudgetError(SecateursError, ValueError):
    """No assignment meets the budget; ``least`` is the smallest achievable value."""

    def __init__(self, budget: str, requested: float, least: float, message: str = "") -> None:
        self.budget = budget
        self.requested = requested
        self.least = least
        detail = f" ({message})" if message else ""
        super().__init__(
            f"budget {budget!r} cannot be met: requested {requested:.6g}, "
            f"least achievable {least:.6g}{detail}"
        )


class SolverError(SecateursError):
    """A solver failed or was misused."""


class UnknownSolverError(SolverError, KeyError):
    """No solver is registered under that name."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class SolverRefusedError(SolverError):
    """The solver cannot take this instance (too large for enumeration, not a chain for dp...)."""


class SolverUnavailableError(SolverError):
    """An optional dependency the solver needs is not installed."""


class UnknownOptionWarning(UserWarning):
    """A solver was given an option it does not take; the option is not used."""
