"""Prometheus metrics (`Nexus(enable_monitoring=True)`) and the access log, on a real
server: every call counted once by method, channel and code, with its duration; calls in
flight; executions and nodes; refusals by reason; DataFlow's pool and statements; the
hooks of the other gateway checks; off means no metric at all; the multi-process mode."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus
from nexus_server.gateway._access_log import access_line, trace_id_of
from nexus_server.gateway._config import ApiKeySpec, AuthConfig
from nexus_server.gateway._metrics import Metrics

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
EXECUTE = "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow"
KEY = "metrics-test-key-0123456789"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(timeout=5) as client:
        resp = await client.get(f"http://127.0.0.1:{port}/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return samples(resp.text)


async def execute(
    channel: grpc.aio.Channel, workflow: str, via: str = "grpc", **inputs: Any
) -> Any:
    from google.protobuf import struct_pb2

    body = struct_pb2.Struct()
    body.update(inputs)
    return await wgrpc.WorkflowServiceStub(channel).ExecuteWorkflow(  # type: ignore[no-untyped-call]
        wpb.ExecuteWorkflowRequest(name=workflow, inputs=body),
        metadata=(("x-nexus-channel", via),),
        timeout=10,
    )


async def test_calls_executions_and_nodes_are_counted(
    make_app: Callable[..., Nexus], connect: Any
) -> None:
    app = make_app(enable_monitoring=True, metrics_port=0)
    async with app.serving() as serving, connect(serving) as channel:
        assert serving.metrics is not None and serving.metrics_port
        await execute(channel, "create_contact", "cli", name="Ada", email="ada@example.com")
        await execute(channel, "create_and_read", name="Bob", email="bob@example.com")
        with pytest.raises(grpc.aio.AioRpcError):
            await execute(channel, "boom", "rest", message="no")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await execute(channel, "no_such_workflow")
        found = await scrape(serving.metrics_port)

    code = missing.value.code().name
    assert value(found, "nexus_calls_total", method=EXECUTE, channel="cli", code="OK") == 1
    assert value(found, "nexus_calls_total", method=EXECUTE, channel="grpc", code="OK") == 1
    assert value(found, "nexus_calls_total", method=EXECUTE, channel="grpc", code=code) == 1
    boom_code = [k for k in found if k[0] == "nexus_calls_total" and ("channel", "rest") in k[1]]
    assert len(boom_code) == 1 and found[boom_code[0]] == 1
    assert dict(boom_code[0][1])["code"] not in ("OK", "UNKNOWN")
    assert value(found, "nexus_call_duration_seconds_count", method=EXECUTE, channel="cli") == 1
    assert value(found, "nexus_call_duration_seconds_sum", method=EXECUTE, channel="cli") > 0
    assert value(found, "nexus_calls_in_flight", method=EXECUTE) == 0
    ok = {"workflow": "create_contact", "state": "SUCCEEDED"}
    assert value(found, "nexus_executions_total", **ok) == 1
    assert value(found, "nexus_execution_duration_seconds_count", **ok) == 1
    assert value(found, "nexus_executions_total", workflow="boom", state="FAILED") == 1
    assert value(found, "nexus_executions_running", workflow="create_contact") == 0
    nodes = {
        (dict(k[1])["workflow"], dict(k[1])["node_type"], dict(k[1])["outcome"]): v
        for k, v in found.items()
        if k[0] == "nexus_node_duration_seconds_count"
    }
    assert nodes[("create_contact", "ContactCreateNode", "completed")] == 1
    assert nodes[("create_and_read", "ContactCreateNode", "completed")] == 1
    assert nodes[("create_and_read", "ContactReadNode", "completed")] == 1
    assert nodes[("boom", "TestBoomNode", "failed")] == 1


async def test_a_streamed_execution_is_one_call(
    make_app: Callable[..., Nexus], connect: Any
) -> None:
    from google.protobuf import struct_pb2

    app = make_app(enable_monitoring=True, metrics_port=None)
    async with app.serving() as serving, connect(serving) as channel:
        assert serving.metrics is not None
        body = struct_pb2.Struct()
        body.update({"name": "Ada", "email": "ada@example.com"})
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        events = [
            e
            async for e in stub.StreamExecution(
                wpb.StreamExecutionRequest(name="create_contact", inputs=body), timeout=10
            )
        ]
        assert events
        found = samples(serving.metrics.exposition().decode())
    stream = "/nexus.workflow.v1.WorkflowService/StreamExecution"
    assert value(found, "nexus_calls_total", method=stream, channel="grpc", code="OK") == 1
    assert value(found, "nexus_calls_in_flight", method=stream) == 0
    ok = {"workflow": "create_contact", "state": "SUCCEEDED"}
    assert value(found, "nexus_executions_total", **ok) == 1


async def test_calls_in_flight_while_an_execution_runs(
    make_app: Callable[..., Nexus], connect: Any, gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(enable_monitoring=True, metrics_port=0)
    async with app.serving() as serving, connect(serving) as channel:
        assert serving.metrics_port is not None
        call = asyncio.create_task(execute(channel, "gated", gate="g1"))
        async with asyncio.timeout(10):
            await gates["g1:started"].wait()
        during = await scrape(serving.metrics_port)
        gates["g1"].set()
        await asyncio.wait_for(call, 10)
        after = await scrape(serving.metrics_port)
    assert value(during, "nexus_calls_in_flight", method=EXECUTE) == 1
    assert value(during, "nexus_executions_running", workflow="gated") == 1
    assert value(after, "nexus_calls_in_flight", method=EXECUTE) == 0
    assert value(after, "nexus_executions_running", workflow="gated") == 0


async def test_auth_failures_are_counted_by_reason(
    make_app: Callable[..., Nexus], connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(
        enable_monitoring=True,
        metrics_port=0,
        enable_auth=True,
        auth=AuthConfig(api_keys={"ops": ApiKeySpec(KEY)}),
    )
    caplog.set_level(logging.INFO, logger="nexus.access")
    async with app.serving() as serving, connect(serving) as channel:
        assert serving.metrics is not None
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        for metadata in ((), (("x-api-key", "not-a-valid-key-0123456789"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListWorkflows(wpb.ListWorkflowsRequest(), metadata=metadata)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await stub.ListWorkflows(wpb.ListWorkflowsRequest(), metadata=(("x-api-key", KEY),))
        found = samples(serving.metrics.exposition().decode())
    listing = "/nexus.workflow.v1.WorkflowService/ListWorkflows"
    for reason in ("CREDENTIALS_MISSING", "CREDENTIALS_INVALID"):
        assert value(found, "nexus_auth_failures_total", reason=reason, channel="grpc") == 1
    assert (
        value(found, "nexus_calls_total", method=listing, channel="grpc", code="UNAUTHENTICATED")
        == 2
    )
    assert value(found, "nexus_calls_total", method=listing, channel="grpc", code="OK") == 1
    assert value(found, "nexus_calls_in_flight", method=listing) == 0
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "nexus.access"]
    listed = [line for line in lines if line["method"] == listing]
    assert [(line["principal"], line["code"]) for line in listed] == [
        ("", "UNAUTHENTICATED"),
        ("", "UNAUTHENTICATED"),
        ("key:ops", "OK"),
    ]


async def test_monitoring_off_keeps_no_metrics(
    make_app: Callable[..., Nexus], connect: Any
) -> None:
    app = make_app()  # enable_monitoring unset: off
    async with app.serving() as serving, connect(serving) as channel:
        await execute(channel, "create_contact", name="Ada", email="ada@example.com")
        assert serving.metrics is None and serving.metrics_port is None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_dataflow_pool_and_statements(db_url: str, connect: Any) -> None:
    from dataflow import DataFlow
    from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
    from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc

    db = DataFlow(db_url, enable_metrics=True)
    assert db.metrics is not None

    @db.model
    class Meter:
        id: str
        reading: int = 0

    app = Nexus(grpc_port=0, enable_monitoring=True, metrics_port=None, grace_period=2)
    app.integrate_dataflow(db)
    try:
        async with app.serving() as serving, connect(serving) as channel:
            assert serving.metrics is not None and serving.metrics_port is None
            await mgrpc.ModelServiceStub(channel).CountRecords(  # type: ignore[no-untyped-call]
                mpb.CountRecordsRequest(model="Meter"), timeout=5
            )
            await db.ops(Meter).create(reading=3)
            found = samples(serving.metrics.exposition().decode())
    finally:
        await db.close()
    kinds = {
        dict(k[1])["kind"]: v
        for k, v in found.items()
        if k[0] == "dataflow_query_duration_seconds_count"
    }
    assert kinds.get("select", 0) >= 1 and kinds.get("insert", 0) >= 1, kinds
    database = db.dialect
    assert value(found, "dataflow_pool_connections", database=database, state="max") >= 1
    assert value(found, "dataflow_pool_connections", database=database, state="in_use") == 0


def test_dataflow_metrics_option_is_checked() -> None:
    from dataflow import DataFlow, ValidationError

    with pytest.raises(ValidationError, match="enable_metrics"):
        DataFlow("sqlite:///:memory:", enable_metrics="yes")  # type: ignore[arg-type]
    assert DataFlow("sqlite:///:memory:").metrics is None


def test_hooks_of_the_other_checks_are_exposed() -> None:
    metrics = Metrics()
    metrics.rate_limited(EXECUTE, "rest", "principal")
    metrics.shed("calls")
    metrics.watch_cache("dataflow", lambda: (1, 0))
    metrics.watch_cache("response", lambda: (0, 1))
    state = ["closed"]
    metrics.watch_breaker("database", lambda: state[0])
    found = samples(metrics.exposition().decode())
    assert (
        value(found, "nexus_rate_limited_total", method=EXECUTE, channel="rest", scope="principal")
        == 1
    )
    assert value(found, "nexus_load_shed_total", kind="calls") == 1
    assert value(found, "nexus_cache_requests_total", cache="dataflow", result="hit") == 1
    assert value(found, "nexus_cache_requests_total", cache="response", result="miss") == 1
    assert value(found, "nexus_circuit_breaker_state", dependency="database") == 0
    state[0] = "open"
    found = samples(metrics.exposition().decode())
    assert value(found, "nexus_circuit_breaker_state", dependency="database") == 2


def test_two_apps_in_one_process_have_their_own_registries() -> None:
    a, b = Metrics(), Metrics()
    a.shed("calls")
    assert a.registry is not b.registry and not a.multiprocess
    assert value(samples(b.exposition().decode()), "nexus_load_shed_total", kind="calls") == 0


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        Nexus(enable_monitoring=True, metrics_port=70000)
    with pytest.raises(ValueError, match="enable_monitoring=True"):
        Nexus(expose_metrics=True)
    with pytest.raises(ValueError, match="metrics_port"):
        Nexus(enable_monitoring=True, expose_metrics=True, metrics_port=None)
    with pytest.raises(TypeError, match="enable_monitoring"):
        Nexus(enable_monitoring="yes")  # type: ignore[arg-type]
    Nexus(enable_monitoring=True)  # accepted now


async def test_busy_metrics_port_fails_start(make_app: Callable[..., Nexus]) -> None:
    import socket

    from nexus_server._app import MetricsPortError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        app = make_app(enable_monitoring=True, metrics_port=port)
        with pytest.raises(MetricsPortError, match="metrics"):
            async with app.serving():
                pass


MULTIPROCESS = """
import sys
from nexus_server.gateway._metrics import Metrics
m = Metrics()
assert m.multiprocess
m.for_method("/a/B").ended("grpc", "OK", 0.01)
m.execution_started("wf")
m.execution_ended("wf", "SUCCEEDED", 0.5)
m.watch_breaker("database", lambda: "half_open")
m.watch_cache("response", lambda: (3, 1))
sys.stdout.write(m.exposition().decode())
"""


def test_multiprocess_mode_reads_the_shared_directory(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
    }
    outputs, texts = [], []
    for _ in range(2):  # two processes write their values; each scrape sees both
        done = subprocess.run(
            [sys.executable, "-c", MULTIPROCESS],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        outputs.append(samples(done.stdout))
        texts.append(done.stdout)
    assert any(p.suffix == ".db" for p in tmp_path.iterdir())
    first, second = outputs
    ok = {"method": "/a/B", "channel": "grpc", "code": "OK"}
    assert value(first, "nexus_calls_total", **ok) == 1
    assert value(second, "nexus_calls_total", **ok) == 2
    assert value(second, "nexus_executions_total", workflow="wf", state="SUCCEEDED") == 2
    assert value(second, "nexus_circuit_breaker_state", dependency="database") == 1
    # the values read at scrape time are copied to the shared files: summed too
    assert value(second, "nexus_cache_requests_total", cache="response", result="hit") == 6
    assert value(second, "nexus_cache_requests_total", cache="response", result="miss") == 2
    # each family once (a process's own copy beside the files' would be a second one)
    names = [line.split()[2] for line in texts[1].splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names)), names


# --- the access log ------------------------------------------------------------------------


async def test_access_log_one_line_per_call(
    make_app: Callable[..., Nexus], connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    caplog.set_level(logging.INFO, logger="nexus.access")
    async with app.serving() as serving, connect(serving) as channel:
        caplog.clear()
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        await stub.ListWorkflows(
            wpb.ListWorkflowsRequest(),
            metadata=(
                ("x-nexus-channel", "mcp"),
                ("x-nexus-caller", "ada"),
                ("x-request-id", "req-1"),
                ("traceparent", f"00-{trace}-00f067aa0ba902b7-01"),
            ),
        )
        with pytest.raises(grpc.aio.AioRpcError):
            await execute(channel, "no_such_workflow")
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "nexus.access"]
    listed = [line for line in lines if line["method"].endswith("/ListWorkflows")]
    assert len(listed) == 1
    line = listed[0]
    assert set(line) == {
        "time",
        "principal",
        "channel",
        "method",
        "code",
        "duration_ms",
        "request_id",
        "trace_id",
    }
    assert line["principal"] == "ada" and line["channel"] == "mcp" and line["code"] == "OK"
    assert line["request_id"] == "req-1" and line["trace_id"] == trace
    assert line["time"].endswith("Z") and line["duration_ms"] >= 0
    failed = [line for line in lines if line["method"] == EXECUTE]
    assert len(failed) == 1 and failed[0]["code"] not in ("OK", "UNKNOWN")
    assert failed[0]["principal"] == "anonymous" and failed[0]["trace_id"] == ""


async def test_access_log_off(
    make_app: Callable[..., Nexus], connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(access_log=False)
    caplog.set_level(logging.INFO, logger="nexus.access")
    async with app.serving() as serving, connect(serving) as channel:
        await execute(channel, "create_contact", name="Ada", email="ada@example.com")
    assert not [r for r in caplog.records if r.name == "nexus.access"]


def test_access_line_prefers_the_request_id_field_and_checks_traceparent() -> None:
    class Request:
        request_id = "retry-key"

    line = json.loads(
        access_line(
            method="/m",
            channel="grpc",
            principal="p",
            code="OK",
            seconds=0.0012345,
            request=Request(),
            metadata=(("x-request-id", "envoy-id"),),
        )
    )
    assert line["request_id"] == "retry-key" and line["duration_ms"] == 1.234
    assert trace_id_of((("traceparent", "00-" + "0" * 32 + "-00f067aa0ba902b7-01"),)) == ""
    assert trace_id_of((("traceparent", "00-xyz-00f067aa0ba902b7-01"),)) == ""
    assert trace_id_of((("traceparent", "garbage"),)) == ""


SERVED_APP = """
from nexus_server import Nexus
from workflow import WorkflowBuilder

app = Nexus(api_port=None, mcp_port=None, enable_monitoring=True, metrics_port=0)
"""


async def test_nexus_serve_writes_bare_json_access_lines_and_serves_metrics(
    tmp_path: Path,
) -> None:
    """`nexus serve` logs each call as a bare JSON line on stderr (no log prefix) and
    says where the metrics are."""
    import re

    app = tmp_path / "app.py"
    app.write_text(SERVED_APP)
    env = {
        **os.environ,
        "NEXUS_DATABASE_URL": f"sqlite:///{tmp_path}/app.db",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexus_server", "serve", str(app), "--grpc-port", "0",
        cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
            address = re.search(r"on (127\.0\.0\.1:\d+)", line)
            assert address, line
            metrics_port = None
            while metrics_port is None:
                err = (await proc.stderr.readline()).decode()
                assert err, "stderr ended before the metrics port was logged"
                found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", err)
                metrics_port = int(found.group(1)) if found else None
            async with grpc.aio.insecure_channel(address.group(1)) as channel:
                await wgrpc.WorkflowServiceStub(channel).ListWorkflows(  # type: ignore[no-untyped-call]
                    wpb.ListWorkflowsRequest(), metadata=(("x-request-id", "cli-1"),)
                )
            access = None
            while access is None:
                err = (await proc.stderr.readline()).decode()
                assert err, "stderr ended before the access line"
                if "cli-1" in err:
                    access = json.loads(err)  # the whole line is the JSON document
            found_metrics = await scrape(metrics_port)
    finally:
        proc.send_signal(2)
        async with asyncio.timeout(30):
            await proc.wait()
    assert access["method"].endswith("/ListWorkflows") and access["code"] == "OK"
    listing = "/nexus.workflow.v1.WorkflowService/ListWorkflows"
    assert value(found_metrics, "nexus_calls_total", method=listing, channel="grpc", code="OK") == 1


async def test_a_call_cancelled_while_authenticating_leaves_no_call_in_flight() -> None:
    """The client goes away while its credential is being checked (a slow identity
    provider): the call is counted CANCELLED and is no longer in flight."""
    from nexus_server._registry import WorkflowRegistry
    from nexus_server.gateway import Gateway, Policy

    entered = asyncio.Event()

    class Slow:
        async def authenticate(self, metadata: Any) -> Any:
            entered.set()
            await asyncio.Event().wait()  # never answers: the call is cancelled

    class Audit:
        active = True

        def record(self, entry: Any) -> None:
            pass

    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("x-nexus-channel", "cli"),)

        def code(self) -> None:
            return None

    metrics = Metrics()
    gateway = Gateway(
        authenticator=Slow(),
        policy=Policy(),
        registry=WorkflowRegistry(),
        audit=Audit(),
        typed_models={},
        metrics=metrics,
    )

    async def behaviour(request: Any, context: Any) -> Any:
        raise AssertionError("never admitted")

    handler = grpc.unary_unary_rpc_method_handler(behaviour)
    listing = "/nexus.workflow.v1.WorkflowService/ListWorkflows"
    wrapped = gateway.method(listing, handler)
    call = asyncio.create_task(wrapped.unary_unary(wpb.ListWorkflowsRequest(), Context()))
    async with asyncio.timeout(10):
        await entered.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    found = samples(metrics.exposition().decode())
    assert value(found, "nexus_calls_in_flight", method=listing) == 0
    assert value(found, "nexus_calls_total", method=listing, channel="cli", code="CANCELLED") == 1


async def test_rate_limit_refusals_are_counted_apart_from_auth_failures(
    make_app: Callable[..., Nexus], connect: Any
) -> None:
    app = make_app(enable_monitoring=True, metrics_port=None, rate_limit="2/minute")
    listing = "/nexus.workflow.v1.WorkflowService/ListWorkflows"
    async with app.serving() as serving, connect(serving) as channel:
        assert serving.metrics is not None
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        meta = (("x-nexus-caller", "flood"), ("x-nexus-channel", "mcp"))
        for _ in range(2):
            await stub.ListWorkflows(wpb.ListWorkflowsRequest(), metadata=meta)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListWorkflows(wpb.ListWorkflowsRequest(), metadata=meta)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        found = samples(serving.metrics.exposition().decode())
    limited = {"method": listing, "channel": "mcp", "scope": "default"}
    assert value(found, "nexus_rate_limited_total", **limited) == 1
    assert not [k for k in found if k[0] == "nexus_auth_failures_total"]
    assert (
        value(found, "nexus_calls_total", method=listing, channel="mcp", code="RESOURCE_EXHAUSTED")
        == 1
    )


async def test_shed_calls_and_the_database_breaker_are_reported(
    make_app: Callable[..., Nexus],
    connect: Any,
    gates: dict[str, asyncio.Event],
) -> None:
    from nexus_server._limits import Limits

    app = make_app(enable_monitoring=True, metrics_port=None, limits=Limits(max_executions=1))
    async with app.serving() as serving, connect(serving) as channel:
        assert serving.metrics is not None
        first = asyncio.create_task(execute(channel, "gated", gate="shed"))
        async with asyncio.timeout(10):
            await gates["shed:started"].wait()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await execute(channel, "gated", gate="other")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gates["shed"].set()
        await asyncio.wait_for(first, 10)
        found = samples(serving.metrics.exposition().decode())
    assert value(found, "nexus_load_shed_total", kind="executions") == 1
    assert value(found, "nexus_circuit_breaker_state", dependency="database") == 0


async def test_a_nodes_own_breaker_shows_in_health_and_metrics(
    make_app: Callable[..., Nexus],
) -> None:
    """`app.add_breaker(breaker)`: a breaker a node uses around another service is a
    GET /health component (unhealthy while open, the server still healthy) and a
    `nexus_circuit_breaker_state` series, as the database's breaker is."""
    from dataflow import CircuitBreaker

    payments = CircuitBreaker("payments", failures=1, reset_after=60.0)
    app = make_app(enable_monitoring=True, metrics_port=None)
    app.add_breaker(payments)
    with pytest.raises(ValueError, match="'payments' is taken"):
        app.add_breaker(CircuitBreaker("payments"))
    with pytest.raises(ValueError, match="'database' is taken"):
        app.add_breaker(CircuitBreaker("database"))
    async with app.serving() as serving:
        assert serving.metrics is not None
        closed = app.health.state("payments")
        assert closed is not None and closed["state"] == "closed"
        found = samples(serving.metrics.exposition().decode())
        assert value(found, "nexus_circuit_breaker_state", dependency="payments") == 0
        payments.failure()  # one failure opens it (failures=1)
        opened = app.health.state("payments")
        assert opened is not None and opened["state"] == "open"
        assert opened["status"] == "unhealthy"
        assert app.health.document()["status"] == "healthy"  # not critical
        found = samples(serving.metrics.exposition().decode())
        assert value(found, "nexus_circuit_breaker_state", dependency="payments") == 2


async def test_cache_hits_and_misses_are_reported(db_url: str, connect: Any) -> None:
    """DataFlow's query cache and the workflows' response cache, read from their own
    counters at each scrape."""
    from dataflow import DataFlow
    from workflow import WorkflowBuilder

    db = DataFlow(db_url, enable_metrics=True, enable_caching=True)

    @db.model
    class Gadget:
        id: str
        name: str = ""

    app = Nexus(grpc_port=0, enable_monitoring=True, metrics_port=None, grace_period=2)
    app.integrate_dataflow(db)
    listing = WorkflowBuilder("List gadgets.")
    listing.add_node("GadgetListNode", "list", {})
    app.register("gadgets", listing.build(), cache_ttl=30)
    try:
        async with app.serving() as serving, connect(serving) as channel:
            assert serving.metrics is not None
            made = await db.ops(Gadget).create(name="a")
            for _ in range(2):
                await db.ops(Gadget).read(made["id"])
                await execute(channel, "gadgets")
            found = samples(serving.metrics.exposition().decode())
    finally:
        await db.close()
    for cache in ("dataflow", "response"):
        assert value(found, "nexus_cache_requests_total", cache=cache, result="hit") >= 1
        assert value(found, "nexus_cache_requests_total", cache=cache, result="miss") >= 1


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_the_production_patterns_options_each_show_in_the_metrics(
    db_url: str, connect: Any
) -> None:
    """The seed's "Production Pattern" options (`enable_auth=True,
    enable_monitoring=True`; DataFlow `enable_metrics=True, enable_caching=True,
    connection_pool_size=20`): each has an effect the metrics show."""
    from dataflow import DataFlow
    from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
    from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc

    db = DataFlow(db_url, enable_metrics=True, enable_caching=True, connection_pool_size=20)

    @db.model
    class Widget:
        id: str
        name: str = ""

    app = Nexus(
        grpc_port=0,
        enable_auth=True,
        auth=AuthConfig(api_keys={"ops": ApiKeySpec(KEY)}),
        enable_monitoring=True,
        metrics_port=0,
        grace_period=2,
    )
    app.integrate_dataflow(db)
    try:
        async with app.serving() as serving, connect(serving) as channel:
            assert serving.metrics_port is not None
            stub = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            made = await db.ops(Widget).create(name="w")
            request = mpb.GetRecordRequest(model="Widget", id=made["id"])
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetRecord(request, timeout=5)  # no credential
            for _ in range(2):
                await stub.GetRecord(request, metadata=(("x-api-key", KEY),), timeout=5)
            found = await scrape(serving.metrics_port)
    finally:
        await db.close()
    get = "/nexus.model.v1.ModelService/GetRecord"
    assert value(found, "nexus_calls_total", method=get, channel="grpc", code="OK") == 2
    assert value(found, "nexus_auth_failures_total", reason="CREDENTIALS_MISSING", channel="grpc")
    assert value(found, "dataflow_pool_connections", database="postgresql", state="max") == 20
    assert value(found, "nexus_cache_requests_total", cache="dataflow", result="hit") >= 1
    kinds = [k for k in found if k[0] == "dataflow_query_duration_seconds_count"]
    assert kinds


async def test_access_log_trace_id_is_the_calls_span(
    make_app: Callable[..., Nexus], connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """With tracing on, a call without a `traceparent` gets the trace id of the span
    the server opened for it."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    app = make_app(tracer_provider=provider)
    caplog.set_level(logging.INFO, logger="nexus.access")
    async with app.serving() as serving, connect(serving) as channel:
        caplog.clear()
        spans.clear()
        await execute(channel, "create_contact", name="Ada", email="ada@example.com")
        lines = [
            json.loads(r.getMessage())
            for r in caplog.records
            if r.name == "nexus.access" and EXECUTE in r.getMessage()
        ]
    assert len(lines) == 1 and lines[0]["trace_id"]
    traces = {f"{s.context.trace_id:032x}" for s in spans.get_finished_spans()}
    assert lines[0]["trace_id"] in traces
