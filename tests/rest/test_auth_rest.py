"""Authentication through the real Envoy: REST and gRPC-Web carry the same credentials
as gRPC, refusals are 401 JSON statuses, Envoy names the channel for the audit trail
(whatever the client claims), CORS lets browsers send credentials, and the OpenAPI
document declares its security schemes."""

from __future__ import annotations

import json
import logging
import struct
from typing import Any

import httpx
import pytest

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

KEY = "rest-root-key-0123456789"
ORIGIN = "https://app.example.com"


def _grpc_web(client: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    payload = w.ListWorkflowsRequest().SerializeToString()
    return client.post(
        "/nexus.workflow.v1.WorkflowService/ListWorkflows",
        content=b"\x00" + struct.pack(">I", len(payload)) + payload,
        headers={"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **headers},
    )


def test_rest_and_grpc_web_through_envoy_with_auth(
    run_app: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NEXUS_API_KEY_ROOT", KEY)
    running = run_app(enable_auth=True, audit_reads=True, cors_origins=[ORIGIN])
    base = f"http://{running._ready.result(0).api_address}"
    with (
        httpx.Client(base_url=base, timeout=10) as client,
        caplog.at_level(logging.INFO, logger="nexus.audit"),
    ):
        refused = client.get("/v1/workflows")
        assert refused.status_code == 401
        body = refused.json()
        assert body["details"][0]["reason"] == "CREDENTIALS_MISSING"
        bad = client.get("/v1/workflows", headers={"authorization": "Bearer nope"})
        assert bad.status_code == 401
        assert bad.json()["details"][0]["reason"] == "CREDENTIALS_INVALID"
        assert "nope" not in bad.text

        # a REST client claiming to be the CLI is still audited as REST
        ok = client.get("/v1/workflows", headers={"x-api-key": KEY, "x-nexus-channel": "cli"})
        assert ok.status_code == 200
        assert [wf["name"] for wf in ok.json()["workflows"]] == ["boom"]
        bearer = client.get("/v1/workflows", headers={"authorization": f"Bearer {KEY}"})
        assert bearer.status_code == 200

        web = _grpc_web(client, {"x-api-key": KEY})
        assert web.status_code == 200 and b"grpc-status:0" in web.content
        web_refused = _grpc_web(client, {})
        assert web_refused.headers.get("grpc-status") == "16"  # UNAUTHENTICATED

        assert client.get("/health").status_code == 200  # open
        assert client.get("/openapi.json").status_code == 401
        doc = client.get("/openapi.json", headers={"x-api-key": KEY}).json()
        assert set(doc["components"]["securitySchemes"]) == {"apiKey", "bearer"}
        assert doc["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"
        assert doc["security"] == [{"apiKey": []}, {"bearer": []}]
        assert doc["paths"]["/health"]["get"]["security"] == []

        preflight = client.options(
            "/v1/workflows",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "GET",
                "access-control-request-headers": "x-api-key, authorization",
            },
        )
        allowed = preflight.headers["access-control-allow-headers"]
        assert "x-api-key" in allowed and "authorization" in allowed

    entries = [json.loads(r.getMessage()) for r in caplog.records if r.name == "nexus.audit"]
    listing = [e for e in entries if e["method"].endswith("/ListWorkflows")]
    channels = [(e["channel"], e["code"]) for e in listing]
    assert ("rest", "UNAUTHENTICATED") in channels
    assert ("rest", "OK") in channels
    assert ("grpc-web", "OK") in channels
    assert ("grpc-web", "UNAUTHENTICATED") in channels
    assert all(channel != "cli" for channel, _ in channels)
    assert all(KEY not in json.dumps(e) for e in entries)
