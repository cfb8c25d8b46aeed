"""`stored_json`: an execution's outputs converted, checked and encoded in one walk. It
gives exactly `to_jsonable` and `json.dumps` of it when DataFlow's value rule accepts the
document, and None (the caller takes the exact path, which says why) when it does not;
the record's row takes its text only while the record still holds that document."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import uuid
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow import JSON_MAX_DEPTH, storable_reason
from nexus_server._executions import _succeeded
from nexus_server._jsonable import stored_json, to_jsonable
from nexus_server._store import ExecutionRecord, _row


class Color(enum.Enum):
    RED = {"r": 255}


class Level(enum.IntEnum):
    HIGH = 3


def nested(depth: int) -> dict[str, Any]:
    """A document whose innermost dict is at `depth` (the document itself is 1)."""
    doc: dict[str, Any] = {}
    for _ in range(depth - 1):
        doc = {"a": doc}
    return doc


def exact(doc: Any) -> tuple[dict[str, Any], str] | None:
    """What the exact path decides: the converted document and its text, or None."""
    try:
        converted = to_jsonable(doc)
    except TypeError:
        return None
    if storable_reason(converted) is not None:
        return None
    return converted, json.dumps(converted)


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),  # NUL included
    st.datetimes(),
    st.dates(),
    st.binary(max_size=4),
    st.sampled_from([Color.RED, Level.HIGH, decimal.Decimal("1.5"), uuid.UUID(int=7)]),
)
documents = st.dictionaries(
    st.text(max_size=4),
    st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.tuples(children, children),
            st.dictionaries(st.text(max_size=4), children, max_size=3),
        ),
        max_leaves=20,
    ),
    max_size=5,
)


@settings(max_examples=400, deadline=None)
@given(documents)
def test_same_as_the_exact_path(doc: dict[str, Any]) -> None:
    got = stored_json(doc)
    want = exact(doc)
    if got is None:
        # refused: the exact path refuses too (or the text holds a literal \u0000)
        assert want is None or "\\\\u0000" in want[1]
    else:
        assert want is not None
        assert got[0] == want[0]
        assert got[1] == want[1]
        assert json.loads(got[1]) == json.loads(want[1])


def test_rows_of_records() -> None:
    rows = {
        "list": {
            "records": [
                {
                    "id": f"c{i}",
                    "name": f"contact {i}",
                    "score": i,
                    "big": 2**60,
                    "ratio": i / 3,
                    "created_at": dt.datetime(2026, 12, 5, 16, i, tzinfo=dt.UTC),
                    "naive": dt.datetime(2026, 12, 5, 16, i),
                    "company": None,
                }
                for i in range(10)
            ],
            "next_page_token": "abc",
        }
    }
    got = stored_json(rows)
    assert got is not None
    doc, text = got
    assert doc == to_jsonable(rows)
    assert text == json.dumps(to_jsonable(rows))
    assert doc["list"]["records"][0]["big"] == str(2**60)
    assert doc["list"]["records"][3]["created_at"] == "2026-12-05T16:03:00Z"
    assert doc["list"]["records"][3]["naive"] == "2026-12-05T16:03:00Z"


@pytest.mark.parametrize(
    "doc",
    [
        {"node": {"text": "a\x00b"}},
        {"node": {"a\x00": 1}},
        {"node": ["x", ["y\x00"]]},
        {"node": OrderedDict([("k", "\x00")])},
    ],
)
def test_nul_refused(doc: dict[str, Any]) -> None:
    assert stored_json(doc) is None
    assert storable_reason(to_jsonable(doc)) is not None


def test_literal_backslash_u0000_goes_to_the_exact_path() -> None:
    doc = {"node": {"text": "\\u0000"}}  # six characters, no NUL
    assert stored_json(doc) is None
    assert storable_reason(to_jsonable(doc)) is None  # which stores it


def test_depth_limit_as_the_value_rule() -> None:
    deepest = nested(JSON_MAX_DEPTH)
    assert storable_reason(deepest) is None
    assert stored_json(deepest) == (deepest, json.dumps(deepest))
    too_deep = nested(JSON_MAX_DEPTH + 1)
    assert storable_reason(too_deep) is not None
    assert stored_json(too_deep) is None
    # a list counts as a level, and so does a container made by to_jsonable (a tuple)
    assert stored_json({"a": [nested(JSON_MAX_DEPTH - 1)]}) is None
    assert stored_json({"a": (nested(JSON_MAX_DEPTH - 1),)}) is None
    assert stored_json({"a": (nested(JSON_MAX_DEPTH - 2),)}) is not None


def test_enum_with_a_container_value() -> None:
    got = stored_json({"n": {"color": Color.RED, "level": Level.HIGH}})
    assert got is not None
    assert got[0] == {"n": {"color": {"r": 255}, "level": 3}}
    assert json.loads(got[1]) == {"n": {"color": {"r": 255}, "level": 3}}


def test_not_json_refused() -> None:
    assert stored_json({"n": {"x": object()}}) is None
    assert stored_json({"n": {"x": {1, 2}}}) is None


def test_non_finite_floats_as_text() -> None:
    got = stored_json({"n": {"a": math.nan, "b": math.inf, "c": -math.inf}})
    assert got is not None
    assert got[0] == {"n": {"a": "NaN", "b": "Infinity", "c": "-Infinity"}}


def test_succeeded_reasons_unchanged() -> None:
    """The outcome of a workflow's results is the exact path's, reasons included."""
    state, outputs, error, encoded = _succeeded({"n": {"x": 1}})
    assert (state, outputs, error) == ("SUCCEEDED", {"n": {"x": 1}}, None)
    assert encoded == ({"n": {"x": 1}}, '{"n": {"x": 1}}')
    state, outputs, error, encoded = _succeeded({"n": {"x": "a\x00"}})
    assert state == "FAILED" and outputs is None and encoded is None
    assert error is not None and "cannot be stored" in error["message"]
    assert "NUL" in error["message"]
    state, outputs, error, encoded = _succeeded({"n": {"x": object()}})
    assert state == "FAILED" and encoded is None
    assert error is not None and "cannot be returned" in error["message"]
    # a literal \u0000 is stored, through the exact path
    state, outputs, error, encoded = _succeeded({"n": {"x": "\\u0000"}})
    assert (state, outputs, error, encoded) == ("SUCCEEDED", {"n": {"x": "\\u0000"}}, None, None)


def record(outputs: dict[str, Any] | None) -> ExecutionRecord:
    now = dt.datetime(2026, 12, 5, tzinfo=dt.UTC)
    return ExecutionRecord(
        id="e1",
        workflow="w",
        state="SUCCEEDED",
        caller="me",
        request_id=None,
        request_hash=None,
        inputs={},
        outputs=outputs,
        error=None,
        create_time=now,
        start_time=now,
        end_time=now,
    )


def driver(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict) else value


def test_row_takes_the_text_only_for_its_document() -> None:
    rec = record({"n": {"x": 1}})
    assert _row(rec, driver)[7] == '{"n": {"x": 1}}'
    rec.outputs_json = (rec.outputs or {}, "TEXT")
    assert _row(rec, driver)[7] == "TEXT"  # made together: not encoded again
    rec.outputs = {"n": {"x": 2}}  # replaced since: the text is stale and ignored
    assert _row(rec, driver)[7] == '{"n": {"x": 2}}'
    rec.outputs = None
    assert _row(rec, driver)[7] is None
