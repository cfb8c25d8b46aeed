"""limit/offset, keyset page tokens (stable under concurrent inserts), ordering, projection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from dataflow import DataFlow, ValidationError

Contacts = tuple[DataFlow, type[Any]]


async def _seed(db: DataFlow, model: type[Any], n: int) -> None:
    await db.ops(model).bulk_create(
        [
            {
                "id": f"id{i:04d}",
                "name": f"n{i % 7}",
                "email": f"e{i}@x",
                "score": i % 5,
                "company": None if i % 3 == 0 else f"c{i % 4}",
            }
            for i in range(n)
        ]
    )


async def _all_pages(ops: Any, limit: int, **kw: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    token = None
    for _ in range(1000):  # bounded
        page = await ops.list(limit=limit, page_token=token, **kw)
        assert len(page["records"]) <= limit
        out += page["records"]
        token = page["next_page_token"]
        if token is None:
            return out
    raise AssertionError("pagination did not end")


async def test_limit_offset_and_projection(contacts: Contacts) -> None:
    db, Contact = contacts
    await _seed(db, Contact, 10)
    ops = db.ops(Contact)
    page = await ops.list(order_by="id", limit=3, offset=4, fields=["id", "score"])
    assert page["records"] == [
        {"id": "id0004", "score": 4},
        {"id": "id0005", "score": 0},
        {"id": "id0006", "score": 1},
    ]
    assert page["next_page_token"] is not None
    assert len((await ops.list(offset=8))["records"]) == 2


@pytest.mark.parametrize(
    "order_by", [None, "name", ["-score"], ["company", "-name"], ["-company", "score"]]
)
async def test_keyset_pages_cover_everything_once_in_order(
    contacts: Contacts, order_by: Any
) -> None:
    db, Contact = contacts
    await _seed(db, Contact, 53)
    ops = db.ops(Contact)
    full = (await ops.list(order_by=order_by))["records"]
    paged = await _all_pages(ops, 7, order_by=order_by)
    assert [r["id"] for r in paged] == [r["id"] for r in full]
    assert len({r["id"] for r in paged}) == 53


async def test_pages_are_stable_under_concurrent_inserts(contacts: Contacts) -> None:
    db, Contact = contacts
    await _seed(db, Contact, 40)
    ops = db.ops(Contact)
    seen: list[str] = []
    token = None
    inserted = 0

    async def insert_some(k: int) -> None:
        # ids sorting before and after the cursor
        await asyncio.gather(
            ops.create(id=f"id0000-{k}", name="new", email=f"early{k}@x"),
            ops.create(id=f"id9999-{k}", name="new", email=f"late{k}@x"),
        )

    for k in range(100):
        page = await ops.list(order_by="id", limit=6, page_token=token)
        seen += [r["id"] for r in page["records"]]
        token = page["next_page_token"]
        if token is None:
            break
        await insert_some(k)
        inserted += 2
    originals = [f"id{i:04d}" for i in range(40)]
    assert [s for s in seen if s in originals] == originals  # none skipped, in order
    assert len(seen) == len(set(seen))  # none repeated
    assert not any(s.startswith("id0000-") for s in seen)  # inserted behind the cursor
    assert await ops.count() == 40 + inserted


async def test_bad_page_tokens(contacts: Contacts) -> None:
    db, Contact = contacts
    await _seed(db, Contact, 5)
    ops = db.ops(Contact)
    token = (await ops.list(order_by="name", limit=2))["next_page_token"]
    with pytest.raises(ValidationError, match="same model, filter and order_by"):
        await ops.list(order_by="-name", limit=2, page_token=token)
    for bad in ["garbage!", "e30", "eyJrIjpbImlkIl0sInYiOlsxXX0"]:
        with pytest.raises(ValidationError) as ei:
            await ops.list(order_by="name", limit=2, page_token=bad)
        assert ei.value.field == "page_token"
    with pytest.raises(ValidationError, match="offset"):
        await ops.list(order_by="name", limit=2, page_token=token, offset=1)
    with pytest.raises(ValidationError, match="limit"):
        await ops.list(limit=0)
    with pytest.raises(ValidationError, match="order_by"):
        await ops.list(order_by=["name", "name"])


async def test_list_node_paginates(contacts: Contacts) -> None:
    from workflow import AsyncLocalRuntime, WorkflowBuilder

    db, Contact = contacts
    await _seed(db, Contact, 5)
    wf = WorkflowBuilder()
    wf.add_node("ContactListNode", "l", {"limit": 2, "page_token": "{{token}}"})
    w = wf.build()
    rt = AsyncLocalRuntime()
    first = (await rt.execute_workflow_async(w))["l"]
    second = (await rt.execute_workflow_async(w, {"token": first["next_page_token"]}))["l"]
    assert [r["id"] for r in first["records"] + second["records"]] == [
        "id0000",
        "id0001",
        "id0002",
        "id0003",
    ]
