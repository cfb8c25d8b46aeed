"""Executions are durable: they survive a restart, in-flight ones are cancelled by a
graceful stop, and ones a crash cut short are marked INTERRUPTED, never left RUNNING."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving
from nexus_server._store import ExecutionRecord, Store, body_hash

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
Connect = Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]]
Details = Callable[[grpc.aio.AioRpcError], tuple[error_details_pb2.ErrorInfo, Any]]
S = wpb.Execution
WAIT = 10.0
ROOT = Path(__file__).resolve().parents[2]


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@contextlib.asynccontextmanager
async def served(app: Nexus, connect: Connect) -> AsyncIterator[tuple[Any, Any]]:
    """The app serving, with its two stubs; the app's DataFlow is closed on exit so the
    next app can declare the same models."""
    try:
        async with app.serving() as s, connect(s) as channel:
            yield (
                wgrpc.WorkflowServiceStub(channel),  # type: ignore[no-untyped-call]
                mgrpc.ModelServiceStub(channel),  # type: ignore[no-untyped-call]
            )
    finally:
        assert app.db is not None
        await app.db.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_executions_survive_a_restart(
    make_app: Callable[..., Nexus], connect: Connect, details: Details
) -> None:
    async with served(make_app(), connect) as (wf, _):
        ok = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="create_contact",
                inputs=struct(name="Ada", email="ada@x.io"),
                request_id="before-restart",
            ),
            timeout=WAIT,
        )
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(name="boom", inputs=struct(message="m")), timeout=WAIT
            )
        failed_id = details(failure.value)[0].metadata["execution_id"]
        failed = await wf.GetExecution(wpb.GetExecutionRequest(id=failed_id))

    async with served(make_app(), connect) as (wf, ms):
        assert await wf.GetExecution(wpb.GetExecutionRequest(id=ok.id)) == ok
        assert await wf.GetExecution(wpb.GetExecutionRequest(id=failed_id)) == failed
        listed = await wf.ListExecutions(wpb.ListExecutionsRequest())
        assert [e.id for e in listed.executions] == [failed_id, ok.id]
        # the idempotency record is durable too: a retry after the restart does not rerun
        retry = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="create_contact",
                inputs=struct(name="Ada", email="ada@x.io"),
                request_id="before-restart",
            ),
            timeout=WAIT,
        )
        assert retry == ok
        count = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"))
        assert count.count == 1
        events = await wf.WatchExecution(wpb.WatchExecutionRequest(id=ok.id)).read()
        assert events.execution_completed.execution == ok


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_row_left_running_is_marked_interrupted_at_start(
    make_app: Callable[..., Nexus], connect: Connect, expect_error: ExpectError
) -> None:
    first = make_app()
    assert first.db is not None
    await first.db.initialize()
    store = Store(first.db)
    await store.initialize()
    now = dt.datetime.now(dt.UTC)
    rec = ExecutionRecord(
        id="cut-short",
        workflow="create_contact",
        state="RUNNING",
        caller="anonymous",
        request_id="cut-1",
        request_hash=body_hash("create_contact", {"name": "Ada", "email": "ada@x.io"}),
        inputs={"name": "Ada", "email": "ada@x.io"},
        outputs=None,
        error=None,
        create_time=now,
        start_time=now,
        end_time=None,
    )
    await store.write_executions([rec])
    await first.db.close()

    async with served(make_app(), connect) as (wf, _):
        ex = await wf.GetExecution(wpb.GetExecutionRequest(id="cut-short"))
        assert ex.state == S.STATE_INTERRUPTED
        assert ex.error.code == grpc.StatusCode.ABORTED.value[0]
        assert "stopped" in ex.error.message
        assert ex.HasField("end_time")
        interrupted = await wf.ListExecutions(wpb.ListExecutionsRequest(state=S.STATE_INTERRUPTED))
        assert [e.id for e in interrupted.executions] == ["cut-short"]
        assert (
            await wf.ListExecutions(wpb.ListExecutionsRequest(state=S.STATE_RUNNING))
        ).executions == []
        # a retry of the interrupted request answers with its recorded failure
        meta, _ = await expect_error(
            wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(
                    name="create_contact",
                    inputs=struct(name="Ada", email="ada@x.io"),
                    request_id="cut-1",
                ),
                timeout=WAIT,
            ),
            grpc.StatusCode.ABORTED,
            "EXECUTION_INTERRUPTED",
        )
        assert meta["execution_id"] == "cut-short"


async def test_graceful_stop_cancels_in_flight_executions(
    make_app: Callable[..., Nexus], connect: Connect, gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(grace_period=0.2)
    async with app.serving() as s:
        # a channel that outlives the server: the call ends because the server stops
        client = grpc.aio.insecure_channel(s.address)
        wf = wgrpc.WorkflowServiceStub(client)  # type: ignore[no-untyped-call]
        call = wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="gated", inputs=struct(gate="never")), timeout=WAIT
        )
        waiting = asyncio.ensure_future(call)
        async with asyncio.timeout(WAIT):
            await gates["never:started"].wait()
        running = await wf.ListExecutions(wpb.ListExecutionsRequest(state=S.STATE_RUNNING))
        (ex,) = running.executions
    try:
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async with asyncio.timeout(WAIT):
                await waiting
        assert ended.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert gates["never:cancelled"].is_set()
    finally:
        await client.close()
        assert app.db is not None
        await app.db.close()

    async with served(make_app(), connect) as (wf, _):
        after = await wf.GetExecution(wpb.GetExecutionRequest(id=ex.id))
        assert after.state == S.STATE_CANCELLED


APP = """
import asyncio
import sys

from dataflow import DataFlow
from nexus_server import Nexus
from workflow import Node, Output, Param, WorkflowBuilder, register_node


@register_node
class HangNode(Node):
    parameters = {"x": Param(int)}
    outputs = {"x": Output(int)}

    async def run(self, x):
        await asyncio.Event().wait()  # until the process is killed
        return {"x": x}


app = Nexus(grpc_port=0, api_port=None, mcp_port=None)
db = DataFlow(sys.argv[1])


@db.model
class Contact:
    id: str
    name: str


app.integrate_dataflow(db)
wf = WorkflowBuilder()
wf.add_node("HangNode", "hang", {"x": "{{x}}"})
app.register("hang", wf.build())
app.start()
"""


async def test_a_killed_server_leaves_interrupted_executions(
    tmp_path: Path, make_app: Callable[..., Nexus], connect: Connect
) -> None:
    url = f"sqlite:///{tmp_path / 'killed.db'}"
    script = tmp_path / "hang_app.py"
    script.write_text(textwrap.dedent(APP))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), url, stdout=subprocess.PIPE, env=env, cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT):
            line = (await proc.stdout.readline()).decode()
        found = re.search(r"\bon (127\.0\.0\.1:\d+)", line)
        assert found, line
        address = found.group(1)
        async with grpc.aio.insecure_channel(address) as channel:
            wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            call = wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(name="hang", inputs=struct(x=1)), timeout=WAIT
            )
            pending = asyncio.ensure_future(call)
            async with asyncio.timeout(WAIT):
                while True:
                    resp = await wf.ListExecutions(wpb.ListExecutionsRequest(state=S.STATE_RUNNING))
                    if resp.executions:
                        break
                    await asyncio.sleep(0.02)
            (running,) = resp.executions
            proc.send_signal(signal.SIGKILL)
            async with asyncio.timeout(WAIT):
                await proc.wait()
            with pytest.raises(grpc.aio.AioRpcError):
                async with asyncio.timeout(WAIT):
                    await pending
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    app = make_app(url=url, workflows=False, models=False)
    async with served(app, connect) as (wf, _):
        ex = await wf.GetExecution(wpb.GetExecutionRequest(id=running.id))
        assert ex.state == S.STATE_INTERRUPTED
        assert ex.workflow == "hang" and ex.inputs["x"] == 1


async def test_graceful_stop_lets_in_flight_calls_finish(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(grace_period=WAIT)
    cm = app.serving()
    s = await cm.__aenter__()
    client = grpc.aio.insecure_channel(s.address)
    try:
        wf = wgrpc.WorkflowServiceStub(client)  # type: ignore[no-untyped-call]
        health = health_pb2_grpc.HealthStub(client)
        call = wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="gated", inputs=struct(gate="late", value=1)),
            timeout=WAIT,
        )
        in_flight = asyncio.ensure_future(call)
        async with asyncio.timeout(WAIT):
            await gates["late:started"].wait()
        stopping = asyncio.create_task(cm.__aexit__(None, None, None))
        async with asyncio.timeout(WAIT):  # the server says it is going away
            while True:
                try:
                    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                except grpc.aio.AioRpcError:
                    break  # no longer accepting calls
                await asyncio.sleep(0.01)
        gates["late"].set()
        async with asyncio.timeout(WAIT):
            done = await in_flight
            await stopping
        assert done.state == S.STATE_SUCCEEDED
        assert MessageToDict(done.outputs) == {"wait": {"value": 1}}
    finally:
        await client.close()
        assert app.db is not None
        await app.db.close()
