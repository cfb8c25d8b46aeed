"""The Connect protocol through Envoy, spoken by hand (httpx): what buf curl does not
show (test_buf_curl.py drives the calls themselves). Unary GET, the JSON codec (unary,
GET, stream, its errors), Envoy's own replies as Connect errors, CORS for Connect's
headers, and the channel the server records."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg
from nexus_server import Serving
from nexus_server._envoy import (
    EnvoyOptions,
    EnvoySupervisor,
    merged_descriptor_set,
    transcoded_services,
)

from .conftest import WAIT

GET_WORKFLOW = "/nexus.workflow.v1.WorkflowService/GetWorkflow"
STREAM_EXECUTION = "/nexus.workflow.v1.WorkflowService/StreamExecution"
CONNECT = {"connect-protocol-version": "1"}


def _connect_error(resp: httpx.Response, code: str, reason: str, *, gateway: bool) -> str:
    """`resp` is a Connect error of `code` with one ErrorInfo of `reason`, named as
    Connect names details; returns its message."""
    assert resp.headers["content-type"] == "application/json", resp.headers
    body = resp.json()
    assert body["code"] == code, body
    info = _detail_info(body["details"])
    assert info.reason == reason
    assert info.domain == "nexus"
    assert (info.metadata.get("source") == "gateway") is gateway
    assert isinstance(body["message"], str) and body["message"]
    return str(body["message"])


def _detail_info(details: list[dict[str, Any]]) -> error_details_pb2.ErrorInfo:
    infos = [d for d in details if d["type"] == "google.rpc.ErrorInfo"]
    assert len(infos) == 1, details
    return error_details_pb2.ErrorInfo.FromString(base64.b64decode(infos[0]["value"] + "=="))


def _bad_request(details: list[dict[str, Any]]) -> error_details_pb2.BadRequest:
    (found,) = [d for d in details if d["type"] == "google.rpc.BadRequest"]
    return error_details_pb2.BadRequest.FromString(base64.b64decode(found["value"] + "=="))


def _envelopes(data: bytes) -> list[tuple[int, bytes]]:
    """A Connect stream's envelopes: (flags, payload)."""
    out: list[tuple[int, bytes]] = []
    at = 0
    while at < len(data):
        flags, size = struct.unpack(">BI", data[at : at + 5])
        out.append((flags, data[at + 5 : at + 5 + size]))
        at += 5 + size
    assert at == len(data), "a truncated envelope"
    return out


def _stream_request(message: w.StreamExecutionRequest) -> bytes:
    payload = message.SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


def test_a_unary_call_and_a_get(client: httpx.Client) -> None:
    request = w.GetWorkflowRequest(name="create_contact").SerializeToString()
    post = client.post(
        GET_WORKFLOW, content=request, headers={**CONNECT, "content-type": "application/proto"}
    )
    assert post.status_code == 200, post.text
    assert post.headers["content-type"] == "application/proto"
    assert w.Workflow.FromString(post.content).name == "create_contact"
    # Connect's GET form (cacheable): the message in the query, base64url
    message = base64.urlsafe_b64encode(request).decode().rstrip("=")
    get = client.get(
        GET_WORKFLOW,
        params={"connect": "v1", "encoding": "proto", "base64": "1", "message": message},
    )
    assert get.status_code == 200, get.text
    assert w.Workflow.FromString(get.content) == w.Workflow.FromString(post.content)


def test_a_unary_error_names_its_details(client: httpx.Client) -> None:
    resp = client.post(
        GET_WORKFLOW,
        content=w.GetWorkflowRequest(name="nope").SerializeToString(),
        headers={**CONNECT, "content-type": "application/proto"},
    )
    assert resp.status_code == 404
    assert "nope" in _connect_error(resp, "not_found", "WORKFLOW_NOT_FOUND", gateway=False)
    assert {d["type"] for d in resp.json()["details"]} == {
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
    }


def test_a_stream_and_its_error(client: httpx.Client, unique: str) -> None:
    """A server stream over HTTP/1.1: messages, then the end message; an error before
    any message is the end message alone, its details named as Connect names them."""
    headers = {"content-type": "application/connect+proto"}
    ok = client.post(
        STREAM_EXECUTION,
        headers=headers,
        content=_stream_request(
            w.StreamExecutionRequest(
                name="create_contact", inputs={"name": "Di", "email": f"{unique}@example.com"}
            )
        ),
    )
    assert ok.status_code == 200
    assert ok.headers["content-type"] == "application/connect+proto"
    *messages, (end_flags, end) = _envelopes(ok.content)
    events = [w.ExecutionEvent.FromString(payload) for flags, payload in messages]
    assert {flags for flags, _ in messages} == {0}
    assert events[0].HasField("execution_started")
    assert events[-1].HasField("execution_completed")
    assert end_flags == 2 and "error" not in json.loads(end)
    failed = client.post(
        STREAM_EXECUTION,
        headers=headers,
        content=_stream_request(w.StreamExecutionRequest(name="nope")),
    )
    assert failed.status_code == 200  # a stream's status is in its end message
    ((flags, payload),) = _envelopes(failed.content)
    assert flags == 2
    error = json.loads(payload)["error"]
    assert error["code"] == "not_found"
    assert _detail_info(error["details"]).reason == "WORKFLOW_NOT_FOUND"
    assert {d["type"] for d in error["details"]} == {
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
    }


class _FailsMidStream(wg.WorkflowServiceServicer):
    async def StreamExecution(
        self, request: w.StreamExecutionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[w.ExecutionEvent]:
        yield w.ExecutionEvent(execution_id="e1", sequence=1)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason="SERVER_UNAVAILABLE", domain="nexus"))
        await context.abort_with_status(
            rpc_status.to_status(
                status_pb2.Status(code=14, message="the server is stopping", details=[detail])
            )
        )


def test_an_error_after_messages_is_the_end_message(serving: Serving) -> None:
    """The status of a stream that fails after a message (from a stand-in server:
    ours end a failed execution with an event) reaches a Connect client in the end
    message, its details named too."""

    async def run() -> httpx.Response:
        server = grpc.aio.server()
        wg.add_WorkflowServiceServicer_to_server(_FailsMidStream(), server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        sup = EnvoySupervisor(
            merged_descriptor_set(serving.typed),
            EnvoyOptions(grpc_port=port, api_port=0, services=transcoded_services(serving.typed)),
            ready_timeout=WAIT,
        )
        try:
            await sup.start()
            async with httpx.AsyncClient(timeout=WAIT) as client:
                return await client.post(
                    f"http://127.0.0.1:{sup.api_port}{STREAM_EXECUTION}",
                    headers={"content-type": "application/connect+proto"},
                    content=_stream_request(w.StreamExecutionRequest(name="any")),
                )
        finally:
            await sup.stop()
            await server.stop(0)

    resp = asyncio.run(run())
    assert resp.status_code == 200
    (first_flags, first), (end_flags, end) = _envelopes(resp.content)
    assert first_flags == 0 and w.ExecutionEvent.FromString(first).execution_id == "e1"
    assert end_flags == 2
    error = json.loads(end)["error"]
    assert error["code"] == "unavailable"
    assert error["message"] == "the server is stopping"
    assert _detail_info(error["details"]).reason == "SERVER_UNAVAILABLE"


def test_the_json_codec_unary_and_get(client: httpx.Client) -> None:
    """Connect's JSON codec: the server reads the request as proto3 JSON and answers in
    JSON, labelled as such (docs/rest.md, "Connect")."""
    post = client.post(
        GET_WORKFLOW,
        content=b'{"name": "create_contact"}',
        headers={**CONNECT, "content-type": "application/json"},
    )
    assert post.status_code == 200, post.text
    assert post.headers["content-type"] == "application/json"
    assert post.json()["name"] == "create_contact"
    assert post.json()["inputs"][0]["name"] == "name"
    get = client.get(
        GET_WORKFLOW,
        params={"connect": "v1", "encoding": "json", "message": '{"name":"create_contact"}'},
    )
    assert get.status_code == 200, get.text
    assert get.headers["content-type"] == "application/json"
    assert get.json() == post.json()
    # a typed service too: lowerCamelCase names accepted, a projection kept
    listed = client.post(
        "/nexus.models.v1.ContactService/ListContacts",
        content=b'{"pageSize": 1, "fields": ["name"]}',
        headers={**CONNECT, "content-type": "application/json"},
    )
    assert listed.status_code == 200, listed.text
    assert [set(c) for c in listed.json().get("contacts", [])] in ([], [{"name"}])


def test_the_json_codec_errors(client: httpx.Client) -> None:
    missing = client.post(
        GET_WORKFLOW,
        content=b'{"name": "nope"}',
        headers={**CONNECT, "content-type": "application/json"},
    )
    assert missing.status_code == 404
    _connect_error(missing, "not_found", "WORKFLOW_NOT_FOUND", gateway=False)
    for body, why in [
        (b'{"nme": "x"}', 'no field named "nme"'),
        (b'{"name": 3}', "name"),
        (b'{"name": "x"' + b" " * 10_000, "JSON"),
    ]:
        bad = client.post(
            GET_WORKFLOW, content=body, headers={**CONNECT, "content-type": "application/json"}
        )
        assert bad.status_code == 400, bad.text
        message = _connect_error(bad, "invalid_argument", "REQUEST_INVALID", gateway=False)
        assert "malformed JSON" in message and "GetWorkflowRequest" in message
        (violation,) = _bad_request(bad.json()["details"]).field_violations
        assert violation.field == "request" and why in violation.description
        assert len(violation.description) < 300  # never the whole input


def test_the_json_codec_stream(client: httpx.Client, unique: str) -> None:
    body = json.dumps(
        {"name": "create_contact", "inputs": {"name": "Jo", "email": f"{unique}@example.com"}}
    ).encode()
    ok = client.post(
        STREAM_EXECUTION,
        headers={"content-type": "application/connect+json"},
        content=struct.pack(">BI", 0, len(body)) + body,
    )
    assert ok.status_code == 200
    assert ok.headers["content-type"] == "application/connect+json"
    *messages, (end_flags, end) = _envelopes(ok.content)
    events = [json.loads(payload) for _, payload in messages]
    assert "executionStarted" in events[0] and "executionCompleted" in events[-1]
    assert end_flags == 2 and "error" not in json.loads(end)


def test_envoys_own_reply_is_a_connect_error(client: httpx.Client) -> None:
    resp = client.post(
        GET_WORKFLOW,
        content=b"\0" * (5 * 1024 * 1024),  # over the 4 MiB limit of the buffer filter
        headers={**CONNECT, "content-type": "application/proto"},
    )
    assert resp.status_code == 413
    _connect_error(resp, "resource_exhausted", "REQUEST_TOO_LARGE", gateway=True)


def test_cors_allows_connects_headers(client: httpx.Client, cors_origin: str) -> None:
    wanted = ["connect-protocol-version", "connect-timeout-ms", "content-type"]
    preflight = client.options(
        GET_WORKFLOW,
        headers={
            "origin": cors_origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": ", ".join(wanted),
        },
    )
    assert preflight.status_code == 200
    allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert set(wanted) <= allowed
    resp = client.post(
        GET_WORKFLOW,
        content=w.GetWorkflowRequest(name="create_contact").SerializeToString(),
        headers={**CONNECT, "content-type": "application/proto", "origin": cors_origin},
    )
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] == cors_origin
    exposed = resp.headers["access-control-expose-headers"]
    assert "grpc-status-details-bin" in exposed


def test_the_server_records_the_connect_channel(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nexus.access")
    resp = client.post(
        GET_WORKFLOW,
        content=w.GetWorkflowRequest(name="create_contact").SerializeToString(),
        headers={**CONNECT, "content-type": "application/proto"},
    )
    assert resp.status_code == 200
    entries: list[dict[str, Any]] = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "nexus.access"
    ]
    assert any(e["method"] == GET_WORKFLOW and e["channel"] == "connect" for e in entries), entries
