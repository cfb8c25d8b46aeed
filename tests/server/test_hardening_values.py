"""Hardening of record values on the server (issue 14): typed Timestamps outside what a
datetime holds are RECORD_INVALID naming the field, and a record that already holds NaN or
an infinity (written before such values were refused: inserted here with raw SQL) reads
back on every channel: generic (Struct: the strings "NaN", "Infinity", "-Infinity"),
typed (the double itself, which proto3 JSON prints as "NaN"...), and the CLI's JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict, MessageToJson

from dataflow import DataFlow
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_server import Nexus, Serving

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
ROOT = Path(__file__).resolve().parents[2]


def declare(db: DataFlow) -> None:
    @db.model
    class Reading:
        """A measurement."""

        id: str
        label: str = ""
        value: float = 0.0
        amount: decimal.Decimal = decimal.Decimal("0")
        taken_at: dt.datetime | None = None
        meta: dict | None = None  # type: ignore[type-arg]


@pytest.fixture
async def served(
    make_app: Callable[..., Nexus],
    connect: Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]],
) -> AsyncIterator[tuple[Nexus, Serving, grpc.aio.Channel]]:
    app = make_app(models=False)
    assert app.db is not None
    declare(app.db)
    async with asyncio.timeout(WAIT):
        cm = app.serving()
        info = await cm.__aenter__()
    try:
        async with connect(info) as channel:
            yield app, info, channel
    finally:
        async with asyncio.timeout(WAIT):
            await cm.__aexit__(None, None, None)


def _typed_call(channel: grpc.aio.Channel, serving: Serving, method: str, reply: str) -> Any:
    cls = serving.typed.message_class(reply)
    return channel.unary_unary(
        f"/nexus.models.v1.ReadingService/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=cls.FromString,
    )


# --- Timestamps ---------------------------------------------------------------------------

BAD_TIMES = [
    pytest.param(-62135596801, 0, id="before-0001"),
    pytest.param(253402300800, 0, id="after-9999"),
    pytest.param(0, -1, id="negative-nanos"),
    pytest.param(0, 1_000_000_000, id="nanos-too-big"),
]


@pytest.mark.parametrize(("seconds", "nanos"), BAD_TIMES)
async def test_a_timestamp_out_of_range_is_record_invalid(
    served: Any, expect_error: Any, seconds: int, nanos: int
) -> None:
    _, serving, channel = served
    create = _typed_call(channel, serving, "CreateReading", "Reading")
    req = serving.typed.message_class("CreateReadingRequest")()
    req.reading.label = "x"  # type: ignore[attr-defined]
    req.reading.taken_at.seconds = seconds  # type: ignore[attr-defined]
    req.reading.taken_at.nanos = nanos  # type: ignore[attr-defined]
    _, violations = await expect_error(
        create(req), grpc.StatusCode.INVALID_ARGUMENT, "RECORD_INVALID", fields=["reading.taken_at"]
    )
    assert "0001-01-01" in violations[0][1]

    bulk = serving.typed.message_class("BulkCreateReadingsRequest")()
    bulk.readings.add(label="ok")  # type: ignore[attr-defined]
    bad = bulk.readings.add(label="bad")  # type: ignore[attr-defined]
    bad.taken_at.seconds, bad.taken_at.nanos = seconds, nanos
    await expect_error(
        _typed_call(channel, serving, "BulkCreateReadings", "BulkWriteResult")(bulk),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RECORD_INVALID",
        fields=["readings[1].taken_at"],
    )

    upd = serving.typed.message_class("UpdateReadingRequest")()
    upd.reading.id = "r1"  # type: ignore[attr-defined]
    upd.reading.taken_at.seconds, upd.reading.taken_at.nanos = seconds, nanos  # type: ignore[attr-defined]
    await expect_error(
        _typed_call(channel, serving, "UpdateReading", "Reading")(upd),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RECORD_INVALID",
        fields=["reading.taken_at"],
    )
    count = await mgrpc.ModelServiceStub(channel).CountRecords(  # type: ignore[no-untyped-call]
        mpb.CountRecordsRequest(model="Reading"), timeout=WAIT
    )
    assert count.count == 0


async def test_timestamps_at_the_limits_are_accepted(served: Any) -> None:
    _, serving, channel = served
    create = _typed_call(channel, serving, "CreateReading", "Reading")
    for seconds, nanos in ((-62135596800, 0), (253402300799, 999_999_000)):
        req = serving.typed.message_class("CreateReadingRequest")()
        req.reading.taken_at.seconds = seconds  # type: ignore[attr-defined]
        req.reading.taken_at.nanos = nanos  # type: ignore[attr-defined]
        rec = await create(req, timeout=WAIT)
        assert (rec.taken_at.seconds, rec.taken_at.nanos) == (seconds, nanos)


# --- NaN and infinities already stored ----------------------------------------------------

pg = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


async def _poison(db_url: str, backend: str, table: str) -> dict[str, Any]:
    """Write NaN / infinities into stored records with raw SQL (as an older server
    could); returns what each record's `value` and `amount` now hold, by id."""
    if backend == "sqlite":
        path = db_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as conn:
            # SQLite stores a NaN REAL as NULL: only infinities survive in a float column
            conn.execute(f"UPDATE {table} SET value = 9e999, amount = 'NaN' WHERE id = 'a'")
            conn.execute(
                f"UPDATE {table} SET value = -9e999, amount = 'sNaN', "
                """meta = '{"x": NaN, "y": [Infinity]}' WHERE id = 'b'"""
            )
            conn.commit()
        return {
            "a": ("Infinity", "NaN", {}),
            "b": ("-Infinity", "sNaN", {"x": "NaN", "y": ["Infinity"]}),
        }
    conn = await asyncpg.connect(db_url, timeout=5)
    try:
        await conn.execute(
            f"UPDATE {table} SET value = 'NaN'::float8, amount = 'NaN'::numeric WHERE id = 'a'"
        )
        await conn.execute(f"UPDATE {table} SET value = '-Infinity'::float8 WHERE id = 'b'")
    finally:
        await conn.close()
    return {"a": ("NaN", "NaN", {}), "b": ("-Infinity", "0", {})}


@pg
async def test_records_holding_nan_or_infinity_read_back_on_every_channel(
    served: Any, db_url: str, backend: str
) -> None:
    app, serving, channel = served
    ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    for rid in ("a", "b"):
        await ms.CreateRecord(
            mpb.CreateRecordRequest(model="Reading", record=_struct(id=rid, label=rid)),
            timeout=WAIT,
        )
    table = app.db.models[0].table
    expected = await _poison(db_url, backend, table)

    # generic: the Struct carries the strings; its proto3 JSON (REST, CLI) prints
    for rid, (value, amount, meta) in expected.items():
        rec = await ms.GetRecord(mpb.GetRecordRequest(model="Reading", id=rid), timeout=WAIT)
        doc = json.loads(MessageToJson(rec))
        assert (doc["value"], doc["amount"]) == (value, amount)
        if meta:
            assert doc["meta"] == meta
    listed = await ms.ListRecords(
        mpb.ListRecordsRequest(model="Reading", order_by="id"), timeout=WAIT
    )
    docs = MessageToDict(listed)["records"]
    assert [(d["id"], d["value"]) for d in docs] == [(k, v[0]) for k, v in expected.items()]

    # typed: the double itself; proto3 JSON prints it as "NaN" / "-Infinity"
    get = _typed_call(channel, serving, "GetReading", "Reading")
    for rid, (value, amount, meta) in expected.items():
        req = serving.typed.message_class("GetReadingRequest")(id=rid)
        rec = await get(req, timeout=WAIT)
        assert MessageToDict(rec)["value"] == value
        assert rec.amount == amount
        if meta:
            assert MessageToDict(rec)["meta"] == meta
    listing = _typed_call(channel, serving, "ListReadings", "ListReadingsResponse")
    page = await listing(
        serving.typed.message_class("ListReadingsRequest")(order_by="id"), timeout=WAIT
    )
    assert [MessageToDict(r)["value"] for r in page.readings] == [v[0] for v in expected.values()]

    # the CLI prints the record as JSON (a subprocess, so the loop keeps serving)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_SERVER=serving.address, PYTHONPATH=str(ROOT), COLUMNS="200")
    for output in ("json", "table"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.cli", "-o", output, "readings", "get", "a",
            env=env, cwd=str(ROOT),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert "Traceback" not in err.decode()
        if output == "json":
            assert json.loads(out)["value"] == expected["a"][0]
        else:
            assert expected["a"][0] in out.decode()


def _struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s
