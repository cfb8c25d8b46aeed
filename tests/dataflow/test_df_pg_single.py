"""PostgreSQL: single statements run on a connection DataFlow keeps for them when it is
free (a pool's acquire and release cost as much as the statement), on the pool
otherwise; a connection that broke is retired and replaced in the background."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import pytest

from dataflow import AlreadyExistsError, DatabaseError


@pytest.fixture
def backend() -> str:
    return "postgres"


async def test_concurrent_single_operations_share_the_kept_connection_and_the_pool(
    contacts: Any,
) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    kept = db._pg_single
    assert kept is not None
    made = await asyncio.gather(
        *(ops.create(id=f"c{i}", name=f"N{i}", email=f"{i}@x") for i in range(20))
    )
    read = await asyncio.gather(*(ops.read(f"c{i}") for i in range(20)))
    assert [r["name"] for r in read] == [m["name"] for m in made]
    assert await ops.delete("c0") == 1
    assert db._pg_single is kept and not db._pg_single_busy


async def test_a_refused_statement_keeps_the_connection(contacts: Any) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    kept = db._pg_single
    await ops.create(id="a", name="A", email="a@x")
    with pytest.raises(AlreadyExistsError):
        await ops.create(id="a", name="A", email="other@x")
    assert db._pg_single is kept and not kept.is_closed()
    assert (await ops.read("a"))["email"] == "a@x"


async def test_a_broken_connection_is_retired_and_replaced(contacts: Any, pg_url: str) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.create(id="a", name="A", email="a@x")
    kept = db._pg_single
    admin = await asyncpg.connect(pg_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", kept.get_server_pid())
    finally:
        await admin.close()
    await asyncio.sleep(0.1)  # the server's goodbye reaches asyncpg
    # either asyncpg saw the connection close (the pool serves the read) or the read
    # finds it gone, as a statement on a broken pool connection would
    with contextlib.suppress(DatabaseError):
        assert (await ops.read("a"))["name"] == "A"
    assert db._pg_single is not kept  # retired
    assert (await ops.read("a"))["name"] == "A"  # the pool serves meanwhile
    if db._pg_reconnect is not None:
        await asyncio.wait_for(db._pg_reconnect, 10)
    fresh = db._pg_single
    assert fresh is not None and fresh is not kept and not fresh.is_closed()
    assert fresh.get_server_pid() != kept.get_server_pid()
    assert (await ops.read("a"))["name"] == "A"
