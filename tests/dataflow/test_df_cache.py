"""The query cache (`DataFlow(enable_caching=True)`, `cache_url=`): hits, invalidation
by every write (also across two DataFlows sharing one Redis), read-after-write,
transactions and atomic workflows, tenant and scope isolation. On SQLite and PostgreSQL;
the Redis tests use a key prefix of their own and delete it afterwards."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

from dataflow import (
    DataFlow,
    TenantRequired,
    ValidationError,
    cache_scope,
    field,
    tenant_scope,
)
from workflow import AsyncLocalRuntime, WorkflowBuilder

MakeDB = Callable[..., DataFlow]
REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = pytest.mark.timeout(60)


def _declare(db: DataFlow, replica: bool = False) -> type[Any]:
    """The model; `replica`: as a second process would declare it (in this process
    under another class name, whose node types do not clash, on the same table)."""

    class Item:
        __tablename__ = "item"
        id: str
        name: str = field(searchable=True)
        score: int = 0
        meta: dict | None = None  # type: ignore[type-arg]

    if replica:
        Item.__name__ = Item.__qualname__ = "ItemReplica"
    return db.model(Item)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own, every key under it deleted afterwards."""
    redis = pytest.importorskip("redis")
    prefix = f"test-df-cache:{uuid.uuid4().hex}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["memory", "redis"])
def cache_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The options of an in-memory cache, and of a Redis one (own prefix, cleaned)."""
    if request.param == "memory":
        return {"enable_caching": True}
    prefix: str = request.getfixturevalue("redis_prefix")
    return {"cache_url": REDIS_URL, "cache_prefix": prefix}


async def _items(
    make_db: MakeDB, replica: bool = False, **options: Any
) -> tuple[DataFlow, type[Any]]:
    db = make_db(**options)
    model = _declare(db, replica)
    await db.initialize()
    return db, model


# -- options --------------------------------------------------------------------------


def test_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="enable_caching"):
        DataFlow("sqlite:///:memory:", enable_caching="yes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="cache_url"):
        DataFlow("sqlite:///:memory:", enable_caching=False, cache_url=REDIS_URL)
    with pytest.raises(ValidationError, match="cache_url"):
        DataFlow("sqlite:///:memory:", cache_url="http://127.0.0.1:6379")
    with pytest.raises(ValidationError, match="cache_ttl"):
        DataFlow("sqlite:///:memory:", enable_caching=True, cache_ttl=0)
    with pytest.raises(ValidationError, match="cache_max_entries"):
        DataFlow("sqlite:///:memory:", enable_caching=True, cache_max_entries=0)
    with pytest.raises(ValidationError, match="cache_prefix"):
        DataFlow("sqlite:///:memory:", enable_caching=True, cache_prefix="x")
    # enable_metrics works too (tests/server/test_metrics.py); only a non-bool is refused
    with pytest.raises(ValidationError, match="enable_metrics"):
        DataFlow("sqlite:///:memory:", enable_metrics="yes")  # type: ignore[arg-type]
    assert DataFlow("sqlite:///:memory:").cache is None
    assert DataFlow("sqlite:///:memory:", enable_caching=False).cache is None


# -- in memory --------------------------------------------------------------------------


async def test_reads_are_cached_and_every_write_ends_them(
    make_db: MakeDB, cache_options: dict[str, Any]
) -> None:
    db, Item = await _items(make_db, **cache_options)
    ops = db.ops(Item)
    cache = db.cache
    assert cache is not None
    assert cache.stats()["backend"] == ("redis" if "cache_url" in cache_options else "memory")
    a = await ops.create(id="a", name="apple pie", score=1)
    assert await ops.read("a") == a
    assert await ops.read("a") == a
    assert (cache.hits, cache.misses) == (1, 1)
    # each kind of read is cached under its own arguments
    for _ in range(2):
        assert [r["id"] for r in (await ops.list({"score": 1}))["records"]] == ["a"]
        assert await ops.count() == 1
        assert [r["id"] for r in (await ops.search("apple"))["records"]] == ["a"]
    assert (cache.hits, cache.misses) == (4, 4)

    # every kind of write: the next read sees it
    await ops.update("a", fields={"score": 2})
    assert (await ops.read("a"))["score"] == 2
    assert await ops.count({"score": 2}) == 1
    await ops.create(id="b", name="banana")
    assert await ops.count() == 2
    await ops.upsert(id="b", name="banana split")
    assert [r["id"] for r in (await ops.search("split"))["records"]] == ["b"]
    await ops.bulk_create([{"id": "c", "name": "cherry"}, {"id": "d", "name": "date"}])
    assert await ops.count() == 4
    await ops.bulk_update(filter={"id": {"$in": ["c", "d"]}}, fields={"score": 9})
    assert await ops.count({"score": 9}) == 2
    await ops.bulk_upsert([{"id": "c", "name": "cherry", "score": 8}])
    assert (await ops.read("c"))["score"] == 8
    await ops.bulk_delete(ids=["c"])
    assert await ops.count() == 3
    await ops.delete("d")
    assert [r["id"] for r in (await ops.list(order_by="id"))["records"]] == ["a", "b"]


async def test_a_caller_changing_a_result_does_not_change_the_cache(make_db: MakeDB) -> None:
    db, Item = await _items(make_db, enable_caching=True)
    ops = db.ops(Item)
    await ops.create(id="a", name="x", meta={"k": [1]})
    first = await ops.read("a")
    first["name"] = "changed"
    first["meta"]["k"].append(2)
    page = await ops.list()
    page["records"].clear()
    assert (await ops.read("a"))["name"] == "x"
    assert (await ops.read("a"))["meta"] == {"k": [1]}
    assert len((await ops.list())["records"]) == 1


async def test_entries_expire_after_the_ttl(make_db: MakeDB) -> None:
    db, Item = await _items(make_db, enable_caching=True, cache_ttl=0.05)
    ops = db.ops(Item)
    await ops.create(id="a", name="x")
    await ops.read("a")
    await asyncio.sleep(0.1)  # the TTL itself is what is tested
    await ops.read("a")
    assert db.cache is not None and db.cache.hits == 0


async def test_the_memory_cache_is_bounded(make_db: MakeDB) -> None:
    db, Item = await _items(make_db, enable_caching=True, cache_max_entries=3)
    ops = db.ops(Item)
    await ops.bulk_create([{"id": str(i), "name": "n"} for i in range(5)])
    for i in range(5):
        await ops.read(str(i))
    assert len(db.cache) == 3  # type: ignore[arg-type]
    await ops.read("4")  # the most recent stayed
    assert db.cache is not None and db.cache.hits == 1


async def test_reads_inside_a_transaction_bypass_the_cache(
    make_db: MakeDB, cache_options: dict[str, Any]
) -> None:
    db, Item = await _items(make_db, **cache_options)
    ops = db.ops(Item)
    cache = db.cache
    assert cache is not None
    await ops.create(id="a", name="x", score=1)
    assert (await ops.read("a"))["score"] == 1  # cached
    async with db.transaction():
        await ops.update("a", fields={"score": 2})
        # inside: the transaction's own write, not the cached value
        assert (await ops.read("a"))["score"] == 2
    assert (await ops.read("a"))["score"] == 2  # after the commit
    assert await ops.count({"score": 2}) == 1
    # rolled back: the old value, from the database
    with pytest.raises(RuntimeError):
        async with db.transaction():
            await ops.update("a", fields={"score": 3})
            raise RuntimeError("roll back")
    assert (await ops.read("a"))["score"] == 2


async def test_a_concurrent_reader_never_serves_the_value_from_before_a_write(
    make_db: MakeDB, cache_options: dict[str, Any]
) -> None:
    db, Item = await _items(make_db, **cache_options)
    ops = db.ops(Item)
    await ops.create(id="a", name="x", score=0)
    deadline = asyncio.get_running_loop().time() + 20

    async def reader(stop: asyncio.Event) -> None:
        while not stop.is_set() and asyncio.get_running_loop().time() < deadline:
            await ops.read("a")
            await ops.count({"score": {"$gte": 0}})

    stop = asyncio.Event()
    readers = [asyncio.create_task(reader(stop)) for _ in range(4)]
    try:
        for n in range(1, 31):
            await ops.update("a", fields={"score": n})
            assert (await ops.read("a"))["score"] == n
            assert await ops.count({"score": n}) == 1
    finally:
        stop.set()
        await asyncio.gather(*readers)


async def test_an_atomic_workflow_ends_cached_reads_when_it_commits(
    make_db: MakeDB, cache_options: dict[str, Any]
) -> None:
    db, Item = await _items(make_db, **cache_options)
    ops = db.ops(Item)
    await ops.create(id="a", name="x", score=1)
    assert (await ops.read("a"))["score"] == 1
    assert await ops.count() == 1
    wf = WorkflowBuilder(atomic=True)
    wf.add_node("ItemUpdateNode", "u", {"id": "a", "fields": {"score": 7}})
    wf.add_node("ItemCreateNode", "c", {"id": "b", "name": "y"})
    wf.add_node("ItemReadNode", "r", {})
    wf.add_connection("u", "id", "r", "id")
    result = await AsyncLocalRuntime().execute_workflow_async(wf.build(), {})
    assert result["r"]["score"] == 7  # the read inside saw the write inside
    assert (await ops.read("a"))["score"] == 7
    assert await ops.count() == 2


async def test_tenants_and_scopes_never_share_entries(
    make_db: MakeDB, cache_options: dict[str, Any]
) -> None:
    db = make_db(**cache_options)

    @db.model(tenant_scoped=True)
    class Note:
        id: str
        body: str = ""

    await db.initialize()
    ops = db.ops(Note)
    with tenant_scope("acme"):
        await ops.create(id="n", body="acme's")
        assert (await ops.read("n"))["body"] == "acme's"
        assert await ops.count() == 1
    with tenant_scope("other"):
        await ops.create(id="n", body="other's")
        assert (await ops.read("n"))["body"] == "other's"
        assert [r["body"] for r in (await ops.list())["records"]] == ["other's"]
    with pytest.raises(TenantRequired):
        await ops.read("n")
    # the scope (the server's principal) is part of the key too
    cache = db.cache
    assert cache is not None
    with tenant_scope("acme"):
        hits = cache.hits
        with cache_scope("key:alice"):
            await ops.read("n")
            await ops.read("n")
        with cache_scope("key:bob"):
            await ops.read("n")
        assert cache.hits == hits + 1


# -- Redis ------------------------------------------------------------------------------


async def test_two_dataflows_share_one_redis_cache_and_its_invalidation(
    make_db: MakeDB, redis_prefix: str
) -> None:
    opts: dict[str, Any] = {"cache_url": REDIS_URL, "cache_prefix": redis_prefix}
    db1, Item1 = await _items(make_db, **opts)
    db2, Item2 = await _items(make_db, replica=True, **opts)
    one, two = db1.ops(Item1), db2.ops(Item2)
    await one.create(id="a", name="apple", score=1)
    assert (await one.read("a"))["score"] == 1  # filled by one
    assert (await two.read("a"))["score"] == 1  # served to two
    assert db2.cache is not None and db2.cache.hits == 1
    assert await one.count() == 1
    # a write through the other replica: the next read anywhere sees it
    await two.update("a", fields={"score": 2})
    assert (await one.read("a"))["score"] == 2
    await two.create(id="b", name="banana")
    assert await one.count() == 2
    async with db2.transaction():
        await two.delete("b")
    assert await one.count() == 1
    assert [r["id"] for r in (await one.search("apple"))["records"]] == ["a"]


async def test_redis_entries_keep_every_type(
    make_db: MakeDB,
    redis_prefix: str,
    declare_everything: Callable[[DataFlow], type[Any]],
    tier_enum: Any,
) -> None:
    db = make_db(cache_url=REDIS_URL, cache_prefix=redis_prefix)
    Thing = declare_everything(db)
    await db.initialize()
    ops = db.ops(Thing)
    made = await ops.create(
        text="t",
        blob=b"\x00\xff",
        amount=Decimal("1.10"),
        at=dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC),
        day=dt.date(2026, 1, 2),
        uid=uuid.UUID(int=7),
        tier=tier_enum.PRO,
        meta={"$dt": "not a tag", "n": [1, 2.5, None]},
        tags=["x"],
    )
    fresh = await ops.read(made["id"])
    cached = await ops.read(made["id"])
    assert db.cache is not None and db.cache.hits == 1
    assert cached == fresh == made
    for name, value in fresh.items():  # asyncpg's UUID is a subclass of uuid.UUID
        assert isinstance(value, type(cached[name])), name
    page = await ops.list()
    assert (await ops.list()) == page
    assert db.cache.hits == 2


async def test_redis_down_reads_the_database(make_db: MakeDB, redis_prefix: str) -> None:
    db, Item = await _items(make_db, cache_url="redis://127.0.0.1:1/0", cache_prefix=redis_prefix)
    ops = db.ops(Item)
    await ops.create(id="a", name="x")  # the failed invalidation is logged
    assert (await ops.read("a"))["name"] == "x"
    assert db.cache is not None and db.cache.misses == 1
