"""The ``secateurs`` command: one sub-command per task, each a function taking parsed args."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.calibration import batch_rows, head_rows, leading_tensor, validate_batch
from secateurs.errors import SecateursError, ValidationError, first_line
from secateurs.hf import HELD_OUT_MAX, MeanPooled, load_hf, packed, shuffled, text_splits, tokenise
from secateurs.timing import steady_allocator

_DTYPES = {"float": torch.float32, "float32": torch.float32, "long": torch.long, "int64": torch.long,
           "int": torch.long, "bool": torch.bool}


def _module_name(path: Path) -> str:
    """The name a user's file is imported under: its stem, unless another module holds that name
    (a ``json.py`` of yours beside the standard library's): then one no other file can have."""
    held = sys.modules.get(path.stem)
    file = getattr(held, "__file__", None)
    if held is None or (file is not None and Path(file).resolve() == path.resolve()):
        return path.stem
    return f"secateurs_user_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]}"


def _import_callable(spec: str, field: str, expected: str) -> Callable[..., Any]:
    """``package.module:name`` or ``path/to/file.py:name`` -> that callable; errors name ``field``."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ValidationError(field, f"expected {expected}, got {spec!r}")
    if target.endswith(".py") or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise ValidationError(field, f"no such file {target!r}")
        name = _module_name(path)
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise ValidationError(field, f"cannot import {target!r}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # pickle and dataclasses find a class through its module's name
        try:
            mod_spec.loader.exec_module(module)
        except Exception as e:  # a syntax error or a failing import in the user's file
            raise ValidationError(field, f"importing {target!r} failed: {type(e).__name__}: {e}") from e
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:  # as `python -m` does: modules beside you import
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValidationError(field, f"cannot import module {target!r}: {e}") from e
    found = getattr(module, attr, None)
    if not callable(found):
        raise ValidationError(field, f"{target!r} has no callable {attr!r}")
    return found


def load_factory(spec: str) -> Callable[[], nn.Module]:
    """``package.module:factory`` or ``path/to/file.py:factory`` -> the factory callable."""
    return _import_callable(spec, "model", "MODULE:FACTORY or FILE.py:FACTORY")


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


_DATA_FILES = (".pt", ".pth")


def _data_source(spec: str) -> Any:
    """What ``--data`` names, unchecked: the loaded ``.pt`` file or what the user's function returns."""
    if Path(spec).suffix in _DATA_FILES:
        if not Path(spec).is_file():
            raise ValidationError("--data", f"no such file {spec!r}")
        try:
            return torch.load(spec, weights_only=True)
        except Exception as e:  # not a torch file, or objects weights_only refuses to unpickle
            raise ValidationError("--data", f"cannot load {spec!r}: {type(e).__name__}: {first_line(e)}") from e
    fn = _import_callable(spec, "--data", "MODULE:FN, FILE.py:FN or FILE.pt")
    try:
        return fn()
    except Exception as e:  # the user's code, reported as such
        raise ValidationError("--data", f"{spec}() failed: {type(e).__name__}: {first_line(e)}") from e


def _as_batches(data: Any, spec: str) -> list[Any]:
    """The batches in ``data`` as a list (a generator is read once), each checked as calibration checks it."""
    if isinstance(data, (torch.Tensor, dict)):
        raise ValidationError("--data", f"{spec} gave one {type(data).__name__}, not a list of batches "
                                        f"(wrap it: [batch], or list(x.split(64)) for a tensor)")
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise ValidationError("--data", f"{spec} gave a {type(data).__name__}, not an iterable of batches")
    try:
        batches = list(data)
    except Exception as e:  # a generator that fails part way
        raise ValidationError("--data", f"reading the batches of {spec} failed: {type(e).__name__}: {first_line(e)}") from e
    if not batches:
        raise ValidationError("--data", f"{spec} gave no batches")
    for i, batch in enumerate(batches):
        if isinstance(batch, (tuple, list)) and any(isinstance(t, (tuple, list, dict)) for t in batch):
            raise ValidationError("--data", f"{spec}: batch {i} nests containers; a batch is a tensor, a tuple "
                                            f"of tensors or a dict of tensors")
        try:
            validate_batch(batch, i)
        except ValidationError as e:
            raise ValidationError("--data", f"{spec}: {str(e).removeprefix(f'{e.field}: ')}") from e
        if leading_tensor(batch).dim() == 0:
            raise ValidationError("--data", f"{spec}: batch {i} starts with a scalar; batches have a batch dimension")
    return batches


def _take_samples(batches: list[Any], limit: int) -> list[Any]:
    """The first ``limit`` samples along the batch dimension; the batch where the limit falls is cut."""
    taken: list[Any] = []
    count = 0
    for batch in batches:
        if count >= limit:
            break
        size = batch_rows(batch)
        taken.append(batch if count + size <= limit else head_rows(batch, limit - count, size))
        count += size
    return taken


def load_data(spec: str, limit: int | None) -> list[Any]:
    """``--data``: the user's calibration batches, checked, at most ``limit`` samples (all when None)."""
    batches = _as_batches(_data_source(spec), spec)
    return batches if limit is None else _take_samples(batches, limit)


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


Rows = list[tuple[str, str, str]]

@dataclass
class _Job:
    """What one prune run works on, whatever the model's source: model, calibration, how to judge it."""

    model: nn.Module
    calibration: list[Any]
    quality: Callable[[nn.Module], Rows]  # rows comparing a pruned model to ``model`` (may be none)
    timing_inputs: Any  # what the latency rows time
    rebuild: str  # the factory to pass to secateurs.load for a saved model, as Python text


def _random_like(base: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fresh random values of ``base``'s shape and kind: floats, token ids below 100, or an all-true mask."""
    if base.is_floating_point():
        return torch.randn(base.shape, generator=gen)
    if base.dtype == torch.bool:
        return torch.ones(base.shape, dtype=torch.bool)
    return torch.randint(0, 100, base.shape, generator=gen)


def random_batches(shapes: Sequence[str], samples: int) -> list[Any]:
    """About ``samples`` random inputs (counted along the first input's batch dim) for the ``--input-shape`` list.

    One shape gives tensor batches; several give tuples, one tensor per positional input.
    """
    bases = [parse_input_shape(s) for s in shapes]
    gen = torch.Generator().manual_seed(1)
    batches = [tuple(_random_like(b, gen) for b in bases) for _ in range(max(1, samples // bases[0].shape[0]))]
    return [b[0] if len(b) == 1 else b for b in batches]


def _check_flags(args: argparse.Namespace, kind: str) -> None:
    """Refuse flags the model's kind (zoo, user, hf) would silently ignore."""
    if kind != "hf":
        for flag, value in (("--text", args.text), ("--seq-len", args.seq_len)):
            if value is not None:
                raise ValidationError(flag, "only for --model hf:DIR")
    if kind == "hf" and args.data is not None:
        raise ValidationError("--data", "not for hf: models, which calibrate on text (--text FILE)")
    if args.input_shape and (kind != "user" or args.data is not None):
        why = "the batches of --data are the inputs" if args.data is not None else f"a {kind} model brings its own inputs"
        raise ValidationError("--input-shape", f"not used here: {why}")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValidationError("--seq-len", f"must be at least 2 (room for the special tokens), got {args.seq_len}")


def _data_note(spec: str, batches: list[Any]) -> list[Any]:
    """Say what was read from ``--data``, then pass the batches on."""
    print(f"calibrating on {sum(batch_rows(b) for b in batches)} samples in {len(batches)} batches from {spec}")
    return batches


def _zoo_job(args: argparse.Namespace) -> _Job:
    """A zoo model with its own calibration data (or ``--data``) and its own quality measure."""
    from secateurs import models
    from secateurs.measure import embeddings

    model, info = models.load(args.model)
    if args.data is not None:
        calibration = _data_note(args.data, load_data(args.data, args.calibration))
    else:
        calibration = info.calibration(args.calibration or 512, args.batch_size)
    quality: Callable[[nn.Module], Rows] = _no_rows
    timing_inputs = calibration[0]
    if info.task == "classification":
        split = info.test_split()
        timing_inputs = split.x_test  # a whole test set: compute, not per-call overhead, is timed
        quality = functools.partial(_accuracy_rows, split, models.accuracy(model, split.x_test, split.y_test))
    elif args.model == "minilm":
        held = models.text_batches(64, 32, split="test")
        quality = functools.partial(_agreement_rows, embeddings(model, held), held)
    return _Job(model, calibration, quality, timing_inputs, f"lambda: secateurs.models.zoo.load({args.model!r})[0]")


def _user_job(args: argparse.Namespace) -> _Job:
    """A user factory calibrated on ``--data``, or on random inputs shaped by ``--input-shape``."""
    model = build_model(args.model)
    if args.data is not None:
        calibration = _data_note(args.data, load_data(args.data, args.calibration))
    elif not args.input_shape:
        raise ValidationError("--input-shape", "a user model needs --data, or --input-shape for random calibration inputs")
    else:
        calibration = random_batches(args.input_shape, args.calibration or 512)
        print("note: calibrating on random inputs (no --data given)")
    return _Job(model, calibration, _no_rows, calibration[0], f"your factory ({args.model})")


def _no_rows(pruned: nn.Module) -> Rows:
    """No task measure: a user model's quality is the user's to judge."""
    return []


def _accuracy_rows(split: Any, dense_accuracy: float, pruned: nn.Module) -> Rows:
    """A classifier's test accuracy, dense (measured once) and pruned."""
    from secateurs.models import accuracy

    return [("test accuracy", f"{dense_accuracy:.4f}", f"{accuracy(pruned, split.x_test, split.y_test):.4f}")]


def _agreement_rows(dense: torch.Tensor, held: list[dict[str, torch.Tensor]], pruned: nn.Module) -> Rows:
    """How close a sentence encoder's embeddings stay to the dense ones (computed once) on held-out text."""
    from secateurs.measure import embedding_agreement

    agreement = embedding_agreement(dense, pruned, held)
    return [("embedding cosine to dense", "1.0000", f"{agreement['cosine']:.4f}"),
            ("top-1 retrieval agreement", "1.0000", f"{agreement['top1_agreement']:.4f}")]


def _hf_agreement_rows(dense: torch.Tensor, held: list[dict[str, torch.Tensor]], pruned: nn.Module) -> Rows:
    """:func:`_agreement_rows` for a pruned HF encoder, read through :class:`MeanPooled`."""
    return _agreement_rows(dense, held, MeanPooled(pruned))


def _hf_job(args: argparse.Namespace) -> _Job:
    """A local HF folder, calibrated on tokenised text and judged by its embeddings on held-out text."""
    from secateurs.measure import embeddings

    folder = args.model.removeprefix("hf:")
    model, tokenizer = load_hf(folder, quiet=args.quiet)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    positions = positions if isinstance(positions, int) and positions > 1 else None
    seq_len = args.seq_len or min(128, positions or 128)
    if positions is not None and seq_len > positions:
        raise ValidationError("--seq-len", f"{seq_len} exceeds the model's {positions} positions")
    train, test, source = text_splits(args.text)
    texts = packed(tokenizer, shuffled(train), seq_len)[:args.calibration or 512]
    calibration = tokenise(tokenizer, texts, seq_len, args.batch_size)
    held = tokenise(tokenizer, shuffled(test)[:HELD_OUT_MAX], seq_len, args.batch_size)
    print(f"calibrating on {len(texts)} sequences of {seq_len} tokens from {source}; "
          f"embeddings compared on {sum(batch_rows(b) for b in held)} held-out paragraphs")
    quality = functools.partial(_hf_agreement_rows, embeddings(MeanPooled(model), held), held)
    return _Job(model, calibration, quality, calibration[0],
                f"lambda: transformers.AutoModel.from_pretrained({folder!r})")


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune a zoo model, a user factory or a local HF folder and print a before/after table."""
    from secateurs import models, save
    from secateurs.budget import Budget
    from secateurs.graph import dense_counts
    from secateurs.latency import timing_batch
    from secateurs.measure import compare_latency_within
    from secateurs.oneshot import prune
    from secateurs.timing import torch_threads

    for flag, value in (("--calibration", args.calibration), ("--batch-size", args.batch_size),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValidationError(flag, f"must be at least 1, got {value}")
    kind = "hf" if args.model.startswith("hf:") else "zoo" if args.model in models.names() else "user"
    _check_flags(args, kind)
    out = check_out_folder(args.out) if args.out else None
    job = {"hf": _hf_job, "zoo": _zoo_job, "user": _user_job}[kind](args)
    model, example = job.model, job.calibration[0]
    budget = Budget(sparsity=args.sparsity) if args.structure == "unstructured" else (
        None if args.structure == "n:m" else Budget(flops=args.flops, params=args.params, latency=args.latency))
    # a latency budget is measured on the batch the table times: a zoo CNN's whole test set (at the
    # calibration batch size per-call overhead dominates, and halving it took 98% of the FLOPs off),
    # cut to its first rows when a forward is slow, by prune's own rule (latency.timing_batch)
    timing = timing_batch(model, job.timing_inputs).inputs
    timed_on = timing if args.latency is not None else None
    # a latency budget is timed on the threads the table is; otherwise pruning uses every core
    with torch_threads(args.threads) if args.latency is not None else contextlib.nullcontext():
        result = prune(model, job.calibration, budget, example_inputs=timed_on, reconstruction=args.solver,
                       allocation=args.allocation, structure=args.structure, sequential=not args.no_sequential,
                       error_curve=not args.no_error_curve, progress=not args.quiet, time_limit=args.time_limit,
                       channel_multiple=args.channel_multiple)
    before, after = dense_counts(model, example), dense_counts(result.model, example)
    rows = [("", "dense", "pruned"), *job.quality(result.model)]
    nonzero = "nonzero params" if args.structure != "channels" else "params"
    dense_nz = sum(int((p != 0).sum()) for p in model.parameters())
    pruned_nz = sum(int((p != 0).sum()) for p in result.model.parameters())
    rows.append((nonzero, f"{dense_nz if args.structure != 'channels' else before.params:,.0f}",
                 f"{pruned_nz if args.structure != 'channels' else after.params:,.0f}"))
    rows.append((f"FLOPs (batch of {batch_rows(example)})", f"{before.flops:,.0f}", f"{after.flops:,.0f}"))
    with torch_threads(args.threads):
        timed = compare_latency_within(model, result.model, timing)
    batch, threads = batch_rows(timing), f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    rows.append((f"CPU latency (ms, batch of {batch}, {threads})", f"{1e3 * timed.dense:.2f}",
                 f"{1e3 * timed.pruned:.2f}"))
    rows.append((f"speedup ({timed.rounds} alternating rounds)", "1.00x", f"{timed.speedup:.2f}x"))
    rows.append(("speedup, middle half of the rounds", "", f"{timed.spread[0]:.2f}-{timed.spread[1]:.2f}x"))
    print(result.report.table())
    print()
    print(_before_after(rows))
    if out is not None:
        save(out / "model", result.model, result.plan)
        result.report.to_json(out / "report.json")
        result.report.plot(out)
        print(f"saved the pruned model, report.json and plots to {out}")
        print(f"load it with secateurs.load({str(out / 'model')!r}, {job.rebuild})")
    return 0


def channel_multiple_arg(text: str) -> int | str:
    """``--channel-multiple``: "auto" or a whole number (``prune`` checks that it is at least 1)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a whole number, got {text!r}") from None


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
                   help="a zoo model (mnist1d_cnn, digits_cnn, minilm), MODULE:FACTORY / FILE.py:FACTORY returning "
                        "an nn.Module, or hf:DIR, a local HuggingFace folder (config.json, weights, tokenizer files) "
                        "loaded offline with AutoModel/AutoTokenizer and calibrated on text (see --text)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="calibration data for a zoo or user model: MODULE:FN / FILE.py:FN returning an iterable of "
                        "batches (tensors, tuples of tensors or dicts of tensors: what the model's forward takes), "
                        "or a FILE.pt holding a list of them (read with torch.load(weights_only=True))")
    p.add_argument("--flops", type=float, default=None, help="keep this fraction (<= 1) or number of FLOPs")
    p.add_argument("--params", type=float, default=None, help="keep this fraction (<= 1) or number of parameters")
    p.add_argument("--latency", type=float, default=None,
                   help="keep at most this fraction (<= 1) of the dense model's measured CPU latency")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights removed (unstructured)")
    p.add_argument("--structure", choices=["channels", "unstructured", "n:m"], default="channels")
    p.add_argument("--channel-multiple", type=channel_multiple_arg, default="auto",
                   help="keep a multiple of this many channels per layer; auto (the default): the CPU's vector "
                        "width (16 on AVX-512, 8 on AVX2), where kernels run as fast as their FLOPs; 1: any width")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads the table's latency (and a --latency budget) is measured on; default 1, "
                        "the steadiest on a shared machine (the pruning itself uses every core)")
    p.add_argument("--solver", default="local_search", help="reconstruction solver (per group)")
    p.add_argument("--allocation", default="dp", help="allocation solver (keep level per group)")
    p.add_argument("--calibration", type=int, default=None, metavar="N",
                   help="calibration samples, counted along the batch dim (default 512; with --data, the first N "
                        "of yours, the batch where N falls cut short; default all of them)")
    p.add_argument("--batch-size", type=int, default=64, help="calibration batch size (zoo and hf: models)")
    p.add_argument("--input-shape", action="append", default=None, metavar="SHAPE[:DTYPE]",
                   help="a user model without --data calibrates on random inputs of this shape, e.g. 8,3,32,32 or "
                        "8,16:long (token ids); repeat for several positional inputs")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="hf: models: calibration text, one paragraph per non-empty line, short ones joined to fill "
                        "--seq-len; every 5th line is held out to compare embeddings (default: the help-topic text "
                        "that ships with Python)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="hf: models: tokens per sequence (default 128, or the model's max_position_embeddings "
                        "when fewer); held-out paragraphs are truncated or padded to it")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the solving (allocation, error curve, per-group solves), which fall back to "
                        "greedy when it runs out; tracing, statistics and error paths always run")
    p.add_argument("--no-sequential", action="store_true",
                   help="solve every group on the dense model's statistics (streaming, less memory)")
    p.add_argument("--no-error-curve", action="store_true",
                   help="skip the report's error-vs-budget curve and its plot (nine more allocations: about 8 s "
                        "on a ResNet-50)")
    p.add_argument("--out", default=None,
                   help="folder for the pruned model (DIR/model: plan and weights for secateurs.load, which rebuilds "
                        "the dense model with a factory, for hf: models lambda: AutoModel.from_pretrained(HF_DIR); "
                        "not a HuggingFace folder), report.json and plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``secateurs`` console script; returns the exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "prune" and args.flops is None and args.params is None and args.latency is None:
        args.flops = 0.5  # the embedded default: half the FLOPs
    if args.command == "prune":
        steady_allocator()  # the command owns its process: reuse freed statistics instead of faulting them in
    try:
        return int(args.func(args))
    except SecateursError as e:
        print(f"secateurs {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
