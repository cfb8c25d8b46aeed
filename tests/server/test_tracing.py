"""OpenTelemetry traces: one trace per call, with spans for the gateway checks, the
workflow execution, each node and each SQL statement (text without values), in the trace
the caller's W3C `traceparent` names. Spans go to the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving
from nexus_server.gateway._config import ApiKeySpec, AuthConfig
from nexus_server.gateway._tracing import tracing_wanted

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
KEY = "tracing-test-key-0123456789"
EXECUTE = "nexus.workflow.v1.WorkflowService/ExecuteWorkflow"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    yield spans
    spans.clear()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    return tp


@contextlib.asynccontextmanager
async def _served(app: Nexus) -> AsyncIterator[Serving]:
    async with asyncio.timeout(WAIT):
        cm = app.serving()
        info = await cm.__aenter__()
    try:
        yield info
    finally:
        async with asyncio.timeout(WAIT):
            await cm.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def _stub(info: Serving) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(info.address) as ch:
        yield wgrpc.WorkflowServiceStub(ch)  # type: ignore[no-untyped-call]


def _inputs(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _by_name(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def _children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    pid = parent.context.span_id if parent.context else None
    return [s for s in spans if s.parent is not None and s.parent.span_id == pid]


async def _finished(exporter: InMemorySpanExporter, name: str) -> tuple[ReadableSpan, ...]:
    """The finished spans once a span called `name` ended (the call span ends after the
    reply is sent: poll with a deadline)."""
    async with asyncio.timeout(WAIT):
        while True:
            spans = exporter.get_finished_spans()
            if any(s.name == name for s in spans):
                return spans
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_one_trace_per_call_with_execution_nodes_and_statements(
    make_app: Callable[..., Nexus], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(tracer_provider=provider)
    async with _served(app) as info, _stub(info) as wf:
        exporter.clear()
        secret = "ada-secret@example.com"
        reply = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="create_and_read", inputs=_inputs(name="Ada", email=secret)
            ),
            metadata=(("traceparent", TRACEPARENT),),
            timeout=WAIT,
        )
        assert reply.state == wpb.Execution.State.STATE_SUCCEEDED
        spans = await _finished(exporter, EXECUTE)

    (call,) = [s for s in spans if s.name == EXECUTE]
    assert call.kind == SpanKind.SERVER
    assert call.context is not None and f"{call.context.trace_id:032x}" == TRACE_ID
    assert call.parent is not None and f"{call.parent.span_id:016x}" == PARENT_ID
    assert call.attributes is not None
    assert call.attributes["rpc.method"] == "ExecuteWorkflow"
    assert call.attributes["rpc.grpc.status_code"] == 0
    assert call.attributes["nexus.channel"] == "grpc"

    (execution,) = _by_name(spans, "workflow.execute ")
    assert execution.name == "workflow.execute create_and_read"
    assert execution.parent is not None and call.context is not None
    assert execution.parent.span_id == call.context.span_id
    assert execution.attributes is not None
    assert execution.attributes["nexus.execution_id"] == reply.id

    nodes = _children(spans, execution)
    assert sorted(n.name for n in nodes) == ["workflow.node create", "workflow.node read"]
    statements = [s for n in nodes for s in _children(spans, n)]
    assert {s.name for s in statements} >= {"db INSERT", "db SELECT"}
    for s in statements:
        assert s.kind == SpanKind.CLIENT
        assert s.attributes is not None
        text = str(s.attributes["db.query.text"])
        assert "nexus_contact" in text.lower() or "contact" in text.lower()
        assert secret not in text and "Ada" not in text  # placeholders, never values
        assert s.attributes["db.system.name"] in ("sqlite", "postgresql")
    # every span of the call is in the caller's trace
    in_call = [
        s for s in spans if s.context is not None and f"{s.context.trace_id:032x}" == TRACE_ID
    ]
    assert set(map(id, [call, execution, *nodes, *statements])) <= set(map(id, in_call))


async def test_gateway_checks_are_child_spans(
    make_app: Callable[..., Nexus], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(
        tracer_provider=provider,
        enable_auth=True,
        auth=AuthConfig(api_keys={"ops": ApiKeySpec(KEY)}),
    )
    async with _served(app) as info, _stub(info) as wf:
        exporter.clear()
        await wf.ListWorkflows(
            wpb.ListWorkflowsRequest(), metadata=(("x-api-key", KEY),), timeout=WAIT
        )
        spans = await _finished(exporter, "nexus.workflow.v1.WorkflowService/ListWorkflows")
        (call,) = [s for s in spans if s.name.endswith("/ListWorkflows")]
        assert {s.name for s in _children(spans, call)} >= {
            "gateway.authenticate",
            "gateway.authorize",
        }

        # a refusal is traced too, with its code, and is not a server fault
        exporter.clear()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await wf.ListWorkflows(
                wpb.ListWorkflowsRequest(), metadata=(("x-api-key", "wrong-key-0123456789"),)
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        spans = await _finished(exporter, "nexus.workflow.v1.WorkflowService/ListWorkflows")
        (call,) = [s for s in spans if s.name.endswith("/ListWorkflows")]
        assert call.attributes is not None
        assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert not call.status.is_ok or call.status.status_code.name == "UNSET"


async def test_the_rate_limit_check_is_a_child_span(
    make_app: Callable[..., Nexus], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(tracer_provider=provider, rate_limit=1000)
    async with _served(app) as info, _stub(info) as wf:
        exporter.clear()
        await wf.ListWorkflows(wpb.ListWorkflowsRequest(), timeout=WAIT)
        spans = await _finished(exporter, "nexus.workflow.v1.WorkflowService/ListWorkflows")
    (call,) = [s for s in spans if s.name.endswith("/ListWorkflows")]
    assert "gateway.rate_limit" in {s.name for s in _children(spans, call)}


async def test_a_failed_execution_marks_its_node_span(
    make_app: Callable[..., Nexus], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(tracer_provider=provider)
    async with _served(app) as info, _stub(info) as wf:
        exporter.clear()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(name="boom", inputs=_inputs(message="bang")),
                timeout=WAIT,
            )
        assert failed.value.code() == grpc.StatusCode.ABORTED
        spans = await _finished(exporter, EXECUTE)
    (node,) = _by_name(spans, "workflow.node ")
    assert node.status.status_code.name == "ERROR"
    # no traceparent: a new trace, the call span is its root, with the call's code
    (call,) = [s for s in spans if s.name == EXECUTE]
    assert call.parent is None
    assert call.attributes is not None
    assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.ABORTED.value[0]


async def test_streamed_execution_is_traced(
    make_app: Callable[..., Nexus], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(tracer_provider=provider)
    async with _served(app) as info, _stub(info) as wf:
        exporter.clear()
        stream = wf.StreamExecution(
            wpb.ExecuteWorkflowRequest(
                name="create_contact", inputs=_inputs(name="Bo", email="bo@example.com")
            ),
            metadata=(("traceparent", TRACEPARENT),),
            timeout=WAIT,
        )
        events = [e async for e in stream]
        assert events
        name = "nexus.workflow.v1.WorkflowService/StreamExecution"
        spans = await _finished(exporter, name)
    (call,) = [s for s in spans if s.name == name]
    assert call.context is not None and f"{call.context.trace_id:032x}" == TRACE_ID
    (execution,) = _by_name(spans, "workflow.execute ")
    assert execution.context is not None and execution.context.trace_id == call.context.trace_id
    assert _by_name(spans, "workflow.node ")


async def test_a_cancelled_stream_ends_its_span_at_once(
    make_app: Callable[..., Nexus],
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    gates: dict[str, asyncio.Event],
) -> None:
    app = make_app(tracer_provider=provider)
    async with _served(app) as info, _stub(info) as wf:
        exporter.clear()
        stream = wf.StreamExecution(
            wpb.ExecuteWorkflowRequest(name="gated", inputs=_inputs(gate="held")), timeout=WAIT
        )
        async with asyncio.timeout(WAIT):
            await gates["held:started"].wait()
        stream.cancel()
        name = "nexus.workflow.v1.WorkflowService/StreamExecution"
        # the span ends with the stream (not when the generator is collected), and the
        # node was cancelled with it
        spans = await _finished(exporter, name)
        (call,) = [s for s in spans if s.name == name]
        assert call.attributes is not None
        assert call.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
        async with asyncio.timeout(WAIT):
            await gates["held:cancelled"].wait()


async def test_unsampled_calls_make_no_child_spans(
    make_app: Callable[..., Nexus], exporter: InMemorySpanExporter
) -> None:
    tp = TracerProvider(sampler=ALWAYS_OFF)
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    app = make_app(tracer_provider=tp)
    async with _served(app) as info, _stub(info) as wf:
        reply = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="create_contact", inputs=_inputs(name="Cy", email="cy@example.com")
            ),
            timeout=WAIT,
        )
        assert reply.state == wpb.Execution.State.STATE_SUCCEEDED
    assert exporter.get_finished_spans() == ()


async def test_tracing_off_adds_no_wrapper(make_app: Callable[..., Nexus]) -> None:
    app = make_app()
    assert app._tracing() is None
    async with _served(app) as info, _stub(info) as wf:
        reply = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="create_contact", inputs=_inputs(name="Di", email="di@example.com")
            ),
            metadata=(("traceparent", TRACEPARENT),),
            timeout=WAIT,
        )
        assert reply.state == wpb.Execution.State.STATE_SUCCEEDED
    assert app.db is not None and app.db._statement_hook is None


@pytest.mark.parametrize(
    ("enable", "env", "on"),
    [
        (None, {}, False),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318"}, True),
        (None, {"OTEL_TRACES_EXPORTER": "console"}, True),
        (None, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}, False),
        (None, {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, False),
        (True, {}, True),
        (False, {"OTEL_TRACES_EXPORTER": "otlp"}, False),
    ],
)
def test_tracing_is_on_when_asked_or_configured(
    enable: bool | None, env: dict[str, str], on: bool
) -> None:
    assert tracing_wanted(enable, env) is on


async def test_an_unknown_exporter_is_refused_at_start(
    make_app: Callable[..., Nexus], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin-over-pigeons")
    app = make_app()
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER='zipkin-over-pigeons'"):
        async with _served(app):
            pass


# --- the channels: the CLI and the MCP adapter carry the caller's trace ------------------

ROOT = Path(__file__).resolve().parents[2]
NEXUS_MCP = str(Path(sys.executable).parent / "nexus-mcp")


def _child_env(address: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "OTEL_"))}
    env.pop("TRACEPARENT", None)
    pythonpath = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(NEXUS_SERVER=address, PYTHONPATH=os.pathsep.join(pythonpath), **extra)
    return env


def _in_trace(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    (call,) = [
        s
        for s in spans
        if s.name == name and s.context is not None and f"{s.context.trace_id:032x}" == TRACE_ID
    ]
    return call


async def test_the_cli_sends_traceparent_from_the_environment(
    make_app: Callable[..., Nexus], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(tracer_provider=provider)
    async with _served(app) as info:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.cli", "run", "create_contact",
            "--name", "Eve", "--email", "eve@example.com",
            env=_child_env(info.address, TRACEPARENT=TRACEPARENT), cwd=str(ROOT),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(WAIT * 3):
            _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        spans = await _finished(exporter, EXECUTE)
        call = _in_trace(spans, EXECUTE)
        assert call.parent is not None and f"{call.parent.span_id:016x}" == PARENT_ID
        assert call.attributes is not None and call.attributes["nexus.channel"] == "cli"


async def test_the_mcp_adapter_passes_the_callers_traceparent(
    make_app: Callable[..., Nexus], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    app = make_app(tracer_provider=provider)
    async with _served(app) as info:
        proc = await asyncio.create_subprocess_exec(
            NEXUS_MCP, "--transport", "http", "--port", "0",
            env=_child_env(info.address), cwd=str(ROOT),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        try:
            url = ""
            async with asyncio.timeout(WAIT):
                while not url:
                    line = (await proc.stderr.readline()).decode()
                    assert line, f"nexus-mcp exited ({proc.returncode})"
                    match = re.search(r"streamable HTTP on (http://\S+/mcp)", line)
                    url = match.group(1) if match else ""
            http = create_mcp_http_client(headers={"traceparent": TRACEPARENT})
            async with asyncio.timeout(WAIT * 2):
                client = Client(streamable_http_client(url, http_client=http))
                async with client:
                    result = await client.call_tool(
                        "run_create_contact", {"name": "Fay", "email": "fay@example.com"}
                    )
                    assert not result.is_error, result
            stream = "nexus.workflow.v1.WorkflowService/StreamExecution"  # how tools run
            spans = await _finished(exporter, stream)
            call = _in_trace(spans, stream)
            assert call.parent is not None and f"{call.parent.span_id:016x}" == PARENT_ID
            assert call.attributes is not None and call.attributes["nexus.channel"] == "mcp"
        finally:
            if proc.returncode is None:
                proc.terminate()
            async with asyncio.timeout(WAIT):
                await proc.wait()


def test_trace_metadata_prefers_the_context_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from clients._grpc import TRACE_CONTEXT, call_metadata, trace_context_of

    monkeypatch.delenv("TRACEPARENT", raising=False)
    assert not [k for k, _ in call_metadata() if k == "traceparent"]
    monkeypatch.setenv("TRACEPARENT", TRACEPARENT)
    monkeypatch.setenv("TRACESTATE", "vendor=1")
    assert ("traceparent", TRACEPARENT) in call_metadata()
    assert ("tracestate", "vendor=1") in call_metadata()
    other = f"00-{'a' * 32}-{'b' * 16}-01"
    token = TRACE_CONTEXT.set(trace_context_of(other))
    try:
        assert ("traceparent", other) in call_metadata()
        assert ("traceparent", TRACEPARENT) not in call_metadata()
    finally:
        TRACE_CONTEXT.reset(token)
    # a malformed one is dropped, never sent (nor does it fail the call)
    for bad in ("", "00-xyz", f"00-{'0' * 32}-{'b' * 16}-01", TRACEPARENT.upper() + "x"):
        assert trace_context_of(bad) == ()


def test_the_environment_configures_an_otlp_exporter() -> None:
    from nexus_server.gateway._tracing import TracingUnavailable, tracing_from_env

    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    tracing = tracing_from_env({**env, "OTEL_SERVICE_NAME": "contacts"})
    try:
        resource = tracing.provider.resource  # type: ignore[attr-defined]
        assert resource.attributes["service.name"] == "contacts"
    finally:
        tracing.shutdown()
    with pytest.raises(TracingUnavailable, match="OTEL_EXPORTER_OTLP_PROTOCOL='carrier-pigeon'"):
        tracing_from_env({**env, "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_the_span_channels_are_the_gateways() -> None:
    from nexus_server.gateway._chain import CHANNELS
    from nexus_server.gateway._tracing import _CHANNELS

    assert _CHANNELS == CHANNELS
