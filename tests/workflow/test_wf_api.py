"""The public API example of the issue, typed nodes and the node registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

import workflow
from workflow import (
    AsyncLocalRuntime,
    LocalRuntime,
    Node,
    Output,
    Param,
    RegistryError,
    WorkflowBuilder,
    get_node_class,
    node_types,
    register_node,
    unregister_node,
)


def _issue_example() -> workflow.Workflow:
    wf = WorkflowBuilder()
    wf.add_node(
        "PythonCodeNode", "greet", {"code": "result = {'text': 'hi ' + name}", "name": "{{name}}"}
    )
    wf.add_node("PythonCodeNode", "shout", {"code": "result = {'text': text.upper()}"})
    wf.add_connection("greet", "text", "shout", "text")
    return wf.build()


def test_issue_example_sync() -> None:
    wf = _issue_example()
    with LocalRuntime() as rt:
        results, run_id = rt.execute(wf, parameters={"name": "ada"})
    assert results == {"greet": {"text": "hi ada"}, "shout": {"text": "HI ADA"}}
    assert isinstance(run_id, str)
    assert len(run_id) == 32


async def test_issue_example_async() -> None:
    wf = _issue_example()
    results = await AsyncLocalRuntime().execute_workflow_async(wf, {"name": "ada"})
    assert results == {"greet": {"text": "hi ada"}, "shout": {"text": "HI ADA"}}


def test_issue_example_inputs_and_outputs() -> None:
    wf = _issue_example()
    assert list(wf.inputs) == ["name"]
    assert wf.inputs["name"].required is True
    assert wf.inputs["name"].targets == (("greet", "name"),)
    assert [(o.node, o.name) for o in wf.outputs] == [("greet", "result"), ("shout", "result")]


def test_public_api_is_exported() -> None:
    for name in workflow.__all__:
        assert hasattr(workflow, name), name
    for name in ("WorkflowBuilder", "LocalRuntime", "AsyncLocalRuntime", "Node", "register_node"):
        assert name in workflow.__all__


def test_built_workflow_is_immutable() -> None:
    wf = _issue_example()
    with pytest.raises(TypeError):
        wf.inputs["other"] = wf.inputs["name"]  # type: ignore[index]
    with pytest.raises(TypeError):
        wf.nodes["x"] = wf.nodes["greet"]  # type: ignore[index]


def test_builder_changes_after_build_do_not_affect_the_workflow() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": 1})
    wf = b.build()
    b.add_node("TConst", "d", {"value": 2})
    assert LocalRuntime().execute(wf)[0] == {"c": {"value": 1}}


# -- typed user nodes ------------------------------------------------------------------


@register_node
class Multiply(Node):
    """Multiplies a number by a factor.

    A second paragraph that is not part of the description.
    """

    parameters = {
        "x": Param(int, description="the number"),
        "factor": Param(int, default=2, description="the factor"),
        "label": Param(str | None, required=False, description="an optional label"),
    }
    outputs = {
        "product": Output(int, description="x * factor"),
        "label": Output(str | None),
    }

    def run(self, x: int, factor: int, label: str | None) -> Mapping[str, Any]:
        return {"product": x * factor, "label": label}


def test_user_node_declares_typed_params_and_outputs() -> None:
    cls = get_node_class("Multiply")
    assert cls is Multiply
    assert Multiply.type_name == "Multiply"
    assert Multiply.description == "Multiplies a number by a factor."
    x, factor, label = (Multiply.parameters[k] for k in ("x", "factor", "label"))
    assert (x.type, x.required, x.default, x.description) == (
        int,
        True,
        workflow.MISSING,
        "the number",
    )
    assert (factor.type, factor.required, factor.default) == (int, False, 2)
    assert (label.type_name, label.required, label.default) == ("str | None", False, None)
    assert Multiply.outputs["product"].type_name == "int"
    assert Multiply.outputs["label"].type_name == "str | None"
    assert Multiply.exposable is True


def test_user_node_runs_with_defaults_and_inputs() -> None:
    b = WorkflowBuilder()
    b.add_node("Multiply", "m", {"x": "{{x}}"})
    b.add_node("Multiply", "m2", {"factor": 10, "label": "big"})
    b.add_connection("m", "product", "m2", "x")
    wf = b.build()
    assert wf.inputs["x"].type is int
    assert wf.inputs["x"].description == "the number"
    results, _ = LocalRuntime().execute(wf, {"x": 21})
    assert results == {
        "m": {"product": 42, "label": None},
        "m2": {"product": 420, "label": "big"},
    }
    assert [(o.node, o.name, o.type_name) for o in wf.outputs] == [
        ("m", "product", "int"),
        ("m", "label", "str | None"),
        ("m2", "product", "int"),
        ("m2", "label", "str | None"),
    ]


def test_unsupported_param_type_is_refused() -> None:
    with pytest.raises(TypeError, match="unsupported parameter type"):
        Param(set)
    with pytest.raises(TypeError, match="unsupported output type"):
        Output(int | str)


# -- registry --------------------------------------------------------------------------


def test_registering_two_different_classes_under_one_name_fails() -> None:
    class First(Node):
        type_name = "TDuplicateName"

    class Second(Node):
        type_name = "TDuplicateName"

    register_node(First)
    try:
        with pytest.raises(RegistryError, match="'TDuplicateName' is already registered"):
            register_node(Second)
        assert get_node_class("TDuplicateName") is First
    finally:
        unregister_node("TDuplicateName")


def test_registering_under_an_explicit_name_that_is_taken_fails() -> None:
    class Other(Node):
        pass

    with pytest.raises(RegistryError, match="'PythonCodeNode' is already registered"):
        register_node(name="PythonCodeNode")(Other)


def test_registering_the_same_class_twice_is_fine() -> None:
    class Twice(Node):
        type_name = "TTwice"

    try:
        assert register_node(Twice) is Twice
        assert register_node(Twice) is Twice
        assert node_types()["TTwice"] is Twice
    finally:
        unregister_node("TTwice")
    assert "TTwice" not in node_types()


def test_register_with_a_name() -> None:
    @register_node(name="TRenamed")
    class Named(Node):
        pass

    try:
        assert get_node_class("TRenamed") is Named
    finally:
        unregister_node("TRenamed")


def test_unknown_node_type_lookup_fails() -> None:
    with pytest.raises(RegistryError, match="unknown node type 'NoSuchNode'"):
        get_node_class("NoSuchNode")


def test_register_rejects_non_nodes_and_bad_names() -> None:
    with pytest.raises(RegistryError, match="not a Node subclass"):
        register_node(int)  # type: ignore[arg-type]

    class Bad(Node):
        type_name = "not an identifier"

    with pytest.raises(RegistryError, match="not an identifier"):
        register_node(Bad)
