"""The Connect protocol through Envoy, spoken by hand (httpx): what buf curl does not
show (test_buf_curl.py drives the calls themselves). Unary GET, the JSON codec refused
with a clear error, Envoy's own replies as Connect errors, CORS for Connect's headers,
and the channel the server records."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import httpx
import pytest
from google.rpc import error_details_pb2

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

GET_WORKFLOW = "/nexus.workflow.v1.WorkflowService/GetWorkflow"
CONNECT = {"connect-protocol-version": "1"}


def _connect_error(resp: httpx.Response, code: str, reason: str, *, gateway: bool) -> str:
    """`resp` is a Connect error of `code` with one ErrorInfo of `reason`, named as
    Connect names details; returns its message."""
    assert resp.headers["content-type"] == "application/json", resp.headers
    body = resp.json()
    assert body["code"] == code, body
    infos = [d for d in body["details"] if d["type"] == "google.rpc.ErrorInfo"]
    assert len(infos) == 1, body
    info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(infos[0]["value"] + "=="))
    assert info.reason == reason
    assert info.domain == "nexus"
    assert (info.metadata.get("source") == "gateway") is gateway
    assert isinstance(body["message"], str) and body["message"]
    return str(body["message"])


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


@pytest.mark.parametrize(
    ("method", "headers", "params"),
    [
        ("POST", {**CONNECT, "content-type": "application/json"}, {}),
        ("POST", {"content-type": "application/connect+json"}, {}),
        ("GET", {}, {"connect": "v1", "encoding": "json", "message": '{"name":"x"}'}),
    ],
    ids=["unary", "stream", "get"],
)
def test_the_json_codec_is_refused_clearly(
    client: httpx.Client, method: str, headers: dict[str, str], params: dict[str, str]
) -> None:
    body = b'{"name": "create_contact"}' if method == "POST" else None
    resp = client.request(method, GET_WORKFLOW, headers=headers, params=params, content=body)
    assert resp.status_code == 415
    message = _connect_error(resp, "invalid_argument", "REQUEST_INVALID", gateway=True)
    assert "application/proto" in message and "REST" in message


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
