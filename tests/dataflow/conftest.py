"""DataFlow fixtures: every test taking `url` or `make_db` runs on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from dataflow import DataFlow, field


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database URL with an empty schema."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    pg: str = request.getfixturevalue("pg_url")
    conn = await asyncpg.connect(pg, timeout=5)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
    return pg


MakeDB = Callable[..., DataFlow]


@pytest.fixture
async def make_db(url: str) -> AsyncIterator[MakeDB]:
    """`make_db(**options)`: a DataFlow on the test database, closed after the test."""
    made: list[DataFlow] = []

    def make(**kw: Any) -> DataFlow:
        db = DataFlow(kw.pop("database_url", url), **kw)
        made.append(db)
        return db

    yield make
    for db in reversed(made):
        await db.close()


class Tier(enum.Enum):
    FREE = "free"
    PRO = "pro"


def _declare_contact(db: DataFlow) -> type[Any]:
    """The issue's Contact model, with a unique email."""

    @db.model
    class Contact:
        id: str
        name: str
        email: str = field(unique=True)
        company: str | None = None
        score: int = 0

    return Contact


def _declare_everything(db: DataFlow) -> type[Any]:
    """A model with a field of every supported type."""

    @db.model
    class Thing:
        id: int
        text: str = ""
        count: int = 0
        ratio: float = 0.0
        flag: bool = False
        blob: bytes | None = None
        amount: Decimal = Decimal("0")
        at: dt.datetime | None = None
        day: dt.date | None = None
        uid: uuid.UUID | None = None
        tier: Tier = Tier.FREE
        meta: dict | None = None  # type: ignore[type-arg]
        tags: list | None = None  # type: ignore[type-arg]

    return Thing


# Test modules are imported by importlib (no sys.path entries), so the helpers above
# reach them as fixtures.


@pytest.fixture
def declare_contact() -> Callable[[DataFlow], type[Any]]:
    return _declare_contact


@pytest.fixture
def declare_everything() -> Callable[[DataFlow], type[Any]]:
    return _declare_everything


@pytest.fixture
def tier_enum() -> type[Tier]:
    return Tier


@pytest.fixture
async def contacts(make_db: MakeDB) -> tuple[DataFlow, type[Any]]:
    db = make_db()
    model = _declare_contact(db)
    await db.initialize()
    return db, model
