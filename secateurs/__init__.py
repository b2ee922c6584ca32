"""secateurs: prune PyTorch models by casting every pruning decision as a mathematical program."""

from __future__ import annotations

import importlib
from typing import Any

from secateurs import errors
from secateurs.solvers import SolveResult, Status, available, compare, solve

__version__ = "0.1.0"

# Heavier entry points load on first use so that `import secateurs` stays cheap.
_LAZY = {
    "PrunePlan": "secateurs.plan",
    "build": "secateurs.graph",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'secateurs' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["SolveResult", "Status", "available", "compare", "errors", "solve", *sorted(_LAZY)]
