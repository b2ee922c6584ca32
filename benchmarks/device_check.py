"""One-shot check that secateurs runs on an accelerator: solvers, prune, apply and latency on ``--device``.

No test in CI can reach a GPU, so a session that is lent one runs this script once and reads the
table. Each check runs the same work on the CPU and on the device and compares what comes back:

- reconstruction solvers on a problem built on the device: the same support and objective as on
  the CPU;
- ``prune`` of the MNIST-1D CNN (channels at 50% FLOPs, unstructured 50%, 2:4) with the model and
  its calibration on the device: the budget met by a count of the pruned model, the pruned model
  left on the device, its outputs close to the CPU-pruned model's on the test set;
- ``apply`` of one plan, sliced and masked, on the device: the same outputs;
- a latency budget on the device (timings wait for the kernels, ``secateurs.timing.synchronized``);
- ``channel_multiple="auto"`` on the device: its block (8 on CUDA).

Run: ``python benchmarks/device_check.py [--device cuda]`` (a minute or two). ``--device cpu`` runs
the same checks on the CPU against itself, which is how the script itself is checked here.
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Callable

import torch
from _tables import table

import secateurs
from secateurs.graph import dense_counts
from secateurs.hardware import vector_channels
from secateurs.models import zoo
from secateurs.testing import random_reconstruction

Check = Callable[[torch.device], str]  # returns what it measured; raises when the check fails


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3) -> float:
    """Relative difference of two output tensors (on the CPU), asserting it is under ``rtol``."""
    diff = float((a.cpu() - b.cpu()).norm() / b.cpu().norm().clamp_min(1e-12))
    assert diff <= rtol, f"outputs differ by {diff:.2e} (relative), over {rtol:g}"
    return diff


def check_solvers(device: torch.device) -> str:
    cpu = random_reconstruction(17, units=30, unit_width=2, keep=12, inputs=2, correlated=True)
    dev = random_reconstruction(17, units=30, unit_width=2, keep=12, inputs=2, correlated=True, device=device)
    for solver in ("magnitude", "greedy", "local_search", "relaxation"):
        a, b = secateurs.solve(cpu, solver), secateurs.solve(dev, solver)
        assert a.solution == b.solution, f"{solver}: supports differ"
        assert abs(a.objective - b.objective) <= 1e-9 * max(1.0, abs(a.objective)), f"{solver}: objectives differ"
    weights, _ = dev.refit(b.solution)
    assert weights.device.type == device.type, f"refit came back on {weights.device}"
    return "4 solvers: same supports and objectives; refit on the device"


def _cnn(device: torch.device) -> tuple[torch.nn.Module, list[torch.Tensor], torch.Tensor]:
    model, info = zoo.load("mnist1d_cnn")
    return model.to(device), [b.to(device) for b in info.calibration(256, 64)], info.test_split().x_test.to(device)


def _prune_both(device: torch.device, budget: secateurs.Budget | None, **kwargs: object) -> str:
    results = []
    for where in (torch.device("cpu"), device):
        model, calibration, x = _cnn(where)
        result = secateurs.prune(model, calibration, budget, progress=False, error_curve=False, **kwargs)
        assert all(p.device.type == where.type for p in result.model.parameters()), "pruned model left the device"
        with torch.no_grad():
            results.append((result, result.model.eval()(x), model.eval()(x), x))
    (cpu, out_cpu, _, x_cpu), (dev, out_dev, dense_dev, x_dev) = results
    if budget is not None and budget.flops is not None:
        counted = dense_counts(dev.model, x_dev[:1]).flops / dense_counts(_cnn(torch.device("cpu"))[0], x_cpu[:1]).flops
        assert counted <= budget.flops + 1e-9, f"{counted:.4f} of the FLOPs kept, over {budget.flops}"
    same_plan = cpu.plan.keep == dev.plan.keep
    diff = _close(out_dev, out_cpu, rtol=1e-3 if same_plan else 1.0)
    return f"plan {'the same as' if same_plan else 'differs from'} the CPU's; outputs within {diff:.1e}"


def check_prune_channels(device: torch.device) -> str:
    return _prune_both(device, secateurs.Budget(flops=0.5))


def check_prune_unstructured(device: torch.device) -> str:
    return _prune_both(device, secateurs.Budget(sparsity=0.5), structure="unstructured")


def check_prune_nm(device: torch.device) -> str:
    return _prune_both(device, None, structure="n:m")


def check_apply(device: torch.device) -> str:
    model, calibration, x = _cnn(device)
    graph = secateurs.graph.build(model, calibration[0])
    plan = secateurs.PrunePlan({g.name: list(range(0, g.size, 2)) for g in graph.prunable_groups()})
    sliced = secateurs.apply(model, plan, graph=graph)
    masked = secateurs.apply(model, plan, graph=graph, mode="mask")
    with torch.no_grad():
        diff = _close(sliced.eval()(x), masked.eval()(x), rtol=1e-4)
    return f"sliced = masked within {diff:.1e}; every group halved"


def check_latency_budget(device: torch.device) -> str:
    model, calibration, x = _cnn(device)
    result = secateurs.prune(model, calibration, secateurs.Budget(latency=0.6), example_inputs=x, progress=False,
                             error_curve=False)
    line = result.report.total("latency ms (measured)")
    return f"dense {line.dense:.3f} ms, pruned {line.achieved:.3f} ms measured (limit {line.requested:.3f})"


def check_auto_multiple(device: torch.device) -> str:
    model, calibration, _ = _cnn(device)
    result = secateurs.prune(model, calibration, secateurs.Budget(flops=0.5), progress=False, error_curve=False,
                             channel_multiple="auto")
    multiple = result.plan.meta["channel_multiple"]
    assert multiple == vector_channels(device), f"auto gave {multiple}, the device's block is {vector_channels(device)}"
    return f"multiples of {multiple}: {sorted(len(u) for u in result.plan.keep.values())}"


CHECKS: dict[str, Check] = {
    "solvers": check_solvers, "prune channels": check_prune_channels,
    "prune unstructured": check_prune_unstructured, "prune 2:4": check_prune_nm, "apply": check_apply,
    "latency budget": check_latency_budget, "channel_multiple auto": check_auto_multiple,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="the device to check against the CPU (default cuda)")
    device = torch.device(parser.parse_args().device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (pass --device cpu to check the script itself)")
        return 2
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}")
    rows, failed = [], 0
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            verdict, what = "ok", check(device)
        except Exception as exc:  # a report of every check, not a stop at the first failure
            failed += 1
            verdict, what = "FAILED", f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            traceback.print_exc()
        rows.append((name, verdict, f"{time.perf_counter() - start:.1f}", what))
    print(table(rows, ["check", "result", "s", "what it saw"]))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
