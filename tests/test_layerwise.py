"""The layer-wise lockstep pass and the sequential one-shot solves built on it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secateurs.budget import Budget
from secateurs.errors import ValidationError
from secateurs.layerwise import Lockstep, run_together
from secateurs.oneshot import prune


class Chain(nn.Module):
    """Three linear layers without bias: every refit is a plain least-squares problem."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(24, 16, bias=False)
        self.fc2 = nn.Linear(16, 12, bias=False)
        self.fc3 = nn.Linear(12, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _batches(n: int = 4, rows: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(rows, 24, generator=g) for _ in range(n)]


def _inputs(model: nn.Module, module: str, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """What ``module`` receives in a plain forward (a hook, independent of the lockstep pass)."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return seen


def test_inputs_seen_in_lockstep_equal_a_plain_forward() -> None:
    model, batches = Chain(), _batches()
    lock = Lockstep(model, batches)
    seen: dict[str, list[torch.Tensor]] = {}

    def before(i: int) -> None:
        node = lock.nodes[i]
        if node.op == "call_module":
            assert lock.inputs_of("fc3") is None or node.target == "fc3"  # fc3's input is not computed before it
            seen[str(node.target)] = lock.inputs_of(str(node.target))

    run_together([lock], before)
    for name in ("fc1", "fc2", "fc3"):
        expected = _inputs(model, name, batches)
        assert len(seen[name]) == len(batches)
        for a, b in zip(seen[name], expected, strict=True):
            torch.testing.assert_close(a, b)


def test_weights_changed_before_a_layer_runs_are_used_downstream() -> None:
    model, batches = Chain(), _batches()
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.fc2.weight[:, :5] = 0
    lock = Lockstep(model, batches)

    def before(i: int) -> None:
        if lock.nodes[i].op == "call_module" and lock.nodes[i].target == "fc2":
            with torch.no_grad():
                model.fc2.weight[:, :5] = 0

    run_together([lock], before)
    for a, b in zip(_inputs(model, "fc3", batches), _inputs(changed, "fc3", batches), strict=True):
        torch.testing.assert_close(a, b)


def test_training_flags_are_restored_per_module() -> None:
    model = Chain().train()
    model.fc2.eval()
    run_together([Lockstep(model, _batches())], lambda i: None)
    assert model.training and model.fc1.training and not model.fc2.training


def test_bad_batches_are_named() -> None:
    with pytest.raises(ValidationError, match=r"calibration: no batches"):
        Lockstep(Chain(), [])
    with pytest.raises(ValidationError, match=r"calibration: batch 1 contains NaN"):
        Lockstep(Chain(), [torch.randn(2, 24), torch.full((2, 24), float("nan"))])


def _normal_equation_residual(sequential: bool) -> float:
    """How far fc3's refit is from the sequential least-squares fit, on the pruned model's inputs.

    Sequential pruning refits fc3 on the inputs it gets once fc1/fc2's groups are pruned, toward
    the dense fc3 output: (XₛᵀXₛ + λI)B = XₛᵀY_dense + λŴₛ. Xₛ is read off the sliced model with a
    hook, Y_dense off the dense model; λ (a ridge the pipeline picks) is fitted as one scalar.
    """
    model, batches = Chain(), _batches()
    result = prune(model, batches, Budget(params=0.6), progress=False, error_curve=False, sequential=sequential)
    kept = result.plan.keep.get("fc2:out", list(range(12)))
    assert len(kept) < 12 and len(result.plan.keep.get("fc1:out", [])) < 16, "the test needs both groups pruned"
    X = torch.cat(_inputs(result.model, "fc3", batches)).double()
    Y = torch.cat(_inputs(model, "fc3", batches)).double() @ model.fc3.weight.detach().double().T
    B = result.model.fc3.weight.detach().double().T  # (kept, 3)
    dense = model.fc3.weight.detach().double().T[kept]
    residual = X.T @ X @ B - X.T @ Y
    direction = dense - B
    lam = float((residual * direction).sum() / direction.pow(2).sum())
    assert lam > 0
    return float((residual - lam * direction).norm() / (X.T @ Y).norm())  # relative to the equations' scale


def test_sequential_refit_solves_the_normal_equations_on_pruned_inputs() -> None:
    assert _normal_equation_residual(sequential=True) < 1e-6  # float32 weights: ~1e-8 here
    # On dense statistics the same check fails: fc3's inputs changed when fc2 was pruned and refit.
    assert _normal_equation_residual(sequential=False) > 1e-3  # 1.6e-2 here
