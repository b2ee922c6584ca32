"""OSSCAR's reconstruction program: which groups of a layer's inputs to keep so that the refit
layer reproduces the dense layer's outputs on calibration data (DESIGN.md, formulation 1).

For consumer weights Ŵ (p inputs x m outputs) and calibration inputs X (n x p), with
H = XᵀX + λI and G = HŴ, a support S (kept units) costs

    f(S) = min_B ½tr(BᵀHB) − tr(BᵀG)  over B with rows outside S equal to 0
         = −½tr(G_Sᵀ H_SS⁻¹ G_S)                         (closed-form refit B_S = H_SS⁻¹G_S)

and f(S) + c = ½‖XŴ − XB‖² + ½λ‖Ŵ − B‖² ≥ 0 with c = ½tr(ŴᵀHŴ) = −f(all units). Several
consumers of one group add their f's over the shared support; consumers that share their input
share H and have their G's stacked side by side.

Only arrays live here: no solving (see ``secateurs.solvers``), no modules.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from secateurs.errors import ValidationError

Tensor = torch.Tensor
Support = Sequence[int]


def _as_tensor(value: Any, field: str, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """Convert to a floating tensor of ``dtype`` on its own (or the given) device; reject non-finite."""
    if isinstance(value, Tensor):
        t = value.detach()
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValidationError(field, f"cannot be read as an array ({exc})") from exc
    t = t.to(dtype=dtype, device=device if device is not None else t.device)
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValidationError(field, f"contains {bad} non-finite value(s) (nan or inf)")
    return t


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


_ROWS_BLOCK = 1 << 22  # elements per block of rows in :func:`_asymmetry`


def _asymmetry(H: Tensor) -> float:
    """max |H − Hᵀ|, a block of rows at a time: ``H - H.T`` whole would be one more p² copy (5 GB
    for the 25,088 inputs of VGG's first classifier layer)."""
    step = max(1, _ROWS_BLOCK // max(1, H.shape[1]))
    worst = 0.0
    for i in range(0, H.shape[0], step):
        low, high = torch.aminmax(H[i:i + step] - H[:, i:i + step].T)
        worst = max(worst, abs(float(low)), abs(float(high)))
    return worst


def _check_hessian(H: Tensor, field: str) -> tuple[Tensor, Tensor]:
    """Symmetric positive definite (H = XᵀX + λI with λ > 0 is); returns the exact symmetrisation
    and its Cholesky factor (the check computes it; every solver needs it)."""
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise ValidationError(field, f"must be a square (p, p) matrix, got shape {_shape(H)}")
    scale = max(abs(float(v)) for v in torch.aminmax(H)) if H.numel() else 0.0  # no |H| copy of a 170 MB H
    asym = _asymmetry(H)
    if asym > 1e-8 * max(scale, 1e-300):
        raise ValidationError(field, f"is not symmetric (max |H - Hᵀ| = {asym:.3g}, max |H| = {scale:.3g})")
    if asym > 0:  # secateurs' own Grams are exactly symmetric already: no copy of them
        H = (H + H.T) / 2
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        least = float(torch.linalg.eigvalsh(H)[0])
        raise ValidationError(
            field,
            f"is not positive definite (smallest eigenvalue {least:.3g}); a Gram matrix XᵀX needs a "
            "positive ridge λ so that every refit is unique",
        )
    return H, L


def default_ridge(gram: Tensor) -> float:
    """OSSCAR's damping: 1% of the mean diagonal of XᵀX (1.0 when X is all zero)."""
    mean = float(gram.diagonal().mean()) if gram.numel() else 0.0
    return 0.01 * mean if mean > 0 else 1.0


@dataclass(frozen=True, eq=False)
class Reconstruction:
    """Choose ``keep`` of ``num_units`` input groups of one or more consumer layers.

    The objective of a support (sorted kept unit indices) is the reconstruction objective after
    the closed-form refit, summed over consumers; lower is better and ``-constant`` is the dense
    value. Build with :meth:`from_activations`, :class:`ReconstructionStatistics` or
    :meth:`from_hessian`; the tensors stay on the device (and in the dtype) they were built with.

    Attributes
    ----------
    hessians : tuple of Tensor
        One ``H = XᵀX + λI`` (p x p) per distinct consumer input.
    targets : tuple of Tensor
        ``G = HŴ`` (p x m) per entry of ``hessians``; consumers sharing an input are stacked.
    dense : tuple of Tensor
        The dense weights Ŵ (p x m, i.e. transposed from torch's layout) per entry.
    unit_width : int
        Columns per unit: unit u owns columns ``u*w .. (u+1)*w - 1``.
    keep : int
        Number of units to keep (a solution has exactly this many).
    ridge : tuple of float
        λ per entry of ``hessians`` (informational; already inside H).
    constant : float
        c = ½ Σ tr(ŴᵀHŴ), so that ``f + c`` is the reconstruction error (0 when dense).
    """

    kind: ClassVar[str] = "reconstruction"

    hessians: tuple[Tensor, ...]
    targets: tuple[Tensor, ...]
    dense: tuple[Tensor, ...]
    unit_width: int
    keep: int
    ridge: tuple[float, ...]
    constant: float
    _factors: dict[int, Tensor] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_activations(
        cls,
        X: Tensor | Sequence[Tensor],
        W: Tensor | Sequence[Tensor],
        *,
        unit_width: int = 1,
        keep: int,
        ridge: float | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> Reconstruction:
        """Build from calibration inputs and consumer weights.

        Parameters
        ----------
        X : Tensor (n, p), or a sequence of them (one per distinct consumer input)
            The consumer's input; leading dimensions are flattened into rows. A conv's input is
            unfolded so that each input channel occupies ``unit_width`` consecutive columns.
        W : Tensor (m, p) in torch layout, or a sequence
            With one X, a sequence lists consumers sharing that input (stacked). With several X,
            one W per X (each may itself be a sequence of consumers sharing that X).
        unit_width : int
            Columns per unit (1 for neurons, k*k for conv channels, head_dim for heads).
        keep : int
            Units to keep.
        ridge : float, optional
            λ; default 0.01 · mean diag XᵀX (per input).
        dtype : torch.dtype
            Precision of the statistics (float64 by default; XᵀX is accumulated in it).
        """
        xs: list[Any] = list(X) if isinstance(X, (list, tuple)) else [X]
        if isinstance(X, (list, tuple)):
            if not isinstance(W, (list, tuple)) or len(W) != len(xs):
                raise ValidationError("W", f"with {len(xs)} inputs X, give one weight (or list) per input")
            ws: list[Any] = list(W)
        else:
            ws = [W]
        stats = []
        for i, x in enumerate(xs):
            s = ReconstructionStatistics(dtype=dtype)
            field = "X" if len(xs) == 1 else f"X[{i}]"
            s.update(x, field=field)
            if s.rows == 0:
                raise ValidationError(field, "has no rows: give at least one calibration row")
            stats.append(s)
        return cls._from_grams(
            [s.gram for s in stats], ws, unit_width=unit_width, keep=keep, ridge=ridge, dtype=dtype,
            names=["X" if len(xs) == 1 else f"X[{i}]" for i in range(len(xs))],
        )

    @classmethod
    def _from_grams(
        cls,
        grams: list[Tensor],
        ws: list[Any],
        *,
        unit_width: int,
        keep: int,
        ridge: float | None,
        dtype: torch.dtype,
        names: list[str],
    ) -> Reconstruction:
        hs, ds, lams = [], [], []
        for i, (gram, w) in enumerate(zip(grams, ws, strict=True)):
            wfield = "W" if len(ws) == 1 else f"W[{i}]"
            dense = _stack_weights(w, wfield, gram.shape[0], names[i], dtype, gram.device)
            if ridge is not None and not (math.isfinite(ridge) and ridge >= 0):
                raise ValidationError("ridge", f"must be a finite number >= 0, got {ridge!r}")
            lam = default_ridge(gram) if ridge is None else float(ridge)
            H = gram + lam * torch.eye(gram.shape[0], dtype=dtype, device=gram.device)
            hs.append(H)
            ds.append(dense)
            lams.append(lam)
        return cls._build(hs, None, ds, unit_width=unit_width, keep=keep, ridge=lams,
                          hfields=["H" if len(hs) == 1 else f"H[{i}]" for i in range(len(hs))])

    @classmethod
    def from_hessian(
        cls,
        H: Tensor | Sequence[Tensor],
        G: Tensor | Sequence[Tensor] | None = None,
        *,
        W: Tensor | Sequence[Tensor] | None = None,
        unit_width: int = 1,
        keep: int,
        ridge: float = 0.0,
        dtype: torch.dtype = torch.float64,
    ) -> Reconstruction:
        """Build from H (p x p, symmetric positive definite) and either G = HŴ or W.

        Parameters
        ----------
        H : Tensor or sequence of Tensor
            One per distinct consumer input; should already include the ridge.
        G : Tensor (p, m) or sequence, optional
            ``HŴ`` per entry of H. Give exactly one of G and W.
        W : Tensor (m, p) in torch layout or sequence, optional
            Dense weights per entry of H.
        ridge : float
            Added to H's diagonal (0: H already includes its ridge).
        """
        hs_in = list(H) if isinstance(H, (list, tuple)) else [H]
        multi = isinstance(H, (list, tuple))
        hfields = [f"H[{i}]" if multi else "H" for i in range(len(hs_in))]
        if (G is None) == (W is None):
            raise ValidationError("G", "give exactly one of G (= HŴ) and W")
        if not (math.isfinite(ridge) and ridge >= 0):
            raise ValidationError("ridge", f"must be a finite number >= 0, got {ridge!r}")
        hs = []
        for f, h in zip(hfields, hs_in, strict=True):
            t = _as_tensor(h, f, dtype)
            if t.ndim != 2 or t.shape[0] != t.shape[1]:
                raise ValidationError(f, f"must be a square (p, p) matrix, got shape {tuple(t.shape)}")
            if ridge:
                t = t + ridge * torch.eye(t.shape[0], dtype=dtype, device=t.device)
            hs.append(t)
        given = G if G is not None else W
        name = "G" if G is not None else "W"
        items = list(given) if isinstance(given, (list, tuple)) and multi else [given]  # type: ignore[list-item]
        if len(items) != len(hs):
            raise ValidationError(name, f"{len(items)} given for {len(hs)} hessians")
        lams = [float(ridge)] * len(hs)
        if G is not None:
            gs = []
            for i, (g, h) in enumerate(zip(items, hs, strict=True)):
                f = f"G[{i}]" if multi else "G"
                t = _as_tensor(g, f, dtype, h.device)
                if t.ndim == 1:
                    t = t[:, None]
                if t.ndim != 2 or t.shape[0] != h.shape[0]:
                    raise ValidationError(f, f"shape {_shape(t)} does not match {hfields[i]}'s {_shape(h)} "
                                             "(G must be (p, m))")
                gs.append(t)
            return cls._build(hs, gs, None, unit_width=unit_width, keep=keep, ridge=lams, hfields=hfields)
        ds = [
            _stack_weights(w, f"W[{i}]" if multi else "W", h.shape[0] if h.ndim == 2 else -1,
                           hfields[i], dtype, h.device)
            for i, (w, h) in enumerate(zip(items, hs, strict=True))
        ]
        return cls._build(hs, None, ds, unit_width=unit_width, keep=keep, ridge=lams, hfields=hfields)

    @classmethod
    def combine(cls, problems: Sequence[Reconstruction], *, keep: int | None = None) -> Reconstruction:
        """Several consumers with different inputs sharing one group: their objectives add.

        All problems must have the same number of units and unit width; ``keep`` defaults to the
        first problem's.
        """
        if not problems:
            raise ValidationError("problems", "need at least one problem to combine")
        first = problems[0]
        for i, p in enumerate(problems[1:], start=1):
            if p.num_units != first.num_units or p.unit_width != first.unit_width:
                raise ValidationError(
                    f"problems[{i}]",
                    f"{p.num_units} units of width {p.unit_width} do not match problems[0]'s "
                    f"{first.num_units} units of width {first.unit_width}",
                )
        k = first.keep if keep is None else keep
        return cls._build(
            [h for p in problems for h in p.hessians],
            [g for p in problems for g in p.targets],
            [d for p in problems for d in p.dense],
            unit_width=first.unit_width, keep=k,
            ridge=[r for p in problems for r in p.ridge],
            hfields=[f"problems[{i}].H" for i, p in enumerate(problems) for _ in p.hessians],
            validated=True,
        )

    @classmethod
    def _build(
        cls,
        hs: list[Tensor],
        gs: list[Tensor] | None,
        ds: list[Tensor] | None,
        *,
        unit_width: int,
        keep: int,
        ridge: list[float],
        hfields: list[str],
        validated: bool = False,
    ) -> Reconstruction:
        """Validate H's, derive the missing one of G / Ŵ and the constant c."""
        factors: dict[int, Tensor] = {}
        if not validated:
            checked = [_check_hessian(h, f) for h, f in zip(hs, hfields, strict=True)]
            hs = [h for h, _ in checked]
            factors = {i: L for i, (_, L) in enumerate(checked)}
        p = hs[0].shape[0]
        for f, h in zip(hfields, hs, strict=True):
            if h.shape[0] != p:
                raise ValidationError(f, f"shape {_shape(h)} does not match {hfields[0]}'s {_shape(hs[0])}")
            if h.device != hs[0].device:
                raise ValidationError(f, f"is on {h.device}, {hfields[0]} on {hs[0].device}")
        if isinstance(unit_width, bool) or not isinstance(unit_width, int) or unit_width < 1:
            raise ValidationError("unit_width", f"must be a positive integer, got {unit_width!r}")
        if p % unit_width:
            raise ValidationError("unit_width", f"{unit_width} does not divide the {p} input columns")
        if ds is None:
            assert gs is not None
            ds = [torch.cholesky_solve(g, factors[i] if i in factors else torch.linalg.cholesky(h))
                  for i, (h, g) in enumerate(zip(hs, gs, strict=True))]
        if gs is None:
            gs = [h @ d for h, d in zip(hs, ds, strict=True)]
        constant = float(sum(0.5 * float((d * g).sum()) for d, g in zip(ds, gs, strict=True)))
        problem = cls(tuple(hs), tuple(gs), tuple(ds), unit_width, keep, tuple(ridge), constant, factors)
        problem._check_keep(keep)
        return problem

    def _check_keep(self, keep: Any) -> None:
        if isinstance(keep, bool) or not isinstance(keep, numbers.Integral):  # numpy / torch integers too
            raise ValidationError("keep", f"must be an integer, got {keep!r}")
        if not 1 <= keep <= self.num_units:
            raise ValidationError("keep", f"must be between 1 and num_units={self.num_units}, got {keep}")

    def factor(self, index: int) -> Tensor:
        """Lower Cholesky factor of ``hessians[index]``: computed once, and shared with the problems
        :meth:`with_keep` makes (an error curve and the final solve factor the same H)."""
        if index not in self._factors:
            self._factors[index] = torch.linalg.cholesky(self.hessians[index])
        return self._factors[index]

    def release_factors(self, index: int | None = None) -> None:
        """Forget the cached factors (p² floats each, 170 MB for a 4608-column conv input), or only
        ``hessians[index]``'s, once no solver of this problem needs them; :meth:`factor` computes
        them again if asked."""
        if index is None:
            self._factors.clear()
        else:
            self._factors.pop(index, None)

    def with_keep(self, keep: int) -> Reconstruction:
        """The same statistics with another number of units to keep (tensors are shared)."""
        self._check_keep(keep)
        return dataclasses.replace(self, keep=keep)

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_units(self) -> int:
        """g: the number of units (groups of ``unit_width`` input columns)."""
        return self.hessians[0].shape[0] // self.unit_width

    @property
    def num_columns(self) -> int:
        """p: input columns."""
        return self.hessians[0].shape[0]

    @property
    def num_outputs(self) -> int:
        """Total outputs over all consumers."""
        return sum(g.shape[1] for g in self.targets)

    @property
    def device(self) -> torch.device:
        return self.hessians[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.hessians[0].dtype

    @property
    def H(self) -> Tensor:
        """The only Hessian (problems with one consumer input); see ``hessians`` otherwise."""
        if len(self.hessians) != 1:
            raise AttributeError(f"this problem has {len(self.hessians)} consumer inputs; use .hessians")
        return self.hessians[0]

    @property
    def G(self) -> Tensor:
        """The only target G = HŴ (problems with one consumer input); see ``targets`` otherwise."""
        if len(self.targets) != 1:
            raise AttributeError(f"this problem has {len(self.targets)} consumer inputs; use .targets")
        return self.targets[0]

    def columns(self, support: Iterable[int]) -> Tensor:
        """Input column indices owned by the given units (a long tensor on the problem's device)."""
        s = torch.as_tensor(list(support), dtype=torch.long, device=self.device)
        w = self.unit_width
        return (s[:, None] * w + torch.arange(w, device=self.device)).reshape(-1)

    # ------------------------------------------------------------------ solutions
    def check(self, solution: Any) -> list[str]:
        """Violated constraints of ``solution`` (empty when feasible), each naming the constraint."""
        try:
            units = [int(u) for u in solution]
        except (TypeError, ValueError):
            return [f"solution: expected a sequence of unit indices, got {type(solution).__name__}"]
        if any(not float(u) == float(x) for u, x in zip(units, solution, strict=True)):
            return ["solution: unit indices must be integers"]
        out: list[str] = []
        if len(units) != self.keep:
            out.append(f"cardinality: {len(units)} units kept, keep={self.keep} required")
        bad = sorted({u for u in units if not 0 <= u < self.num_units})
        if bad:
            out.append(f"range: unit(s) {bad[:10]} outside 0..{self.num_units - 1}")
        dup = sorted({u for u in units if units.count(u) > 1}) if len(set(units)) != len(units) else []
        if dup:
            out.append(f"duplicates: unit(s) {dup[:10]} listed more than once")
        return out

    def _support(self, support: Any) -> list[int]:
        try:
            units = sorted(int(u) for u in support)
        except (TypeError, ValueError) as exc:
            raise ValidationError("support", f"expected unit indices, got {support!r}") from exc
        if len(set(units)) != len(units):
            raise ValidationError("support", "contains duplicate units")
        if units and not (0 <= units[0] and units[-1] < self.num_units):
            raise ValidationError("support", f"unit indices must lie in 0..{self.num_units - 1}")
        return units

    def evaluate(self, solution: Any) -> float:
        """f(S) = −½ Σ tr(G_Sᵀ H_SS⁻¹ G_S): the objective with the closed-form refit.

        Any set of distinct units in range is accepted (the cardinality is ``check``'s job); the
        empty set gives 0.
        """
        units = self._support(solution)
        if not units:
            return 0.0
        cols = self.columns(units)
        total = 0.0
        for H, G in zip(self.hessians, self.targets, strict=True):
            L = torch.linalg.cholesky(H[cols[:, None], cols])
            Z = torch.linalg.solve_triangular(L, G[cols], upper=False)
            total -= 0.5 * float((Z * Z).sum())
        return total

    def relative_error(self, solution: Any) -> float:
        """(f(S) + c) / c: reconstruction error relative to pruning everything (0 = dense)."""
        if self.constant <= 0:
            return 0.0
        return (self.evaluate(solution) + self.constant) / self.constant

    def refit(self, solution: Any, *, compact: bool = False) -> tuple[Tensor, ...]:
        """Refit weights for the kept units, one tensor per consumer input, in torch layout.

        Parameters
        ----------
        solution : sequence of int
            Kept units.
        compact : bool
            False: (m, p) with zero columns outside the support (drop-in for a masked layer).
            True: (m, |S|·w) holding only the kept columns, in increasing unit order (what a
            physically sliced layer needs).

        Returns
        -------
        tuple of Tensor
            One per entry of ``hessians``; consumers sharing an input are stacked along dim 0 in
            the order they were given.
        """
        units = self._support(solution)
        cols = self.columns(units)
        out = []
        for H, G in zip(self.hessians, self.targets, strict=True):
            if units:
                B = torch.cholesky_solve(G[cols], torch.linalg.cholesky(H[cols[:, None], cols]))
            else:
                B = G[cols]
            if compact:
                out.append(B.T.contiguous())
            else:
                full = torch.zeros_like(G)
                full[cols] = B
                out.append(full.T.contiguous())
        return tuple(out)

    def masked_objective(self, solution: Any) -> float:
        """The objective of the dense weights masked to the support, without refit.

        What plain magnitude pruning gets; always ≥ ``evaluate(solution)``.
        """
        cols = self.columns(self._support(solution))
        total = 0.0
        for H, G, D in zip(self.hessians, self.targets, self.dense, strict=True):
            B = D[cols]
            total += 0.5 * float((B * (H[cols[:, None], cols] @ B)).sum()) - float((B * G[cols]).sum())
        return total

    def __repr__(self) -> str:
        return (
            f"Reconstruction(units={self.num_units}, unit_width={self.unit_width}, keep={self.keep}, "
            f"outputs={self.num_outputs}, inputs={len(self.hessians)}, dtype={self.dtype}, device={self.device})"
        )


def _stack_weights(
    w: Any, field: str, p: int, xname: str, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Weights in torch layout (m x p), or a list sharing one input, as Ŵ (p x sum m)."""
    parts = list(w) if isinstance(w, (list, tuple)) else [w]
    if not parts:
        raise ValidationError(field, "no weights given")
    cols = []
    for j, part in enumerate(parts):
        f = field if len(parts) == 1 else f"{field}[{j}]"
        t = _as_tensor(part, f, dtype, device)
        if t.ndim == 1:
            t = t[None, :]
        if t.ndim != 2 or t.shape[1] != p:
            raise ValidationError(f, f"shape {_shape(t)} does not match {xname}'s {p} input columns "
                                     f"(expected (m, {p}) in torch layout)")
        cols.append(t.T)
    return torch.cat(cols, dim=1).contiguous()


class ReconstructionStatistics:
    """Streaming XᵀX for one consumer input: add calibration batches, never hold all of X.

    Examples
    --------
    >>> stats = ReconstructionStatistics()
    >>> for batch in loader:                       # doctest: +SKIP
    ...     stats.update(layer_input(batch))
    >>> problem = stats.problem(layer.weight, keep=768)  # doctest: +SKIP
    """

    def __init__(self, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> None:
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self.gram: Tensor | None = None
        self.rows = 0

    @property
    def num_features(self) -> int | None:
        """p, once a batch has been seen."""
        return None if self.gram is None else self.gram.shape[0]

    def update(self, X: Tensor, *, field: str = "X") -> ReconstructionStatistics:
        """Add a batch: X of shape (..., p), leading dimensions flattened into rows."""
        if not isinstance(X, Tensor):
            try:
                X = torch.as_tensor(X)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValidationError(field, f"expected a tensor or array of numbers, got {type(X).__name__}") from e
        if X.ndim < 1 or X.shape[-1] == 0:
            raise ValidationError(field, f"expected shape (..., p) with p > 0, got {_shape(X)}")
        x = _as_tensor(X.reshape(-1, X.shape[-1]), field, self.dtype, self.device)
        if self.gram is None:
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
        elif x.shape[1] != self.gram.shape[0]:
            raise ValidationError(field, f"shape {_shape(X)} has {x.shape[1]} features, earlier batches "
                                         f"had {self.gram.shape[0]}")
        self.gram.addmm_(x.T, x)
        self.rows += x.shape[0]
        return self

    def problem(
        self,
        W: Tensor | Sequence[Tensor],
        *,
        keep: int,
        unit_width: int = 1,
        ridge: float | None = None,
    ) -> Reconstruction:
        """The Reconstruction for consumer weight(s) W (m x p, torch layout) on this input."""
        if self.gram is None or self.rows == 0:
            raise ValidationError("X", "no calibration rows were added (call update first)")
        gram = (self.gram + self.gram.T) / 2
        return Reconstruction._from_grams([gram], [W], unit_width=unit_width, keep=keep, ridge=ridge,
                                          dtype=self.dtype, names=["X"])
