"""torchvision's Swin window attention, computed so that its heads can be pruned.

torchvision's ``ShiftedWindowAttention`` (and ``...V2``) hands its weights to one function that
torch.fx keeps whole, and that function takes the head width from the model width
(``C // num_heads``) and applies ``proj`` functionally. So fx sees no heads, no forward hook sees
the heads' output that ``proj`` reads, and a module with fewer heads than ``C / head_dim`` fails.

:func:`window_attention` computes the same thing from the module's own layers: the head width from
``qkv``'s rows, ``qkv`` and ``proj`` called as layers. ``Pruned<torchvision class>`` subclasses use it
as their forward; :func:`computing_twin` swaps them into a copy of a model, so tracing (through
``torch.export``), calibration hooks and the pruned model all run this one computation. torchvision
is not a dependency: modules are recognised by their class, and the subclasses are made on first use.
"""

from __future__ import annotations

import copy
import importlib
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["computing_twin", "is_window_attention", "pruned_class", "swap", "window_attention"]

_TORCHVISION_MODULE = "torchvision.models.swin_transformer"
_CLASSES = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")
_PREFIX = "Pruned"
_MASKED = -100.0  # torchvision's logit for a token pair from different regions of a shifted window


def _torchvision_base(module: nn.Module) -> type | None:
    """The torchvision window attention class ``module`` is (or derives from), else None."""
    for cls in type(module).__mro__:
        if cls.__module__ == _TORCHVISION_MODULE and cls.__name__ in _CLASSES:
            return cls
    return None


def is_window_attention(module: nn.Module) -> bool:
    """Whether ``module`` is torchvision's Swin window attention (V1 or V2), pruned or not."""
    return _torchvision_base(module) is not None


def _shifted_window_mask(height: int, width: int, window: list[int], shift: list[int], like: Tensor) -> Tensor:
    """(windows, N, N) logits to add: 0 within one region of the rolled map, -100 across regions."""
    regions = like.new_zeros((height, width))
    count = 0
    for h0, h1 in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for w0, w1 in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            regions[h0:h1, w0:w1] = count
            count += 1
    regions = regions.view(height // window[0], window[0], width // window[1], window[1])
    regions = regions.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    differ = regions.unsqueeze(1) - regions.unsqueeze(2)
    return differ.masked_fill(differ != 0, _MASKED).masked_fill(differ == 0, 0.0)


def window_attention(module: nn.Module, x: Tensor) -> Tensor:
    """torchvision's ``shifted_window_attention`` for ``module`` on ``x`` (B, H, W, C), with the
    head width taken from ``qkv``'s rows (``3 · heads · head_dim``) and ``qkv``, ``proj`` (and V2's
    ``cpb_mlp``) called as layers. At full width it is the same computation, op for op."""
    window: list[int] = list(module.window_size)
    shift: list[int] = list(module.shift_size)
    heads: int = module.num_heads
    inner = module.qkv.weight.shape[0] // 3
    head_dim = inner // heads
    bias = module.get_relative_position_bias()
    logit_scale = getattr(module, "logit_scale", None)

    batch, height, width, _ = x.shape
    pad_r = (window[1] - width % window[1]) % window[1]
    pad_b = (window[0] - height % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, channels = x.shape
    if window[0] >= pad_h:  # a window covering the map: nothing to shift
        shift[0] = 0
    if window[1] >= pad_w:
        shift[1] = 0
    shifted = sum(shift) > 0
    if shifted:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    windows = (pad_h // window[0]) * (pad_w // window[1])
    x = x.view(batch, pad_h // window[0], window[0], pad_w // window[1], window[1], channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch * windows, window[0] * window[1], channels)

    tokens = x.size(1)
    qkv = module.qkv(x)  # V2's key bias, which torchvision zeroes at every call, was zeroed by swap()
    qkv = qkv.reshape(x.size(0), tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:  # V2: cosine attention
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim ** -0.5).matmul(k.transpose(-2, -1))
    attn = attn + bias
    if shifted:
        mask = _shifted_window_mask(pad_h, pad_w, window, shift, x)
        attn = attn.view(x.size(0) // windows, windows, heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=module.attention_dropout, training=module.training)

    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), tokens, heads * head_dim)
    x = F.dropout(module.proj(x), p=module.dropout, training=module.training)
    out = x.size(-1)
    x = x.view(batch, pad_h // window[0], pad_w // window[1], window[0], window[1], out)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, out)
    if shifted:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :height, :width, :].contiguous()


def _forward(self: nn.Module, x: Tensor) -> Tensor:
    return window_attention(self, x)


def pruned_class(base: type) -> type:
    """``Pruned<base>``: ``base`` (a torchvision window attention class) with :func:`window_attention`
    as its forward. Made once and kept in this module, so pickle finds it by name."""
    name = _PREFIX + base.__name__
    cls = globals().get(name)
    if cls is None or cls.__bases__ != (base,):  # another class of the same name (a test's stand-in)
        cls = type(name, (base,), {"forward": _forward, "__module__": __name__, "__doc__": (
            f"torchvision's {base.__name__} whose heads may be pruned: see secateurs.window_attention.")})
        globals()[name] = cls
    return cls


def __getattr__(name: str) -> Any:
    """``Pruned<class>`` on demand (unpickling a pruned model in a fresh process)."""
    if name.startswith(_PREFIX) and name[len(_PREFIX):] in _CLASSES:
        return pruned_class(getattr(importlib.import_module(_TORCHVISION_MODULE), name[len(_PREFIX):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unswapped(module: nn.Module) -> type | None:
    """The torchvision class of a module that is exactly that class, else None (a user's subclass
    may compute differently, and one already swapped is done)."""
    base = _torchvision_base(module)
    return base if base is type(module) else None


def swap(module: nn.Module) -> None:
    """Make a torchvision window attention module compute with :func:`window_attention`, in place.

    V2 zeroes its key bias at every call; the copy's is zeroed here once, so ``qkv`` runs as a layer.
    """
    base = _unswapped(module)
    if base is None:
        return
    if getattr(module, "logit_scale", None) is not None and module.qkv.bias is not None:
        inner = module.qkv.bias.shape[0] // 3
        with torch.no_grad():
            module.qkv.bias[inner:2 * inner].zero_()
    module.__class__ = pruned_class(base)


def computing_twin(model: nn.Module) -> nn.Module:
    """``model`` itself, or, if it has torchvision window attention, a copy whose window attention
    modules compute with :func:`window_attention` (same outputs; the heads visible to tracing and hooks)."""
    if not any(_unswapped(m) is not None for m in model.modules()):
        return model
    twin = copy.deepcopy(model)
    for module in twin.modules():
        swap(module)
    return twin
