"""Each coupling rule proven on a small model: groups found, Member indices exact, cost exact.

Models are factories taking widths, so a pruned keep count is checked against a freshly built
narrower model (independent truth: its parameter count and FlopCounterMode's FLOPs).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from test_graph_helpers import check_slice
from torch import nn

import secateurs
from secateurs.graph import Member, build, dense_counts


def names(g) -> set[str]:  # noqa: ANN001
    return {gr.name for gr in g.groups}


# -- convolutions ----------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self, c1: int = 6, c2: int = 5, bias: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=bias)
        self.bn1 = nn.BatchNorm2d(c1)
        self.up = nn.ConvTranspose2d(c1, c2, 2, stride=2, bias=bias)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Conv2d(c2, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.drop(torch.sigmoid(self.up(x)))
        return self.head(F.avg_pool2d(self.pool(x), 1))


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_convtranspose_bn_pool(bias: bool) -> None:
    x = torch.randn(2, 3, 8, 8)
    g = check_slice(ConvNet, dict(bias=bias), dict(c1=4, c2=3, bias=bias), x,
                    {"conv1:out": [0, 3], "up:out": [1, 2]})
    assert {"conv1:out", "up:out"} <= {gr.name for gr in g.prunable_groups()}
    up = g.group("up:out")
    assert Member("up", "weight", 1, "producer") in up.members  # ConvTranspose: out channels on dim 1
    assert Member("up", "weight", 0, "consumer") in g.group("conv1:out").members
    assert Member("bn1", "running_var", 0, "passthrough") in g.group("conv1:out").members


class Conv1dNet(nn.Module):
    def __init__(self, c: int = 7) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, c, 5, padding=2)
        self.bn = nn.BatchNorm1d(c)
        self.c2 = nn.Conv1d(c, 3, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.gelu(self.bn(self.c1(x))))


def test_conv1d_batchnorm1d() -> None:
    check_slice(Conv1dNet, {}, dict(c=4), torch.randn(3, 2, 16), {"c1:out": [1, 2, 6]})


class Depthwise(nn.Module):
    def __init__(self, c: int = 6, transposed: bool = False) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, c, 1)
        cls = nn.ConvTranspose2d if transposed else nn.Conv2d
        self.dw = cls(c, c, 3, padding=1, groups=c)
        self.bn = nn.BatchNorm2d(c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu6(self.bn(self.dw(self.pw(x)))))


@pytest.mark.parametrize("transposed", [False, True])
def test_depthwise_ties_in_to_out(transposed: bool) -> None:
    g = check_slice(Depthwise, dict(transposed=transposed), dict(c=4, transposed=transposed),
                    torch.randn(1, 3, 6, 6), {"pw:out": [0, 5]})
    assert Member("dw", "weight", 0, "passthrough") in g.group("pw:out").members
    assert "dw:out" not in names(g)


class Grouped(nn.Module):
    """1x1 -> grouped kxk -> BN -> 1x1 (the ResNeXt pattern); widths are per group, so a narrower
    model built from scratch is the truth for a pruned within-group factor."""

    def __init__(self, per_in: int = 4, per_out: int = 3, groups: int = 2, dims: int = 2, transposed: bool = False,
                 bias: bool = True, norm: str = "bn") -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[dims]
        grouped = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}[dims] if transposed else conv
        cin, cout = groups * per_in, groups * per_out
        self.a = conv(3, cin, 1)
        self.b = grouped(cin, cout, 3, groups=groups, bias=bias)
        self.norm = nn.GroupNorm(groups, cout) if norm == "gn" else {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](cout)
        self.c = conv(cout, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.norm(self.b(F.relu(self.a(x))))))


def _grouped_input(dims: int) -> torch.Tensor:
    return torch.randn(2, 3, 7) if dims == 1 else torch.randn(2, 3, 5, 5)


@pytest.mark.parametrize("dims,transposed,bias", [(2, False, True), (2, False, False), (1, False, True),
                                                  (2, True, True), (1, True, False)])
def test_grouped_conv_within_group_factors_prune(dims: int, transposed: bool, bias: bool) -> None:
    """Removing within-group unit j drops channel j of every group, in and out; the groups stay."""
    kw = dict(dims=dims, transposed=transposed, bias=bias)
    g = check_slice(Grouped, kw, dict(per_in=2, per_out=2, **kw), _grouped_input(dims),
                    {"a:out": [0, 3], "b:out": [1]})
    within_in, within_out = g.group("a:out"), g.group("b:out")
    assert (within_in.size, within_out.size) == (4, 3) and within_in.prunable and within_out.prunable
    prod_in = next(m for m in within_in.members if (m.module, m.param) == ("a", "weight"))
    assert prod_in.indices([1]) == [1, 5]  # unit 1 = input channel 1 of each of the 2 groups of 4
    if transposed:  # weight (cin, cout/g): dim 0 the full input, dim 1 the within-group output index
        assert Member("b", "weight", 1, "producer") in within_out.members
        assert next(m for m in within_in.members if m.module == "b").indices([1]) == [1, 5]
    else:  # weight (cout, cin/g): dim 0 the full output, dim 1 the within-group input index
        assert Member("b", "weight", 1, "consumer") in within_in.members
        assert next(m for m in within_out.members if m.module == "b").indices([1]) == [1, 4]
    groups = g.group("a:out:groups")
    assert groups.size == 2 and not groups.prunable
    assert groups.reason == "grouped convolution (groups=2) at node 'b' keeps its groups whole"
    assert {"a", "b", "norm", "c"} <= set(groups.modules())  # group i in is group i out: one frozen factor


@pytest.mark.parametrize("keep", [dict(a=3, b=1), dict(a=1, b=3), dict(a=4, b=2)])
def test_grouped_conv_cost_is_exact(keep: dict[str, int]) -> None:
    """FLOPs = 2·k·H·W · (within-group in) · (all out): checked against FlopCounterMode on fresh models."""
    x = torch.randn(2, 3, 6, 6)
    g = build(Grouped(4, 3, groups=2), x)
    cost = g.cost({"a:out": keep["a"], "b:out": keep["b"]})
    assert cost == dense_counts(Grouped(keep["a"], keep["b"], groups=2), x)
    assert g.cost() == dense_counts(Grouped(4, 3, groups=2), x)
    with pytest.raises(Exception, match="is frozen"):
        g.cost({"a:out:groups": 1})


def test_grouped_conv_with_group_norm_shares_the_factoring() -> None:
    """GroupNorm(g) after a grouped conv(g) factors the same channels: one within factor, one frozen.

    (Outputs are compared for the input side only: GroupNorm's statistics see the output units.)"""
    x = torch.randn(2, 3, 5, 5)
    g = check_slice(Grouped, dict(norm="gn"), dict(per_in=3, norm="gn"), x, {"a:out": [2]})
    assert g.cost({"b:out": 2, "a:out": 1}) == dense_counts(Grouped(1, 2, norm="gn"), x)
    out = g.group("b:out")
    assert Member("norm", "weight", 0, "passthrough", block=2, unit_stride=1, inner_stride=3) in out.members
    assert [gr.name for gr in g.groups if gr.name.endswith(":groups")] == ["a:out:groups"]
    assert "keeps its groups whole" in g.group("a:out:groups").reason  # the conv froze it first


@pytest.mark.parametrize("cin,cout,groups,prunable", [
    (4, 8, 4, {"b:out"}),  # depthwise multiplier: each input channel is a group; 2 outputs per group
    (8, 4, 4, {"a:out"}),  # each output channel is a group; 2 inputs per group
])
def test_grouped_conv_with_one_channel_per_group_side(cin: int, cout: int, groups: int, prunable: set[str]) -> None:
    class Net(nn.Module):
        def __init__(self, per_in: int = cin // groups, per_out: int = cout // groups) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, groups * per_in, 1)
            self.b = nn.Conv2d(groups * per_in, groups * per_out, 3, groups=groups)
            self.c = nn.Conv2d(groups * per_out, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x)))

    x = torch.randn(1, 3, 5, 5)
    g = build(Net(), x)
    assert {gr.name for gr in g.prunable_groups()} == prunable
    name = next(iter(prunable))
    narrow = dict(per_out=1) if name == "b:out" else dict(per_in=1)
    check_slice(Net, {}, narrow, x, {name: [0]})


class GroupedStack(nn.Module):
    """Two grouped convs in a row: the second reads the first's within-group factor (refined if g differs)."""

    def __init__(self, per1: int = 4, per2: int = 2, g1: int = 2, g2: int = 2) -> None:
        super().__init__()
        self.a = nn.Conv1d(2, 8, 1)
        self.b = nn.Conv1d(8, g1 * per1, 3, padding=1, groups=g1)
        self.c = nn.Conv1d(g1 * per1, g2 * per2, 3, padding=1, groups=g2)
        self.d = nn.Conv1d(g2 * per2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(self.a(x))))))


def test_stacked_grouped_convs_with_equal_groups_share_the_within_factor() -> None:
    x = torch.randn(2, 2, 9)
    g = check_slice(GroupedStack, {}, dict(per1=2, per2=1), x, {"b:out": [0, 3], "c:out": [1]})
    assert Member("c", "weight", 1, "consumer") in g.group("b:out").members


def test_stacked_grouped_convs_with_finer_groups_refine_the_factor() -> None:
    """g1=2 then g2=4 on 8 channels: b's within factor (4) splits into c's groups (2) ⊗ c's within (2)."""
    x = torch.randn(2, 2, 9)
    g = build(GroupedStack(4, 1, g1=2, g2=4), x)
    free = [gr for gr in g.prunable_groups() if any(m.module == "c" and m.dim == 1 for m in gr.members)]
    assert len(free) == 1 and free[0].size == 2
    b_rows = [m for m in free[0].members if (m.module, m.param, m.dim) == ("b", "weight", 0)]
    assert sorted(i for m in b_rows for i in m.indices([1])) == [1, 3, 5, 7]  # index 1 of each of c's 4 groups
    wide, narrow = dict(per1=4, per2=1, g1=2, g2=4), dict(per1=2, per2=1, g1=2, g2=4)
    check_slice(GroupedStack, wide, narrow, x, {free[0].name: [0]})


class CatIntoGrouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.g = nn.Conv2d(8, 4, 3, groups=2)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.g(torch.cat([self.a(x), self.b(x)], dim=1)))


def test_grouped_conv_on_concatenated_input_freezes_it_with_reason() -> None:
    """A cat whose pieces do not factor as g ⊗ (c/g): the input freezes, the output factor still prunes."""
    x = torch.randn(1, 3, 5, 5)
    g = build(CatIntoGrouped(), x)
    for name in ("a:out", "b:out"):
        assert not g.group(name).prunable
        assert g.group(name).reason == ("grouped convolution (groups=2) at node 'g' cannot split its input channels "
                                        "(concatenated or strided channels)")
    assert g.group("g:out").prunable and g.group("g:out").size == 2
    assert g.cost() == dense_counts(CatIntoGrouped(), x)


# -- linear, norms, embedding ------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, h1: int = 8, h2: int = 6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, h1)
        self.bn = nn.BatchNorm1d(h1)
        self.fc2 = nn.Linear(h1, h2, bias=False)
        self.ln = nn.LayerNorm(h2)
        self.fc3 = nn.Linear(h2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(torch.tanh(self.bn(self.fc1(x))), 0.2, self.training)
        return self.fc3(F.silu(self.ln(self.fc2(x))))


def test_linear_bn1d_layernorm() -> None:
    x = torch.randn(4, 5)
    g = build(MLP(), x)
    assert Member("ln", "weight", 0, "passthrough") in g.group("fc2:out").members
    assert g.cost({"fc1:out": 3, "fc2:out": 2}) == dense_counts(MLP(3, 2), x)
    check_slice(MLP, {}, dict(h1=5), x, {"fc1:out": [0, 1, 7]})  # LN-free group: outputs agree


class GN(nn.Module):
    def __init__(self, c: int = 8, groups: int = 1) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, c, 3)
        self.gn = nn.GroupNorm(groups, c)
        self.b = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.gn(self.a(x))))


def test_groupnorm_single_group_ties() -> None:
    x = torch.randn(2, 3, 6, 6)
    g = build(GN(8, 1), x)
    assert Member("gn", "weight", 0, "passthrough") in g.group("a:out").members
    assert g.cost({"a:out": 5}) == dense_counts(GN(5, 1), x)


def test_groupnorm_groups_factor_channels() -> None:
    """GroupNorm(2, 8): only the within-group factor (4 units of width 2) may shrink."""
    x = torch.randn(2, 3, 6, 6)
    g = build(GN(8, 2), x)
    within = [gr for gr in g.prunable_groups() if gr.size == 4]
    assert len(within) == 1 and within[0].unit_width == 2
    frozen = [gr for gr in g.groups if gr.size == 2 and "GroupNorm num_groups=2" in gr.reason]
    assert frozen
    assert g.cost({within[0].name: 3}) == dense_counts(GN(6, 2), x)
    prod = [m for m in within[0].members if m.module == "a" and m.param == "weight"][0]
    assert prod.indices([1]) == [1, 5]  # unit 1 = channel 1 of each of the two groups


class Emb(nn.Module):
    def __init__(self, e: int = 6, h: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, e)
        self.fc = nn.Linear(e, h)
        self.out = nn.Linear(h, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(self.emb(ids))).mean(1))


def test_embedding_feature_dim_is_a_space() -> None:
    ids = torch.randint(0, 11, (2, 4))
    g = check_slice(Emb, {}, dict(e=4, h=3), ids, {"emb:out": [0, 5], "fc:out": [2, 3]})
    assert Member("emb", "weight", 1, "passthrough") in g.group("emb:out").members
    vocab = g.group("emb:vocab")
    assert Member("emb", "weight", 0) in vocab.members
    assert not vocab.prunable and "indexed by token ids" in vocab.reason


# -- elementwise coupling -------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self, c: int = 6, se: int = 3, mid: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.c1 = nn.Conv2d(c, mid, 3, padding=1)
        self.c2 = nn.Conv2d(mid, c, 3, padding=1)
        self.se1 = nn.Conv2d(c, se, 1)
        self.se2 = nn.Conv2d(se, c, 1)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1))
        self.head = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.c2(F.relu(self.c1(x)))
        s = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        x = x + self.gamma * (y * s)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_residual_se_layer_scale() -> None:
    x = torch.randn(2, 3, 6, 6)
    g = check_slice(Residual, {}, dict(c=4, se=2, mid=3), x,
                    {"stem:out": [1, 4], "se1:out": [0], "c1:out": [2]})
    stream = g.group("stem:out")
    mods = stream.modules()
    for m in ("stem", "c2", "se2", "head", "se1", "c1"):
        assert m in mods
    assert Member("", "gamma", 0, "passthrough") in stream.members
    assert "c2:out" not in names(g)


# -- cat, split, chunk -----------------------------------------------------------------------


class Cat(nn.Module):
    def __init__(self, a: int = 4, b: int = 3) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, a, 1)
        self.b = nn.Conv2d(3, b, 3, padding=1)
        self.bn = nn.BatchNorm2d(a + b)
        self.c = nn.Conv2d(a + b, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))


def test_cat_offsets() -> None:
    x = torch.randn(1, 3, 5, 5)
    g = check_slice(Cat, {}, dict(a=2, b=2), x, {"a:out": [0, 3], "b:out": [1]})
    assert Member("c", "weight", 1, "consumer", offset=4) in g.group("b:out").members
    assert Member("bn", "weight", 0, "passthrough", offset=4) in g.group("b:out").members


class Glu(nn.Module):
    def __init__(self, c: int = 4, use_split: bool = False) -> None:
        super().__init__()
        self.use_split = use_split
        self.a = nn.Conv1d(3, 2 * c, 1)
        self.b = nn.Conv1d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        u, v = h.split(h.shape[1] // 2, dim=1) if self.use_split else h.chunk(2, dim=1)
        return self.b(u * torch.sigmoid(v))


@pytest.mark.parametrize("use_split", [False, True])
def test_chunk_and_equal_split_tie_halves(use_split: bool) -> None:
    x = torch.randn(2, 3, 7)
    g = check_slice(Glu, dict(use_split=use_split), dict(c=2, use_split=use_split), x, {"a:out": [1, 3]})
    grp = g.group("a:out")
    assert grp.size == 4
    assert Member("a", "weight", 0, "producer", offset=4) in grp.members


class FixedSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(3, 6, 1)
        self.b = nn.Conv1d(2, 2, 1)
        self.c = nn.Conv1d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = torch.split(self.a(x), [2, 4], dim=1)
        return self.b(u) + self.c(v)


def test_split_with_fixed_sizes_is_frozen() -> None:
    g = build(FixedSplit(), torch.randn(1, 3, 5))
    pieces = [gr for gr in g.groups if Member("a", "weight", 0, "producer", offset=2) in gr.members]
    assert pieces and not pieces[0].prunable
    assert "has fixed sizes [2, 4]" in pieces[0].reason


# -- reshapes ------------------------------------------------------------------------------


class FlatHead(nn.Module):
    def __init__(self, c: int = 5, channels_last: bool = False, use_view: bool = False) -> None:
        super().__init__()
        self.channels_last, self.use_view = channels_last, use_view
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        if self.channels_last:
            h = h.permute(0, 2, 3, 1)
        h = h.reshape(h.size(0), -1) if self.use_view else torch.flatten(h, 1)
        return self.fc(h)


@pytest.mark.parametrize("channels_last,use_view", [(False, False), (False, True), (True, False)])
def test_flatten_into_linear(channels_last: bool, use_view: bool) -> None:
    x = torch.randn(2, 3, 4, 4)
    kw = dict(channels_last=channels_last, use_view=use_view)
    g = check_slice(FlatHead, kw, dict(c=3, **kw), x, {"conv:out": [0, 2]})
    m = [m for m in g.group("conv:out").members if m.module == "fc"][0]
    if channels_last:
        assert (m.block, m.unit_stride, m.inner_stride) == (16, 1, 5)
    else:
        assert (m.block, m.inner_stride) == (16, 1) and m.indices([1]) == list(range(16, 32))


class ChannelsLastMLP(nn.Module):
    """ConvNeXt-style: permute to channels-last, LayerNorm + Linear over channels, permute back."""

    def __init__(self, c: int = 6, h: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.ln = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, h)
        self.fc2 = nn.Linear(h, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        y = self.fc2(F.gelu(self.fc1(self.ln(x.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.out(x + y)


def test_permute_channels_last_linear() -> None:
    x = torch.randn(2, 3, 4, 4)
    g = build(ChannelsLastMLP(), x)
    assert "fc2:out" not in names(g)
    assert Member("ln", "weight", 0, "passthrough") in g.group("conv:out").members
    assert g.cost({"conv:out": 4, "fc1:out": 5}) == dense_counts(ChannelsLastMLP(4, 5), x)
    check_slice(ChannelsLastMLP, {}, dict(h=5), x, {"fc1:out": [0, 3, 7]})


class LayerNorm2d(nn.LayerNorm):
    """torchvision's / timm's LayerNorm2d: permute, ``F.layer_norm`` with the module's parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNormNet(nn.Module):
    """conv -> norm -> GELU twice, then a 1x1 head: a test bed for norms whose forward calls F.* itself."""

    def __init__(self, norm: type[nn.Module], c1: int = 6, c2: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1)
        self.norm1 = norm(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.norm2 = norm(c2)
        self.head = nn.Conv2d(c2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.norm2(self.conv2(F.gelu(self.norm1(self.conv1(x)))))))


def test_functional_layer_norm_couples_its_parameters() -> None:
    x = torch.randn(2, 3, 5, 5)
    m = ConvNormNet(LayerNorm2d).eval()
    g = build(m, x)
    assert g.cost({"conv1:out": 4, "conv2:out": 3}) == dense_counts(ConvNormNet(LayerNorm2d, 4, 3), x)
    keep = {"conv1:out": [1, 2, 3, 4], "conv2:out": [0, 1, 4]}
    small = secateurs.apply(m, secateurs.PrunePlan.from_graph(g, keep), graph=g)
    narrow = ConvNormNet(LayerNorm2d, 4, 3).state_dict()
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in narrow.items()}
    torch.testing.assert_close(small.norm1.weight, m.norm1.weight[keep["conv1:out"]])
    assert small.norm2.normalized_shape == (3,) and small(x).shape == m(x).shape
    assert Member("norm1", "weight", 0, "passthrough") in g.group("conv1:out").members
    assert Member("norm2", "bias", 0, "passthrough") in g.group("conv2:out").members


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: ``F.batch_norm`` with keyword affine parameters, then an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, weight=self.weight, bias=self.bias,
                         training=self.training, momentum=self.momentum, eps=self.eps)
        return F.relu(x)


def test_functional_batch_norm_couples_statistics_and_affine() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    wide = ConvNormNet(BatchNormAct2d).eval()
    for bn in (wide.norm1, wide.norm2):  # non-trivial statistics, so a wrong slice shows in the outputs
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    g = build(wide, x)
    members = {(m.module, m.param) for m in g.group("conv1:out").members}
    assert {("norm1", "running_mean"), ("norm1", "running_var"), ("norm1", "weight"), ("norm1", "bias")} <= members
    assert [gr.name for gr in g.prunable_groups()] == ["conv1:out", "conv2:out"]
    assert g.cost({"conv1:out": 4, "conv2:out": 3}) == dense_counts(ConvNormNet(BatchNormAct2d, 4, 3), x)
    keep = {"conv1:out": [0, 2, 3, 5], "conv2:out": [1, 2, 4]}
    small = secateurs.apply(wide, secateurs.PrunePlan.from_graph(g, keep), graph=g)
    masked = secateurs.apply(wide, secateurs.PrunePlan.from_graph(g, keep), mode="mask")
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small.norm1.running_var, wide.norm1.running_var[keep["conv1:out"]])


def test_functional_layer_norm_outside_a_layernorm_module_has_a_fixed_shape() -> None:
    """``F.layer_norm(x, (16,))`` in a plain module: apply cannot rewrite the literal, so it freezes."""

    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 16)
            self.out = nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.layer_norm(self.fc(x), (16,)))

    g = build(Plain(), torch.randn(2, 3))
    assert "fixes this size at 16" in g.group("fc:out").reason


# -- attention ------------------------------------------------------------------------------


class MHANet(nn.Module):
    def __init__(self, e: int = 8, heads: int = 2, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.proj = nn.Linear(3, e)
        self.attn = nn.MultiheadAttention(e, heads, batch_first=batch_first)
        self.out = nn.Linear(e, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        a, _ = self.attn(h, h, h)
        return self.out(F.relu(a))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads(batch_first: bool) -> None:
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    model = MHANet(8, 2, batch_first)
    g = build(model, x)
    heads = g.group("attn:heads")
    assert (heads.size, heads.unit_width) == (2, 4)
    assert {Member("attn", "in_proj_weight", 0, "producer", offset=o, block=4) for o in (0, 8, 16)} <= set(
        heads.members)
    assert {Member("attn", "in_proj_bias", 0, "passthrough", offset=o, block=4) for o in (0, 8, 16)} <= set(
        heads.members)
    assert Member("attn.out_proj", "weight", 1, "consumer", block=4) in heads.members
    assert Member("attn", "in_proj_weight", 1, "consumer") in g.group("proj:out").members
    assert g.cost() == dense_counts(model, x)
    narrow = MHANet(4, 1, batch_first)  # one head of 4: embed dims shrink with it
    keep = {"attn:heads": 1, "proj:out": 4, "attn.out_proj:out": 4}
    assert g.cost(keep) == dense_counts(narrow, x)
    m = [m for m in heads.members if m.param == "in_proj_weight" and m.offset == 8][0]
    assert m.indices([1]) == [12, 13, 14, 15]


class HandAttention(nn.Module):
    def __init__(self, e: int = 8, heads: int = 4, hd: int = 3, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.hd, self.sdpa = heads, hd, sdpa
        self.inp = nn.Linear(5, e)
        self.q = nn.Linear(e, heads * hd)
        self.k = nn.Linear(e, heads * hd)
        self.v = nn.Linear(e, heads * hd)
        self.o = nn.Linear(heads * hd, e)
        self.out = nn.Linear(e, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        b, t, _ = h.shape
        q = self.q(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        v = self.v(h).view(b, t, self.heads, self.hd).transpose(1, 2)
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(3.0), dim=-1)
            a = w @ v
        a = a.transpose(1, 2).reshape(b, t, self.heads * self.hd)
        return self.out(h + self.o(a))


@pytest.mark.parametrize("sdpa", [False, True])
def test_hand_written_attention_heads(sdpa: bool) -> None:
    x = torch.randn(2, 6, 5)
    g = check_slice(HandAttention, dict(sdpa=sdpa), dict(heads=2, e=6, sdpa=sdpa), x,
                    {"attn:heads" if False else _heads_name(sdpa): [0, 2], "inp:out": [1, 7]})
    heads = g.group(_heads_name(sdpa))
    assert (heads.size, heads.unit_width, heads.prunable) == (4, 3, True)
    assert Member("q", "weight", 0, "producer", block=3) in heads.members
    assert Member("o", "weight", 1, "consumer", block=3) in heads.members
    per_head = [gr for gr in g.groups if "head_dim" in gr.reason]
    assert per_head and all(not gr.prunable for gr in per_head)


def _heads_name(sdpa: bool) -> str:
    return ":heads"  # top-level q/k/v: the parent module path is the root ("")


# -- weight tying, several inputs/outputs ---------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self, e: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, e)
        self.mix = nn.Linear(e, e)
        self.head = nn.Linear(e, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.emb(ids))))


def test_weight_tying_couples_both_uses() -> None:
    ids = torch.randint(0, 10, (2, 5))
    g = build(TiedLM(), ids)
    grp = g.group("emb:out")
    assert Member("emb", "weight", 1, "passthrough") in grp.members
    assert Member("head", "weight", 1, "consumer") in grp.members
    assert Member("mix", "weight", 0, "producer") in grp.members  # mix output feeds the tied head
    assert g.cost() == dense_counts(TiedLM(), ids)  # the shared parameter is counted once
    assert g.cost({"emb:out": 4}) == dense_counts(TiedLM(4), ids)
    vocab = [gr for gr in g.groups if Member("head", "weight", 0, "producer") in gr.members][0]
    assert Member("emb", "weight", 0, "passthrough") in vocab.members and not vocab.prunable


class TwoInTwoOut(nn.Module):
    def __init__(self, h: int = 6) -> None:
        super().__init__()
        self.fa = nn.Linear(3, h)
        self.fb = nn.Linear(4, h)
        self.ya = nn.Linear(h, 2)
        self.yb = nn.Linear(h, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fa(a) + self.fb(b))
        return self.ya(h), self.yb(h)


def test_several_inputs_and_outputs() -> None:
    a, b = torch.randn(2, 3), torch.randn(2, 4)
    g = check_slice(TwoInTwoOut, {}, dict(h=4), (a, b), {"fa:out": [0, 5]})
    assert set(g.group("fa:out").modules()) == {"fa", "fb", "ya", "yb"}
    gd = build(TwoInTwoOut(), {"b": b, "a": a})
    assert [gr.name for gr in gd.groups] == [gr.name for gr in g.groups]
    assert not gd.group("ya:out").prunable and not gd.group("yb:out").prunable


# -- property: any removal set slices exactly --------------------------------------------------

@given(st.data())
def test_any_removal_slices_exactly(data: st.DataObject) -> None:
    """Random units of random groups: Member.indices cut the right rows/columns every time."""
    which = data.draw(st.sampled_from(["cat", "channels_last", "attention", "glu", "grouped"]))
    if which == "grouped":
        make, wide, x, sizes = Grouped, dict(per_in=4, per_out=3), torch.randn(1, 3, 5, 5), {
            "a:out": ("per_in", 4), "b:out": ("per_out", 3)}
    elif which == "cat":
        make, wide, x, sizes = Cat, dict(a=4, b=3), torch.randn(1, 3, 4, 4), {"a:out": ("a", 4), "b:out": ("b", 3)}
    elif which == "channels_last":
        make, wide, x, sizes = FlatHead, dict(c=5, channels_last=True), torch.randn(1, 3, 4, 4), {"conv:out": ("c", 5)}
    elif which == "glu":
        make, wide, x, sizes = Glu, dict(c=4), torch.randn(1, 3, 5), {"a:out": ("c", 4)}
    else:
        make, wide, x, sizes = HandAttention, dict(heads=4), torch.randn(1, 3, 5), {":heads": ("heads", 4)}
    removed, narrow = {}, dict(wide)
    for name, (arg, n) in sizes.items():
        units = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n - 1).map(sorted))
        if units:
            removed[name] = units
            narrow[arg] = n - len(units)
    check_slice(make, wide, narrow, x, removed)


class KeywordCalls(nn.Module):
    """The same layers called with keyword tensors: ``F.linear(input=..., weight=...)``, ``matmul(input=...)``."""

    def __init__(self, keywords: bool) -> None:
        super().__init__()
        self.keywords = keywords
        self.a = nn.Linear(8, 6)
        self.w = nn.Parameter(torch.randn(5, 6))
        self.v = nn.Parameter(torch.randn(5, 4))
        self.o = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a(x)
        if self.keywords:
            z = torch.matmul(input=F.linear(input=z, weight=self.w), other=self.v)
        else:
            z = torch.matmul(F.linear(z, self.w), self.v)
        return self.o(z)


def test_keyword_tensor_arguments_couple_like_positional_ones() -> None:
    x = torch.randn(2, 8)
    by_keyword, by_position = build(KeywordCalls(True), x), build(KeywordCalls(False), x)
    assert [(g.name, g.size, g.prunable, g.members) for g in by_keyword.groups] == \
        [(g.name, g.size, g.prunable, g.members) for g in by_position.groups]
    assert by_keyword.group("a:out").prunable and by_keyword.group("w:out").prunable


def test_a_rule_that_fails_on_an_unforeseen_call_freezes_instead_of_crashing(monkeypatch: pytest.MonkeyPatch) -> None:
    from secateurs.graph.coupling import Coupler

    def broken(self, node, shape):  # noqa: ANN001, ANN202
        raise IndexError("tuple index out of range")

    monkeypatch.setattr(Coupler, "matmul", broken)
    g = build(KeywordCalls(False), torch.randn(2, 8))
    assert "its coupling rule failed: IndexError" in g.group("w:out").reason
    assert g.cost({}) == dense_counts(KeywordCalls(False), torch.randn(2, 8))


def stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:  # noqa: A002
    """torchvision.ops.stochastic_depth as torchvision defines it (a whole-sample scale, identity in eval)."""
    if not training or p == 0.0:
        return input
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype).bernoulli_(1.0 - p)
    return input * noise.div_(1.0 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"  # where torchvision's lives, which the rule names
torch.fx.wrap("stochastic_depth")


class DepthDropped(nn.Module):
    def __init__(self, c: int = 6, h: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.f = nn.Sequential(nn.Conv2d(c, h, 1), nn.ReLU(), nn.Conv2d(h, c, 1))
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(x + stochastic_depth(self.f(x), 0.1, "row", self.training))


def test_torchvision_stochastic_depth_passes_channels_through() -> None:
    x = torch.randn(2, 3, 5, 5)
    g = check_slice(DepthDropped, {}, dict(c=4, h=5), x, {"stem:out": [1, 4], "f.0:out": [0, 3, 6]})
    assert g.group("stem:out").prunable and "stochastic_depth" in str(g.group("stem:out").nodes)


class LinearToMap(nn.Module):
    """DCGAN-style: a Linear's features viewed as a (C, H, W) map fed to a conv, sizes read from shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4 * 3 * 3)
        self.conv = nn.Conv2d(4, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ref = x.new_zeros(1, 4, 3, 3)
        return self.conv(self.fc(x).view(x.shape[0], ref.shape[1], ref.shape[2], ref.shape[3]))


def test_spatial_dims_reaching_a_conv_are_frozen() -> None:
    g = build(LinearToMap(), torch.randn(2, 6))
    spatial = [gr for gr in g.groups if any(m.module == "fc" for m in gr.members) and gr.size == 3]
    assert spatial and all("spatial dim of conv input" in gr.reason for gr in spatial)
    # the channel count is read off a constant-sized tensor: as fixed as a literal
    assert "takes this size from a dim of fixed size" in g.group("fc:out").reason


class Transposed(nn.Module):
    """``y.T`` between two Linears: the features of ``a`` become the rows that ``b`` reads."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).T).T


def test_dot_T_is_a_transpose_not_an_unknown_op() -> None:
    g = build(Transposed(), torch.randn(5, 4), strict=True)  # strict: raises on any op without a rule
    assert [gr.name for gr in g.groups] == ["a:in", "a:out", "b:in", "b:out"]
    assert all("unsupported" not in gr.reason for gr in g.groups)


def test_strict_mode_accepts_ops_that_touch_no_channels() -> None:
    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Linear(4, 6)
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            steps = torch.arange(x.shape[0], dtype=x.dtype).unsqueeze(1)  # no channels: nothing to freeze
            return self.out(torch.relu(self.emb(x)) * steps.sigmoid())

    g = build(Positions(), torch.randn(3, 4), strict=True)
    assert g.group("emb:out").prunable
