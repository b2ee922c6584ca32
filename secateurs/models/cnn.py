"""Small CNNs for MNIST-1D and scikit-learn digits: real trained models with several prunable channel groups.

Both are plain ``nn.Sequential`` stacks of Conv/BatchNorm/ReLU/MaxPool, a Flatten and Linear layers,
so torch.fx traces them directly and every conv's output channels (and the hidden Linear's features)
form one coupled channel group: conv -> BN -> ReLU -> pool -> next conv, with Flatten mapping a channel
to a block of positions. Widths are factory arguments so tests can build tiny ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from secateurs.errors import ValidationError

__all__ = ["MNIST1D_LENGTH", "DIGITS_SIZE", "mnist1d_cnn", "digits_cnn", "build"]

MNIST1D_LENGTH = 40
"""Length of an MNIST-1D signal (the dataset's ``final_seq_length``)."""

DIGITS_SIZE = 8
"""Side of a scikit-learn digits image."""


def _check_widths(field: str, widths: Sequence[int], count: int) -> tuple[int, ...]:
    """Reject widths that would build a broken network, naming the argument."""
    values = tuple(int(w) for w in widths)
    if len(values) != count or any(w < 1 for w in values):
        raise ValidationError(field, f"expected {count} positive integers, got {list(widths)}")
    return values


def mnist1d_cnn(channels: Sequence[int] = (32, 32, 32), hidden: int = 64, num_classes: int = 10) -> nn.Sequential:
    """1-D CNN for MNIST-1D, input (B, 1, 40) -> logits (B, num_classes).

    Three conv blocks (k=5, 3, 3; the last two halve the length with max pooling: 40 -> 20 -> 10),
    then Flatten -> Linear(hidden) -> ReLU -> Linear(classes). Flatten keeps position information,
    which MNIST-1D needs (its digits are translated, scaled and sheared 1-D curves).
    """
    c1, c2, c3 = _check_widths("channels", channels, 3)
    (h,) = _check_widths("hidden", (hidden,), 1)
    (k,) = _check_widths("num_classes", (num_classes,), 1)
    return nn.Sequential(
        nn.Conv1d(1, c1, kernel_size=5, padding=2),
        nn.BatchNorm1d(c1),
        nn.ReLU(),
        nn.Conv1d(c1, c2, kernel_size=3, padding=1),
        nn.BatchNorm1d(c2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(c2, c3, kernel_size=3, padding=1),
        nn.BatchNorm1d(c3),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(c3 * (MNIST1D_LENGTH // 4), h),
        nn.ReLU(),
        nn.Linear(h, k),
    )


def digits_cnn(channels: Sequence[int] = (16, 32, 32), num_classes: int = 10) -> nn.Sequential:
    """2-D CNN for 8x8 digits, input (B, 1, 8, 8) -> logits (B, num_classes).

    Three 3x3 conv blocks with BatchNorm and ReLU, max pooling after the last two (8 -> 4 -> 2),
    then Flatten -> Linear(classes).
    """
    c1, c2, c3 = _check_widths("channels", channels, 3)
    (k,) = _check_widths("num_classes", (num_classes,), 1)
    return nn.Sequential(
        nn.Conv2d(1, c1, kernel_size=3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, kernel_size=3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c3, kernel_size=3, padding=1),
        nn.BatchNorm2d(c3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c3 * (DIGITS_SIZE // 4) ** 2, k),
    )


_FACTORIES = {"mnist1d_cnn": mnist1d_cnn, "digits_cnn": digits_cnn}


def build(architecture: str, **kwargs: object) -> nn.Sequential:
    """Build an architecture by name with the arguments recorded in a checkpoint's metadata."""
    if architecture not in _FACTORIES:
        raise ValidationError("architecture", f"unknown CNN {architecture!r}; known: {sorted(_FACTORIES)}")
    try:
        return _FACTORIES[architecture](**kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ValidationError("architecture", f"bad arguments for {architecture!r}: {exc}") from exc
