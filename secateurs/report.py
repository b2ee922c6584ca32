"""What a pruning run reports: per group, per budget (requested vs achieved) and per stage."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from secateurs.errors import ValidationError


@dataclass
class GroupReport:
    """One group (or one layer, for unstructured pruning) after pruning."""

    name: str
    kept: int
    total: int
    relative_error: float
    solver: str
    seconds: float
    note: str = ""

    @property
    def fraction(self) -> float:
        return self.kept / self.total if self.total else 1.0


@dataclass
class BudgetLine:
    """A total: the dense value, the requested limit (None if unconstrained) and the achieved one."""

    name: str
    dense: float
    achieved: float
    requested: float | None = None

    @property
    def met(self) -> bool:
        return self.requested is None or self.achieved <= self.requested * (1 + 1e-9)


@dataclass
class PruneReport:
    """Everything a run measured; ``table()`` prints it, ``to_json`` keeps it, ``plot`` draws it."""

    structure: str
    groups: list[GroupReport] = field(default_factory=list)
    totals: list[BudgetLine] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    allocation: dict[str, Any] = field(default_factory=dict)
    error_curve: list[tuple[float, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: ‖pruned − dense‖ / ‖dense‖ of the model's outputs on the calibration batches
    #: (:func:`secateurs.measure.output_error`); None when the batches could not be read again
    output_error: float | None = None

    def total(self, name: str) -> BudgetLine:
        for line in self.totals:
            if line.name == name:
                return line
        raise KeyError(name)

    def table(self) -> str:
        """A console table: groups, then totals, then stage timings."""
        rows = [("group", "kept", "rel. error", "solver", "seconds")]
        for g in self.groups:
            rows.append((g.name, f"{g.kept}/{g.total}", f"{g.relative_error:.4g}", g.solver, f"{g.seconds:.3f}"))
        out = [_format(rows), ""]
        totals = [("total", "dense", "requested", "achieved", "ratio", "met")]
        for t in self.totals:
            ratio = t.achieved / t.dense if t.dense else 1.0
            totals.append((t.name, _number(t.dense), "-" if t.requested is None else _number(t.requested),
                           _number(t.achieved), f"{ratio:.3f}", "yes" if t.met else "NO"))
        out += [_format(totals), ""]
        if self.output_error is not None:
            out.append(f"output error on the calibration data: {self.output_error:.4g} (relative to the dense model's)")
        out.append("stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.stages.items()))
        if self.allocation:
            a = self.allocation
            out.append(f"allocation: {a.get('solver')} {a.get('status')} objective {a.get('objective', float('nan')):.6g}")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "structure": self.structure,
            "groups": [asdict(g) for g in self.groups],
            "totals": [{**asdict(t), "met": t.met} for t in self.totals],
            "stages": dict(self.stages),
            "allocation": dict(self.allocation),
            "error_curve": [list(p) for p in self.error_curve],
            "notes": list(self.notes),
            "output_error": self.output_error,
        }

    def to_json(self, path: str | os.PathLike[str] | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1, default=float)
        if path is not None:
            Path(path).write_text(text)
        return text

    def plot(self, directory: str | os.PathLike[str]) -> list[Path]:
        """Write ``keep_fraction.png`` (per group) and ``error_vs_budget.png`` (when measured)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ValidationError("plot", "matplotlib is needed for plots (pip install 'secateurs[bench]')") from exc
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(self.groups) + 2), 3.5))
        ax.bar(range(len(self.groups)), [g.fraction for g in self.groups])
        ax.set_xticks(range(len(self.groups)), [g.name for g in self.groups], rotation=70, fontsize=7)
        ax.set_ylabel("fraction kept")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"keep fraction per {'layer' if self.structure != 'channels' else 'group'}")
        fig.tight_layout()
        written.append(folder / "keep_fraction.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
        if self.error_curve:
            fig, ax = plt.subplots(figsize=(4.5, 3.5))
            xs, ys = zip(*self.error_curve, strict=True)
            ax.plot(xs, ys, marker="o")
            ax.set_xlabel("budget (fraction of dense)")
            ax.set_ylabel("allocated error (sum of relative errors)")
            ax.set_title("error vs budget")
            fig.tight_layout()
            written.append(folder / "error_vs_budget.png")
            fig.savefig(written[-1], dpi=120)
            plt.close(fig)
        return written


def _number(x: float) -> str:
    """Counts with thousands separators; small measured values (milliseconds) with 4 digits."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.4g}"


def _format(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
