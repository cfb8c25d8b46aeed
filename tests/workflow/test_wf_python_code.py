"""PythonCodeNode: code strings and functions."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from workflow import (
    AsyncLocalRuntime,
    LocalRuntime,
    NodeExecutionError,
    PythonCodeNode,
    WorkflowBuilder,
    WorkflowValidationError,
    get_node_class,
)


async def run(b: WorkflowBuilder, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return await AsyncLocalRuntime().execute_workflow_async(b.build(), params)


async def test_code_string_with_inputs_as_variables() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "a", {"value": 2})
    b.add_node("PythonCodeNode", "calc", {"code": "result = {'sum': a + b, 'n': len(xs)}"})
    b.add_node("PythonCodeNode", "static", {"code": "result = {'sum': a + b}", "a": 2, "b": 3})
    b.add_connection("a", "value", "calc", "a")
    b.add_connection("static", "sum", "calc", "b")
    b.add_connection("static", "sum", "calc", "xs")
    wf = b.build()
    assert set(wf.nodes["calc"].input_specs()) == {"code", "a", "b", "xs"}
    with pytest.raises(NodeExecutionError, match="TypeError: object of type 'int' has no len"):
        await AsyncLocalRuntime().execute_workflow_async(wf)
    b2 = WorkflowBuilder()
    code = "result = {'sum': a + b, 'n': len(xs)}"
    b2.add_node("PythonCodeNode", "calc", {"code": code, "xs": "{{xs}}"})
    b2.add_node("PythonCodeNode", "static", {"code": "result = {'sum': a + b}", "a": 2, "b": 3})
    b2.add_connection("static", "sum", "calc", "a")
    b2.add_connection("static", "sum", "calc", "b")
    b2.add_input("xs", list)
    wf2 = b2.build()
    assert wf2.inputs["xs"].type is list
    results = await AsyncLocalRuntime().execute_workflow_async(wf2, {"xs": [1, 2, 3]})
    assert results == {
        "calc": {"sum": 10, "n": 3},
        "static": {"sum": 5},
    }


async def test_code_free_names_are_required_params() -> None:
    b = WorkflowBuilder()
    code = "import math\ntotal = 0\nfor v in values:\n    total += v\nresult = math.floor(total)"
    b.add_node("PythonCodeNode", "c", {"code": code})
    with pytest.raises(WorkflowValidationError) as info:
        b.build()
    assert [(p.node, p.field, p.message) for p in info.value.problems] == [
        ("c", "values", "required parameter (any) is not supplied")
    ]


async def test_non_dict_result_is_the_single_output() -> None:
    b = WorkflowBuilder()
    b.add_node("PythonCodeNode", "c", {"code": "result = x * 2", "x": "{{x}}"})
    assert await run(b, {"x": 21}) == {"c": {"result": 42}}


async def test_code_that_does_not_set_result_fails_naming_the_node() -> None:
    b = WorkflowBuilder().add_node("PythonCodeNode", "c", {"code": "y = 1"})
    with pytest.raises(NodeExecutionError) as info:
        await run(b)
    assert str(info.value) == (
        "node 'c' (PythonCodeNode) failed: ValueError: the code did not set `result`"
    )


async def test_code_raising_fails_naming_node_and_cause() -> None:
    b = WorkflowBuilder().add_node("PythonCodeNode", "c", {"code": "result = 1 / 0"})
    with pytest.raises(NodeExecutionError) as info:
        await run(b)
    assert info.value.node_id == "c"
    assert isinstance(info.value.cause, ZeroDivisionError)
    assert "ZeroDivisionError: division by zero" in str(info.value)


def test_code_syntax_error_is_reported_at_build() -> None:
    b = WorkflowBuilder()
    b.add_node("PythonCodeNode", "bad", {"code": "result = (1 +"})
    b.add_node("PythonCodeNode", "also_bad", {"code": 42})
    with pytest.raises(WorkflowValidationError) as info:
        b.build()
    problems = [(p.node, p.field) for p in info.value.problems]
    assert problems == [("bad", "code"), ("also_bad", "code")]
    assert info.value.problems[0].message.startswith("syntax error at line 1:")
    assert info.value.problems[1].message == "expected str, got int"


def test_code_and_function_are_exclusive() -> None:
    b = WorkflowBuilder()
    b.add_node("PythonCodeNode", "both", {"code": "result = 1", "function": lambda: 1})
    b.add_node("PythonCodeNode", "neither", {})
    b.add_node("PythonCodeNode", "notfn", {"function": 3})
    with pytest.raises(WorkflowValidationError) as info:
        b.build()
    assert [(p.node, p.field, p.message) for p in info.value.problems] == [
        ("both", "code", "give exactly one of 'code' (a string) or 'function'"),
        ("neither", "code", "give exactly one of 'code' (a string) or 'function'"),
        ("notfn", "function", "expected a callable, got int"),
    ]


def add_one(x: int, step: int = 1) -> dict[str, int]:
    return {"y": x + step}


def function_workflow() -> Any:
    b = WorkflowBuilder()
    b.add_node("PythonCodeNode", "f", {"function": add_one, "x": "{{x}}"})
    return b.build()


async def test_sync_function_node_with_typed_inputs() -> None:
    wf = function_workflow()
    assert wf.inputs["x"].type is int
    assert await AsyncLocalRuntime().execute_workflow_async(wf, {"x": 1}) == {"f": {"y": 2}}


def test_sync_function_node_in_the_sync_runtime() -> None:
    with LocalRuntime() as rt:
        assert rt.execute(function_workflow(), {"x": 5})[0] == {"f": {"y": 6}}


async def test_function_node_connected_and_defaulted() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": 10})
    b.add_node("PythonCodeNode", "f", {"function": add_one, "step": 5})
    b.add_connection("c", "value", "f", "x")
    assert await run(b) == {"c": {"value": 10}, "f": {"y": 15}}


async def test_function_node_type_mismatch_at_build() -> None:
    b = WorkflowBuilder()
    b.add_node("TText", "t", {"text": "x"})
    b.add_node("PythonCodeNode", "f", {"function": add_one})
    b.add_connection("t", "text", "f", "x")
    with pytest.raises(WorkflowValidationError) as info:
        b.build()
    assert [(p.node, p.field, p.message) for p in info.value.problems] == [
        ("f", "x", "type mismatch: t.text is str, parameter is int")
    ]


async def test_async_function_node() -> None:
    async def fetch(name: str) -> str:
        await asyncio.sleep(0)
        return name.upper()

    b = WorkflowBuilder()
    b.add_node("PythonCodeNode", "f", {"function": fetch, "name": "{{name}}"})
    assert await run(b, {"name": "ada"}) == {"f": {"result": "ADA"}}


async def test_function_raising() -> None:
    def broken() -> None:
        raise KeyError("gone")

    b = WorkflowBuilder().add_node("PythonCodeNode", "f", {"function": broken})
    with pytest.raises(NodeExecutionError, match="node 'f' \\(PythonCodeNode\\) failed: KeyError"):
        await run(b)


def test_python_code_node_is_not_exposable() -> None:
    assert get_node_class("PythonCodeNode") is PythonCodeNode
    assert PythonCodeNode.exposable is False
    wf = WorkflowBuilder().add_node("PythonCodeNode", "c", {"code": "result = 1"}).build()
    assert wf.exposable is False
    assert WorkflowBuilder().add_node("TConst", "c", {"value": 1}).build().exposable is True


async def test_code_runs_are_independent() -> None:
    # a variable set by one execution must not leak into the next
    b = WorkflowBuilder()
    b.add_node("PythonCodeNode", "c", {"code": "seen = x\nresult = seen", "x": "{{x}}"})
    wf = b.build()
    rt = AsyncLocalRuntime()
    assert await rt.execute_workflow_async(wf, {"x": 1}) == {"c": {"result": 1}}
    assert await rt.execute_workflow_async(wf, {"x": 2}) == {"c": {"result": 2}}


def test_placeholders_in_code_are_refused() -> None:
    b = WorkflowBuilder().add_node("PythonCodeNode", "c", {"code": "result = '{{name}}'"})
    with pytest.raises(WorkflowValidationError) as info:
        b.build()
    assert [(p.node, p.field) for p in info.value.problems] == [("c", "code")]
    assert info.value.problems[0].message.startswith("placeholders are not allowed in code")
