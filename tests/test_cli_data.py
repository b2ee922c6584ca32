"""`secateurs prune --data` and repeated `--input-shape`: a user model calibrated on the user's batches."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import secateurs
import secateurs.oneshot
from secateurs.cli import main
from secateurs.graph import dense_counts

MODELS = '''
import torch
from torch import nn


def mlp():
    """8 -> 16 -> 2: hidden units 0..7 read inputs 0..3, units 8..15 read inputs 4..7 and weigh 3x more."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        w = torch.zeros(16, 8)
        w[:8, :4] = torch.randn(8, 4)
        w[8:, 4:] = torch.randn(8, 4)
        model[0].weight.copy_(w)
        model[0].bias.zero_()
        model[2].weight[:, 8:] *= 3
    return model.eval()


def first_half(n=4, seed=3):
    """The user's data: only inputs 0..3 vary, so only hidden units 0..7 ever fire."""
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([torch.randn(32, 4, generator=g), torch.zeros(32, 4)], 1) for _ in range(n)]


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 24)
        self.b = nn.Linear(4, 24)
        self.hidden = nn.Linear(24, 24)
        self.out = nn.Linear(24, 2)

    def forward(self, x, y):
        return self.out(torch.relu(self.hidden(torch.relu(self.a(x) + self.b(y)))))


def two():
    return Two().eval()


def pairs_as_dicts():
    g = torch.Generator().manual_seed(5)
    return ({"x": torch.randn(8, 3, generator=g), "y": torch.randn(8, 4, generator=g)} for _ in range(3))
'''


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(MODELS)
    return path


class Stop(Exception):
    """Raised by the spy once it has seen the calibration: the run itself is not what is tested."""


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], list[list[Any]]]:
    """Record the calibration batches `secateurs prune` hands to oneshot.prune; run it or stop there."""
    calls: list[list[Any]] = []
    real = secateurs.oneshot.prune

    def install(run: bool) -> list[list[Any]]:
        def spy(model: torch.nn.Module, calibration: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(list(calibration))
            if not run:
                raise Stop
            return real(model, calls[-1], *args, **kwargs)

        monkeypatch.setattr(secateurs.oneshot, "prune", spy)
        return calls

    return install


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    return err


def test_pruning_on_the_users_data_fits_that_data(user_file: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # On the user's data only hidden units 0..7 fire: a plan calibrated there keeps them. Random inputs
    # make units 8..15 (three times the weight) look the most important, and the output on the user's
    # data is lost. Both runs keep 8 of 16 units (the budget), so only the calibration differs.
    errors, printed = {}, {}
    for name, flags in (("data", ["--data", f"{user_file}:first_half"]), ("random", ["--input-shape", "32,8"])):
        out = tmp_path / name
        assert main(["prune", "--model", f"{user_file}:mlp", *flags, "--params", "0.55", "--quiet",
                     "--out", str(out)]) == 0
        printed[name] = capsys.readouterr().out
        pruned = secateurs.load(out / "model", _factory(user_file, "mlp"))
        assert pruned[0].out_features == 8
        dense = _factory(user_file, "mlp")()
        x = torch.cat(_factory(user_file, "first_half")(2, 11))  # fresh samples of the user's distribution
        with torch.no_grad():
            errors[name] = float((pruned(x) - dense(x)).abs().max() / dense(x).abs().max())
    assert "calibrating on 128 samples in 4 batches from" in printed["data"] and "random" not in printed["data"]
    assert "calibrating on random inputs" in printed["random"]
    assert errors["data"] < 0.1 * errors["random"], errors


def _factory(path: Path, name: str) -> Callable[[], torch.nn.Module]:
    namespace: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace[name]


def test_calibration_limits_the_samples_and_cuts_the_last_batch(
        user_file: Path, seen: Callable[[bool], list[list[Any]]], capsys: pytest.CaptureFixture[str]) -> None:
    calls = seen(True)
    assert main(["prune", "--model", f"{user_file}:mlp", "--data", f"{user_file}:first_half", "--calibration", "70",
                 "--params", "0.6", "--quiet"]) == 0
    expected = _factory(user_file, "first_half")()
    assert [b.shape[0] for b in calls[0]] == [32, 32, 6]
    assert all(torch.equal(got, want[: got.shape[0]]) for got, want in zip(calls[0], expected, strict=False))
    out = capsys.readouterr().out
    assert "calibrating on 70 samples in 3 batches" in out and "random" not in out


def test_a_pt_file_of_tuples_calibrates_a_two_input_model(
        user_file: Path, tmp_path: Path, seen: Callable[[bool], list[list[Any]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, generator=g), torch.randn(8, 4, generator=g)) for _ in range(4)]
    torch.save(batches, tmp_path / "calib.pt")
    calls = seen(True)
    assert main(["prune", "--model", f"{user_file}:two", "--data", str(tmp_path / "calib.pt"), "--flops", "0.6",
                 "--quiet", "--out", str(tmp_path / "out")]) == 0
    assert len(calls[0]) == 4 and all(torch.equal(a, b) for got, want in zip(calls[0], batches, strict=True)
                                      for a, b in zip(got, want, strict=True))
    pruned = secateurs.load(tmp_path / "out" / "model", _factory(user_file, "two"))
    assert pruned.hidden.out_features < 24
    flops = re.search(r"FLOPs \(batch of 8\)\s+([\d,]+)\s+([\d,]+)", capsys.readouterr().out)
    assert flops is not None
    dense_flops, pruned_flops = (int(v.replace(",", "")) for v in flops.groups())
    assert dense_counts(pruned, batches[0]).flops == pruned_flops <= 0.6 * dense_flops


def test_a_generator_of_dicts_is_read_once_and_passed_by_name(
        user_file: Path, seen: Callable[[bool], list[list[Any]]]) -> None:
    calls = seen(False)
    with pytest.raises(Stop):
        main(["prune", "--model", f"{user_file}:two", "--data", f"{user_file}:pairs_as_dicts", "--quiet"])
    expected = list(_factory(user_file, "pairs_as_dicts")())
    assert len(calls[0]) == 3 and all(got.keys() == {"x", "y"} and torch.equal(got["y"], want["y"])
                                      for got, want in zip(calls[0], expected, strict=True))


def test_several_input_shapes_give_tuple_batches(user_file: Path, seen: Callable[[bool], list[list[Any]]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    calls = seen(True)
    assert main(["prune", "--model", f"{user_file}:two", "--input-shape", "8,3", "--input-shape", "8,4",
                 "--calibration", "32", "--flops", "0.6", "--quiet"]) == 0
    assert len(calls[0]) == 4
    assert all(isinstance(b, tuple) and [t.shape for t in b] == [(8, 3), (8, 4)] for b in calls[0])
    assert not torch.equal(calls[0][0][0], calls[0][1][0])  # fresh random inputs per batch
    assert "calibrating on random inputs" in capsys.readouterr().out


@pytest.mark.parametrize(("source", "expected"), [
    ("def data():\n    raise RuntimeError('disk gone')\n", r"--data: .*:data\(\) failed: RuntimeError: disk gone$"),
    ("def data():\n    return []\n", r"--data: .*:data gave no batches$"),
    ("def data():\n    return None\n", r"gave a NoneType, not an iterable of batches$"),
    ("import torch\ndef data():\n    return torch.ones(4, 8)\n", r"gave one Tensor, not a list of batches"),
    ("def data():\n    return ['abc']\n", r"batch 0 holds a value of type str, expected tensors$"),
    ("import torch\ndef data():\n    return [torch.ones(4, 4), torch.full((4, 4), float('nan'))]\n",
     r"batch 1 contains NaN or infinite values$"),
    ("import torch\ndef data():\n    return [torch.tensor(1.0)]\n", r"batch 0 starts with a scalar"),
    ("import torch\ndef data():\n    yield torch.ones(4, 4)\n    raise OSError('bad sector')\n",
     r"reading the batches of .* failed: OSError: bad sector$"),
    ("x = 1\n", r"--data: '.*data_fn.py' has no callable 'data'$"),
])
def test_bad_data_functions_are_one_line_before_any_pruning(
        source: str, expected: str, user_file: Path, tmp_path: Path,
        seen: Callable[[bool], list[list[Any]]], capsys: pytest.CaptureFixture[str]) -> None:
    calls = seen(False)
    (tmp_path / "data_fn.py").write_text(source)
    assert main(["prune", "--model", f"{user_file}:mlp", "--data", f"{tmp_path / 'data_fn.py'}:data", "--quiet"]) == 2
    assert re.search(expected, _error(capsys)) and calls == []


@pytest.mark.parametrize(("content", "expected"), [
    (None, r"--data: no such file '.*missing.pt'$"),
    (b"not a torch file", r"--data: cannot load '.*missing.pt': UnpicklingError"),
    ({"x": 1}, r"gave one dict, not a list of batches"),
    ([1, 2], r"batch 0 holds a value of type int, expected tensors"),
    ([(torch.ones(2, 3), [torch.ones(2, 4)])], r"missing.pt: batch 0 nests containers"),
])
def test_bad_data_files_are_one_line_before_any_pruning(
        content: Any, expected: str, user_file: Path, tmp_path: Path,
        seen: Callable[[bool], list[list[Any]]], capsys: pytest.CaptureFixture[str]) -> None:
    calls = seen(False)
    path = tmp_path / "missing.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    assert main(["prune", "--model", f"{user_file}:mlp", "--data", str(path), "--quiet"]) == 2
    assert re.search(expected, _error(capsys)) and calls == []


@pytest.mark.parametrize(("flags", "expected"), [
    (["--data", "x.pt", "--input-shape", "2,4"], r"--input-shape: not used here: the batches of --data are the inputs"),
    (["--text", "t.txt"], r"--text: only for --model hf:DIR"),
    (["--seq-len", "16"], r"--seq-len: only for --model hf:DIR"),
    (["--data", "nofunction"], r"--data: expected MODULE:FN, FILE.py:FN or FILE.pt, got 'nofunction'"),
    ([], r"--input-shape: a user model needs --data, or --input-shape"),
])
def test_flags_a_user_model_cannot_use_are_refused(flags: list[str], expected: str, user_file: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", f"{user_file}:mlp", *flags, "--quiet"]) == 2
    assert re.search(expected, _error(capsys))


def test_a_zoo_model_calibrates_on_data_given_to_it(tmp_path: Path, seen: Callable[[bool], list[list[Any]]],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    images = [torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    torch.save(images, tmp_path / "digits.pt")
    calls = seen(False)
    with pytest.raises(Stop):
        main(["prune", "--model", "digits_cnn", "--data", str(tmp_path / "digits.pt"), "--calibration", "25",
              "--quiet"])
    assert [b.shape[0] for b in calls[0]] == [10, 10, 5] and torch.equal(calls[0][2], images[2][:5])
    assert "calibrating on 25 samples in 3 batches" in capsys.readouterr().out


def test_prune_makes_the_allocator_steady_before_any_work(user_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(secateurs.cli, "steady_allocator", lambda: events.append("steady") or True)
    real_prune = secateurs.oneshot.prune
    monkeypatch.setattr(secateurs.oneshot, "prune", lambda *a, **k: events.append("prune") or real_prune(*a, **k))
    assert main(["inspect", f"{user_file}:mlp", "--input-shape", "4,8"]) == 0
    assert events == []  # only the pruning command takes over the process's allocator
    assert main(["prune", "--model", f"{user_file}:mlp", "--input-shape", "32,8", "--flops", "0.6", "--quiet"]) == 0
    assert events[:2] == ["steady", "prune"]
