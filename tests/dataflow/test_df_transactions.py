"""Transactions: explicit blocks, atomic workflows, concurrent writers."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from dataflow import AlreadyExistsError, DataFlow
from workflow import (
    AsyncLocalRuntime,
    Node,
    NodeExecutionError,
    Output,
    Param,
    WorkflowBuilder,
    register_node,
    unregister_node,
)

Contacts = tuple[DataFlow, type[Any]]


class DFTestFail(Node):
    """Fails when told to (the 'later node' that must roll earlier writes back)."""

    parameters = {
        "after": Param(str),
        "fail": Param(bool, default=True),
        "created": Param(int, default=0),
    }
    outputs = {"ok": Output(bool)}

    def run(self, after: str, fail: bool, created: int) -> Mapping[str, Any]:
        if fail:
            raise RuntimeError(f"failing after {after}")
        return {"ok": True}


@pytest.fixture(autouse=True)
def _fail_node() -> Any:
    register_node(DFTestFail)
    yield
    unregister_node("DFTestFail")


def _workflow(atomic: bool) -> Any:
    wf = WorkflowBuilder(atomic=atomic)
    wf.add_node("ContactCreateNode", "c1", {"name": "one", "email": "{{email}}"})
    wf.add_node("ContactBulkCreateNode", "c2", {"data": [{"name": "two", "email": "two@x"}]})
    wf.add_node("ContactUpdateNode", "u", {"fields": {"score": 5}})
    wf.add_node("DFTestFail", "boom", {"fail": "{{fail}}"})
    wf.add_connection("c1", "id", "u", "id")
    wf.add_connection("u", "id", "boom", "after")
    # after the bulk create too: a failing node cancels the nodes still running, and the
    # tests count what the earlier writes left
    wf.add_connection("c2", "created", "boom", "created")
    return wf.build()


async def test_atomic_workflow_rolls_back_earlier_writes(contacts: Contacts) -> None:
    db, Contact = contacts
    rt = AsyncLocalRuntime()
    with pytest.raises(NodeExecutionError, match="boom"):
        await rt.execute_workflow_async(_workflow(True), {"email": "one@x", "fail": True})
    assert await db.ops(Contact).count() == 0
    # the same workflow succeeding commits everything
    await rt.execute_workflow_async(_workflow(True), {"email": "one@x", "fail": False})
    assert await db.ops(Contact).count() == 2
    assert await db.ops(Contact).count({"score": 5}) == 1


async def test_non_atomic_workflow_keeps_earlier_writes(contacts: Contacts) -> None:
    db, Contact = contacts
    with pytest.raises(NodeExecutionError):
        await AsyncLocalRuntime().execute_workflow_async(
            _workflow(False), {"email": "one@x", "fail": True}
        )
    assert await db.ops(Contact).count() == 2


async def test_transaction_block_commits_and_rolls_back(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)
    async with db.transaction():
        await ops.create(id="a", name="a", email="a@x")
        async with db.transaction():  # nested blocks join the outer one
            await ops.create(id="b", name="b", email="b@x")
        assert await ops.count() == 2
    assert await ops.count() == 2
    with pytest.raises(AlreadyExistsError):
        async with db.transaction():
            await ops.update("a", fields={"score": 9})
            await ops.bulk_create([{"name": "c", "email": "c@x"}])
            await ops.create(id="a", name="dup", email="d@x")
    assert (await ops.read("a"))["score"] == 0
    assert await ops.count() == 2
    with pytest.raises(RuntimeError):
        async with db.transaction():
            await ops.bulk_delete(all=True)
            raise RuntimeError("changed my mind")
    assert await ops.count() == 2


async def test_concurrent_writers(contacts: Contacts) -> None:
    db, Contact = contacts
    ops = db.ops(Contact)

    async def writer(w: int) -> None:
        for i in range(20):
            await ops.create(name=f"w{w}", email=f"{w}-{i}@x", score=i)

    await asyncio.gather(*(writer(w) for w in range(10)))
    assert await ops.count() == 200

    # many tasks upserting the same key converge on one record
    await asyncio.gather(
        *(ops.upsert(id="same", name=f"v{i}", email="same@x", score=i) for i in range(30))
    )
    assert await ops.count({"email": "same@x"}) == 1

    # concurrent transactions each see their own writes and all commit
    async def txn(k: int) -> None:
        async with db.transaction():
            await ops.create(id=f"t{k}", name="t", email=f"t{k}@x")
            await ops.update(f"t{k}", fields={"score": k})

    await asyncio.gather(*(txn(k) for k in range(10)))
    assert await ops.count({"name": "t"}) == 10
    assert sorted(r["score"] for r in (await ops.list({"name": "t"}))["records"]) == list(range(10))
