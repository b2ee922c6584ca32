"""The ``secateurs`` command: one sub-command per task, each a function taking parsed args."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import tempfile
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
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # a syntax error or a failing import in the user's file
            raise ValidationError("model", f"importing {target!r} failed: {type(e).__name__}: {e}") from e
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:  # as `python -m` does: modules beside you import
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValidationError("model", f"cannot import module {target!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValidationError("model", f"{target!r} has no callable {attr!r}")
    return factory


def build_model(spec: str) -> nn.Module:
    """Call the factory named by ``spec``; one line naming it when it fails or returns no module."""
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as e:  # needs arguments, or raised: the user's code, reported as such
        raise ValidationError("model", f"{spec}() failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ValidationError("model", f"{spec} returned {type(model).__name__}, not an nn.Module")
    return model


def check_out_folder(folder: str) -> Path:
    """Create ``--out`` (and its parents) and prove it writable before any work, not after the run."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValidationError("--out", f"cannot write to {folder!r}: {e.strerror or e}") from e
    return out


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
    """The groups as a fixed-width table.

    Per-unit costs are the derivative at full width, shown for the decision variables only: a
    frozen group's size is folded into its neighbours' terms where a product would need three
    factors (a GroupNorm's group count times its channels per group times the input channels),
    so its derivative there would read 0 or a part of the truth.
    """
    rows = [("group", "units", "width", "members", "params/unit", "FLOPs/unit", "frozen")]
    for g in graph.groups:
        d = graph.marginal(g.name)
        params, flops = (_fmt(d.params), _fmt(d.flops)) if g.prunable else ("-", "-")
        rows.append((g.name, str(g.size), str(g.unit_width), str(len(g.members)), params, flops,
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

    model = build_model(args.model)
    shapes = args.input_shape or ["1,3,32,32"]
    inputs = tuple(parse_input_shape(s) for s in shapes)
    graph = build(model, inputs[0] if len(inputs) == 1 else inputs, strict=args.strict)
    print(f"{type(model).__name__}: {len(graph.nx)} traced nodes")
    print(format_groups(graph))
    return 0


def _before_after(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _batch_size(inputs: Any) -> int:
    """The leading dimension of a batch (a tensor, a tuple of them or a dict of them)."""
    first = inputs if isinstance(inputs, torch.Tensor) else next(iter(
        inputs.values() if isinstance(inputs, dict) else inputs))
    return int(first.shape[0])


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a zoo model (or a user factory) and print a before/after table."""
    from secateurs import models, save
    from secateurs.budget import Budget
    from secateurs.graph import dense_counts
    from secateurs.measure import compare_latency, embedding_agreement
    from secateurs.oneshot import prune

    for flag, value in (("--calibration", args.calibration), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValidationError(flag, f"must be at least 1, got {value}")
    out = check_out_folder(args.out) if args.out else None
    if args.model in models.names():
        model, info = models.load(args.model)
        calibration = info.calibration(args.calibration, args.batch_size)
        example = calibration[0]
    else:
        model = build_model(args.model)
        if not args.input_shape:
            raise ValidationError("--input-shape", "a user model needs --input-shape for its (random) calibration inputs")
        info = None
        base = parse_input_shape(args.input_shape)
        gen = torch.Generator().manual_seed(1)
        calibration = [torch.randn(base.shape, generator=gen) if base.is_floating_point()
                       else torch.randint(0, 100, base.shape, generator=gen)
                       for _ in range(max(1, args.calibration // base.shape[0]))]
        example = calibration[0]
        print("note: calibrating on random inputs (a user model brings no data)")
    budget = Budget(sparsity=args.sparsity) if args.structure == "unstructured" else (
        None if args.structure == "n:m" else Budget(flops=args.flops, params=args.params, latency=args.latency))
    result = prune(model, calibration, budget, reconstruction=args.solver, allocation=args.allocation,
                   structure=args.structure, sequential=not args.no_sequential, progress=not args.quiet,
                   time_limit=args.time_limit, channel_multiple=args.channel_multiple)
    before, after = dense_counts(model, example), dense_counts(result.model, example)
    timing_inputs = example
    rows = [("", "dense", "pruned")]
    if info is not None and info.task == "classification":
        split = info.test_split()
        timing_inputs = split.x_test  # a whole test set: compute, not per-call overhead, is timed
        rows.append(("test accuracy", f"{models.accuracy(model, split.x_test, split.y_test):.4f}",
                     f"{models.accuracy(result.model, split.x_test, split.y_test):.4f}"))
    elif args.model == "minilm":
        held = models.text_batches(64, 32, split="test")
        agreement = embedding_agreement(model, result.model, held)
        rows.append(("embedding cosine to dense", "1.0000", f"{agreement['cosine']:.4f}"))
        rows.append(("top-1 retrieval agreement", "1.0000", f"{agreement['top1_agreement']:.4f}"))
    nonzero = "nonzero params" if args.structure != "channels" else "params"
    dense_nz = sum(int((p != 0).sum()) for p in model.parameters())
    pruned_nz = sum(int((p != 0).sum()) for p in result.model.parameters())
    rows.append((nonzero, f"{dense_nz if args.structure != 'channels' else before.params:,.0f}",
                 f"{pruned_nz if args.structure != 'channels' else after.params:,.0f}"))
    rows.append((f"FLOPs (batch of {_batch_size(example)})", f"{before.flops:,.0f}", f"{after.flops:,.0f}"))
    timed = compare_latency(model, result.model, timing_inputs)
    batch = _batch_size(timing_inputs)
    rows.append((f"CPU latency (ms, batch of {batch})", f"{1e3 * timed.dense:.2f}", f"{1e3 * timed.pruned:.2f}"))
    rows.append(("speedup (alternating rounds)", "1.00x", f"{timed.speedup:.2f}x"))
    print(result.report.table())
    print()
    print(_before_after(rows))
    if out is not None:
        save(out / "model", result.model, result.plan)
        result.report.to_json(out / "report.json")
        result.report.plot(out)
        print(f"saved the pruned model, report.json and plots to {out}")
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

    p = sub.add_parser("prune", help="prune a model to a budget and print a before/after table")
    p.add_argument("--model", default="mnist1d_cnn",
                   help="a zoo model (mnist1d_cnn, digits_cnn, minilm) or MODULE:FACTORY / FILE.py:FACTORY")
    p.add_argument("--flops", type=float, default=None, help="keep this fraction (<= 1) or number of FLOPs")
    p.add_argument("--params", type=float, default=None, help="keep this fraction (<= 1) or number of parameters")
    p.add_argument("--latency", type=float, default=None,
                   help="keep at most this fraction (<= 1) of the dense model's measured CPU latency")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights removed (unstructured)")
    p.add_argument("--structure", choices=["channels", "unstructured", "n:m"], default="channels")
    p.add_argument("--channel-multiple", type=int, default=1,
                   help="keep a multiple of this many channels per layer (the CPU's vector width: 16 on AVX-512)")
    p.add_argument("--solver", default="local_search", help="reconstruction solver (per group)")
    p.add_argument("--allocation", default="dp", help="allocation solver (keep level per group)")
    p.add_argument("--calibration", type=int, default=512, help="number of calibration samples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-shape", default=None, help="for a user model: one input shape, e.g. 8,3,32,32")
    p.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run")
    p.add_argument("--no-sequential", action="store_true",
                   help="solve every group on the dense model's statistics (streaming, less memory)")
    p.add_argument("--out", default=None, help="folder for the pruned model, report.json and plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``secateurs`` console script; returns the exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "prune" and args.flops is None and args.params is None and args.latency is None:
        args.flops = 0.5  # the embedded default: half the FLOPs
    try:
        return int(args.func(args))
    except SecateursError as e:
        print(f"secateurs {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
