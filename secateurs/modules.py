"""The modules ``apply`` installs where a stock torch module cannot describe the pruned layer.

- :class:`PrunedMultiheadAttention`: ``nn.MultiheadAttention`` whose inner width
  (``num_heads * head_dim``) differs from ``embed_dim`` once heads or the stream are pruned.
- :class:`PrunedTransformerEncoderLayer` and :class:`PrunedTransformerEncoder`: torch's encoder
  containers that always run their slow path, since the fused kernels assume
  ``num_heads * head_dim == embed_dim``.
- Zero-width stand-ins for convs and batch norms, for plans that empty a group (a removed
  residual branch): torch's own layers do not all run at zero width (a conv with 0 output channels
  raises, one with 0 input channels silently returns 0 channels instead of its bias, BatchNorm
  with 0 features raises). The stand-ins compute the output shape and return the bias (or
  nothing) without a convolution, so a sliced model counts exactly the params and FLOPs of the
  graph's polynomial at keep 0. Linear, LayerNorm, GroupNorm, PReLU and Embedding work at zero
  width as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateurs.errors import ValidationError
from secateurs.torch_transformer import encoder_layer_forward, packed_encoder_forward, recomputable_attention

__all__ = [
    "PrunedMultiheadAttention", "PrunedTransformerEncoder", "PrunedTransformerEncoderLayer", "ZeroWidthBatchNorm1d",
    "ZeroWidthBatchNorm2d", "ZeroWidthBatchNorm3d", "attention_heads",
    "ZeroWidthConv1d", "ZeroWidthConv2d", "ZeroWidthConv3d", "conv_output_size", "runs_at_zero_width",
    "sync_zero_width",
]


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose inner width ``num_heads * head_dim`` may differ from ``embed_dim``.

    Pruning heads shrinks the q/k/v projections but not the residual stream, and pruning the stream
    shrinks ``embed_dim`` but not the heads; the stock module assumes both are equal. This subclass
    keeps the same parameters and state-dict keys (``in_proj_weight`` of shape
    ``(3 * num_heads * head_dim, embed_dim)``, or ``q_proj_weight``, ``k_proj_weight`` and
    ``v_proj_weight`` of ``num_heads * head_dim`` rows and ``embed_dim``, ``kdim`` and ``vdim``
    columns; ``out_proj``) and computes attention explicitly,
    without the fused fast path. ``embed_dim``, ``num_heads`` and ``head_dim`` are truthful.
    """

    def extra_repr(self) -> str:
        # out_proj prints its own widths: its output may differ from embed_dim when only it was pruned
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}")

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        heads, weights = _heads(self, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal)
        out = F.linear(heads, self.out_proj.weight, self.out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=-3)
        return out, weights


def attention_heads(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                    key_padding_mask: Tensor | None = None, need_weights: bool = True,
                    attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                    is_causal: bool = False) -> Tensor:
    """The input of ``mha.out_proj`` for a call ``mha(query, key, value, ...)``: the heads' outputs
    side by side, in the layout of the module's output.

    The stock module runs its output projection functionally, so no hook sees this tensor;
    calibration recomputes it from the call's arguments (packed or separate q/k/v projections).
    """
    if not recomputable_attention(mha):
        raise ValidationError("module", "bias_k/bias_v or add_zero_attn: the heads' output is not recomputed")
    return _heads(mha, query, key, value, key_padding_mask, False, attn_mask, is_causal)[0]


def _heads(mha: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
           need_weights: bool, attn_mask: Tensor | None, is_causal: bool) -> tuple[Tensor, Tensor | None]:
    """Attention up to the output projection, explicitly (per-head weights too when asked)."""
    unbatched = query.dim() == 2
    batch_first = mha.batch_first or unbatched
    if unbatched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    if not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    n, tq, _ = query.shape
    tk = key.shape[1]
    h, d = mha.num_heads, mha.head_dim
    if mha.in_proj_weight is not None:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:  # separate projections (kdim / vdim), each sliced on its own input stream
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bq, bk, bv = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    q = F.linear(query, wq, bq).reshape(n, tq, h, d).transpose(1, 2)
    k = F.linear(key, wk, bk).reshape(n, tk, h, d).transpose(1, 2)
    v = F.linear(value, wv, bv).reshape(n, tk, h, d).transpose(1, 2)
    bias = _additive_mask(q, h, n, tq, tk, key_padding_mask, attn_mask, is_causal)
    dropout = mha.dropout if mha.training else 0.0
    weights: Tensor | None = None
    if need_weights:  # the stock module's explicit path (bmm + softmax), which also returns weights
        scores = torch.matmul(q * d**-0.5, k.transpose(-2, -1))
        if bias is not None:
            scores = scores + bias
        weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(F.dropout(weights, dropout, mha.training), v)
    else:  # the stock module's scaled_dot_product_attention path
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    out = out.transpose(1, 2).reshape(n, tq, h * d)
    if not batch_first:
        out = out.transpose(0, 1)
    if unbatched:
        out = out.squeeze(0)
        weights = weights.squeeze(0) if weights is not None else None
    return out, weights


def _additive_mask(q: Tensor, heads: int, n: int, tq: int, tk: int, key_padding_mask: Tensor | None,
                   attn_mask: Tensor | None, is_causal: bool) -> Tensor | None:
    """One float mask of shape broadcastable to (n, heads, tq, tk), as the stock module merges them."""

    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(m, float("-inf"))
        return m.to(q.dtype)

    bias: Tensor | None = None
    if attn_mask is not None:
        m = attn_mask.view(1, 1, tq, tk) if attn_mask.dim() == 2 else attn_mask.view(n, heads, tq, tk)
        bias = additive(m)
    elif is_causal:
        causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
        bias = additive(causal.view(1, 1, tq, tk))
    if key_padding_mask is not None:
        kp = additive(key_padding_mask.view(n, 1, 1, tk))
        bias = kp if bias is None else bias + kp
    return bias


class PrunedTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` around a :class:`PrunedMultiheadAttention`: the stock forward's
    fused kernel (eval, no grad) assumes the heads span ``embed_dim`` and fails or miscomputes."""

    forward = encoder_layer_forward  # type: ignore[assignment]


class PrunedTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` over pruned layers: its nested-tensor fast path would hand them
    nested tensors, which :class:`PrunedMultiheadAttention` does not take. It skips padding by
    packing real tokens instead (:func:`~secateurs.torch_transformer.packed_encoder_forward`)."""

    forward = packed_encoder_forward  # type: ignore[assignment]


# -- zero-width layers ----------------------------------------------------------------------------


def conv_output_size(mod: nn.modules.conv._ConvNd, sizes: Sequence[int]) -> list[int]:
    """Spatial output size of a (non-transposed) conv for input spatial ``sizes`` (torch's formula)."""
    out = []
    for i, n in enumerate(sizes):
        k, s, d = mod.kernel_size[i], mod.stride[i], mod.dilation[i]
        if isinstance(mod.padding, str):
            if mod.padding == "same":
                out.append(int(n))
                continue
            pad = 0
        else:
            pad = mod.padding[i]
        out.append((int(n) + 2 * pad - d * (k - 1) - 1) // s + 1)
    return out


def _zero_width_conv(mod: nn.modules.conv._ConvNd, x: Tensor) -> Tensor | None:
    """The output of a conv with no input or no output channels, or None when it has both.

    No input channels: every position sees only the bias (zeros without one). No output channels:
    an empty tensor of the right shape. Neither runs a convolution, so nothing is counted.
    """
    if mod.in_channels and mod.out_channels:
        return None
    nd = len(mod.kernel_size)
    lead, spatial = tuple(x.shape[: x.dim() - nd - 1]), conv_output_size(mod, x.shape[x.dim() - nd:])
    if not mod.out_channels:
        return x.new_empty((*lead, 0, *spatial))
    out = x.new_zeros((*lead, mod.out_channels, *spatial))
    if mod.bias is not None:
        out = out + mod.bias.reshape(mod.out_channels, *([1] * nd))
    return out


class _ZeroWidthConv:
    """Mixin before a torch conv class: zero input or output channels take ``_zero_width_conv``."""

    def forward(self, input: Tensor) -> Tensor:
        out = _zero_width_conv(self, input)  # type: ignore[arg-type]
        return super().forward(input) if out is None else out  # type: ignore[misc]


class _ZeroWidthNorm:
    """Mixin before a torch batch-norm class: with no features left, the empty input passes through."""

    def forward(self, input: Tensor) -> Tensor:
        return input if self.num_features == 0 else super().forward(input)  # type: ignore[attr-defined, misc]


class ZeroWidthConv1d(_ZeroWidthConv, nn.Conv1d):
    """``nn.Conv1d`` that may have zero input or output channels (a removed branch; see the module doc)."""


class ZeroWidthConv2d(_ZeroWidthConv, nn.Conv2d):
    """``nn.Conv2d`` that may have zero input or output channels (a removed branch; see the module doc)."""


class ZeroWidthConv3d(_ZeroWidthConv, nn.Conv3d):
    """``nn.Conv3d`` that may have zero input or output channels (a removed branch; see the module doc)."""


class ZeroWidthBatchNorm1d(_ZeroWidthNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that passes an empty input through when it has no features left."""


class ZeroWidthBatchNorm2d(_ZeroWidthNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that passes an empty input through when it has no features left."""


class ZeroWidthBatchNorm3d(_ZeroWidthNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that passes an empty input through when it has no features left."""


#: Exact module class -> its zero-width stand-in (and back); other classes listed run at zero width as they are.
_ZERO_WIDTH: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: ZeroWidthConv1d, nn.Conv2d: ZeroWidthConv2d, nn.Conv3d: ZeroWidthConv3d,
    nn.BatchNorm1d: ZeroWidthBatchNorm1d, nn.BatchNorm2d: ZeroWidthBatchNorm2d, nn.BatchNorm3d: ZeroWidthBatchNorm3d,
}
_BASE_OF = {v: k for k, v in _ZERO_WIDTH.items()}
_ZERO_WIDTH_NATIVE = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.PReLU, nn.Embedding)


def runs_at_zero_width(mod: nn.Module) -> bool:
    """Whether ``apply`` can leave ``mod`` with a zero width (natively or through a stand-in)."""
    cls = type(mod)
    if cls in _ZERO_WIDTH or cls in _BASE_OF:
        return True
    if isinstance(mod, nn.GroupNorm):  # one group per channel would leave zero groups
        return cls is nn.GroupNorm and mod.num_groups != mod.num_channels
    return cls in _ZERO_WIDTH_NATIVE and not isinstance(mod, nn.LazyLinear)


def sync_zero_width(model: nn.Module) -> None:
    """Swap convs and batch norms with a zero width to their stand-ins, and back once widened."""
    for mod in model.modules():
        cls = type(mod)
        if isinstance(mod, nn.modules.conv._ConvNd):
            empty = not (mod.in_channels and mod.out_channels)
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            empty = mod.num_features == 0
        else:
            continue
        if empty and cls in _ZERO_WIDTH:
            mod.__class__ = _ZERO_WIDTH[cls]
        elif not empty and cls in _BASE_OF:
            mod.__class__ = _BASE_OF[cls]
