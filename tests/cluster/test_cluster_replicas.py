"""The issue's local cluster, end to end: 3 `nexus serve --no-envoy` replicas on one
PostgreSQL database of their own and one real Envoy from `nexus envoy-config --upstream`
x3. A workflow registered over the network on replica 1 is executed through Envoy
(whichever replica Envoy picks serves it); an execution of it held running on replica 3
is watched from replica 2 and cancelled from replica 1: the watcher sees it cancelled,
the stream on replica 3 ends cancelled, and the record says CANCELLED everywhere.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc

Serve = Callable[..., Awaitable[Any]]
Front = Callable[..., Awaitable[Any]]
WAIT = 30.0
#: Executions of the registered workflow sent through Envoy.
CALLS = 12


def _struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _gated(name: str) -> wpb.RegisterWorkflowRequest:
    """`name`: wait for the file its `gate` input names (FileGateNode, a node type of
    the replicas' app)."""
    d = wpb.WorkflowDefinition(description="Waits for a gate file.")
    d.nodes.add(id="wait", type="FileGateNode", params=_struct(gate="{{gate}}"))
    return wpb.RegisterWorkflowRequest(name=name, definition=d)


async def _until(what: str, check: Callable[[], Awaitable[bool]]) -> None:
    """Poll `check` (bounded by WAIT): the state polled lives in other processes."""
    async with asyncio.timeout(WAIT):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert await check(), what


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend_url", ["postgres"], indirect=True)
async def test_register_on_one_execute_through_envoy_watch_and_cancel_across_replicas(
    backend_url: str, serve: Serve, front: Front, tmp_path: Path
) -> None:
    replicas = [await serve(backend_url) for _ in range(3)]
    envoy = await front(backend_url, replicas)
    channels = [grpc.aio.insecure_channel(r.address) for r in replicas]
    one, two, three = (wgrpc.WorkflowServiceStub(c) for c in channels)  # type: ignore[no-untyped-call]
    name = f"gated_{uuid.uuid4().hex[:8]}"
    try:
        registered = await one.RegisterWorkflow(_gated(name), timeout=WAIT)
        assert registered.name == name

        async def everywhere() -> bool:
            for stub in (two, three):
                listed = await stub.ListWorkflows(wpb.ListWorkflowsRequest(), timeout=5)
                if name not in {w.name for w in listed.workflows}:
                    return False
            return True

        await _until("the registration on every replica", everywhere)

        # executed through Envoy: every replica that Envoy picks serves it
        open_gate = tmp_path / "open"
        open_gate.touch()
        before = {a: h.rq_success for a, h in (await asyncio.to_thread(envoy.hosts)).items()}
        async with grpc.aio.insecure_channel(envoy.address) as front_channel:
            stub = wgrpc.WorkflowServiceStub(front_channel)  # type: ignore[no-untyped-call]
            for _ in range(CALLS):
                inputs = _struct(gate=str(open_gate))
                done = await stub.ExecuteWorkflow(
                    wpb.ExecuteWorkflowRequest(name=name, inputs=inputs), timeout=WAIT
                )
                assert done.state == wpb.Execution.STATE_SUCCEEDED, done
                assert done.outputs["wait"]["opened"] is True
        hosts = await asyncio.to_thread(envoy.hosts)
        served = {a: h.rq_success - before[a] for a, h in hosts.items()}
        print(f"executions of {name} per replica through Envoy: {served}")
        assert sum(1 for n in served.values() if n > 0) >= 2, served

        # held running on replica 3, watched from replica 2, cancelled from replica 1
        stream = three.StreamExecution(
            wpb.StreamExecutionRequest(
                name=name,
                inputs=_struct(gate=str(tmp_path / "never")),
            ),
            timeout=WAIT,
        )
        first = await stream.read()
        assert first.WhichOneof("event") == "execution_started"
        execution_id = first.execution_id

        async def recorded_running() -> bool:
            try:
                got = await two.GetExecution(wpb.GetExecutionRequest(id=execution_id), timeout=5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                return False
            return bool(got.state == wpb.Execution.STATE_RUNNING)

        await _until("the running record visible on replica 2", recorded_running)
        seen: list[Any] = []

        async def watch() -> None:
            call = two.WatchExecution(wpb.WatchExecutionRequest(id=execution_id), timeout=WAIT)
            async for event in call:
                seen.append(event)

        watcher = asyncio.create_task(watch())

        async def waiting_seen() -> bool:
            return any(
                e.WhichOneof("event") == "node_started" and e.node_started.node_id == "wait"
                for e in seen
            )

        await _until("replica 3's events forwarded to the watcher on replica 2", waiting_seen)
        cancelled = await one.CancelExecution(
            wpb.CancelExecutionRequest(id=execution_id), timeout=WAIT
        )
        assert cancelled.state == wpb.Execution.STATE_CANCELLED
        async with asyncio.timeout(WAIT):
            await watcher
        assert seen[-1].WhichOneof("event") == "execution_cancelled", seen[-1]
        rest = []
        async with asyncio.timeout(WAIT):
            while (event := await stream.read()) is not grpc.aio.EOF:
                rest.append(event)
        assert rest[-1].WhichOneof("event") == "execution_cancelled"
        for stub in (one, two, three):
            record = await stub.GetExecution(wpb.GetExecutionRequest(id=execution_id), timeout=5)
            assert record.state == wpb.Execution.STATE_CANCELLED
    finally:
        for channel in channels:
            await channel.close()
