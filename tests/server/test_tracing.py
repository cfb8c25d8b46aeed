"""OpenTelemetry traces: one trace per call, with spans for the gateway checks, the
workflow execution, each node and each SQL statement (text without values), in the trace
the caller's W3C `traceparent` names. Spans go to the SDK's in-memory exporter."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
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
