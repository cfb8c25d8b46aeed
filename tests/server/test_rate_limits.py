"""Rate limits per principal (issue 17): a token bucket per principal, enforced in the
gateway chain and so identical on every channel.

Over the limit a call is RESOURCE_EXHAUSTED with ErrorInfo `RATE_LIMITED` (metadata
`limit`, `scope`) and a `google.rpc.RetryInfo` delay; REST (through the real Envoy) is
429 with `Retry-After`; the CLI prints when to retry; MCP answers `isError` with the
delay. One principal's flood never limits another. Buckets live in memory, or in Redis
(127.0.0.1:6379, a key prefix of the test's own, deleted after it) shared by two apps.

Loops are bounded in count; the only waits are for the delay the server itself names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nexus_api.nexus.model.v1 import model_service_pb2 as m
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, RateLimit, RateLimits, Serving
from nexus_server.gateway import Principal

WAIT = 20.0
ROOT = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379/0"

Connect = Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]]


def _as(caller: str) -> tuple[tuple[str, str], ...]:
    return (("x-nexus-caller", caller),)


def _execute(name: str = "acme_contacts") -> w.ExecuteWorkflowRequest:
    return w.ExecuteWorkflowRequest(name=name, inputs=struct_pb2.Struct())


def _retry_info(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, float]:
    """The ErrorInfo and the RetryInfo delay (seconds) of a refused call."""
    status = rpc_status.from_call(err)
    assert status is not None
    info, delay = None, None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToNanoseconds() / 1e9
    assert info is not None and delay is not None, status
    return info, delay


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(WAIT):
            await call
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()
    return caught.value


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


# --- the options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (100, RateLimit(100, 60)),
        ("10/s", RateLimit(10, 1)),
        ("100/minute", RateLimit(100, 60)),
        ("100 per minute", RateLimit(100, 60)),
        ("1000/hours", RateLimit(1000, 3600)),
        ("30/5m", RateLimit(30, 300)),
        ("100/minute burst 20", RateLimit(100, 60, burst=20)),
        (RateLimit(7, 2, burst=3), RateLimit(7, 2, burst=3)),
    ],
)
def test_the_rate_limit_forms(value: Any, expected: RateLimit) -> None:
    app = Nexus(rate_limit=value)
    assert app.rate_limits().default == expected


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "", "ten/s", "10/fortnight", {"requests": 10}])
def test_a_bad_rate_limit_is_refused_naming_the_option(value: Any) -> None:
    with pytest.raises(ValueError, match=r"Nexus\(rate_limit\)=.*not a rate limit") as caught:
        Nexus(rate_limit=value)
    assert "rate_limit" in str(caught.value)


def test_a_bad_override_or_backend_is_refused_naming_it() -> None:
    app = Nexus()
    from workflow import WorkflowBuilder

    wb = WorkflowBuilder("nothing")
    with pytest.raises(ValueError, match=r"register\(rate_limit\)="):
        app.register("x", wb.build(), rate_limit="often")
    assert "x" not in app.registry
    with pytest.raises(ValueError, match=r"rate_limit_backend"):
        Nexus(rate_limit_backend="memcached://127.0.0.1")
    with pytest.raises(ValueError, match=r"RateLimits.models\['Contact:scan'\]"):
        RateLimits(models={"Contact:scan": "1/s"})


async def test_the_attribute_form_is_checked_at_start(make_app: Callable[..., Nexus]) -> None:
    app = make_app()
    app.rate_limit = "lots"
    with pytest.raises(ValueError, match=r"Nexus\(rate_limit\)"):
        async with app.serving():
            pytest.fail("served with a bad rate limit")


def test_which_limit_applies() -> None:
    """The most specific limit wins: workflow, model operation, role, default."""
    limits = RateLimits(
        "10/minute",
        workflows={"nightly": "1/hour"},
        models={"Contact:write": "5/minute", "*:bulk": "1/minute"},
        roles={"batch": "1000/minute", "slow": "1/minute"},
    )
    alice = Principal("alice", frozenset({"reader"}), None, "api_key")
    robot = Principal("robot", frozenset({"batch", "slow"}), None, "api_key")
    assert limits.choose(alice, "nightly", ()) == ("workflow:nightly", RateLimit(1, 3600))
    assert limits.choose(alice, "other", ()) == ("default", RateLimit(10, 60))
    assert limits.choose(alice, None, ["model:Contact:write"]) == (
        "model:Contact:write",
        RateLimit(5, 60),
    )
    assert limits.choose(alice, None, ["model:Company:bulk"]) == ("model:*:bulk", RateLimit(1, 60))
    assert limits.choose(alice, None, ["model:Contact:read"]) == ("default", RateLimit(10, 60))
    assert limits.choose(robot, None, ()) == ("role:batch", RateLimit(1000, 60))
    assert RateLimits().choose(alice, "nightly", ()) is None


# --- gRPC ------------------------------------------------------------------------------


async def test_grpc_refuses_past_the_limit_per_principal(
    make_app: Callable[..., Nexus], connect: Connect
) -> None:
    app = make_app(rate_limit="3/minute")
    async with _serve(app) as info, connect(info) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(3):  # the burst: a full bucket at rest
            await stub.ExecuteWorkflow(_execute(), metadata=_as("alice"), timeout=WAIT)
        err = await _refused(stub.ExecuteWorkflow(_execute(), metadata=_as("alice"), timeout=WAIT))
        info_, delay = _retry_info(err)
        assert info_.reason == "RATE_LIMITED" and info_.domain == "nexus"
        assert dict(info_.metadata) == {"limit": "3/minute", "scope": "default"}
        assert 0 < delay <= 20.0  # one token every 20 s
        assert "retry in" in (err.details() or "")
        trailers = dict(err.trailing_metadata() or ())
        assert trailers.get("retry-after") == str(max(1, -(-int(delay * 1000) // 1000)))
        # every kind of call counts, not only executions
        await _refused(stub.ListWorkflows(w.ListWorkflowsRequest(), metadata=_as("alice")))
        # another principal has its own bucket; so has the same name in another tenant
        for _ in range(3):
            await stub.ExecuteWorkflow(_execute(), metadata=_as("bob"), timeout=WAIT)
        other_tenant = (("x-nexus-caller", "alice"), ("x-nexus-tenant", "t2"))
        await stub.ExecuteWorkflow(_execute(), metadata=other_tenant, timeout=WAIT)
        # health is never limited
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(10):
            await health.Check(health_pb2.HealthCheckRequest(), metadata=_as("alice"), timeout=WAIT)


async def test_the_bucket_refills_at_the_rate(
    make_app: Callable[..., Nexus], connect: Connect
) -> None:
    """`5/s burst 2`: two at once, then one token every 200 ms."""
    app = make_app(rate_limit="5/s burst 2")
    async with _serve(app) as info, connect(info) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        await stub.ExecuteWorkflow(_execute(), metadata=_as("carol"), timeout=WAIT)
        await stub.ExecuteWorkflow(_execute(), metadata=_as("carol"), timeout=WAIT)
        admitted = 0
        for _ in range(5):  # bounded: the bucket refills one token per 200 ms
            try:
                await stub.ExecuteWorkflow(_execute(), metadata=_as("carol"), timeout=WAIT)
                admitted += 1
                break
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                _, delay = _retry_info(err)
                assert 0 < delay <= 0.2 + 1e-3
                await asyncio.sleep(delay)  # the delay the server named, no more
        assert admitted == 1


async def test_a_workflow_override_has_its_own_bucket(
    make_app: Callable[..., Nexus], connect: Connect
) -> None:
    app = make_app(rate_limit="100/minute")
    from workflow import WorkflowBuilder

    wb = WorkflowBuilder("Contacts of Acme, rarely.")
    wb.add_node("ContactListNode", "list", {"filter": {"company": "Acme"}})
    app.register("rare", wb.build(), rate_limit="2/minute")
    async with _serve(app) as info, connect(info) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(2):
            await stub.ExecuteWorkflow(_execute("rare"), metadata=_as("dan"), timeout=WAIT)
        err = await _refused(stub.ExecuteWorkflow(_execute("rare"), metadata=_as("dan")))
        info_, _ = _retry_info(err)
        assert dict(info_.metadata) == {"limit": "2/minute", "scope": "workflow:rare"}
        await stub.ExecuteWorkflow(_execute(), metadata=_as("dan"), timeout=WAIT)


async def test_a_model_operation_override(make_app: Callable[..., Nexus], connect: Connect) -> None:
    app = make_app(rate_limit=RateLimits(models={"Contact:write": "1/minute"}))
    async with _serve(app) as info, connect(info) as channel:
        ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]

        def create(email: str) -> m.CreateRecordRequest:
            record = struct_pb2.Struct()
            record.update({"name": "Eve", "email": email})
            return m.CreateRecordRequest(model="Contact", record=record)

        await ms.CreateRecord(create("e1@example.com"), metadata=_as("eve"), timeout=WAIT)
        err = await _refused(ms.CreateRecord(create("e2@example.com"), metadata=_as("eve")))
        info_, _ = _retry_info(err)
        assert info_.metadata["scope"] == "model:Contact:write"
        for _ in range(5):  # reads have no limit here
            await ms.ListRecords(m.ListRecordsRequest(model="Contact"), metadata=_as("eve"))


# --- REST through the real Envoy -------------------------------------------------------


async def test_rest_is_429_with_retry_after(make_app: Callable[..., Nexus]) -> None:
    app = make_app(rate_limit="2/minute", api_port=0)
    async with _serve(app, envoy=True) as info:
        url = f"http://{info.api_address}/v1/workflows/acme_contacts:execute"
        async with httpx.AsyncClient(timeout=WAIT) as client:
            for _ in range(2):
                ok = await client.post(url, json={}, headers={"x-nexus-caller": "frank"})
                assert ok.status_code == 200, ok.text
            refused = await client.post(url, json={}, headers={"x-nexus-caller": "frank"})
            assert refused.status_code == 429, refused.text
            assert 1 <= int(refused.headers["retry-after"]) <= 30
            body = refused.json()
            assert body["code"] == 8  # RESOURCE_EXHAUSTED
            reasons = {d.get("reason") for d in body["details"]}
            assert "RATE_LIMITED" in reasons
            assert any("retry_delay" in d for d in body["details"]), body
            other = await client.post(url, json={}, headers={"x-nexus-caller": "grace"})
            assert other.status_code == 200, other.text

            # gRPC-Web through the same Envoy: the same limit, per principal
            payload = w.ExecuteWorkflowRequest(name="acme_contacts").SerializeToString()
            frame = b"\x00" + len(payload).to_bytes(4, "big") + payload
            web = f"http://{info.api_address}/nexus.workflow.v1.WorkflowService/ExecuteWorkflow"
            headers = {
                "content-type": "application/grpc-web+proto",
                "x-grpc-web": "1",
                "x-nexus-caller": "heidi",
            }
            statuses = []
            for _ in range(3):
                resp = await client.post(web, content=frame, headers=headers)
                assert resp.status_code == 200, resp.text
                status = resp.headers.get("grpc-status")
                if status is None:  # the status came in the body's trailers frame
                    status = "0" if b"grpc-status:0" in resp.content else "?"
                statuses.append(status)
            assert statuses == ["0", "0", "8"], statuses  # RESOURCE_EXHAUSTED the third time
            assert 1 <= int(resp.headers["retry-after"]) <= 30  # the trailer, as a header


# --- the CLI and MCP ---------------------------------------------------------------------


def _client_env(info: Serving, caller: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_SERVER=info.address, NEXUS_CALLER=caller, PYTHONPATH=str(ROOT))
    return env


async def test_the_cli_says_when_to_retry(make_app: Callable[..., Nexus]) -> None:
    app = make_app()
    from workflow import WorkflowBuilder

    wb = WorkflowBuilder("Contacts of Acme, rarely.")
    wb.add_node("ContactListNode", "list", {"filter": {"company": "Acme"}})
    app.register("rare", wb.build(), rate_limit="1/minute")
    async with _serve(app) as info:
        outputs = []
        for _ in range(2):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "clients.cli",
                "run",
                "rare",
                env=_client_env(info, "henry"),
                cwd=str(ROOT),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            async with asyncio.timeout(WAIT * 2):
                out, err = await proc.communicate()
            outputs.append((proc.returncode, out.decode(), err.decode()))
        assert outputs[0][0] == 0, outputs[0]
        code, _, err_text = outputs[1]
        assert code != 0
        assert "RESOURCE_EXHAUSTED (RATE_LIMITED)" in err_text, err_text
        assert "retry in" in err_text and "limit=1/minute" in err_text, err_text


async def test_mcp_answers_is_error_with_the_delay(make_app: Callable[..., Nexus]) -> None:
    from mcp import Client, StdioServerParameters

    app = make_app()
    from workflow import WorkflowBuilder

    wb = WorkflowBuilder("Contacts of Acme, rarely.")
    wb.add_node("ContactListNode", "list", {"filter": {"company": "Acme"}})
    app.register("rare", wb.build(), rate_limit="1/minute")
    async with _serve(app) as info:
        params = StdioServerParameters(
            command=str(Path(sys.executable).parent / "nexus-mcp"),
            args=[],
            env=_client_env(info, "iris"),
            cwd=str(ROOT),
        )
        async with asyncio.timeout(WAIT * 2), Client(params, read_timeout_seconds=WAIT) as client:
            first = await client.call_tool("run_rare", {})
            assert not first.is_error, first.content
            second = await client.call_tool("run_rare", {})
            assert second.is_error
            text = " ".join(getattr(c, "text", "") for c in second.content)
            assert "RATE_LIMITED" in text and "retry in" in text, text


# --- Redis: replicas share one limit ---------------------------------------------------


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"nexus-test:{os.urandom(6).hex()}:"
    client = aioredis.Redis.from_url(REDIS, socket_timeout=2)
    try:
        async with asyncio.timeout(2):
            await client.ping()
    except Exception as exc:  # pragma: no cover - the machine runs Redis
        await client.aclose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Redis at {REDIS}: {exc}")
        pytest.skip(f"no Redis at {REDIS}: {exc}")
    yield prefix
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_two_apps_on_one_redis_share_the_limit(
    make_app: Callable[..., Nexus], connect: Connect, redis_prefix: str, tmp_path: Path
) -> None:
    limits = RateLimits("4/minute", key_prefix=redis_prefix)
    first = make_app(rate_limit=limits, rate_limit_backend=REDIS)
    second = make_app(
        rate_limit=limits,
        rate_limit_backend=REDIS,
        models=False,
        url=f"sqlite:///{tmp_path / 'second.db'}",
    )
    async with (
        _serve(first) as one,
        _serve(second) as two,
        connect(one) as ch1,
        connect(two) as ch2,
    ):
        stubs = [wgrpc.WorkflowServiceStub(c) for c in (ch1, ch2)]  # type: ignore[no-untyped-call]
        for i in range(4):  # two on each replica: the shared bucket is empty
            await stubs[i % 2].ListWorkflows(w.ListWorkflowsRequest(), metadata=_as("judy"))
        for stub in stubs:
            err = await _refused(stub.ListWorkflows(w.ListWorkflowsRequest(), metadata=_as("judy")))
            info_, delay = _retry_info(err)
            assert info_.reason == "RATE_LIMITED" and 0 < delay <= 15.0
        await stubs[1].ListWorkflows(w.ListWorkflowsRequest(), metadata=_as("kim"))
        client = aioredis.Redis.from_url(REDIS, socket_timeout=2)
        try:
            keys = [k async for k in client.scan_iter(match=redis_prefix + "*", count=1000)]
        finally:
            await client.aclose()
        assert len(keys) == 2  # one bucket per principal, not per call


async def test_an_unreachable_redis_admits_calls(
    make_app: Callable[..., Nexus], connect: Connect
) -> None:
    """A rate limit must not take the server down: without Redis, calls are admitted."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on (bound, never listening)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        app = make_app(rate_limit="1/minute", rate_limit_backend=f"redis://127.0.0.1:{port}/0")
        async with _serve(app) as info, connect(info) as channel:
            stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            for _ in range(3):
                await stub.ListWorkflows(
                    w.ListWorkflowsRequest(), metadata=_as("leo"), timeout=WAIT
                )


_REPLICA = """
import asyncio, sys
from dataflow import DataFlow
from nexus_server import Nexus, RateLimits

async def main() -> None:
    app = Nexus(
        grpc_port=0,
        api_port=None,
        mcp_port=None,
        rate_limit=RateLimits("3/minute", key_prefix=sys.argv[1]),
        rate_limit_backend=sys.argv[2],
    )
    app.integrate_dataflow(DataFlow(sys.argv[3]))
    async with app.serving() as info:
        print(info.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


async def test_two_server_processes_share_the_limit(
    make_app: Callable[..., Nexus], connect: Connect, redis_prefix: str, tmp_path: Path
) -> None:
    """A replica in another process and this one step the same buckets."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _REPLICA,
        redis_prefix,
        REDIS,
        f"sqlite:///{tmp_path / 'replica.db'}",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=str(tmp_path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        async with asyncio.timeout(WAIT):
            port = int((await proc.stdout.readline()).decode())
        here = make_app(
            rate_limit=RateLimits("3/minute", key_prefix=redis_prefix), rate_limit_backend=REDIS
        )
        async with (
            _serve(here) as info,
            connect(info) as local,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as remote,
        ):
            stubs = [wgrpc.WorkflowServiceStub(c) for c in (local, remote)]  # type: ignore[no-untyped-call]
            request = w.ListWorkflowsRequest()
            await stubs[1].ListWorkflows(
                request, metadata=_as("mia"), timeout=WAIT, wait_for_ready=True
            )
            await stubs[0].ListWorkflows(request, metadata=_as("mia"), timeout=WAIT)
            await stubs[1].ListWorkflows(request, metadata=_as("mia"), timeout=WAIT)
            for stub in stubs:
                err = await _refused(stub.ListWorkflows(request, metadata=_as("mia")))
                assert _retry_info(err)[0].reason == "RATE_LIMITED"
    finally:
        proc.stdin.close()
        try:
            async with asyncio.timeout(WAIT):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
