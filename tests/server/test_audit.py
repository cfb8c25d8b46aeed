"""The audit trail on both databases: its log lines, its table (write-behind, bounded
while the database is down, flushed at close), its listing, and AuditService over a real
grpc.aio server."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from dataflow import DataFlow, ValidationError
from nexus_api.nexus.audit.v1 import audit_service_pb2 as apb
from nexus_api.nexus.audit.v1 import audit_service_pb2_grpc as agrpc
from nexus_server.gateway._audit import AUDIT, AuditEntry, AuditTrail
from nexus_server.gateway._audit_service import AuditServicer

WAIT = 10.0
BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
T0 = dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)


def entry(
    i: int = 0,
    *,
    principal: str = "key:ada",
    code: str = "OK",
    reason: str = "",
    tenant: str | None = "t1",
    **changes: Any,
) -> AuditEntry:
    """The i-th entry of a test: one second after the (i-1)-th."""
    values: dict[str, Any] = {
        "time": T0 + dt.timedelta(seconds=i),
        "principal": principal,
        "tenant": tenant,
        "channel": "grpc",
        "method": "/nexus.model.v1.ModelService/DeleteRecord",
        "resource": f"model:Contact:{i}",
        "request_id": f"r-{i}",
        "code": code,
        "reason": reason,
    }
    values.update(changes)
    return AuditEntry(**values)


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        json.loads(r.getMessage())
        for r in caplog.records
        if r.name == "nexus.audit" and r.levelno == logging.INFO
    ]


def dropped_reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and "not stored in the audit table" in r.getMessage()
    ]


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The trail's errors about inserts that failed."""
    return [
        r
        for r in caplog.records
        if r.name == "nexus_server" and r.getMessage().startswith("storing ")
    ]


class _Failed(logging.Handler):
    """Sets `is_set()` once the trail logs a failed insert (`await wait()` for it)."""

    def __init__(self) -> None:
        super().__init__()
        self._event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("storing "):
            self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


async def rows(db: DataFlow) -> list[dict[str, Any]]:
    async with db.connection() as conn:
        found = (await conn.execute(AUDIT.select().order_by(AUDIT.c.id))).mappings().all()
    return [dict(r) for r in found]


async def count(db: DataFlow) -> int:
    async with db.connection() as conn:
        found = await conn.execute(sa.select(sa.func.count()).select_from(AUDIT))
        return int(found.scalar_one())


async def drop_table(db: DataFlow) -> None:
    def drop(conn: sa.Connection) -> None:
        AUDIT.drop(conn)

    await db.run_sync(drop)


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[DataFlow]:
    database = DataFlow(db_url)
    await database.initialize()
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def trail(db: DataFlow) -> AsyncIterator[AuditTrail]:
    audit = AuditTrail(db, table=True, retry_delay=0.02)
    await audit.initialize()
    try:
        yield audit
    finally:
        await audit.close()


# --- log lines -----------------------------------------------------------------------


async def test_every_entry_is_one_json_log_line_without_a_table(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="nexus.audit")
    audit = AuditTrail(None, table=False)
    await audit.initialize()
    audit.record(entry(0, code="PERMISSION_DENIED", reason="PERMISSION_DENIED", tenant=None))
    audit.record(entry(1, principal="", channel="rest"))
    (first, second) = audit_lines(caplog)
    assert first == {
        "audit": True,
        "time": "2026-01-02T03:04:05.123456+00:00",
        "principal": "key:ada",
        "tenant": None,
        "channel": "grpc",
        "method": "/nexus.model.v1.ModelService/DeleteRecord",
        "resource": "model:Contact:0",
        "request_id": "r-0",
        "code": "PERMISSION_DENIED",
        "reason": "PERMISSION_DENIED",
    }
    assert second["principal"] == "" and second["channel"] == "rest"
    assert second["tenant"] == "t1"
    assert audit.pending == 0  # nothing is queued without a table
    await audit.close()


async def test_values_are_bounded_and_storable_before_they_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="nexus.audit")
    audit = AuditTrail(None, table=False)
    naive = dt.datetime(2026, 5, 6, 7, 8, 9)
    audit.record(
        entry(
            time=naive,
            principal="p" * 10_000,
            resource="model:\x00Contact",
            request_id="r" * 500,
            method="/m\udcff",
        )
    )
    (line,) = audit_lines(caplog)
    assert line["time"] == "2026-05-06T07:08:09.000000+00:00"  # naive is taken as UTC
    assert len(line["principal"]) == 256 and line["principal"].endswith("...")
    assert len(line["request_id"]) == 128
    assert line["resource"] == "model:\ufffdContact"
    assert line["method"] == "/m?"


def test_the_table_needs_a_database() -> None:
    with pytest.raises(ValueError, match="needs a database"):
        AuditTrail(None, table=True)


# --- the table -----------------------------------------------------------------------


@BACKENDS
async def test_entries_are_rows_after_flush_with_an_index_by_principal(
    db: DataFlow, trail: AuditTrail, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nexus.audit")
    trail.record(entry(0))
    trail.record(entry(1, tenant=None, code="UNAUTHENTICATED", reason="CREDENTIALS_EXPIRED"))
    trail.record(entry(2, principal="x" * 300, resource="r" * 1000))
    assert len(audit_lines(caplog)) == 3  # logged at once, stored behind
    async with asyncio.timeout(WAIT):
        await trail.flush()
    assert trail.pending == 0
    stored = await rows(db)
    assert [r["resource"][:16] for r in stored] == [
        "model:Contact:0",
        "model:Contact:1",
        "r" * 16,
    ]
    first, second, third = stored
    assert first["time"].astimezone(dt.UTC) == T0
    assert {k: v for k, v in first.items() if k not in ("id", "time")} == {
        "principal": "key:ada",
        "tenant": "t1",
        "channel": "grpc",
        "method": "/nexus.model.v1.ModelService/DeleteRecord",
        "resource": "model:Contact:0",
        "request_id": "r-0",
        "code": "OK",
        "reason": "",
    }
    assert second["tenant"] is None and second["reason"] == "CREDENTIALS_EXPIRED"
    assert len(third["principal"]) == 256 and len(third["resource"]) == 256
    assert len({r["id"] for r in stored}) == 3

    def index_names(conn: sa.Connection) -> set[str]:
        return {str(ix["name"]) for ix in sa.inspect(conn).get_indexes(AUDIT.name)}

    assert "ix_nexus_audit_principal_id" in await db.run_sync(index_names)


@BACKENDS
async def test_initialize_twice_keeps_the_rows(db: DataFlow, trail: AuditTrail) -> None:
    trail.record(entry(0))
    await trail.flush()
    again = AuditTrail(db, table=True)
    await again.initialize()
    await again.close()
    assert await count(db) == 1


@BACKENDS
async def test_listing_is_newest_first_in_pages_with_filters(
    db: DataFlow, trail: AuditTrail
) -> None:
    for i in range(9):
        failed = i % 3 == 0
        trail.record(
            entry(
                i,
                principal="key:bob" if i % 2 else "key:ada",
                code="PERMISSION_DENIED" if failed else "OK",
                reason="PERMISSION_DENIED" if failed else "",
            )
        )
    await trail.flush()

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page, token = await trail.list(4, token)
        pages += 1
        assert len(page) <= 4
        seen += [r.entry.request_id for r in page]
        if not token:
            break
    assert pages == 3
    assert seen == [f"r-{i}" for i in reversed(range(9))]
    ids = [r.id for r in (await trail.list(100))[0]]
    assert ids == sorted(ids, reverse=True)

    bob, token = await trail.list(2, principal="key:bob")
    rest, last = await trail.list(2, token, principal="key:bob")
    assert [r.entry.request_id for r in bob + rest] == ["r-7", "r-5", "r-3", "r-1"]
    assert last == ""

    refused, _ = await trail.list(10, failed_only=True)
    assert [r.entry.request_id for r in refused] == ["r-6", "r-3", "r-0"]
    assert all(r.entry.code != "OK" for r in refused)
    both, _ = await trail.list(10, principal="key:ada", failed_only=True)
    assert [r.entry.request_id for r in both] == ["r-6", "r-0"]
    assert await trail.list(10, principal="key:nobody") == ([], "")

    # a token is bound to its filters, and only this database's tokens are accepted
    _, ada_token = await trail.list(1, principal="key:ada")
    with pytest.raises(ValidationError) as bad_token:
        await trail.list(1, ada_token, principal="key:bob")
    assert bad_token.value.field == "page_token"
    with pytest.raises(ValidationError):
        await trail.list(1, ada_token, principal="key:ada", failed_only=True)
    with pytest.raises(ValidationError):
        await trail.list(1, "not-a-token")


async def test_listing_without_the_table_is_refused() -> None:
    with pytest.raises(RuntimeError, match="not enabled"):
        await AuditTrail(None, table=False).list(10)


@BACKENDS
async def test_a_burst_is_written_behind_in_batches_with_bounded_memory(
    db: DataFlow, trail: AuditTrail, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    batches: list[int] = []
    executemany = db.executemany

    async def counted(sql: str, rows: Any) -> None:
        batches.append(len(rows))
        await executemany(sql, rows)

    db.executemany = counted  # type: ignore[method-assign]
    highest = 0
    for chunk in range(50):
        for i in range(100):
            trail.record(entry(chunk * 100 + i))
        highest = max(highest, trail.pending)
        await asyncio.sleep(0)  # the calls' handlers yield between calls
    assert highest <= 10_000
    async with asyncio.timeout(30):
        await trail.flush()
    assert trail.pending == 0
    assert await count(db) == 5_000
    assert sum(batches) == 5_000 and max(batches) <= 500
    assert len(batches) <= 100  # many entries per transaction, not one each
    assert not dropped_reports(caplog)
    page, _ = await trail.list(3)
    assert [r.entry.request_id for r in page] == ["r-4999", "r-4998", "r-4997"]


@BACKENDS
async def test_while_the_database_refuses_the_queue_is_bounded_and_drops_are_reported_once(
    db: DataFlow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    trail = AuditTrail(db, table=True, max_queue=10, retry_delay=0.02)
    await trail.initialize()
    failed = _Failed()
    logging.getLogger("nexus_server").addHandler(failed)
    try:
        await drop_table(db)  # every insert fails until the table is back
        for i in range(100):
            trail.record(entry(i))
        assert trail.pending == 10
        # the writer fails and retries; nothing it does blocks new records
        async with asyncio.timeout(WAIT):
            await failed.wait()
        for _ in range(3):
            trail.record(entry(100))
            await asyncio.sleep(0)
        assert trail.pending == 10
        assert not dropped_reports(caplog)  # the burst is not over yet
        assert len(audit_lines(caplog)) == 103  # every entry was logged all the same
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(trail.flush(), 0.1)

        await trail.initialize()  # the table is back
        async with asyncio.timeout(WAIT):
            await trail.flush()
        assert [r["request_id"] for r in await rows(db)] == [f"r-{i}" for i in range(10)]
        (report,) = dropped_reports(caplog)
        assert report.startswith("93 audit entries were not stored")
        assert len(failures(caplog)) == 1  # one error per outage, not one per retry
        assert any(r.getMessage() == "audit entries are stored again" for r in caplog.records)

        trail.record(entry(200))
        await trail.flush()
        assert len(dropped_reports(caplog)) == 1
        assert await count(db) == 11
    finally:
        logging.getLogger("nexus_server").removeHandler(failed)
        await trail.close()


@BACKENDS
async def test_close_flushes_and_later_entries_are_only_logged(
    db: DataFlow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nexus.audit")
    trail = AuditTrail(db, table=True, linger=5.0)  # only close makes it write
    await trail.initialize()
    for i in range(20):
        trail.record(entry(i))
    async with asyncio.timeout(WAIT):
        await trail.close()
    assert await count(db) == 20
    trail.record(entry(21))
    assert trail.pending == 0
    assert len(audit_lines(caplog)) == 21
    await trail.close()  # twice is harmless


@BACKENDS
async def test_close_gives_up_after_its_timeout_saying_how_many_were_lost(
    db: DataFlow, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    trail = AuditTrail(db, table=True, retry_delay=0.02)
    await trail.initialize()
    await drop_table(db)
    for i in range(7):
        trail.record(entry(i))
    async with asyncio.timeout(WAIT):
        await trail.close(timeout=0.2)
    (report,) = dropped_reports(caplog)
    assert report.startswith("7 audit entries were not stored")
    assert trail.pending == 0


# --- AuditService --------------------------------------------------------------------


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[AuditTrail], Awaitable[Any]]]:
    """`stub = await serve(trail)`: AuditService over `trail` on 127.0.0.1:0."""
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def start(trail: AuditTrail) -> Any:
        server = grpc.aio.server()
        agrpc.add_AuditServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AuditServicer(trail), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        async with asyncio.timeout(WAIT):
            await channel.channel_ready()
        return agrpc.AuditServiceStub(channel)  # type: ignore[no-untyped-call]

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(None)


@BACKENDS
async def test_list_audit_events_over_grpc(
    trail: AuditTrail,
    serve: Callable[[AuditTrail], Awaitable[Any]],
    expect_error: Callable[..., Awaitable[Any]],
) -> None:
    stub = await serve(trail)
    trail.record(entry(0, tenant=None, code="PERMISSION_DENIED", reason="PERMISSION_DENIED"))
    for i in range(1, 60):
        trail.record(entry(i, principal="key:bob" if i % 2 else "key:ada"))
    # no flush: the listing waits for what was recorded before it

    first = await stub.ListAuditEvents(apb.ListAuditEventsRequest(), timeout=WAIT)
    assert len(first.events) == 50  # the default page size
    assert first.events[0].request_id == "r-59"
    nxt = await stub.ListAuditEvents(
        apb.ListAuditEventsRequest(page_token=first.next_page_token), timeout=WAIT
    )
    assert [e.request_id for e in nxt.events] == [f"r-{i}" for i in reversed(range(10))]
    assert nxt.next_page_token == ""
    oldest = nxt.events[-1]
    assert oldest.time.ToDatetime(tzinfo=dt.UTC) == T0
    assert (oldest.principal, oldest.tenant, oldest.channel) == ("key:ada", "", "grpc")
    assert (oldest.code, oldest.reason) == ("PERMISSION_DENIED", "PERMISSION_DENIED")
    assert oldest.method == "/nexus.model.v1.ModelService/DeleteRecord"
    assert oldest.resource == "model:Contact:0"
    assert len(oldest.id) == 32 and oldest.id < nxt.events[0].id

    bob = await stub.ListAuditEvents(
        apb.ListAuditEventsRequest(principal="key:bob", page_size=1000), timeout=WAIT
    )
    assert len(bob.events) == 30 and {e.principal for e in bob.events} == {"key:bob"}
    failed = await stub.ListAuditEvents(apb.ListAuditEventsRequest(failed_only=True), timeout=WAIT)
    assert [e.request_id for e in failed.events] == ["r-0"]

    await expect_error(
        stub.ListAuditEvents(apb.ListAuditEventsRequest(page_size=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_INVALID",
        fields=["page_size"],
    )
    await expect_error(
        stub.ListAuditEvents(apb.ListAuditEventsRequest(page_token="forged")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
    )
    await expect_error(  # a token of another listing
        stub.ListAuditEvents(
            apb.ListAuditEventsRequest(page_token=first.next_page_token, principal="key:bob")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAGE_TOKEN_INVALID",
    )
    await expect_error(
        stub.ListAuditEvents(apb.ListAuditEventsRequest(principal="p" * 300)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_INVALID",
        fields=["principal"],
    )


@BACKENDS
async def test_page_size_is_capped_at_a_thousand(
    trail: AuditTrail, serve: Callable[[AuditTrail], Awaitable[Any]]
) -> None:
    stub = await serve(trail)
    for i in range(1001):
        trail.record(entry(i))
    page = await stub.ListAuditEvents(apb.ListAuditEventsRequest(page_size=5000), timeout=WAIT)
    assert len(page.events) == 1000 and page.next_page_token


async def test_list_audit_events_without_the_table_is_a_failed_precondition(
    serve: Callable[[AuditTrail], Awaitable[Any]],
) -> None:
    stub = await serve(AuditTrail(None, table=False))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await stub.ListAuditEvents(apb.ListAuditEventsRequest(), timeout=WAIT)
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "the audit table is not enabled" in (failed.value.details() or "")
