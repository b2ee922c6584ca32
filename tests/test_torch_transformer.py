"""torch.nn's Transformer containers: traced through to their layers, pruned, and run correctly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secateurs
from secateurs.calibration import collect, input_source
from secateurs.consumers import consumer_columns
from secateurs.errors import ValidationError
from secateurs.graph import build, dense_counts
from secateurs.module_sync import pruned_implementation
from secateurs.modules import (
    PrunedMultiheadAttention,
    PrunedTransformerEncoder,
    PrunedTransformerEncoderLayer,
    attention_heads,
)
from secateurs.torch_transformer import encoder_forward, packed_encoder_forward, slow_forward


class Encoder(nn.Module):
    """A sequence classifier on nn.TransformerEncoder, as users write one."""

    def __init__(self, norm_first: bool = False, activation: str = "relu", layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first,
                                           activation=activation)
        self.enc = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(32), enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


class Seq2Seq(nn.Module):
    """nn.Transformer (encoder and decoder, cross-attention) between two linear embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.src = nn.Linear(6, 32)
        self.tgt = nn.Linear(6, 32)
        self.core = nn.Transformer(32, 4, 1, 1, 48, dropout=0.0, batch_first=True)
        self.out = nn.Linear(32, 6)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.out(self.core(self.src(src), self.tgt(tgt)))


def _batches(n: int, seed: int, length: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, length, 8, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_slow_forwards_compute_what_the_stock_fused_paths_compute(norm_first: bool, activation: str) -> None:
    torch.manual_seed(0)
    enc = Encoder(norm_first, activation).enc.eval()
    x = torch.randn(3, 9, 32)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(9)
    with torch.no_grad():  # eval and no grad: the stock modules take their fused kernels
        for kwargs in ({}, {"src_key_padding_mask": padding}, {"mask": causal}):
            assert torch.allclose(slow_forward(enc)(enc, x, **kwargs), enc(x, **kwargs), atol=1e-5)
        layer = enc.layers[0]
        assert torch.allclose(slow_forward(layer)(layer, x), layer(x), atol=1e-5)


def test_slow_transformer_forward_matches_with_masks() -> None:
    torch.manual_seed(0)
    core = Seq2Seq().core.eval()
    src, tgt = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        assert torch.allclose(slow_forward(core)(core, src, tgt, tgt_mask=mask), core(src, tgt, tgt_mask=mask),
                              atol=1e-5)


def test_a_subclass_with_its_own_forward_is_traced_as_written() -> None:
    class Mine(nn.TransformerEncoderLayer):
        def forward(self, src: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:  # type: ignore[override]
            return self.linear2(F.relu(self.linear1(src)))

    assert slow_forward(Mine(8, 2, 16)) is None
    assert slow_forward(nn.TransformerEncoderLayer(8, 2, 16)) is not None
    assert slow_forward(nn.Linear(2, 2)) is None


def test_encoder_groups_are_heads_ffn_and_stream_with_exact_costs() -> None:
    model, x = Encoder().eval(), _batches(1, 0)[0]
    g = build(model, x)
    names = {gr.name for gr in g.prunable_groups()}
    assert {"enc.layers.0.self_attn:heads", "enc.layers.1.self_attn:heads", "enc.layers.0.linear1:out",
            "enc.layers.1.linear1:out", "emb:out"} == names
    assert g.cost() == dense_counts(model, x)
    heads = next(gr for gr in g.groups if gr.name == "enc.layers.0.self_attn:heads")
    assert (heads.size, heads.unit_width) == (4, 8)
    keep = {"enc.layers.0.self_attn:heads": [1, 3], "enc.layers.1.linear1:out": list(range(0, 64, 3))}
    small = secateurs.apply(model, secateurs.PrunePlan(keep), graph=g)
    assert g.cost({k: len(v) for k, v in keep.items()}) == dense_counts(small, x)


def test_seq2seq_cross_attention_heads_prune_and_costs_stay_exact() -> None:
    torch.manual_seed(0)
    model = Seq2Seq().eval()
    src, tgt = torch.randn(4, 7, 6), torch.randn(4, 5, 6)
    g = build(model, (src, tgt))
    names = {gr.name for gr in g.prunable_groups()}
    for attn in ("core.encoder.layers.0.self_attn", "core.decoder.layers.0.self_attn",
                 "core.decoder.layers.0.multihead_attn"):
        assert f"{attn}:heads" in names
    assert g.cost() == dense_counts(model, (src, tgt))
    keep = {"core.decoder.layers.0.multihead_attn:heads": [0, 2], "core.encoder.layers.0.self_attn:heads": [3]}
    small = secateurs.apply(model, secateurs.PrunePlan(keep), graph=g)
    assert g.cost({k: len(v) for k, v in keep.items()}) == dense_counts(small, (src, tgt))
    masked = secateurs.apply(model, secateurs.PrunePlan(keep), graph=g, mode="mask")
    with torch.no_grad():  # slicing removes exactly what masking zeroes
        assert torch.allclose(small(src, tgt), masked(src, tgt), atol=1e-5)


def test_cross_attention_rows_read_the_query_and_the_memory_and_are_refit() -> None:
    """The stream group's consumers include the cross-attention's packed projection as three row
    blocks: the query rows see the decoder stream, the key and value rows the encoder's memory
    (Grams checked against hooks on the modules that compute them), and every block is refit."""
    torch.manual_seed(0)
    model = Seq2Seq().eval()
    batches = [(torch.randn(4, 7, 6), torch.randn(4, 5, 6)) for _ in range(3)]
    attn = "core.decoder.layers.0.multihead_attn"
    graph = build(model, batches[0])
    group = next(g for g in graph.prunable_groups()
                 if any(m.module == attn and m.param == "in_proj_weight" and m.dim == 1 for m in g.consumers()))
    blocks = [c for c in consumer_columns(model, group)[0] if c.module == f"{attn}.in_proj_weight"]
    assert [(c.input, c.rows) for c in blocks] == [
        (f"{attn}:query", (0, 32)), (f"{attn}:key", (32, 64)), (f"{attn}:value", (64, 96))]

    seen: dict[str, list[torch.Tensor]] = {"query": [], "memory": []}
    hooks = [model.core.decoder.layers[0].norm1.register_forward_hook(lambda m, a, out: seen["query"].append(out)),
             model.core.encoder.register_forward_hook(lambda m, a, out: seen["memory"].append(out))]
    with torch.no_grad():
        for b in batches:
            model(*b)
    for h in hooks:
        h.remove()
    gram = {k: sum(x.reshape(-1, 32).double().T @ x.reshape(-1, 32).double() for x in v) for k, v in seen.items()}
    stats = collect(model, batches, [c.input for c in blocks])
    for c, expected in zip(blocks, (gram["query"], gram["memory"], gram["memory"]), strict=True):
        assert torch.allclose(stats[c.input].gram, expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(gram["query"], gram["memory"], rtol=0.1)  # the test tells the inputs apart

    result = secateurs.prune(model, batches, secateurs.Budget(flops=0.3), progress=False, error_curve=False)
    stream = next(g for g in result.report.groups if g.name == group.name)
    assert stream.kept < stream.total and "not refit" not in stream.note


def test_pruned_encoder_runs_its_slow_path_and_equals_the_masked_model() -> None:
    """The stock fused kernel would reject (or miscompute) heads narrower than embed_dim."""
    torch.manual_seed(0)
    model, x = Encoder().eval(), _batches(1, 1)[0]
    g = build(model, x)
    plan = secateurs.PrunePlan({"enc.layers.0.self_attn:heads": [0, 2], "enc.layers.1.self_attn:heads": [1]})
    small = secateurs.apply(model, plan, graph=g)
    masked = secateurs.apply(model, plan, graph=g, mode="mask")
    layer = small.enc.layers[0]
    assert isinstance(layer, PrunedTransformerEncoderLayer) and isinstance(layer.self_attn, PrunedMultiheadAttention)
    assert type(model.enc.layers[0]) is nn.TransformerEncoderLayer  # the input model is untouched
    padding = torch.zeros(x.shape[:2], dtype=torch.bool)
    padding[0, 4:] = True
    real = ~padding
    with torch.no_grad():
        assert torch.allclose(small(x), masked(x), atol=1e-5)
        assert torch.allclose(small.enc(small.emb(x), src_key_padding_mask=padding)[real],
                              masked.enc(masked.emb(x), src_key_padding_mask=padding)[real], atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_packed_encoder_gives_what_the_stock_encoder_gives(norm_first: bool) -> None:
    """Packing is taken where torch's encoder takes its nested path (zeros at the padding before
    the final norm), and the slow path where torch's does (norm_first layers, padding at the start,
    autograd on trainable weights, an attention mask): the padding positions hold what the dense
    model gives, and the real tokens what the slow path gives."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32)).eval()
    x = torch.randn(4, 9, 32)
    padding = torch.arange(9)[None, :] >= torch.tensor([9, 3, 6, 1])[:, None]
    with torch.no_grad():
        packed = packed_encoder_forward(enc, x, src_key_padding_mask=padding)
        assert torch.allclose(packed, enc(x, src_key_padding_mask=padding), atol=1e-5)
        slow = encoder_forward(enc, x, src_key_padding_mask=padding)
        assert torch.allclose(packed[~padding], slow[~padding], atol=1e-5)
        zeros = torch.allclose(packed[padding], enc.norm(torch.zeros(32)).expand(int(padding.sum()), 32))
        assert zeros == (not norm_first)  # torch's encoder turns its nested path off for norm_first layers
        left = padding.flip(1)  # padded at the start: torch's mask check takes the slow path
        assert torch.allclose(packed_encoder_forward(enc, x, src_key_padding_mask=left),
                              enc(x, src_key_padding_mask=left), atol=1e-5)
        causal = nn.Transformer.generate_square_subsequent_mask(9)
        assert torch.equal(packed_encoder_forward(enc, x, mask=causal), encoder_forward(enc, x, mask=causal))
    with torch.enable_grad():  # trainable weights under autograd: torch's slow path, and so here
        assert torch.allclose(packed_encoder_forward(enc, x, src_key_padding_mask=padding),
                              enc(x, src_key_padding_mask=padding), atol=1e-5)


def test_out_proj_statistics_are_the_heads_output_the_stock_module_projects() -> None:
    """The Gram of out_proj's input, against the heads' output taken from the stock functional path
    with an identity output projection (so its output is its input)."""
    torch.manual_seed(0)
    model = Encoder().eval()
    batches = _batches(2, 2)
    name = "enc.layers.1.self_attn.out_proj"
    assert input_source(model, name).module == "enc.layers.1.self_attn"
    stats = collect(model, batches, [name])[name]
    mha = model.enc.layers[1].self_attn
    seen: list[torch.Tensor] = []
    hook = mha.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        for b in batches:
            model(b)
    hook.remove()
    expected = torch.zeros(32, 32, dtype=torch.float64)
    with torch.no_grad():
        for h in seen:
            heads = F.multi_head_attention_forward(
                h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), 32, 4, mha.in_proj_weight, mha.in_proj_bias,
                None, None, False, 0.0, torch.eye(32), torch.zeros(32), need_weights=False)[0]
            rows = heads.reshape(-1, 32).double()
            expected += rows.T @ rows
    assert stats.rows == sum(h.shape[0] * h.shape[1] for h in seen)
    assert torch.allclose(stats.gram, expected, rtol=1e-5, atol=1e-6)


def test_attention_heads_of_separate_projections_are_what_the_stock_module_projects() -> None:
    """kdim / vdim give separate q/k/v weights: the heads' output is recomputed from them, checked
    through the stock module (its output projection applied to the recomputed heads)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, kdim=6, vdim=10, batch_first=True).eval()
    query, key, value = torch.randn(3, 5, 16), torch.randn(3, 7, 6), torch.randn(3, 7, 10)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    with torch.no_grad():
        stock = mha(query, key, value, key_padding_mask=padding, need_weights=False)[0]
        heads = attention_heads(mha, query, key, value, key_padding_mask=padding, need_weights=False)
        assert torch.allclose(mha.out_proj(heads), stock, atol=1e-5)


def test_attention_heads_refuses_modules_it_cannot_recompute() -> None:
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
    x = torch.randn(1, 3, 8)
    with pytest.raises(ValidationError, match="bias_k"):
        attention_heads(mha, x, x, x)


def test_prune_encoder_to_budget_with_head_statistics() -> None:
    """Heads get calibration statistics (OSSCAR solves and refit), the budget is met by an
    independent count, the pruned model stays close to the dense one and the input model is unchanged."""
    torch.manual_seed(0)
    model = Encoder().eval()
    before = copy.deepcopy(model.state_dict())
    calibration, held = _batches(6, 3), _batches(2, 4)
    result = secateurs.prune(model, calibration, secateurs.Budget(flops=0.6), progress=False)
    assert dense_counts(result.model, held[0]).flops <= 0.6 * dense_counts(model, held[0]).flops
    rows = {r.name: r for r in result.report.groups}
    heads = [rows[f"enc.layers.{layer}.self_attn:heads"] for layer in (0, 1)]
    assert not any("magnitude" in row.note for row in heads)
    assert any(row.kept < row.total and row.relative_error > 0 and row.solver == "local_search" for row in heads)
    with torch.no_grad():
        for x in held:
            dense, pruned = model(x), result.model(x)
            assert (pruned - dense).norm() < 0.5 * dense.norm()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class MaskedSeq2Seq(Seq2Seq):
    """The causal mask is an input, in torch's own additive form (0 and -inf)."""

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.out(self.core(self.src(src), self.tgt(tgt), tgt_mask=mask))


def test_seq2seq_prunes_its_width_on_calibration_with_an_additive_causal_mask() -> None:
    """-inf in a calibration batch is a mask, not bad data; nn.Transformer's d_model check follows
    the pruned width."""
    torch.manual_seed(0)
    model = MaskedSeq2Seq().eval()
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    calibration = [(torch.randn(4, 7, 6), torch.randn(4, 5, 6), mask) for _ in range(4)]
    g = build(model, calibration[0])
    width = next(gr for gr in g.prunable_groups() if gr.name == "src:out")
    plan = secateurs.PrunePlan({width.name: list(range(0, 32, 2))})
    small = secateurs.apply(model, plan, graph=g)
    assert small.core.d_model == 16 and model.core.d_model == 32
    # a LayerNorm over fewer channels is not the masked one, so the check is the counted cost
    assert g.cost({width.name: 16}) == dense_counts(small, calibration[1])
    result = secateurs.prune(model, calibration, secateurs.Budget(flops=0.5), progress=False)
    assert dense_counts(result.model, calibration[0]).flops <= 0.5 * dense_counts(model, calibration[0]).flops
    with pytest.raises(ValidationError, match="batch 0 contains NaN or infinite"):
        secateurs.prune(model, [(calibration[0][0], calibration[0][1], -mask)], secateurs.Budget(flops=0.5),
                        progress=False)


class WideStream(nn.Module):
    """A wide residual stream and a narrow FFN: a FLOPs budget has to prune the stream, which every
    layer's packed q/k/v projection reads."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(8, 64)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 2, 16, dropout=0.0, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(x)).mean(1))


def test_the_stream_refits_each_layers_packed_projection() -> None:
    """in_proj_weight is a consumer of the stream (its input is the self-attention's query): the
    plan refits it, and the refit lowers the output error against the same plan without it."""
    torch.manual_seed(0)
    model = WideStream().eval()
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 8, generator=gen)  # low-rank inputs: the stream has redundancy to remove

    def batch() -> torch.Tensor:
        return torch.randn(6, 7, 4, generator=gen) @ basis + 0.05 * torch.randn(6, 7, 8, generator=gen)

    calibration, held = [batch() for _ in range(6)], [batch() for _ in range(2)]
    result = secateurs.prune(model, calibration, secateurs.Budget(flops=0.5), progress=False)
    stream = next(g for g in result.report.groups if g.name == "emb:out")
    assert stream.kept < stream.total and "in_proj_weight" not in stream.note
    assert {"enc.layers.0.self_attn.in_proj_weight", "enc.layers.1.self_attn.in_proj_weight"} <= set(result.plan.refit)
    unrefit = secateurs.PrunePlan(result.plan.keep, refit={k: v for k, v in result.plan.refit.items()
                                                            if not k.endswith("in_proj_weight")})
    plain = secateurs.apply(model, unrefit, graph=build(model, calibration[0]))

    def error(pruned: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((pruned(x) - model(x)).norm() / model(x).norm()) for x in held)

    assert error(result.model) < error(plain)


def test_pruned_implementation_computes_the_same_through_the_pruned_classes() -> None:
    """The copy a latency budget times: every packed attention as PrunedMultiheadAttention, its
    layers and encoder on their slow, packing paths, at full width; the outputs those of the model
    (padding included, where torch's encoder nests), the model untouched, a model without attention
    returned as it is."""
    torch.manual_seed(0)
    model = Encoder().eval()
    model.enc.enable_nested_tensor = model.enc.use_nested_tensor = True  # torch nests padded batches here
    twin = pruned_implementation(model)
    assert all(type(layer) is PrunedTransformerEncoderLayer and type(layer.self_attn) is PrunedMultiheadAttention
               for layer in twin.enc.layers)
    assert type(twin.enc) is PrunedTransformerEncoder
    assert type(model.enc.layers[0].self_attn) is nn.MultiheadAttention and type(model.enc) is nn.TransformerEncoder
    x = _batches(1, 2)[0]
    padding = torch.arange(x.shape[1])[None, :] >= torch.tensor([7, 3, 5, 7, 1, 6])[:, None]
    with torch.no_grad():
        assert torch.allclose(twin(x), model(x), atol=1e-5)
        h = model.emb(x)
        assert torch.allclose(twin.enc(h, src_key_padding_mask=padding), model.enc(h, src_key_padding_mask=padding),
                              atol=1e-5)
    cnn = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU())
    assert pruned_implementation(cnn) is cnn


class KeyValueAttention(nn.Module):
    """Queries from one stream, keys and values from two others of their own widths (kdim, vdim):
    nn.MultiheadAttention then holds separate q/k/v projections."""

    def __init__(self, add_zero_attn: bool = False) -> None:
        super().__init__()
        self.q = nn.Linear(6, 16)
        self.k = nn.Linear(6, 8)
        self.v = nn.Linear(6, 12)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True, kdim=8, vdim=12, add_zero_attn=add_zero_attn)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(self.q(x), self.k(m), self.v(m), need_weights=False)[0].mean(1))


def test_separate_projections_prune_heads_and_each_stream_with_exact_costs() -> None:
    torch.manual_seed(0)
    model = KeyValueAttention().eval()
    inputs = (torch.randn(3, 5, 6), torch.randn(3, 7, 6))
    g = build(model, inputs)
    assert {gr.name for gr in g.prunable_groups()} == {"q:out", "k:out", "v:out", "attn:heads", "attn.out_proj:out"}
    assert g.cost() == dense_counts(model, inputs)
    keep = {"attn:heads": [0, 3], "q:out": [1, 2, 5, 8, 9, 15], "k:out": [0, 7], "v:out": list(range(0, 12, 3)),
            "attn.out_proj:out": [4, 5]}
    small = secateurs.apply(model, secateurs.PrunePlan(keep), graph=g)
    masked = secateurs.apply(model, secateurs.PrunePlan(keep), graph=g, mode="mask")
    attn = small.attn
    assert isinstance(attn, PrunedMultiheadAttention)
    assert (attn.embed_dim, attn.kdim, attn.vdim, attn.num_heads) == (6, 2, 4, 2)
    assert [tuple(w.shape) for w in (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight)] == [
        (8, 6), (8, 2), (8, 4)]
    assert g.cost({k: len(v) for k, v in keep.items()}) == dense_counts(small, inputs)
    with torch.no_grad():  # slicing removes exactly what masking zeroes
        assert torch.allclose(small(*inputs), masked(*inputs), atol=1e-6)
    batches = [(torch.randn(8, 5, 6), torch.randn(8, 7, 6)) for _ in range(3)]
    result = secateurs.prune(model, batches, secateurs.Budget(flops=0.4), progress=False, error_curve=False)
    assert dense_counts(result.model, inputs).flops <= 0.4 * dense_counts(model, inputs).flops
    assert all("not refit" not in gr.note for gr in result.report.groups)  # q/k/v read their own inputs


def test_attention_with_zero_attention_rows_is_frozen_and_never_sliced() -> None:
    """add_zero_attn appends a zero key the pruned module would not compute: the graph freezes what
    the attention touches, and a plan made on another graph is refused."""
    torch.manual_seed(0)
    model = KeyValueAttention(add_zero_attn=True).eval()
    inputs = (torch.randn(3, 5, 6), torch.randn(3, 7, 6))
    graph = build(model, inputs)
    assert {g.name for g in graph.prunable_groups()} == set()  # q/k/v feed it, out reads it, the output is out's
    frozen = {g.name: g.reason for g in graph.groups if not g.prunable}
    assert "add_zero_attn are not modelled" in frozen["q:out"]
    plain = build(KeyValueAttention().eval(), inputs)
    with pytest.raises(secateurs.errors.InvalidPlanError, match="add_zero_attn cannot be sliced"):
        secateurs.apply(model, secateurs.PrunePlan({"attn:heads": [0, 1]}), graph=plain)
