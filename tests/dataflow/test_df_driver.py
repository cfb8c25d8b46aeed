"""The driver-level entry points DataFlow offers its users (the server's execution
records use them): `run_sync` for setup work, `executemany` with `placeholder` and
`driver_value`. Values written through them read back exactly as through SQLAlchemy."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import sqlalchemy as sa

from dataflow import DataFlow, DataFlowError

META = sa.MetaData()
EVENTS = sa.Table(
    "driver_events",
    META,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("doc", sa.JSON, nullable=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),
)


def upsert_sql(db: DataFlow) -> str:
    values = ", ".join(db.placeholder(i + 1) for i in range(4))
    return (
        f"INSERT INTO driver_events (id, doc, at, n) VALUES ({values}) "
        "ON CONFLICT (id) DO UPDATE SET doc = excluded.doc, n = excluded.n"
    )


async def read_all(db: DataFlow) -> list[dict[str, Any]]:
    async with db.connection() as conn:
        rows = (await conn.execute(EVENTS.select().order_by(EVENTS.c.id))).mappings().all()
    return [dict(r) for r in rows]


async def test_run_sync_creates_tables_and_returns_the_result(make_db: Any) -> None:
    db = make_db()

    def setup(conn: sa.Connection) -> int:
        META.create_all(conn)
        return int(conn.execute(sa.select(sa.func.count()).select_from(EVENTS)).scalar_one())

    assert await db.run_sync(setup) == 0
    assert await db.run_sync(setup) == 0  # idempotent setup


async def test_run_sync_rolls_back_when_the_function_fails(make_db: Any) -> None:
    db = make_db()
    await db.run_sync(META.create_all)

    def half_done(conn: sa.Connection) -> None:
        conn.execute(EVENTS.insert().values(id="x", doc=None, at=dt.datetime.now(dt.UTC), n=1))
        raise ValueError("stop here")

    with pytest.raises(DataFlowError):
        await db.run_sync(half_done)
    assert await read_all(db) == []


async def test_executemany_values_read_back_as_sqlalchemy_writes_them(make_db: Any) -> None:
    db = make_db()
    await db.run_sync(META.create_all)
    at = dt.datetime(2026, 11, 22, 9, 30, 15, 123456, tzinfo=dt.UTC)
    midnight = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)  # no microseconds: still exact
    rows = [
        ("a", {"k": [1, 2.5, "x", None, True]}, at, 2**40),
        ("b", None, midnight, -1),
    ]
    await db.executemany(upsert_sql(db), [[db.driver_value(v) for v in r] for r in rows])
    got = await read_all(db)
    assert [(r["id"], r["doc"], r["n"]) for r in got] == [
        ("a", {"k": [1, 2.5, "x", None, True]}, 2**40),
        ("b", None, -1),
    ]
    # SQLite keeps no zone: DataFlow's columns read UTC back either way
    assert [r["at"].replace(tzinfo=dt.UTC) for r in got] == [at, midnight]


async def test_executemany_is_one_transaction(make_db: Any) -> None:
    db = make_db()
    await db.run_sync(META.create_all)
    now = db.driver_value(dt.datetime.now(dt.UTC))
    good = ["ok", None, now, 1]
    bad = ["bad", None, None, 2]  # `at` is NOT NULL: the whole batch fails
    with pytest.raises(DataFlowError, match="at"):
        await db.executemany(upsert_sql(db), [good, bad])
    assert await read_all(db) == []
    await db.executemany(upsert_sql(db), [good])
    await db.executemany(upsert_sql(db), [["ok", db.driver_value({"v": 2}), now, 5]])
    (row,) = await read_all(db)
    assert (row["doc"], row["n"]) == ({"v": 2}, 5)  # the upsert updated it


async def test_executemany_refuses_to_run_inside_a_transaction(make_db: Any) -> None:
    db = make_db()
    await db.run_sync(META.create_all)
    row = ["t", None, db.driver_value(dt.datetime.now(dt.UTC)), 1]
    async with db.transaction():
        with pytest.raises(DataFlowError, match="transaction of its own"):
            await db.executemany(upsert_sql(db), [row])


async def test_operations_recover_after_the_shared_connection_is_invalidated(
    make_db: Any, backend: str
) -> None:
    """SQLAlchemy invalidates (closes) a connection an operation was cancelled in; the
    driver-level paths must then reconnect instead of failing on the closed one."""
    db = make_db()

    @db.model
    class Gadget:
        id: str
        name: str

    await db.run_sync(META.create_all)
    ops = db.ops("Gadget")
    await ops.create(id="a", name="first")
    async with db.engine.connect() as conn:
        await conn.invalidate()
    assert (await ops.read("a"))["name"] == "first"
    now = db.driver_value(dt.datetime.now(dt.UTC))
    await db.executemany(upsert_sql(db), [["r", None, now, 1]])
    assert [r["id"] for r in await read_all(db)] == ["r"]


async def test_a_ping_that_times_out_leaves_the_connection_usable(make_db: Any) -> None:
    db = make_db()

    @db.model
    class Widget:
        id: str
        name: str

    await db.initialize()
    ops = db.ops("Widget")
    await ops.create(id="w", name="one")
    assert await db.ping(timeout=1e-9) is False  # gives up at once
    assert await db.ping() is True
    assert (await ops.read("w"))["name"] == "one"
