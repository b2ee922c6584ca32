"""apply: every invalid plan refused before anything is touched; slice and mask exact; inplace atomic.

Most cases use Groups written by hand (apply must need nothing but the plan); attention and
tied-weight cases use the graph builder to find their groups.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from secateurs.apply import (
    PrunedMultiheadAttention,
    ZeroWidthBatchNorm2d,
    ZeroWidthConv1d,
    ZeroWidthConv2d,
    apply,
    conv_output_size,
    narrow,
    widen,
)
from secateurs.errors import InvalidPlanError, ValidationError
from secateurs.graph import build, dense_counts
from secateurs.graph.groups import Group, Member
from secateurs.models.reference import REFERENCE_MODELS
from secateurs.plan import PrunePlan


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gn(self.dw(F.relu(self.bn(self.conv(x)))))
        return self.fc(y.mean((2, 3)))


def tiny() -> Tiny:
    torch.manual_seed(0)
    m = Tiny().eval()
    with torch.no_grad():  # non-trivial statistics and affines, so masking them is visible
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 2)
        m.gn.weight.uniform_(0.5, 2)
    return m


def groups() -> dict[str, Group]:
    chan = Group("conv:out", 4, [
        Member("conv", "weight", 0, "producer"), Member("conv", "bias", 0),
        Member("bn", "weight", 0), Member("bn", "bias", 0), Member("bn", "running_mean", 0),
        Member("bn", "running_var", 0), Member("dw", "weight", 0), Member("dw", "bias", 0),
        Member("gn", "weight", 0), Member("gn", "bias", 0), Member("fc", "weight", 1, "consumer"),
    ])
    cin = Group("conv:in", 2, [Member("conv", "weight", 1, "consumer")], prunable=False, reason="reaches model input 'x'")
    out = Group("fc:out", 3, [Member("fc", "weight", 0, "producer"), Member("fc", "bias", 0)], prunable=False,
                reason="reaches model output 'output'")
    return {g.name: g for g in (chan, cin, out)}


def plan(keep: dict[str, list[int]], **kw: Any) -> PrunePlan:
    return PrunePlan(keep, groups=groups(), **kw)


X = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(1))


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def same_state(m: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    sd = m.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) and sd[k].dtype == snap[k].dtype for k in sd)


# -- slice ----------------------------------------------------------------------------------------


def test_slice_shapes_attributes_repr_and_training() -> None:
    m = tiny()
    snap = snapshot(m)
    s = apply(m, plan({"conv:out": [0, 3]}))
    assert same_state(m, snap)  # the input model is untouched
    assert s.conv.weight.shape == (2, 2, 3, 3) and s.fc.weight.shape == (3, 2)
    assert (s.conv.out_channels, s.bn.num_features, s.fc.in_features) == (2, 2, 2)
    assert (s.dw.in_channels, s.dw.out_channels, s.dw.groups) == (2, 2, 2)
    assert s.gn.num_channels == 2 and s.gn.num_groups == 2
    text = repr(s)
    assert "Conv2d(2, 2, kernel_size=(3, 3)" in text and "BatchNorm2d(2," in text
    assert "Conv2d(2, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=2)" in text
    assert "GroupNorm(2, 2," in text and "Linear(in_features=2, out_features=3" in text
    torch.testing.assert_close(s.conv.weight, m.conv.weight[[0, 3]])
    torch.testing.assert_close(s.fc.weight, m.fc.weight[:, [0, 3]])
    torch.testing.assert_close(s.bn.running_var, m.bn.running_var[[0, 3]])
    s.train()
    s(X).square().sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in s.parameters())


def test_slice_equals_mask_when_no_norm_mixes_the_pruned_dim() -> None:
    m = tiny()
    m.gn = nn.GroupNorm(4, 4)  # one channel per group: statistics do not mix channels
    with torch.no_grad():
        m.gn.weight.uniform_(0.5, 2)
    p = plan({"conv:out": [1, 2]})
    torch.testing.assert_close(apply(m, p)(X), apply(m, p, mode="mask")(X), rtol=1e-5, atol=1e-6)


def test_parameters_keep_requires_grad_dtype_and_are_new() -> None:
    m = tiny().double()
    m.conv.weight.requires_grad_(False)
    s = apply(m, plan({"conv:out": [0, 2]}))
    assert not s.conv.weight.requires_grad and s.conv.bias.requires_grad
    assert all(p.dtype == torch.float64 for p in s.parameters())
    assert isinstance(s.conv.weight, nn.Parameter)
    assert not isinstance(s.bn.running_mean, nn.Parameter) and "running_mean" in dict(s.bn.named_buffers())
    assert s.conv.weight.data_ptr() != m.conv.weight.data_ptr()
    assert s(X.double()).shape == (3, 3)


def test_conv_sliced_along_both_dims_by_two_groups() -> None:
    m = nn.Sequential(nn.Conv2d(3, 5, 1), nn.ReLU(), nn.Conv2d(5, 4, 1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    g1 = Group("a", 5, [Member("0", "weight", 0), Member("0", "bias", 0), Member("2", "weight", 1, "consumer")])
    g2 = Group("b", 4, [Member("2", "weight", 0), Member("2", "bias", 0), Member("4", "weight", 1, "consumer")])
    s = apply(m, PrunePlan({"a": [0, 4], "b": [1, 2, 3]}, groups={"a": g1, "b": g2}))
    assert s[2].weight.shape == (3, 2, 1, 1) and (s[2].in_channels, s[2].out_channels) == (2, 3)
    torch.testing.assert_close(s[2].weight, m[2].weight[[1, 2, 3]][:, [0, 4]])


def test_conv_transpose_and_layernorm_embedding_attributes() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 6)
            self.ln = nn.LayerNorm(6)
            self.up = nn.ConvTranspose1d(6, 4, 2, stride=2)
            self.out = nn.Conv1d(4, 1, 1)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.up(self.ln(self.emb(ids)).transpose(1, 2)))

    m = M()
    g = build(m, torch.randint(0, 7, (2, 5)))
    keep = {"emb:out": [0, 2, 5], "up:out": [1, 3]}
    s = apply(m, PrunePlan.from_graph(g, keep), graph=g)
    assert (s.emb.num_embeddings, s.emb.embedding_dim) == (7, 3)
    assert s.ln.normalized_shape == (3,)
    assert (s.up.in_channels, s.up.out_channels) == (3, 2) and s.up.weight.shape == (3, 2, 2)
    assert "Embedding(7, 3)" in repr(s) and "LayerNorm((3,)" in repr(s) and "ConvTranspose1d(3, 2" in repr(s)


def test_tied_weights_stay_tied() -> None:
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(9, 6)
            self.mid = nn.Linear(6, 6)
            self.head = nn.Linear(6, 9, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mid(self.emb(ids))))

    m = LM()
    g = build(m, torch.randint(0, 9, (2, 4)))
    name = next(gr.name for gr in g.prunable_groups() if any(mb.module == "emb" for mb in gr.members))
    s = apply(m, PrunePlan.from_graph(g, {name: [1, 4]}), graph=g)
    assert s.head.weight is s.emb.weight and s.emb.weight.shape == (9, 2)
    assert sum(p.numel() for p in s.parameters()) == 9 * 2 + s.mid.weight.numel() + s.mid.bias.numel()
    assert m.head.weight is m.emb.weight and m.emb.weight.shape == (9, 6)


# -- attention ------------------------------------------------------------------------------------


class MHANet(nn.Module):
    def __init__(self, e: int = 8, heads: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(3, e)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=batch_first)
        self.out = nn.Linear(e, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(torch.relu(self.attn(h, h, h, need_weights=False)[0]))


@pytest.mark.parametrize("keep", [{"attn:heads": [0, 3]}, {"inp:out": [0, 1, 2, 5, 7]},
                                  {"attn:heads": [1], "inp:out": [2, 3, 4]}])
def test_multihead_attention_heads_and_embed(keep: dict[str, list[int]]) -> None:
    torch.manual_seed(0)
    m = MHANet().eval()
    x = torch.randn(2, 5, 3)
    g = build(m, x)
    p = PrunePlan.from_graph(g, keep)
    s = apply(m, p, graph=g)
    a = s.attn
    heads = len(keep.get("attn:heads", range(4)))
    embed = len(keep.get("inp:out", range(8)))
    assert (a.embed_dim, a.num_heads, a.head_dim) == (embed, heads, 2)
    # without a residual the out-projection's output is a group of its own: it keeps 8 here
    assert a.in_proj_weight.shape == (3 * heads * 2, embed) and a.out_proj.weight.shape == (8, heads * 2)
    assert f"embed_dim={embed}, num_heads={heads}, head_dim=2" in repr(s)
    torch.testing.assert_close(s(x), apply(m, p, mode="mask")(x), rtol=1e-5, atol=1e-6)
    s.train()
    s(x).sum().backward()
    assert a.in_proj_weight.grad is not None
    assert isinstance(m.attn, nn.MultiheadAttention) and not isinstance(m.attn, PrunedMultiheadAttention)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_pruned_mha_matches_stock_module(batch_first: bool, need_weights: bool) -> None:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    ours = nn.MultiheadAttention(8, 2, batch_first=batch_first).eval()
    ours.load_state_dict(ref.state_dict())
    ours.__class__ = PrunedMultiheadAttention
    q = torch.randn(3, 4, 8)  # batch-first layout (N=3, L=4); S=6 keys
    kv = torch.randn(3, 6, 8)
    if not batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    kpm = torch.zeros(3, 6)
    kpm[:, -1] = float("-inf")
    am = torch.randn(4, 6)
    kwargs = dict(key_padding_mask=kpm, attn_mask=am, need_weights=need_weights)
    with torch.enable_grad():  # the stock module's regular path (not the inference fast path)
        want, want_w = ref(q, kv, kv, **kwargs)
        got, got_w = ours(q, kv, kv, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    else:
        assert got_w is None
    with torch.enable_grad():
        unb, _ = ours(q[:, 0], kv[:, 0], kv[:, 0])
        ref_unb, _ = ref(q[:, 0], kv[:, 0], kv[:, 0])
    torch.testing.assert_close(unb, ref_unb, rtol=1e-5, atol=1e-6)


class HandAttention(nn.Module):
    def __init__(self, e: int = 8, num_attention_heads: int = 4) -> None:
        super().__init__()
        self.num_attention_heads = num_attention_heads
        self.head_dim = e // num_attention_heads
        self.all_head_size = e
        self.qkv = nn.Linear(e, 3 * e)
        self.o = nn.Linear(e, e)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(self.all_head_size, dim=-1)
        q, k, v = (z.view(b, t, self.num_attention_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)
        return self.o((w @ v).transpose(1, 2).reshape(b, t, self.all_head_size))


class HandNet(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.attn = attn
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(self.inp(x)))


def test_hand_written_attention_attributes_updated() -> None:
    torch.manual_seed(0)
    m = HandNet(HandAttention()).eval()
    x = torch.randn(2, 5, 3)
    g = build(m, x)
    p = PrunePlan.from_graph(g, {"attn:heads": [0, 2, 3]})
    s = apply(m, p, graph=g)
    assert (s.attn.num_attention_heads, s.attn.head_dim, s.attn.all_head_size) == (3, 2, 6)
    assert m.attn.num_attention_heads == 4
    torch.testing.assert_close(s(x), apply(m, p, mode="mask")(x), rtol=1e-5, atol=1e-6)


class OddAttention(HandAttention):
    """Counts its heads in an attribute apply cannot know: slicing it breaks the forward (build freezes
    its heads for that reason; apply's own check is what catches a plan from another graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.h = self.num_attention_heads
        del self.num_attention_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.h, self.head_dim).transpose(1, 2) for z in (q, k, v))
        w = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.o((w @ v).transpose(1, 2).reshape(b, t, self.h * self.head_dim))


def test_failing_result_is_reported_and_inplace_leaves_model_untouched() -> None:
    torch.manual_seed(0)
    m = HandNet(OddAttention()).eval()
    x = torch.randn(2, 5, 3)
    assert not build(m, x).group("attn:heads").prunable  # the graph sees the literal head count...
    g = build(HandNet(HandAttention()).eval(), x)  # ...so take the graph of the same layers with heads apply can count
    snap = snapshot(m)
    with pytest.raises(InvalidPlanError, match=r"sliced model fails on the graph's example inputs: .*unchanged"):
        apply(m, PrunePlan.from_graph(g, {"attn:heads": [0, 1]}), graph=g, inplace=True)
    assert same_state(m, snap) and type(m.attn) is OddAttention
    assert m.attn.qkv.out_features == 24


# -- mask -----------------------------------------------------------------------------------------


def test_mask_zeroes_exactly_the_removed_slices() -> None:
    m = tiny()
    snap = snapshot(m)
    mk = apply(m, plan({"conv:out": [1, 3]}), mode="mask")
    assert same_state(m, snap)
    gone = [0, 2]
    for key, t in mk.state_dict().items():
        before = snap[key]
        assert t.shape == before.shape
        mod, _, param = key.rpartition(".")
        members = [mb for mb in groups()["conv:out"].members if (mb.module, mb.param) == (mod, param)]
        expect = before.clone()
        for mb in members:
            expect.index_fill_(mb.dim, torch.tensor(gone), 0)
        assert torch.equal(t, expect), key
    assert repr(mk) == repr(m)
    assert torch.count_nonzero(mk.conv.weight[[0, 2]]) == 0 and torch.count_nonzero(mk.fc.weight[:, [0, 2]]) == 0


# -- inplace --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_inplace_returns_the_same_object_pruned(mode: str) -> None:
    m = tiny()
    ref = apply(m, plan({"conv:out": [0, 1]}), mode=mode)  # type: ignore[arg-type]
    out = apply(m, plan({"conv:out": [0, 1]}), mode=mode, inplace=True)  # type: ignore[arg-type]
    assert out is m
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values(), strict=True))
    torch.testing.assert_close(m(X), ref(X))
    assert repr(m) == repr(ref)


def test_multihead_attention_at_the_root_inplace() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2)
    g = Group("attn:heads", 2, [Member("", "in_proj_weight", 0, "producer", offset=j * 4, block=2) for j in range(3)]
              + [Member("", "in_proj_bias", 0, "passthrough", offset=j * 4, block=2) for j in range(3)]
              + [Member("out_proj", "weight", 1, "consumer", block=2)], unit_width=2)
    out = apply(mha, PrunePlan({"attn:heads": [1]}, groups={"attn:heads": g}), inplace=True)
    assert out is mha and isinstance(mha, PrunedMultiheadAttention) and mha.num_heads == 1
    q = torch.randn(3, 2, 4)
    assert mha(q, q, q)[0].shape == (3, 2, 4)


# -- refit --------------------------------------------------------------------------------------------


def test_refit_slice_and_mask() -> None:
    m = tiny()
    w = torch.arange(6.0).view(3, 2)
    p = plan({"conv:out": [1, 2]}, refit={"fc.weight": w})
    s = apply(m, p)
    assert torch.equal(s.fc.weight, w) and isinstance(s.fc.weight, nn.Parameter)
    mk = apply(m, p, mode="mask")
    expect = torch.zeros(3, 4)
    expect[:, [1, 2]] = w
    assert torch.equal(mk.fc.weight, expect)
    torch.testing.assert_close(s.fc(torch.ones(1, 2)), mk.fc(torch.tensor([[0.0, 1, 1, 0]])))


# -- invalid plans ---------------------------------------------------------------------------------


def _with(extra: Group) -> dict[str, Group]:
    gs = groups()
    gs[extra.name] = extra
    return gs


INVALID = [
    (PrunePlan({"nope": [0]}, groups=groups()), r"unknown group 'nope'"),
    (PrunePlan({"conv:out": [0, 4]}, groups=groups()), r"group 'conv:out': unit index 4 out of range \[0, 4\)"),
    (PrunePlan({"conv:out": [-1, 0]}, groups=groups()), r"group 'conv:out': unit index -1 out of range"),
    (PrunePlan({"conv:out": [2, 1]}, groups=groups()), r"group 'conv:out': kept units must be sorted and unique"),
    (PrunePlan({"conv:out": [1, 1]}, groups=groups()), r"group 'conv:out': kept units must be sorted and unique"),
    (PrunePlan({"conv:out": []}, groups=groups()), r"group 'conv:out': every unit removed"),
    (PrunePlan({"fc:out": [0, 2]}, groups=groups()), r"group 'fc:out' is frozen \(reaches model output 'output'\)"),
    (PrunePlan({"conv:out": [0, 1, 2]}, groups=groups()),
     r"group\(s\) 'conv:out': GroupNorm 'gn' would keep 3 channels, not a multiple of num_groups=2"),
    (PrunePlan({"g": [0]}, groups=_with(Group("g", 2, [Member("missing", "weight", 0)]))),
     r"group 'g': module 'missing' not found in Tiny"),
    (PrunePlan({"g": [0]}, groups=_with(Group("g", 2, [Member("fc", "scale", 0)]))),
     r"group 'g': 'fc.scale' is not a parameter or buffer of Tiny"),
    (PrunePlan({"g": [0]}, groups=_with(Group("g", 2, [Member("fc", "bias", 1)]))),
     r"group 'g': 'fc.bias' has 1 dims, member indexes dim 1"),
    (PrunePlan({"g": [0]}, groups=_with(Group("g", 5, [Member("fc", "bias", 0)]))),
     r"group 'g': its 5 units reach index 4 of 'fc.bias' dim 0, which has size 3"),
    (PrunePlan({"conv:out": [0, 1]}), r"the plan embeds no group definitions"),
    (PrunePlan({"conv:out": [0, 1]}, groups=groups(), refit={"fc.weight": torch.zeros(3, 4)}),
     r"refit\['fc.weight'\]: shape \(3, 4\), but the sliced tensor has shape \(3, 2\)"),
    (PrunePlan({"conv:out": [0, 1]}, groups=groups(), refit={"fc.gain": torch.zeros(3)}),
     r"refit\['fc.gain'\]: no such parameter or buffer in Tiny"),
]


@pytest.mark.parametrize(("bad", "pattern"), INVALID)
@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_invalid_plans_raise_before_touching(bad: PrunePlan, pattern: str, mode: str) -> None:
    m = tiny()
    snap = snapshot(m)
    with pytest.raises(InvalidPlanError, match=pattern):
        apply(m, bad, mode=mode, inplace=True)  # type: ignore[arg-type]
    assert same_state(m, snap) and m.conv.out_channels == 4


# -- grouped convolutions -----------------------------------------------------------------------


class GroupedBlock(nn.Module):
    """1x1 (8) -> grouped 3x3 (groups=2, 8 -> 6) -> BN -> 1x1: the ResNeXt pattern."""

    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = (nn.ConvTranspose2d if transposed else nn.Conv2d)(8, 6, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.bn(self.b(F.relu(self.a(x))))))


def grouped_block(transposed: bool = False) -> tuple[GroupedBlock, Any]:
    torch.manual_seed(0)
    m = GroupedBlock(transposed).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    return m, build(m, torch.randn(2, 3, 6, 6))


#: a:out drops within-group input 1 (channels 1 and 5), b:out drops within-group output 1 (channels 1 and 4)
GROUPED_KEEP = {"a:out": [0, 2, 3], "b:out": [0, 2]}


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_conv_slice_shapes_attributes_repr_backward(transposed: bool) -> None:
    m, g = grouped_block(transposed)
    snap = snapshot(m)
    s = apply(m, PrunePlan.from_graph(g, GROUPED_KEEP), graph=g)
    assert same_state(m, snap)
    assert (s.b.in_channels, s.b.out_channels, s.b.groups) == (6, 4, 2)
    assert s.a.out_channels == 6 and s.bn.num_features == 4 and s.c.in_channels == 4
    ins, outs = [0, 2, 3, 4, 6, 7], [0, 2, 3, 5]
    if transposed:  # weight (in, out/groups, k, k)
        assert s.b.weight.shape == (6, 2, 3, 3)
        torch.testing.assert_close(s.b.weight, m.b.weight[ins][:, [0, 2]])
        assert "ConvTranspose2d(6, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=2)" in repr(s)
    else:  # weight (out, in/groups, k, k)
        assert s.b.weight.shape == (4, 3, 3, 3)
        torch.testing.assert_close(s.b.weight, m.b.weight[outs][:, [0, 2, 3]])
        assert "Conv2d(6, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=2)" in repr(s)
    torch.testing.assert_close(s.a.weight, m.a.weight[ins])
    torch.testing.assert_close(s.b.bias, m.b.bias[outs])
    torch.testing.assert_close(s.bn.running_var, m.bn.running_var[outs])
    torch.testing.assert_close(s.c.weight, m.c.weight[:, outs])
    fresh = (nn.ConvTranspose2d if transposed else nn.Conv2d)(6, 4, 3, padding=1, groups=2)
    assert repr(fresh) in repr(s.b)  # the sliced module is what a fresh one of that size prints
    s.train()
    s(torch.randn(2, 3, 6, 6)).square().sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in s.parameters())


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_conv_mask_zeroes_exactly_the_removed_slices_and_agrees_with_slice(transposed: bool) -> None:
    m, g = grouped_block(transposed)
    p = PrunePlan.from_graph(g, GROUPED_KEEP)
    mk = apply(m, p, mode="mask")
    gone_in, gone_out = [1, 5], [1, 4]  # within index 1 of each group, on either side
    expect = {name: t.clone() for name, t in m.state_dict().items()}
    for key in ("a.weight", "a.bias"):
        expect[key][gone_in] = 0
    for key in ("b.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        expect[key][gone_out] = 0
    expect["c.weight"][:, gone_out] = 0
    if transposed:
        expect["b.weight"][gone_in] = 0
        expect["b.weight"][:, [1]] = 0
    else:
        expect["b.weight"][gone_out] = 0
        expect["b.weight"][:, [1]] = 0
    state = mk.state_dict()
    assert all(torch.equal(state[k], expect[k]) for k in expect), [k for k in expect if not torch.equal(state[k],
                                                                                                       expect[k])]
    assert (mk.b.in_channels, mk.b.out_channels, mk.b.groups) == (8, 6, 2)
    x = torch.randn(3, 3, 6, 6)
    torch.testing.assert_close(apply(m, p)(x), mk(x), rtol=1e-5, atol=1e-6)


def _strided(param: str, dim: int = 0, role: str = "passthrough") -> Member:
    """Unit j = channel j of each of 2 groups of 2 (what the graph builds for a grouped conv)."""
    return Member("0", param, dim, role, block=2, unit_stride=1, inner_stride=2)  # type: ignore[arg-type]


def _groups(*gs: Group) -> dict[str, Group]:
    return {g.name: g for g in gs}


GROUPED_INVALID = [
    # a plan that removes a whole group (channels 2, 3) of Conv2d(4, 4, groups=2)
    (lambda: nn.Conv2d(4, 4, 1, groups=2),
     _groups(Group("g", 2, [Member("0", "weight", 0, "producer", block=2), Member("0", "bias", 0, block=2)])),
     {"g": [0]}, r"group\(s\) 'g': grouped convolution '0' \(groups=2\) must lose the same channels in each of "
                 r"its 2 groups of 2; 0\.weight dim 0 loses \[2, 3\]"),
    # weight rows within-group (1 and 3), bias contiguous (1): they disagree
    (lambda: nn.Conv2d(4, 4, 1, groups=2), _groups(Group("g", 2, [_strided("weight", role="producer")]),
                                                   Group("h", 4, [Member("0", "bias", 0)])),
     {"g": [0], "h": [0, 2, 3]}, r"group\(s\) 'g', 'h': grouped convolution '0' \(groups=2\): its bias and weight "
                                 r"dim 0 lose different output channels"),
    # the weight loses rows, the bias nothing
    (lambda: nn.Conv2d(4, 4, 1, groups=2), _groups(Group("g", 2, [_strided("weight", role="producer")])),
     {"g": [0]}, r"its bias and weight dim 0 lose different output channels"),
    # transposed: weight dim 0 is the full input and must be uniform too
    (lambda: nn.ConvTranspose2d(4, 4, 1, groups=2), _groups(Group("g", 4, [Member("0", "weight", 0, "consumer")])),
     {"g": [0, 2, 3]}, r"must lose the same channels in each of its 2 groups of 2; 0\.weight dim 0 loses \[1\]"),
    # transposed: the bias (all outputs) must be uniform, and lose what weight dim 1 (within-group outputs) loses
    (lambda: nn.ConvTranspose2d(4, 4, 1, groups=2),
     _groups(Group("g", 2, [Member("0", "weight", 1, "producer"), Member("0", "bias", 0)])),
     {"g": [0]}, r"must lose the same channels in each of its 2 groups of 2; 0\.bias loses \[1\]"),
    (lambda: nn.ConvTranspose2d(4, 4, 1, groups=2),
     _groups(Group("g", 2, [Member("0", "weight", 1, "producer")]), Group("h", 2, [_strided("bias")])),
     {"g": [0], "h": [1]}, r"group\(s\) 'g', 'h': grouped convolution '0' \(groups=2\): its bias and weight dim 1 "
                           r"lose different output channels"),
    # depthwise: channels go, weight and bias alike
    (lambda: nn.Conv2d(4, 4, 1, groups=4), _groups(Group("g", 4, [Member("0", "weight", 0, "producer")])),
     {"g": [0, 1, 2]}, r"grouped convolution '0' \(groups=4\) can only be sliced along its channels, weight and "
                       r"bias alike"),
]


@pytest.mark.parametrize(("make", "groups", "keep", "pattern"), GROUPED_INVALID)
@pytest.mark.parametrize("mode", ["slice", "mask"])
def test_grouped_conv_invalid_plans_raise_before_touching(make: Any, groups: dict[str, Group],
                                                          keep: dict[str, list[int]], pattern: str, mode: str) -> None:
    torch.manual_seed(0)
    m = nn.Sequential(make())
    snap = snapshot(m)
    with pytest.raises(InvalidPlanError, match=pattern):
        apply(m, PrunePlan(keep, groups=groups), mode=mode, inplace=True)  # type: ignore[arg-type]
    assert same_state(m, snap) and (m[0].in_channels, m[0].out_channels) == (4, 4)


def test_grouped_conv_valid_hand_plan_and_depthwise_multiplier() -> None:
    """Hand-written within-group members slice correctly; a depthwise multiplier conv keeps groups = in."""
    m = nn.Sequential(nn.Conv2d(4, 4, 1, groups=2))
    s = apply(m, PrunePlan({"g": [1]}, groups=_groups(Group("g", 2, [_strided("weight", role="producer"),
                                                                      _strided("bias")]))))
    assert (s[0].in_channels, s[0].out_channels, s[0].groups) == (4, 2, 2)
    torch.testing.assert_close(s[0].weight, m[0].weight[[1, 3]])
    t = nn.Sequential(nn.ConvTranspose2d(4, 4, 1, groups=2))  # weight (4, 2): dim 1 within, bias strided
    s = apply(t, PrunePlan({"g": [0]}, groups=_groups(Group("g", 2, [Member("0", "weight", 1, "producer"),
                                                                      _strided("bias")]))))
    assert (s[0].in_channels, s[0].out_channels, s[0].groups) == (4, 2, 2)
    torch.testing.assert_close(s[0].bias, t[0].bias[[0, 2]])
    mult = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Conv2d(8, 2, 1))
    g = build(mult, torch.randn(1, 3, 5, 5))
    s = apply(mult, PrunePlan.from_graph(g, {"1:out": [1]}), graph=g)
    assert (s[1].in_channels, s[1].out_channels, s[1].groups) == (4, 4, 4) and s[2].in_channels == 4
    torch.testing.assert_close(s[1].weight, mult[1].weight[[1, 3, 5, 7]])


class HeadsAttribute(nn.Module):
    """A parent with an int ``num_heads`` equal to a within-group factor's size: not a head count."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 4
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 3, groups=2)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def test_within_group_units_are_not_mistaken_for_heads() -> None:
    m = HeadsAttribute().eval()
    g = build(m, torch.randn(1, 3, 5, 5))
    assert g.group("a:out").size == 4 and g.group("a:out").unit_width == 2
    s = apply(m, PrunePlan.from_graph(g, {"a:out": [0, 1]}), graph=g)
    assert s.num_heads == 4 and s.a.out_channels == 4 and s.b.in_channels == 4


def test_invalid_with_graph_and_arguments() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    g = build(model, torch.randn(2, 3))
    with pytest.raises(InvalidPlanError, match=r"unknown group 'x' \(the graph has: 0:in, 0:out, 2:out\)"):
        apply(model, PrunePlan({"x": [0]}), graph=g)
    with pytest.raises(InvalidPlanError, match=r"group '2:out' is frozen \(reaches model output"):
        apply(model, PrunePlan({"2:out": [0]}), graph=g)
    with pytest.raises(ValidationError, match=r"^mode: expected 'slice' or 'mask', got 'cut'"):
        apply(model, PrunePlan({}), graph=g, mode="cut")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"^plan: expected a PrunePlan, got dict"):
        apply(model, {"0:out": [0]}, graph=g)  # type: ignore[arg-type]
    # groups come from the graph when given, even if the plan embeds others of the same size...
    stale = PrunePlan({"0:out": [0]}, groups={"0:out": Group("0:out", 5, [])})
    assert apply(model, stale, graph=g)[0].out_features == 1
    # ...but a plan made on a different width would have its indices read on the wrong units
    wider = PrunePlan({"0:out": [0]}, groups={"0:out": Group("0:out", 9, [])})
    with pytest.raises(InvalidPlanError, match=r"group '0:out' has 9 units in the plan but 5 in the graph"):
        apply(model, wider, graph=g)


def test_a_plan_is_refused_on_a_wider_model_of_the_same_class() -> None:
    """Member extents recorded at build time: a 16-unit plan on a 32-unit layer is not silently cut to 20."""
    torch.manual_seed(0)
    narrow, wide = (nn.Sequential(nn.Linear(3, h), nn.ReLU(), nn.Linear(h, 2)) for h in (16, 32))
    plan = PrunePlan.from_graph(build(narrow, torch.randn(2, 3)), {"0:out": [0, 2, 5, 7]})
    assert apply(narrow, plan)[0].out_features == 4
    with pytest.raises(InvalidPlanError, match=r"'0.weight' dim 0 has size 32, but the plan's graph saw 16"):
        apply(wide, plan)
    round_trip = PrunePlan.from_json(plan.to_json())
    with pytest.raises(InvalidPlanError, match=r"has size 32, but the plan's graph saw 16"):
        apply(wide, round_trip)


# -- save / load ---------------------------------------------------------------------------------


def test_load_wants_a_factory_not_a_model(tmp_path: Any) -> None:
    from secateurs.io import load, save

    m = tiny()
    save(tmp_path, m, plan({"conv:out": [0, 1, 2]}))
    with pytest.raises(ValidationError, match=r"build_dense: expected a callable that builds the dense model.*got "):
        load(tmp_path, tiny())  # type: ignore[arg-type]


def test_save_load_round_trip_with_refit(tmp_path: Any) -> None:
    from secateurs.io import PLAN_FILE, REFIT_FILE, STATE_FILE, load, load_plan, save

    m = tiny()
    p = plan({"conv:out": [1, 2]}, refit={"fc.weight": torch.ones(3, 2)})
    s = apply(m, p)
    folder = save(tmp_path / "pruned", s, p)
    assert {f.name for f in folder.iterdir()} == {PLAN_FILE, STATE_FILE, REFIT_FILE}
    assert b"pickle" not in (folder / PLAN_FILE).read_bytes()
    back = load(folder, lambda: Tiny().eval())
    assert torch.equal(back(X), s(X)) and repr(back) == repr(s)
    again = load_plan(folder)
    assert again.keep == p.keep and again.refit is not None and torch.equal(again.refit["fc.weight"], torch.ones(3, 2))


def test_save_load_errors(tmp_path: Any) -> None:
    from secateurs.errors import PlanFormatError
    from secateurs.io import STATE_FILE, load, save

    m = tiny()
    with pytest.raises(ValidationError, match=r"^plan: embeds no group definitions"):
        save(tmp_path / "a", m, PrunePlan({"conv:out": [0, 1]}))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValidationError, match=r"^path: '.*file' exists and is not a folder"):
        save(tmp_path / "file", m, plan({}))
    with pytest.raises(PlanFormatError, match=r"plan file '.*plan\.json' cannot be read"):
        load(tmp_path / "empty", Tiny)
    # weights of another plan do not fit: a clear error, not a half-loaded model
    save(tmp_path / "b", apply(m, plan({"conv:out": [0, 1]})), plan({"conv:out": [0, 1]}))
    save(tmp_path / "c", m, plan({}))
    (tmp_path / "b" / STATE_FILE).write_bytes((tmp_path / "c" / STATE_FILE).read_bytes())
    with pytest.raises(InvalidPlanError, match=r"model\.safetensors': saved weights do not fit the pruned model"):
        load(tmp_path / "b", Tiny)


# -- zero width: emptied groups (removed layers) ---------------------------------------------------

@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"),
                         [(3, 1, 1, 1), (3, 2, 1, 1), (5, 3, 0, 1), (3, 1, 2, 2), (4, 2, "valid", 1), (3, 1, "same", 2)])
def test_zero_width_conv_output_size_matches_torch(kernel: int, stride: int, padding: Any, dilation: int) -> None:
    for side in (7, 8, 11):
        real = nn.Conv2d(1, 1, kernel, stride, padding, dilation)
        expected = real(torch.zeros(1, 1, side, side + 1)).shape[2:]
        assert conv_output_size(real, (side, side + 1)) == list(expected)


def test_zero_width_conv_and_batchnorm_return_the_bias_path_uncounted() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that initialising a zero-element tensor does nothing
        conv = nn.Conv1d(0, 3, 3, stride=2, padding=1)  # torch itself returns 0 channels here, not the bias
        producer = nn.Conv2d(4, 0, 3, padding=1)
    conv.__class__ = ZeroWidthConv1d
    x = torch.randn(2, 0, 9, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = conv(x)
    assert counter.get_total_flops() == 0
    assert torch.equal(out, conv.bias.reshape(1, 3, 1).expand(2, 3, 5))
    out.sum().backward()
    assert torch.equal(conv.bias.grad, torch.full((3,), 10.0))
    producer.__class__ = ZeroWidthConv2d
    bn = ZeroWidthBatchNorm2d(0)
    assert bn(producer(torch.randn(2, 4, 5, 6))).shape == (2, 0, 5, 6)


def test_emptied_group_needs_its_permission_and_a_prunable_group() -> None:
    m = tiny()
    with pytest.raises(InvalidPlanError, match=r"group 'conv:out': every unit removed"):
        apply(m, PrunePlan({"conv:out": []}, groups=groups(), allow_empty=["other"]))
    with pytest.raises(InvalidPlanError, match=r"group 'fc:out' is frozen"):
        apply(m, PrunePlan({"fc:out": []}, groups=groups(), allow_empty=["fc:out"]))


def test_emptied_group_through_batchnorm_depthwise_groupnorm_leaves_the_bias() -> None:
    m = tiny()
    x = torch.randn(3, 2, 5, 5)
    plan = PrunePlan({"conv:out": []}, groups=groups(), allow_empty=["conv:out"])
    small = apply(m, plan)
    assert small.conv.weight.shape == (0, 2, 3, 3) and small.dw.weight.shape == (0, 1, 3, 3)
    assert small.fc.in_features == 0 and type(small.conv) is ZeroWidthConv2d
    torch.testing.assert_close(small(x), m.fc.bias.expand(3, 3))  # fc reads nothing: only its bias is left
    torch.testing.assert_close(small(x), apply(m, plan, mode="mask")(x))


def test_emptying_a_module_that_cannot_run_at_zero_width_is_refused() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 4)
            self.scale = nn.Module()
            self.scale.weight = nn.Parameter(torch.ones(4))
            self.out = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(x) * self.scale.weight)

    g = Group("fc:out", 4, [Member("fc", "weight", 0, "producer"), Member("fc", "bias", 0),
                            Member("scale", "weight", 0), Member("out", "weight", 1, "consumer")])
    m = Scaled()
    with pytest.raises(InvalidPlanError, match=r"group\(s\) 'fc:out': Module 'scale' cannot run at zero width"):
        apply(m, PrunePlan({"fc:out": []}, groups={"fc:out": g}, allow_empty=["fc:out"]))
    assert m.fc.out_features == 4
    mha = nn.MultiheadAttention(4, 2)
    heads = Group("h", 2, [Member("", "in_proj_weight", 0, "producer", offset=o, block=2) for o in (0, 4, 8)])
    with pytest.raises(InvalidPlanError, match=r"MultiheadAttention 'MultiheadAttention' cannot run at zero width"):
        apply(mha, PrunePlan({"h": []}, groups={"h": heads}, allow_empty=["h"]))


@pytest.mark.parametrize("name", ["resnet_basic", "resnet_bottleneck", "mobilenet_v2", "gpt"])
def test_removed_residual_branch_costs_what_the_graph_says(name: str) -> None:
    """Each residual branch emptied: counted params and FLOPs equal graph.cost at keep 0, the
    sliced model equals the masked one, and it trains (backward)."""
    from secateurs.training.layers import residual_branches

    ref = REFERENCE_MODELS[name]
    model, x = ref.build(), ref.example_inputs()
    graph = build(model, x)
    branches = residual_branches(graph)
    assert branches
    for inside in branches.values():
        plan = PrunePlan.from_graph(graph, {g: [] for g in inside}, allow_empty=inside)
        small = apply(model, plan, graph=graph)
        assert dense_counts(small, x) == graph.cost({g: 0 for g in inside})
        args = x if isinstance(x, tuple) else (x,)
        first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
        torch.testing.assert_close(first(small(*args)), first(apply(model, plan, mode="mask")(*args)))
        small.train()
        first(small(*args)).sum().backward()


def test_removed_basic_block_branch_is_its_constant_plus_the_shortcut() -> None:
    """By hand: with layer1's branch gone, layer1(x) = relu(bn2(0) + x), bn2(0) its eval constant."""
    ref = REFERENCE_MODELS["resnet_basic"]
    model, x = ref.build(), ref.example_inputs()
    with torch.no_grad():
        for bn in (model.layer1.bn2,):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    plan = PrunePlan.from_graph(build(model, x), {"layer1.conv1:out": []}, allow_empty=["layer1.conv1:out"])
    small = apply(model, plan)
    bn = model.layer1.bn2
    constant = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(1, -1, 1, 1)
    with torch.no_grad():
        stream = F.relu(constant + model.stem(x))
        expected = model.fc(torch.flatten(model.pool(model.layer2(stream)), 1))
        torch.testing.assert_close(small(x), expected)


@pytest.mark.parametrize("name", ["densenet", "resnet_basic", "inception", "cnn1d"])
def test_narrow_twice_equals_apply_once_and_keeps_the_parameter_objects(name: str) -> None:
    """Renumbered groups (cat offsets, flattened blocks) let a second narrowing cut the right units."""
    ref = REFERENCE_MODELS[name]
    model, x = ref.build(), ref.example_inputs()
    graph = build(model, x)
    prunable = graph.prunable_groups()
    first = {g.name: [u for u in range(g.size) if u % 3 != 1] for g in prunable}
    second = {g: [u for u in range(len(k)) if u % 2 == 0] for g, k in first.items()}
    once = apply(model, PrunePlan.from_graph(graph, {g: [first[g][u] for u in second[g]] for g in first}))
    work = copy.deepcopy(model)
    ids = [id(p) for p in work.parameters()]
    args = x if isinstance(x, tuple) else (x,)
    work(*args).sum().backward()  # gradients held across the narrowing are cut alike
    narrowing = narrow(work, PrunePlan.from_graph(graph, first))
    assert all(p.grad is None or p.grad.shape == p.shape for p in work.parameters())
    narrow(work, PrunePlan(second, groups=narrowing.groups))
    assert [id(p) for p in work.parameters()] == ids
    assert {k: v.shape for k, v in work.state_dict().items()} == {k: v.shape for k, v in once.state_dict().items()}
    for k, v in once.state_dict().items():
        assert torch.equal(work.state_dict()[k], v), k
    torch.testing.assert_close(work(*args), once(*args))


def test_widen_undoes_narrow_with_zeros_in_the_cut_slices() -> None:
    m = tiny()
    before = copy.deepcopy(m)
    narrowing = narrow(m, PrunePlan({"conv:out": [1, 3]}, groups=groups()))
    assert m.conv.out_channels == 2 and m.gn.num_groups == m.gn.num_channels == 2
    widen(m, narrowing.cuts, narrowing.modules)
    assert m.conv.out_channels == 4 and m.fc.in_features == 4 and (m.gn.num_groups, m.gn.num_channels) == (2, 4)
    torch.testing.assert_close(m(X), apply(before, PrunePlan({"conv:out": [1, 3]}, groups=groups()), mode="mask")(X))
    for k, v in before.state_dict().items():
        now = m.state_dict()[k]
        if k == "fc.weight":
            assert torch.equal(now[:, [1, 3]], v[:, [1, 3]]) and not now[:, [0, 2]].any()
        elif now.dim() and now.shape[0] == 4 and k != "fc.bias":
            assert torch.equal(now[[1, 3]], v[[1, 3]]) and not now[[0, 2]].any(), k
    emptied = narrow(m, PrunePlan({"conv:out": []}, groups=groups(), allow_empty=["conv:out"]))
    assert type(m.conv) is ZeroWidthConv2d and m.dw.groups == 0
    widen(m, emptied.cuts)  # no record of the modules: attributes re-derived from the shapes
    assert type(m.conv) is nn.Conv2d and m.dw.groups == m.dw.in_channels == 4 and type(m.bn) is nn.BatchNorm2d


def test_narrow_refuses_refit_and_invalid_plans_untouched() -> None:
    m = tiny()
    with pytest.raises(ValidationError, match=r"plan: narrow keeps the model's own values"):
        narrow(m, PrunePlan({"conv:out": [0]}, groups=groups(), refit={"fc.weight": torch.zeros(3, 1)}))
    snap = snapshot(m)
    with pytest.raises(InvalidPlanError, match=r"group 'conv:out': every unit removed"):
        narrow(m, PrunePlan({"conv:out": []}, groups=groups()))
    assert same_state(m, snap)
