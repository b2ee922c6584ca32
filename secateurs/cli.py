"""The ``secateurs`` command: one sub-command per task, each a function taking parsed args."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.errors import SecateursError, ValidationError

_DTYPES = {"float": torch.float32, "float32": torch.float32, "long": torch.long, "int64": torch.long,
           "int": torch.long, "bool": torch.bool}


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """``package.module:factory`` or ``path/to/file.py:factory`` -> the factory callable."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValidationError("model", f"expected MODULE:FACTORY or FILE.py:FACTORY, got {spec!r}")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise ValidationError("model", f"no such file {target!r}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ValidationError("model", f"cannot import {target!r}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules.setdefault(path.stem, module)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValidationError("model", f"cannot import module {target!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValidationError("model", f"{target!r} has no callable {attr!r}")
    return factory


def parse_input_shape(text: str) -> torch.Tensor:
    """``1,3,32,32`` (random floats) or ``2,16:long`` (random token ids below 100)."""
    shape_text, _, dtype_text = text.partition(":")
    try:
        shape = tuple(int(s) for s in shape_text.split(",") if s.strip())
    except ValueError as e:
        raise ValidationError("--input-shape", f"expected comma-separated integers, got {text!r}") from e
    if not shape or any(n <= 0 for n in shape):
        raise ValidationError("--input-shape", f"sizes must be positive, got {text!r}")
    dtype = _DTYPES.get(dtype_text or "float")
    if dtype is None:
        raise ValidationError("--input-shape", f"unknown dtype {dtype_text!r} (one of {', '.join(_DTYPES)})")
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.float32:
        return torch.randn(shape, generator=gen)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.randint(0, 100, shape, generator=gen)


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1 or x == 0 else f"{x:.3g}"


def format_groups(graph: Any) -> str:
    """The groups as a fixed-width table (per-unit costs are the derivative at full width)."""
    rows = [("group", "units", "width", "members", "params/unit", "FLOPs/unit", "frozen")]
    for g in graph.groups:
        d = graph.marginal(g.name)
        rows.append((g.name, str(g.size), str(g.unit_width), str(len(g.members)), _fmt(d.params), _fmt(d.flops),
                     "" if g.prunable else g.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for i, r in enumerate(rows):
        cells = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r[:-1], widths, strict=True))]
        lines.append("  ".join(cells) + "  " + r[-1])
        if i == 0:
            lines.append("-" * (sum(widths) + 2 * len(widths) + 6))
    full = graph.cost()
    lines.append("")
    lines.append(f"{len(graph.groups)} groups, {len(graph.prunable_groups())} prunable; "
                 f"params {_fmt(full.params)}, FLOPs {_fmt(full.flops)}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Trace a model and print its groups with per-unit costs and frozen reasons."""
    from secateurs.graph import build

    model = load_factory(args.model)()
    if not isinstance(model, nn.Module):
        raise ValidationError("model", f"{args.model} returned {type(model).__name__}, not an nn.Module")
    shapes = args.input_shape or ["1,3,32,32"]
    inputs = tuple(parse_input_shape(s) for s in shapes)
    graph = build(model, inputs[0] if len(inputs) == 1 else inputs, strict=args.strict)
    print(f"{type(model).__name__}: {len(graph.nx)} traced nodes")
    print(format_groups(graph))
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secateurs", description="Prune PyTorch models with mathematical programs.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print a model's prunable groups and their costs")
    p.add_argument("model", help="MODULE:FACTORY or path/to/file.py:FACTORY returning an nn.Module")
    p.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                   help="example input shape, e.g. 1,3,32,32 or 2,16:long; repeat for several inputs")
    p.add_argument("--strict", action="store_true", help="fail on ops without a coupling rule instead of freezing")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``secateurs`` console script; returns the exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SecateursError as e:
        print(f"secateurs {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
