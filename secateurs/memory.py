"""How wide a consumer input can be for its Gram matrix and the solves' copies of it to fit in memory.

A consumer input of p columns costs p² float64 numbers per copy: 5 GB for the 25,088 inputs of
VGG's first classifier layer. The channel path holds a few such copies at once: the calibration
Gram, the problem's H, its Cholesky factor and then H⁻¹ in the greedy path; in the layer-wise
pass, the dense Gram beside the fresh one and its cross term, then the local search's state.
``benchmarks/memory.py`` measured peaks of 4.8–5.2 copies on inputs of 6,272 and 7,840 columns
(more on narrower ones, where the model's own memory counts for more); ``GRAM_COPIES`` leaves a
margin over them. An input wider than fits keeps only the Gram's
diagonal (see :func:`secateurs.calibration.collect`): its consumer is scored on it and pruned
without a refit, and the run goes on instead of being killed for memory half-way.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

GRAM_COPIES = 6  # p² float64 copies held at once per consumer input (4.8-5.2 measured, with a margin)
_FLOAT64 = 8


def _read_bytes(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable (what the kernel can give without swapping), in bytes; None where unreadable."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(device: torch.device | str | None = None) -> int | None:
    """Free memory on ``device`` (default the CPU) in bytes, or None where it cannot be read.

    A CUDA device says what it has free. On Linux the CPU's is MemAvailable, or what a cgroup v2
    limit leaves where that is less (a container sees the host's MemAvailable, not its own limit).
    """
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    if kind != "cpu":
        return None
    meminfo = _meminfo_available()
    found = [] if meminfo is None else [meminfo]
    limit, used = _read_bytes(Path("/sys/fs/cgroup/memory.max")), _read_bytes(Path("/sys/fs/cgroup/memory.current"))
    if limit is not None and used is not None:
        found.append(max(limit - used, 0))
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            pass
    return min(found) if found else None


def gram_bytes(columns: int) -> int:
    """What a consumer input of ``columns`` columns needs at once: ``GRAM_COPIES`` p² float64 copies."""
    return GRAM_COPIES * _FLOAT64 * columns * columns


def need(columns: int) -> str:
    """What an input of ``columns`` columns would need, for the notes that say why it got no Gram."""
    return f"{columns:,} input columns need {gram_bytes(columns) / 1e9:.3g} GB for their Gram and its copies"


def max_gram_columns(available: int | None) -> int | None:
    """The widest input whose :func:`gram_bytes` fit in ``available`` bytes (None: no limit known)."""
    if available is None:
        return None
    return math.isqrt(max(available, 0) // (GRAM_COPIES * _FLOAT64))


__all__ = ["GRAM_COPIES", "available_bytes", "gram_bytes", "max_gram_columns", "need"]
