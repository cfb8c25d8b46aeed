"""Workflows serialised to plain definitions and rebuilt from them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from workflow import (
    AsyncLocalRuntime,
    Workflow,
    WorkflowBuilder,
    WorkflowValidationError,
)


def sample() -> Workflow:
    b = WorkflowBuilder("adds things", atomic=True)
    b.add_input("n", int, default=3, description="the start")
    b.add_input("label", "str | None", required=False, description="a label")
    b.add_node("TConst", "c", {"value": "{{n}}"})
    b.add_node("TAdd", "add", {"b": "{{bump}}"})
    b.add_node(
        "PythonCodeNode", "fmt", {"code": "result = f'{label}:{total}'", "label": "{{label}}"}
    )
    b.add_node("TText", "t", {"text": "total is {{n}}"})
    b.add_connection("c", "value", "add", "a")
    b.add_connection("add", "sum", "fmt", "total")
    return b.build()


def test_definition_is_plain_data() -> None:
    d = sample().to_definition()
    assert json.loads(json.dumps(d)) == d
    assert d == {
        "description": "adds things",
        "atomic": True,
        "nodes": [
            {"id": "c", "type": "TConst", "params": {"value": "{{n}}"}},
            {"id": "add", "type": "TAdd", "params": {"b": "{{bump}}"}},
            {
                "id": "fmt",
                "type": "PythonCodeNode",
                "params": {"code": "result = f'{label}:{total}'", "label": "{{label}}"},
            },
            {"id": "t", "type": "TText", "params": {"text": "total is {{n}}"}},
        ],
        "connections": [
            {"source": "c", "output": "value", "target": "add", "input": "a"},
            {"source": "add", "output": "sum", "target": "fmt", "input": "total"},
        ],
        "inputs": [
            {
                "name": "n",
                "type": "int",
                "required": False,
                "description": "the start",
                "default": 3,
            },
            {"name": "label", "type": "str | None", "required": False, "description": "a label"},
        ],
    }


async def test_round_trip_gives_an_equal_definition_and_the_same_results() -> None:
    wf = sample()
    d = wf.to_definition()
    again = WorkflowBuilder.from_definition(json.loads(json.dumps(d))).build()
    assert again.to_definition() == d
    assert again.description == "adds things"
    assert again.atomic is True
    assert {k: (v.type, v.required, v.default) for k, v in again.inputs.items()} == {
        k: (v.type, v.required, v.default) for k, v in wf.inputs.items()
    }
    rt = AsyncLocalRuntime()
    for params in ({"label": "x"}, {"n": 10, "bump": 5, "label": None}):
        expected = await rt.execute_workflow_async(wf, params)
        assert await rt.execute_workflow_async(again, params) == expected
    assert await rt.execute_workflow_async(again, {"n": 10, "bump": 5, "label": "L"}) == {
        "c": {"value": 10},
        "add": {"sum": 15},
        "fmt": {"result": "L:15"},
        "t": {"text": "total is 10"},
    }


def test_a_function_node_refuses_to_serialise() -> None:
    def f(x: int) -> int:
        return x

    wf = WorkflowBuilder().add_node("PythonCodeNode", "fn", {"function": f, "x": 1}).build()
    with pytest.raises(TypeError, match="node 'fn': parameter 'function' is a Python callable"):
        wf.to_definition()


def test_malformed_definitions_give_problems() -> None:
    definition: dict[str, Any] = {
        "nodes": [
            {"id": "ok", "type": "TConst", "params": {"value": 1}},
            {"id": 3, "type": "TConst"},
            {"id": "p", "type": "TConst", "params": [1]},
            "not an object",
        ],
        "connections": [{"source": "ok", "output": "value", "target": 4}],
        "inputs": [{"type": "int"}, {"name": "x", "type": "nonsense"}],
    }
    with pytest.raises(WorkflowValidationError) as info:
        WorkflowBuilder.from_definition(definition).build()
    assert [(p.node, p.field, p.message) for p in info.value.problems] == [
        ("", "nodes[1]", "needs string 'id' and 'type'"),
        ("p", "params", "must be an object"),
        ("", "nodes[3]", "must be an object"),
        ("", "connections[0]", "needs string 'source', 'output', 'target' and 'input'"),
        ("", "inputs[0]", "needs a string 'name'"),
        (
            "",
            "x",
            "unknown type name 'nonsense' (known: any, str, int, float, bool, bytes, dict, "
            "list, decimal, datetime, date, uuid)",
        ),
        ("", "x", "declared input is not used by any node ({{x}})"),
    ]


def test_definition_sections_must_be_lists() -> None:
    with pytest.raises(WorkflowValidationError) as info:
        WorkflowBuilder.from_definition({"nodes": {"a": 1}, "connections": "x"}).build()
    assert [(p.field, p.message) for p in info.value.problems] == [
        ("nodes", "must be a list"),
        ("connections", "must be a list"),
    ]


def test_definition_with_an_unknown_node_type_reports_it() -> None:
    d = {"nodes": [{"id": "x", "type": "Missing", "params": {}}]}
    with pytest.raises(WorkflowValidationError, match="x: unknown node type 'Missing'"):
        WorkflowBuilder.from_definition(d).build()


async def test_changing_a_definition_does_not_change_the_workflow() -> None:
    b = WorkflowBuilder()
    b.add_node("TAnything", "a", {"value": {"k": ["v"]}})
    wf = b.build()
    d = wf.to_definition()
    d["nodes"][0]["params"]["value"]["k"].append("changed")
    assert wf.to_definition()["nodes"][0]["params"] == {"value": {"k": ["v"]}}
    assert await AsyncLocalRuntime().execute_workflow_async(wf) == {"a": {"value": {"k": ["v"]}}}


async def test_a_node_registered_under_another_name_round_trips() -> None:
    from collections.abc import Mapping

    from workflow import Event, Node, Output, register_node, unregister_node

    class Impl(Node):
        outputs = {"x": Output(int)}

        def run(self) -> Mapping[str, Any]:
            return {"x": 1}

    register_node(name="TAlias")(Impl)
    try:
        wf = WorkflowBuilder().add_node("TAlias", "a", {}).build()
        assert wf.node_type("a") == "TAlias"
        d = wf.to_definition()
        assert d["nodes"] == [{"id": "a", "type": "TAlias", "params": {}}]
        again = WorkflowBuilder.from_definition(d).build()
        events: list[Event] = []
        assert await AsyncLocalRuntime().execute_workflow_async(again, on_event=events.append) == {
            "a": {"x": 1}
        }
        assert {e.node_type for e in events if e.node_id} == {"TAlias"}
    finally:
        unregister_node("TAlias")
