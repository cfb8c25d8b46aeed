"""Metrics and access logs through the real Envoy: `GET /metrics` on the API port only
with `expose_metrics=True` (off the public route by default), REST calls counted with
channel `rest`, and Envoy's JSON access log in the server's format, sharing the
request id with the server's line."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nexus_server import Serving
from nexus_server._envoy import ACCESS_LOG_FORMAT

from .conftest import WAIT

pytestmark = pytest.mark.timeout(120)

EXECUTE = "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow"
SERVER_FIELDS = {
    "time",
    "principal",
    "channel",
    "method",
    "code",
    "duration_ms",
    "request_id",
    "trace_id",
}


def calls(text: str) -> dict[tuple[str, str, str], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "nexus_calls_total":
                found[(s.labels["method"], s.labels["channel"], s.labels["code"])] = s.value
    return found


def _server_lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, Any]]:
    """The server's access lines of the call with `request_id`. A line is written when the
    call's handler has ended, which may be just after the client has the answer: wait
    for one (bounded)."""
    deadline = time.monotonic() + WAIT
    while True:
        lines = [
            json.loads(r.getMessage())
            for r in caplog.records
            if r.name == "nexus.access" and request_id in r.getMessage()
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_metrics_are_off_the_public_route_by_default(client: httpx.Client) -> None:
    resp = client.get("/metrics")
    assert resp.status_code == 404
    assert "nexus_calls" not in resp.text


def test_metrics_through_envoy_when_exposed(run_app: Any) -> None:
    running = run_app(enable_monitoring=True, metrics_port=0, expose_metrics=True)
    serving = running._ready.result(0)
    base = f"http://{serving.api_address}"
    with httpx.Client(base_url=base, timeout=WAIT) as client:
        failed = client.post("/v1/workflows/boom:execute", json={"inputs": {"message": "x"}})
        assert failed.status_code >= 400
        # the server counts a call when its handler has ended, which may be just after
        # the client has the answer: scrape until it is counted (bounded)
        deadline = time.monotonic() + WAIT
        while True:
            resp = client.get("/metrics")
            assert resp.status_code == 200, resp.text
            rest_calls = {k: v for k, v in calls(resp.text).items() if k[0] == EXECUTE}
            if rest_calls or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert resp.headers["content-type"].startswith("text/plain")
        assert client.post("/metrics").status_code != 200  # GET only
    direct = httpx.get(f"http://127.0.0.1:{serving.metrics_port}/metrics", timeout=WAIT)
    ((key, count),) = rest_calls.items()
    assert key[1] == "rest" and key[2] == "ABORTED" and count == 1
    assert calls(direct.text)[key] == 1


def test_envoy_and_server_access_logs_share_format_and_request_id(
    run_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    assert set(ACCESS_LOG_FORMAT) >= SERVER_FIELDS
    caplog.set_level(logging.INFO, logger="nexus.access")
    running = run_app()
    serving = running._ready.result(0)
    envoy = serving.envoy
    assert envoy is not None
    path: Path = envoy.access_log_path
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with httpx.Client(base_url=f"http://{serving.api_address}", timeout=WAIT) as client:
        resp = client.post(
            "/v1/workflows/boom:execute",
            json={"inputs": {"message": "x"}},
            headers={
                "x-request-id": "rest-call-1",
                "traceparent": f"00-{trace}-00f067aa0ba902b7-01",
            },
        )
    assert resp.status_code >= 400
    line: dict[str, Any] | None = None
    deadline = time.monotonic() + WAIT
    while line is None and time.monotonic() < deadline:
        if path.exists():
            for text in path.read_text().splitlines():
                doc = json.loads(text)
                if doc.get("request_id") == "rest-call-1":
                    line = doc
        if line is None:
            time.sleep(0.1)
    assert line is not None, "Envoy wrote no access line for the call"
    assert set(line) >= SERVER_FIELDS
    assert line["channel"] == "rest" and line["method"] == EXECUTE
    assert line["path"] == "/v1/workflows/boom:execute"
    assert line["source"] == "envoy" and line["time"].endswith("Z")
    assert int(line["http_status"]) == resp.status_code
    server = _server_lines(caplog, "rest-call-1")
    assert len(server) == 1
    assert set(server[0]) == SERVER_FIELDS
    assert server[0]["method"] == EXECUTE and server[0]["channel"] == "rest"
    # Envoy knows a REST call's gRPC code only from the HTTP status (the transcoder
    # consumed grpc-status): the server's line has the exact one
    assert server[0]["code"] == "ABORTED" and line["code"]
    assert server[0]["trace_id"] == trace


def test_a_typed_rest_call_is_logged_as_the_typed_method(
    serving: Serving, client: httpx.Client, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A typed route answering records goes through the model's REST twin (docs/api.md,
    "One JSON document"): Envoy's line names the twin it called, the server's line the
    typed method the twin stands for, and the body prints the null field."""
    caplog.set_level(logging.INFO, logger="nexus.access")
    envoy = serving.envoy
    assert envoy is not None
    request_id = f"typed-call-{unique}"
    created = client.post(
        "/v1/contacts",
        json={"name": "Twin", "email": f"twin.{unique}@example.com"},
        headers={"x-request-id": request_id},
    )
    assert created.status_code == 200, created.text
    assert created.headers["content-type"] == "application/json"
    assert created.json()["company"] is None and created.json()["score"] == "0"
    server = _server_lines(caplog, request_id)
    assert [(s["method"], s["channel"], s["code"]) for s in server] == [
        ("/nexus.models.v1.ContactService/CreateContact", "rest", "OK")
    ]
    path: Path = envoy.access_log_path
    line: dict[str, Any] | None = None
    deadline = time.monotonic() + WAIT
    while line is None and time.monotonic() < deadline:
        if path.exists():
            line = next(
                (
                    doc
                    for doc in map(json.loads, path.read_text().splitlines())
                    if doc.get("request_id") == request_id
                ),
                None,
            )
        if line is None:
            time.sleep(0.1)
    assert line is not None, "Envoy wrote no access line for the call"
    assert line["method"] == "/nexus.models.v1.rest.ContactService/CreateContact"
    assert line["path"] == "/v1/contacts"
