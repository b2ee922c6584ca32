"""A stand-in for torchvision's Swin window attention, for tests that run without torchvision.

The classes carry torchvision's names, module path and attributes, which is all secateurs reads
to recognise them. Their forward is this file's own reference: a loop over windows and heads with
explicit region labels for the shifted-window mask, written apart from secateurs.window_attention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

SWIN_MODULE = "torchvision.models.swin_transformer"


def _relative_index(window: tuple[int, int]) -> Tensor:
    """Row of the bias table for each pair of window positions (i, j), flattened."""
    rows = [(r, c) for r in range(window[0]) for c in range(window[1])]
    return torch.tensor([(ri - rj + window[0] - 1) * (2 * window[1] - 1) + (ci - cj + window[1] - 1)
                         for ri, ci in rows for rj, cj in rows])


class ShiftedWindowAttention(nn.Module):
    """torchvision's V1 attributes; ``forward`` is the per-window, per-head reference."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int) -> None:
        super().__init__()
        self.window_size, self.shift_size, self.num_heads = window_size, shift_size, num_heads
        self.attention_dropout, self.dropout = 0.0, 0.0
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.define_relative_position_bias_table()
        self.register_buffer("relative_position_index", _relative_index(tuple(window_size)))

    def define_relative_position_bias_table(self) -> None:
        cells = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(0.5 * torch.randn(cells, self.num_heads))

    def bias_rows(self) -> Tensor:
        return self.relative_position_bias_table

    def get_relative_position_bias(self) -> Tensor:
        n = self.window_size[0] * self.window_size[1]
        return self.bias_rows()[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: Tensor) -> Tensor:
        return reference_attention(self, x)


class ShiftedWindowAttentionV2(ShiftedWindowAttention):
    """torchvision's V2: cosine attention with a per-head logit scale, the bias from a small MLP,
    and a key bias that the forward ignores."""

    def __init__(self, dim: int, window_size: list[int], shift_size: list[int], num_heads: int) -> None:
        super().__init__(dim, window_size, shift_size, num_heads)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(num_heads, 1, 1) + 1))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, num_heads, bias=False))

    def define_relative_position_bias_table(self) -> None:
        h = torch.arange(-(self.window_size[0] - 1), self.window_size[0], dtype=torch.float32)
        w = torch.arange(-(self.window_size[1] - 1), self.window_size[1], dtype=torch.float32)
        table = torch.stack(torch.meshgrid(h, w, indexing="ij"), dim=-1).unsqueeze(0) / 4
        self.register_buffer("relative_coords_table", table)

    def bias_rows(self) -> Tensor:
        return self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)

    def get_relative_position_bias(self) -> Tensor:
        return 16 * torch.sigmoid(super().get_relative_position_bias())


for _cls in (ShiftedWindowAttention, ShiftedWindowAttentionV2):
    _cls.__module__ = SWIN_MODULE


def _band(i: int, size: int, window: int, shift: int) -> int:
    """Which of the rolled map's three bands position ``i`` of an axis lies in (shifted windows)."""
    return 0 if i < size - window else 1 if i < size - shift else 2


def reference_attention(mod: ShiftedWindowAttention, x: Tensor) -> Tensor:
    """Window attention computed one window and one head at a time."""
    batch, height, width, _ = x.shape
    wh, ww = mod.window_size
    x = F.pad(x, (0, 0, 0, (-width) % ww, 0, (-height) % wh))
    ph, pw = x.shape[1], x.shape[2]
    sh = 0 if wh >= ph else mod.shift_size[0]
    sw = 0 if ww >= pw else mod.shift_size[1]
    x = torch.roll(x, (-sh, -sw), (1, 2))
    heads = mod.num_heads
    inner = mod.qkv.weight.shape[0] // 3
    hd = inner // heads
    weight, bias = mod.qkv.weight, mod.qkv.bias.clone()
    v2 = hasattr(mod, "logit_scale")
    if v2:
        bias[inner:2 * inner] = 0
    position_bias = mod.get_relative_position_bias()[0]
    out = x.new_zeros(batch, ph, pw, mod.proj.weight.shape[0])
    for r in range(0, ph, wh):
        for c in range(0, pw, ww):
            tokens = x[:, r:r + wh, c:c + ww].reshape(batch, wh * ww, -1)
            regions = torch.tensor([_band(r + i, ph, wh, sh) * 3 + _band(c + j, pw, ww, sw)
                                    for i in range(wh) for j in range(ww)])
            mask = (regions[:, None] != regions[None, :]).float() * -100.0 if sh or sw else 0.0
            qkv = tokens @ weight.T + bias
            outputs = []
            for h in range(heads):
                q, k, v = (qkv[..., part * inner + h * hd: part * inner + (h + 1) * hd] for part in range(3))
                if v2:
                    scale = torch.clamp(mod.logit_scale[h, 0, 0], max=math.log(100.0)).exp()
                    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2) * scale
                else:
                    logits = q @ k.transpose(1, 2) / math.sqrt(hd)
                outputs.append(torch.softmax(logits + position_bias[h] + mask, dim=-1) @ v)
            out[:, r:r + wh, c:c + ww] = mod.proj(torch.cat(outputs, dim=-1)).view(batch, wh, ww, -1)
    out = torch.roll(out, (sh, sw), (1, 2))
    return out[:, :height, :width].contiguous()


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, v2: bool) -> None:
        super().__init__()
        attention = ShiftedWindowAttentionV2 if v2 else ShiftedWindowAttention
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attention(dim, [window, window], [shift, shift], heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinySwin(nn.Module):
    """Patch embedding, a plain and a shifted block, pooling and a classifier: Swin's layout."""

    def __init__(self, dim: int = 16, heads: int = 4, window: int = 3, v2: bool = False) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, kernel_size=2, stride=2)
        self.blocks = nn.Sequential(SwinBlock(dim, heads, window, 0, v2), SwinBlock(dim, heads, window, 1, v2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.embed(x).permute(0, 2, 3, 1))
        return self.head(self.norm(x).mean(dim=(1, 2)))
