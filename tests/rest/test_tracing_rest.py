"""A REST call through the real Envoy joins the caller's trace: Envoy passes the W3C
`traceparent` header on as gRPC metadata, and the server's call span is its child."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from .conftest import WAIT

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def _span(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    deadline = time.monotonic() + WAIT
    while True:
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, [s.name for s in exporter.get_finished_spans()]
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_rest_calls_join_the_callers_trace(run_app: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    info = run_app(tracer_provider=provider)._ready.result(0)
    with httpx.Client(base_url=f"http://{info.api_address}", timeout=WAIT) as client:
        resp = client.get("/v1/workflows", headers={"traceparent": TRACEPARENT})
        assert resp.status_code == 200, resp.text
        call = _span(exporter, "nexus.workflow.v1.WorkflowService/ListWorkflows")
        assert call.context is not None and f"{call.context.trace_id:032x}" == TRACE_ID
        assert call.parent is not None and f"{call.parent.span_id:016x}" == PARENT_ID
        assert call.attributes is not None and call.attributes["nexus.channel"] == "rest"

        # a failing execution over REST: its execution and node spans are in the trace
        exporter.clear()
        failed = client.post(
            "/workflows/boom/execute",
            json={"inputs": {"message": "bang"}},
            headers={"traceparent": TRACEPARENT},
        )
        assert failed.status_code >= 400
        call = _span(exporter, "nexus.workflow.v1.WorkflowService/ExecuteWorkflow")
        assert call.context is not None and f"{call.context.trace_id:032x}" == TRACE_ID
        spans = exporter.get_finished_spans()
        names = {s.name for s in spans if s.context and s.context.trace_id == call.context.trace_id}
        assert "workflow.execute boom" in names and "workflow.node explode" in names

        # without a traceparent, a new trace
        exporter.clear()
        client.get("/v1/workflows")
        call = _span(exporter, "nexus.workflow.v1.WorkflowService/ListWorkflows")
        assert call.parent is None
