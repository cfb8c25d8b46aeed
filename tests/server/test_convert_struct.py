"""Filling a protobuf Struct from a JSON document (`fill_struct`, `to_struct`) gives
exactly what `Struct.update` gives, and refuses what is not JSON; `to_jsonable` makes
the JSON documents they take (exact ints as numbers, others as text, bool kept, str keys,
tuples as lists, subclasses of the JSON types converted like their base types)."""

from __future__ import annotations

import enum
import json
import types
from typing import Any

import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_server._convert import fill_struct, to_struct
from nexus_server._jsonable import to_jsonable

EXACT = 2**53


def updated(doc: dict[str, Any]) -> struct_pb2.Struct:
    """What the protobuf runtime's own `Struct.update` makes of `doc`."""
    s = struct_pb2.Struct()
    s.update(doc)
    return s


def filled(doc: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    fill_struct(s, doc)
    return s


def assert_same_struct(got: struct_pb2.Struct, want: struct_pb2.Struct) -> None:
    assert got == want
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {"leaf": [1, {}, []]}
    for i in range(depth):  # a dict in a list in a dict ...
        doc = {f"level{i}": [doc, i], "sibling": {}}
    return doc


DOCUMENTS: list[dict[str, Any]] = [
    {},
    {"s": "text", "t": True, "f": False, "zero": 0, "i": -7, "x": 2.5, "null": None},
    {"empty_dict": {}, "empty_list": [], "empty_str": ""},
    {"a": {"b": {"c": {}}}, "l": [[], [[]], [{}], [{"k": []}]], "d": {"e": [[], {}]}},
    {"unicode": "héllo ✓ 日本 🎉 \u0000 \n", "ключ": "значение", "": "the empty key"},
    {"max": EXACT, "min": -EXACT, "whole": 3.0, "neg_zero": -0.0},
    {"tiny": 5e-324, "huge": 1.7976931348623157e308, "third": 1 / 3, "neg": -1e-300},
    {"mixed": [1, "a", None, True, 2.5, {"k": [None, False]}, [], {}]},
    {"bools": [True, False, True], "ints": [0, 1, 2], "nulls": [None, None]},
    nested(20),
]


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_fill_struct_makes_what_struct_update_makes(doc: dict[str, Any]) -> None:
    assert_same_struct(filled(doc), updated(doc))


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_to_struct_makes_what_struct_update_makes(doc: dict[str, Any]) -> None:
    assert_same_struct(to_struct(doc), updated(doc))


def test_empty_containers_stay_containers_and_bools_stay_bools() -> None:
    s = filled({"d": {}, "l": [], "t": True, "one": 1, "n": None, "in": [{}, []]})
    kinds = {k: v.WhichOneof("kind") for k, v in s.fields.items()}
    assert kinds == {
        "d": "struct_value",
        "l": "list_value",
        "t": "bool_value",
        "one": "number_value",
        "n": "null_value",
        "in": "list_value",
    }
    assert [v.WhichOneof("kind") for v in s.fields["in"].list_value.values] == [
        "struct_value",
        "list_value",
    ]


def test_fill_struct_fills_the_struct_it_is_given() -> None:
    outer = struct_pb2.Value()
    fill_struct(outer.struct_value, {"a": [1, "b"]})  # a Struct inside another message
    assert outer.WhichOneof("kind") == "struct_value"
    assert_same_struct(outer.struct_value, updated({"a": [1, "b"]}))


def test_to_struct_converts_the_value_first() -> None:
    doc = {"big": 2**64, "tuple": (1, (2, 3)), "keys": {1: "one"}}
    assert_same_struct(
        to_struct(doc), updated({"big": str(2**64), "tuple": [1, [2, 3]], "keys": {"1": "one"}})
    )


@pytest.mark.parametrize(
    "doc",
    [
        {"set": {1, 2}},
        {"bytes": b"\x00\x01"},
        {"in_list": [1, {"deeper": [b"x"]}]},
        {"in_dict": {"ok": 1, "object": object()}},
    ],
    ids=["set", "bytes", "in-a-list", "in-a-dict"],
)
def test_fill_struct_refuses_values_that_are_not_json(doc: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="is not a JSON value"):
        fill_struct(struct_pb2.Struct(), doc)


# -- the same, for any JSON document ---------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-EXACT, max_value=EXACT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)
JSON_DOCUMENTS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=6)


@settings(max_examples=200, deadline=None, database=None)
@given(JSON_DOCUMENTS)
def test_fill_struct_makes_what_struct_update_makes_for_any_json_document(
    doc: dict[str, Any],
) -> None:
    assert_same_struct(filled(doc), updated(doc))
    assert_same_struct(to_struct(doc), updated(doc))


# -- to_jsonable -----------------------------------------------------------------------


class Level(enum.IntEnum):
    LOW = 1
    HUGE = 2**60


class Tier(enum.StrEnum):
    FREE = "free"


class Name(str):
    pass


class Ratio(float):
    pass


class Count(int):
    pass


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (EXACT, EXACT),
        (-EXACT, -EXACT),
        (EXACT + 1, "9007199254740993"),
        (-EXACT - 1, "-9007199254740993"),
        (2**64, "18446744073709551616"),
        ({"n": [EXACT + 1, EXACT]}, {"n": ["9007199254740993", EXACT]}),
    ],
)
def test_ints_a_double_cannot_hold_become_text(value: Any, want: Any) -> None:
    got = to_jsonable(value)
    assert got == want
    assert json.dumps(got) == json.dumps(want)


def test_bools_stay_bools() -> None:
    got = to_jsonable({"t": True, "f": False, "in": [True, (False,)]})
    assert got == {"t": True, "f": False, "in": [True, [False]]}
    assert type(got["t"]) is bool and type(got["f"]) is bool
    assert [type(v) for v in got["in"]] == [bool, list] and type(got["in"][1][0]) is bool
    assert json.dumps(got) == '{"t": true, "f": false, "in": [true, [false]]}'


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Level.LOW, "1"),
        (Level.HUGE, '"1152921504606846976"'),  # beyond 2**53: text, as a plain int
        (Count(5), "5"),
        (Tier.FREE, '"free"'),
        (Name("ada"), '"ada"'),
        (Ratio(0.5), "0.5"),
    ],
    ids=["int-enum", "int-enum-huge", "int-subclass", "str-enum", "str-subclass", "float-sub"],
)
def test_subclasses_of_json_types_convert_like_their_base_type(value: Any, text: str) -> None:
    got = to_jsonable({"v": value, "in": [value]})
    assert json.dumps(got) == f'{{"v": {text}, "in": [{text}]}}'
    assert got["v"] == json.loads(text)


def test_keys_become_text() -> None:
    doc = {1: "int", "s": "str", Name("n"): "str subclass", Tier.FREE: "str enum"}
    got = to_jsonable(doc)
    assert got == {"1": "int", "s": "str", "n": "str subclass", "free": "str enum"}
    assert all(type(k) is str for k in got)
    proxy = to_jsonable(types.MappingProxyType({2: {3: "x"}}))  # any Mapping
    assert proxy == {"2": {"3": "x"}}


def test_tuples_become_lists() -> None:
    got = to_jsonable({"t": (1, (2, ("three",)), [(), {"u": (None,)}])})
    assert got == {"t": [1, [2, ["three"]], [[], {"u": [None]}]]}
    assert type(got["t"]) is list and type(got["t"][1][1]) is list
    assert to_jsonable(()) == []


@pytest.mark.parametrize(
    "value",
    [Level.LOW, Count(5), Tier.FREE, Name("ada"), Ratio(0.5)],
    ids=["int-enum", "int-subclass", "str-enum", "str-subclass", "float-subclass"],
)
def test_to_struct_accepts_subclasses_of_json_types(value: Any) -> None:
    plain = json.loads(json.dumps(to_jsonable({"v": value, "in": [value]})))
    assert_same_struct(to_struct({"v": value, "in": [value]}), updated(plain))
