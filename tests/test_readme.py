"""The README's solver example runs as printed, and its exact solvers agree (a stale snippet fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_compare_example_runs_and_its_exact_solvers_agree(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "secateurs.compare(" in b)
    exec(compile(example, str(README), "exec"), {})  # noqa: S102 - our own README
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"magnitude", "greedy", "local_search", "miqp", "enumerate"} <= set(rows)
    assert rows["miqp"][1] == rows["enumerate"][1] == "optimal"
    assert float(rows["miqp"][2]) == pytest.approx(float(rows["enumerate"][2]), rel=1e-6)
    assert float(rows["magnitude"][2]) >= float(rows["enumerate"][2]) - 1e-6


def test_the_readme_transformers_example_prunes_the_hf_model_to_budget() -> None:
    pytest.importorskip("transformers")
    from secateurs.graph import dense_counts

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "AutoModel.from_pretrained" in b)
    scope: dict[str, object] = {}
    exec(compile(example, str(README), "exec"), scope)  # noqa: S102 - our own README
    bert, result, batches = scope["bert"], scope["result"], scope["batches"]
    assert sorted({name.rsplit(":", 1)[1] for name in result.plan.keep}) == ["heads", "out"]
    assert len(result.plan.keep) == 12
    dense, pruned = dense_counts(bert, batches[0]), dense_counts(result.model, batches[0])
    assert pruned.flops <= 0.5 * dense.flops
    assert pruned.params < dense.params
