"""Placeholders, declared inputs and build-time validation."""

from __future__ import annotations

from typing import Any

import pytest

from workflow import (
    MISSING,
    LocalRuntime,
    Problem,
    WorkflowBuilder,
    WorkflowValidationError,
)


def run(wf: Any, params: dict[str, Any] | None = None) -> dict[str, Any]:
    with LocalRuntime() as rt:
        results, _ = rt.execute(wf, params)
    return results


def problems(builder: WorkflowBuilder) -> list[Problem]:
    with pytest.raises(WorkflowValidationError) as info:
        builder.build()
    assert str(info.value).startswith(f"workflow is invalid ({len(info.value.problems)} problem")
    for p in info.value.problems:
        assert str(p) in str(info.value)
    return info.value.problems


def triples(ps: list[Problem]) -> set[tuple[str, str]]:
    return {(p.node, p.field) for p in ps}


# -- placeholders ----------------------------------------------------------------------


def test_whole_placeholder_takes_the_param_type() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": "{{age}}"})
    wf = b.build()
    age = wf.inputs["age"]
    assert (age.type, age.type_name, age.required, age.default) == (int, "int", True, MISSING)
    assert run(wf, {"age": 41}) == {"c": {"value": 41}}


def test_whole_placeholder_with_spaces() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": "{{ age }}"})
    wf = b.build()
    assert wf.inputs["age"].type is int
    assert run(wf, {"age": 7}) == {"c": {"value": 7}}


def test_embedded_placeholder_renders_as_text() -> None:
    b = WorkflowBuilder()
    b.add_node("TText", "t", {"text": "hello {{who}}, you are {{age}}!"})
    wf = b.build()
    assert {n: i.type_name for n, i in wf.inputs.items()} == {"who": "str", "age": "str"}
    assert run(wf, {"who": "ada", "age": "36"}) == {"t": {"text": "hello ada, you are 36!"}}


def test_input_used_whole_and_embedded_keeps_the_whole_type() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": "{{age}}"})
    b.add_node("TText", "t", {"text": "age={{age}}"})
    wf = b.build()
    assert wf.inputs["age"].type is int
    assert wf.inputs["age"].targets == (("c", "value"), ("t", "text"))
    assert run(wf, {"age": 3}) == {"c": {"value": 3}, "t": {"text": "age=3"}}


def test_nested_placeholders_in_dicts_and_lists_keys_untouched() -> None:
    b = WorkflowBuilder()
    value = {
        "{{key}}": "{{v}}",
        "list": ["{{v}}", "x-{{w}}", 3, {"deep": "{{w}}"}],
        "plain": "no placeholder",
    }
    b.add_node("TAnything", "a", {"value": value})
    wf = b.build()
    assert sorted(wf.inputs) == ["v", "w"]
    assert wf.inputs["v"].type_name == "any"
    assert wf.inputs["w"].type_name == "any"
    out = run(wf, {"v": 5, "w": "z"})
    assert out == {
        "a": {
            "value": {
                "{{key}}": 5,
                "list": [5, "x-z", 3, {"deep": "z"}],
                "plain": "no placeholder",
            }
        }
    }


def test_placeholder_on_an_optional_param_is_an_optional_input() -> None:
    b = WorkflowBuilder()
    b.add_node("TAdd", "add", {"a": 1, "b": "{{b}}"})
    wf = b.build()
    assert wf.inputs["b"].required is False
    assert run(wf) == {"add": {"sum": 1}}  # falls back to the param default 0
    assert run(wf, {"b": 2}) == {"add": {"sum": 3}}


def test_one_input_feeding_params_of_different_types_is_an_error() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": "{{x}}"})
    b.add_node("TText", "t", {"text": "{{x}}"})
    ps = problems(b)
    assert len(ps) == 1
    assert (ps[0].node, ps[0].field) == ("t", "text")
    assert "input 'x' feeds parameters of different types: c.value is int" in ps[0].message


# -- explicit inputs -------------------------------------------------------------------


def test_add_input_with_type_default_and_description() -> None:
    b = WorkflowBuilder()
    b.add_input("n", int, default=5, description="how many")
    b.add_node("TConst", "c", {"value": "{{n}}"})
    wf = b.build()
    n = wf.inputs["n"]
    assert (n.type, n.required, n.default, n.description) == (int, False, 5, "how many")
    assert run(wf) == {"c": {"value": 5}}
    assert run(wf, {"n": 6}) == {"c": {"value": 6}}


def test_add_input_type_by_name() -> None:
    b = WorkflowBuilder()
    b.add_input("x", "float", description="a number")
    b.add_node("TFloat", "f", {"x": "{{x}}"})
    wf = b.build()
    assert wf.inputs["x"].type is float
    assert run(wf, {"x": 2}) == {"f": {"x": 2.0}}


def test_add_input_without_type_takes_the_param_type() -> None:
    b = WorkflowBuilder()
    b.add_input("n", description="described")
    b.add_node("TConst", "c", {"value": "{{n}}"})
    wf = b.build()
    assert wf.inputs["n"].type is int
    assert wf.inputs["n"].description == "described"


def test_declared_input_must_agree_with_the_param() -> None:
    b = WorkflowBuilder()
    b.add_input("n", str)
    b.add_node("TConst", "c", {"value": "{{n}}"})
    ps = problems(b)
    assert [(p.node, p.field) for p in ps] == [("c", "value")]
    assert ps[0].message == "input 'n' is declared str but feeds a int parameter"


def test_declared_int_input_may_feed_a_float_param() -> None:
    b = WorkflowBuilder()
    b.add_input("n", int)
    b.add_node("TFloat", "f", {"x": "{{n}}"})
    assert b.build().inputs["n"].type is int


def test_declared_default_of_the_wrong_type() -> None:
    b = WorkflowBuilder()
    b.add_input("n", int, default="five")
    b.add_node("TConst", "c", {"value": "{{n}}"})
    ps = problems(b)
    assert [(p.node, p.field) for p in ps] == [("", "n")]
    assert ps[0].message == "default: expected int, got str 'five'"


def test_unknown_declared_type_name() -> None:
    b = WorkflowBuilder()
    b.add_input("n", "integer")
    b.add_node("TConst", "c", {"value": "{{n}}"})
    ps = problems(b)
    assert ("", "n") in triples(ps)
    assert "unknown type name 'integer'" in ps[0].message


def test_declared_but_unused_input() -> None:
    b = WorkflowBuilder()
    b.add_input("ghost", int)
    b.add_node("TConst", "c", {"value": 1})
    ps = problems(b)
    assert [(p.node, p.field) for p in ps] == [("", "ghost")]
    assert "declared input is not used by any node" in ps[0].message


def test_optional_input_without_default_feeding_a_required_param() -> None:
    b = WorkflowBuilder()
    b.add_input("n", int, required=False)
    b.add_node("TConst", "c", {"value": "{{n}}"})
    ps = problems(b)
    assert [(p.node, p.field) for p in ps] == [("c", "value")]
    assert "optional without a default" in ps[0].message


# -- validation errors -----------------------------------------------------------------


def test_unknown_node_type() -> None:
    b = WorkflowBuilder().add_node("NoSuchType", "x", {})
    ps = problems(b)
    assert [(p.node, p.field, p.message) for p in ps] == [
        ("x", "", "unknown node type 'NoSuchType'")
    ]


def test_duplicate_node_id() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": 1})
    b.add_node("TConst", "c", {"value": 2})
    ps = problems(b)
    assert [(p.node, p.message) for p in ps] == [("c", "duplicate node id")]


def test_connection_to_unknown_nodes() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": 1})
    b.add_node("TAdd", "add", {"b": 1})
    b.add_connection("nope", "value", "add", "a")
    b.add_connection("c", "value", "missing", "a")
    ps = problems(b)
    assert triples(ps) == {("nope", ""), ("missing", "")}
    msgs = {p.node: p.message for p in ps}
    assert msgs["nope"] == "connection to add.a: unknown node"
    assert msgs["missing"] == "connection from c.value: unknown node"


def test_connection_to_unknown_output_and_input() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": 1})
    b.add_node("TAdd", "add", {"a": 1})
    b.add_connection("c", "nothing", "add", "b")
    b.add_connection("c", "value", "add", "zzz")
    ps = problems(b)
    assert [(p.node, p.field, p.message) for p in ps] == [
        ("c", "nothing", "unknown output (outputs: value)"),
        ("add", "zzz", "unknown parameter (parameters: a, b)"),
    ]


def test_cycle() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "start", {"value": 1})
    b.add_node("TAdd", "x", {})
    b.add_node("TAdd", "y", {})
    b.add_connection("x", "sum", "y", "a")
    b.add_connection("y", "sum", "x", "a")
    ps = problems(b)
    assert [(p.node, p.field, p.message) for p in ps] == [
        ("", "", "cycle: these nodes wait on each other: x, y")
    ]


def test_self_loop() -> None:
    b = WorkflowBuilder()
    b.add_node("TAdd", "x", {"b": 1})
    b.add_connection("x", "sum", "x", "a")
    ps = problems(b)
    assert ("x", "sum") in triples(ps)
    assert any(p.message == "a node cannot feed itself" for p in ps)


def test_required_param_that_nothing_supplies() -> None:
    b = WorkflowBuilder().add_node("TAdd", "add", {"b": 2})
    ps = problems(b)
    assert [(p.node, p.field, p.message) for p in ps] == [
        ("add", "a", "required parameter (int) is not supplied")
    ]


def test_type_mismatch_between_connection_ends() -> None:
    b = WorkflowBuilder()
    b.add_node("TText", "t", {"text": "x"})
    b.add_node("TAdd", "add", {})
    b.add_connection("t", "text", "add", "a")
    ps = problems(b)
    assert ("add", "a") in triples(ps)
    mismatch = next(p for p in ps if p.field == "a")
    assert mismatch.message == "type mismatch: t.text is str, parameter is int"


def test_int_output_may_feed_a_float_param() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": 2})
    b.add_node("TFloat", "f", {})
    b.add_connection("c", "value", "f", "x")
    assert run(b.build()) == {"c": {"value": 2}, "f": {"x": 2}}


def test_bool_output_may_not_feed_an_int_param() -> None:
    b = WorkflowBuilder()
    b.add_node("TFlag", "f", {"flag": True})
    b.add_node("TAdd", "add", {})
    b.add_connection("f", "flag", "add", "a")
    ps = problems(b)
    assert [p.message for p in ps if p.field == "a"] == [
        "type mismatch: f.flag is bool, parameter is int"
    ]


def test_param_set_twice() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c1", {"value": 1})
    b.add_node("TConst", "c2", {"value": 2})
    b.add_node("TAdd", "add", {"a": 5})
    b.add_connection("c1", "value", "add", "a")  # also set statically
    b.add_connection("c1", "value", "add", "b")
    b.add_connection("c2", "value", "add", "b")  # fed twice
    ps = problems(b)
    assert [(p.node, p.field, p.message) for p in ps] == [
        ("add", "a", "set in the node's params and by a connection"),
        ("add", "b", "fed by two connections (c1.value and c2.value)"),
    ]


def test_unknown_param() -> None:
    b = WorkflowBuilder().add_node("TConst", "c", {"value": 1, "colour": "red"})
    ps = problems(b)
    assert [(p.node, p.field, p.message) for p in ps] == [
        ("c", "colour", "unknown parameter (parameters: value)")
    ]


def test_bad_static_value_type() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": "12"})
    b.add_node("TFlag", "f", {"flag": 1})
    b.add_node("TConst", "d", {"value": True})
    ps = problems(b)
    assert [(p.node, p.field, p.message) for p in ps] == [
        ("c", "value", "expected int, got str '12'"),
        ("f", "flag", "expected bool, got int 1"),
        ("d", "value", "expected int, got bool True"),
    ]


def test_one_error_lists_every_problem_naming_node_and_param() -> None:
    b = WorkflowBuilder()
    b.add_input("unused", int)
    b.add_node("Nope", "n1", {})
    b.add_node("TConst", "dup", {"value": 1})
    b.add_node("TConst", "dup", {"value": 1})
    b.add_node("TAdd", "add", {"colour": 1})  # unknown param + a unsupplied
    b.add_node("TText", "t", {"text": 3})  # bad static type
    b.add_node("TAdd", "cy1", {})
    b.add_node("TAdd", "cy2", {})
    b.add_connection("cy1", "sum", "cy2", "a")
    b.add_connection("cy2", "sum", "cy1", "a")
    b.add_connection("ghost", "x", "add", "b")
    b.add_connection("dup", "nothing", "add", "b")
    b.add_connection("t", "text", "cy1", "b")  # type mismatch
    ps = problems(b)
    assert triples(ps) == {
        ("", "unused"),
        ("n1", ""),
        ("dup", ""),
        ("add", "colour"),
        ("add", "a"),
        ("t", "text"),
        ("cy1", "b"),
        ("ghost", ""),
        ("dup", "nothing"),
        ("", ""),
    }
    assert len(ps) == 10


def test_unsupported_declared_input_type() -> None:
    b = WorkflowBuilder()
    b.add_input("tags", set)
    b.add_node("TAnything", "a", {"value": "{{tags}}"})
    ps = problems(b)
    assert [(p.node, p.field, p.message) for p in ps] == [
        ("", "tags", "unsupported input type <class 'set'>")
    ]
