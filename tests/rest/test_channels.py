"""One Envoy port for every kind of client: Server-Sent Events for server streaming,
plain gRPC and gRPC-Web passed through (Envoy's own replies to them stay gRPC), CORS for
browsers."""

from __future__ import annotations

import json
import struct
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg
from nexus_server._envoy import MAX_REQUEST_BYTES


def _sse(
    client: httpx.Client, method: str, url: str, **kw: Any
) -> tuple[httpx.Response, list[Any]]:
    events: list[Any] = []
    with client.stream(method, url, **kw) as resp:
        if resp.headers["content-type"] != "text/event-stream":
            resp.read()
            return resp, []
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    return resp, events


def test_stream_execution_is_server_sent_events(client: httpx.Client, unique: str) -> None:
    resp, events = _sse(
        client,
        "POST",
        "/v1/workflows/create_contact:stream",
        json={"inputs": {"name": "S", "email": f"s.{unique}@x.org"}},
    )
    assert resp.status_code == 200
    kinds = [next(k for k in e if k not in ("execution_id", "sequence", "time")) for e in events]
    assert kinds == ["execution_started", "node_started", "node_completed", "execution_completed"]
    assert [e["sequence"] for e in events] == ["1", "2", "3", "4"]
    final = events[-1]["execution_completed"]["execution"]
    assert final["state"] == "STATE_SUCCEEDED"
    # WatchExecution replays the finished execution's events
    resp, watched = _sse(client, "GET", f"/v1/executions/{final['id']}:watch")
    assert resp.status_code == 200
    assert watched[-1]["execution_completed"]["execution"]["id"] == final["id"]


def test_a_failed_execution_streams_its_terminal_event(client: httpx.Client) -> None:
    resp, events = _sse(
        client, "POST", "/v1/workflows/boom:stream", json={"inputs": {"message": "kaput"}}
    )
    assert resp.status_code == 200
    assert "node_failed" in events[-2]
    assert events[-1]["execution_failed"]["execution"]["state"] == "STATE_FAILED"


def test_stream_errors_before_the_first_event_are_json_statuses(
    client: httpx.Client, status_body: Any
) -> None:
    resp, _ = _sse(client, "POST", "/v1/workflows/nope:stream", json={"inputs": {}})
    assert resp.status_code == 404
    status_body(resp.json(), 5, "WORKFLOW_NOT_FOUND")
    resp, _ = _sse(client, "GET", "/v1/executions/nope:watch")
    assert resp.status_code == 404
    status_body(resp.json(), 5, "EXECUTION_NOT_FOUND")


def test_plain_grpc_passes_through_envoy(envoy_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(envoy_channel)
    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = wg.WorkflowServiceStub(envoy_channel)  # type: ignore[no-untyped-call]
    names = {wf.name for wf in stub.ListWorkflows(w.ListWorkflowsRequest(), timeout=10).workflows}
    assert "create_contact" in names
    try:
        stub.GetWorkflow(w.GetWorkflowRequest(name="nope"), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        trailers = dict(exc.trailing_metadata())
        assert trailers["grpc-status-details-bin"]
    else:
        raise AssertionError("GetWorkflow('nope') succeeded")
    events = list(
        stub.StreamExecution(
            w.StreamExecutionRequest(name="boom", inputs={"message": "x"}), timeout=10
        )
    )
    assert events[-1].WhichOneof("event") == "execution_failed"


def test_grpc_web_passes_through_envoy(client: httpx.Client) -> None:
    payload = w.ListWorkflowsRequest().SerializeToString()
    resp = client.post(
        "/nexus.workflow.v1.WorkflowService/ListWorkflows",
        content=b"\x00" + struct.pack(">I", len(payload)) + payload,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/grpc-web+proto"
    data = resp.content
    assert data[0] == 0
    size = struct.unpack(">I", data[1:5])[0]
    reply = w.ListWorkflowsResponse.FromString(data[5 : 5 + size])
    assert "create_contact" in {wf.name for wf in reply.workflows}
    trailer = data[5 + size :]
    assert trailer[0] == 0x80  # the trailers frame
    assert b"grpc-status:0" in trailer


def test_envoy_answers_grpc_clients_in_grpc(
    client: httpx.Client, envoy_channel: grpc.Channel, grpc_channel: grpc.Channel
) -> None:
    """A request Envoy refuses itself (here: above its size limit) gets a gRPC status
    with Envoy's text, not the JSON body REST clients get, and the code the server gives
    the same request."""
    big = w.ExecuteWorkflowRequest(name="boom", inputs={"message": "a" * MAX_REQUEST_BYTES})
    codes: dict[str, grpc.StatusCode] = {}
    for name, channel in [("envoy", envoy_channel), ("server", grpc_channel)]:
        stub = wg.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        try:
            stub.ExecuteWorkflow(big, timeout=10)
        except grpc.RpcError as exc:
            codes[name] = exc.code()
            assert exc.details() and not exc.details().startswith("{"), exc.details()
        else:
            raise AssertionError(f"an oversized request succeeded through {name}")
    assert codes["envoy"] == codes["server"]
    payload = big.SerializeToString()
    resp = client.post(
        "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow",
        content=b"\x00" + struct.pack(">I", len(payload)) + payload,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    )
    assert resp.headers["grpc-status"] == str(codes["server"].value[0])
    assert resp.headers["content-type"] != "application/json"


def _preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options(
        "/v1/workflows",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )


def test_cors_preflight_and_response_headers(
    client: httpx.Client, cors_origin: str, status_body: Any
) -> None:
    resp = _preflight(client, cors_origin)
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == cors_origin
    assert "POST" in resp.headers["access-control-allow-methods"]
    assert "content-type" in resp.headers["access-control-allow-headers"]
    assert "access-control-allow-credentials" not in resp.headers
    resp = client.get("/v1/workflows", headers={"origin": cors_origin})
    assert resp.headers["access-control-allow-origin"] == cors_origin
    assert "grpc-status" in resp.headers["access-control-expose-headers"]
    # errors too, the server's and Envoy's own, so browser code can read them
    for url in ["/v1/workflows/nope", "/nothing/here"]:
        resp = client.get(url, headers={"origin": cors_origin})
        assert resp.status_code == 404
        assert resp.headers["access-control-allow-origin"] == cors_origin
    # another origin: the call still runs, without CORS headers; no preflight answer
    other = client.get("/v1/workflows", headers={"origin": "https://evil.example"})
    assert other.status_code == 200
    assert "access-control-allow-origin" not in other.headers
    resp = _preflight(client, "https://evil.example")
    assert "access-control-allow-origin" not in resp.headers
    assert resp.status_code == 404
    status_body(resp.json(), 5, "ROUTE_NOT_FOUND", gateway=True)


def test_cors_for_any_origin_and_off_by_default(run_app: Any) -> None:
    origin = "https://anywhere.example"
    for cors_origins, allowed in [(["*"], origin), ([], None)]:
        running = run_app(cors_origins=cors_origins)
        info = running._ready.result(0)
        with httpx.Client(base_url=f"http://{info.api_address}", timeout=10) as client:
            preflight = _preflight(client, origin)
            resp = client.get("/v1/workflows", headers={"origin": origin})
        assert resp.status_code == 200
        assert resp.headers.get("access-control-allow-origin") == allowed  # "*": echoed
        assert preflight.headers.get("access-control-allow-origin") == allowed
        assert preflight.status_code == (200 if allowed else 404)
        running.stop()
