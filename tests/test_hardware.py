"""``secateurs.hardware``: the channel block ``channel_multiple="auto"`` reads off the device.

torch's CPU capability is patched to each value it documents, so the table is checked on every
CPU kind whatever this machine is.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secateurs.graph.groups import check_channel_multiple
from secateurs.hardware import describe, model_device, vector_channels


@pytest.mark.parametrize(("capability", "lanes"), [
    ("AVX512", 16), ("AVX2", 8), ("SVE256", 8), ("DEFAULT", 4), ("NO AVX", 4), ("VSX", 4), ("Z VECTOR", 4)])
def test_cpu_blocks_are_the_float32_lanes(monkeypatch: pytest.MonkeyPatch, capability: str, lanes: int) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert vector_channels() == vector_channels("cpu") == lanes
    assert check_channel_multiple("auto") == check_channel_multiple("auto", torch.device("cpu")) == lanes
    assert describe() == f"{capability} CPU"


def test_cuda_takes_tensor_core_multiples_and_unknown_devices_any_width() -> None:
    assert vector_channels("cuda") == vector_channels(torch.device("cuda", 1)) == 8
    assert vector_channels("meta") == 1
    assert describe("cuda:0") == "CUDA GPU" and describe("meta") == "meta device"


def test_this_machine_gets_a_block_from_the_table() -> None:
    assert vector_channels() in (4, 8, 16)


def test_model_device_reads_parameters_then_buffers() -> None:
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert model_device(nn.BatchNorm1d(3, affine=False, device="meta")) == torch.device("meta")  # buffers only
    assert model_device(nn.ReLU()) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["AUTO", "8", None, 0])
def test_anything_but_auto_or_a_positive_integer_is_named(bad: object) -> None:
    from secateurs.errors import ValidationError

    with pytest.raises(ValidationError, match="channel_multiple: must be an integer >= 1 or 'auto'"):
        check_channel_multiple(bad)
