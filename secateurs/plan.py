"""PrunePlan: which units of which groups survive, the one thing that crosses from solvers back to torch.

A plan carries the kept unit indices per group and, optionally, the group definitions themselves
(so a plan can be applied without re-tracing the model) and refit weights for consumer layers.
It serialises to a small versioned JSON document; refit tensors never go into the JSON (they
travel with :func:`secateurs.io.save`). Nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from secateurs.errors import PlanFormatError, ValidationError
from secateurs.graph.groups import Group, Member

if TYPE_CHECKING:
    from secateurs.graph.build import DependencyGraph

__all__ = ["SCHEMA", "VERSION", "PrunePlan"]

SCHEMA = "secateurs.plan"
VERSION = 1

_TOP_FIELDS = {"schema", "version", "keep", "groups", "meta", "allow_empty"}
_GROUP_FIELDS = {"size", "unit_width", "prunable", "reason", "members"}
_MEMBER_FIELDS = {"module", "param", "dim", "role", "offset", "block", "unit_stride", "inner_stride", "extent"}
_ROLES = ("producer", "consumer", "passthrough")


def _units(name: str, units: Any) -> list[int]:
    """Plain sorted-as-given ints; apply checks order and range against the group."""
    if isinstance(units, torch.Tensor):
        units = units.tolist()
    if isinstance(units, (str, bytes)) or not isinstance(units, Iterable):
        raise ValidationError(f"keep[{name!r}]", f"expected a list of unit indices, got {type(units).__name__}")
    out: list[int] = []
    for u in units:
        if isinstance(u, bool) or not hasattr(u, "__index__"):
            raise ValidationError(f"keep[{name!r}]", f"unit index {u!r} is not an integer")
        out.append(int(u))
    return out


@dataclass
class PrunePlan:
    """Kept unit indices per group, with optional embedded group definitions and refit weights.

    Parameters
    ----------
    keep:
        ``{group name: sorted unit indices kept}``. Groups not named keep every unit.
    groups:
        ``{group name: Group}`` definitions (members and sizes) so :func:`secateurs.apply` needs no
        graph; ``None`` when the plan will be applied with the graph at hand.
    refit:
        Replacement tensors for consumer parameters, keyed ``"module.param"``, already in the
        sliced shape (e.g. OSSCAR's closed-form refit). Not part of the JSON.
    meta:
        JSON-serialisable facts about how the plan was made (solver, budget, objective...).
    allow_empty:
        Names of groups this plan may keep *zero* units of (a removed layer: complexity-aware
        training's dead residual branch). Opt-in per group, so an empty list caused by a bug is
        still refused by ``apply``; sorted and unique. Written to the JSON only when non-empty,
        so plans without it stay byte-identical to older ones.
    """

    keep: dict[str, list[int]]
    groups: dict[str, Group] | None = None
    refit: dict[str, torch.Tensor] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    allow_empty: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.keep, Mapping):
            raise ValidationError("keep", f"expected a dict of group name -> unit indices, got {type(self.keep).__name__}")
        self.keep = {str(name): _units(str(name), units) for name, units in self.keep.items()}
        if self.groups is not None:
            if not isinstance(self.groups, Mapping):
                raise ValidationError("groups", f"expected a dict of group name -> Group, got {type(self.groups).__name__}")
            for name, g in self.groups.items():
                if not isinstance(g, Group):
                    raise ValidationError(f"groups[{name!r}]", f"expected a Group, got {type(g).__name__}")
            self.groups = dict(self.groups)
        if self.refit is not None:
            for key, t in self.refit.items():
                if not isinstance(t, torch.Tensor):
                    raise ValidationError(f"refit[{key!r}]", f"expected a tensor, got {type(t).__name__}")
            self.refit = dict(self.refit)
        if not isinstance(self.meta, Mapping):
            raise ValidationError("meta", f"expected a dict, got {type(self.meta).__name__}")
        self.meta = dict(self.meta)
        if isinstance(self.allow_empty, (str, bytes)) or not isinstance(self.allow_empty, Iterable):
            raise ValidationError("allow_empty", f"expected a list of group names, got {type(self.allow_empty).__name__}")
        names = list(self.allow_empty)
        bad = next((n for n in names if not isinstance(n, str)), None)
        if bad is not None:
            raise ValidationError("allow_empty", f"group name {bad!r} is not a string")
        self.allow_empty = sorted(set(names))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_graph(cls, graph: DependencyGraph, keep: Mapping[str, Iterable[int]], *,
                   refit: Mapping[str, torch.Tensor] | None = None, meta: Mapping[str, Any] | None = None,
                   allow_empty: Iterable[str] = ()) -> PrunePlan:
        """A plan that embeds the definitions of the groups it names, so ``apply`` needs no graph.

        Parameters
        ----------
        graph:
            The :class:`~secateurs.graph.DependencyGraph` the indices refer to.
        keep:
            ``{group name: kept unit indices}``; unknown names raise ``ValidationError`` naming them.
        refit, meta, allow_empty:
            As in the constructor.
        """
        groups = {name: graph.group(name) for name in keep}
        return cls(dict(keep), groups=groups, refit=dict(refit) if refit else None, meta=dict(meta or {}),
                   allow_empty=list(allow_empty))

    # -- views ---------------------------------------------------------------------------------

    def empties(self, name: str) -> bool:
        """Whether the plan removes every unit of ``name`` on purpose (listed in ``allow_empty``)."""
        return name in self.allow_empty and name in self.keep and not self.keep[name]

    def kept_counts(self) -> dict[str, int]:
        """``{group name: number of units kept}``: the argument of ``graph.cost``."""
        return {name: len(units) for name, units in self.keep.items()}

    def removed(self, name: str, size: int | None = None) -> list[int]:
        """Units of ``name`` the plan removes (``size`` from the embedded group when omitted)."""
        if size is None:
            if self.groups is None or name not in self.groups:
                raise ValidationError("size", f"group {name!r} is not embedded in the plan; pass its size")
            size = self.groups[name].size
        kept = set(self.keep.get(name, range(size)))
        return [u for u in range(size) if u not in kept]

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON document as Python objects (refit tensors left out)."""
        groups = None
        if self.groups is not None:
            groups = {
                name: {
                    "size": g.size,
                    "unit_width": g.unit_width,
                    "prunable": g.prunable,
                    "reason": g.reason,
                    "members": [
                        {"module": m.module, "param": m.param, "dim": m.dim, "role": m.role, "offset": m.offset,
                         "block": m.block, "unit_stride": m.unit_stride, "inner_stride": m.inner_stride,
                         **({} if m.extent is None else {"extent": m.extent})}
                        for m in g.members
                    ],
                }
                for name, g in self.groups.items()
            }
        doc: dict[str, Any] = {"schema": SCHEMA, "version": VERSION, "keep": {k: list(v) for k, v in self.keep.items()},
                               "groups": groups, "meta": self.meta}
        if self.allow_empty:
            doc["allow_empty"] = list(self.allow_empty)
        return doc

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int | None = 1) -> str:
        """Serialise to the versioned JSON schema; also write it to ``path`` when given.

        Raises
        ------
        ValidationError
            ``meta`` holds something JSON cannot represent.
        """
        try:
            text = json.dumps(self.to_dict(), indent=indent, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValidationError("meta", f"not JSON-serialisable: {e}") from e
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike[str]) -> PrunePlan:
        """Read a plan from JSON text or from a file path.

        Raises
        ------
        PlanFormatError
            Wrong schema, unknown version, or malformed content; the message names the field.
        """
        if isinstance(source, os.PathLike) or (isinstance(source, str) and not source.lstrip().startswith("{")):
            path = Path(source)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as e:
                raise PlanFormatError(f"plan file {str(path)!r} cannot be read: {e}") from e
        else:
            text = source
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanFormatError(f"plan: not valid JSON ({e})") from e
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> PrunePlan:
        """Inverse of :meth:`to_dict`, checking every field (``PlanFormatError`` names the bad one)."""
        if not isinstance(doc, dict):
            raise PlanFormatError(f"plan: expected a JSON object, got {type(doc).__name__}")
        schema = doc.get("schema")
        if schema != SCHEMA:
            raise PlanFormatError(f"schema: expected {SCHEMA!r}, got {schema!r}")
        version = doc.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise PlanFormatError(f"version: expected an integer, got {version!r}")
        if version != VERSION:
            raise PlanFormatError(f"version: unsupported plan version {version} (this secateurs reads version {VERSION})")
        extra = sorted(set(doc) - _TOP_FIELDS)
        if extra:
            raise PlanFormatError(f"{extra[0]}: unknown field in a version {VERSION} plan")
        keep = _read_keep(doc.get("keep"))
        groups = _read_groups(doc.get("groups"))
        meta = doc.get("meta", {})
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise PlanFormatError(f"meta: expected an object, got {type(meta).__name__}")
        allow_empty = doc.get("allow_empty", [])
        if not isinstance(allow_empty, list) or not all(isinstance(n, str) for n in allow_empty):
            raise PlanFormatError(f"allow_empty: expected a list of group names, got {allow_empty!r}")
        return cls(keep, groups=groups, meta=meta, allow_empty=allow_empty)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_keep(keep: Any) -> dict[str, list[int]]:
    if keep is None:
        raise PlanFormatError("keep: missing")
    if not isinstance(keep, dict):
        raise PlanFormatError(f"keep: expected an object of group name -> unit indices, got {type(keep).__name__}")
    out: dict[str, list[int]] = {}
    for name, units in keep.items():
        if not isinstance(units, list):
            raise PlanFormatError(f"keep[{name!r}]: expected a list of unit indices, got {type(units).__name__}")
        bad = next((u for u in units if not _is_int(u)), None)
        if bad is not None:
            raise PlanFormatError(f"keep[{name!r}]: unit index {bad!r} is not an integer")
        out[name] = list(units)
    return out


def _read_groups(groups: Any) -> dict[str, Group] | None:
    if groups is None:
        return None
    if not isinstance(groups, dict):
        raise PlanFormatError(f"groups: expected an object or null, got {type(groups).__name__}")
    out: dict[str, Group] = {}
    for name, g in groups.items():
        where = f"groups[{name!r}]"
        if not isinstance(g, dict):
            raise PlanFormatError(f"{where}: expected an object, got {type(g).__name__}")
        extra = sorted(set(g) - _GROUP_FIELDS)
        if extra:
            raise PlanFormatError(f"{where}.{extra[0]}: unknown field")
        size = g.get("size")
        if not _is_int(size) or size < 1:
            raise PlanFormatError(f"{where}.size: expected a positive integer, got {size!r}")
        width = g.get("unit_width", 1)
        if not _is_int(width) or width < 1:
            raise PlanFormatError(f"{where}.unit_width: expected a positive integer, got {width!r}")
        prunable = g.get("prunable", True)
        if not isinstance(prunable, bool):
            raise PlanFormatError(f"{where}.prunable: expected true or false, got {prunable!r}")
        reason = g.get("reason", "")
        if not isinstance(reason, str):
            raise PlanFormatError(f"{where}.reason: expected a string, got {reason!r}")
        members = g.get("members")
        if not isinstance(members, list):
            raise PlanFormatError(f"{where}.members: expected a list, got {type(members).__name__}")
        out[name] = Group(name, size, [_read_member(f"{where}.members[{i}]", m) for i, m in enumerate(members)],
                          width, prunable, reason)
    return out


def _read_member(where: str, m: Any) -> Member:
    if not isinstance(m, dict):
        raise PlanFormatError(f"{where}: expected an object, got {type(m).__name__}")
    extra = sorted(set(m) - _MEMBER_FIELDS)
    if extra:
        raise PlanFormatError(f"{where}.{extra[0]}: unknown field")
    for key in ("module", "param"):
        if not isinstance(m.get(key), str):
            raise PlanFormatError(f"{where}.{key}: expected a string, got {m.get(key)!r}")
    if m.get("role", "passthrough") not in _ROLES:
        raise PlanFormatError(f"{where}.role: expected one of {_ROLES}, got {m.get('role')!r}")
    ints = {"dim": m.get("dim"), "offset": m.get("offset", 0), "block": m.get("block", 1),
            "inner_stride": m.get("inner_stride", 1)}
    for key, v in ints.items():
        if not _is_int(v) or v < 0 or (key == "block" and v < 1):
            raise PlanFormatError(f"{where}.{key}: expected a {'positive' if key == 'block' else 'non-negative'} "
                                  f"integer, got {v!r}")
    us = m.get("unit_stride")
    if us is not None and (not _is_int(us) or us < 1):
        raise PlanFormatError(f"{where}.unit_stride: expected a positive integer or null, got {us!r}")
    extent = m.get("extent")
    if extent is not None and (not _is_int(extent) or extent < 1):
        raise PlanFormatError(f"{where}.extent: expected a positive integer or null, got {extent!r}")
    return Member(m["module"], m["param"], ints["dim"], m.get("role", "passthrough"), ints["offset"], ints["block"], us,
                  ints["inner_stride"], extent)
