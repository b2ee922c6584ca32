"""PrunePlan: JSON round-trips, every malformed document names its field, never pickles."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from secateurs.errors import PlanFormatError, ValidationError
from secateurs.graph import build
from secateurs.graph.groups import Group, Member
from secateurs.plan import SCHEMA, VERSION, PrunePlan


def _group() -> Group:
    return Group("conv:out", 4, [
        Member("conv", "weight", 0, "producer"),
        Member("conv", "bias", 0, "passthrough"),
        Member("attn", "in_proj_weight", 0, "producer", offset=8, block=2, unit_stride=3, inner_stride=1),
        Member("fc", "weight", 1, "consumer"),
    ], unit_width=1)


def _plan() -> PrunePlan:
    frozen = Group("fc:out", 3, [Member("fc", "weight", 0, "producer")], prunable=False, reason="reaches model output")
    return PrunePlan({"conv:out": [0, 2], "fc:out": [0, 1, 2]}, groups={"conv:out": _group(), "fc:out": frozen},
                     meta={"solver": "greedy", "budget": {"flops": 0.5}})


def _doc() -> dict[str, Any]:
    return json.loads(_plan().to_json())


def test_round_trip_with_groups() -> None:
    plan = _plan()
    text = plan.to_json()
    doc = json.loads(text)
    assert doc["schema"] == SCHEMA and doc["version"] == VERSION == 1
    back = PrunePlan.from_json(text)
    assert back.keep == plan.keep
    assert back.meta == plan.meta
    assert back.groups == plan.groups  # Group and Member are dataclasses: field-by-field equality
    assert back.groups is not None and back.groups["fc:out"].reason == "reaches model output"
    assert back.to_json() == text


def test_round_trip_without_groups_and_via_files(tmp_path: Path) -> None:
    plan = PrunePlan({"a": [1, 3]})
    assert json.loads(plan.to_json())["groups"] is None
    path = tmp_path / "plan.json"
    plan.to_json(path)
    for source in (path, str(path)):
        back = PrunePlan.from_json(source)
        assert back.keep == {"a": [1, 3]} and back.groups is None and back.meta == {}


def test_refit_tensors_stay_out_of_json() -> None:
    plan = PrunePlan({"a": [0]}, refit={"fc.weight": torch.ones(2, 1)})
    doc = json.loads(plan.to_json())
    assert "refit" not in doc and "fc.weight" not in plan.to_json()
    assert PrunePlan.from_json(plan.to_json()).refit is None


def test_keep_accepts_tensors_and_counts() -> None:
    plan = PrunePlan({"a": torch.tensor([0, 2, 5])}, groups={"a": Group("a", 6, [])})
    assert plan.keep == {"a": [0, 2, 5]}
    assert plan.kept_counts() == {"a": 3}
    assert plan.removed("a") == [1, 3, 4]
    assert plan.removed("b", size=2) == []
    with pytest.raises(ValidationError, match=r"size: group 'b' is not embedded"):
        plan.removed("b")


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d.update(schema="torch.plan"), r"^schema: expected 'secateurs.plan', got 'torch.plan'"),
        (lambda d: d.pop("schema"), r"^schema: expected 'secateurs.plan', got None"),
        (lambda d: d.update(version=2), r"^version: unsupported plan version 2 \(this secateurs reads version 1\)"),
        (lambda d: d.update(version="1"), r"^version: expected an integer, got '1'"),
        (lambda d: d.update(version=True), r"^version: expected an integer, got True"),
        (lambda d: d.update(extra=1), r"^extra: unknown field in a version 1 plan"),
        (lambda d: d.pop("keep"), r"^keep: missing"),
        (lambda d: d.update(keep=[0, 1]), r"^keep: expected an object"),
        (lambda d: d["keep"].update({"conv:out": "0,2"}), r"^keep\['conv:out'\]: expected a list of unit indices, got str"),
        (lambda d: d["keep"].update({"conv:out": [0, 1.5]}), r"^keep\['conv:out'\]: unit index 1.5 is not an integer"),
        (lambda d: d["keep"].update({"conv:out": [0, True]}), r"^keep\['conv:out'\]: unit index True is not an integer"),
        (lambda d: d.update(groups=[]), r"^groups: expected an object or null, got list"),
        (lambda d: d["groups"].update({"conv:out": 3}), r"^groups\['conv:out'\]: expected an object, got int"),
        (lambda d: d["groups"]["conv:out"].update(size=0), r"^groups\['conv:out'\]\.size: expected a positive integer, got 0"),
        (lambda d: d["groups"]["conv:out"].pop("size"), r"^groups\['conv:out'\]\.size: expected a positive integer, got None"),
        (lambda d: d["groups"]["conv:out"].update(unit_width=-1), r"^groups\['conv:out'\]\.unit_width: expected a positive"),
        (lambda d: d["groups"]["conv:out"].update(prunable="yes"), r"^groups\['conv:out'\]\.prunable: expected true or false"),
        (lambda d: d["groups"]["conv:out"].update(reason=3), r"^groups\['conv:out'\]\.reason: expected a string"),
        (lambda d: d["groups"]["conv:out"].update(colour=1), r"^groups\['conv:out'\]\.colour: unknown field"),
        (lambda d: d["groups"]["conv:out"].update(members={}), r"^groups\['conv:out'\]\.members: expected a list, got dict"),
        (lambda d: d["groups"]["conv:out"]["members"].append("x"),
         r"^groups\['conv:out'\]\.members\[4\]: expected an object, got str"),
        (lambda d: d["groups"]["conv:out"]["members"][1].pop("module"),
         r"^groups\['conv:out'\]\.members\[1\]\.module: expected a string, got None"),
        (lambda d: d["groups"]["conv:out"]["members"][1].update(param=7),
         r"^groups\['conv:out'\]\.members\[1\]\.param: expected a string, got 7"),
        (lambda d: d["groups"]["conv:out"]["members"][0].update(dim=-1),
         r"^groups\['conv:out'\]\.members\[0\]\.dim: expected a non-negative integer, got -1"),
        (lambda d: d["groups"]["conv:out"]["members"][0].pop("dim"),
         r"^groups\['conv:out'\]\.members\[0\]\.dim: expected a non-negative integer, got None"),
        (lambda d: d["groups"]["conv:out"]["members"][2].update(block=0),
         r"^groups\['conv:out'\]\.members\[2\]\.block: expected a positive integer, got 0"),
        (lambda d: d["groups"]["conv:out"]["members"][2].update(unit_stride=0),
         r"^groups\['conv:out'\]\.members\[2\]\.unit_stride: expected a positive integer or null"),
        (lambda d: d["groups"]["conv:out"]["members"][2].update(offset="8"),
         r"^groups\['conv:out'\]\.members\[2\]\.offset: expected a non-negative integer, got '8'"),
        (lambda d: d["groups"]["conv:out"]["members"][0].update(role="owner"),
         r"^groups\['conv:out'\]\.members\[0\]\.role: expected one of"),
        (lambda d: d["groups"]["conv:out"]["members"][0].update(shape=[1]),
         r"^groups\['conv:out'\]\.members\[0\]\.shape: unknown field"),
        (lambda d: d.update(meta=[1]), r"^meta: expected an object, got list"),
    ],
)
def test_format_errors_name_the_field(mutate: Any, pattern: str) -> None:
    doc = copy.deepcopy(_doc())
    mutate(doc)
    with pytest.raises(PlanFormatError, match=pattern):
        PrunePlan.from_json(json.dumps(doc))
    with pytest.raises(PlanFormatError, match=pattern):  # the same check on the parsed form
        PrunePlan.from_dict(doc)


def test_not_json_not_object_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PlanFormatError, match=r"^plan: not valid JSON"):
        PrunePlan.from_json('{"schema": ')
    with pytest.raises(PlanFormatError, match=r"^plan: expected a JSON object, got list"):
        PrunePlan.from_dict([1, 2])
    with pytest.raises(PlanFormatError, match=r"plan file '.*nope\.json' cannot be read"):
        PrunePlan.from_json(tmp_path / "nope.json")


def test_plan_format_error_is_an_invalid_plan_error() -> None:
    from secateurs.errors import InvalidPlanError

    with pytest.raises(InvalidPlanError):
        PrunePlan.from_json('{"schema": "secateurs.plan", "version": 99}')


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(keep=[1, 2]), r"^keep: expected a dict"),
        (dict(keep={"a": 3}), r"^keep\['a'\]: expected a list of unit indices, got int"),
        (dict(keep={"a": "01"}), r"^keep\['a'\]: expected a list of unit indices, got str"),
        (dict(keep={"a": [0.5]}), r"^keep\['a'\]: unit index 0.5 is not an integer"),
        (dict(keep={}, groups={"a": 1}), r"^groups\['a'\]: expected a Group, got int"),
        (dict(keep={}, refit={"fc.weight": [1.0]}), r"^refit\['fc.weight'\]: expected a tensor, got list"),
        (dict(keep={}, meta=[1]), r"^meta: expected a dict, got list"),
    ],
)
def test_constructor_validates(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValidationError, match=pattern):
        PrunePlan(**kwargs)


def test_meta_must_be_json() -> None:
    plan = PrunePlan({}, meta={"tensor": torch.ones(1)})
    with pytest.raises(ValidationError, match=r"^meta: not JSON-serialisable"):
        plan.to_json()


def test_from_graph_embeds_group_definitions() -> None:
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    graph = build(model, torch.randn(2, 3))
    plan = PrunePlan.from_graph(graph, {"0:out": [1, 4]}, meta={"note": "x"})
    assert plan.groups == {"0:out": graph.group("0:out")}
    assert plan.meta == {"note": "x"}
    back = PrunePlan.from_json(plan.to_json())
    assert back.groups is not None
    g = back.groups["0:out"]
    assert [m.indices([1, 4]) for m in g.members] == [m.indices([1, 4]) for m in graph.group("0:out").members]
    with pytest.raises(ValidationError, match=r"unknown group 'nope'"):
        PrunePlan.from_graph(graph, {"nope": [0]})


def test_allow_empty_round_trips_and_is_left_out_when_unused() -> None:
    plan = PrunePlan({"conv:out": [], "fc:out": [0, 1, 2]}, groups={"conv:out": _group()},
                     allow_empty=["conv:out", "conv:out"])
    assert plan.allow_empty == ["conv:out"] and plan.empties("conv:out") and not plan.empties("fc:out")
    doc = json.loads(plan.to_json())
    assert doc["allow_empty"] == ["conv:out"] and doc["version"] == 1
    back = PrunePlan.from_json(plan.to_json())
    assert back.allow_empty == ["conv:out"] and back.keep["conv:out"] == [] and back.empties("conv:out")
    assert "allow_empty" not in _doc()  # plans that empty nothing are byte-identical to older ones
    assert not PrunePlan({"a": []}).empties("a")  # an empty list alone is not a permission


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d.update(allow_empty="conv:out"), r"^allow_empty: expected a list of group names, got 'conv:out'"),
        (lambda d: d.update(allow_empty=[1]), r"^allow_empty: expected a list of group names, got \[1\]"),
    ],
)
def test_malformed_allow_empty_names_the_field(mutate: Any, pattern: str) -> None:
    doc = _doc()
    mutate(doc)
    with pytest.raises(PlanFormatError, match=pattern):
        PrunePlan.from_dict(doc)


def test_allow_empty_in_the_constructor_is_checked() -> None:
    with pytest.raises(ValidationError, match=r"allow_empty: expected a list of group names, got str"):
        PrunePlan({"a": []}, allow_empty="a")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"allow_empty: group name 3 is not a string"):
        PrunePlan({"a": []}, allow_empty=[3])  # type: ignore[list-item]
