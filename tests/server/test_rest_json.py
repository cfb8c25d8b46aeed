"""The REST twins print a typed record alike on both paths: the read routes print
DataFlow's records straight to JSON (`record_json`), the write routes their reply message
read back into fields (`rest_body` of `record_to_message`). Every field is printed, a null
one as null, and only the projected fields with `fields` (docs/api.md, "One JSON
document"). Seeded and bounded: 300 generated records, plus the edge cases listed."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import enum
import json
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from dataflow import DataFlow, ModelInfo
from nexus_server._typed import (
    TypedModels,
    json_body,
    record_json,
    record_to_message,
    rest_body,
)


class Tier(enum.Enum):
    FREE = "free"
    PRO = "pro"


@pytest.fixture(scope="module")
def model() -> Iterator[ModelInfo]:
    db = DataFlow("sqlite:///:memory:")

    @db.model
    class JContact:
        id: str
        name: str | None
        score: int | None
        ratio: float | None
        active: bool | None
        balance: decimal.Decimal | None
        born: dt.date | None
        seen: dt.datetime | None
        ref: uuid.UUID | None
        tier: Tier | None
        meta: dict[str, Any] | None
        tags: list[Any] | None
        avatar: bytes | None

    yield db.model_info("JContact")
    asyncio.run(db.close())


def _both(model: ModelInfo, record: dict[str, Any]) -> None:
    typed = TypedModels([model])
    msg = record_to_message(model, record, typed.message_class(model.name))
    want = json.loads(rest_body(model, msg).data)
    got = json.loads(json_body(record_json(model)(record, ())).data)
    # the same document, fields in the same order (a Struct's keys have no order)
    assert got == want
    assert list(got) == list(want)
    assert list(got) == [f.name for f in model.fields]  # every field, in order


PLUS_5 = dt.timezone(dt.timedelta(hours=5))
EDGES: list[dict[str, Any]] = [
    {"id": "a"},  # every other field null
    {"id": "b", "score": 2**63 - 1, "ratio": 5.0, "meta": {"n": 2**63 - 1, "x": 1.0}},
    {"id": "c", "ratio": math.nan, "tags": [1, 2.5, None, "s", {"k": math.inf}]},
    {"id": "d", "ratio": -math.inf, "tags": [-(2**60)], "avatar": b"\x00\xffbin"},
    {"id": "e", "seen": dt.datetime(2026, 1, 2, 3, 4, 5), "tier": Tier.PRO},
    {"id": "f", "seen": dt.datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=dt.UTC)},
    {"id": "g", "seen": dt.datetime(1, 1, 1, 0, 0, 0, 123456), "tier": "free"},
    {
        "id": "h",
        "seen": dt.datetime(2026, 6, 1, 12, 0, 0, 123000, tzinfo=PLUS_5),
        "balance": decimal.Decimal("-12.3400"),
        "born": dt.date(1815, 12, 10),
        "ref": uuid.UUID(int=7),
        "active": False,
        "score": 0,
        "name": 'Ädä \u2028 "quoted"',
    },
]


@pytest.mark.parametrize("record", EDGES, ids=[r["id"] for r in EDGES])
def test_edge_records_print_alike(model: ModelInfo, record: dict[str, Any]) -> None:
    _both(model, record)


def test_empty_containers_are_printed_as_such(model: ModelInfo) -> None:
    _both(model, {"id": "e", "meta": {}, "tags": []})
    doc = record_json(model)({"id": "e", "meta": {}, "tags": []}, ())
    assert doc["meta"] == {} and doc["tags"] == []


def test_a_projection_prints_the_projected_fields_only(model: ModelInfo) -> None:
    doc = record_json(model)({"id": "p", "name": "x"}, ("name", "ratio"))
    assert doc == {"id": "p", "name": "x", "ratio": None}


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@seed(20261205)
@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    name=st.none() | st.text(),
    score=st.none() | st.integers(-(2**63), 2**63 - 1),
    ratio=st.none() | st.floats(),
    seen=st.none() | st.datetimes(),
    meta=st.none() | st.dictionaries(st.text(), _json_values, max_size=3),
    tags=st.none() | st.lists(_json_values, max_size=3),
    avatar=st.none() | st.binary(max_size=16),
)
def test_generated_records_print_alike(model: ModelInfo, **fields: Any) -> None:
    _both(model, {"id": "g", **fields})
