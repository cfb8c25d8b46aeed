"""initialize(): additive migrations, refused destructive ones, persistence, idempotence."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, event, inspect, text

from dataflow import REGISTRY_TABLE, DatabaseError, DataFlow, MigrationError, field

MakeDB = Callable[..., DataFlow]


async def _columns(db: DataFlow, table: str) -> dict[str, str]:
    async with db.engine.connect() as conn:
        cols = await conn.run_sync(lambda c: inspect(c).get_columns(table))
    return {c["name"]: str(c["type"]) for c in cols}


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every SQL statement any engine sends during the test (DataFlow may migrate a SQLite
    file through a short-lived engine of its own, so listen on all of them)."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


async def test_additive_migration_keeps_data(make_db: MakeDB) -> None:
    v1 = make_db()

    @v1.model
    class Person:
        id: str
        name: str

    await v1.ops(Person).create(id="p1", name="Ada")
    await v1.close()

    v2 = make_db()

    @v2.model
    class Person:  # type: ignore[no-redef]
        id: str
        name: str
        nickname: str | None = None
        level: int = 3
        handle: str = field(default="", index=True)
        __indexes__ = [("name", "level")]

    assert any("add column person.level" in s for s in await v2.migration_plan())
    await v2.initialize()
    got = await v2.ops(Person).read("p1")
    assert got["name"] == "Ada" and got["nickname"] is None and got["level"] == 3
    cols = await _columns(v2, "person")
    assert {"nickname", "level", "handle"} <= set(cols)
    async with v2.engine.connect() as conn:
        idx = await conn.run_sync(lambda c: inspect(c).get_indexes("person"))
    assert {"ix_person_handle", "ix_person_name_level"} <= {i["name"] for i in idx}
    # a second start has nothing to do
    v3 = make_db()
    await v2.close()

    @v3.model
    class Person:  # type: ignore[no-redef]
        id: str
        name: str
        nickname: str | None = None
        level: int = 3
        handle: str = field(default="", index=True)
        __indexes__ = [("name", "level")]

    assert await v3.migration_plan() == []


async def test_destructive_differences_are_refused_and_nothing_changes(make_db: MakeDB) -> None:
    v1 = make_db()

    @v1.model
    class Person:
        id: str
        name: str
        age: int = 0
        email: str = ""

    await v1.ops(Person).create(id="p1", name="Ada", age=36)
    await v1.close()
    before = None

    v2 = make_db()

    @v2.model
    class Person:  # type: ignore[no-redef]
        id: str
        name: str
        age: str = "0"  # changed type
        # email dropped
        extra: int | None = None  # additive, but must not be applied either

    @v2.model
    class Other:
        id: str

    before = await _columns(v2, "person")
    with pytest.raises(MigrationError) as ei:
        await v2.initialize()
    diffs = ei.value.differences
    assert len(diffs) == 2
    assert any("person.age" in d and "type changed" in d for d in diffs)
    assert any("person.email" in d and "not in the model" in d for d in diffs)
    assert await _columns(v2, "person") == before
    async with v2.engine.connect() as conn:
        tables = await conn.run_sync(lambda c: inspect(c).get_table_names())
    assert "other" not in tables


async def test_required_new_column_without_default_is_refused(make_db: MakeDB) -> None:
    v1 = make_db()

    @v1.model
    class Person:
        id: str

    await v1.initialize()
    await v1.close()
    v2 = make_db()

    @v2.model
    class Person:  # type: ignore[no-redef]  # noqa: F811
        id: str
        name: str

    with pytest.raises(MigrationError, match=r"person\.name.*no default"):
        await v2.initialize()


async def test_auto_migrate_off_and_skip_migration(make_db: MakeDB, statements: list[str]) -> None:
    db = make_db(auto_migrate=False)

    @db.model
    class Person:
        id: str

    with pytest.raises(MigrationError, match="create table person"):
        await db.initialize()
    await db.close()
    db2 = make_db(skip_migration=True)

    @db2.model
    class Person:  # type: ignore[no-redef]  # noqa: F811
        id: str

    statements.clear()
    await db2.initialize()
    assert statements == []  # trusted: nothing asked
    with pytest.raises(DatabaseError):
        await db2.ops(Person).count()


async def test_initialize_is_idempotent_and_declaring_later_migrates_only_that(
    make_db: MakeDB, statements: list[str]
) -> None:
    db = make_db()

    @db.model
    class A:
        id: str

    seen = statements
    seen.clear()
    await db.initialize()
    first = len(seen)
    assert first > 0
    await db.initialize()
    await asyncio_gather_initialize(db)
    assert len(seen) == first

    @db.model
    class B:
        id: int

    assert (await db.ops(B).create())["id"] == 1  # initialised on first use


async def asyncio_gather_initialize(db: DataFlow) -> None:
    import asyncio

    await asyncio.gather(*(db.initialize() for _ in range(5)))


async def test_model_persistence_is_one_statement(make_db: MakeDB, statements: list[str]) -> None:
    db = make_db(enable_model_persistence=True)
    for i in range(30):
        db.model(type(f"M{i}", (), {"__annotations__": {"id": str, "v": int | None}}))
    seen = statements
    seen.clear()
    await db.initialize()
    writes = [s for s in seen if REGISTRY_TABLE in s and s.lstrip().upper().startswith("INSERT")]
    assert len(writes) == 1
    async with db.engine.connect() as conn:
        rows = (await conn.execute(text(f"SELECT name, schema_json FROM {REGISTRY_TABLE}"))).all()
    assert len(rows) == 30
    schema = json.loads(dict(rows)["M7"])
    assert [f["name"] for f in schema["fields"]] == ["id", "v", "created_at", "updated_at"]
    assert schema["fields"][1]["nullable"] is True
    # restarting rewrites the rows in place, still one statement
    await db.close()
    again = make_db(enable_model_persistence=True)
    for i in range(30):
        again.model(type(f"M{i}", (), {"__annotations__": {"id": str, "v": int | None}}))
    seen.clear()
    await again.initialize()
    assert len([s for s in seen if REGISTRY_TABLE in s and "INSERT" in s.upper()]) == 1
