"""Slow-path forwards of torch.nn's Transformer containers, for tracing and for pruned layers.

``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``, ``nn.TransformerDecoder`` and
``nn.Transformer`` branch on tensor properties before they compute anything (the fused fast path's
checks, causal-mask detection, nested tensors). torch.fx cannot follow those branches, and the
fused kernels assume ``num_heads * head_dim == embed_dim``, which pruning heads breaks. The
forwards here compute what the stock slow path computes, op for op, so fx can trace through the
containers to the layers the coupling rules know, and a pruned layer runs correctly.

The masks go to ``nn.MultiheadAttention`` as the caller gave them: the stock containers only
canonicalise them (bool to additive float), which the attention module does again itself.
``is_causal=None`` (detect) becomes ``False``: a causal hint beside a mask changes only which
kernel applies the mask, not the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ATTENTION_ARGUMENTS", "PROJECTIONS", "WeightRows", "attention_argument", "attention_blocks",
           "decoder_forward",
           "encoder_forward", "encoder_layer_forward", "is_projection", "packed_attention", "packed_encoder_forward",
           "projection_blocks", "recomputable_attention", "slow_forward", "transformer_forward"]

#: nn.MultiheadAttention's input projections: parameters it applies functionally, not layers.
PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_projection(name: str) -> bool:
    """Whether ``name`` is the path of an attention projection parameter (see :data:`PROJECTIONS`),
    which stands where a layer's name would, since no layer of its own carries it."""
    return name.rpartition(".")[2] in PROJECTIONS


#: nn.MultiheadAttention's inputs, in the order its forward takes them and its packed rows use them.
ATTENTION_ARGUMENTS = ("query", "key", "value")


def attention_argument(name: str) -> tuple[str, str] | None:
    """``("dec.attn", "key")`` for ``"dec.attn:key"``: the name calibration gives one input of an
    attention module (what its key projection reads), or None for any other name."""
    path, sep, argument = name.rpartition(":")
    return (path, argument) if sep and argument in ATTENTION_ARGUMENTS else None


@dataclass(frozen=True)
class WeightRows:
    """Rows of a weight that all read one input: a layer's whole weight, or one block of an
    ``nn.MultiheadAttention`` input projection.

    A cross-attention's query rows read the decoder stream and its key/value rows the encoder's
    memory, so one Gram matrix cannot score the packed weight: each block gets its own.
    """

    name: str  # "fc1", "attn.in_proj_weight[key]", or "attn.k_proj_weight" for a separate projection
    param: str  # the parameter's path
    rows: slice | None  # its rows in that parameter; None: a layer's weight, as the layer computes it
    source: str  # the input it reads, as calibration names it: the layer's name, or "attn:key"


def attention_blocks(path: str, mha: nn.MultiheadAttention) -> list[WeightRows]:
    """The query, key and value blocks of the input projections of the attention module at ``path``."""
    prefix = f"{path}." if path else ""
    blocks = []
    for i, (argument, separate) in enumerate(zip(ATTENTION_ARGUMENTS, PROJECTIONS[1:], strict=True)):
        if mha.in_proj_weight is not None:
            rows = mha.in_proj_weight.shape[0] // 3  # heads * head_dim, fewer once heads are pruned
            blocks.append(WeightRows(f"{prefix}in_proj_weight[{argument}]", f"{prefix}in_proj_weight",
                                          slice(i * rows, (i + 1) * rows), f"{path}:{argument}"))
        else:
            blocks.append(WeightRows(f"{prefix}{separate}", f"{prefix}{separate}", slice(None),
                                          f"{path}:{argument}"))
    return blocks


def projection_blocks(model: nn.Module) -> list[WeightRows]:
    """The query, key and value blocks of every attention module's input projections."""
    return [block for path, mha in model.named_modules() if isinstance(mha, nn.MultiheadAttention)
            for block in attention_blocks(path, mha)]


def recomputable_attention(mha: nn.MultiheadAttention) -> bool:
    """Nothing appended to the keys (``bias_k``, ``add_zero_attn``): secateurs can recompute the
    attention up to its output projection, whose input no hook sees."""
    return mha.bias_k is None and not mha.add_zero_attn


def packed_attention(mha: nn.MultiheadAttention) -> bool:
    """One packed q/k/v projection and nothing appended to the keys (``bias_k``, ``add_zero_attn``):
    the attention secateurs recomputes up to its output projection and packs tokens for."""
    return mha.in_proj_weight is not None and recomputable_attention(mha)


def encoder_layer_forward(layer: nn.TransformerEncoderLayer, src: Tensor, src_mask: Tensor | None = None,
                          src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """``nn.TransformerEncoderLayer.forward`` without the fused fast path."""
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return layer.norm2(x + layer._ff_block(x))


def encoder_forward(encoder: nn.TransformerEncoder, src: Tensor, mask: Tensor | None = None,
                    src_key_padding_mask: Tensor | None = None, is_causal: bool | None = None) -> Tensor:
    """``nn.TransformerEncoder.forward`` without nested tensors or causal-mask detection."""
    output = src
    for layer in encoder.layers:
        output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
    return encoder.norm(output) if encoder.norm is not None else output


def packed_encoder_forward(encoder: nn.TransformerEncoder, src: Tensor, mask: Tensor | None = None,
                           src_key_padding_mask: Tensor | None = None, is_causal: bool | None = None) -> Tensor:
    """:func:`encoder_forward` that computes only the real tokens of a padded batch.

    The stock encoder skips padding with nested tensors, which pruned layers cannot take. Here
    every token-wise op (norms, projections, FFN) runs on the real tokens packed into one
    matrix; only attention scatters them back into the padded batch, masked as usual. Padding
    positions come out as zeros, as from the stock nested path. Packing is taken exactly where
    the stock encoder takes its nested path (:func:`_stock_nests`), so the padding positions hold
    what the dense model would give; every other call goes to :func:`encoder_forward`.
    """
    layers = list(encoder.layers)
    if (not _stock_nests(encoder, src, mask, src_key_padding_mask) or is_causal
            or any(type(layer).forward not in (encoder_layer_forward, nn.TransformerEncoderLayer.forward)
                   or not packed_attention(layer.self_attn) for layer in layers)):
        return encoder_forward(encoder, src, mask, src_key_padding_mask, is_causal)
    n, t, _ = src.shape
    real = (~src_key_padding_mask).flatten().nonzero().squeeze(1)
    bias = torch.zeros(n, 1, 1, t, dtype=src.dtype, device=src.device).masked_fill(
        src_key_padding_mask.view(n, 1, 1, t), float("-inf"))
    x = src.flatten(0, 1)[real]
    for layer in layers:
        x = _packed_layer(layer, x, real, bias)
    out = x.new_zeros(n * t, x.shape[-1])
    out[real] = x
    out = out.view(n, t, -1)
    return encoder.norm(out) if encoder.norm is not None else out


def _stock_nests(encoder: nn.TransformerEncoder, src: Tensor, mask: Tensor | None,
                 padding: Tensor | None) -> bool:
    """Whether ``nn.TransformerEncoder.forward`` would run this call on nested tensors (zeros at
    the padding) rather than its slow path (values computed at the padding), by its own checks."""
    if padding is None or padding.dtype != torch.bool or mask is not None or src.dim() != 3 or not len(encoder.layers):
        return False
    first = encoder.layers[0]
    if not (getattr(encoder, "use_nested_tensor", False) and torch.backends.mha.get_fastpath_enabled()
            and first.self_attn.batch_first and not first.training and not torch.is_autocast_enabled()):
        return False  # use_nested_tensor: the stock layer-config checks, made once at construction
    if torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in first.parameters())):
        return False
    real = (~padding).to(torch.int8)
    return not getattr(encoder, "mask_check", True) or bool((real[:, 1:] <= real[:, :-1]).all())  # padded at the end


def _packed_layer(layer: nn.TransformerEncoderLayer, x: Tensor, real: Tensor, bias: Tensor) -> Tensor:
    """One encoder layer on packed real tokens ``x`` (tokens, features)."""

    def attend(h: Tensor) -> Tensor:
        mha = layer.self_attn
        n, t = bias.shape[0], bias.shape[-1]
        heads, width = mha.num_heads, mha.head_dim
        qkv = h.new_zeros(n * t, 3 * heads * width)
        qkv[real] = F.linear(h, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.view(n, t, 3, heads, width).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=mha.dropout if mha.training else 0.0)
        out = out.transpose(1, 2).reshape(n * t, heads * width)[real]
        return layer.dropout1(F.linear(out, mha.out_proj.weight, mha.out_proj.bias))

    if layer.norm_first:
        x = x + attend(layer.norm1(x))
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + attend(x))
    return layer.norm2(x + layer._ff_block(x))


def decoder_forward(decoder: nn.TransformerDecoder, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                    memory_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                    memory_key_padding_mask: Tensor | None = None, tgt_is_causal: bool | None = None,
                    memory_is_causal: bool = False) -> Tensor:
    """``nn.TransformerDecoder.forward`` without causal-mask detection (it reads the input's size)."""
    output = tgt
    for layer in decoder.layers:
        output = layer(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                       tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                       tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
    return decoder.norm(output) if decoder.norm is not None else output


def transformer_forward(model: nn.Transformer, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None,
                        tgt_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                        src_key_padding_mask: Tensor | None = None, tgt_key_padding_mask: Tensor | None = None,
                        memory_key_padding_mask: Tensor | None = None, src_is_causal: bool | None = None,
                        tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Tensor:
    """``nn.Transformer.forward`` without its shape checks (they compare tensor sizes)."""
    memory = model.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
    return model.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)


_SLOW: dict[type, Callable[..., Any]] = {
    nn.TransformerEncoderLayer: encoder_layer_forward,
    nn.TransformerEncoder: encoder_forward,
    nn.TransformerDecoderLayer: nn.TransformerDecoderLayer.forward,  # traceable as it is
    nn.TransformerDecoder: decoder_forward,
    nn.Transformer: transformer_forward,
}

# forwards that compute what a slow forward computes, but not traceably: traced as the slow one
_SAME_GRAPH: dict[Callable[..., Any], tuple[Callable[..., Any], ...]] = {encoder_forward: (packed_encoder_forward,)}


def slow_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The traceable forward of a torch Transformer container (``None`` for other modules, and for
    subclasses with a forward of their own, which fx traces as written)."""
    for cls, forward in _SLOW.items():
        if isinstance(module, cls) and type(module).forward in (cls.forward, forward, *_SAME_GRAPH.get(forward, ())):
            return forward
    return None
