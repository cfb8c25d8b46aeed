"""Tenants through the server: the principal's tenant (a JWT's `tenant` claim, an API
key's tenant) scopes every record method, generic and typed, bulk included, and the
workflows it runs, on SQLite and PostgreSQL. Another tenant's rows are invisible and
untouchable; the tenant field cannot be set; a principal without a tenant cannot use a
tenant-scoped model."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import struct_pb2

from dataflow import DataFlow, field
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving
from nexus_server.gateway import Policy
from workflow import WorkflowBuilder

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
Connect = Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]]
SECRET = "t" * 40
A, B = "acme", "globex"


def creds(sub: str, tenant: str | None, roles: tuple[str, ...] = ("staff",)) -> Any:
    claims: dict[str, Any] = {"sub": sub, "roles": list(roles), "exp": int(time.time()) + 600}
    if tenant is not None:
        claims["tenant"] = tenant
    return (("authorization", "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")),)


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@pytest.fixture
async def channel(
    db_url: str, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[grpc.aio.Channel]:
    monkeypatch.setenv("NEXUS_JWT_SECRET", SECRET)
    db = DataFlow(db_url)

    @db.model(tenant_scoped=True)
    class Note:
        id: str
        title: str
        email: str = field(unique=True)
        score: int = 0

    add = WorkflowBuilder()
    add.add_node("NoteCreateNode", "add", {"title": "{{title}}", "email": "{{email}}"})
    count = WorkflowBuilder()
    count.add_node("NoteCountNode", "count", {})
    app = Nexus(
        grpc_port=0,
        enable_auth=True,
        grace_period=2.0,
        policy=Policy({"staff": ["model:Note:*", "workflow:*:execute"]}),
    )
    app.integrate_dataflow(db)
    app.register("add_note", add.build())
    app.register("count_notes", count.build())
    try:
        async with app.serving() as serving, connect(serving) as ch:
            yield ch
    finally:
        await db.close()


async def test_each_tenant_sees_and_touches_only_its_rows(
    channel: grpc.aio.Channel, expect_error: ExpectError
) -> None:
    ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    a, b = creds("ann", A), creds("bob", B)
    made = await ms.CreateRecord(
        mpb.CreateRecordRequest(model="Note", record=struct(id="n1", title="A1", email="x@a")),
        metadata=a,
    )
    assert made["tenant_id"] == A
    # the same email and the same explicit id in another tenant: its own record
    await ms.CreateRecord(
        mpb.CreateRecordRequest(model="Note", record=struct(id="n1", title="B1", email="x@a")),
        metadata=b,
    )
    await ms.BulkCreateRecords(
        mpb.BulkCreateRecordsRequest(
            model="Note",
            records=[struct(id=f"b{i}", title=f"B{i}", email=f"{i}@b") for i in range(3)],
        ),
        metadata=b,
    )

    got = await ms.GetRecord(mpb.GetRecordRequest(model="Note", id="n1"), metadata=a)
    assert got["title"] == "A1"
    await expect_error(
        ms.GetRecord(mpb.GetRecordRequest(model="Note", id="b0"), metadata=a),
        grpc.StatusCode.NOT_FOUND,
        "RECORD_NOT_FOUND",
    )
    listed = await ms.ListRecords(mpb.ListRecordsRequest(model="Note"), metadata=a)
    assert [r["title"] for r in listed.records] == ["A1"]
    assert (await ms.CountRecords(mpb.CountRecordsRequest(model="Note"), metadata=b)).count == 4

    # writes aimed at the other tenant's rows touch nothing
    await expect_error(
        ms.UpdateRecord(
            mpb.UpdateRecordRequest(model="Note", id="b0", record=struct(title="stolen")),
            metadata=a,
        ),
        grpc.StatusCode.NOT_FOUND,
        "RECORD_NOT_FOUND",
    )
    await expect_error(
        ms.DeleteRecord(mpb.DeleteRecordRequest(model="Note", id="b1"), metadata=a),
        grpc.StatusCode.NOT_FOUND,
        "RECORD_NOT_FOUND",
    )
    gone = await ms.BulkDeleteRecords(
        mpb.BulkDeleteRecordsRequest(model="Note", allow_all=True), metadata=a
    )
    assert gone.deleted_count == 1
    changed = await ms.BulkUpdateRecords(
        mpb.BulkUpdateRecordsRequest(
            model="Note", filter=struct(title={"$ne": ""}), values=struct(score=9)
        ),
        metadata=a,
    )
    assert changed.updated_count == 0
    upserted = await ms.UpsertRecord(
        mpb.UpsertRecordRequest(
            model="Note", record=struct(id="b2", title="mine", email="2@b"), conflict_on=["id"]
        ),
        metadata=a,
    )
    assert upserted.created and upserted.record["tenant_id"] == A
    theirs = await ms.ListRecords(mpb.ListRecordsRequest(model="Note"), metadata=b)
    assert sorted(r["title"] for r in theirs.records) == ["B0", "B1", "B1", "B2"]
    assert {r["score"] for r in theirs.records} == {0}


async def test_the_tenant_field_cannot_be_set(
    channel: grpc.aio.Channel, expect_error: ExpectError
) -> None:
    ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    _, violations = await expect_error(
        ms.CreateRecord(
            mpb.CreateRecordRequest(
                model="Note", record=struct(id="n", title="t", email="e", tenant_id=B)
            ),
            metadata=creds("ann", A),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RECORD_INVALID",
    )
    assert [f for f, _ in violations] == ["record.tenant_id"]
    count = await ms.CountRecords(mpb.CountRecordsRequest(model="Note"), metadata=creds("x", B))
    assert count.count == 0


async def test_workflows_run_in_the_callers_tenant(channel: grpc.aio.Channel) -> None:
    wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
    a, b = creds("ann", A), creds("bob", B)
    for i in range(2):
        await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="add_note", inputs=struct(title=f"t{i}", email=f"{i}@x")
            ),
            metadata=a,
            timeout=10,
        )
    counted = await wf.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(name="count_notes"), metadata=b, timeout=10
    )
    assert counted.outputs["count"]["count"] == 0
    counted = await wf.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(name="count_notes"), metadata=a, timeout=10
    )
    assert counted.outputs["count"]["count"] == 2


async def test_a_principal_without_a_tenant_cannot_use_the_model(
    channel: grpc.aio.Channel, expect_error: ExpectError
) -> None:
    ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    meta, _ = await expect_error(
        ms.ListRecords(mpb.ListRecordsRequest(model="Note"), metadata=creds("nat", None)),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    assert meta["permission"] == "tenant"
