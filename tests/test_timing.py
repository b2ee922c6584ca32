"""The steady allocator: forwards stop page-faulting their activations in, so timings measure compute.

Each case runs in a fresh interpreter (the allocator setting is per process and permanent) and
counts the minor page faults of repeated forwards with ``resource.getrusage``: an independent
count from the kernel, not anything secateurs computes.
"""

from __future__ import annotations

import platform
import subprocess
import sys
import time

import pytest
import torch

from secateurs import measure, timing
from secateurs.errors import ValidationError
from secateurs.latency import module_seconds
from secateurs.measure import compare_latency, compare_latency_within
from secateurs.timing import seconds, steady_allocator, torch_threads

PROBE = """
import resource, sys, torch
from secateurs.timing import steady_allocator
torch.set_num_threads(1)
if sys.argv[1] == "steady":
    assert steady_allocator()
if sys.argv[2] == "conv":  # a 5 MiB activation
    layer, x = torch.nn.Conv1d(32, 32, 3, padding=1).eval(), torch.randn(1000, 32, 40)
else:  # a 64 MiB one: above the largest mmap threshold glibc allows
    layer, x = torch.nn.Linear(256, 8192).eval(), torch.randn(2048, 256)
with torch.no_grad():
    for _ in range(10):  # glibc's aligned allocations fit freed blocks only once the heap has grown
        layer(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        layer(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")


def _faults_per_forward(mode: str, layer: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, layer], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@glibc
@pytest.mark.parametrize(("layer", "output_bytes"), [("conv", 1000 * 32 * 40 * 4), ("large", 2048 * 8192 * 4)])
def test_steady_allocator_stops_page_faults_per_forward(layer: str, output_bytes: int) -> None:
    default, steady = _faults_per_forward("default", layer), _faults_per_forward("steady", layer)
    output_pages = output_bytes / 4096  # one output tensor's pages: what a fresh mmap faults in
    assert default > output_pages  # the default allocator maps every activation afresh...
    assert steady < 0.05 * default  # ...the steady one reuses what the last forward freed


@glibc
def test_steady_allocator_is_idempotent() -> None:
    assert steady_allocator() is True
    assert steady_allocator() is True


def test_seconds_times_the_call() -> None:
    calls = []
    elapsed = seconds(lambda: calls.append(1), min_run_time=0.001)
    assert calls and 0 < elapsed < 0.01


class _Sleeps(torch.nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def test_compare_latency_times_both_models_in_alternating_rounds() -> None:
    slow, fast = _Sleeps(0.004), _Sleeps(0.0)
    timed = compare_latency(slow, fast, torch.zeros(2), rounds=3, repeats=2)
    assert timed.dense >= 0.004 and timed.pruned < 0.001  # sleep() never returns early
    assert timed.speedup > 4  # each round's ratio, dense over pruned
    with pytest.raises(ValidationError, match="rounds: must be at least 1"):
        compare_latency(slow, fast, torch.zeros(2), rounds=0)


class _Ticks(torch.nn.Module):
    """Advances a shared fake clock by ``cost`` seconds per forward: timing without waiting."""

    def __init__(self, now: list[float], cost: float) -> None:
        super().__init__()
        self.now, self.cost = now, cost

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.now[0] += self.cost
        return x


class _RoundTicks(_Ticks):
    """``_Ticks`` whose cost changes every ``per_round`` forwards (one round of a comparison)."""

    def __init__(self, now: list[float], costs: list[float], per_round: int) -> None:
        super().__init__(now, costs[0])
        self.costs, self.per_round, self.calls = costs, per_round, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cost = self.costs[self.calls // self.per_round]
        self.calls += 1
        return super().forward(x)


def test_compare_latency_reports_the_middle_half_of_the_round_ratios() -> None:
    now = [0.0]
    dense = _Ticks(now, 1.0)
    pruned = _RoundTicks(now, [0.5, 0.25, 0.2, 0.1, 1 / 3], per_round=2)  # a warm-up and one repeat per round
    timed = compare_latency(dense, pruned, torch.zeros(1), rounds=5, repeats=1, clock=lambda: now[0])
    assert timed.speedup == pytest.approx(4.0)  # the ratios are 2, 4, 5, 10, 3
    assert timed.spread == pytest.approx((3.0, 5.0))


@pytest.mark.parametrize(("cost", "rounds", "repeats"), [(0.001, 15, 5), (0.2, 15, 2), (1.25, 4, 1), (30.0, 3, 1)])
def test_compare_latency_within_fits_rounds_and_repeats_to_the_time_given(cost: float, rounds: int,
                                                                          repeats: int) -> None:
    now = [0.0]
    dense, pruned = _Ticks(now, cost), _Ticks(now, cost / 2)
    timed = compare_latency_within(dense, pruned, torch.zeros(2), seconds=20.0, clock=lambda: now[0])
    assert (timed.rounds, timed.repeats) == (rounds, repeats)
    assert timed.speedup == pytest.approx(2.0) and timed.dense == pytest.approx(cost)
    spent = now[0] - 2 * cost  # after the first (warm-up and timed) dense forward
    assert spent == pytest.approx(rounds * (repeats + 1) * 1.5 * cost)
    assert spent <= 20.0 or rounds == 3  # within the time given, unless the floor of 3 rounds exceeds it


class _FakeAccelerator:
    """A GPU whose queued work 'finishes' on synchronize: counts the calls, and where they fall."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def synchronize(self, device: object = None) -> None:
        self.events.append("sync")


@pytest.fixture
def accelerator(monkeypatch: pytest.MonkeyPatch) -> _FakeAccelerator:
    fake = _FakeAccelerator()
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "synchronize", fake.synchronize)
    return fake


def test_forward_latency_waits_for_the_accelerator_before_each_reading(accelerator: _FakeAccelerator) -> None:
    model = torch.nn.Linear(4, 2)
    readings: list[float] = []

    def clock() -> float:
        accelerator.events.append("read")
        readings.append(float(len(readings)))
        return readings[-1]

    measure.latency(model, torch.randn(3, 4), repeats=2, warmup=1, clock=clock)
    assert accelerator.events == ["sync", "read"] * 5  # the warm-up's start, then start and end of 2 timed forwards


def test_layer_times_inside_the_model_wait_for_the_accelerator(accelerator: _FakeAccelerator) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    module_seconds(model, torch.randn(3, 4), ["0", "2"], forwards=2)
    # each layer's start and end in the warm-up and the 2 timed forwards, and the timed forwards' own
    assert accelerator.events.count("sync") == 3 * 2 * 2 + 2 * 2


def test_without_an_accelerator_the_clock_is_read_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    clock = time.perf_counter
    assert timing.synchronized(clock) is clock


def test_torch_threads_sets_the_count_for_the_block_and_restores_it_after_a_failure() -> None:
    caller = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="inside"), torch_threads(caller + 1):
        assert torch.get_num_threads() == caller + 1
        raise RuntimeError("inside")
    assert torch.get_num_threads() == caller


@pytest.mark.parametrize("threads", [0, -2, True, 1.5])
def test_torch_threads_names_a_bad_count(threads: object) -> None:
    caller = torch.get_num_threads()
    with pytest.raises(ValidationError, match="threads: must be a whole number of at least 1"), \
            torch_threads(threads):  # type: ignore[arg-type]
        pass
    assert torch.get_num_threads() == caller
