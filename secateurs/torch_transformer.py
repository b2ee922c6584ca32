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
from typing import Any

from torch import Tensor, nn

__all__ = ["decoder_forward", "encoder_forward", "encoder_layer_forward", "slow_forward", "transformer_forward"]


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


def slow_forward(module: nn.Module) -> Callable[..., Any] | None:
    """The traceable forward of a torch Transformer container (``None`` for other modules, and for
    subclasses with a forward of their own, which fx traces as written)."""
    for cls, forward in _SLOW.items():
        if isinstance(module, cls) and type(module).forward in (cls.forward, forward):
            return forward
    return None
