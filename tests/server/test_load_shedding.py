"""Load shedding (issue 17): past `Limits.max_in_flight` calls in progress (or
`Limits.max_executions` executions), a call fails at once with RESOURCE_EXHAUSTED,
ErrorInfo `OVERLOADED` and a RetryInfo delay, instead of queueing; health is never shed;
the cap frees as calls end. Slow calls are `gated` executions the test releases itself:
nothing sleeps, every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Limits, Nexus, Serving

WAIT = 20.0

Connect = Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]]


def _gated(gate: str) -> w.ExecuteWorkflowRequest:
    inputs = struct_pb2.Struct()
    inputs.update({"gate": gate})
    return w.ExecuteWorkflowRequest(name="gated", inputs=inputs)


@contextlib.asynccontextmanager
async def _serve(app: Nexus, *, envoy: bool = False) -> AsyncIterator[Serving]:
    async with asyncio.timeout(WAIT * 2):
        cm = app.serving(envoy=envoy)
        info = await cm.__aenter__()
    try:
        yield info
    finally:
        async with asyncio.timeout(WAIT):
            await cm.__aexit__(None, None, None)


def _overloaded(err: grpc.aio.AioRpcError) -> tuple[dict[str, str], float]:
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    status = rpc_status.from_call(err)
    assert status is not None
    meta: dict[str, str] | None = None
    delay: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.reason == "OVERLOADED", info
            meta = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    assert meta is not None and delay is not None, status
    return meta, delay


async def _start(
    stub: Any, gates: dict[str, asyncio.Event], names: list[str]
) -> list[asyncio.Task[Any]]:
    """Start one gated execution per name and wait until each runs its node."""
    calls = [asyncio.ensure_future(stub.ExecuteWorkflow(_gated(g), timeout=WAIT)) for g in names]
    async with asyncio.timeout(WAIT):
        for g in names:
            await gates[f"{g}:started"].wait()
    return calls


def test_the_caps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        Limits(max_in_flight=0)
    with pytest.raises(ValueError, match="max_executions"):
        Limits(max_executions=-1)


async def test_calls_past_the_cap_fail_fast(
    make_app: Callable[..., Nexus], connect: Connect, gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(limits=Limits(max_in_flight=2))
    async with _serve(app) as info, connect(info) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        calls = await _start(stub, gates, ["s1", "s2"])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListWorkflows(w.ListWorkflowsRequest(), timeout=WAIT)
        meta, delay = _overloaded(caught.value)
        assert meta == {"max_in_flight": "2"} and 0 < delay <= 5
        assert dict(caught.value.trailing_metadata() or ()).get("retry-after") == "1"
        # health is never shed
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(5):
            resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        # the admitted calls finish normally, and the cap frees with them
        gates["s1"].set()
        gates["s2"].set()
        async with asyncio.timeout(WAIT):
            done = await asyncio.gather(*calls)
        assert all(r.state == w.Execution.STATE_SUCCEEDED for r in done)
        await stub.ListWorkflows(w.ListWorkflowsRequest(), timeout=WAIT)


async def test_executions_have_their_own_cap(
    make_app: Callable[..., Nexus], connect: Connect, gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(limits=Limits(max_executions=1))
    async with _serve(app) as info, connect(info) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        calls = await _start(stub, gates, ["e1"])
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExecuteWorkflow(_gated("e2"), timeout=WAIT)
        meta, _ = _overloaded(caught.value)
        assert meta == {"max_executions": "1"}
        for _ in range(5):  # other calls go on
            await stub.ListWorkflows(w.ListWorkflowsRequest(), timeout=WAIT)
        gates["e1"].set()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*calls)
        gates["e3"].set()
        await stub.ExecuteWorkflow(_gated("e3"), timeout=WAIT)


async def test_rest_gets_429_with_retry_after(
    make_app: Callable[..., Nexus], connect: Connect, gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(limits=Limits(max_in_flight=1), api_port=0)
    async with _serve(app, envoy=True) as info, connect(info) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        calls = await _start(stub, gates, ["r1"])
        async with httpx.AsyncClient(timeout=WAIT) as client:
            refused = await client.get(f"http://{info.api_address}/v1/workflows")
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "1"
            assert "OVERLOADED" in refused.text
            health = await client.get(f"http://{info.api_address}/health")
            assert health.status_code == 200, health.text
        gates["r1"].set()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*calls)


async def test_envoy_refuses_past_the_cap_before_the_server(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    """Through Envoy the cap is enforced by Envoy itself (its upstream circuit breaker at
    `max_in_flight`): a call past it is refused there, the same way the server refuses
    one (RESOURCE_EXHAUSTED with ErrorInfo `OVERLOADED` and RetryInfo over gRPC; 429 with
    `Retry-After` over REST), marked `source: gateway`, and never reaches the server's
    event loop; health checks and probes go around the cap."""
    app = make_app(limits=Limits(max_in_flight=2), api_port=0)
    async with _serve(app, envoy=True) as info:
        assert info.api_address is not None
        async with grpc.aio.insecure_channel(info.api_address) as channel:
            stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            calls = await _start(stub, gates, ["v1", "v2"])
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListWorkflows(w.ListWorkflowsRequest(), timeout=WAIT)
            meta, delay = _overloaded(caught.value)
            assert meta == {"max_in_flight": "2", "source": "gateway"} and delay == 1
            assert "limit of 2 calls" in (caught.value.details() or "")
            async with httpx.AsyncClient(timeout=WAIT) as client:
                refused = await client.get(f"http://{info.api_address}/v1/workflows")
                assert refused.status_code == 429, refused.text
                assert refused.headers["retry-after"] == "1"
                body = refused.json()
                assert body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                reasons = [d.get("reason") for d in body["details"]]
                assert "OVERLOADED" in reasons, body
                for path in ("/health", "/readyz", "/livez"):
                    probe = await client.get(f"http://{info.api_address}{path}")
                    assert probe.status_code == 200, (path, probe.text)
            health = health_pb2_grpc.HealthStub(channel)
            resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
            gates["v1"].set()
            gates["v2"].set()
            async with asyncio.timeout(WAIT):
                done = await asyncio.gather(*calls)
            assert all(r.state == w.Execution.STATE_SUCCEEDED for r in done)
            await stub.ListWorkflows(w.ListWorkflowsRequest(), timeout=WAIT)
