"""Local HuggingFace folders for ``secateurs prune --model hf:DIR``: loaded offline, calibrated on text.

The model and tokenizer come from the folder only (``local_files_only``); calibration is text
(a file's lines, or the help topics that ship with Python) packed into full sequences; quality
is the agreement of mean-pooled embeddings on held-out text, read through :class:`MeanPooled`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateurs.errors import ValidationError, first_line

HELD_OUT_EVERY = 5
"""With ``--text FILE``, every fifth distinct paragraph is held out to measure the pruned embeddings."""

HELD_OUT_MAX = 64
"""Held-out paragraphs the embedding rows are measured on (as for the zoo's MiniLM)."""


@contextlib.contextmanager
def _transformers_quiet(quiet: bool) -> Iterator[None]:
    """Without transformers' progress bars and warnings while loading, when ``--quiet`` asks for it."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_hf(folder: str, *, quiet: bool = False) -> tuple[nn.Module, Any]:
    """``--model hf:DIR``: the folder's AutoModel (eval mode) and AutoTokenizer, never downloading."""
    if not folder:
        raise ValidationError("--model", "hf: needs a folder, e.g. hf:./my-bert")
    if not Path(folder).is_dir():
        raise ValidationError("--model", f"no such folder {folder!r}")
    if not (Path(folder) / "config.json").is_file():
        raise ValidationError("--model", f"{folder!r} has no config.json: not a HuggingFace model folder")
    try:
        import transformers
    except ImportError as e:
        raise ValidationError("--model", "hf: models need the 'transformers' package") from e
    loaded: list[Any] = []
    with _transformers_quiet(quiet):
        for what, auto in (("model", transformers.AutoModel), ("tokenizer", transformers.AutoTokenizer)):
            try:
                loaded.append(auto.from_pretrained(folder, local_files_only=True))
            except Exception as e:  # unknown architecture, missing or broken weights or vocabulary...
                raise ValidationError("--model", f"transformers cannot load a {what} from {folder!r}: "
                                                 f"{type(e).__name__}: {first_line(e)}") from e
    model, tokenizer = loaded
    if not isinstance(model, nn.Module):
        raise ValidationError("--model", f"{folder!r} loads as {type(model).__name__}, not a PyTorch model")
    if len(tokenizer) <= len(set(getattr(tokenizer, "all_special_ids", []))):  # v5 builds one from config alone
        raise ValidationError("--model", f"{folder!r} has no tokenizer files (its vocabulary is only special tokens)")
    return model.eval(), tokenizer


def text_splits(path: str | None) -> tuple[list[str], list[str], str]:
    """Calibration and held-out paragraphs, disjoint, and where they come from.

    By default the train and test splits of the text that ships with Python (the help topics, as
    MiniLM's zoo entry uses); with ``--text FILE`` the file's distinct non-empty lines, every
    :data:`HELD_OUT_EVERY`-th held out.
    """
    from secateurs.models import text_paragraphs

    if path is None:
        return text_paragraphs("train"), text_paragraphs("test"), "Python's help topics"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValidationError("--text", f"cannot read {path!r}: {getattr(e, 'strerror', None) or e}") from e
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    held = lines[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    if len(held) < 2:
        raise ValidationError("--text", f"{path!r} has {len(lines)} distinct non-empty lines; it needs at least "
                                        f"{2 * HELD_OUT_EVERY} (every {HELD_OUT_EVERY}th is held out to measure quality)")
    calibration = [line for i, line in enumerate(lines) if (i + 1) % HELD_OUT_EVERY]
    return calibration, held, repr(path)


def shuffled(texts: list[str]) -> list[str]:
    """``texts`` in a seeded order, so a sorted file is not read topic by topic."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0))
    return [texts[int(i)] for i in order]


def packed(tokenizer: Any, texts: list[str], seq_len: int) -> list[str]:
    """Consecutive paragraphs joined until each text fills ``seq_len`` tokens; a short remainder is dropped.

    Calibration rows are then real tokens, not padding (Python's help paragraphs are 39 tokens at the
    median: padded to 128, 62% of the rows would be padding). A text longer than ``seq_len`` is cut
    when tokenised. A single paragraph is kept even when short, so a small file still calibrates.
    """
    # lengths only: verbose=False keeps the tokenizer from warning that a text is longer than the model takes
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    chunks: list[str] = []
    current: list[str] = []
    filled = 0
    for text, length in zip(texts, lengths, strict=True):
        current.append(text)
        filled += length
        if filled >= seq_len:
            chunks.append(" ".join(current))
            current, filled = [], 0
    return chunks or [" ".join(current)]


def tokenise(tokenizer: Any, texts: list[str], seq_len: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """One text per sequence, truncated or padded to ``seq_len`` tokens, in dict batches.

    The keys are those of ``input_ids``, ``attention_mask`` and ``token_type_ids`` the tokenizer
    gives; a tokenizer without a padding token pads with its end-of-sequence token (GPT-2's custom).
    """
    if getattr(tokenizer, "pad_token", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise ValidationError("--model", "the tokenizer has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    try:
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    except Exception as e:  # a tokenizer that cannot pad or truncate
        raise ValidationError("--model", f"the tokenizer failed: {type(e).__name__}: {first_line(e)}") from e
    tensors = {k: encoded[k].to(torch.int64) for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded}
    return [{k: v[i:i + batch_size] for k, v in tensors.items()} for i in range(0, len(texts), batch_size)]


class MeanPooled(nn.Module):
    """A HF encoder seen as a sentence encoder: ``last_hidden_state`` mean-pooled over real tokens, unit norm.

    :func:`secateurs.measure.embedding_agreement` compares models that return (B, H) embeddings;
    HF models return an output object, so the dense and the pruned model are both read through
    this view (the pooling sentence-transformers applies to MiniLM). Only measuring uses it: what
    is pruned and saved is the HF model itself.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        from secateurs.models.minilm import mean_pool

        out = self.encoder(**batch)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), p=2.0, dim=1)


__all__ = ["HELD_OUT_EVERY", "HELD_OUT_MAX", "MeanPooled", "load_hf", "packed", "shuffled", "text_splits", "tokenise"]
