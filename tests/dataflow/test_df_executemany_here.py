"""SQLite files: single-record operations and `DataFlow.executemany` batches run on the
calling thread through a connection of its own (`_here_conn`) that never waits for a
lock; larger batches, in-memory databases, an open `transaction()` block and a database
locked by another writer go through the driver's thread, which waits. Either way a
batch is one transaction, errors are mapped to DataFlow's, the write-ahead log is
checkpointed in the background, and `close()` closes the inline connection. Also:
`_sqlite_dt_in`, the DATETIME text DataFlow stores on SQLite."""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite as sa_sqlite

from dataflow import AlreadyExistsError, DataFlow, ValidationError, _dataflow
from dataflow._fastpath import _sqlite_dt_in
from dataflow._sqltypes import UTCDateTime

META = sa.MetaData()
ITEMS = sa.Table(
    "here_items",
    META,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("email", sa.String(64), nullable=False, unique=True),
    sa.Column("doc", sa.JSON, nullable=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),
)
AT = dt.datetime(2026, 11, 22, 9, 30, 15, 123456, tzinfo=dt.UTC)


def insert_sql(db: DataFlow) -> str:
    values = ", ".join(db.placeholder(i + 1) for i in range(5))
    return f"INSERT INTO here_items (id, email, doc, at, n) VALUES ({values})"


def row(db: DataFlow, i: int, **over: Any) -> list[Any]:
    """Driver arguments of item `i` (`over` replaces columns, before conversion)."""
    values: dict[str, Any] = {
        "id": f"i{i:04d}",
        "email": f"{i}@example.com",
        "doc": {"i": i, "tags": ["a", "b"]},
        "at": AT + dt.timedelta(seconds=i),
        "n": 2**40 + i,
    } | over
    return [db.driver_value(values[c]) for c in ("id", "email", "doc", "at", "n")]


def rows(db: DataFlow, ids: range) -> list[list[Any]]:
    return [row(db, i) for i in ids]


async def read_all(db: DataFlow) -> list[dict[str, Any]]:
    async with db.connection() as conn:
        found = (await conn.execute(ITEMS.select().order_by(ITEMS.c.id))).mappings().all()
    return [dict(r) for r in found]


def ids_on_disk(path: Path) -> list[str]:
    """The item ids committed to the file, read by a connection of the test's own."""
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute("SELECT id FROM here_items ORDER BY id")]
    finally:
        conn.close()


def ids_in_main_file(path: Path, tmp_path: Path) -> list[str]:
    """The item ids in the database file itself, without its write-ahead log: what a
    checkpoint has copied there."""
    copy = tmp_path / "copy-without-wal.db"
    copy.unlink(missing_ok=True)
    shutil.copyfile(path, copy)
    return ids_on_disk(copy)


def ids(found: Sequence[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in found]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "here.db"


@pytest.fixture
async def file_db(db_path: Path) -> AsyncIterator[DataFlow]:
    """A DataFlow on a SQLite file holding the (empty) `here_items` table."""
    db = DataFlow(f"sqlite:///{db_path}")
    await db.run_sync(META.create_all)
    yield db
    await db.close()


# -- both backends (SQLite: the inline connection; PostgreSQL: asyncpg) ----------------


async def test_executemany_round_trip_reads_back_exactly(make_db: Any) -> None:
    db = make_db()
    await db.run_sync(META.create_all)
    utc_plus_2 = dt.timezone(dt.timedelta(hours=2))
    written: list[tuple[str, str, Any, dt.datetime, int]] = [
        ("a", "a@x", {"k": [1, 2.5, "é", None, True], "e": {}}, AT, 2**53),
        ("b", "b@x", None, dt.datetime(2026, 1, 1, 2, 0, tzinfo=utc_plus_2), -1),
        ("c", "c@x", [], dt.datetime(2026, 3, 4, 5, 6, 7, 8), 0),  # naive: taken as UTC
        ("d", "d@x", {"z": []}, dt.datetime(1, 1, 1, tzinfo=dt.UTC), 7),
    ]
    await db.executemany(insert_sql(db), [[db.driver_value(v) for v in r] for r in written])
    got = await read_all(db)
    assert [(r["id"], r["email"], r["doc"], r["n"]) for r in got] == [
        (i, e, doc, n) for i, e, doc, _, n in written
    ]
    assert [r["at"] for r in got] == [
        AT,
        dt.datetime(2026, 1, 1, 0, 0, tzinfo=dt.UTC),
        dt.datetime(2026, 3, 4, 5, 6, 7, 8, tzinfo=dt.UTC),
        dt.datetime(1, 1, 1, tzinfo=dt.UTC),
    ]
    # stored exactly as SQLAlchemy stores the value: an equality filter finds the row
    async with db.connection() as conn:
        hit = await conn.execute(sa.select(ITEMS.c.id).where(ITEMS.c.at == written[1][3]))
        assert hit.scalars().all() == ["b"]


async def test_a_unique_violation_raises_already_exists_and_writes_nothing(
    make_db: Any,
) -> None:
    db = make_db()
    await db.run_sync(META.create_all)
    await db.executemany(insert_sql(db), [row(db, 1)])
    batch = [row(db, 2), row(db, 3, email="1@example.com")]  # the second one clashes
    with pytest.raises(AlreadyExistsError) as info:
        await db.executemany(insert_sql(db), batch)
    assert info.value.fields == ("email",)
    assert ids(await read_all(db)) == ["i0001"]
    await db.executemany(insert_sql(db), [row(db, 2)])  # the database is usable after it
    assert ids(await read_all(db)) == ["i0001", "i0002"]


# -- SQLite files: the inline connection ---------------------------------------------


async def test_a_small_batch_is_written_on_the_calling_thread(
    file_db: DataFlow, db_path: Path
) -> None:
    await file_db.executemany(insert_sql(file_db), rows(file_db, range(5)))
    assert file_db._here_conn is not None
    assert file_db._here_rows == 5
    # the driver's connection was never opened: nothing went through its thread
    assert file_db._engine is None and file_db._raw_sqlite is None
    assert ids_on_disk(db_path) == [f"i{i:04d}" for i in range(5)]  # committed
    got = await read_all(file_db)
    assert [(r["doc"], r["at"], r["n"]) for r in got] == [
        ({"i": i, "tags": ["a", "b"]}, AT + dt.timedelta(seconds=i), 2**40 + i) for i in range(5)
    ]


async def test_an_in_memory_database_never_uses_the_inline_connection() -> None:
    db = DataFlow("sqlite:///:memory:")
    try:
        await db.run_sync(META.create_all)
        await db.executemany(insert_sql(db), rows(db, range(3)))
        assert db._here_conn is None
        assert ids(await read_all(db)) == ["i0000", "i0001", "i0002"]
    finally:
        await db.close()


async def test_a_batch_over_the_inline_limit_goes_through_the_driver_thread(
    file_db: DataFlow, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_dataflow, "EXECUTEMANY_HERE_ROWS", 3)
    await file_db.executemany(insert_sql(file_db), rows(file_db, range(5)))
    assert file_db._here_conn is None and file_db._here_rows == 0
    assert file_db._raw_sqlite is not None  # the driver's thread wrote it
    assert ids_on_disk(db_path) == [f"i{i:04d}" for i in range(5)]
    # still one transaction: the last row's NOT NULL violation undoes the first four
    bad = [*rows(file_db, range(10, 14)), row(file_db, 14, at=None)]
    with pytest.raises(ValidationError) as info:
        await file_db.executemany(insert_sql(file_db), bad)
    assert info.value.field == "at"
    assert ids_on_disk(db_path) == [f"i{i:04d}" for i in range(5)]
    # a batch within the limit is written inline
    await file_db.executemany(insert_sql(file_db), rows(file_db, range(20, 23)))
    assert file_db._here_conn is not None and file_db._here_rows == 3


async def test_a_failing_inline_batch_writes_none_of_its_rows(
    file_db: DataFlow, db_path: Path
) -> None:
    sql = insert_sql(file_db)
    await file_db.executemany(sql, [row(file_db, 1)])
    with pytest.raises(AlreadyExistsError) as clash:
        await file_db.executemany(sql, [row(file_db, 2), row(file_db, 1, email="new@x")])
    assert clash.value.fields == ("id",)
    with pytest.raises(ValidationError) as null:
        await file_db.executemany(sql, [row(file_db, 3), row(file_db, 4, n=None)])
    assert null.value.field == "n"
    assert file_db._engine is None  # both failed inline, not in the driver's thread
    assert file_db._here_conn is not None and not file_db._here_conn.in_transaction
    assert file_db._here_rows == 1
    assert ids_on_disk(db_path) == ["i0001"]
    await file_db.executemany(sql, [row(file_db, 2)])  # the connection is still usable
    assert ids_on_disk(db_path) == ["i0001", "i0002"]
    assert file_db._here_rows == 2


async def test_a_batch_waits_while_another_connection_holds_the_write_lock(
    file_db: DataFlow, db_path: Path
) -> None:
    sql = insert_sql(file_db)
    await file_db.executemany(sql, [row(file_db, 0)])  # the inline connection is open
    loop = asyncio.get_running_loop()
    other = sqlite3.connect(db_path, isolation_level=None)
    released: list[float] = []

    def release() -> None:
        other.execute("COMMIT")
        released.append(loop.time())

    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute(
            "INSERT INTO here_items (id, email, doc, at, n) VALUES (?, ?, ?, ?, ?)",
            row(file_db, 1),
        )
        start = loop.time()
        # run by this loop: it can only fire if waiting does not block the loop
        loop.call_later(0.3, release)
        await asyncio.wait_for(file_db.executemany(sql, rows(file_db, range(2, 5))), 10)
        returned = loop.time()
    finally:
        other.close()
    assert released, "executemany returned before the other writer committed"
    assert released[0] <= returned and returned - start < 5
    assert file_db._here_rows == 1  # that batch went through the driver's thread
    assert ids_on_disk(db_path) == [f"i{i:04d}" for i in range(5)]
    # the lock released, the next batch is written inline again
    await file_db.executemany(sql, [row(file_db, 5)])
    assert file_db._here_rows == 2


async def test_a_batch_never_lands_inside_an_open_transaction_block(
    file_db: DataFlow, db_path: Path
) -> None:
    """A `transaction()` block holds DataFlow's connection: a batch written meanwhile
    waits for the block to end instead of committing in its middle."""
    sql = insert_sql(file_db)
    await file_db.executemany(sql, [row(file_db, 0)])  # the inline connection is open
    inside = asyncio.Event()
    release = asyncio.Event()
    seen_in_block: list[int] = []

    async def block() -> None:
        async with file_db.transaction(), file_db.connection() as conn:
            count = sa.select(sa.func.count()).select_from(ITEMS)
            seen_in_block.append(int((await conn.execute(count)).scalar_one()))
            inside.set()
            await release.wait()
            seen_in_block.append(int((await conn.execute(count)).scalar_one()))

    task = asyncio.create_task(block())
    await asyncio.wait_for(inside.wait(), 10)
    write = asyncio.create_task(file_db.executemany(sql, rows(file_db, range(1, 4))))
    await asyncio.sleep(0.1)
    assert not write.done()  # waiting for the block, not written inline
    release.set()
    await asyncio.wait_for(asyncio.gather(task, write), 10)
    assert seen_in_block == [1, 1]  # the block saw the same table twice
    assert file_db._here_rows == 1  # the batch went through the driver's thread
    assert ids_on_disk(db_path) == [f"i{i:04d}" for i in range(4)]


async def test_the_log_is_checkpointed_after_enough_inline_rows(
    file_db: DataFlow, db_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_dataflow, "CHECKPOINT_ROWS", 10)
    sql = insert_sql(file_db)
    for start in (0, 3, 6):  # 9 rows: not yet
        await file_db.executemany(sql, rows(file_db, range(start, start + 3)))
    assert file_db._checkpoint_task is None
    assert ids_on_disk(db_path) == [f"i{i:04d}" for i in range(9)]  # committed, in the log
    assert ids_in_main_file(db_path, tmp_path) == []  # the log was not copied back
    await file_db.executemany(sql, rows(file_db, range(9, 12)))  # 12 rows: a checkpoint
    task = file_db._checkpoint_task
    assert task is not None
    await task
    assert file_db._checkpoint_task is None and file_db._here_rows == 0
    assert ids_in_main_file(db_path, tmp_path) == [f"i{i:04d}" for i in range(12)]


async def test_close_waits_for_the_checkpoint_and_closes_the_inline_connection(
    file_db: DataFlow, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_dataflow, "CHECKPOINT_ROWS", 1)
    await file_db.executemany(insert_sql(file_db), [row(file_db, 0)])
    here, task = file_db._here_conn, file_db._checkpoint_task
    assert here is not None and task is not None and not task.done()
    await file_db.close()
    assert task.done() and not task.cancelled()
    assert file_db._here_conn is None
    with pytest.raises(sqlite3.ProgrammingError):
        here.execute("SELECT 1")


async def test_the_checkpoint_needs_no_turn_on_dataflows_connection(
    file_db: DataFlow, db_path: Path, tmp_path: Path
) -> None:
    """A checkpoint runs in a worker thread on a connection of its own: an open
    `transaction()` block (which holds DataFlow's connection) does not delay it."""
    await file_db.executemany(insert_sql(file_db), rows(file_db, range(3)))  # in the log
    assert ids_in_main_file(db_path, tmp_path) == []
    inside, release = asyncio.Event(), asyncio.Event()

    async def block() -> None:
        async with file_db.transaction():
            inside.set()
            await release.wait()

    holder = asyncio.create_task(block())
    try:
        await asyncio.wait_for(inside.wait(), 10)
        assert file_db._sqlite_lock.locked()
        await asyncio.wait_for(file_db._checkpoint(), 5)
        assert not holder.done()
        assert ids_in_main_file(db_path, tmp_path) == ["i0000", "i0001", "i0002"]
    finally:
        release.set()
        await holder


async def test_single_records_are_read_and_written_on_the_calling_thread(
    db_path: Path,
) -> None:
    """Create, read, update and delete by id on a SQLite file go through the inline
    connection: aiosqlite's thread is never started."""
    db = DataFlow(f"sqlite:///{db_path}")

    @db.model
    class Pet:
        id: str
        name: str
        age: int = 0

    try:
        await db.initialize()

        async def no_driver() -> None:
            raise AssertionError("a single-record operation went to aiosqlite's thread")

        db._raw_sqlite = None
        db._sqlite_connection = no_driver  # type: ignore[method-assign]
        ops = db.ops(Pet)
        made = await ops.create(id="p1", name="Rex")
        assert (await ops.read("p1")) == made
        changed = await ops.update("p1", fields={"age": 3})
        assert changed["age"] == 3
        assert await ops.delete("p1") == 1
        assert db._here_conn is not None and db._here_rows == 3  # three writes inline
    finally:
        del db._sqlite_connection
        await db.close()


async def test_a_single_record_write_waits_while_another_connection_holds_the_lock(
    db_path: Path,
) -> None:
    db = DataFlow(f"sqlite:///{db_path}")

    @db.model
    class Pet:
        id: str
        name: str

    try:
        ops = db.ops(Pet)
        await ops.create(id="p0", name="first")  # the inline connection is open
        other = sqlite3.connect(db_path, isolation_level=None)
        released: list[float] = []
        loop = asyncio.get_running_loop()

        def release() -> None:
            other.execute("COMMIT")
            released.append(loop.time())

        try:
            other.execute("BEGIN IMMEDIATE")
            loop.call_later(0.3, release)
            made = await asyncio.wait_for(ops.create(id="p1", name="second"), 10)
            returned = loop.time()
        finally:
            other.close()
        assert released and released[0] <= returned
        assert made["name"] == "second"
        assert (await ops.read("p1"))["name"] == "second"
    finally:
        await db.close()


async def test_reads_do_not_wait_for_another_tasks_open_transaction(db_path: Path) -> None:
    """Read committed, as on PostgreSQL: while another task's `transaction()` block holds
    DataFlow's connection with a write not yet committed, Read, List, Count and
    `fetchrow` answer at once with the last committed state; after the commit they see
    the write. A write from outside the block still waits for it (one writer)."""
    db = DataFlow(f"sqlite:///{db_path}")

    @db.model
    class Pet:
        id: str
        name: str

    try:
        ops = db.ops(Pet)
        await ops.create(id="p0", name="first")
        inside, release = asyncio.Event(), asyncio.Event()

        async def block() -> None:
            async with db.transaction():
                await ops.update("p0", fields={"name": "changed"})
                await ops.create(id="p1", name="second")
                inside.set()
                await release.wait()

        holder = asyncio.create_task(block())
        await asyncio.wait_for(inside.wait(), 10)
        assert db._sqlite_lock.locked()
        sql = f"SELECT name FROM pet WHERE id = {db.placeholder(1)}"

        async def reads() -> tuple[str, list[str], int, str]:
            row = await db.fetchrow(sql, ["p0"])
            assert row is not None
            listed = await ops.list({"name": {"$ne": "nobody"}}, order_by="id", limit=10)
            return (
                (await ops.read("p0"))["name"],
                [r["name"] for r in listed["records"]],
                await ops.count({"name": {"$ne": "nobody"}}),
                row[0],
            )

        before = await asyncio.wait_for(reads(), 5)  # while the block is open
        assert before == ("first", ["first"], 1, "first")
        write = asyncio.create_task(ops.create(id="p2", name="third"))
        await asyncio.sleep(0.1)
        assert not write.done()  # a write takes its turn behind the open block
        release.set()
        await asyncio.wait_for(holder, 10)
        await asyncio.wait_for(write, 10)
        after = await reads()
        assert after == ("changed", ["changed", "second", "third"], 3, "changed")
    finally:
        await db.close()


# -- _sqlite_dt_in: the DATETIME text DataFlow stores on SQLite ------------------------

PLUS_2 = dt.timezone(dt.timedelta(hours=2))
MINUS_5 = dt.timezone(dt.timedelta(hours=-5))
PLUS_5_30 = dt.timezone(dt.timedelta(hours=5, minutes=30))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (dt.datetime(2026, 11, 22, 9, 30, 15, 123456), "2026-11-22 09:30:15.123456"),
        (dt.datetime(2026, 11, 22, 9, 30, 15, 123456, dt.UTC), "2026-11-22 09:30:15.123456"),
        (dt.datetime(2026, 11, 22, 11, 30, 15, 123456, PLUS_2), "2026-11-22 09:30:15.123456"),
        (dt.datetime(2026, 1, 1), "2026-01-01 00:00:00.000000"),
        (dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "2026-01-01 00:00:00.000000"),
        (dt.datetime(2025, 12, 31, 22, 0, 0, 1, MINUS_5), "2026-01-01 03:00:00.000001"),
        (dt.datetime(2026, 3, 1, 2, 0, tzinfo=PLUS_5_30), "2026-02-28 20:30:00.000000"),
        (dt.datetime(1, 1, 1), "0001-01-01 00:00:00.000000"),
        (dt.datetime(1, 1, 1, tzinfo=dt.UTC), "0001-01-01 00:00:00.000000"),
        (dt.datetime(1, 1, 1, 3, tzinfo=PLUS_2), "0001-01-01 01:00:00.000000"),
        (dt.datetime(999, 2, 3, 4, 5, 6, 70), "0999-02-03 04:05:06.000070"),
        (dt.datetime(9999, 12, 31, 23, 59, 59, 999999), "9999-12-31 23:59:59.999999"),
    ],
)
def test_sqlite_datetime_text_is_utc_with_microseconds(value: dt.datetime, text: str) -> None:
    assert _sqlite_dt_in(value) == text
    assert type(_sqlite_dt_in(value)) is str


_SQLITE = sa_sqlite.dialect()
_SA_SQLITE_DATETIME: Any = sa.DateTime().dialect_impl(_SQLITE).bind_processor(_SQLITE)
_OFFSETS: st.SearchStrategy[dt.tzinfo] = st.just(dt.UTC) | st.builds(
    dt.timezone,
    st.timedeltas(
        min_value=dt.timedelta(hours=-23, minutes=-59),
        max_value=dt.timedelta(hours=23, minutes=59),
    ),
)
_LOW, _HIGH = dt.datetime(2, 1, 1), dt.datetime(9998, 12, 31)


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.datetimes(min_value=_LOW, max_value=_HIGH)
    | st.datetimes(min_value=_LOW, max_value=_HIGH, timezones=_OFFSETS)
)
def test_sqlite_datetime_text_is_what_sqlalchemy_stores_for_the_utc_time(
    value: dt.datetime,
) -> None:
    utc = value if value.tzinfo is None else value.astimezone(dt.UTC).replace(tzinfo=None)
    assert _sqlite_dt_in(value) == _SA_SQLITE_DATETIME(utc)
