"""List and Count on the fast path: SQL compiled once per query shape, values bound.

Each test runs on SQLite and PostgreSQL. The results of the fast path (outside any
transaction) are checked against known answers and against the same call inside
`DataFlow.transaction()`, which goes through SQLAlchemy.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest

from dataflow import DataFlow, ValidationError, field, tenant_scope
from dataflow._fastpath import SHAPE_CACHE_SIZE

Contacts = tuple[DataFlow, type[Any]]
MakeDB = Callable[..., DataFlow]

PEOPLE = [
    {"id": "a", "name": "Ada", "email": "ada@x", "company": "ACME", "score": 10},
    {"id": "b", "name": "bob", "email": "bob@y", "company": None, "score": 20},
    {"id": "c", "name": "Cy", "email": "cy@x", "company": "Init", "score": 30},
    {"id": "d", "name": "dee", "email": "dee@z", "company": "ACME", "score": 40},
    {"id": "e", "name": "Eve", "email": "eve@x", "company": None, "score": 50},
]


@pytest.fixture
async def people(contacts: Contacts) -> Contacts:
    db, Contact = contacts
    await db.ops(Contact).bulk_create(PEOPLE)
    return db, Contact


def _ids(result: dict[str, Any]) -> list[str]:
    return [r["id"] for r in result["records"]]


async def test_same_shape_compiles_once_and_binds_each_calls_values(people: Contacts) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    queries = ops._queries
    before = queries.compiled
    flt = lambda lo, co: {"score": {"$gte": lo}, "company": co}  # noqa: E731
    assert _ids(await ops.list(flt(10, "ACME"), order_by="-score", limit=10)) == ["d", "a"]
    assert queries.compiled == before + 1
    assert _ids(await ops.list(flt(20, "ACME"), order_by="-score", limit=3)) == ["d"]
    assert _ids(await ops.list(flt(0, "Init"), order_by="-score", limit=10)) == ["c"]
    assert _ids(await ops.list(flt(99, "Init"), order_by="-score", limit=10)) == []
    assert queries.compiled == before + 1  # the same shape each time
    # another order, another shape
    assert _ids(await ops.list(flt(0, "ACME"), order_by="name", limit=10)) == ["a", "d"]
    assert queries.compiled == before + 2
    # Count: one shape per filter structure, whatever the values
    assert await ops.count({"score": {"$gt": 15}}) == 4
    assert await ops.count({"score": {"$gt": 35}}) == 2
    assert await ops.count({"score": {"$gt": 99}}) == 0
    assert queries.compiled == before + 3
    assert await ops.count() == 5


@pytest.mark.parametrize(
    ("values", "expected"),
    [([], []), (["c"], ["c"]), (["a", "e"], ["a", "e"]), (["e", "zz", "b"], ["b", "e"])],
)
async def test_in_lists_of_any_length(
    people: Contacts, values: list[str], expected: list[str]
) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    assert _ids(await ops.list({"id": {"$in": values}})) == expected
    assert await ops.count({"id": {"$in": values}}) == len(expected)
    rest = sorted({"a", "b", "c", "d", "e"} - set(values))
    assert _ids(await ops.list({"id": {"$nin": values}})) == rest
    assert await ops.count({"id": {"$nin": values}}) == len(rest)


async def test_in_lists_share_a_shape_per_power_of_two(people: Contacts) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    queries = ops._queries
    before = queries.compiled
    ids = ["a", "b", "c", "d", "e"]
    for n in range(6):  # lengths 0, 1, 2, 3-4, 5-8: five shapes
        assert _ids(await ops.list({"id": {"$in": ids[:n]}})) == ids[:n]
        assert _ids(await ops.list({"id": {"$nin": ids[:n]}})) == ids[n:]
    assert queries.compiled == before + 10
    assert _ids(await ops.list({"id": {"$in": ["e", "d"]}})) == ["d", "e"]
    assert _ids(await ops.list({"id": {"$in": ["e", "zz", "b", "b", "a", "c", "e"]}})) == [
        "a",
        "b",
        "c",
        "e",
    ]
    assert queries.compiled == before + 10  # lengths 2 and 7 again
    assert await ops.count({"id": {"$nin": ["a", "b", "zz"]}}) == 3


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"company": None}, ["b", "e"]),
        ({"company": {"$eq": None}}, ["b", "e"]),
        ({"company": {"$ne": None}}, ["a", "c", "d"]),
        ({"company": {"$null": True}}, ["b", "e"]),
        ({"company": {"$null": False}}, ["a", "c", "d"]),
        # $ne and $nin match a NULL (the value is not there)
        ({"company": {"$ne": "ACME"}}, ["b", "c", "e"]),
        ({"company": {"$nin": ["ACME"]}}, ["b", "c", "e"]),
        ({"$not": {"company": "ACME"}}, ["c"]),
        ({"$or": [{"company": None}, {"score": 30}]}, ["b", "c", "e"]),
    ],
)
async def test_null_comparisons(people: Contacts, flt: dict[str, Any], expected: list[str]) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    assert _ids(await ops.list(flt)) == expected
    assert await ops.count(flt) == len(expected)
    async with db.transaction():  # through SQLAlchemy: the same answer
        assert _ids(await ops.list(flt)) == expected
        assert await ops.count(flt) == len(expected)


@pytest.mark.parametrize("order", ["company", "-company", ["company", "-score"]])
async def test_keyset_pages_over_nulls(people: Contacts, order: Any) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    everything = _ids(await ops.list(order_by=order))
    async with db.transaction():
        assert _ids(await ops.list(order_by=order)) == everything
    seen: list[str] = []
    token = None
    for _ in range(10):  # bounded: five records, a page of one
        page = await ops.list(order_by=order, limit=1, page_token=token)
        seen += _ids(page)
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == everything
    assert len(seen) == 5


async def test_limit_and_offset(people: Contacts) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    assert _ids(await ops.list(order_by="score", offset=3)) == ["d", "e"]
    assert _ids(await ops.list(order_by="score", limit=2, offset=1)) == ["b", "c"]
    page = await ops.list(order_by="score", limit=2, offset=3)
    assert _ids(page) == ["d", "e"]
    assert page["next_page_token"] is None
    page = await ops.list({"score": {"$gt": 10}}, order_by="-score", limit=2, fields=["name"])
    assert page["records"] == [{"name": "Eve"}, {"name": "dee"}]
    assert page["next_page_token"] is not None
    nxt = await ops.list(
        {"score": {"$gt": 10}}, order_by="-score", limit=2, page_token=page["next_page_token"]
    )
    assert _ids(nxt) == ["c", "b"]


async def test_validation_errors_are_unchanged(people: Contacts) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    with pytest.raises(ValidationError, match=r"filter\.score.*expected int"):
        await ops.list({"score": {"$gt": "x"}})
    with pytest.raises(ValidationError, match=r"filter\.nope.*unknown field"):
        await ops.count({"nope": 1})
    with pytest.raises(ValidationError, match=r"limit"):
        await ops.list({}, limit=0)


async def test_the_cache_is_bounded(people: Contacts) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    queries = ops._queries

    def flt(n: int) -> dict[str, Any]:
        # a distinct shape per n (an $and of n // 50 conditions and an $or of n % 50)
        either = {"$or": [{"score": {"$gt": 100}}] * (n % 50) + [{"score": {"$lt": 25}}]}
        return {"$and": [{"score": {"$gt": -1}}] * (n // 50) + [either]}

    for n in range(SHAPE_CACHE_SIZE + 10):
        assert await ops.count(flt(n)) == 2
    assert len(queries) == SHAPE_CACHE_SIZE
    compiled = queries.compiled
    assert await ops.count(flt(SHAPE_CACHE_SIZE + 9)) == 2
    assert queries.compiled == compiled  # recent: still there
    assert await ops.count(flt(0)) == 2
    assert queries.compiled == compiled + 1  # the oldest was dropped: compiled again
    assert len(queries) == SHAPE_CACHE_SIZE


@contextlib.contextmanager
def _recording(db: DataFlow, seen: list[str]) -> Iterator[None]:
    @contextlib.contextmanager
    def hook(sql: str) -> Iterator[None]:
        seen.append(sql)
        yield

    db.set_statement_hook(hook)
    try:
        yield
    finally:
        db.set_statement_hook(None)


async def test_statement_hook_sees_the_sql_without_values(people: Contacts) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    seen: list[str] = []
    with _recording(db, seen):
        await ops.list({"email": "secret@x"}, order_by="name", limit=5)
        await ops.count({"email": "secret@x"})
    assert len(seen) == 2
    assert all("secret" not in s for s in seen)
    assert "ORDER BY" in seen[0]
    assert "count(*)" in seen[1]


async def test_every_type_same_as_sqlalchemy(
    make_db: MakeDB, declare_everything: Any, tier_enum: Any
) -> None:
    db = make_db()
    Thing = declare_everything(db)
    await db.initialize()
    ops = db.ops(Thing)
    t0 = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
    uid = uuid.UUID("12345678-1234-5678-1234-567812345678")
    tier = tier_enum
    await ops.bulk_create(
        [
            {"id": 1, "text": "x", "count": 1, "ratio": 0.5, "flag": True,
             "amount": Decimal("1.25"), "at": t0, "day": dt.date(2026, 1, 2), "uid": uid,
             "tier": tier.PRO, "meta": {"k": 1}, "tags": ["a"]},
            {"id": 2, "text": "y", "count": 2, "ratio": 1.5, "flag": False,
             "amount": Decimal("10.5"), "at": t0 + dt.timedelta(days=1),
             "day": dt.date(2026, 1, 3)},
            {"id": 3, "text": "z"},
        ]
    )  # fmt: skip
    filters: list[tuple[dict[str, Any], list[int]]] = [
        ({"flag": True}, [1]),
        ({"amount": {"$gt": Decimal("1.3")}}, [2]),
        ({"amount": {"$in": [Decimal("1.25"), Decimal("0")]}}, [1, 3]),
        ({"at": {"$gte": t0 + dt.timedelta(hours=1)}}, [2]),
        ({"at": t0}, [1]),
        ({"day": {"$lt": dt.date(2026, 1, 3)}}, [1]),
        ({"uid": str(uid)}, [1]),
        ({"tier": "pro"}, [1]),
        ({"tier": {"$in": ["free"]}}, [2, 3]),
        ({"meta": {"$null": False}}, [1]),
        ({"ratio": {"$lte": 0.5}}, [1, 3]),
    ]
    for flt, expected in filters:
        fast = await ops.list(flt)
        assert [r["id"] for r in fast["records"]] == expected, flt
        assert await ops.count(flt) == len(expected), flt
        async with db.transaction():
            slow = await ops.list(flt)
        assert fast == slow, flt
    # ordered by every orderable type, paged: the tokens carry each type's values
    for order in ["-amount", "at", "-day", "uid", "tier", "ratio", "-flag"]:
        full = _ids(await ops.list(order_by=order))
        seen: list[Any] = []
        token = None
        for _ in range(5):
            page = await ops.list(order_by=order, limit=1, page_token=token)
            seen += _ids(page)
            token = page["next_page_token"]
            if token is None:
                break
        assert seen == full, order


async def test_tenants_list_and_count_their_own(make_db: MakeDB) -> None:
    db = make_db()

    @db.model(tenant_scoped=True)
    class Note:
        id: str
        title: str
        score: int = field(default=0, index=True)

    await db.initialize()
    ops = db.ops(Note)
    for tenant, n in (("acme", 3), ("globex", 2)):
        with tenant_scope(tenant):
            await ops.bulk_create(
                [{"id": f"{tenant}{i}", "title": "t", "score": i} for i in range(n)]
            )
    with tenant_scope("acme"):
        assert await ops.count() == 3
        assert await ops.count({"score": {"$gte": 1}}) == 2
        assert _ids(await ops.list({"score": {"$gte": 1}}, order_by="-score")) == ["acme2", "acme1"]
    with tenant_scope("globex"):
        assert await ops.count({"score": {"$gte": 1}}) == 1
        page = await ops.list(order_by="score", limit=1)
        assert _ids(page) == ["globex0"]
        nxt = await ops.list(order_by="score", limit=1, page_token=page["next_page_token"])
        assert _ids(nxt) == ["globex1"]


async def test_bulk_update_and_delete_by_filter_reuse_their_shapes(people: Contacts) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    queries = ops._queries
    before = queries.compiled
    assert await ops.bulk_update(filter={"company": "ACME"}, fields={"score": 1}) == 2
    assert await ops.bulk_update(filter={"company": "Init"}, fields={"score": 2}) == 1
    assert queries.compiled == before + 1  # same filter shape, same fields set
    assert await ops.bulk_update(filter={"company": "Init"}, fields={"name": "C"}) == 1
    assert queries.compiled == before + 2  # another field set
    got = {r["id"]: (r["name"], r["score"]) for r in (await ops.list())["records"]}
    assert got == {
        "a": ("Ada", 1),
        "b": ("bob", 20),
        "c": ("C", 2),
        "d": ("dee", 1),
        "e": ("Eve", 50),
    }
    updated = await ops.read("a")
    assert updated["updated_at"] > updated["created_at"]
    with pytest.raises(ValidationError, match="matches every Contact"):
        await ops.bulk_delete({"$and": []})
    assert await ops.bulk_delete({"score": {"$lt": 2}}) == 2
    assert await ops.bulk_delete({"score": {"$lt": 0}}) == 0
    async with db.transaction():  # through SQLAlchemy, in the transaction
        assert await ops.bulk_delete({"company": None}) == 2
        assert await ops.count() == 1
    assert _ids(await ops.list()) == ["c"]


async def test_long_sqlite_queries_leave_the_callers_thread(
    people: Contacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A query that takes more steps than allowed on the caller's thread is interrupted
    there and run again in the driver's thread: same answer."""
    db, Contact = people
    if db.dialect != "sqlite":
        pytest.skip("SQLite only: PostgreSQL runs every query in its server")
    import dataflow._dataflow as dfm

    ops = db.ops(Contact)
    await ops.bulk_create(
        [{"id": f"z{i:04d}", "name": "z", "email": f"z{i}@z", "score": i} for i in range(2000)]
    )
    flt = {"name": "z", "score": {"$gte": 1000}}
    assert await ops.count(flt) == 1000
    prep = ops._queries.count_sql(ops._fc.shape(flt)[0])
    assert prep.skip_here == 0  # it ran on the caller's thread
    monkeypatch.setattr(dfm, "HERE_QUERY_STEPS", 2 * dfm._PROGRESS_EVERY)
    assert await ops.count(flt) == 1000
    assert prep.skip_here == dfm.HERE_SKIP  # interrupted: the next calls go to the thread
    assert len((await ops.list(flt))["records"]) == 1000
    assert await ops.count(flt) == 1000
    assert prep.skip_here == dfm.HERE_SKIP - 1


async def test_search_reuses_its_shapes(make_db: MakeDB) -> None:
    db = make_db()

    @db.model
    class Doc:
        id: str
        title: str = field(searchable=True)
        score: int = 0

    await db.initialize()
    ops = db.ops(Doc)
    words = ["red apple", "green apple", "red pear", "apple pie", "blue sky"]
    await ops.bulk_create([{"id": f"d{i}", "title": w, "score": i} for i, w in enumerate(words)])
    queries = ops._queries
    before = queries.compiled
    found = await ops.search("apple", {"score": {"$gte": 0}})
    assert sorted(r["id"] for r in found["records"]) == ["d0", "d1", "d3"]
    assert len(found["scores"]) == 3
    found = await ops.search("red", {"score": {"$gte": 1}})
    assert [r["id"] for r in found["records"]] == ["d2"]
    assert queries.compiled == before + 1  # another query text and value: same shape
    # pages by token: another shape (the page starts after a score and an id)
    seen: list[str] = []
    token = None
    for _ in range(5):
        page = await ops.search("apple", limit=1, page_token=token)
        seen += [r["id"] for r in page["records"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert sorted(seen) == ["d0", "d1", "d3"]
    # no query: every record of the filter, score 0, in id order
    listed = await ops.search(None, {"score": {"$lt": 2}}, fields=["title"])
    assert listed == {
        "records": [{"title": "red apple"}, {"title": "green apple"}],
        "scores": [0.0, 0.0],
        "next_page_token": None,
    }
    async with db.transaction():  # through SQLAlchemy: the same answer
        assert await ops.search(None, {"score": {"$lt": 2}}, fields=["title"]) == listed
        slow = await ops.search("apple", {"score": {"$gte": 0}})
    assert slow == await ops.search("apple", {"score": {"$gte": 0}})
