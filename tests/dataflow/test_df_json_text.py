"""JSON documents as the driver stores them (`driver_value` for dicts and lists): the text
is exactly what `json.dumps` writes with its defaults, errors included, although the
encoder is built once instead of on every call."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow._fastpath import _json_in, _sqlite_dt_in, driver_value

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_the_text_is_what_json_dumps_writes(value: Any) -> None:
    assert _json_in(value) == json.dumps(value)


@pytest.mark.parametrize("sqlite", [True, False])
def test_driver_value_writes_dicts_and_lists_as_json_dumps_does(sqlite: bool) -> None:
    doc = {"é": [1, 2.5, None, True], "k": {"nested": 'quote " and \\ backslash'}}
    assert driver_value(doc, sqlite) == json.dumps(doc)
    assert driver_value([doc], sqlite) == json.dumps([doc])
    assert driver_value({}, sqlite) == "{}"


def test_non_str_keys_are_written_as_json_dumps_writes_them() -> None:
    doc = {1: "a", 2.5: "b", False: "c", None: "d"}
    assert _json_in(doc) == json.dumps(doc)


def test_a_circular_document_is_refused_as_json_dumps_refuses_it() -> None:
    doc: dict[str, Any] = {}
    doc["self"] = doc
    with pytest.raises(ValueError, match="Circular reference detected"):
        _json_in(doc)
    # and the encoder is still usable afterwards
    assert _json_in({"a": 1}) == '{"a": 1}'


def test_a_value_json_cannot_write_is_refused_with_json_dumps_error() -> None:
    with pytest.raises(TypeError, match="Object of type object is not JSON serializable"):
        _json_in({"x": object()})
    assert _json_in([1]) == "[1]"


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC),
        dt.datetime(2026, 1, 2, 3, 4, 5, 6),
        dt.datetime(2026, 1, 2, 5, 4, 5, 6, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    ],
)
def test_sqlite_datetimes_are_utc_text_with_microseconds(value: dt.datetime) -> None:
    expected = "2026-01-02 03:04:05." + ("000006" if value.microsecond else "000000")
    assert _sqlite_dt_in(value) == expected
