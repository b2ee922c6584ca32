"""Streaming calibration statistics: XᵀX of each layer's input, accumulated in float64.

Forward hooks see each layer's input batch by batch; only the p×p Gram matrix and a row count
are kept, so memory does not grow with the number of batches. A conv's input is unfolded so that
input channel c occupies the k·k consecutive columns c·k·k … (c+1)·k·k − 1, matching
``weight.reshape(out, -1)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from secateurs.conv1d import is_conv1d
from secateurs.errors import ValidationError
from secateurs.modules import attention_heads
from secateurs.torch_transformer import (
    ATTENTION_ARGUMENTS,
    attention_argument,
    recomputable_attention,
)

_CHUNK = 4096  # rows per low-precision product before it is added to the float64 sums
_GRAM_BLOCK = 384  # columns per row block of a Gram: wide Grams skip the blocks below the diagonal


@dataclass
class GramStatistics:
    """Σ XᵀX over calibration rows (float64) for one layer's input, and the number of rows.

    With a ``target`` (the same layer's input in the dense model, row for row), Σ XᵀX_dense is
    accumulated too: sequential pruning refits toward the dense model's output on the pruned
    model's inputs.

    Each product of at most 4,096 rows is computed in the input's own floating dtype (float32
    for most models: 2-3x faster than float64 on CPU) and added to float64 sums, so rounding
    does not grow with the number of batches. On all-MiniLM-L6-v2's FFN input (4,096 tokens,
    1,536 features) this differs from an all-float64 Gram by 5e-8 (relative Frobenius norm) and
    greedy picks the same units. ``exact=True`` computes every product in float64.

    An input of more than ``max_columns`` columns gets no Gram: it would not fit in memory with
    the solves' copies of it (see :mod:`secateurs.memory`). Its rows are counted, and its
    ``squares`` (Σ x² per column, the Gram's diagonal: p numbers) are kept instead.
    """

    gram: torch.Tensor | None = None
    rows: int = 0
    sums: torch.Tensor | None = field(default=None, repr=False)
    cross: torch.Tensor | None = field(default=None, repr=False)
    exact: bool = False
    max_columns: int | None = None
    columns: int = 0
    squares: torch.Tensor | None = field(default=None, repr=False)

    @property
    def too_wide(self) -> bool:
        """The input has more columns than ``max_columns``: rows are counted, no Gram is kept."""
        return self.max_columns is not None and self.columns > self.max_columns

    def _accumulate(self, total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``total + aᵀb`` in float64, chunk by chunk into ``total`` itself (``None`` starts a sum):
        a Gram of 4,608 columns is 170 MB, so no zero-filled or summed copy of it is made. When
        ``b is a`` only the upper blocks are multiplied (see :func:`_add_gram`)."""
        gram = b is a
        if self.exact or not a.is_floating_point() or a.dtype == torch.float64:
            a = a.to(torch.float64)
            b = a if gram else b.to(torch.float64)
        elif a.dtype != b.dtype:
            b = b.to(a.dtype)
        if total is None and a.shape[0] == 0:
            return torch.zeros(a.shape[1], b.shape[1], dtype=torch.float64, device=a.device)
        if gram and a.shape[1] > _GRAM_BLOCK:
            if total is None:
                total = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
            for start in range(0, a.shape[0], _CHUNK):
                _add_gram(total, a[start : start + _CHUNK])
            return _mirror_upper(total)
        for start in range(0, a.shape[0], _CHUNK):
            part = a[start : start + _CHUNK].T @ b[start : start + _CHUNK]
            if total is None:
                total = part.to(torch.float64)  # a fresh product, owned here
            else:
                total += part  # promoted to float64 element by element, without a float64 copy
        assert total is not None
        return total

    def update(self, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
        x = x.detach()
        if not x.is_floating_point():
            x = x.to(torch.float64)
        if target is not None and target.shape != x.shape:
            raise ValidationError("target", f"shape {tuple(target.shape)} differs from the input's {tuple(x.shape)}")
        self.columns = x.shape[1]
        if self.too_wide:
            for start in range(0, x.shape[0], _CHUNK):  # float64 a chunk at a time, not a copy of x
                part = x[start : start + _CHUNK].to(torch.float64).pow(2).sum(0)
                self.squares = part if self.squares is None else self.squares.add_(part)
            self.rows += x.shape[0]
            return
        self.gram = self._accumulate(self.gram, x, x)
        sums = x.sum(0, dtype=torch.float64)
        self.sums = sums if self.sums is None else self.sums + sums
        self.rows += x.shape[0]
        if target is not None:
            self.cross = self._accumulate(self.cross, x, target.detach())


def _add_gram(total: torch.Tensor, a: torch.Tensor) -> None:
    """Add aᵀa to the blocks of ``total`` on and above the diagonal only.

    XᵀX is symmetric, and a matrix product computes both halves: one product per block of rows,
    from the diagonal block rightwards, multiplies 1/2 + 1/(2·blocks) of the pairs. On a
    1,536-column input (all-MiniLM-L6-v2's FFN) that took 4,096-row chunks from 119 to 85 ms.
    """
    p = a.shape[1]
    for i in range(0, p, _GRAM_BLOCK):
        j = min(i + _GRAM_BLOCK, p)
        total[i:j, i:] += a[:, i:j].T @ a[:, i:]


def _mirror_upper(total: torch.Tensor) -> torch.Tensor:
    """Copy the blocks :func:`_add_gram` filled onto those below the diagonal: exactly symmetric."""
    p = total.shape[0]
    for i in range(_GRAM_BLOCK, p, _GRAM_BLOCK):
        j = min(i + _GRAM_BLOCK, p)
        total[i:j, :i] = total[:i, i:j].T
    return total


def layer_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (rows × p) matrix a layer multiplies by ``weight.reshape(out, -1)ᵀ``."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return x.reshape(-1, x.shape[-1])
    if isinstance(module, nn.Conv2d):  # grouped too: every input channel, as consumers.py indexes it
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=_padding(module, x), stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(module, nn.Conv1d):
        x2 = x.unsqueeze(2)
        cols = F.unfold(x2, (1, module.kernel_size[0]), dilation=(1, module.dilation[0]),
                        padding=(0, _padding(module, x)[0]), stride=(1, module.stride[0]))
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    raise ValidationError("module", f"{type(module).__name__} inputs cannot be unfolded into rows")


def _padding(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> tuple[int, ...]:
    if module.padding_mode != "zeros":
        raise ValidationError("module", f"padding_mode {module.padding_mode!r} is not supported for calibration")
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0,) * len(module.kernel_size)
        # "same": torch pads (d·(k−1))//2 before; symmetric when d·(k−1) is even
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise ValidationError("module", "padding='same' with an even kernel is not supported for calibration")
        return tuple(t // 2 for t in total)
    return tuple(module.padding)


@dataclass(frozen=True)
class InputSource:
    """Where a layer's input can be seen: the module whose call carries it, and how to read it
    from that call's arguments (``read(module, args, kwargs)``)."""

    module: str
    read: Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]


def _first_argument(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[0] if args else next(iter(kwargs.values()), None)


def _heads_output(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    assert isinstance(module, nn.MultiheadAttention)
    return attention_heads(module, *args, **kwargs)


def _argument_reader(argument: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]:
    """Reads the attention call's ``argument`` (query, key or value), given by position or keyword."""
    index = ATTENTION_ARGUMENTS.index(argument)

    def read(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args[index] if len(args) > index else kwargs.get(argument)

    return read


def input_source(model: nn.Module, name: str) -> InputSource:
    """The layer's own call, except inside ``nn.MultiheadAttention``, which runs its projections
    functionally: its output projection's input (the heads' outputs side by side) is recomputed
    from the attention module's arguments. Its input projections read those arguments, one each:
    ``"attn:key"`` (see :func:`~secateurs.torch_transformer.attention_argument`) is the key given
    to the attention module ``attn``, whatever the query and value are."""
    argument = attention_argument(name)
    if argument is not None:
        return InputSource(argument[0], _argument_reader(argument[1]))
    parent, _, leaf = name.rpartition(".")
    owner = model.get_submodule(parent)
    if isinstance(owner, nn.MultiheadAttention) and leaf == "out_proj" and recomputable_attention(owner):
        return InputSource(parent, _heads_output)
    return InputSource(name, _first_argument)


def row_reader(model: nn.Module, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """:func:`layer_rows` for the layer ``name``, looked up once; an attention module's input
    (``"attn:key"``, read by its projections) multiplies the last dim, as a Linear's does."""
    if attention_argument(name) is not None:
        return lambda x: x.reshape(-1, x.shape[-1])
    layer = model.get_submodule(name)
    return lambda x: layer_rows(layer, x)


@contextmanager
def layers_called() -> Iterator[None]:
    """torch's fused attention fast paths off for the block: they compute a whole encoder layer (or
    a nested-tensor encoder) in one kernel, so the layers' own calls, which hooks see, never happen."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def leading_tensor(batch: Any) -> torch.Tensor:
    """The first tensor of a batch (a tensor, a tuple of them or a dict of them): the one counted."""
    return batch if isinstance(batch, torch.Tensor) else next(iter(
        batch.values() if isinstance(batch, Mapping) else batch))


def batch_rows(batch: Any) -> int:
    """The leading dimension of a batch (a tensor, a tuple of them or a dict of them)."""
    return int(leading_tensor(batch).shape[0])


def head_rows(batch: Any, n: int, size: int) -> Any:
    """The first ``n`` rows of every tensor in ``batch`` whose leading dimension is the batch's ``size``."""
    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[:n] if t.dim() > 0 and t.shape[0] == size else t

    if isinstance(batch, torch.Tensor):
        return cut(batch)
    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(t) for t in batch)


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on a batch given as a tensor, a tuple/list of tensors, or a dict."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def validate_batch(batch: Any, index: int) -> None:
    """Reject empty calibration batches, or ones holding NaN or +inf, naming the batch."""
    tensors: Sequence[Any]
    if isinstance(batch, Mapping):
        tensors = list(batch.values())
    elif isinstance(batch, (tuple, list)):
        tensors = list(batch)
    else:
        tensors = [batch]
    if not tensors:
        raise ValidationError("calibration", f"batch {index} is empty")
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            raise ValidationError("calibration", f"batch {index} holds a value of type {type(t).__name__}, expected tensors")
        if t.numel() == 0:
            raise ValidationError("calibration", f"batch {index} has an empty tensor of shape {tuple(t.shape)}")
        # -inf is how additive attention masks say "never" (nn.Transformer.generate_square_subsequent_mask)
        if t.is_floating_point() and (torch.isnan(t).any() or torch.isposinf(t).any()):
            raise ValidationError("calibration", f"batch {index} contains NaN or infinite values")


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block; every submodule's own train/eval flag is restored."""
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def collect(model: nn.Module, calibration: Iterable[Any], modules: Iterable[str], *,
            max_columns: int | None = None) -> dict[str, GramStatistics]:
    """Run ``calibration`` through ``model`` (eval mode, no grad) accumulating XᵀX per module (or
    per input of an attention module, ``"attn:query"``; see :func:`input_source`). Inputs wider
    than ``max_columns`` get the Gram's diagonal only (:attr:`GramStatistics.too_wide`).

    The model's train/eval mode is restored afterwards and hooks are always removed.
    """
    names = list(dict.fromkeys(modules))
    stats = {name: GramStatistics(max_columns=max_columns) for name in names}
    handles = []
    for name in names:
        source, rows = input_source(model, name), row_reader(model, name)

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _name: str = name,
                 _source: InputSource = source, _rows: Callable[[torch.Tensor], torch.Tensor] = rows) -> None:
            x = _source.read(mod, args, kwargs)
            if x is not None:  # None: this call does not show the input
                stats[_name].update(_rows(x))

        handles.append(model.get_submodule(source.module).register_forward_pre_hook(hook, with_kwargs=True))
    count = 0
    try:
        with evaluating(model), layers_called():
            for index, batch in enumerate(calibration):
                validate_batch(batch, index)
                try:
                    forward_batch(model, batch)
                except ValidationError:
                    raise
                except Exception as exc:  # a shape mismatch deep inside torch: say which batch
                    raise ValidationError("calibration", f"batch {index} does not run through the model: {exc}") from exc
                count += 1
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValidationError("calibration", "no batches: give at least one calibration batch")
    return stats
