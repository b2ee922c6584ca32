"""Offline datasets: deterministic train/test splits as tensors, and calibration batches for pruning.

Everything here is generated or read from files already on the machine, never downloaded:

- MNIST-1D is generated procedurally by ``mnist1d.data.make_dataset`` with the package's default
  arguments (5,000 signals, seed 42, 80/20 split: the published benchmark). We never call
  ``mnist1d.get_dataset``, which would try to download a pickle and write files in the working folder.
- Digits are scikit-learn's bundled ``load_digits`` (1,797 real 8x8 images), split by a seeded,
  stratified permutation of our own so the split does not depend on scikit-learn's version.
- English text is the paragraphs of Python's ``pydoc_data.topics`` (the help() topics), split into
  train and held-out parts by topic so that no paragraph of a held-out topic leaks into calibration.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from secateurs.errors import ValidationError

__all__ = [
    "DataSplit",
    "DATASETS",
    "load_dataset",
    "load_mnist1d",
    "load_digits",
    "text_paragraphs",
    "text_batches",
    "calibration_batches",
]

SplitName = Literal["train", "test"]

DATASETS = ("mnist1d", "digits", "text")
"""Names accepted by :func:`calibration_batches` (model names of the zoo are accepted too)."""

_ALIASES = {"mnist1d_cnn": "mnist1d", "digits_cnn": "digits", "minilm": "text", "pydoc": "text"}


@dataclass(frozen=True)
class DataSplit:
    """A labelled dataset with a fixed train/test split; ``description`` says how it was made."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    description: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.x_train.shape[1:])


def _check_split(split: str) -> SplitName:
    if split not in ("train", "test"):
        raise ValidationError("split", f"expected 'train' or 'test', got {split!r}")
    return split  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D once per process (about 3 s); the global RNG states are restored afterwards."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ValidationError("package", "MNIST-1D needs the 'mnist1d' package (pip install mnist1d)") from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:  # make_dataset seeds and draws from the *global* numpy RNG; leave the caller's RNGs untouched
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> DataSplit:
    """MNIST-1D as float32 (N, 1, 40) signals and int64 labels; defaults are the published benchmark."""
    if num_samples < 10:
        raise ValidationError("num_samples", f"need at least one signal per class (10), got {num_samples}")
    x, y, xt, yt = _mnist1d_arrays(int(num_samples), int(seed))
    return DataSplit(
        name="mnist1d",
        x_train=torch.tensor(x, dtype=torch.float32).unsqueeze(1),
        y_train=torch.tensor(y, dtype=torch.int64),
        x_test=torch.tensor(xt, dtype=torch.float32).unsqueeze(1),
        y_test=torch.tensor(yt, dtype=torch.int64),
        num_classes=10,
        description=f"mnist1d.data.make_dataset(num_samples={num_samples}, seed={seed}), first 80% train, last 20% test",
    )


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ValidationError("package", "digits need the 'scikit-learn' package (pip install scikit-learn)") from exc
    bunch = sk_load_digits()
    return np.asarray(bunch.images, dtype=np.float32), np.asarray(bunch.target, dtype=np.int64)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> DataSplit:
    """scikit-learn digits as float32 (N, 1, 8, 8) images in [0, 1], stratified seeded split."""
    if not 0.0 < test_fraction < 1.0:
        raise ValidationError("test_fraction", f"must be in (0, 1), got {test_fraction}")
    images, labels = _digits_arrays()
    rng = np.random.default_rng(seed)
    train_idx: list[np.ndarray] = []
    test_idx: list[np.ndarray] = []
    for label in np.unique(labels):  # stratified: every class keeps the same test fraction
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    tr = np.sort(np.concatenate(train_idx))
    te = np.sort(np.concatenate(test_idx))
    x = torch.tensor(images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(labels, dtype=torch.int64)
    return DataSplit(
        name="digits",
        x_train=x[tr],
        y_train=y[tr],
        x_test=x[te],
        y_test=y[te],
        num_classes=10,
        description=f"sklearn load_digits, pixels/16, stratified split test_fraction={test_fraction} "
        f"with numpy default_rng({seed})",
    )


def load_dataset(name: str) -> DataSplit:
    """A labelled dataset by name ('mnist1d' or 'digits'; the zoo's model names work too)."""
    key = _ALIASES.get(name, name)
    if key == "mnist1d":
        return load_mnist1d()
    if key == "digits":
        return load_digits()
    raise ValidationError("name", f"no labelled dataset {name!r}; known: ['digits', 'mnist1d']")


@functools.lru_cache(maxsize=1)
def _topic_paragraphs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """All paragraphs of pydoc_data.topics, whitespace-normalised, split by whole topics.

    Topics are visited in sorted order and a topic goes to the held-out split while that split holds
    less than 20% of the paragraphs seen so far: about a fifth of the text, with no topic on both sides
    and no paragraph in both splits.
    """
    from pydoc_data.topics import topics

    train: list[str] = []
    test: list[str] = []
    for key in sorted(topics):
        blocks = [" ".join(block.split()) for block in re.split(r"\n\s*\n", topics[key])]
        blocks = [text for text in blocks if len(text.split()) >= 3]
        seen = len(train) + len(test) + len(blocks)
        (test if len(test) < 0.2 * seen else train).extend(blocks)
    # Some topics repeat other topics' sections verbatim: keep each paragraph once, and keep the
    # held-out split free of any paragraph that is also in the train split.
    unique_train = tuple(dict.fromkeys(train))
    seen_train = set(unique_train)
    return unique_train, tuple(p for p in dict.fromkeys(test) if p not in seen_train)


def text_paragraphs(split: SplitName = "train") -> list[str]:
    """English paragraphs (prose and a few code examples) from Python's help topics, for one split."""
    train, test = _topic_paragraphs()
    return list(train if _check_split(split) == "train" else test)


def _check_counts(n: int, batch_size: int, available: int, what: str) -> None:
    if n < 1:
        raise ValidationError("n", f"must be positive, got {n}")
    if batch_size < 1:
        raise ValidationError("batch_size", f"must be positive, got {batch_size}")
    if n > available:
        raise ValidationError("n", f"asked for {n} samples but {what} has only {available}")


def text_batches(
    n: int,
    batch_size: int = 32,
    *,
    max_length: int = 128,
    split: SplitName = "train",
    packed: bool = True,
    seed: int = 0,
) -> list[dict[str, Tensor]]:
    """Tokenised MiniLM inputs: ``n`` sequences of exactly ``max_length`` tokens, in batches (dicts).

    ``packed=True`` concatenates the split's paragraphs into one token stream and cuts it into windows
    ``[CLS] w_1 ... w_{L-2} [SEP]`` (no padding: every token carries signal; the train split gives about
    700 windows of 128 tokens). ``packed=False`` gives one paragraph per sequence, truncated or padded
    to ``max_length`` (exercises the attention mask). Sequences are drawn by a seeded permutation.
    """
    from secateurs.models.minilm import load_minilm_tokenizer

    paragraphs = text_paragraphs(_check_split(split))
    if packed:
        tok = load_minilm_tokenizer(max_length)
        tok.no_truncation()
        tok.no_padding()
        stream = [t for e in tok.encode_batch(paragraphs, add_special_tokens=False) for t in e.ids]
        width = max_length - 2
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        windows = [[cls_id, *stream[i : i + width], sep_id] for i in range(0, len(stream) - width + 1, width)]
        ids = torch.tensor(windows, dtype=torch.int64)
        mask = torch.ones_like(ids)
    else:
        tok = load_minilm_tokenizer(max_length, pad_to_max=True)
        encodings = tok.encode_batch(paragraphs)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
    _check_counts(n, batch_size, ids.shape[0], f"the {split} text split (max_length={max_length}, packed={packed})")
    order = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return [{"input_ids": ids[chunk], "attention_mask": mask[chunk]} for chunk in order.split(batch_size)]


def calibration_batches(
    name: str, n: int, batch_size: int = 64, *, split: SplitName = "train", seed: int = 0
) -> list[Tensor] | list[dict[str, Tensor]]:
    """``n`` calibration inputs (no labels) in batches, drawn by a seeded permutation of one split.

    ``name``: 'mnist1d' or 'digits' give tensors (B, ...) ready for the CNNs; 'text' gives MiniLM dicts
    with ``input_ids`` and ``attention_mask`` of 128 tokens (see :func:`text_batches`). The zoo's
    model names ('mnist1d_cnn', 'digits_cnn', 'minilm') are accepted too. The result is a list, so it
    can be iterated more than once.
    """
    key = _ALIASES.get(name, name)
    if key == "text":
        return text_batches(n, batch_size, split=split, seed=seed)
    if key not in ("mnist1d", "digits"):
        raise ValidationError("name", f"unknown calibration data {name!r}; known: {list(DATASETS)}")
    data = load_dataset(key)
    x = data.x_train if _check_split(split) == "train" else data.x_test
    _check_counts(n, batch_size, x.shape[0], f"the {key} {split} split")
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return list(x[order].split(batch_size))
