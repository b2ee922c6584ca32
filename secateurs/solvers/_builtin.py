"""Imports every solver module in this package so that each registers itself.

A new solver module needs no edit here: any module of ``secateurs.solvers`` whose name does
not start with an underscore (other than the registry and result types) is imported.
"""

from __future__ import annotations

import importlib
import pkgutil

import secateurs.solvers as _package

_INFRASTRUCTURE = {"registry", "result"}

for _info in pkgutil.iter_modules(_package.__path__):
    if not _info.name.startswith("_") and _info.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{_package.__name__}.{_info.name}")
