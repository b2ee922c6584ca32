"""Turn a training method's kept units into a PrunePlan that ``secateurs.apply`` can use alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from secateurs.graph.groups import Group
from secateurs.plan import PrunePlan


def plan_from_keep(groups: Mapping[str, Group], keep: Mapping[str, list[int]], meta: Mapping[str, Any]) -> PrunePlan:
    """A plan naming only the groups that lose units, with their definitions embedded."""
    pruned = {name: sorted(units) for name, units in keep.items() if len(units) < groups[name].size}
    return PrunePlan(pruned, groups={name: groups[name] for name in pruned}, meta=dict(meta))
