"""build(): frozen reasons, strict mode, untraceable models, no mutation, determinism, nx view."""

from __future__ import annotations

import copy

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secateurs.errors import TraceError, UnsupportedOpError, ValidationError
from secateurs.graph import DependencyGraph, build, dense_counts


class Chain(nn.Module):
    def __init__(self, exotic: str = "") -> None:
        super().__init__()
        self.exotic = exotic
        self.a = nn.Conv1d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm1d(6)
        self.b = nn.Conv1d(6, 5, 3, padding=1)
        self.c = nn.Conv1d(5, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.a(x)))
        if self.exotic == "fft":
            h = torch.fft.fft(h).real
        elif self.exotic == "flip":
            h = h.flip(1)
        elif self.exotic == "roll":  # along the channels
            h = h.roll(1, dims=1)
        elif self.exotic == "roll length":
            h = torch.roll(h, (1, -2), dims=(2, 0))
        elif self.exotic == "pad length":
            h = F.pad(h, (1, 2))[..., 1:-2]
        elif self.exotic == "norm length":  # torch.norm(input, p, dim, keepdim): the dims come after p
            h = h * torch.norm(h, 1, 2).unsqueeze(-1)
        elif self.exotic == "norm channels":  # Tensor.norm(p, dim, keepdim), over the channels
            h = h / h.norm(2, 1, True)
        elif self.exotic == "vector norm length":  # torch.linalg.vector_norm(x, ord, dim, keepdim)
            h = h / torch.linalg.vector_norm(h, 1, 2, True)
        elif self.exotic == "pad channels-last":  # F.pad's (0, 0) pair leaves the last dim, here the channels
            h = F.pad(h.transpose(1, 2), (0, 0, 1, 1)).transpose(1, 2)[..., 1:-1]
        elif self.exotic == "pad channels":
            h = F.pad(h, (0, 0, 1, 0))[:, 1:]
        return self.c(self.b(h))


X = torch.randn(2, 2, 8)


def test_frozen_input_output_reasons() -> None:
    g = build(Chain(), X)
    assert g.group("a:in").reason == "reaches model input 'x'"
    assert g.group("c:out").reason == "reaches model output 'output'"
    assert [gr.name for gr in g.prunable_groups()] == ["a:out", "b:out"]


@pytest.mark.parametrize("exotic,op,node", [("fft", "torch.fft.fft", "fft_fft"), ("flip", "Tensor.flip", "flip")])
def test_unknown_op_freezes_touching_groups(exotic: str, op: str, node: str) -> None:
    g = build(Chain(exotic), X)
    reason = g.group("a:out").reason
    assert not g.group("a:out").prunable
    assert reason.startswith(f"unsupported op '{op}' at node '{node}'"), reason
    assert g.group("b:out").prunable
    assert g.cost() == dense_counts(Chain(exotic), X)


@pytest.mark.parametrize("exotic,pattern", [
    ("fft", r"unsupported op 'torch\.fft\.fft' at graph node 'fft_fft'"),
    ("flip", r"unsupported op 'Tensor\.flip' at graph node 'flip'"),
])
def test_strict_mode_raises(exotic: str, pattern: str) -> None:
    with pytest.raises(UnsupportedOpError, match=pattern) as info:
        build(Chain(exotic), X, strict=True)
    assert info.value.node and info.value.op


@pytest.mark.parametrize("exotic,reason", [
    ("roll", "channels rolled at node 'roll'"),
    ("pad channels", "channels resized at node 'pad'"),
    ("roll length", ""),  # rolled along the length and the batch: the channels pass through
    ("pad length", ""),
    ("norm length", ""),
    ("norm channels", ""),  # a sum over the channels: they may be pruned, as before a LayerNorm
    ("vector norm length", ""),
    ("pad channels-last", ""),
])
def test_rolls_pads_and_norms_touch_channels_only_along_the_channel_dim(exotic: str, reason: str) -> None:
    g = build(Chain(exotic), X, strict=True)
    assert g.group("a:out").reason == reason
    assert g.group("a:out").prunable == (not reason)
    assert g.cost() == dense_counts(Chain(exotic), X)


def test_strict_mode_passes_known_ops() -> None:
    assert isinstance(build(Chain(), X, strict=True), DependencyGraph)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def test_untraceable_model_gives_trace_error() -> None:
    with pytest.raises(TraceError, match=r"torch\.fx cannot trace DataDependent: .*control flow") as info:
        build(DataDependent(), torch.randn(2, 3))
    assert info.value.__cause__ is not None


def test_bad_example_inputs() -> None:
    with pytest.raises(ValidationError, match=r"example_inputs: missing input 'x'"):
        build(Chain(), {})
    with pytest.raises(ValidationError, match=r"example_inputs: expected a tensor"):
        build(Chain(), 3)
    with pytest.raises(TraceError, match=r"running Chain on the example inputs failed"):
        build(Chain(), torch.randn(2, 5, 8))


def test_a_failing_node_is_named_with_torchs_reason_and_nothing_printed(capfd: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
    with pytest.raises(TraceError, match=r"failed at node '_0', 0 \(nn\.Conv2d\): .*expected input\[2, 3, 8, 8\] to "
                                         r"have 1 channels") as info:
        build(model, torch.randn(2, 3, 8, 8))
    assert isinstance(info.value.__cause__, RuntimeError)  # torch's own error travels as the cause
    assert capfd.readouterr().err == ""  # no traceback printed on the way


def test_model_is_not_mutated_and_mode_restored() -> None:
    model = Chain().train()
    model.bn.eval()  # mixed modes survive
    before = copy.deepcopy(model.state_dict())
    build(model, X * 10)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and not model.bn.training and model.a.training


def test_names_are_deterministic() -> None:
    a = build(Chain(), X)
    b = build(Chain(), X)
    assert [(g.name, g.members) for g in a.groups] == [(g.name, g.members) for g in b.groups]


def test_networkx_view() -> None:
    g = build(Chain(), X)
    assert isinstance(g.nx, nx.DiGraph) and nx.is_directed_acyclic_graph(g.nx)
    assert g.nx.nodes["a"]["op"] == "call_module" and g.nx.nodes["a"]["module"] == "a"
    assert g.nx.nodes["a"]["shape"] == (2, 6, 8)
    assert g.nx.nodes["relu"]["module"] is None
    assert ("a", "bn") in g.nx.edges
    assert "bn" in g.group("a:out").nodes


def test_cost_validation_and_marginal() -> None:
    g = build(Chain(), X)
    with pytest.raises(ValidationError, match=r"group: unknown group 'nope'"):
        g.cost({"nope": 1})
    with pytest.raises(ValidationError, match=r"keep\['c:out'\]: group is frozen \(reaches model output"):
        g.cost({"c:out": 1})
    full = g.cost()
    one_less = g.cost({"a:out": 5})
    per_unit = g.marginal("a:out")
    assert full.params - one_less.params == per_unit.params
    assert full.flops - one_less.flops == per_unit.flops


class UnknownModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.bil = nn.Bilinear(4, 4, 5)
        self.b = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(self.bil(h, h))


def test_unknown_module_is_frozen_and_priced_as_counted() -> None:
    x = torch.randn(2, 3)
    g = build(UnknownModule(), x)
    assert g.group("a:out").reason.startswith("unsupported op 'nn.Bilinear' at node 'bil'")
    assert g.cost() == dense_counts(UnknownModule(), x)
    with pytest.raises(UnsupportedOpError, match=r"'nn\.Bilinear' at graph node 'bil'"):
        build(UnknownModule(), x, strict=True)


class FunctionalTied(nn.Module):
    """An LM head written as F.linear on the embedding's weight (get_attr)."""

    def __init__(self, e: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, e)
        self.mix = nn.Linear(e, e)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(self.mix(self.emb(ids))), self.emb.weight)


def test_functional_linear_on_shared_weight() -> None:
    ids = torch.randint(0, 9, (2, 4))
    g = build(FunctionalTied(), ids)
    grp = g.group("emb:out")
    assert {"emb", "mix"} <= set(grp.modules())
    assert g.cost() == dense_counts(FunctionalTied(), ids)
    assert g.cost({"emb:out": 3}) == dense_counts(FunctionalTied(3), ids)


def _small_bert(heads: int = 4, ffn: int = 48) -> nn.Module:
    from secateurs.models import minilm

    cfg = minilm.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=ffn, max_position_embeddings=16)
    model = minilm.SentenceEncoder(cfg)
    if heads != 4:  # a freshly built narrower attention: the independent truth for pruned heads
        for layer in model.bert.layers:
            layer.attention = minilm.BertSelfAttention(32, heads, 8)
    return model


def test_repo_bert_heads_and_ffn_groups() -> None:
    pytest.importorskip("secateurs.models.minilm")
    ids = torch.randint(0, 50, (2, 7))
    x = (ids, torch.ones_like(ids))
    g = build(_small_bert(), x)
    heads = g.group("bert.layers.0.attention:heads")
    assert (heads.size, heads.unit_width, heads.prunable) == (4, 8, True)
    assert g.group("bert.layers.1.intermediate:out").prunable
    assert g.cost() == dense_counts(_small_bert(), x)
    keep = {"bert.layers.0.attention:heads": 2, "bert.layers.1.attention:heads": 2,
            "bert.layers.0.intermediate:out": 20, "bert.layers.1.intermediate:out": 20}
    assert g.cost(keep) == dense_counts(_small_bert(heads=2, ffn=20), x)
