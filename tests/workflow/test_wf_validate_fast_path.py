"""`Workflow.validate_inputs` with no parameters (None or empty): a workflow with nothing
required and nothing defaulted gets `{}` at once; defaults are still filled in, missing
required inputs and unknown ones still reported."""

from __future__ import annotations

import pytest

from workflow import InvalidInputsError, LocalRuntime, Workflow, WorkflowBuilder


def no_inputs() -> Workflow:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": 1})
    return b.build()


def errors(wf: Workflow, parameters: dict[str, object] | None) -> dict[str, str]:
    with pytest.raises(InvalidInputsError) as info:
        wf.validate_inputs(parameters)
    return {e.input: e.message for e in info.value.errors}


def test_a_defaulted_input_is_filled_in_when_no_parameters_are_given() -> None:
    b = WorkflowBuilder()
    b.add_input("n", int, default=5)
    b.add_node("TConst", "c", {"value": "{{n}}"})
    wf = b.build()
    assert wf.validate_inputs({}) == {"n": 5}
    assert wf.validate_inputs(None) == {"n": 5}
    assert wf.validate_inputs({"n": 6}) == {"n": 6}


def test_a_workflow_without_inputs_takes_no_parameters() -> None:
    wf = no_inputs()
    assert wf.validate_inputs(None) == {}
    assert wf.validate_inputs({}) == {}
    assert errors(wf, {"x": 1}) == {"x": "unknown input (this workflow's inputs: none)"}


def test_each_call_returns_a_dict_of_its_own() -> None:
    wf = no_inputs()
    first = wf.validate_inputs({})
    first["changed"] = True  # a caller may add to what it got
    assert wf.validate_inputs({}) == {}
    assert wf.validate_inputs(None) == {}


def test_an_optional_input_without_a_default_is_still_checked() -> None:
    b = WorkflowBuilder()
    b.add_node("TAdd", "add", {"a": 1, "b": "{{b}}"})  # b: optional, the node's default
    wf = b.build()
    assert (wf.inputs["b"].required, wf.validate_inputs({}), wf.validate_inputs(None)) == (
        False,
        {},
        {},
    )
    assert wf.validate_inputs({"b": 2}) == {"b": 2}
    assert errors(wf, {"b": "2"}) == {"b": "expected int, got str '2'"}
    assert errors(wf, {"c": 1}) == {"c": "unknown input (this workflow's inputs: b)"}
    with LocalRuntime() as rt:
        results, _ = rt.execute(wf, None)
    assert results == {"add": {"sum": 1}}  # the node's default, b = 0


def test_a_required_input_is_still_missing_from_no_parameters() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": "{{n}}"})
    wf = b.build()
    missing = {"n": "required input is missing (int)"}
    assert errors(wf, {}) == missing
    assert errors(wf, None) == missing
