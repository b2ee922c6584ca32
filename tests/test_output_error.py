"""The end-to-end output error of a pruned model, and the groups a normalisation renormalises."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from secateurs.budget import Budget
from secateurs.errors import ValidationError
from secateurs.graph import build
from secateurs.measure import output_error
from secateurs.models import zoo
from secateurs.oneshot import prune


class TwoHeads(nn.Module):
    """A model returning a dict of a float and an integer tensor, as HF outputs mix them."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        y = self.lin(x) * self.scale
        return {"logits": y, "ids": y.argmax(-1), "extra": (y + 1, [2 * y])}


def test_output_error_is_the_frobenius_ratio_over_every_batch_and_floating_output() -> None:
    torch.manual_seed(0)
    dense = TwoHeads()
    pruned = TwoHeads(scale=1.1)
    pruned.load_state_dict(dense.state_dict())
    batches = [torch.randn(4, 3), torch.randn(5, 3)]
    with torch.no_grad():
        y = torch.cat([dense.lin(x) for x in batches]).double()
    # floating outputs y, y + 1 and 2y against 1.1y, 1.1y + 1 and 2.2y; the argmax ids are not compared
    diff = (0.1**2 + 0.1**2 + 0.2**2) * float(y.pow(2).sum())
    total = float(y.pow(2).sum() + (y + 1).pow(2).sum() + (2 * y).pow(2).sum())
    assert output_error(dense, pruned, batches) == pytest.approx(math.sqrt(diff / total), rel=1e-6)
    assert output_error(dense, dense, batches) == 0.0


def test_output_error_uses_dense_outputs_given_and_recomputes_those_that_do_not_line_up() -> None:
    torch.manual_seed(0)
    dense, pruned = nn.Linear(3, 2), nn.Linear(3, 2)
    batches = [torch.randn(4, 3), torch.randn(6, 3)]
    with torch.no_grad():
        outs = [dense(x) for x in batches]
        pruned_outs = torch.cat([pruned(x) for x in batches]).double()
    fresh = output_error(dense, pruned, batches)
    assert output_error(dense, pruned, batches, dense_outputs=outs) == pytest.approx(fresh, rel=1e-12)
    doubled = torch.cat(outs).double() * 2  # taken as given: the error is against these
    want = float((pruned_outs - doubled).norm() / doubled.norm())
    assert output_error(dense, pruned, batches, dense_outputs=[2 * o for o in outs]) == pytest.approx(want, rel=1e-9)
    narrow = [o[:, :1] for o in outs]  # another shape: the dense model is run instead
    assert output_error(dense, pruned, batches, dense_outputs=narrow) == pytest.approx(fresh, rel=1e-12)
    assert output_error(dense, pruned, batches, dense_outputs=outs[:1]) == pytest.approx(fresh, rel=1e-12)


def test_output_error_refuses_outputs_of_another_shape() -> None:
    with pytest.raises(ValidationError, match=r"batch 0: outputs shaped \[\(4, 5\)\], the dense model's \[\(4, 2\)\]"):
        output_error(nn.Linear(3, 2), nn.Linear(3, 5), [torch.randn(4, 3)])


def test_prune_reports_the_output_error_when_it_can_read_the_batches_again() -> None:
    model, info = zoo.load("mnist1d_cnn")
    batches = info.calibration(128, 64)
    result = prune(model, batches, Budget(flops=0.5), progress=False, error_curve=False)
    with torch.no_grad():
        x = torch.cat(batches)
        want, got = model.eval()(x), result.model.eval()(x)
    assert result.report.output_error == pytest.approx(float((got - want).norm() / want.norm()), rel=1e-4)
    assert 0 < result.report.output_error < 0.5
    assert "output error on the calibration data" in result.report.table()
    assert result.report.to_dict()["output_error"] == result.report.output_error
    streamed = prune(model, (b for b in batches), Budget(flops=0.5), progress=False, error_curve=False,
                     sequential=False)
    assert streamed.report.output_error is None
    assert any("output error not measured" in n for n in streamed.report.notes)
    sparse = prune(model, batches, Budget(sparsity=0.5), structure="unstructured", progress=False)
    with torch.no_grad():
        got = sparse.model.eval()(x)
    assert sparse.report.output_error == pytest.approx(float((got - want).norm() / want.norm()), rel=1e-4)


class Normalised(nn.Module):
    """A hidden layer normalised over its features (LayerNorm), one over channel groups (GroupNorm),
    and one per channel (BatchNorm), which removing other channels does not change."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 32)
        self.ln = nn.LayerNorm(32)
        self.l2 = nn.Linear(32, 16)
        self.bn = nn.BatchNorm1d(16)
        self.l3 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.l2(torch.nn.functional.gelu(self.ln(self.l1(x))))
        return self.l3(torch.relu(self.bn(h)))


def test_groups_a_layernorm_renormalises_are_named_in_the_graph_and_the_report() -> None:
    torch.manual_seed(0)
    model = Normalised().eval()
    batches = [torch.randn(64, 8) for _ in range(4)]
    graph = build(model, batches[0])
    assert graph.normalisations("l1:out") == ["ln"]
    assert graph.normalisations("l2:out") == []  # BatchNorm: each channel on its own
    result = prune(model, batches, Budget(flops=0.5), progress=False, error_curve=False)
    notes = [n for n in result.report.notes if n.startswith("renormalised")]
    assert "l1:out" in result.plan.keep
    assert notes == ["renormalised over their kept channels: l1:out by ln. The kept channels change value there, "
                     "which these groups' relative errors do not count; the output error does"]
    cnn, info = zoo.load("mnist1d_cnn")
    plain = prune(cnn, info.calibration(64, 64), Budget(flops=0.5), progress=False, error_curve=False)
    assert not any(n.startswith("renormalised") for n in plain.report.notes)


def test_outputs_that_cannot_be_compared_leave_a_note_not_a_failed_prune(monkeypatch: pytest.MonkeyPatch) -> None:
    import secateurs.oneshot as oneshot_module

    def refuse(*args: object, **kwargs: object) -> float:
        raise ValidationError("pruned", "batch 0: outputs shaped [(2,)], the dense model's [(3,)]")

    monkeypatch.setattr(oneshot_module, "output_error", refuse)
    model, info = zoo.load("mnist1d_cnn")
    for sequential in (True, False):
        result = prune(model, info.calibration(64, 64), Budget(flops=0.5), progress=False, error_curve=False,
                       sequential=sequential)
        assert result.report.output_error is None
        assert "output error not measured: pruned: batch 0: outputs shaped [(2,)], the dense model's [(3,)]" in \
            result.report.notes
