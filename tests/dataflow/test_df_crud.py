"""Single-record operations, value fidelity and errors, through nodes and the direct API."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from dataflow import (
    AlreadyExistsError,
    ConflictError,
    DataFlow,
    NotFoundError,
    ValidationError,
)
from workflow import AsyncLocalRuntime, InvalidInputsError, NodeExecutionError, WorkflowBuilder

Contacts = tuple[DataFlow, type[Any]]

MakeDB = Callable[..., DataFlow]


async def run_node(node_type: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one node in a one-node workflow; return its outputs."""
    wf = WorkflowBuilder()
    wf.add_node(node_type, "n", params)
    results = await AsyncLocalRuntime().execute_workflow_async(wf.build())
    return results["n"]


async def test_every_single_record_node(contacts: Contacts) -> None:
    assert contacts[0].models  # the Contact nodes are registered
    made = await run_node("ContactCreateNode", {"name": "Ada", "email": "ada@x.org"})
    assert made["name"] == "Ada" and made["score"] == 0 and made["company"] is None
    uuid.UUID(made["id"])  # a generated UUID text id
    assert made["created_at"].tzinfo is dt.UTC
    read = await run_node("ContactReadNode", {"id": made["id"]})
    assert read == made
    upd = await run_node("ContactUpdateNode", {"id": made["id"], "fields": {"score": 7}})
    assert upd["score"] == 7 and upd["updated_at"] >= made["updated_at"]
    assert upd["created_at"] == made["created_at"]
    upd2 = await run_node(
        "ContactUpdateNode", {"filter": {"email": "ada@x.org"}, "fields": {"company": "ACME"}}
    )
    assert upd2["company"] == "ACME" and upd2["score"] == 7
    ups = await run_node(
        "ContactUpsertNode",
        {"name": "Ada L.", "email": "ada@x.org", "score": 9, "conflict_on": ["email"]},
    )
    assert ups["id"] == made["id"] and ups["name"] == "Ada L." and ups["score"] == 9
    listed = await run_node("ContactListNode", {"filter": {"score": 9}})
    assert [r["id"] for r in listed["records"]] == [made["id"]]
    assert listed["next_page_token"] is None
    assert await run_node("ContactCountNode", {}) == {"count": 1}
    assert await run_node("ContactDeleteNode", {"id": made["id"]}) == {"deleted": 1}
    assert await run_node("ContactCountNode", {"filter": {}}) == {"count": 0}
    with pytest.raises(NodeExecutionError) as ei:
        await run_node("ContactReadNode", {"id": made["id"]})
    assert isinstance(ei.value.cause, NotFoundError)


async def test_workflow_connects_typed_nodes(contacts: Contacts) -> None:
    wf = WorkflowBuilder()
    wf.add_node("ContactCreateNode", "c", {"name": "{{name}}", "email": "{{email}}"})
    wf.add_node("ContactReadNode", "r", {})
    wf.add_connection("c", "id", "r", "id")
    w = wf.build()
    out = await AsyncLocalRuntime().execute_workflow_async(w, {"name": "B", "email": "b@x"})
    assert out["r"]["email"] == "b@x"
    with pytest.raises(InvalidInputsError, match="email"):
        await AsyncLocalRuntime().execute_workflow_async(w, {"name": "B", "email": 5})


async def test_direct_api_roundtrip(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    c = await ops.create(id="c-1", name="Ada", email="a@x", score=3)
    assert c["id"] == "c-1"
    assert (await ops.read("c-1"))["score"] == 3
    assert (await ops.update("c-1", fields={"name": "Ada B"}))["name"] == "Ada B"
    assert await ops.delete("c-1") == 1
    with pytest.raises(NotFoundError):
        await ops.delete("c-1")
    with pytest.raises(NotFoundError):
        await ops.update("c-1", fields={"name": "x"})


async def test_str_into_int_column_is_rejected_before_the_database(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    with pytest.raises(ValidationError) as ei:
        await ops.create(name="n", email="e", score="abc")
    assert ei.value.field == "score" and "int" in ei.value.reason
    with pytest.raises(ValidationError, match="score"):
        await ops.create(name="n", email="e", score=True)  # a bool is not an int
    with pytest.raises(ValidationError, match="score"):
        await ops.update("nope", fields={"score": "1"})
    assert await ops.count() == 0


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        ({"email": "e"}, "name", "required"),
        ({"name": "n", "email": "e", "nickname": "x"}, "nickname", "unknown field"),
        ({"name": "n", "email": "e", "created_at": "2020-01-01"}, "created_at", "managed"),
        ({"name": None, "email": "e"}, "name", "null"),
        ({"name": "a\x00b", "email": "e"}, "name", "NUL"),
        ({"name": "n", "email": "e", "score": 2**64}, "score", "64-bit"),
    ],
)
async def test_create_validation(
    contacts: Contacts, data: dict[str, Any], field: str, reason: str
) -> None:
    db, Contact = contacts
    with pytest.raises(ValidationError) as ei:
        await db.ops(Contact).create(**data)
    assert ei.value.field == field and reason in ei.value.reason


@pytest.mark.parametrize(
    "text",
    [
        "DROP TABLE x; --",
        "Robert'); DROP TABLE contact;--",
        "' OR '1'='1",
        '"quoted" \\ backslash % _ wildcard',
        "ünïcödé — 漢字 🙂",
        "  leading and trailing  \n\ttabs ",
        "",
    ],
)
async def test_text_is_stored_byte_for_byte(contacts: Contacts, text: str) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    c = await ops.create(name=text, email=text + "@x")
    got = await ops.read(c["id"])
    assert got["name"] == text and got["name"].encode() == text.encode()
    assert (await ops.list({"name": text}))["records"][0]["id"] == c["id"]
    assert await ops.count() == 1


async def test_duplicate_id_and_unique_field_are_already_exists(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.create(id="x", name="a", email="a@x")
    with pytest.raises(AlreadyExistsError) as ei:
        await ops.create(id="x", name="b", email="b@x")
    assert ei.value.fields == ("id",)
    with pytest.raises(AlreadyExistsError) as ei:
        await ops.create(name="c", email="a@x")
    assert ei.value.fields == ("email",)
    assert await ops.count() == 1
    await ops.create(id="y", name="d", email="d@x")
    with pytest.raises(AlreadyExistsError) as ei:
        await ops.update("y", fields={"email": "a@x"})
    assert ei.value.fields == ("email",)
    assert (await ops.read("y"))["email"] == "d@x"


async def test_update_by_filter_must_match_exactly_one(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.create(name="a", email="a@x", company="ACME")
    await ops.create(name="b", email="b@x", company="ACME")
    with pytest.raises(ConflictError):
        await ops.update(filter={"company": "ACME"}, fields={"score": 1})
    assert await ops.count({"score": 1}) == 0
    with pytest.raises(NotFoundError):
        await ops.update(filter={"company": "none"}, fields={"score": 1})
    with pytest.raises(ValidationError, match="all=True"):
        await ops.update(filter={}, fields={"score": 1})
    with pytest.raises(ValidationError, match="primary key"):
        await ops.update(filter={"name": "a"}, fields={"id": "z"})
    with pytest.raises(ValidationError):
        await ops.update("x", filter={"name": "a"}, fields={"score": 1})


async def test_every_type_round_trips_identically(
    declare_everything: Any, tier_enum: Any, make_db: MakeDB
) -> None:
    db = make_db()
    Thing = declare_everything(db)
    Tier = tier_enum
    await db.initialize()
    ops = db.ops(Thing)
    plus2 = dt.timezone(dt.timedelta(hours=2))
    u = uuid.uuid4()
    big = Decimal("12345678901234567890.123456789012")
    t = await ops.create(
        text="héllo",
        count=-(2**62),
        ratio=0.1,
        flag=True,
        blob=b"\x00\xff\x01",
        amount=big,
        at=dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=plus2),
        day=dt.date(2024, 2, 29),
        uid=u,
        tier="pro",
        meta={"a": [1, 2, {"b": None}], "s": "x"},
        tags=["x", 1, True],
    )
    assert t["id"] == 1  # autoincrement
    got = await ops.read(1)
    assert got == t
    assert got["flag"] is True and type(got["flag"]) is bool
    assert got["count"] == -(2**62) and got["ratio"] == 0.1
    assert got["blob"] == b"\x00\xff\x01"
    assert got["amount"] == big and str(got["amount"]) == str(big)
    assert got["at"] == dt.datetime(2024, 5, 6, 5, 8, 9, 123456, tzinfo=dt.UTC)
    assert got["at"].tzinfo is dt.UTC
    assert got["day"] == dt.date(2024, 2, 29) and got["uid"] == u
    assert got["tier"] is Tier.PRO
    assert got["meta"] == {"a": [1, 2, {"b": None}], "s": "x"} and got["tags"] == ["x", 1, True]
    # single writes take the driver fast path, queries go through SQLAlchemy: same values
    listed = (await ops.list({"id": 1}))["records"]
    assert listed == [got]
    for name, value in [
        ("uid", u),
        ("at", got["at"]),
        ("amount", big),
        ("day", dt.date(2024, 2, 29)),
        ("tier", Tier.PRO),
        ("flag", True),
        ("blob", b"\x00\xff\x01"),
        ("text", "héllo"),
    ]:
        assert await ops.count({name: value}) == 1, name
    async with db.transaction():  # and inside a transaction SQLAlchemy writes them
        inside = await ops.update(1, fields={"text": "again"})
        big2 = Decimal("98765432109876543210.987654321098")
        assert (await ops.update(1, fields={"amount": big2}))["amount"] == big2
    assert inside["at"] == got["at"] and inside["text"] == "again"
    assert str((await ops.read(1))["amount"]) == str(big2)
    second = await ops.create(id=10)
    assert second["id"] == 10 and second["tier"] is Tier.FREE and second["flag"] is False
    assert second["meta"] is None and second["amount"] == Decimal("0")
    assert (await ops.create())["id"] == 11
    # naive datetimes are taken as UTC
    naive = await ops.create(at=dt.datetime(2020, 1, 1, 12, 0))
    assert naive["at"] == dt.datetime(2020, 1, 1, 12, 0, tzinfo=dt.UTC)
    with pytest.raises(ValidationError, match="tier"):
        await ops.create(tier="gold")
