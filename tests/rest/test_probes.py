"""HTTP probes through the real Envoy: `GET /health` (200 healthy, 503 unhealthy, the
original Nexus's JSON shape) and `GET /workflows` (the registered workflows with their
inputs), both in the OpenAPI document; a plain gRPC call of the probe through Envoy is
not turned into an HTTP error."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_api.nexus.health.v1 import probe_service_pb2 as ppb
from nexus_api.nexus.health.v1 import probe_service_pb2_grpc as pgrpc
from nexus_server._limits import Limits

from .conftest import WAIT, Running, build_app

ROOT = Path(__file__).resolve().parents[2]


def test_health_is_200_with_every_component(client: httpx.Client) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    assert "x-nexus-http-status" not in resp.headers
    body = resp.json()
    assert body["status"] == "healthy"
    assert body["components"]["database"] == {"status": "healthy"}
    assert body["components"]["workflows"] == {"status": "healthy", "registered": 3}


def test_workflows_lists_each_workflow_with_its_inputs(client: httpx.Client) -> None:
    resp = client.get("/workflows")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body == client.get("/v1/workflows").json()
    by_name = {w["name"]: w for w in body["workflows"]}
    assert sorted(by_name) == ["boom", "create_contact", "internal"]
    inputs = {i["name"]: i for i in by_name["create_contact"]["inputs"]}
    assert sorted(inputs) == ["company", "email", "name", "score"]
    assert inputs["name"]["type"] == "str"


def test_probes_are_in_the_openapi_document(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    health = paths["/health"]["get"]
    assert health["operationId"] == "ProbeService_GetHealth"
    ok = health["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["properties"]["status"]["enum"] == ["healthy", "unhealthy"]
    assert health["responses"]["503"]["content"]["application/json"]["schema"] == ok
    assert paths["/workflows"]["get"]["operationId"] == "WorkflowService_ListWorkflows_1"


def test_the_probe_over_grpc_through_envoy_stays_grpc(envoy_channel: grpc.Channel) -> None:
    stub = pgrpc.ProbeServiceStub(envoy_channel)
    body = stub.GetHealth(ppb.GetHealthRequest(), timeout=WAIT)
    assert body.content_type == "application/json"
    assert b'"status":"healthy"' in body.data


@pytest.fixture
def own_pg_database(pg_url: str) -> Iterator[tuple[str, str]]:
    """A PostgreSQL database of its own, so dropping it disturbs nothing else."""
    name = f"nexus_probes_{uuid.uuid4().hex[:10]}"
    _admin(pg_url, f'CREATE DATABASE "{name}"')
    yield f"{pg_url.rsplit('/', 1)[0]}/{name}", name
    _admin(pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _admin(pg_url: str, sql: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(pg_url, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def _grpc_status(address: str) -> Any:
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=WAIT).status


def test_health_is_503_unhealthy_when_the_database_is_gone(
    pg_url: str, own_pg_database: tuple[str, str], _nodes: None, envoy_path: Path
) -> None:
    url, name = own_pg_database
    app = build_app(
        url,
        models=False,
        health_check_interval=0.05,
        limits=Limits(health_check_timeout=0.5, health_check_failures=1),
    )
    run = Running(app)
    info = run.start()
    try:
        with httpx.Client(base_url=f"http://{info.api_address}", timeout=WAIT) as client:
            assert client.get("/health").status_code == 200
            _admin(pg_url, f'DROP DATABASE "{name}" WITH (FORCE)')
            deadline = time.monotonic() + WAIT
            while _grpc_status(info.address) == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "health never said NOT_SERVING"
                time.sleep(0.05)
            resp = client.get("/health")
            assert resp.status_code == 503, resp.text
            assert resp.headers["content-type"] == "application/json"
            assert "x-nexus-http-status" not in resp.headers
            body = resp.json()
            assert body["status"] == "unhealthy"
            assert body["components"]["database"] == {"status": "unhealthy"}
            # the same state, gRPC-side: the call succeeds, the header says 503
            with grpc.insecure_channel(info.api_address) as ch:
                reply, call = pgrpc.ProbeServiceStub(ch).GetHealth.with_call(
                    ppb.GetHealthRequest(), timeout=WAIT
                )
            assert b'"status":"unhealthy"' in reply.data
            assert ("x-nexus-http-status", "503") in call.initial_metadata()
    finally:
        run.stop()


def test_an_unknown_workflow_suggests_the_closest_over_rest(
    client: httpx.Client, status_body: Any
) -> None:
    resp = client.post("/workflows/crate_contact/execute", json={"inputs": {}})
    assert resp.status_code == 404, resp.text
    body = status_body(resp.json(), 5, "WORKFLOW_NOT_FOUND")
    assert body["message"] == "workflow 'crate_contact' not found (did you mean create_contact?)"
    info = body["details"][0]
    assert info["metadata"] == {"workflow": "crate_contact", "suggestion": "create_contact"}


@pytest.mark.parametrize(
    "url",
    [
        "/workflows/create_contact/execute",
        "/v1/workflows/create_contact:execute",
        "/v1/workflows/create_contact:stream",
    ],
)
def test_inputs_without_the_wrapper_get_a_400_showing_the_body(
    client: httpx.Client, status_body: Any, url: str
) -> None:
    # a `name` input collides with the path's {name}: Envoy refuses the body itself
    big = "J" * 100_000
    resp = client.post(url, json={"name": big, "email": "j@example.com"})
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = status_body(resp.json(), 3, "REQUEST_INVALID", gateway=True)
    assert '{"inputs": {"name": "John Doe", "email": "john@example.com"}}' in body["message"]
    assert "conflicting" not in body["message"]
    assert len(resp.content) < 2000  # the caller's value is not repeated
    violations = [d for d in body["details"] if d["@type"].endswith("BadRequest")]
    assert violations[0]["field_violations"][0]["field"] == "inputs"
    # no collision: the transcoder drops the unknown fields, the server says no inputs came
    resp = client.post(url, json={"email": "j@example.com", "company": "Acme"})
    assert resp.status_code == 400, resp.text
    body = status_body(resp.json(), 3, "INPUTS_INVALID")
    assert 'no inputs were sent: they go inside the request\'s "inputs" field' in body["message"]
    fields = [
        v["field"]
        for d in body["details"]
        if d["@type"].endswith("BadRequest")
        for v in d["field_violations"]
    ]
    assert fields == ["inputs.name", "inputs.email", "inputs"]
    # with the wrapper it runs
    if url.endswith(":stream"):
        return
    ok = client.post(url, json={"inputs": {"name": "J", "email": f"{uuid.uuid4().hex}@x.org"}})
    assert ok.status_code == 200, ok.text


def test_other_unreadable_execute_bodies_show_the_expected_body(
    client: httpx.Client, status_body: Any
) -> None:
    for raw in [b'{"inputs": {', b'{"inputs": "x"}', b"[1, 2]"]:
        resp = client.post(
            "/workflows/create_contact/execute",
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert resp.status_code == 400, raw
        body = status_body(resp.json(), 3, "REQUEST_INVALID", gateway=True)
        assert body["message"].startswith("invalid request body: send the workflow's inputs")
    # another route's unreadable body keeps Envoy's own text
    resp = client.post("/v1/workflows", content=b"{", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    body = status_body(resp.json(), 3, "REQUEST_INVALID", gateway=True)
    assert "inputs" not in body["message"]


def _doc_block(marker: str) -> str:
    """The ```python block of docs/coming-from-kailash.md that contains `marker`."""
    text = (ROOT / "docs" / "coming-from-kailash.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (found,) = [b for b in blocks if marker in b]
    return found


def test_the_migration_pages_example_runs_and_answers_the_originals_curl(
    tmp_path: Path, envoy_path: Path
) -> None:
    """The "ours" example of docs/coming-from-kailash.md, run as `python app.py` (on a
    SQLite file and free ports instead of mydb, 8000 and 3001; MCP left to its own
    tests), answers the original's curl body, `/health` and `/workflows`."""
    code = _doc_block("from nexus_server import Nexus")
    for old, new in [
        ('"postgresql://localhost:5432/mydb"', f'"sqlite:///{tmp_path / "app.db"}"'),
        ("Nexus(api_port=8000, mcp_port=3001,", "Nexus(grpc_port=0, api_port=0, mcp_port=None,"),
    ]:
        assert old in code
        code = code.replace(old, new)
    (tmp_path / "app.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "DATABASE_"))}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "app.py"], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        address = None
        while address is None:
            assert time.monotonic() < deadline, lines
            line = proc.stdout.readline()
            assert line, f"app.py ended: {lines}"
            lines.append(line)
            if line.startswith("Envoy on http://"):
                address = line.split()[2]
        with httpx.Client(base_url=address, timeout=WAIT) as client:
            resp = client.post(
                "/workflows/create_contact/execute",
                json={
                    "inputs": {
                        "name": "John Doe",
                        "email": "john@example.com",
                        "company": "Acme Corp",
                    }
                },
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["outputs"]["create"]["company"] == "Acme Corp"
            assert client.get("/health").json()["status"] == "healthy"
            names = [w["name"] for w in client.get("/workflows").json()["workflows"]]
            assert names == ["create_contact"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
