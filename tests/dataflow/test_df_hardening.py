"""Issue 14 in DataFlow: every bad input is a ValidationError naming the field (before any
SQL), limits are exact at their boundary, page tokens are signed and bound, explicit ids
never break id generation, bulk requests are capped, and driver details stay out of
messages. Every test runs on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from dataflow import DatabaseError, DataFlow, ValidationError
from dataflow._filters import MAX_FILTER_BRANCHES, MAX_FILTER_DEPTH, MAX_FILTER_OPERANDS
from dataflow._ops import BULK_BATCH_ROWS, MAX_EXPLICIT_ID
from dataflow._pagination import filter_digest, parse_order, token_context
from dataflow._values import DECIMAL_FRACTION_DIGITS, DECIMAL_INTEGER_DIGITS, JSON_MAX_DEPTH
from workflow import AsyncLocalRuntime, NodeExecutionError, WorkflowBuilder

pytestmark = pytest.mark.timeout(120)

MakeDB = Callable[..., DataFlow]
Declare = Callable[[DataFlow], type[Any]]


async def run_node(node_type: str, params: dict[str, Any]) -> dict[str, Any]:
    wf = WorkflowBuilder()
    wf.add_node(node_type, "n", params)
    return (await AsyncLocalRuntime().execute_workflow_async(wf.build()))["n"]


@pytest.fixture
async def things(make_db: MakeDB, declare_everything: Declare) -> tuple[DataFlow, Any]:
    db = make_db()
    model = declare_everything(db)
    await db.initialize()
    return db, model


def _deep(levels: int) -> dict[str, Any]:
    """A filter nested `levels` levels deep (each `$not` adds one)."""
    flt: dict[str, Any] = {"score": 1}
    for _ in range(levels - 1):
        flt = {"$not": flt}
    return flt


# (field, bad value, words in the reason)
BAD_VALUES = [
    ("at", "9999-12-31T23:59:59-05:00", "UTC"),
    ("at", "0001-01-01T00:00:00+05:00", "UTC"),
    ("count", 2**63, "64-bit"),
    ("count", -(2**63) - 1, "64-bit"),
    ("amount", "NaN", "NaN"),
    ("amount", "sNaN", "NaN"),
    ("amount", "Infinity", "NaN"),
    ("amount", "-Infinity", "NaN"),
    ("amount", "1e999999", "digits"),
    ("amount", "1e-1001", "digits"),
    ("ratio", float("nan"), "NaN"),
    ("ratio", float("inf"), "NaN"),
    ("ratio", float("-inf"), "NaN"),
    ("text", "a\x00b", "NUL"),
    ("meta", {"k": "a\x00b"}, "NUL"),
    ("meta", {"nested": [{"k\x00": 1}]}, "NUL"),
    ("meta", {"x": float("nan")}, "NaN"),
    ("tags", [1, [2, ["\x00"]]], "NUL"),
]


@pytest.mark.parametrize(("name", "value", "words"), BAD_VALUES)
async def test_bad_values_are_refused_on_every_write_path(
    things: tuple[DataFlow, Any], name: str, value: Any, words: str
) -> None:
    db, Thing = things
    ops = db.ops(Thing)
    await ops.create(id=1)
    before = await ops.read(1)

    async def refused(call: Any) -> ValidationError:
        with pytest.raises(ValidationError) as ei:
            await call
        assert ei.value.field == name and words in ei.value.reason, ei.value
        return ei.value

    await refused(ops.create(**{name: value}))
    await refused(ops.update(1, fields={name: value}))
    await refused(ops.upsert(id=1, **{name: value}))
    assert (await refused(ops.bulk_create([{}, {name: value}]))).row == 1
    await refused(ops.bulk_update([{"id": 1, name: value}]))
    await refused(ops.bulk_update(filter={"id": 1}, fields={name: value}))
    await refused(ops.bulk_upsert([{"id": 1, name: value}]))
    async with db.transaction():  # the SQLAlchemy path (no fast path) too
        await refused(ops.create(**{name: value}))
    with pytest.raises(NodeExecutionError) as ne:
        await run_node("ThingCreateNode", {name: value})
    assert isinstance(ne.value.cause, ValidationError) and ne.value.cause.field == name
    assert await ops.count() == 1
    assert await ops.read(1) == before


@pytest.mark.parametrize(
    ("name", "value", "words"),
    # JSON fields are not compared by filters (their own refusal is tested elsewhere)
    [case for case in BAD_VALUES if case[0] not in ("meta", "tags")],
)
async def test_bad_values_are_refused_in_filters(
    things: tuple[DataFlow, Any], name: str, value: Any, words: str
) -> None:
    db, Thing = things
    ops = db.ops(Thing)
    for flt, path in [
        ({name: value}, f"filter.{name}"),
        ({name: {"$ne": value}}, f"filter.{name}.$ne"),
        ({name: {"$in": [value]}}, f"filter.{name}.$in[0]"),
        ({"$or": [{name: value}]}, f"filter.$or[0].{name}"),
    ]:
        with pytest.raises(ValidationError) as ei:
            await ops.count(flt)
        assert ei.value.field == path and words in ei.value.reason


@pytest.mark.parametrize("value", ["9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"])
async def test_created_at_filter_overflow(things: tuple[DataFlow, Any], value: str) -> None:
    db, Thing = things
    with pytest.raises(ValidationError) as ei:
        await db.ops(Thing).list({"created_at": {"$gte": value}})
    assert ei.value.field == "filter.created_at.$gte"


async def test_edge_values_are_stored(things: tuple[DataFlow, Any]) -> None:
    db, Thing = things
    ops = db.ops(Thing)
    big = Decimal("9" * DECIMAL_INTEGER_DIGITS + "." + "1" * DECIMAL_FRACTION_DIGITS)
    deep: Any = "leaf"
    for _ in range(JSON_MAX_DEPTH - 1):
        deep = [deep]
    rec = await ops.create(
        count=2**63 - 1,
        amount=big,
        ratio=-1.5e308,
        at="9999-12-31T23:59:59+00:00",
        meta={"deep": deep},
    )
    back = await ops.read(rec["id"])
    assert back["count"] == 2**63 - 1 and back["amount"] == big
    assert back["at"] == dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
    assert await ops.count({"count": 2**63 - 1}) == 1
    with pytest.raises(ValidationError, match="nested"):
        await ops.create(meta={"deep": [deep]})


async def test_nul_in_ids_is_refused_the_same_everywhere(contacts: tuple[DataFlow, Any]) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    with pytest.raises(ValidationError) as ei:
        await ops.create(id="a\x00", name="n", email="e")
    assert ei.value.field == "id"
    for call in (ops.read("a\x00"), ops.delete("a\x00"), ops.update("a\x00", fields={"score": 1})):
        with pytest.raises(ValidationError) as ei:
            await call
        assert ei.value.field == "id"
    with pytest.raises(ValidationError) as ei:
        await ops.bulk_delete(ids=["x", "\x00"])
    assert ei.value.field == "ids[1]"
    with pytest.raises(ValidationError, match="NUL"):
        db.driver_value("a\x00b", "request_id")
    with pytest.raises(ValidationError) as ei:
        await db.executemany("SELECT 1", [["ok"], ["a\x00"]])
    assert ei.value.field == "rows[1][0]"


async def test_long_inputs_are_not_echoed(contacts: tuple[DataFlow, Any]) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    long = "x" * 10_000
    for call in (
        ops.read(long),
        ops.create(name="n", email="e", **{long: 1}),
        ops.count({long: 1}),
        ops.count({"name": {long: 1}}),
    ):
        with pytest.raises(Exception) as ei:
            await call
        assert len(str(ei.value)) < 400, str(ei.value)[:100]


# -- filters ------------------------------------------------------------------------


async def test_filter_limits_are_exact(contacts: tuple[DataFlow, Any]) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.create(id="a", name="n", email="e", score=1)
    ok_in = {"id": {"$in": [f"i{i}" for i in range(MAX_FILTER_OPERANDS - 1)] + ["a"]}}
    assert await ops.count(ok_in) == 1
    with pytest.raises(ValidationError) as ei:
        await ops.count({"id": {"$in": [f"i{i}" for i in range(40_000)]}})
    assert ei.value.field == "filter.id.$in" and "operands" in ei.value.reason
    with pytest.raises(ValidationError):
        await ops.count({"id": {"$in": ["a"] * MAX_FILTER_OPERANDS}, "score": 1})
    # branches: the limit, and the operand total across branches of many leaves
    wide = {"$or": [{"score": i} for i in range(MAX_FILTER_BRANCHES - 1)] + [{"id": "a"}]}
    assert await ops.count(wide) == 1
    with pytest.raises(ValidationError) as ei:
        await ops.count({"$or": [{"score": i} for i in range(1001)]})
    assert ei.value.field == "filter.$or" and "at most" in ei.value.reason
    per = MAX_FILTER_OPERANDS // MAX_FILTER_BRANCHES
    many = {
        "$or": [
            {"$and": [{"score": {"$ne": -k - 1}} for k in range(per - 1)] + [{"id": "a"}]}
            for _ in range(MAX_FILTER_BRANCHES)
        ]
    }
    assert await ops.count(many) == 1  # exactly MAX_FILTER_OPERANDS leaves
    many["$or"][0]["$and"].append({"score": 1})
    with pytest.raises(ValidationError, match="operands"):
        await ops.count(many)
    # depth: the limit is accepted, one more is refused before any SQL
    assert await ops.count(_deep(MAX_FILTER_DEPTH)) in (0, 1)
    with pytest.raises(ValidationError, match="nested at most"):
        await ops.count(_deep(MAX_FILTER_DEPTH + 1))
    with pytest.raises(ValidationError, match="nested at most"):
        await ops.count(_deep(5000))


async def test_empty_or_matches_nothing_and_empty_and_everything(
    contacts: tuple[DataFlow, Any],
) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.bulk_create([{"name": "n", "email": f"e{i}"} for i in range(3)])
    assert await ops.count({"$or": []}) == 0
    assert await ops.count({"$and": []}) == 3
    assert await ops.count({"$not": {"$or": []}}) == 3
    assert await ops.count({"id": {"$nin": []}}) == 3
    assert await ops.count({"id": {"$in": []}}) == 0


EVERYTHING = [
    {},
    {"$and": []},
    {"$not": {"$or": []}},
    {"$or": [{}, {"score": 1}]},
    {"$and": [{"$and": []}, {"$not": {"$or": [{"$or": []}]}}]},
    {"$not": {"$not": {}}},
    {"id": {"$nin": []}},
    {"id": {"$ne": None}},
    {"id": {"$null": False}},
    {"$or": [{"score": 1}, {"$not": {"id": {"$in": []}}}]},
    {"score": {"$not": {"$in": []}}},
]


@pytest.mark.parametrize("flt", EVERYTHING, ids=[json.dumps(f) for f in EVERYTHING])
async def test_filters_matching_everything_by_shape_need_all(
    contacts: tuple[DataFlow, Any], flt: dict[str, Any]
) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.bulk_create([{"name": "n", "email": f"e{i}", "score": i} for i in range(3)])
    for call in (
        ops.bulk_update(filter=flt, fields={"company": "X"}),
        ops.bulk_delete(flt),
        ops.update(filter=flt, fields={"company": "X"}),
    ):
        with pytest.raises(ValidationError) as ei:
            await call
        assert ei.value.field == "filter" and "all=True" in ei.value.reason
    with pytest.raises(NodeExecutionError):
        await run_node("ContactBulkDeleteNode", {"filter": flt})
    assert await ops.count({"company": "X"}) == 0 and await ops.count() == 3
    assert await ops.bulk_update(filter=flt, fields={"company": "X"}, all=True) == 3
    assert await ops.bulk_delete(flt, all=True) == 3


async def test_filters_that_depend_on_data_need_no_all(contacts: tuple[DataFlow, Any]) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.bulk_create([{"name": "n", "email": f"e{i}", "score": i} for i in range(3)])
    assert await ops.bulk_update(filter={"$or": [{"score": 1}, {"$or": []}]}, fields={"score": 9})
    assert await ops.bulk_delete({"$not": {"score": 9}}) == 2
    assert await ops.bulk_delete({"$or": []}) == 0  # matches nothing: harmless


# -- page tokens ----------------------------------------------------------------------


async def test_page_tokens_are_signed_and_bound(
    contacts: tuple[DataFlow, Any], make_db: MakeDB, declare_everything: Declare
) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.bulk_create([{"name": f"n{i}", "email": f"e{i}", "score": i} for i in range(6)])
    flt = {"score": {"$lt": 5}}
    token = (await ops.list(flt, order_by="name", limit=2))["next_page_token"]
    assert token
    page = await ops.list({"score": {"$lt": 5}}, order_by="name", limit=2, page_token=token)
    assert [r["name"] for r in page["records"]] == ["n2", "n3"]
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    tampered = bytearray(raw)
    tampered[-2] ^= 1
    nested = b"[" * 100_000 + b"]" * 100_000
    forged = [
        "garbage!",
        "",
        "x" * 10_000,
        base64.urlsafe_b64encode(bytes(tampered)).decode().rstrip("="),
        base64.urlsafe_b64encode(raw[:32] + nested).decode(),
        base64.urlsafe_b64encode(b'{"k":["name","id"],"v":["n1","x"]}').decode(),
    ]
    for bad in forged:
        with pytest.raises(ValidationError) as ei:
            await ops.list(flt, order_by="name", limit=2, page_token=bad or "=")
        assert ei.value.field == "page_token"
    for other in [
        {"filter": {"score": {"$lt": 4}}, "order_by": "name"},
        {"filter": None, "order_by": "name"},
        {"filter": flt, "order_by": "-name"},
        {"filter": flt, "order_by": ["name", "score"]},
    ]:
        with pytest.raises(ValidationError) as ei:
            await ops.list(other["filter"], order_by=other["order_by"], limit=2, page_token=token)
        assert ei.value.field == "page_token"
    # another model with the same order and filter shape: refused too
    other_db = make_db()
    Thing = declare_everything(other_db)
    with pytest.raises(ValidationError) as ei:
        await other_db.ops(Thing).list(order_by="id", limit=1, page_token=token)
    assert ei.value.field == "page_token"


async def test_token_secret_is_per_database_and_persistent(
    contacts: tuple[DataFlow, Any], make_db: MakeDB, declare_contact: Declare, url: str
) -> None:
    db, Contact = contacts
    await db.ops(Contact).bulk_create([{"name": "a", "email": "a"}, {"name": "b", "email": "b"}])
    first = await db.ops(Contact).list(limit=1)
    token = first["next_page_token"]
    signed = await db.sign_token(b"payload", "ctx")
    assert await db.verify_token(signed, "ctx") == b"payload"
    with pytest.raises(ValidationError) as ei:
        await db.verify_token(signed, "other", field="page_token")
    assert ei.value.field == "page_token"
    # a second instance on the same database (a restart) accepts the first one's tokens
    await db.close()
    again = make_db(skip_migration=True)
    C2 = declare_contact(again)
    assert await again.verify_token(signed, "ctx") == b"payload"
    page = await again.ops(C2).list(limit=1, page_token=token)
    assert len(page["records"]) == 1 and page["records"][0] != first["records"][0]


async def test_signed_token_with_out_of_range_int_is_refused(
    things: tuple[DataFlow, Any],
) -> None:
    db, Thing = things
    ops = db.ops(Thing)
    keys = parse_order(ops._fc, "count")
    ctx = token_context("Thing", keys, filter_digest(None))
    good = await db.sign_token(json.dumps([1, 1]).encode(), ctx)
    assert (await ops.list(order_by="count", limit=1, page_token=good))["records"] == []
    for payload in ([2**63, 1], [1, -(2**63) - 1], [1], "x"):
        bad = await db.sign_token(json.dumps(payload).encode(), ctx)
        with pytest.raises(ValidationError) as ei:
            await ops.list(order_by="count", limit=1, page_token=bad)
        assert ei.value.field == "page_token"


# -- explicit ids ---------------------------------------------------------------------


async def test_explicit_ids_never_break_generation(things: tuple[DataFlow, Any]) -> None:
    db, Thing = things
    ops = db.ops(Thing)
    for bad in (-1, 0, MAX_EXPLICIT_ID + 1, 2**63 - 1):
        for call in (
            ops.create(id=bad),
            ops.upsert(id=bad),
            ops.bulk_create([{"id": bad}]),
            ops.bulk_upsert([{"id": bad}]),
        ):
            with pytest.raises(ValidationError) as ei:
                await call
            assert ei.value.field == "id" and "between 1 and" in ei.value.reason
    assert await ops.count() == 0
    assert (await ops.create())["id"] == 1  # generation works on the empty table
    assert (await ops.create(id=MAX_EXPLICIT_ID))["id"] == MAX_EXPLICIT_ID
    nxt = (await ops.create())["id"]
    assert nxt == MAX_EXPLICIT_ID + 1
    assert await ops.bulk_create([{}, {}]) == 2
    assert await ops.count() == 5
    with pytest.raises(NodeExecutionError):
        await run_node("ThingCreateNode", {"id": -1})


# -- bulk size ------------------------------------------------------------------------


async def test_bulk_row_cap_is_exact(make_db: MakeDB, declare_contact: Declare) -> None:
    db = make_db(max_bulk_rows=50)
    Contact = declare_contact(db)
    ops = db.ops(Contact)

    def rows(n: int, tag: str) -> list[dict[str, Any]]:
        return [{"id": f"{tag}{i}", "name": "n", "email": f"{tag}{i}"} for i in range(n)]

    calls = [
        lambda: ops.bulk_create(rows(51, "c")),
        lambda: ops.bulk_upsert(rows(51, "u")),
        lambda: ops.bulk_update([{"id": f"c{i}", "score": 1} for i in range(51)]),
    ]
    for call in calls:
        with pytest.raises(ValidationError) as ei:
            await call()
        assert ei.value.field == "records" and ei.value.reason == (
            "at most 50 rows per request, got 51"
        )
    with pytest.raises(ValidationError) as ei:
        await ops.bulk_delete(ids=[f"c{i}" for i in range(51)])
    assert ei.value.field == "ids"
    with pytest.raises(NodeExecutionError) as ne:
        await run_node("ContactBulkCreateNode", {"data": rows(51, "n")})
    assert isinstance(ne.value.cause, ValidationError) and ne.value.cause.field == "records"
    assert await ops.count() == 0
    assert await ops.bulk_create(rows(50, "c")) == 50
    assert await ops.bulk_upsert(rows(50, "c")) == 50
    assert await ops.bulk_update([{"id": f"c{i}", "score": 1} for i in range(50)]) == 50
    assert await ops.bulk_delete(ids=[f"c{i}" for i in range(50)]) == 50
    assert DataFlow("sqlite:///:memory:").max_bulk_rows == 10_000
    with pytest.raises(ValidationError):
        DataFlow("sqlite:///:memory:", max_bulk_rows=0)


async def test_batched_bulk_writes_stay_atomic(contacts: tuple[DataFlow, Any]) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    n = BULK_BATCH_ROWS * 2 + 500
    data = [{"id": f"r{i}", "name": "n", "email": f"e{i}"} for i in range(n)]
    data[-1]["email"] = "e3"  # passes validation, fails in the last batch
    with pytest.raises(Exception, match="already exists"):
        await ops.bulk_create(data)
    assert await ops.count() == 0
    data[-1]["email"] = f"e{n - 1}"
    assert await ops.bulk_create(data) == n
    up = [{"id": f"r{i}", "name": "n", "email": f"e{i}", "score": 1} for i in range(n)]
    up[-1]["email"] = "e3"
    with pytest.raises(Exception, match="already exists"):
        await ops.bulk_upsert(up)
    assert await ops.count({"score": 1}) == 0
    assert await ops.bulk_delete(ids=[f"r{i}" for i in range(n)]) == n


# -- reads of values stored before these rules ------------------------------------------


async def test_stored_non_finite_floats_still_read(
    things: tuple[DataFlow, Any], backend: str
) -> None:
    db, Thing = things
    ops = db.ops(Thing)
    for i in range(1, 4):
        await ops.create(id=i, ratio=float(i))
    # written behind DataFlow's back, as an older version could have
    specials = [float("inf"), float("-inf")] + ([float("nan")] if backend == "postgres" else [])
    async with db.connection() as conn:
        for i, v in enumerate(specials, start=1):
            stmt = sa.text("UPDATE thing SET ratio = :v WHERE id = :i")
            await conn.execute(stmt, {"v": v, "i": i})
    assert (await ops.read(1))["ratio"] == float("inf")
    listed = (await ops.list(order_by="ratio"))["records"]
    assert len(listed) == 3
    seen = []
    token = None
    for _ in range(5):
        page = await ops.list(order_by="-ratio", limit=1, page_token=token)
        seen += [r["id"] for r in page["records"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert sorted(seen) == [1, 2, 3]


# -- driver details -------------------------------------------------------------------


async def test_database_errors_say_what_failed_in_words(
    contacts: tuple[DataFlow, Any], caplog: pytest.LogCaptureFixture
) -> None:
    db, Contact = contacts
    async with db.connection() as conn:
        await conn.execute(sa.text("DROP TABLE contact"))
    caplog.set_level(logging.WARNING, logger="dataflow")
    with pytest.raises(DatabaseError) as ei:
        await db.ops(Contact).list({"score": 1})
    text = str(ei.value)
    assert "table 'contact' does not exist" in text
    for leak in ("Error", "SELECT", "sqlite", "asyncpg", "/", "127.0.0.1"):
        assert leak not in text, text
    assert any("contact" in r.getMessage() for r in caplog.records)


async def test_unreachable_database_message(declare_contact: Declare) -> None:
    db = DataFlow("postgresql://postgres@127.0.0.1:1/nowhere")
    try:
        Contact = declare_contact(db)
        with pytest.raises(DatabaseError) as ei:
            await db.ops(Contact).count()
        assert str(ei.value) == "the database is unreachable"
    finally:
        await db.close()
