"""One-shot pruning end to end on the shipped MNIST-1D CNN: budgets, fidelity, plans, errors."""

from __future__ import annotations

import math

import pytest
import torch

from secateurs.apply import apply
from secateurs.budget import Budget
from secateurs.calibration import collect
from secateurs.errors import InfeasibleBudgetError, SolverError, UnknownSolverError, ValidationError
from secateurs.graph import dense_counts
from secateurs.models import zoo
from secateurs.oneshot import prune
from secateurs.solvers import SolveResult, Status
from secateurs.sparsity import density_mask, reconstruction_scores, refit_rows


@pytest.fixture(scope="module")
def cnn() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model, info = zoo.load("mnist1d_cnn")
    return model, info.calibration(256, 64)


def _relative_output_error(a: torch.nn.Module, b: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        x = torch.cat(batches)
        ya, yb = a.eval()(x), b.eval()(x)
    return float((ya - yb).norm() / ya.norm())


@pytest.mark.parametrize("sequential", [True, False])
@pytest.mark.parametrize("budget", [Budget(flops=0.5), Budget(params=0.4), Budget(flops=0.6, params=0.6)])
def test_channels_meet_the_budget_as_counted_on_the_pruned_model(cnn, budget: Budget, sequential: bool) -> None:
    model, calibration = cnn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, calibration, budget, progress=False, error_curve=False, sequential=sequential)
    dense = dense_counts(model, calibration[0])
    counted = dense_counts(result.model, calibration[0])  # independent count on the sliced model
    for name, value in budget.structured().items():
        assert getattr(counted, name) <= value * getattr(dense, name)
        line = result.report.total(name)
        assert line.achieved == getattr(counted, name) and line.met
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    kept = {g.name: g.kept for g in result.report.groups}
    assert {g: len(u) for g, u in result.plan.keep.items()} == {g: k for g, k in kept.items() if k < dict(
        (r.name, r.total) for r in result.report.groups)[g]}
    assert _relative_output_error(model, result.model, calibration) < 0.5
    assert result.report.output_error == pytest.approx(_relative_output_error(model, result.model, calibration),
                                                       rel=1e-4)


def test_plan_alone_reproduces_the_pruned_model(cnn) -> None:
    model, calibration = cnn
    result = prune(model, calibration, Budget(flops=0.5), progress=False, error_curve=False)
    again = apply(model, result.plan)  # refit weights travel in the plan
    x = torch.cat(calibration)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), result.model.eval()(x))


def test_refit_and_local_search_beat_magnitude(cnn) -> None:
    model, calibration = cnn
    ours = prune(model, calibration, Budget(flops=0.4), progress=False, error_curve=False)
    baseline = prune(model, calibration, Budget(flops=0.4), reconstruction="magnitude", progress=False,
                     error_curve=False)
    ours_err = sum(g.relative_error for g in ours.report.groups)
    base_err = sum(g.relative_error for g in baseline.report.groups)
    assert ours_err <= base_err + 1e-12


def test_error_curve_falls_with_the_budget(cnn) -> None:
    model, calibration = cnn
    result = prune(model, calibration, Budget(flops=0.5), progress=False)
    curve = result.report.error_curve
    assert len(curve) >= 5 and curve[-1][1] == pytest.approx(0.0, abs=1e-9)
    assert all(a[1] >= b[1] - 1e-12 for a, b in zip(curve, curve[1:], strict=False))


def test_unstructured_meets_the_nonzero_budget(cnn) -> None:
    model, calibration = cnn
    result = prune(model, calibration, Budget(sparsity=0.7), structure="unstructured", progress=False)
    total = sum(model.get_submodule(g.name).weight.numel() for g in result.report.groups)
    nonzeros = sum(int((result.model.get_submodule(g.name).weight != 0).sum()) for g in result.report.groups)
    assert nonzeros <= math.floor(0.3 * total) + 1e-9
    assert result.report.total("nonzeros").achieved == nonzeros
    assert _relative_output_error(model, result.model, calibration) < 0.3


def test_n_m_pattern_holds_in_every_pruned_layer(cnn) -> None:
    model, calibration = cnn
    result = prune(model, calibration, None, structure="n:m", nm=(2, 4), progress=False)
    pruned_layers = [g.name for g in result.report.groups]
    assert pruned_layers and "0" not in pruned_layers  # the first conv has 5 inputs per output
    for name in pruned_layers:
        w = result.model.get_submodule(name).weight.detach()
        blocks = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert torch.all(blocks <= 2)


def test_bad_input_is_rejected_before_any_work(cnn) -> None:
    model, calibration = cnn
    with pytest.raises(ValidationError, match=r"budget.flops: must be positive"):
        Budget(flops=-1)
    with pytest.raises(ValidationError, match=r"budget: name at least one"):
        Budget()
    with pytest.raises(ValidationError, match=r"calibration: no batches"):
        prune(model, [], Budget(flops=0.5), progress=False)
    dense_flops = dense_counts(model, calibration[0]).flops  # counted on the model, not by the graph
    with pytest.raises(InfeasibleBudgetError, match=r"budget 'flops' cannot be met: requested 27115.5, least achievable "
                                                    rf"51200 \({51200 / dense_flops:.3g} of the dense {int(dense_flops):,}, "
                                                    r"with one unit kept in every prunable group\)$"):
        prune(model, calibration, Budget(flops=0.001), progress=False)
    with pytest.raises(InfeasibleBudgetError, match=r"requested 1.5, .*1.5 is above 1, so it was read as an absolute "
                                                    r"count, not a fraction"):
        prune(model, calibration, Budget(flops=1.5), progress=False)
    with pytest.raises(ValidationError, match=r"calibration: batch 1 contains NaN"):
        prune(model, [calibration[0], torch.full_like(calibration[0], float("nan"))], Budget(flops=0.5), progress=False)
    with pytest.raises(ValidationError, match=r"calibration: batch 0 does not run through the model"):
        prune(model, [torch.randn(4, 2, 40)], Budget(flops=0.5), example_inputs=calibration[0], progress=False)
    with pytest.raises(ValidationError, match=r"structure: expected one of"):
        prune(model, calibration, Budget(flops=0.5), structure="rows")
    with pytest.raises(ValidationError, match=r"budget: an 2:4 pattern removes exactly 0.5"):
        prune(model, calibration, Budget(sparsity=0.3), structure="n:m")
    with pytest.raises(ValidationError, match=r"nm: expected a pair of integers \(N, M\), got \(2.0, 4\)"):
        prune(model, calibration, None, structure="n:m", nm=(2.0, 4))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"calibration: expected an iterable of batches, got NoneType"):
        prune(model, None, Budget(flops=0.5))  # type: ignore[arg-type]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calibration[0], torch.zeros(64)), batch_size=8)
    with pytest.raises(ValidationError, match=r"calibration: batch 0 does not match Sequential.forward: too many "
                                              r"positional arguments; a list batch of 2 .*\(x for x, _ in loader\)"):
        prune(model, loader, Budget(flops=0.5), progress=False)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with pytest.raises(ValidationError, match=r"nm: no layer has a multiple of 3 inputs per output"):
        prune(mlp, [torch.randn(4, 8)], None, structure="n:m", nm=(1, 3), progress=False)


def test_unknown_solver_names_fail_before_the_calibration_is_read(cnn) -> None:
    model, _ = cnn

    def untouched():  # noqa: ANN202
        raise AssertionError("the calibration data was read")
        yield

    with pytest.raises(UnknownSolverError, match=r"reconstruction: no solver 'local_serch' .*registered: .*local_search"):
        prune(model, untouched(), Budget(flops=0.5), reconstruction="local_serch", progress=False)
    with pytest.raises(UnknownSolverError, match=r"allocation: no solver 'cp-sat' .*registered: .*cpsat"):
        prune(model, untouched(), Budget(flops=0.5), allocation="cp-sat", progress=False)


def test_an_allocation_out_of_time_without_a_plan_falls_back_to_greedy(cnn) -> None:
    """A solver that ends at its limit with no plan (CP-SAT before its first solution) is not a failed run."""
    model, calibration = cnn

    def out_of_time(problem, *, time_limit, seed):  # noqa: ANN001, ANN202
        return SolveResult(Status.LIMIT, math.nan, None)

    result = prune(model, calibration, Budget(flops=0.5), allocation=out_of_time, progress=False, error_curve=False)
    assert any("found no plan (limit); used 'greedy'" in n for n in result.report.notes)
    assert dense_counts(result.model, calibration[0]).flops <= 0.5 * dense_counts(model, calibration[0]).flops


def test_a_reconstruction_solver_that_refuses_keeps_the_greedy_support(cnn) -> None:
    """enumerate refuses layers with too many supports; the group keeps greedy's, and says so."""
    model, calibration = cnn
    result = prune(model, calibration, Budget(flops=0.5), reconstruction="enumerate", progress=False,
                   error_curve=False)
    refused = [g for g in result.report.groups if "kept the greedy support" in g.note]
    assert refused and all(g.solver == "greedy" and "enumerate:" in g.note for g in refused)
    assert dense_counts(result.model, calibration[0]).flops <= 0.5 * dense_counts(model, calibration[0]).flops


class ConvThenEncoder(torch.nn.Module):
    """A conv stem feeding nn.TransformerEncoder, whose eval fast path FlopCounterMode cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv1d(4, 32, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv1d(32, 32, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv1d(32, 16, 3, padding=1))
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.stem(x).transpose(1, 2)).mean(1))


def test_a_transformer_encoder_counts_its_flops_in_the_budget() -> None:
    torch.manual_seed(0)
    model, x = ConvThenEncoder().eval(), [torch.randn(8, 4, 12) for _ in range(2)]
    result = prune(model, x, Budget(flops=0.6), progress=False, error_curve=False)
    dense, pruned = dense_counts(model, x[0]), dense_counts(result.model, x[0])
    flops = next(line for line in result.report.totals if line.name == "flops")
    assert flops.dense == dense.flops and flops.achieved == pruned.flops  # the encoder's FLOPs on both sides
    assert pruned.flops <= 0.6 * dense.flops and not result.report.notes


def test_a_pruned_model_over_budget_by_the_count_is_an_error(cnn, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the independent count disagrees with the cost model and breaks the budget, prune refuses."""
    import secateurs.oneshot as oneshot

    model, calibration = cnn
    honest = oneshot.dense_counts

    def inflated(m, inputs):  # noqa: ANN001, ANN202 - prune counts only the pruned model this way
        c = honest(m, inputs)
        return type(c)(params=c.params, flops=c.flops * 3)

    monkeypatch.setattr(oneshot, "dense_counts", inflated)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SolverError, match=r"budget 'flops' is not met: the pruned model counts"):
        prune(model, calibration, Budget(flops=0.5), progress=False, error_curve=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class AttentionNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Linear(6, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.out(self.attn(h, h, h)[0].mean(1))


def test_unstructured_prunes_attention_projections_on_calibration_statistics() -> None:
    """MHA runs out_proj and in_proj_weight inside F.multi_head_attention_forward (no hook on
    them fires): their inputs come from the attention call, so both have a calibration signal,
    and the sparsity holds over every matrix weight."""
    torch.manual_seed(0)
    model, x = AttentionNet().eval(), [torch.randn(8, 5, 6) for _ in range(2)]
    stats = collect(model, x, ["attn:query"])["attn:query"]
    with torch.no_grad():  # the packed projection of a self-attention reads its one input: emb's output
        h = torch.cat([model.emb(b).reshape(-1, 16) for b in x]).double()
    assert torch.allclose(stats.gram, h.T @ h, atol=1e-6)
    result = prune(model, x, Budget(sparsity=0.5), structure="unstructured", progress=False)
    weights = {n: p for n, p in result.model.named_parameters() if p.dim() == 2}
    assert set(weights) == {"emb.weight", "attn.in_proj_weight", "attn.out_proj.weight", "out.weight"}
    nonzero = sum(int((w != 0).sum()) for w in weights.values())
    assert nonzero <= 0.5 * sum(w.numel() for w in weights.values()) + 1
    assert (weights["attn.out_proj.weight"] == 0).any() and (weights["attn.in_proj_weight"] == 0).any()
    assert not result.report.notes
    nonzeros = next(line for line in result.report.totals if line.name == "nonzeros")
    assert nonzeros.dense == sum(w.numel() for w in weights.values()) and nonzeros.achieved == nonzero


class CrossAttentionNet(torch.nn.Module):
    """Queries from one stream, keys and values from another (a decoder reading an encoder's memory);
    with ``kdim`` the key/value projections are separate parameters of that width."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.emb = torch.nn.Linear(6, 16)
        self.mem = torch.nn.Linear(6, kdim or 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.out = torch.nn.Linear(16, 3)

    def streams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.emb(x), 3 * torch.tanh(self.mem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, m = self.streams(x)
        return self.out(self.attn(q, m, value=m)[0].mean(1))  # value by keyword: read either way


@pytest.mark.parametrize("kdim", [None, 8])
def test_unstructured_cross_attention_scores_each_projection_block_on_the_input_it_reads(kdim: int | None) -> None:
    """q rows read the query stream, k/v rows the memory: each block is masked by |W|·‖X‖ and refit
    on the Gram of its own input, computed here from the two streams."""
    torch.manual_seed(0)
    model, x = CrossAttentionNet(kdim).eval(), [torch.randn(8, 5, 6) for _ in range(2)]
    with torch.no_grad():
        q, m = (torch.cat([s.reshape(-1, s.shape[-1]) for s in streams]).double()
                for streams in zip(*(model.streams(b) for b in x), strict=True))
    grams = {"query": q.T @ q, "key": m.T @ m, "value": m.T @ m}
    stats = collect(model, x, [f"attn:{a}" for a in grams])
    assert all(torch.allclose(stats[f"attn:{a}"].gram, g, rtol=1e-5, atol=1e-4) for a, g in grams.items())

    result = prune(model, x, Budget(sparsity=0.5), structure="unstructured", progress=False)
    assert not [n for n in result.report.notes if "magnitude" in n]
    if kdim is None:
        names = {a: f"attn.in_proj_weight[{a}]" for a in grams}
        dense = dict(zip(grams, model.attn.in_proj_weight.detach().chunk(3), strict=True))
        pruned = dict(zip(grams, result.model.attn.in_proj_weight.detach().chunk(3), strict=True))
    else:
        names = {a: f"attn.{a[0]}_proj_weight" for a in grams}
        dense = {a: model.get_parameter(n).detach() for a, n in names.items()}
        pruned = {a: result.model.get_parameter(n).detach() for a, n in names.items()}
    reported = {g.name: g for g in result.report.groups}
    differs = False
    for argument, gram in grams.items():
        weight = dense[argument].double()
        kept = reported[names[argument]].kept
        mask = density_mask(reconstruction_scores(weight, gram), kept)
        assert torch.equal(pruned[argument] != 0, mask)
        assert torch.allclose(pruned[argument].double(), refit_rows(weight, gram, mask).double(), atol=1e-5)
        differs |= not torch.equal(mask, density_mask(weight.abs(), kept))  # what magnitude would keep
    assert differs  # the test can tell the inputs' norms were used


def test_an_attention_never_called_is_pruned_by_magnitude_and_says_so() -> None:
    torch.manual_seed(0)
    model, x = AttentionNet().eval(), [torch.randn(8, 5, 6) for _ in range(2)]
    model.forward = lambda t: model.out(model.emb(t).mean(1))  # type: ignore[method-assign]
    result = prune(model, x, Budget(sparsity=0.5), structure="unstructured", progress=False)
    assert [n for n in result.report.notes if n.startswith("attn.in_proj")] == [
        f"attn.in_proj_weight[{a}]: never called on the calibration data ('attn' was not), so no calibration "
        "signal; pruned by magnitude" for a in ("query", "key", "value")]


def test_unstructured_removes_what_is_asked_when_removing_more_would_cost_nothing() -> None:
    """A 3x3 conv on 1x1 maps only reads its centre tap: 8/9 of it is free to cut. Sparsity 0.3 is 0.3."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16, 4)).eval()
    x = [torch.randn(32, 8, 1, 1) for _ in range(2)]
    result = prune(model, x, Budget(sparsity=0.3), structure="unstructured", progress=False)
    weights = [result.model[0].weight, result.model[3].weight]
    removed = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert 0.3 - 1e-9 <= removed <= 0.35  # the budget, and not far past it (before: 0.6, every free weight cut)


def test_a_spent_time_limit_cuts_the_error_curve_and_the_plan_still_meets_the_budget(cnn) -> None:
    model, calibration = cnn
    result = prune(model, calibration, Budget(flops=0.5), time_limit=1e-3, progress=False)
    assert any(n.startswith("error curve: 0 of 9 budgets") for n in result.report.notes)
    assert dense_counts(result.model, calibration[0]).flops <= 0.5 * dense_counts(model, calibration[0]).flops
    assert all(g.solver in ("greedy", "magnitude") for g in result.report.groups if g.kept < g.total)
    assert any(n.endswith("refit on the dense model's statistics (the layer-wise pass stopped collecting them)")
               for n in result.report.notes)
    # with the time spent, the layer-wise pass collects nothing more: the prune is the one-pass prune
    one_pass = prune(model, calibration, Budget(flops=0.5), time_limit=1e-3, progress=False, sequential=False)
    assert one_pass.plan.keep == result.plan.keep
    x = torch.cat(calibration)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), one_pass.model(x), rtol=1e-6, atol=1e-6)


def test_the_error_curve_takes_a_share_of_the_allocation_time_and_names_unproven_points(
        cnn, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a time limit, the curve's solves split 2 x the allocation's time per budget (2 to 30 s) evenly; a
    point solved to its limit is kept as the best plan found and named in a note."""
    import dataclasses

    import secateurs.oneshot as oneshot_module

    model, calibration = cnn
    real = oneshot_module.solve_allocation
    limits: list[float | None] = []

    def out_of_time_after_the_first(problem, solver, deadline, seed):  # noqa: ANN001, ANN202 - test double
        limits.append(deadline.solver_limit())
        result, note = real(problem, solver, deadline, seed)
        return (result, note) if len(limits) == 1 else (dataclasses.replace(result, status=Status.LIMIT), note)

    monkeypatch.setattr(oneshot_module, "solve_allocation", out_of_time_after_the_first)
    result = prune(model, calibration, Budget(flops=0.5), progress=False)
    assert limits[0] is None  # the allocation itself: no limit
    share = max(oneshot_module.CURVE_MIN_SECONDS, min(oneshot_module.CURVE_MAX_SECONDS, oneshot_module.CURVE_POINTS
                                                      * oneshot_module.CURVE_SHARE * result.report.stages["allocation"]))
    assert len(limits) == 1 + oneshot_module.CURVE_POINTS
    assert limits[1] == pytest.approx(share / oneshot_module.CURVE_POINTS, rel=0.05)
    assert all(b is not None and b <= share for b in limits[1:])
    assert [f for f, _ in result.report.error_curve] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert (f"error curve: at 20%, 30%, 40%, 50%, 60%, 70%, 80%, 90%, 100% of the dense flops the plans are the best "
            f"found within the curve's {share:.1f} s share, not proven optimal") in result.report.notes
    monkeypatch.setattr(oneshot_module, "solve_allocation", real)
    exact = prune(model, calibration, Budget(flops=0.5), progress=False)
    assert not any(n.startswith("error curve") for n in exact.report.notes)
    flat = [v for point in exact.report.error_curve for v in point]
    assert flat == pytest.approx([v for point in result.report.error_curve for v in point])  # dp: the same optimum


class _TinyResNet(torch.nn.Module):
    """Two residual blocks, the second with a projection shortcut: the convs and shortcuts close
    cycles among the groups' cost terms, which dp eliminates (tree width 2)."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem = conv(3, 8, 3, padding=1)
        self.a1, self.a2 = conv(8, 8, 3, padding=1), conv(8, 8, 3, padding=1)
        self.b1, self.b2 = conv(8, 12, 3, stride=2, padding=1), conv(12, 12, 3, padding=1)
        self.short = conv(8, 12, 1, stride=2)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(self.short(x) + self.b2(torch.relu(self.b1(x))))
        return self.head(x.mean((2, 3)))


def test_a_residual_network_is_allocated_exactly_by_dp_and_meets_the_budget() -> None:
    """Residual blocks close cycles in the interactions; dp eliminates them (tree width 2) and agrees with the MIP."""
    torch.manual_seed(0)
    model = _TinyResNet().eval()
    batches = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    results = {name: prune(model, batches, Budget(flops=0.5), allocation=name, levels=4, progress=False)
               for name in ("dp", "mip")}
    exact = results["dp"].report
    assert not any(n.startswith("allocation solver") for n in exact.notes)
    assert exact.allocation["solver"] == "dp" and exact.allocation["status"] == "optimal"
    assert exact.allocation["objective"] == pytest.approx(results["mip"].report.allocation["objective"], rel=1e-6)
    dense = dense_counts(model, batches[0]).flops
    for result in results.values():
        assert dense_counts(result.model, batches[0]).flops <= 0.5 * dense
        assert result.report.output_error == pytest.approx(_relative_output_error(model, result.model, batches),
                                                           rel=1e-4)
