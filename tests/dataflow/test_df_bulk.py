"""Bulk operations: atomicity, row-indexed errors, upserts, the all=True guard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dataflow import (
    AlreadyExistsError,
    DataFlow,
    NotFoundError,
    ValidationError,
)
from workflow import AsyncLocalRuntime, NodeExecutionError, WorkflowBuilder

Contacts = tuple[DataFlow, type[Any]]

MakeDB = Callable[..., DataFlow]


def rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"id": f"r{i}", "name": f"n{i}", "email": f"e{i}@x", "score": i % 10}
        for i in range(start, start + n)
    ]


async def run_node(node_type: str, params: dict[str, Any]) -> dict[str, Any]:
    wf = WorkflowBuilder()
    wf.add_node(node_type, "n", params)
    return (await AsyncLocalRuntime().execute_workflow_async(wf.build()))["n"]


async def test_one_bad_row_in_ten_thousand_writes_nothing(contacts: Contacts) -> None:
    db, Contact = contacts
    data = rows(10_000)
    data[7_777]["score"] = "abc"
    with pytest.raises(ValidationError) as ei:
        await db.ops(Contact).bulk_create(data)
    assert ei.value.row == 7_777 and ei.value.field == "score"
    assert "row 7777" in str(ei.value)
    assert await db.ops(Contact).count() == 0


async def test_a_database_failure_late_in_the_batch_rolls_everything_back(
    contacts: Contacts,
) -> None:
    db, Contact = contacts
    data = rows(10_000)
    data[9_999]["email"] = data[5]["email"]  # passes validation, violates uniqueness
    with pytest.raises(AlreadyExistsError) as ei:
        await db.ops(Contact).bulk_create(data)
    assert "email" in ei.value.fields
    assert await db.ops(Contact).count() == 0


async def test_bulk_create_node_and_every_type(declare_everything: Any, make_db: MakeDB) -> None:
    db = make_db()
    declare_everything(db)
    out = await run_node(
        "ThingBulkCreateNode",
        {"data": [{"text": "a", "meta": {"k": [1]}, "tier": "pro"}, {"amount": "1.50"}, {}]},
    )
    assert out == {"created": 3}
    listed = (await db.ops("Thing").list(order_by="id"))["records"]
    assert [r["id"] for r in listed] == [1, 2, 3]
    assert listed[0]["meta"] == {"k": [1]} and str(listed[1]["amount"]) == "1.50"
    with pytest.raises(ValidationError, match="every record or on none"):
        await db.ops("Thing").bulk_create([{"id": 50}, {}])
    assert await db.ops("Thing").bulk_create([{"id": 50}, {"id": 60}]) == 2
    assert (await db.ops("Thing").create())["id"] == 61


async def test_bulk_update_by_rows_and_by_filter(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.bulk_create(rows(20))
    out = await run_node(
        "ContactBulkUpdateNode",
        {"data": [{"id": "r1", "score": 100}, {"id": "r2", "name": "two", "score": 200}]},
    )
    assert out == {"updated": 2}
    assert (await ops.read("r2"))["name"] == "two"
    with pytest.raises(NotFoundError, match="row 1"):
        await ops.bulk_update([{"id": "r3", "score": 5}, {"id": "missing", "score": 5}])
    assert (await ops.read("r3"))["score"] == 3  # rolled back
    with pytest.raises(ValidationError) as ei:
        await ops.bulk_update([{"id": "r3", "score": 5}, {"id": "r4", "score": "x"}])
    assert ei.value.row == 1 and ei.value.field == "score"
    out = await run_node(
        "ContactBulkUpdateNode", {"filter": {"score": {"$lt": 3}}, "fields": {"company": "Z"}}
    )
    assert out == {"updated": 4}  # r1 and r2 were moved above 3
    with pytest.raises(ValidationError, match="all=True"):
        await ops.bulk_update(filter={}, fields={"company": "Y"})
    with pytest.raises(ValidationError, match="all=True"):
        await ops.bulk_update(fields={"company": "Y"})
    assert await ops.count({"company": "Y"}) == 0
    assert await ops.bulk_update(filter={}, fields={"company": "Y"}, all=True) == 20


async def test_bulk_delete_guard_filter_and_ids(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.bulk_create(rows(20))
    with pytest.raises(NodeExecutionError) as ne:
        await run_node("ContactBulkDeleteNode", {})
    assert isinstance(ne.value.cause, ValidationError) and "all=True" in str(ne.value)
    with pytest.raises(ValidationError, match="all=True"):
        await ops.bulk_delete({})
    assert await ops.count() == 20
    assert await run_node("ContactBulkDeleteNode", {"filter": {"score": 0}}) == {"deleted": 2}
    assert await run_node("ContactBulkDeleteNode", {"ids": ["r1", "r2", "nope"]}) == {"deleted": 2}
    assert await ops.bulk_delete(all=True) == 16
    assert await ops.count() == 0


async def test_upsert_conflicts(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    first = await ops.upsert(id="u1", name="A", email="a@x", score=1)
    again = await ops.upsert(id="u1", name="A2", email="a2@x", score=2)
    assert again["id"] == "u1" and again["name"] == "A2" and again["email"] == "a2@x"
    assert again["created_at"] == first["created_at"]
    by_email = await ops.upsert(conflict_on=["email"], name="A3", email="a2@x", score=3)
    assert by_email["id"] == "u1" and by_email["score"] == 3
    assert await ops.count() == 1
    # a conflict on a unique key other than the one named is still an error
    with pytest.raises(AlreadyExistsError):
        await ops.upsert(id="u2", name="B", email="a2@x")
    with pytest.raises(ValidationError, match="not a unique key"):
        await ops.upsert(conflict_on=["name"], name="B", email="b@x")
    assert await ops.count() == 1


async def test_upsert_changes_only_the_fields_given(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    first = await ops.upsert(id="k1", name="Kim", email="kim@x", company="Acme", score=7)
    # neither company nor score is given: both keep their values, not their defaults
    again = await ops.upsert(id="k1", name="Kim L.", email="kim@x")
    assert (again["name"], again["company"], again["score"]) == ("Kim L.", "Acme", 7)
    assert again["updated_at"] >= first["updated_at"]
    assert again["created_at"] == first["created_at"]
    # a new record still gets the defaults
    other = await ops.upsert(id="k2", name="Lee", email="lee@x")
    assert (other["company"], other["score"]) == (None, 0)
    # an explicit None is a value: it is written
    cleared = await ops.upsert(id="k1", name="Kim L.", email="kim@x", company=None)
    assert (cleared["company"], cleared["score"]) == (None, 7)


async def test_upsert_node_keeps_what_it_does_not_set(contacts: Contacts) -> None:
    """A node receives every parameter: the UpsertNode's optional fields default to
    null, which means "not given", so the model's defaults never reset stored values."""
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.create(id="n1", name="Nia", email="nia@x", company="Acme", score=7)
    wf = WorkflowBuilder()
    wf.add_node(
        "ContactUpsertNode", "up", {"id": "{{id}}", "name": "{{name}}", "email": "{{email}}"}
    )
    out = await AsyncLocalRuntime().execute_workflow_async(
        wf.build(), {"id": "n1", "name": "Nia B.", "email": "nia@x"}
    )
    assert (out["up"]["name"], out["up"]["company"], out["up"]["score"]) == ("Nia B.", "Acme", 7)
    # a new record through the node still gets the model's defaults
    new = await run_node("ContactUpsertNode", {"id": "n2", "name": "Oz", "email": "oz@x"})
    assert (new["company"], new["score"]) == (None, 0)
    # a field the node does set is written
    again = await run_node(
        "ContactUpsertNode", {"name": "Nia", "email": "nia@x", "score": 1, "conflict_on": ["email"]}
    )
    assert (again["id"], again["company"], again["score"]) == ("n1", "Acme", 1)


async def test_bulk_upsert_changes_only_the_fields_each_entry_gives(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.bulk_create(
        [{"id": f"b{i}", "name": f"B{i}", "email": f"b{i}@x", "company": "Co", "score": 9}
         for i in range(3)]
    )  # fmt: skip
    n = await ops.bulk_upsert(
        [
            {"id": "b0", "name": "B0 new", "email": "b0@x"},  # keeps company and score
            {"id": "b1", "name": "B1", "email": "b1@x", "score": 1},  # keeps company
            {"id": "b3", "name": "B3", "email": "b3@x"},  # new: defaults
        ]
    )
    assert n == 3
    got = {r["id"]: (r["name"], r["company"], r["score"]) for r in (await ops.list())["records"]}
    assert got == {
        "b0": ("B0 new", "Co", 9),
        "b1": ("B1", "Co", 1),
        "b2": ("B2", "Co", 9),
        "b3": ("B3", None, 0),
    }


async def test_bulk_upsert(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    await ops.bulk_create(rows(5))
    data = [{"name": "new", "email": f"e{i}@x", "score": 50} for i in range(3, 8)]
    out = await run_node("ContactBulkUpsertNode", {"data": data, "conflict_on": ["email"]})
    assert out == {"upserted": 5}
    assert await ops.count() == 8
    assert await ops.count({"score": 50}) == 5
    assert (await ops.read("r3"))["name"] == "new"  # kept its id
    dup = [{"name": "a", "email": "z@x"}, {"name": "b", "email": "z@x"}]
    with pytest.raises(ValidationError) as ei:
        await ops.bulk_upsert(dup, conflict_on=["email"])
    assert ei.value.row == 1
    bad = [{"name": "a", "email": "q@x"}, {"name": 5, "email": "w@x"}]
    with pytest.raises(ValidationError) as ei:
        await ops.bulk_upsert(bad, conflict_on=["email"])
    assert ei.value.row == 1 and ei.value.field == "name"
    assert await ops.count() == 8
