"""Health while the event loop is busy: a CPU-heavy workflow that holds the loop in
slices does not make the health service say NOT_SERVING (a database ping delayed by the
loop is not a database failure), while a database that is really gone does."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dataflow import DataFlow
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving
from nexus_server._limits import Limits
from workflow import Node, Output, Param, WorkflowBuilder, register_node, unregister_node

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: One node holds the loop this long; the ping's timeout is shorter, so a ping that
#: counted the loop's delay as the database's would fail during every slice.
SLICE = 0.4
NODES = 8
#: A sensitive health check: one failed ping is enough for NOT_SERVING.
SENSITIVE = Limits(health_check_timeout=0.2, health_check_failures=1)


class LimitsBusyNode(Node):
    """Burns CPU on the event loop for `seconds` (a plain function node runs inline)."""

    __test__ = False
    type_name = "LimitsBusyNode"
    parameters = {"seconds": Param(float, default=SLICE)}
    outputs = {"seconds": Output(float)}

    def run(self, seconds: float) -> dict[str, Any]:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        return {"seconds": seconds}


@pytest.fixture(autouse=True)
def _busy_node() -> Iterator[None]:
    register_node(LimitsBusyNode)
    yield
    unregister_node("LimitsBusyNode")


def _busy_workflow() -> Any:
    b = WorkflowBuilder("Holds the loop in slices.")
    for i in range(NODES):
        b.add_node("LimitsBusyNode", f"n{i}")
        if i:
            b.add_connection(f"n{i - 1}", "seconds", f"n{i}", "seconds")
    return b.build()


async def _watch(address: str, seen: list[int], stop: asyncio.Event) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        reader = asyncio.ensure_future(_collect(stream, seen))
        await stop.wait()
        reader.cancel()
        stream.cancel()


async def _collect(stream: Any, seen: list[int]) -> None:
    async for resp in stream:
        seen.append(resp.status)


async def _checks(address: str, count: int) -> None:
    """`count` health checks answered SERVING (the watcher has run meanwhile)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(count):
            resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == SERVING
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_busy_loop_is_not_a_missing_database(
    make_app: Callable[..., Nexus],
    connect: Callable[[Serving], Any],
) -> None:
    app = make_app(health_check_interval=0.05, limits=SENSITIVE)
    app.register("busy", _busy_workflow())
    async with asyncio.timeout(60), app.serving() as info, connect(info) as channel:
        seen: list[int] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(info.address, seen, stop))
        try:
            await _checks(info.address, 3)
            wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            started = time.monotonic()
            done = await wf.ExecuteWorkflow(wpb.ExecuteWorkflowRequest(name="busy"), timeout=30)
            assert done.state == wpb.Execution.STATE_SUCCEEDED
            assert time.monotonic() - started >= SLICE * NODES * 0.9
            await _checks(info.address, 5)  # watcher rounds after the execution too
        finally:
            stop.set()
            await asyncio.wait_for(watcher, 10)
        assert seen and seen[0] == SERVING
        assert NOT_SERVING not in seen, seen


@pytest.fixture
async def own_pg_database(pg_url: str) -> AsyncIterator[tuple[str, str]]:
    """A PostgreSQL database of its own (on the test server), so cutting it off
    disturbs nothing else."""
    name = f"nexus_limits_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_url, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{pg_url.rsplit('/', 1)[0]}/{name}", name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_a_database_really_gone_is_not_serving(
    pg_url: str, own_pg_database: tuple[str, str]
) -> None:
    url, name = own_pg_database
    db = DataFlow(url)
    app = Nexus(grpc_port=0, health_check_interval=0.05, limits=SENSITIVE)
    app.integrate_dataflow(db)
    admin = await asyncpg.connect(pg_url, timeout=5)
    try:
        async with (
            asyncio.timeout(30),
            app.serving() as info,
            grpc.aio.insecure_channel(info.address) as channel,
        ):
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            statuses = stream.__aiter__()
            assert (await statuses.__anext__()).status == SERVING
            # the database goes away for good: dropped, its connections terminated
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            while (await statuses.__anext__()).status != NOT_SERVING:
                pass
            stream.cancel()
    finally:
        await admin.close()
        await db.close()
