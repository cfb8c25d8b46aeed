"""The executions table on both databases: its indexes, listing order and pages,
idempotency keys unique across server processes, and the upgrade of a table an earlier
version made."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import pytest
import sqlalchemy as sa

from dataflow import DataFlow
from nexus_server._executions import new_execution_id
from nexus_server._store import EXECUTIONS, ExecutionRecord, Store

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

NEW_INDEXES = {
    "ix_nexus_executions_workflow_id",
    "uq_nexus_executions_caller_request",
    "ix_nexus_executions_active",
}
#: Columns later versions added (leases and the queue of asynchronous executions).
NEW_COLUMNS = {"runner", "lease_until", "attempts", "retryable", "tenant"}
OLD_INDEXES = {"ix_nexus_executions_order", "ix_nexus_executions_workflow"}

# The table as versions before this one made it: a unique constraint on (caller,
# request_id) for every row, and indexes on (create_time, id) and on workflow.
OLD_TABLE = """
CREATE TABLE nexus_executions (
    id VARCHAR(64) NOT NULL PRIMARY KEY,
    workflow VARCHAR(128) NOT NULL,
    state VARCHAR(16) NOT NULL,
    caller VARCHAR(256) NOT NULL,
    request_id VARCHAR(256),
    request_hash VARCHAR(64),
    inputs {json} NOT NULL,
    outputs {json},
    error {json},
    create_time {time} NOT NULL,
    start_time {time},
    end_time {time},
    CONSTRAINT uq_nexus_executions_request UNIQUE (caller, request_id)
)
"""


def record(
    workflow: str = "wf", *, caller: str = "anonymous", request_id: str | None = None
) -> ExecutionRecord:
    now = dt.datetime.now(dt.UTC)
    return ExecutionRecord(
        id=new_execution_id(),
        workflow=workflow,
        state="SUCCEEDED",
        caller=caller,
        request_id=request_id,
        request_hash="h" if request_id else None,
        inputs={"n": 1},
        outputs={"node": {"x": 1}},
        error=None,
        create_time=now,
        start_time=now,
        end_time=now,
    )


async def indexes(db: DataFlow) -> set[str]:
    def names(conn: sa.Connection) -> set[str]:
        return {str(ix["name"]) for ix in sa.inspect(conn).get_indexes(EXECUTIONS.name)}

    return await db.run_sync(names)


async def unique_constraints(db: DataFlow) -> set[str]:
    def names(conn: sa.Connection) -> set[str]:
        found = sa.inspect(conn).get_unique_constraints(EXECUTIONS.name)
        return {str(c["name"]) for c in found if c["name"]}

    return await db.run_sync(names)


async def test_a_new_table_has_three_indexes_besides_the_key(db_url: str) -> None:
    db = DataFlow(db_url)
    try:
        await db.initialize()
        await Store(db).initialize()
        assert await indexes(db) == NEW_INDEXES
        assert not await unique_constraints(db)
    finally:
        await db.close()


async def test_listing_is_newest_first_in_pages_by_workflow(db_url: str) -> None:
    db = DataFlow(db_url)
    try:
        await db.initialize()
        store = Store(db)
        await store.initialize()
        written = []
        for i in range(7):
            written.append(record("even" if i % 2 == 0 else "odd"))
            await asyncio.sleep(0.001)  # ids carry the microsecond: each one newer
        await store.write_executions(written)
        newest_first = [r.id for r in reversed(written)]

        seen: list[str] = []
        token = ""
        while True:
            page, token = await store.list_executions(None, None, 3, token)
            assert len(page) <= 3
            seen += [r.id for r in page]
            if not token:
                break
        assert seen == newest_first

        evens, token = await store.list_executions("even", None, 2, "")
        rest, last = await store.list_executions("even", None, 2, token)
        assert [r.id for r in evens + rest] == [r.id for r in reversed(written[::2])]
        assert last == ""
        assert await store.list_executions("odd", "FAILED", 10, "") == ([], "")
    finally:
        await db.close()


async def test_an_idempotency_key_is_recorded_once_rows_without_one_are_not_limited(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = DataFlow(db_url)
    try:
        await db.initialize()
        store = Store(db)
        await store.initialize()
        # many executions of one caller without a request_id
        plain = [record(caller="ada") for _ in range(5)]
        await store.write_executions(plain)
        first = record(caller="ada", request_id="r-1")
        await store.write_executions([first])
        # another server process recording the same key: the database refuses it, the
        # batch's other rows are written, and the dropped one is returned and logged
        second, other_caller, more = (
            record(caller="ada", request_id="r-1"),
            record(caller="bob", request_id="r-1"),
            record(caller="ada"),
        )
        with caplog.at_level(logging.WARNING, logger="nexus_server"):
            dropped = await store.write_executions([second, other_caller, more])
        assert dropped == [second.id]
        assert f"execution {second.id} not recorded" in caplog.text
        found = await store.find_request("ada", "r-1")
        assert found is not None and found.id == first.id
        assert await store.get_execution(second.id) is None
        for kept in (other_caller, more, *plain):
            assert await store.get_execution(kept.id) is not None
    finally:
        await db.close()


async def test_a_table_of_an_earlier_version_gets_the_new_indexes(db_url: str) -> None:
    db = DataFlow(db_url)
    try:
        await db.initialize()
        pg = db.dialect == "postgresql"
        old = OLD_TABLE.format(
            json="JSONB" if pg else "JSON", time="TIMESTAMPTZ" if pg else "DATETIME"
        )

        def make_old(conn: sa.Connection) -> None:
            conn.execute(sa.text(old))
            conn.execute(
                sa.text(
                    "CREATE INDEX ix_nexus_executions_order ON nexus_executions (create_time, id)"
                )
            )
            conn.execute(
                sa.text("CREATE INDEX ix_nexus_executions_workflow ON nexus_executions (workflow)")
            )

        await db.run_sync(make_old)
        store = Store(db)
        early = record("old", request_id="k")
        # written as that version did: without the columns added since
        columns = [c.name for c in EXECUTIONS.columns if c.name not in NEW_COLUMNS]
        values = {c: getattr(early, c) for c in columns}
        async with db.connection() as conn:
            await conn.execute(EXECUTIONS.insert().values(**values))

        await store.initialize()
        have = await indexes(db)
        assert have >= NEW_INDEXES

        def column_names(conn: sa.Connection) -> set[str]:
            return {c["name"] for c in sa.inspect(conn).get_columns(EXECUTIONS.name)}

        assert await db.run_sync(column_names) >= NEW_COLUMNS
        assert not have & OLD_INDEXES
        # PostgreSQL drops the old constraint; SQLite keeps it (it cannot drop it without
        # copying the table), which only makes its writes slower
        assert ("uq_nexus_executions_request" in await unique_constraints(db)) == (not pg)

        # what was recorded before the upgrade is still there and listed
        found = await store.get_execution(early.id)
        assert found is not None and found.runner is None and found.attempts is None
        later = record("old")
        await store.write_executions([later])
        listed, _ = await store.list_executions("old", None, 10, "")
        assert [r.id for r in listed] == [later.id, early.id]
        # and a second start finds nothing left to change
        await store.initialize()
        assert await indexes(db) == have
    finally:
        await db.close()
