"""Apps that never call `integrate_dataflow` (the original's examples): the app serves
the DataFlow its workflows use; two DataFlows with different databases are an error at
start unless one is chosen. And the original's "CRITICAL" settings (`auto_migrate=False,
skip_migration=True`) against an empty database: FAILED_PRECONDITION naming the table
and the option that creates it. On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from dataflow import DataFlow
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving
from workflow import WorkflowBuilder

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

Connect = Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]]
ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
WAIT = 10.0


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def declare_lead(db: DataFlow) -> None:
    """A model of this module's own (the server fixtures' Contact may be declared)."""

    @db.model
    class Lead:
        id: str
        name: str
        email: str


def lead_workflow(prefix: str = "Lead") -> Any:
    wf = WorkflowBuilder()
    wf.add_node(f"{prefix}CreateNode", "create", {"name": "{{name}}", "email": "{{email}}"})
    return wf.build()


@contextlib.asynccontextmanager
async def closing(*dbs: DataFlow) -> AsyncIterator[None]:
    try:
        yield
    finally:
        for db in dbs:
            await db.close()


async def test_the_app_integrates_the_dataflow_its_workflows_use(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, connect: Connect
) -> None:
    cwd = tmp_path / "cwd"  # where a silent default ./nexus.db would appear
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    db = DataFlow(db_url)
    async with closing(db):
        declare_lead(db)
        app = Nexus(grpc_port=0, grace_period=1)
        app.register("create_lead", lead_workflow())
        async with asyncio.timeout(WAIT), app.serving() as info, connect(info) as channel:
            assert app.db is db
            assert "nexus.models.v1.LeadService" in info.services
            wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            done = await wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(
                    name="create_lead",
                    inputs=struct(name="Ada", email="ada@example.com"),
                    request_id="lead-1",
                ),
                timeout=WAIT,
            )
            assert json_format.MessageToDict(done.outputs)["create"]["name"] == "Ada"
            ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            count = await ms.CountRecords(mpb.CountRecordsRequest(model="Lead"), timeout=WAIT)
            assert count.count == 1
        # the execution was recorded in the app's own database, not in a new ./nexus.db
        assert not (cwd / "nexus.db").exists()
        tables = await db.run_sync(lambda conn: set(_table_names(conn)))
        assert any("execution" in t for t in tables), tables


def _table_names(conn: Any) -> list[str]:
    from sqlalchemy import inspect

    return list(inspect(conn).get_table_names())


async def test_two_dataflows_are_an_error_naming_both_unless_one_is_chosen(
    db_url: str, tmp_path: Path, connect: Connect
) -> None:
    other_url = f"sqlite:///{tmp_path / 'other.db'}"
    first, second = DataFlow(db_url), DataFlow(other_url)
    async with closing(first, second):
        declare_lead(first)

        @second.model
        class Prospect:
            id: str
            name: str
            email: str

        app = Nexus(grpc_port=0, grace_period=1)
        app.register("create_lead", lead_workflow())
        app.register("create_prospect", lead_workflow("Prospect"))
        with pytest.raises(ValueError) as caught:
            async with app.serving():
                pytest.fail("served with two DataFlows")
        text = str(caught.value)
        assert db_url in text and other_url in text  # as the user wrote them
        assert "integrate_dataflow" in text

        app.integrate_dataflow(second)
        async with asyncio.timeout(WAIT), app.serving() as info, connect(info):
            assert app.db is second
            assert "nexus.models.v1.ProspectService" in info.services
            assert "nexus.models.v1.LeadService" not in info.services


async def test_skip_migration_on_an_empty_database_is_failed_precondition(
    db_url: str, connect: Connect, expect_error: ExpectError, caplog: pytest.LogCaptureFixture
) -> None:
    db = DataFlow(db_url, auto_migrate=False, skip_migration=True)
    async with closing(db):
        declare_lead(db)
        app = Nexus(grpc_port=0, grace_period=1)
        app.register("create_lead", lead_workflow())
        async with asyncio.timeout(WAIT), app.serving() as info, connect(info) as channel:
            ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            precondition = grpc.StatusCode.FAILED_PRECONDITION
            calls = [
                ms.CreateRecord(
                    mpb.CreateRecordRequest(model="Lead", record=struct(name="A", email="a@x")),
                    timeout=WAIT,
                ),
                ms.CountRecords(mpb.CountRecordsRequest(model="Lead"), timeout=WAIT),
                wf.ExecuteWorkflow(
                    wpb.ExecuteWorkflowRequest(
                        name="create_lead", inputs=struct(name="A", email="a@x")
                    ),
                    timeout=WAIT,
                ),
            ]
            for call in calls:
                try:
                    await call
                except grpc.aio.AioRpcError as err:
                    message = err.details() or ""
                    assert err.code() == precondition, (err.code(), message)
                    assert "table 'lead' does not exist" in message
                    assert "auto_migrate=True" in message and "skip_migration=False" in message
                    for leak in ("Error", "SELECT", "sqlite", "asyncpg", "/", "127.0.0.1"):
                        assert leak not in message, message
                else:
                    pytest.fail("a call on a missing table succeeded")
            await expect_error(
                ms.CountRecords(mpb.CountRecordsRequest(model="Lead"), timeout=WAIT),
                precondition,
                "CONSTRAINT_VIOLATION",
            )
