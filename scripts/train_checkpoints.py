"""Train the small CNN checkpoints shipped in ``secateurs/models/checkpoints`` (deterministic, CPU, 1 thread).

Run from the repository root::

    python scripts/train_checkpoints.py            # both models
    python scripts/train_checkpoints.py --only digits_cnn

Each model gets ``<name>.safetensors`` (the state dict, BatchNorm statistics included) and ``<name>.json``
(architecture and its arguments, seed, epochs, optimiser, data split, the test accuracy measured on the
saved weights, and the weights' sha256). The same seed and torch build give the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from secateurs.models.cnn import build
from secateurs.models.data import DataSplit, load_digits, load_mnist1d

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "secateurs" / "models" / "checkpoints"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a checkpoint's weights."""

    name: str
    architecture: str
    arch_args: dict[str, Any]
    dataset: str
    epochs: int
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


RECIPES = {
    "mnist1d_cnn": Recipe(
        name="mnist1d_cnn",
        architecture="mnist1d_cnn",
        arch_args={"channels": [32, 32, 32], "hidden": 64, "num_classes": 10},
        dataset="mnist1d",
        epochs=40,
    ),
    "digits_cnn": Recipe(
        name="digits_cnn",
        architecture="digits_cnn",
        arch_args={"channels": [16, 32, 32], "num_classes": 10},
        dataset="digits",
        epochs=30,
    ),
}


def _data(name: str) -> DataSplit:
    return load_mnist1d() if name == "mnist1d" else load_digits()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> tuple[int, int]:
    """Correct predictions and total, in eval mode (the zoo's test recomputes this on the saved weights)."""
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    return correct, int(x.shape[0])


def train(recipe: Recipe, out: Path) -> dict[str, Any]:
    """Train one recipe from its seed, save weights and metadata, return the metadata."""
    torch.manual_seed(recipe.seed)
    data = _data(recipe.dataset)
    model = build(recipe.architecture, **recipe.arch_args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = -(-data.x_train.shape[0] // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    order_gen = torch.Generator().manual_seed(recipe.seed)
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(data.x_train.shape[0], generator=order_gen)
        total = 0.0
        for idx in order.split(recipe.batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * idx.numel()
        if epoch % 5 == 4 or epoch == recipe.epochs - 1:
            correct, n = accuracy(model, data.x_test, data.y_test)
            print(f"{recipe.name} epoch {epoch + 1}: loss {total / data.x_train.shape[0]:.4f} test acc {correct / n:.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{recipe.name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    train_correct, train_n = accuracy(model, data.x_train, data.y_train)
    correct, n = accuracy(model, data.x_test, data.y_test)
    meta: dict[str, Any] = {
        "name": recipe.name,
        "architecture": recipe.architecture,
        "arch_args": recipe.arch_args,
        "dataset": recipe.dataset,
        "data_split": data.description,
        "train_size": train_n,
        "test_size": n,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "seed": recipe.seed,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "optimizer": f"AdamW(lr={recipe.lr}, weight_decay={recipe.weight_decay}), OneCycleLR",
        "test_correct": correct,
        "test_accuracy": correct / n,
        "train_accuracy": train_correct / train_n,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training_seconds": round(seconds, 1),
        "torch_version": torch.__version__,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (out / f"{recipe.name}.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"{recipe.name}: test accuracy {correct}/{n} = {correct / n:.4f} in {seconds:.1f} s -> {weights}")
    return meta


def main() -> None:
    """Command line entry: train the requested recipes deterministically on one CPU thread."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(RECIPES), action="append", help="train only these models")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for name in args.only or sorted(RECIPES):
        train(RECIPES[name], args.out)


if __name__ == "__main__":
    main()
