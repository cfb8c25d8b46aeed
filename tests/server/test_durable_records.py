"""An acknowledged execution is never lost and never run twice.

The reply (or a stream's final event) comes only once the execution's record is
committed; an execution with a request_id has its RUNNING record committed before any
node runs; a database that cannot take the record fails the call fast (UNAVAILABLE)
without running the workflow. Each check reads the database through a connection of its
own, never the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from dataflow import DatabaseError, DataFlow
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving
from nexus_server._executions import Executions
from nexus_server._store import ExecutionRecord, Store
from workflow import WorkflowBuilder

WAIT = 10.0
Connect = Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]]


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@contextlib.asynccontextmanager
async def reader(db_url: str) -> AsyncIterator[Store]:
    """The executions table through a DataFlow of its own (not the server's)."""
    db = DataFlow(db_url)
    try:
        yield Store(db)
    finally:
        await db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
@pytest.mark.parametrize("workflow", ["create_contact", "gated"])
async def test_a_request_ids_record_is_committed_before_the_reply(
    make_app: Callable[..., Nexus],
    connect: Connect,
    db_url: str,
    workflow: str,
    gates: dict[str, asyncio.Event],
) -> None:
    """Both durable paths: create_contact commits with its record, gated (a node of
    another kind) commits its record before and after running."""
    gates["open"].set()
    app = make_app()
    async with app.serving() as s, connect(s) as channel, reader(db_url) as store:
        wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        for i in range(5):
            inputs = (
                struct(name=f"Ada {i}", email=f"ada{i}@x.io")
                if workflow == "create_contact"
                else struct(gate="open", value=i)
            )
            done = await wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(name=workflow, inputs=inputs, request_id=f"d-{i}"),
                timeout=WAIT,
            )
            rec = await store.get_execution(done.id)  # at once: no drain, no wait
            assert rec is not None, f"execution {i} acknowledged but not in the database"
            assert rec.state == "SUCCEEDED" and rec.request_id == f"d-{i}"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_record_without_request_id_is_written_behind(
    make_app: Callable[..., Nexus], connect: Connect, db_url: str
) -> None:
    app = make_app()
    async with app.serving() as s, connect(s) as channel, reader(db_url) as store:
        wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        done = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="create_contact", inputs=struct(name="Ada", email="ada@x.io")
            ),
            timeout=WAIT,
        )
        rec = None
        async with asyncio.timeout(WAIT):  # within the writer's linger (10 ms)
            while rec is None:
                await asyncio.sleep(0.005)
                rec = await store.get_execution(done.id)
        assert rec.state == "SUCCEEDED" and rec.request_id is None


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_only_an_execution_that_outlives_the_linger_has_a_running_row(
    make_app: Callable[..., Nexus],
    connect: Connect,
    db_url: str,
    gates: dict[str, asyncio.Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a request_id, an execution's RUNNING row is written only if it still runs
    `LINGER` seconds after it started (one timer serves them all): short executions are
    written once, in their final state; a long one is RUNNING in the database while it
    runs, without anyone draining the writer."""
    written: list[tuple[str, str]] = []
    write = Store.write_executions

    async def recording(self: Store, records: Sequence[ExecutionRecord]) -> list[str]:
        written.extend((r.id, r.state) for r in records)
        return await write(self, records)

    monkeypatch.setattr(Store, "write_executions", recording)
    gates["open"].set()
    app = make_app()
    async with app.serving() as s, connect(s) as channel, reader(db_url) as store:
        wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        quick = [
            await wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(name="gated", inputs=struct(gate="open", value=i)),
                timeout=WAIT,
            )
            for i in range(20)
        ]
        held = wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="gated", inputs=struct(gate="held", value=1)),
            timeout=WAIT,
        )
        running = None
        async with asyncio.timeout(WAIT):
            while running is None:
                await asyncio.sleep(0.005)
                found, _ = await store.list_executions("gated", "RUNNING", 10, "")
                running = found[0] if found else None
        assert running.state == "RUNNING"
        gates["held"].set()
        done = await held
    # the stop wrote what was still queued
    assert running.id == done.id
    states = {ex.id: [st for i, st in written if i == ex.id] for ex in quick}
    assert all(st == ["SUCCEEDED"] for st in states.values()), states
    assert [st for i, st in written if i == done.id] == ["RUNNING", "SUCCEEDED"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_request_id_is_committed_before_the_workflow_runs(
    make_app: Callable[..., Nexus],
    connect: Connect,
    db_url: str,
    gates: dict[str, asyncio.Event],
) -> None:
    app = make_app()
    async with app.serving() as s, connect(s) as channel, reader(db_url) as store:
        wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        call = asyncio.ensure_future(
            wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(
                    name="gated", inputs=struct(gate="held", value=7), request_id="held-1"
                ),
                timeout=WAIT,
            )
        )
        await asyncio.wait_for(gates["held:started"].wait(), WAIT)
        running = await store.find_request("anonymous", "held-1")
        assert running is not None and running.state == "RUNNING"
        gates["held"].set()
        done = await call
        assert done.id == running.id
        final = await store.get_execution(done.id)
        assert final is not None and final.state == "SUCCEEDED"


@contextlib.asynccontextmanager
async def two_servers(
    make_app: Callable[..., Nexus], connect: Connect, name: str, workflow: Callable[[], Any]
) -> AsyncIterator[tuple[Any, Any, grpc.aio.Channel]]:
    """Two server processes' worth of apps on one database, both serving `workflow()` as
    `name`: their workflow stubs and the first's channel. In one process the node classes
    belong to the first's DataFlow, so the second takes the record-first path."""
    first, second = make_app(), make_app(models=False, workflows=False)
    first.register(name, workflow())
    second.register(name, workflow())
    async with (
        first.serving() as s1,
        connect(s1) as c1,
        second.serving() as s2,
        connect(s2) as c2,
    ):
        yield (
            wgrpc.WorkflowServiceStub(c1),  # type: ignore[no-untyped-call]
            wgrpc.WorkflowServiceStub(c2),  # type: ignore[no-untyped-call]
            c1,
        )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_second_server_never_runs_a_request_the_first_has_started(
    make_app: Callable[..., Nexus], connect: Connect, gates: dict[str, asyncio.Event]
) -> None:
    request = wpb.ExecuteWorkflowRequest(
        name="create_then_wait",
        inputs=struct(name="Ada", email="ada@x.io", gate="both"),
        request_id="shared-1",
    )
    async with two_servers(make_app, connect, "create_then_wait", _create_then_wait) as (
        wf1,
        wf2,
        c1,
    ):
        call = asyncio.ensure_future(wf1.ExecuteWorkflow(request, timeout=WAIT))
        await asyncio.wait_for(gates["both:started"].wait(), WAIT)
        # the second finds the first's execution, never runs it, and waits for its end
        seen = asyncio.ensure_future(wf2.ExecuteWorkflow(request, timeout=WAIT))
        await asyncio.sleep(0.3)
        assert not seen.done()
        gates["both"].set()
        done, other = await call, await seen
        assert done == other and done.state == wpb.Execution.STATE_SUCCEEDED
        ms = mgrpc.ModelServiceStub(c1)  # type: ignore[no-untyped-call]
        count = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"))
        assert count.count == 1


def _create() -> Any:
    wf = WorkflowBuilder()
    wf.add_node("ContactCreateNode", "create", {"name": "{{name}}", "email": "{{email}}"})
    return wf.build()


def _create_then_wait() -> Any:
    wf = WorkflowBuilder()
    wf.add_node("ContactCreateNode", "create", {"name": "{{name}}", "email": "{{email}}"})
    wf.add_node("TestGateNode", "wait", {"gate": "{{gate}}"})
    return wf.build()


class _DownStore(Store):
    """A store whose database refuses every write while `down` (a unit test of
    Executions alone)."""

    down = True

    async def write_executions(self, records: Sequence[ExecutionRecord]) -> list[str]:
        if self.down:
            raise DatabaseError("executions: the database is unreachable")
        return await super().write_executions(records)


async def test_no_workflow_runs_when_its_request_id_cannot_be_recorded(
    tmp_path: Any, gates: dict[str, asyncio.Event]
) -> None:
    db = DataFlow(f"sqlite:///{tmp_path}/down.db")
    store = _DownStore(db)
    await store.initialize()
    executions = Executions(store, commit_timeout=2.0)
    executions.open()
    wf = WorkflowBuilder()
    wf.add_node("TestGateNode", "wait", {"gate": "{{gate}}"})
    built = wf.build()
    gates["never"].set()
    try:
        async with asyncio.timeout(WAIT):
            with pytest.raises(DatabaseError, match="could not be recorded"):
                await executions.execute("w", built, {"gate": "never"}, caller="c", request_id="r")
        assert not gates["never:started"].is_set()  # the workflow never ran
        assert executions.running == {} and executions.writer.pending == {}
        async with asyncio.timeout(WAIT):
            # without a request_id it runs, its record written behind
            done = await executions.execute("w", built, {"gate": "never"}, caller="c")
        assert gates["never:started"].is_set() and done.state == "SUCCEEDED"
        (ran,) = executions.writer.pending.values()  # kept: written once the database is back
        store.down = False
        async with asyncio.timeout(WAIT):
            await executions.writer.drain()
        written = await store.get_execution(ran.id)
        assert written is not None and written.state == "SUCCEEDED"
    finally:
        store.down = False
        async with asyncio.timeout(WAIT):
            await executions.writer.stop()
        await db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_database_only_request_commits_with_its_record_or_not_at_all(
    make_app: Callable[..., Nexus], connect: Connect, db_url: str
) -> None:
    """create_then_boom writes a contact, then fails: with a request_id its write is
    rolled back and the failure recorded; create_contact's record and contact commit
    together (while it runs, nothing of it is in the database)."""
    app = make_app()
    app.register("create_then_fail", _create_then_fail())
    async with app.serving() as s, connect(s) as channel, reader(db_url) as store:
        wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(
                    name="create_then_fail",
                    inputs=struct(name="Ada", email="ada@x.io"),
                    request_id="fails-1",
                ),
                timeout=WAIT,
            )
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        rec = await store.find_request("anonymous", "fails-1")
        assert rec is not None and rec.state == "FAILED"
        count = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"))
        assert count.count == 0  # the contact written before the failure was rolled back
        # without a request_id the same workflow keeps its nodes' own commits
        with pytest.raises(grpc.aio.AioRpcError):
            await wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(
                    name="create_then_fail", inputs=struct(name="Bob", email="bob@x.io")
                ),
                timeout=WAIT,
            )
        count = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"))
        assert count.count == 1
        done = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="create_contact",
                inputs=struct(name="Cy", email="cy@x.io"),
                request_id="ok-1",
            ),
            timeout=WAIT,
        )
        rec = await store.get_execution(done.id)
        assert rec is not None and rec.state == "SUCCEEDED" and rec.request_id == "ok-1"
        again = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="create_contact",
                inputs=struct(name="Cy", email="cy@x.io"),
                request_id="ok-1",
            ),
            timeout=WAIT,
        )
        assert again == done
        count = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"))
        assert count.count == 2


def _create_then_fail() -> Any:
    wf = WorkflowBuilder()
    wf.add_node("ContactCreateNode", "create", {"name": "{{name}}", "email": "{{email}}"})
    # reads the contact by its email as id: never found, after the create ran
    wf.add_node("ContactReadNode", "read")
    wf.add_connection("create", "email", "read", "id")
    return wf.build()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_two_servers_racing_on_one_request_id_write_once(
    make_app: Callable[..., Nexus], connect: Connect
) -> None:
    async with two_servers(make_app, connect, "create_contact", _create) as (
        wf1,
        wf2,
        c1,
    ):
        stubs = [wf1, wf2]
        for i in range(10):
            request = wpb.ExecuteWorkflowRequest(
                name="create_contact",
                inputs=struct(name=f"Ada {i}", email=f"ada{i}@x.io"),
                request_id=f"race-{i}",
            )
            a, b = await asyncio.gather(*(s.ExecuteWorkflow(request, timeout=WAIT) for s in stubs))
            assert a.id == b.id and a.state == b.state == wpb.Execution.STATE_SUCCEEDED
        ms = mgrpc.ModelServiceStub(c1)  # type: ignore[no-untyped-call]
        count = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"))
        assert count.count == 10


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_waiting_for_another_servers_execution_is_bounded(
    make_app: Callable[..., Nexus],
    connect: Connect,
    gates: dict[str, asyncio.Event],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nexus_server import _executions

    monkeypatch.setattr(_executions, "SETTLE_SECONDS", 0.3)
    request = wpb.ExecuteWorkflowRequest(
        name="create_then_wait",
        inputs=struct(name="Ada", email="ada@x.io", gate="stuck"),
        request_id="stuck-1",
    )
    async with two_servers(make_app, connect, "create_then_wait", _create_then_wait) as (
        wf1,
        wf2,
        _,
    ):
        call = asyncio.ensure_future(wf1.ExecuteWorkflow(request, timeout=WAIT))
        await asyncio.wait_for(gates["stuck:started"].wait(), WAIT)
        seen = await wf2.ExecuteWorkflow(request, timeout=WAIT)
        assert seen.state == wpb.Execution.STATE_RUNNING  # answered, not waited on forever
        gates["stuck"].set()
        assert (await call).id == seen.id


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_inputs_the_record_cannot_hold_are_refused_naming_the_input(
    make_app: Callable[..., Nexus], connect: Connect, db_url: str
) -> None:
    app = make_app()
    async with app.serving() as s, connect(s) as channel, reader(db_url) as store:
        wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(
                    name="create_contact",
                    inputs=struct(name="Ada\x00", email="ada@x.io"),
                    request_id="nul-1",
                ),
                timeout=WAIT,
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "inputs.name" in (bad.value.details() or "")
        assert await store.find_request("anonymous", "nul-1") is None  # nothing recorded
