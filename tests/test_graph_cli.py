"""`secateurs inspect`: module and file targets, several inputs, strict mode, clear errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from secateurs.cli import main, parse_input_shape

MODEL_FILE = '''
import torch
from torch import nn


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x, y):
        return self.out(torch.relu(self.a(x) + self.b(y)))


class Weird(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(torch.fft.fft(self.a(x)).real)


def two():
    return Two()


def weird():
    return Weird()
'''


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "mymodels.py"
    path.write_text(MODEL_FILE)
    return path


def test_inspect_module_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "secateurs.models.cnn:digits_cnn", "--input-shape", "2,1,8,8"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    for col in ("group", "units", "width", "members", "params/unit", "FLOPs/unit", "frozen"):
        assert col in header
    assert re.search(r"^0:out\s+16\s+1\s+\d+\s+300\s+76,032\s*$", out, re.M)
    assert "reaches model output 'output'" in out
    assert re.search(r"^12:out\s+10\s+1\s+\d+\s+-\s+-\s+reaches model output", out, re.M)  # frozen: no per-unit cost
    assert "params 15,498, FLOPs 1,811,456" in out


def test_inspect_file_target_with_two_inputs(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", f"{model_file}:two", "--input-shape", "2,3", "--input-shape", "2,4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^a:out\s+6\s+1\s+\d+\s+", out, re.M)
    assert "reaches model input 'x'" in out and "reaches model input 'y'" in out


def test_inspect_strict_reports_unsupported_op(model_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", f"{model_file}:weird", "--input-shape", "1,3,4,4"]) == 0
    assert "unsupported op 'torch.fft.fft'" in capsys.readouterr().out
    assert main(["inspect", f"{model_file}:weird", "--input-shape", "1,3,4,4", "--strict"]) == 2
    assert re.search(r"error: unsupported op 'torch\.fft\.fft' at graph node 'fft_fft'", capsys.readouterr().err)


def test_inspect_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "no_such_module_xyz:f"]) == 2
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
    assert main(["inspect", "secateurs.models.cnn"]) == 2
    assert "expected MODULE:FACTORY" in capsys.readouterr().err
    assert main(["inspect", "secateurs.models.cnn:digits_cnn", "--input-shape", "2,x"]) == 2
    assert "--input-shape: expected comma-separated integers" in capsys.readouterr().err


def test_input_shape_dtypes() -> None:
    assert parse_input_shape("2,16:long").dtype.is_floating_point is False
    assert tuple(parse_input_shape("1,3,4").shape) == (1, 3, 4)


def test_console_entry_point_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "secateurs.cli", "inspect", "secateurs.models.cnn:mnist1d_cnn",
                        "--input-shape", "1,1,40"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "prunable" in r.stdout
