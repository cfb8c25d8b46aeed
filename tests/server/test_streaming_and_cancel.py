"""StreamExecution, WatchExecution and cancellation over a real server.

Slow executions use the `gated` workflow: its node waits on an asyncio.Event the test
sets, so nothing sleeps blindly, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict
from google.rpc import error_details_pb2

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
Details = Callable[[grpc.aio.AioRpcError], tuple[error_details_pb2.ErrorInfo, Any]]
S = wpb.Execution
WAIT = 10.0


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def kinds(events: list[wpb.ExecutionEvent]) -> list[str]:
    return [str(e.WhichOneof("event")) for e in events]


def final_execution(event: wpb.ExecutionEvent) -> wpb.Execution:
    kind = event.WhichOneof("event")
    assert kind in ("execution_completed", "execution_failed", "execution_cancelled"), kind
    execution: wpb.Execution = getattr(event, kind).execution
    return execution


async def collect(stream: Any) -> list[wpb.ExecutionEvent]:
    """The rest of a server stream's events (read() so that a test may read some first)."""
    events: list[wpb.ExecutionEvent] = []
    async with asyncio.timeout(WAIT):
        while (ev := await stream.read()) is not grpc.aio.EOF:
            events.append(ev)
    return events


def execute_in_background(wf: Any, **request: Any) -> asyncio.Task[wpb.Execution]:
    async def call() -> wpb.Execution:
        ex: wpb.Execution = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(**request), timeout=WAIT
        )
        return ex

    return asyncio.create_task(call())


async def wait_for(event: asyncio.Event) -> None:
    async with asyncio.timeout(WAIT):
        await event.wait()


async def wait_state(wf: Any, execution_id: str, state: int) -> wpb.Execution:
    """Poll GetExecution until the execution is in `state` (bounded)."""
    async with asyncio.timeout(WAIT):
        while True:
            ex: wpb.Execution = await wf.GetExecution(wpb.GetExecutionRequest(id=execution_id))
            if ex.state == state:
                return ex
            await asyncio.sleep(0.01)


async def running_id(wf: Any, workflow: str = "gated") -> str:
    resp = await wf.ListExecutions(
        wpb.ListExecutionsRequest(workflow=workflow, state=S.STATE_RUNNING)
    )
    (ex,) = resp.executions
    return str(ex.id)


def assert_sequenced(events: list[wpb.ExecutionEvent]) -> None:
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert len({e.execution_id for e in events}) == 1
    assert all(e.time.seconds > 0 for e in events)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_stream_events_in_order(wf: Any) -> None:
    req = wpb.StreamExecutionRequest(
        name="create_and_read", inputs=struct(name="Ada", email="ada@x.io")
    )
    events = await collect(wf.StreamExecution(req))
    assert kinds(events) == [
        "execution_started",
        "node_started",
        "node_completed",
        "node_started",
        "node_completed",
        "execution_completed",
    ]
    assert_sequenced(events)
    started = events[0].execution_started
    assert started.workflow == "create_and_read"
    assert dict(started.inputs) == {"name": "Ada", "email": "ada@x.io"}
    assert [(e.node_started.node_id, e.node_started.node_type) for e in events[1::2][:2]] == [
        ("create", "ContactCreateNode"),
        ("read", "ContactReadNode"),
    ]
    created = events[2].node_completed
    assert created.node_id == "create" and created.outputs["email"] == "ada@x.io"
    assert events[4].node_completed.outputs["id"] == created.outputs["id"]
    final = final_execution(events[-1])
    assert final.state == S.STATE_SUCCEEDED and final.id == events[0].execution_id
    assert MessageToDict(final.outputs)["read"]["name"] == "Ada"
    assert await wf.GetExecution(wpb.GetExecutionRequest(id=final.id)) == final


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_stream_of_a_failing_execution_ends_with_execution_failed(wf: Any) -> None:
    events = await collect(
        wf.StreamExecution(wpb.StreamExecutionRequest(name="boom", inputs=struct(message="x")))
    )
    assert kinds(events) == ["execution_started", "node_started", "node_failed", "execution_failed"]
    assert_sequenced(events)
    failed = events[2].node_failed
    assert failed.node_id == "explode" and failed.node_type == "TestBoomNode"
    assert failed.error.code == grpc.StatusCode.ABORTED.value[0]
    final = final_execution(events[-1])
    assert final.state == S.STATE_FAILED
    assert final.error.code == grpc.StatusCode.ABORTED.value[0]


async def test_stream_rejects_bad_requests_before_starting(
    wf: Any, expect_error: ExpectError
) -> None:
    async def first_event(req: wpb.StreamExecutionRequest) -> list[wpb.ExecutionEvent]:
        return await collect(wf.StreamExecution(req))

    await expect_error(
        first_event(wpb.StreamExecutionRequest(name="create_contact", inputs=struct(name=1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INPUTS_INVALID",
        fields=["inputs.name", "inputs.email"],
    )
    await expect_error(
        first_event(wpb.StreamExecutionRequest(name="missing")),
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
    )
    resp = await wf.ListExecutions(wpb.ListExecutionsRequest())
    assert list(resp.executions) == []


async def test_watch_a_running_execution(wf: Any, gates: dict[str, asyncio.Event]) -> None:
    run = execute_in_background(wf, name="gated", inputs=struct(gate="w", value=7))
    await wait_for(gates["w:started"])
    execution_id = await running_id(wf)
    assert (await wf.GetExecution(wpb.GetExecutionRequest(id=execution_id))).state == (
        S.STATE_RUNNING
    )

    # a watcher that leaves early cancels nothing
    early = wf.WatchExecution(wpb.WatchExecutionRequest(id=execution_id))
    async with asyncio.timeout(WAIT):
        first = await early.read()
    assert first.WhichOneof("event") == "execution_started"
    early.cancel()

    watch = wf.WatchExecution(wpb.WatchExecutionRequest(id=execution_id))
    events: list[wpb.ExecutionEvent] = []
    async with asyncio.timeout(WAIT):
        while len(events) < 2:  # the replayed ones: started, node started
            events.append(await watch.read())
    assert kinds(events) == ["execution_started", "node_started"]
    gates["w"].set()
    events += await collect(watch)
    assert kinds(events) == [
        "execution_started",
        "node_started",
        "node_completed",
        "execution_completed",
    ]
    assert_sequenced(events)
    assert events[2].node_completed.outputs["value"] == 7
    async with asyncio.timeout(WAIT):
        done = await run
    assert done.id == execution_id and done.state == S.STATE_SUCCEEDED
    assert final_execution(events[-1]) == done


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_watch_a_finished_execution(
    wf: Any, expect_error: ExpectError, details: Details
) -> None:
    ok = await wf.ExecuteWorkflow(wpb.ExecuteWorkflowRequest(name="acme_contacts"), timeout=WAIT)
    events = await collect(wf.WatchExecution(wpb.WatchExecutionRequest(id=ok.id)))
    assert kinds(events) == ["execution_completed"]
    assert events[0].sequence == 1 and final_execution(events[0]) == ok

    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="boom", inputs=struct(message="m")), timeout=WAIT
        )
    failed_id = details(failure.value)[0].metadata["execution_id"]
    events = await collect(wf.WatchExecution(wpb.WatchExecutionRequest(id=failed_id)))
    assert kinds(events) == ["execution_failed"]
    assert final_execution(events[0]).state == S.STATE_FAILED

    async def watch_unknown() -> list[wpb.ExecutionEvent]:
        return await collect(wf.WatchExecution(wpb.WatchExecutionRequest(id="nope")))

    await expect_error(
        watch_unknown(), grpc.StatusCode.NOT_FOUND, "EXECUTION_NOT_FOUND", fields=["id"]
    )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_cancel_execution(wf: Any, gates: dict[str, asyncio.Event], details: Details) -> None:
    run = execute_in_background(wf, name="gated", inputs=struct(gate="c"))
    await wait_for(gates["c:started"])
    execution_id = await running_id(wf)
    cancelled = await wf.CancelExecution(wpb.CancelExecutionRequest(id=execution_id), timeout=WAIT)
    assert cancelled.state == S.STATE_CANCELLED
    assert cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert gates["c:cancelled"].is_set()  # the node itself was cancelled

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(WAIT):
            await run
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    info, _ = details(caught.value)
    assert info.reason == "EXECUTION_CANCELLED"
    assert info.metadata["execution_id"] == execution_id

    recorded = await wf.GetExecution(wpb.GetExecutionRequest(id=execution_id))
    assert recorded.state == S.STATE_CANCELLED and recorded.HasField("end_time")
    again = await wf.CancelExecution(wpb.CancelExecutionRequest(id=execution_id))
    assert again == recorded  # an already cancelled execution is returned unchanged


async def test_client_deadline_cancels_the_execution(
    wf: Any, gates: dict[str, asyncio.Event]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="gated", inputs=struct(gate="d")), timeout=1.5
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert gates["d:started"].is_set()
    await wait_for(gates["d:cancelled"])
    resp = await wf.ListExecutions(wpb.ListExecutionsRequest(workflow="gated"))
    (ex,) = resp.executions
    ex = await wait_state(wf, ex.id, S.STATE_CANCELLED)
    assert ex.error.code == grpc.StatusCode.CANCELLED.value[0]


async def test_closing_the_stream_cancels_the_execution(
    wf: Any, gates: dict[str, asyncio.Event]
) -> None:
    stream = wf.StreamExecution(wpb.StreamExecutionRequest(name="gated", inputs=struct(gate="s")))
    async with asyncio.timeout(WAIT):
        first = await stream.read()
    assert first.WhichOneof("event") == "execution_started"
    await wait_for(gates["s:started"])
    stream.cancel()
    await wait_for(gates["s:cancelled"])
    ex = await wait_state(wf, first.execution_id, S.STATE_CANCELLED)
    assert ex.workflow == "gated"


async def test_stream_of_a_cancelled_execution_ends_with_execution_cancelled(
    wf: Any, gates: dict[str, asyncio.Event]
) -> None:
    stream = wf.StreamExecution(wpb.StreamExecutionRequest(name="gated", inputs=struct(gate="x")))
    async with asyncio.timeout(WAIT):
        first = await stream.read()
    await wait_for(gates["x:started"])
    await wf.CancelExecution(wpb.CancelExecutionRequest(id=first.execution_id), timeout=WAIT)
    events = [first, *await collect(stream)]
    assert kinds(events)[0] == "execution_started"
    assert kinds(events)[-1] == "execution_cancelled"
    assert final_execution(events[-1]).state == S.STATE_CANCELLED
    assert_sequenced(events)


async def test_stream_retry_with_request_id_follows_the_same_execution(
    wf: Any, gates: dict[str, asyncio.Event]
) -> None:
    req = wpb.StreamExecutionRequest(
        name="gated", inputs=struct(gate="r", value=3), request_id="stream-1"
    )
    first = wf.StreamExecution(req)
    async with asyncio.timeout(WAIT):
        started = await first.read()
    await wait_for(gates["r:started"])
    retry = wf.StreamExecution(req)
    async with asyncio.timeout(WAIT):
        replayed = await retry.read()
    assert replayed.execution_id == started.execution_id
    gates["r"].set()
    a, b = await collect(first), await collect(retry)
    assert final_execution(a[-1]).id == final_execution(b[-1]).id == started.execution_id
    assert MessageToDict(final_execution(a[-1]).outputs)["wait"]["value"] == 3
    resp = await wf.ListExecutions(wpb.ListExecutionsRequest(workflow="gated"))
    assert len(resp.executions) == 1


async def test_execution_timeout(
    make_app: Callable[..., Nexus],
    connect: Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]],
    gates: dict[str, asyncio.Event],
    details: Details,
) -> None:
    app = make_app(execution_timeout=0.3)
    async with app.serving() as s, connect(s) as channel:
        wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(name="gated", inputs=struct(gate="t")), timeout=WAIT
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        info, _ = details(caught.value)
        assert info.reason == "EXECUTION_TIMEOUT"
        assert gates["t:cancelled"].is_set()
        ex = await wf.GetExecution(wpb.GetExecutionRequest(id=info.metadata["execution_id"]))
        assert ex.state == S.STATE_FAILED
        assert ex.error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        assert "timed out" in ex.error.message
