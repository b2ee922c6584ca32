"""The torch.export fallback: models fx cannot trace (HuggingFace transformers) build, prune and apply."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs
from secateurs.errors import TraceError
from secateurs.graph import build, dense_counts
from secateurs.graph import export as export_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class ListShape(nn.Module):
    """fx cannot trace ``list(x.shape)`` (a Proxy is not iterable); torch.export can."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        self.up = nn.Linear(6, width)
        self.act = nn.GELU()
        self.down = nn.Linear(width, 6)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        shape[-1] = -1
        h = self.down(self.act(self.up(x))).reshape(shape)
        return self.norm(F.relu(h) + x)


X = torch.randn(3, 5, 6)


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_fx_untraceable_model_builds_through_export_with_exact_costs() -> None:
    model = ListShape().eval()
    with pytest.raises(Exception):  # noqa: B017 - the premise: fx itself fails on this model
        torch.fx.symbolic_trace(model)
    g = build(model, X)
    assert [gr.name for gr in g.prunable_groups()] == ["up:out"]
    modules = {str(n.target) for n in g.gm.graph.nodes if n.op == "call_module"}
    assert {"up", "act", "down", "norm"} <= modules  # leaf layers collapsed back, as symbolic_trace leaves them
    assert g.cost() == dense_counts(model, X)
    keep = [0, 3, 4, 9, 11]
    small = secateurs.apply(model, secateurs.PrunePlan({"up:out": keep}), graph=g)
    assert g.cost({"up:out": len(keep)}) == dense_counts(small, X)  # the polynomial against a counted model


def test_rewritten_graph_runs_other_batch_and_sequence_sizes() -> None:
    model = ListShape().eval()
    g = build(model, X)
    other = torch.randn(7, 2, 6)
    with torch.no_grad():
        torch.testing.assert_close(g.gm(other)[0], model(other))


def test_a_wrong_rewrite_is_caught_by_the_output_check(monkeypatch: pytest.MonkeyPatch) -> None:
    twins = dict(export_module._TWINS)
    twins[torch.ops.aten.relu] = export_module._function(torch.tanh)  # a deliberately wrong twin
    monkeypatch.setattr(export_module, "_TWINS", twins)
    with pytest.raises(TraceError, match=r"does not reproduce its outputs"):
        build(ListShape().eval(), X)


class NegativeDims(nn.Module):
    """Slices and selects on negative dims, which ATen records with the dim as written."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(list(x.shape)) != 3:  # list(x.shape): fx cannot trace this model
            raise ValueError("expected (batch, time, features)")
        h = self.fc(x)[..., 2:, :]
        return self.out(h.select(-2, -1))


def test_negative_dim_slices_and_selects_rewrite_exactly() -> None:
    model = NegativeDims().eval()
    g = build(model, X)  # the output check inside build fails on a slice taken on the wrong dim
    assert [gr.name for gr in g.prunable_groups()] == ["fc:out"]
    other = torch.randn(4, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(g.gm(other)[0], model(other))


class ChannelsFirstNorm(nn.LayerNorm):
    """A LayerNorm subclass whose forward normalises dim 1 (transformers' ConvNextLayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNormConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = ChannelsFirstNorm(8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(list(x.shape)) != 4:  # fx cannot iterate a Proxy: this model goes through export
            raise ValueError("expected NCHW")
        return self.b(self.norm(self.a(x)))


def test_a_subclassed_layer_with_its_own_forward_is_read_op_by_op() -> None:
    model, x = ConvNormConv().eval(), torch.randn(2, 3, 5, 6)
    g = build(model, x)
    assert "norm" not in {str(n.target) for n in g.gm.graph.nodes if n.op == "call_module"}
    assert g.cost() == dense_counts(model, x)  # read as nn.LayerNorm, its weight tied to the width (6)


class InPlace(ListShape):
    """``h *= 2`` and ``h += ...`` on a prunable group (HF ResNet's residual ``+=``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        h = self.act(self.up(x))
        h *= 2.0
        h += self.up(x)
        return self.down(h).reshape(shape)


def test_in_place_ops_keep_their_groups_prunable() -> None:
    model = InPlace().eval()
    g = build(model, X)
    assert [gr.name for gr in g.prunable_groups()] == ["up:out"], [(gr.name, gr.reason) for gr in g.groups]
    assert g.cost() == dense_counts(model, X)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on values: neither tracer can follow it
            return self.fc(x)
        return x


def test_a_model_neither_tracer_follows_names_both() -> None:
    with pytest.raises(TraceError, match=r"torch\.fx cannot trace DataDependent: .* torch\.export cannot trace "
                                         r"DataDependent either"):
        build(DataDependent(), torch.randn(2, 4))


def test_prune_through_export_meets_budget_and_leaves_model_alone() -> None:
    torch.manual_seed(0)
    model = ListShape(width=32).eval()
    snap = _snapshot(model)
    calibration = [torch.randn(8, 5, 6) for _ in range(4)]
    result = secateurs.prune(model, calibration, secateurs.Budget(flops=0.6), progress=False)
    assert _snapshot(model).keys() == snap.keys()
    assert all(torch.equal(v, snap[k]) for k, v in _snapshot(model).items())
    dense, pruned = dense_counts(model, X), dense_counts(result.model, X)
    assert pruned.flops <= 0.6 * dense.flops
    assert result.model.up.out_features < 32


class AutocastRegion(ListShape):
    """timm's EfficientViT runs its attention under ``torch.autocast(enabled=False)``: export
    makes that a higher-order op whose body is a submodule of the exported program, which the
    rewrite did not carry (a raw RuntimeError from ``fx.GraphModule``)."""

    def __init__(self) -> None:
        super().__init__(width=12)
        self.mix = nn.Linear(6, 10)
        self.out = nn.Linear(10, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        shape[-1] = -1
        h = self.down(F.relu(self.up(x))).reshape(shape)
        with torch.autocast(device_type="cpu", enabled=False):
            h = h.float() * 2
        return self.out(F.relu(self.mix(h))) + x


def test_an_autocast_region_builds_and_freezes_only_the_channels_it_reads() -> None:
    model = AutocastRegion().eval()
    g = build(model, X)
    assert {gr.name for gr in g.prunable_groups()} == {"up:out", "mix:out"}
    assert "wrap_with_autocast" in g.group("down:out").reason
    plan = secateurs.PrunePlan({"up:out": [0, 2, 5, 7], "mix:out": [1, 3, 4]})
    small = secateurs.apply(model, plan, graph=g)
    assert g.cost({"up:out": 4, "mix:out": 3}) == dense_counts(small, X)  # the polynomial against a counted model
    assert small(X).shape == model(X).shape


transformers = pytest.importorskip("transformers")


def _tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.BertModel(config).eval()


def _tokens(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded sequence: the mask path must stay exact
    return {"input_ids": ids, "attention_mask": mask}


def test_hf_bert_groups_are_heads_and_ffn_neurons_with_exact_costs() -> None:
    model = _tiny_bert()
    x = _tokens(2, 12, 0)
    g = build(model, x)
    names = sorted(gr.name for gr in g.prunable_groups())
    assert names == sorted([f"encoder.layer.{i}.attention.self:heads" for i in range(2)]
                           + [f"encoder.layer.{i}.intermediate.dense:out" for i in range(2)])
    assert g.group("encoder.layer.0.attention.self:heads").unit_width == 8
    assert g.cost() == dense_counts(model, x)
    keep = {"encoder.layer.0.attention.self:heads": [1, 3], "encoder.layer.1.intermediate.dense:out": list(range(0, 64, 3))}
    small = secateurs.apply(model, secateurs.PrunePlan(keep), graph=g)
    counts = {k: len(v) for k, v in keep.items()}
    assert g.cost(counts) == dense_counts(small, x)


def test_hf_bert_builds_in_strict_mode_with_the_same_groups() -> None:
    # position ids sliced to the run-time length, token types gathered from a buffer: both touch only
    # frozen spaces, so strict mode (raise at the first op without a rule) has nothing to refuse
    model, x = _tiny_bert(), _tokens(2, 12, 0)
    strict, loose = build(model, x, strict=True), build(model, x)
    assert [(gr.name, gr.size, gr.prunable) for gr in strict.groups] == [(gr.name, gr.size, gr.prunable) for gr in loose.groups]
    assert len(strict.prunable_groups()) == 4


def test_hf_bert_prunes_to_budget_and_the_pruned_model_runs_any_length() -> None:
    model = _tiny_bert()
    snap = _snapshot(model)
    calibration = [_tokens(8, 16, seed) for seed in range(3)]
    result = secateurs.prune(model, calibration, secateurs.Budget(flops=0.5), progress=False)
    assert all(torch.equal(v, snap[k]) for k, v in _snapshot(model).items())
    x = calibration[0]  # the budget is counted on the example inputs, by default the first batch
    assert dense_counts(result.model, x).flops <= 0.5 * dense_counts(model, x).flops
    attention = result.model.encoder.layer[0].attention.self
    assert attention.num_attention_heads == attention.query.out_features // attention.attention_head_size
    with torch.no_grad():
        dense = model(**_tokens(3, 20, 9)).last_hidden_state
        pruned = result.model(**_tokens(3, 20, 9)).last_hidden_state
    assert pruned.shape == dense.shape
    # the refit keeps the output nearer the dense one than dropping the same units without it
    plain = secateurs.apply(model, secateurs.PrunePlan(result.plan.keep), graph=build(model, x))
    with torch.no_grad():
        unrefit = plain(**_tokens(3, 20, 9)).last_hidden_state
    assert (pruned - dense).norm() < (unrefit - dense).norm()
    # the output error over last_hidden_state and pooler_output, the dense side kept from the exported trace
    with torch.no_grad():
        want = [model(**b) for b in calibration]
        got = [result.model(**b) for b in calibration]
    diff = sum(float((g[k] - w[k]).double().pow(2).sum()) for g, w in zip(got, want, strict=True) for k in w.keys())
    total = sum(float(w[k].double().pow(2).sum()) for w in want for k in w.keys())
    assert result.report.output_error == pytest.approx((diff / total) ** 0.5, rel=1e-6)


def _tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval()


def _ids(seed: int, batch: int = 8, length: int = 16) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))}


def test_hf_gpt2_conv1d_heads_and_mlp_are_prunable_with_exact_costs() -> None:
    model, x = _tiny_gpt2(), _ids(0)
    g = build(model, x)
    assert [gr.name for gr in g.prunable_groups()] == ["h.0.attn:heads", "h.0.mlp.c_fc:out", "h.1.attn:heads",
                                                        "h.1.mlp.c_fc:out"]
    assert g.cost() == dense_counts(model, x)
    keep = {"h.0.attn:heads": [1, 2], "h.1.mlp.c_fc:out": list(range(0, 128, 4))}
    small = secateurs.apply(model, secateurs.PrunePlan(keep), graph=g)
    assert (small.h[1].mlp.c_fc.nf, small.h[1].mlp.c_proj.nx) == (32, 32)  # the attributes forward reads
    assert small.h[1].mlp.c_fc.weight.shape == (32, 32) and small.h[1].mlp.c_proj.weight.shape == (32, 32)
    # heads 1 and 2 of q, k and v: c_attn keeps 3 x 16 outputs and the split follows them
    assert small.h[0].attn.c_attn.weight.shape == (32, 48) and small.h[0].attn.split_size == 16
    masked = secateurs.apply(model, secateurs.PrunePlan(keep), graph=g, mode="mask")
    with torch.no_grad():  # slicing the fused q/k/v took the right columns: it computes what zeroing them does
        torch.testing.assert_close(small(**x).last_hidden_state, masked(**x).last_hidden_state, rtol=1e-4, atol=1e-5)
    assert g.cost({"h.0.attn:heads": 2, "h.1.mlp.c_fc:out": 32}) == dense_counts(small, x)


def test_hf_gpt2_prune_refits_conv1d_consumers_to_budget() -> None:
    model = _tiny_gpt2()
    calibration = [_ids(seed) for seed in range(3)]
    result = secateurs.prune(model, calibration, secateurs.Budget(flops=0.6), progress=False)
    x = calibration[0]
    assert dense_counts(result.model, x).flops <= 0.6 * dense_counts(model, x).flops
    assert {r.solver for r in result.report.groups} == {"local_search"}  # reconstructed, not magnitude
    plain = secateurs.apply(model, secateurs.PrunePlan(result.plan.keep), graph=build(model, x))
    with torch.no_grad():
        dense = model(**_ids(5)).last_hidden_state
        refit = (result.model(**_ids(5)).last_hidden_state - dense).norm()
        unrefit = (plain(**_ids(5)).last_hidden_state - dense).norm()
    assert refit < 0.5 * unrefit  # the closed-form refit landed in the transposed (in, out) weights


def test_hf_gpt2_two_four_runs_along_each_outputs_inputs() -> None:
    model = _tiny_gpt2()
    result = secateurs.prune(model, [_ids(seed) for seed in range(2)], None, structure="n:m", progress=False)
    weight = result.model.h[0].mlp.c_fc.weight  # (in 32, out 128): blocks of 4 run down dim 0
    blocks = (weight.T.reshape(128, 8, 4) != 0).sum(-1)
    assert int(blocks.max()) <= 2 and int(blocks.sum()) == 128 * 8 * 2


def test_hf_t5_position_bias_ties_heads_across_layers_and_costs_stay_exact() -> None:
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                              num_heads=4)).eval()
    x = _ids(0, batch=2, length=12)
    g = build(model, x)
    heads = [gr for gr in g.prunable_groups() if gr.name.endswith(":heads")]
    # layer 0's relative-position bias (one column per head) is added to both layers' scores: one group
    assert [gr.name for gr in heads] == ["encoder.block.0.layer.0.SelfAttention:heads"]
    assert {m.module for m in heads[0].members} >= {"encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                                                   "encoder.block.1.layer.0.SelfAttention.q"}
    assert g.cost() == dense_counts(model, x)  # the attention matmuls counted as dense_counts counts them
    small = secateurs.apply(model, secateurs.PrunePlan({heads[0].name: [0, 3]}), graph=g)
    assert g.cost({heads[0].name: 2}) == dense_counts(small, x)
    result = secateurs.prune(model, [_ids(seed, batch=4, length=12) for seed in range(2)], secateurs.Budget(flops=0.6),
                             progress=False)
    assert dense_counts(result.model, _ids(0, batch=4, length=12)).flops <= 0.6 * dense_counts(
        model, _ids(0, batch=4, length=12)).flops


class GatherTime(nn.Module):
    """Picks time steps per channel with an index the caller gives: channel c reads index row c."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(3, 8, 3, padding=1)
        self.b = nn.Conv1d(8, 8, 1)
        self.c = nn.Conv1d(8, 4, 1)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(x)))
        return self.c(torch.gather(h, 2, index))


def test_gather_freezes_the_channels_its_index_rows_follow() -> None:
    model = GatherTime().eval()
    x, index = torch.randn(2, 3, 10), torch.randint(0, 10, (2, 8, 4))
    g = build(model, (x, index), strict=True)  # a rule now, so strict mode does not refuse it
    assert g.group("b:out").reason == "reaches model input 'index'"  # tied to the index's rows, which the caller gives
    assert g.group("a:out").prunable
    assert g.cost() == dense_counts(model, (x, index))


def test_hf_llama_grouped_query_heads_prune_as_kv_groups() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    model, x = transformers.LlamaModel(config).eval(), _ids(0, batch=2, length=12)
    g = build(model, x)
    heads = g.group("layers.0.self_attn:heads")
    assert heads.prunable and heads.size == 2  # a unit is one kv head with the 2 query heads that share it
    assert g.cost() == dense_counts(model, x)
    plan = secateurs.PrunePlan({"layers.0.self_attn:heads": [1]})
    small = secateurs.apply(model, plan, graph=g)
    attention = small.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (16, 8, 16)
    assert g.cost({"layers.0.self_attn:heads": 1}) == dense_counts(small, x)
    masked = secateurs.apply(model, plan, graph=g, mode="mask")
    with torch.no_grad():  # query heads 2 and 3 go with kv head 1: slicing computes what zeroing the others does
        torch.testing.assert_close(small(**x).last_hidden_state, masked(**x).last_hidden_state, rtol=1e-4, atol=1e-5)


class ConstantHeads(nn.Module):
    """``view(..., 4, -1)`` with 4 a constant: pruning would regroup features silently, so it freezes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.out = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = list(x.shape)
        h = torch.softmax(self.fc(x).view(*shape[:-1], 4, -1), dim=-2)
        return self.out(h.flatten(-2))


def test_export_literal_beside_minus_one_still_freezes() -> None:
    g = build(ConstantHeads().eval(), X)
    reason = g.group("fc:out").reason
    assert not g.group("fc:out").prunable and "fixes this size at 4" in reason, reason


class BiasTableAttention(nn.Module):
    """Swin-style attention: a learned bias per (relative position, head), read by a position index."""

    def __init__(self, width: int = 16, heads: int = 4, length: int = 5) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.table = nn.Parameter(torch.randn((2 * length - 1), heads))
        pos = torch.arange(length)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + length - 1).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(t, t, -1).permute(2, 0, 1)
        scores = (q @ k.transpose(-2, -1)) + bias.unsqueeze(0)
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1))


def test_a_bias_table_read_by_a_position_index_prunes_with_its_heads() -> None:
    """x[idx] (aten.index under export) keeps the table's head column tied to the heads."""
    torch.manual_seed(0)
    model, x = BiasTableAttention().eval(), torch.randn(2, 5, 16)
    g = build(model, x, strict=True)
    heads = next(gr for gr in g.prunable_groups() if gr.unit_width == 4)
    assert heads.size == 4 and ("", "table") in {(m.module, m.param) for m in heads.members}
    assert g.group("table:out").reason.startswith("tensor index into channels at node 'getitem")  # positions
    keep = [0, 2]
    small = secateurs.apply(model, secateurs.PrunePlan({heads.name: keep}), graph=g)
    masked = secateurs.apply(model, secateurs.PrunePlan({heads.name: keep}), graph=g, mode="mask")
    assert small.table.shape == (9, 2)
    with torch.no_grad():  # a masked head's q, k, v and bias column are zero: it adds nothing
        assert torch.allclose(small(x), masked(x), atol=1e-5)
    assert g.cost({heads.name: 2}) == dense_counts(small, x)


def test_a_boolean_mask_index_stays_frozen() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)[x[:, 0] > 0].sum(0)  # as many rows as the data says: no fixed cost

    x = torch.randn(6, 4)
    x[:, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0, -3.0])
    g = build(Masked().eval(), x)
    assert not g.group("a:out").prunable
    assert "a mask" in g.group("a:out").reason


def test_hf_swin_heads_prune_through_its_bias_table() -> None:
    torch.manual_seed(0)
    model = transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                           num_heads=[2, 4], window_size=4)).eval()
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    g = build(model, x)
    heads = sorted(gr.name for gr in g.prunable_groups() if gr.name.endswith(":heads"))
    assert heads == ["encoder.layers.0.blocks.0.attention:heads", "encoder.layers.1.blocks.0.attention:heads"]
    assert g.cost() == dense_counts(model, x)
    plan = secateurs.PrunePlan({heads[1]: [1, 2]})
    small = secateurs.apply(model, plan, graph=g)
    table = small.encoder.layers[1].blocks[0].attention.relative_position_bias.relative_position_bias_table
    assert table.shape[1] == 2
    assert g.cost({heads[1]: 2}) == dense_counts(small, x)
