"""Sizes written in the model's code (reshape to ``self.c``, ``C // self.n_head``) freeze their channels.

The independent truth is the model itself: every group the graph calls prunable is cut by one
unit and the sliced model must still run, while every group frozen for a fixed size would, if
cut, break the model (checked by slicing its weights by hand).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs
from secateurs.graph import build
from secateurs.models import reference


class PatchEmbed(nn.Module):
    """torchvision ViT's ``x.reshape(n, self.hidden_dim, n_h * n_w)``: the width is a literal."""

    def __init__(self, c: int = 16, hidden: int = 24) -> None:
        super().__init__()
        self.c = c
        self.proj = nn.Conv2d(3, c, 4, 4)
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.GELU(), nn.Linear(hidden, c))
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        x = x.reshape(x.shape[0], self.c, -1).permute(0, 2, 1)
        x = x + self.mlp(x)
        return self.head(x.mean(1))


class OwnSize(nn.Module):
    """``x.view(x.size(0), x.size(1), -1)`` reads the dim's own size: still prunable."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y.view(y.size(0), y.size(1), -1).mean(-1)
        return self.fc(y)


class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: split by ``self.n_embd``, head_dim computed from ``C``."""

    def __init__(self, n_embd: int = 16, n_head: int = 4) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.ln = nn.LayerNorm(d)
        self.attn = NanoAttention(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.out = nn.Linear(d, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.attn(self.ln(x))
        x = x + self.proj(F.gelu(self.fc(x)))
        return self.out(x)


class Unflattened(nn.Module):
    """``nn.Unflatten(1, (4, 3))`` on a Linear's 12 features: the sizes are the module's constants."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 12)
        self.unflat = nn.Unflatten(1, (4, 3))
        self.conv = nn.Conv1d(4, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.unflat(self.fc(x)))


def _cut_one_unit_each(model: nn.Module, example: torch.Tensor) -> None:
    """Every prunable group loses its last unit (one group at a time) and the sliced model runs."""
    graph = build(model, example)
    for g in graph.prunable_groups():
        plan = secateurs.PrunePlan.from_graph(graph, {g.name: list(range(g.size - 1))})
        small = secateurs.apply(model, plan, graph=graph)
        small(example)


def _frozen(graph, name: str) -> str:  # noqa: ANN001
    g = graph.group(name)
    assert not g.prunable, f"{name} should be frozen"
    return g.reason


def test_literal_width_in_reshape_freezes_the_channels_it_fixes() -> None:
    m, x = PatchEmbed().eval(), torch.randn(2, 3, 16, 16)
    graph = build(m, x)
    assert "fixes this size at 16, a constant in the model's code" in _frozen(graph, "proj:out")
    assert "'reshape'" in _frozen(graph, "proj:out")
    assert graph.group("mlp.0:out").prunable
    _cut_one_unit_each(m, x)
    with pytest.raises(RuntimeError):  # cutting the frozen width by hand really breaks the model
        cut = PatchEmbed(c=15, hidden=24)
        cut.c = 16
        cut(x)


def test_a_size_read_from_the_dims_own_channels_stays_prunable() -> None:
    m, x = OwnSize().eval(), torch.randn(2, 3, 5, 5)
    graph = build(m, x)
    assert graph.group("conv:out").prunable
    _cut_one_unit_each(m, x)


def test_nanogpt_attention_freezes_heads_and_the_stream_it_reads() -> None:
    m, x = NanoBlock().eval(), torch.randn(2, 6, 8)
    graph = build(m, x)
    heads = [g for g in graph.groups if g.name.endswith(":heads")]
    assert heads and all("split at node 'split' fixes this size at 16" in g.reason for g in heads)
    assert "computes a size from these channels' count" in _frozen(graph, "inp:out")
    assert graph.group("fc:out").prunable  # the MLP's hidden neurons are untouched by the attention
    _cut_one_unit_each(m, x)
    result = secateurs.prune(m, [x, torch.randn(2, 6, 8)], secateurs.Budget(params=0.8), progress=False,
                             error_curve=False)
    assert result.model(x).shape == m(x).shape


def test_unflatten_constants_freeze_the_features_they_split() -> None:
    m, x = Unflattened().eval(), torch.randn(3, 5)
    graph = build(m, x)
    assert "fixes this size at 4" in _frozen(graph, "fc:out")


def test_head_counts_that_apply_rewrites_stay_prunable() -> None:
    """Hand-written attention views to ``self.num_heads``: apply updates it, so heads prune."""
    model = reference.gpt()
    x = torch.randint(0, 32, (2, 8))
    graph = build(model, x)
    heads = [g for g in graph.groups if g.name.endswith(":heads")]
    assert heads and all(g.prunable for g in heads)
    _cut_one_unit_each(model, x)


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d: arithmetic on buffers, which fx folds unless buffers are proxied."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name, value in (("weight", torch.rand(n) + 0.5), ("bias", torch.randn(n)), ("running_mean", torch.randn(n)),
                            ("running_var", torch.rand(n) + 0.5)):
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + 1e-5).rsqrt()
        return x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)


class Scaled(nn.Module):
    """A plain tensor attribute (not a buffer) multiplied into a conv's output: a constant to fx."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.s = torch.linspace(0.5, 1.5, 6).reshape(1, 6, 1, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x) * self.s)


def test_buffers_are_traced_by_name_so_frozen_batch_norm_prunes_and_the_model_gains_no_attributes() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    before = set(vars(m))
    graph = build(m, x)
    build(m, x)
    assert set(vars(m)) == before  # fx's _tensor_constant attributes are not left on the caller's model
    members = {f"{mb.module}.{mb.param}" for mb in graph.group("0:out").members}
    assert {"1.weight", "1.running_var", "1.bias", "1.running_mean"} <= members
    keep = [0, 2, 3, 5, 7]
    small = secateurs.apply(m, secateurs.PrunePlan.from_graph(graph, {"0:out": keep}), graph=graph)
    masked = secateurs.apply(m, secateurs.PrunePlan.from_graph(graph, {"0:out": keep}), mode="mask")
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    assert small[1].running_var.shape == (5,)


def test_a_plain_tensor_attribute_freezes_the_channels_it_scales() -> None:
    m, x = Scaled().eval(), torch.randn(2, 3, 5, 5)
    graph = build(m, x)
    assert "tensor constant" in _frozen(graph, "conv:out")
    assert not [k for k in vars(m) if k.startswith("_tensor_constant")]


class TimmAttention(nn.Module):
    """timm's Attention: heads merged back with ``reshape(B, N, self.<merged>)``."""

    def __init__(self, merged: str, dim: int = 16, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.merged = num_heads, dim // num_heads, merged
        setattr(self, merged, dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, getattr(self, self.merged)))


class TimmBlock(nn.Module):
    def __init__(self, merged: str) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = TimmAttention(merged)
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        return self.out(x + self.attn(x))


def test_merged_heads_literal_prunes_when_apply_rewrites_it_and_freezes_when_it_does_not() -> None:
    x = torch.randn(2, 5, 8)
    timm = TimmBlock("attn_dim").eval()  # timm names it attn_dim, which apply rewrites with the heads
    assert build(timm, x).group("attn:heads").prunable
    _cut_one_unit_each(timm, x)
    small = secateurs.apply(timm, secateurs.PrunePlan.from_graph(build(timm, x), {"attn:heads": [0, 2]}))
    assert small.attn.attn_dim == 8 and small.attn.num_heads == 2
    other = TimmBlock("embed_dim").eval()  # an attribute apply leaves alone: the literal is fixed
    assert "fixes this size at 16" in _frozen(build(other, x), "attn:heads")
