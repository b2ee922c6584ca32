"""`secateurs prune`: a before/after table, saved outputs that load back, user factories."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import secateurs
from secateurs.cli import main
from secateurs.models import zoo


def test_prune_zoo_model_prints_table_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", "digits_cnn", "--flops", "0.5", "--calibration", "128", "--quiet",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "FLOPs (batch of 64)" in out and "CPU latency (ms, batch of 450, 1 thread)" in out
    assert (tmp_path / "report.json").is_file() and (tmp_path / "keep_fraction.png").is_file()
    dense, info = zoo.load("digits_cnn")
    loaded = secateurs.load(tmp_path / "model", lambda: zoo.load("digits_cnn")[0])
    x = info.test_split().x_test[:32]
    with torch.no_grad():
        y = loaded.eval()(x)
    assert y.shape == (32, 10)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in dense.parameters())


def test_prune_user_factory_with_random_calibration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "mine.py"
    source.write_text(
        "import torch.nn as nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))\n"
    )
    assert main(["prune", "--model", f"{source}:make", "--input-shape", "16,8", "--params", "0.6",
                 "--calibration", "64", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "random inputs" in out and "params" in out


def test_prune_errors_exit_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", "nope.py:make", "--quiet"]) == 2
    assert "no such file 'nope.py'" in capsys.readouterr().err
    assert main(["prune", "--model", "digits_cnn", "--flops", "0.0001", "--calibration", "64", "--quiet"]) == 2
    assert "cannot be met" in capsys.readouterr().err


def _assert_saved_widths_are_multiples(out: Path, multiple: int) -> None:
    """The saved digits_cnn pruned some conv and kept each at a multiple of ``multiple`` or whole."""
    dense = zoo.load("digits_cnn")[0]
    loaded = secateurs.load(out / "model", lambda: zoo.load("digits_cnn")[0])
    pairs = [(a.out_channels, b.out_channels) for a, b in zip(dense.modules(), loaded.modules(), strict=True)
             if isinstance(a, torch.nn.Conv2d)]
    assert any(d != p for d, p in pairs) and all(p % multiple == 0 or p == d for d, p in pairs)


def test_prune_with_a_channel_multiple_saves_aligned_widths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--model", "digits_cnn", "--flops", "0.5", "--channel-multiple", "16", "--calibration",
                 "128", "--quiet", "--out", str(tmp_path)]) == 0
    assert re.search(r"speedup \(\d+ alternating rounds\)", capsys.readouterr().out)
    _assert_saved_widths_are_multiples(tmp_path, 16)


def test_prune_keeps_the_cpus_vector_width_by_default(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # 16 float32 lanes
    assert main(["prune", "--model", "digits_cnn", "--flops", "0.5", "--calibration", "128", "--quiet",
                 "--out", str(tmp_path)]) == 0
    assert "multiples of 16 channels, the kernel block of the AVX512 CPU" in capsys.readouterr().out
    _assert_saved_widths_are_multiples(tmp_path, 16)


def test_a_channel_multiple_that_is_not_a_number_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["prune", "--channel-multiple", "fast", "--quiet"])
    assert "--channel-multiple: expected 'auto' or a whole number, got 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--calibration", "--batch-size", "--threads"])
def test_a_bad_count_names_its_flag(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", flag, "0", "--quiet"]) == 2
    assert f"{flag}: must be at least 1, got 0" in capsys.readouterr().err


def test_an_unwritable_out_folder_fails_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["prune", "--out", str(blocker / "pruned"), "--quiet"]) == 2  # the default run would take a minute
    err = capsys.readouterr().err
    assert f"--out: cannot write to '{blocker / 'pruned'}'" in err and "Traceback" not in err


@pytest.mark.parametrize(("source", "expected"), [
    ("def make(width):\n    pass\n", r"make\(\) failed: TypeError: make\(\) missing 1 required positional argument"),
    ("def make():\n    raise RuntimeError('no weights here')\n", r"make\(\) failed: RuntimeError: no weights here"),
    ("def make(:\n", r"importing '.*mine.py' failed: SyntaxError"),
    ("def make():\n    return 3\n", r"returned int, not an nn.Module"),
])
def test_a_failing_user_factory_is_one_line_naming_it(source: str, expected: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mine.py"
    path.write_text(source)
    for command in (["prune", "--model", f"{path}:make", "--input-shape", "4,8", "--quiet"],
                    ["inspect", f"{path}:make", "--input-shape", "4,8"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert re.search(expected, err) and "Traceback" not in err


def test_inspect_imports_a_module_from_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "beside_me.py").write_text("import torch.nn as nn\n"
                                          "def make():\n    return nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert main(["inspect", "beside_me:make", "--input-shape", "2,8"]) == 0
    assert "0:out" in capsys.readouterr().out


class _Stop(Exception):
    """Raised by the stand-in prune once it has seen its arguments."""


@pytest.mark.parametrize(("flags", "batch"), [(["--latency", "0.5"], 450), (["--flops", "0.5"], None)])
def test_a_latency_budget_is_measured_on_the_batch_and_threads_the_table_times(monkeypatch: pytest.MonkeyPatch,
                                                                               flags: list[str],
                                                                               batch: int | None) -> None:
    """The table times the whole test set; a latency budget timed at the calibration batch size
    (per-call overhead) had cut 98% of the MNIST-1D CNN's FLOPs for --latency 0.5. It is timed on
    the table's threads too; a FLOPs budget prunes on the caller's."""
    seen = {}

    def spy(model, calibration, budget, *, example_inputs=None, **kwargs):  # noqa: ANN001, ANN202, ARG001
        seen["example_inputs"], seen["threads"] = example_inputs, torch.get_num_threads()
        raise _Stop

    monkeypatch.setattr(secateurs.oneshot, "prune", spy)
    caller = torch.get_num_threads()
    table_threads = caller + 1
    with pytest.raises(_Stop):
        main(["prune", "--model", "digits_cnn", *flags, "--calibration", "64", "--quiet",
              "--threads", str(table_threads)])
    inputs = seen["example_inputs"]
    assert (inputs is None) if batch is None else (inputs.shape[0] == batch)
    assert seen["threads"] == (caller if batch is None else table_threads)
    assert torch.get_num_threads() == caller  # restored, though prune failed


def test_the_table_is_timed_on_the_threads_it_names(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """On a shared 2-CPU machine 2 threads gave 1.64–1.88x where 1 gave 1.70–1.76x, so the
    thread count is a flag (default 1) and the latency row says which it was."""
    import secateurs.measure

    timed_on = []
    real = secateurs.measure.compare_latency_within

    def spy(dense, pruned, inputs, **kwargs):  # noqa: ANN001, ANN202, ANN003
        timed_on.append(torch.get_num_threads())
        return real(dense, pruned, inputs, seconds=0.5)

    monkeypatch.setattr(secateurs.measure, "compare_latency_within", spy)
    caller = torch.get_num_threads()
    for threads, label in ((None, "1 thread"), (caller + 1, f"{caller + 1} threads")):
        flag = [] if threads is None else ["--threads", str(threads)]
        assert main(["prune", "--model", "digits_cnn", "--flops", "0.5", "--calibration", "64", "--quiet",
                     "--no-error-curve", *flag]) == 0
        assert f"CPU latency (ms, batch of 450, {label})" in capsys.readouterr().out
    assert timed_on == [1, caller + 1]
    assert torch.get_num_threads() == caller


def test_a_user_file_named_like_an_imported_module_keeps_its_classes_findable(tmp_path: Path) -> None:
    """``json.py`` beside the standard library's json: its classes pickle (found through
    sys.modules by their module's name), and the standard library's json stays."""
    import json
    import pickle

    from secateurs.cli import build_model

    (tmp_path / "json.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x)\n"
        "def make():\n"
        "    return Net()\n"
    )
    model = build_model(f"{tmp_path / 'json.py'}:make")
    again = pickle.loads(pickle.dumps(model))
    assert type(again) is type(model) and torch.equal(again.fc.weight, model.fc.weight)
    assert sys.modules["json"] is json and hasattr(json, "dumps")
    same = build_model(f"{tmp_path / 'json.py'}:make")  # the same file again: the same name
    assert type(same).__module__ == type(model).__module__


def test_prune_can_skip_the_error_curve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flags, folder in (([], tmp_path / "with"), (["--no-error-curve"], tmp_path / "without")):
        assert main(["prune", "--model", "digits_cnn", "--flops", "0.5", "--calibration", "128", "--quiet",
                     "--out", str(folder), *flags]) == 0
    report = {name: json.loads((tmp_path / name / "report.json").read_text()) for name in ("with", "without")}
    assert len(report["with"]["error_curve"]) == 9 and report["without"]["error_curve"] == []
    assert (tmp_path / "with" / "error_vs_budget.png").exists()
    assert not (tmp_path / "without" / "error_vs_budget.png").exists()
    assert "error curve" in report["with"]["stages"] and "error curve" not in report["without"]["stages"]
    kept = {name: [(g["name"], g["kept"]) for g in report[name]["groups"]] for name in report}
    assert kept["with"] == kept["without"]  # the plan does not depend on the curve
