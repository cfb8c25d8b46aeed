"""`Nexus(drain_delay=...)` / `nexus serve --drain-delay`: at shutdown the server says
NOT_SERVING and goes on answering for the delay (a load balancer's health checks move
new calls away meanwhile), and only then stops taking calls. tests/cluster shows what
it is for: a replica stopped under load behind Envoy fails no call with it, and does
without it (calls received but not yet started when grpc stops are cancelled)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus

ROOT = Path(__file__).resolve().parents[2]
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize("value", [-1, 3601, float("nan"), "5", True])
def test_a_bad_drain_delay_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="drain_delay"):
        Nexus(drain_delay=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["-1", "x", "nan", "3601"])
def test_a_bad_drain_delay_flag_is_a_usage_error(value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "serve", "examples/contacts_app.py",
         f"--drain-delay={value}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "argument --drain-delay: expected seconds" in done.stderr


@pytest.mark.timeout(60)
async def test_the_server_answers_during_the_delay_while_not_serving() -> None:
    delay = 2.0
    app = Nexus(grpc_port=0, api_port=None, mcp_port=None, drain_delay=delay, grace_period=1)
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def serve() -> None:
        async with app.serving() as info:
            ready.set_result(info.address)
            await stop.wait()

    task = asyncio.create_task(serve())
    address = await asyncio.wait_for(ready, 30)
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        workflows = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        await workflows.ListWorkflows(wpb.ListWorkflowsRequest(), timeout=10)
        stop.set()
        began = time.monotonic()
        # NOT_SERVING within a moment of the stop
        while (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != (
            NOT_SERVING
        ):
            assert time.monotonic() - began < delay, "still SERVING after the stop"
            await asyncio.sleep(0.02)
        # and still answering calls, until the delay is over
        answered = 0
        while time.monotonic() - began < delay * 0.75:
            await workflows.ListWorkflows(wpb.ListWorkflowsRequest(), timeout=5)
            answered += 1
            await asyncio.sleep(0.05)
        assert answered > 0
        await asyncio.wait_for(task, 30)
        assert time.monotonic() - began >= delay
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await workflows.ListWorkflows(wpb.ListWorkflowsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
