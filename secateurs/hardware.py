"""The channel block the hardware computes in, for ``channel_multiple="auto"``.

CPU kernels (oneDNN's convolutions, ATen's vectorised elementwise ops) run channels in blocks of
the CPU's float32 vector lanes, and a width off the block runs as slowly as the next block up.
Measured here, one ``Conv1d`` on a (1000, c, 40) batch: on an AVX2 CPU (8 lanes) 24→24 channels
took 1.3–1.6 ms and 25→26 took 2.3–2.8 ms, as long as 32→32 (2.3–2.7 ms); on an AVX-512 CPU (16
lanes) a 17→17 conv took 2.65 ms, a 16→16 one 0.86 ms and a 32→32 one 3.0 ms. So a plan whose
widths are multiples of the lanes keeps the speed its FLOPs promise, and one at any width does
not. CUDA's tensor cores want channel counts in multiples of 8 (fp16/bf16; 4 for TF32).
"""

from __future__ import annotations

import torch
from torch import nn

CPU_LANES = {"AVX512": 16, "AVX2": 8, "SVE256": 8}  # float32 lanes per vector, by torch's CPU capability
NARROW_LANES = 4  # 128-bit vectors: SSE ("DEFAULT", "NO AVX" on x86), NEON ("DEFAULT" on Arm), VSX, Z vector
CUDA_CHANNELS = 8


def vector_channels(device: torch.device | str | None = None) -> int:
    """Channels per hardware block on ``device`` (default the CPU): what ``channel_multiple="auto"`` uses."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        return CUDA_CHANNELS
    if kind != "cpu":
        return 1  # no measured block for this device: any width
    return CPU_LANES.get(torch.backends.cpu.get_cpu_capability(), NARROW_LANES)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model without either)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def describe(device: torch.device | str | None = None) -> str:
    """What ``vector_channels`` read, for reports: "AVX2 CPU", "CUDA GPU", "mps device"."""
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cpu":
        return f"{torch.backends.cpu.get_cpu_capability()} CPU"
    return "CUDA GPU" if kind == "cuda" else f"{kind} device"


__all__ = ["CPU_LANES", "CUDA_CHANNELS", "NARROW_LANES", "describe", "model_device", "vector_channels"]
