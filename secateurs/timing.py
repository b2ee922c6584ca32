"""Wall-clock timing that measures the model, not the memory allocator.

glibc's malloc returns large blocks to the kernel as soon as they are freed (``mmap`` above
128 KiB, trimming the top of the heap), so every forward faults its activations in again. Here
one 32-channel ``Conv1d`` on a (1000, 32, 40) batch took 3,700 minor page faults per call, and
their price in a VM moves with the host: the same conv ran in 2.4 ms without faults and in
7–14 ms with them, in windows of tens of seconds. That noise swamped any 2× speedup and made
latency tables measured a minute apart disagree. :func:`steady_allocator` tells glibc to keep
freed memory for reuse, as jemalloc and tcmalloc (the allocators PyTorch's CPU inference guides
recommend) do; every timing in secateurs calls it first, so what is timed is compute.

The same faults slow pruning itself: a ResNet-50's float64 statistics and inverses are 32 MiB
matrices made and freed thousands of times. `secateurs.prune` on one (random weights, 16
calibration images of 64 x 64) spent 38 of its 140 CPU seconds in the kernel faulting them in
(9.6 million faults) and took 76–78 s; with the allocator steady it took 54–58 s (peak RSS
4.5 → 5.1 GB). The CLI makes the allocator steady before it starts. A library call does not
change the process's allocator behind its caller's back: call :func:`steady_allocator` first to
get the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils import benchmark

from secateurs.errors import ValidationError

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**30  # freed memory kept at the top of the heap before any is handed back

_steady: bool | None = None


def steady_allocator() -> bool:
    """Make glibc keep freed memory for reuse (every block from the heap; up to 1 GiB kept), once per process.

    No block is given its own ``mmap`` (glibc caps the mmap threshold at 32 MiB, and larger blocks
    would still fault in afresh each time), and up to 1 GiB of freed memory stays at the top of the
    heap. Returns True when the allocator is glibc's and took both settings, False elsewhere (macOS,
    musl, Windows: their allocators already cache freed blocks, or cannot be told to). The
    process then holds on to its peak heap instead of returning it to the kernel.
    """
    global _steady
    if _steady is None:
        _steady = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _steady = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _steady


def seconds(fn: Any, *args: Any, min_run_time: float = 0.05) -> float:
    """Wall seconds of ``fn(*args)`` without grad: the fastest block of torch's benchmark timer.

    Interference from other processes only ever adds time, so the fastest block is the steadiest
    estimate of the cost; the allocator is made steady first (see the module docstring).
    """
    steady_allocator()
    with torch.no_grad():
        timer = benchmark.Timer(stmt="fn(*args)", globals={"fn": fn, "args": args},
                                num_threads=torch.get_num_threads())
        return float(min(timer.blocked_autorange(min_run_time=min_run_time).times))


def synchronized(clock: Callable[[], float]) -> Callable[[], float]:
    """``clock``, read once the accelerator (CUDA, XPU, MPS) has finished its queued work, as
    torch's benchmark timer reads its own: a GPU forward returns when its kernels are launched,
    so an unsynchronised clock times the launches. ``clock`` itself on a machine without one."""
    if not torch.accelerator.is_available():
        return clock

    def read() -> float:
        torch.accelerator.synchronize()
        return clock()

    return read


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, then restore the caller's count.

    Latency depends on the thread count, and on a shared machine more threads mean more noise: one
    thread descheduled stalls the whole forward at its next barrier. On this project's 2-CPU VM, 8
    runs of the MNIST-1D CNN's before/after timing gave speedups of 1.64–1.88× on 2 threads and
    1.70–1.76× on 1. So timings name their thread count, and the CLI times on one by default.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValidationError("threads", f"must be a whole number of at least 1, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


__all__ = ["seconds", "steady_allocator", "synchronized", "torch_threads"]
