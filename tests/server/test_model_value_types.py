"""Every model field type through ModelService: the documented JSON encodings both ways,
and a wrong value of each type is RECORD_INVALID naming `record.<field>` (or QUERY_INVALID
naming the filter path), never an internal or database error. SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from dataflow import DataFlow
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_server import Nexus, Serving

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
Connect = Callable[[Serving], AbstractAsyncContextManager[grpc.aio.Channel]]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


class Tier(enum.Enum):
    FREE = "free"
    PRO = "pro"


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@pytest.fixture
async def ms(db_url: str, connect: Connect) -> AsyncIterator[Any]:
    db = DataFlow(db_url)

    @db.model
    class Thing:
        id: int
        text: str = ""
        count: int = 0
        ratio: float = 0.0
        flag: bool = False
        blob: bytes | None = None
        amount: decimal.Decimal = decimal.Decimal("0")
        at: dt.datetime | None = None
        day: dt.date | None = None
        uid: uuid.UUID | None = None
        tier: Tier = Tier.FREE
        meta: dict | None = None  # type: ignore[type-arg]
        tags: list | None = None  # type: ignore[type-arg]

    app = Nexus(grpc_port=0)
    app.integrate_dataflow(db)
    try:
        async with app.serving() as s, connect(s) as channel:
            yield mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    finally:
        await db.close()


async def test_every_type_round_trips(ms: Any) -> None:
    ref = str(uuid.uuid4())
    sent = {
        "text": "t",
        "count": str(2**60),  # int64 beyond 2^53 travels as text
        "ratio": 0.25,
        "flag": True,
        "blob": "AAE=",
        "amount": "12.50",
        "at": "2026-01-02T03:04:05Z",
        "day": "2026-01-02",
        "uid": ref,
        "tier": "pro",
        "meta": {"a": 1, "b": [True]},
        "tags": [1, "x"],
    }
    created = MessageToDict(
        await ms.CreateRecord(mpb.CreateRecordRequest(model="Thing", record=struct(**sent)))
    )
    assert {k: created[k] for k in sent} == sent
    assert isinstance(created["id"], float) and created["id"] >= 1
    got = await ms.GetRecord(mpb.GetRecordRequest(model="Thing", id=str(int(created["id"]))))
    assert MessageToDict(got) == created
    small = await ms.CreateRecord(
        mpb.CreateRecordRequest(model="Thing", record=struct(count=2**40))
    )
    assert small["count"] == 2**40  # a number while it is exact as a double
    found = await ms.ListRecords(
        mpb.ListRecordsRequest(
            model="Thing",
            filter=struct(uid=ref, amount={"$gte": "12.5"}, at={"$lt": "2027-01-01T00:00:00Z"}),
        )
    )
    assert [r["text"] for r in found.records] == ["t"]


WRONG_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"count": "12x"}, "record.count"),
    ({"count": "99999999999999999999999"}, "record.count"),
    ({"ratio": "abc"}, "record.ratio"),
    ({"flag": "yes"}, "record.flag"),
    ({"blob": "!!"}, "record.blob"),
    ({"amount": "abc"}, "record.amount"),
    ({"at": "yesterday"}, "record.at"),
    ({"day": "2026-13-45"}, "record.day"),
    ({"uid": "not-a-uuid"}, "record.uid"),
    ({"tier": "gold"}, "record.tier"),
    ({"meta": "x"}, "record.meta"),
    ({"tags": "x"}, "record.tags"),
    ({"text": [1]}, "record.text"),
    ({"id": "abc"}, "record.id"),
    ({"id": 1.5}, "record.id"),
]

WRONG_FILTERS: list[tuple[dict[str, Any], str]] = [
    ({"uid": "zz"}, "filter.uid"),
    ({"at": {"$gt": "x"}}, "filter.at.$gt"),
    ({"day": {"$lt": "nope"}}, "filter.day.$lt"),
    ({"count": {"$gt": "abc"}}, "filter.count.$gt"),
    ({"amount": {"$gt": "x"}}, "filter.amount.$gt"),
    ({"tier": "gold"}, "filter.tier"),
]


async def test_a_wrong_value_of_each_type(ms: Any, expect_error: ExpectError) -> None:
    for record, field in WRONG_VALUES:
        await expect_error(
            ms.CreateRecord(mpb.CreateRecordRequest(model="Thing", record=struct(**record))),
            INVALID,
            "RECORD_INVALID",
            fields=[field],
        )
    assert (await ms.CountRecords(mpb.CountRecordsRequest(model="Thing"))).count == 0


async def test_a_wrong_filter_value_of_each_type(ms: Any, expect_error: ExpectError) -> None:
    for flt, field in WRONG_FILTERS:
        await expect_error(
            ms.ListRecords(mpb.ListRecordsRequest(model="Thing", filter=struct(**flt))),
            INVALID,
            "QUERY_INVALID",
            fields=[field],
        )


async def test_a_key_of_the_wrong_type(ms: Any, expect_error: ExpectError) -> None:
    for bad in ("abc", "99999999999999999999999"):
        await expect_error(
            ms.GetRecord(mpb.GetRecordRequest(model="Thing", id=bad)),
            INVALID,
            "RECORD_INVALID",
            fields=["id"],
        )
