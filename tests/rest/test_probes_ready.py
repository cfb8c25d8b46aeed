"""Health components, readiness and liveness through the real Envoy: `GET /health`
reports the database, Envoy and the MCP adapter; `GET /readyz` is 200 while the server
has started and its database answers, 503 otherwise; `GET /livez` is 200 as long as the
process answers; each component is a gRPC health service (`nexus.component.<name>`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
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
APP = ROOT / "examples" / "contacts_app.py"
HC = health_pb2.HealthCheckResponse


def _check(address: str, service: str) -> Any:
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT).status


def _list(address: str) -> dict[str, Any]:
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        reply = stub.List(health_pb2.HealthListRequest(), timeout=WAIT)
        return {name: r.status for name, r in reply.statuses.items()}


def test_ready_and_alive_while_serving(client: httpx.Client) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.headers["content-type"] == "application/json"
    assert ready.json() == {"status": "ready", "checks": {"started": True, "database": True}}
    alive = client.get("/livez")
    assert alive.status_code == 200, alive.text
    assert alive.json() == {"status": "alive"}
    health = client.get("/health").json()
    assert health["status"] == "healthy"
    assert health["components"]["envoy"] == {"status": "healthy", "restarts": 0}
    assert health["components"]["database"] == {"status": "healthy"}


def test_the_probes_are_open_and_documented(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    ready = paths["/readyz"]["get"]
    assert ready["operationId"] == "ProbeService_GetReadiness"
    schema = ready["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["properties"]["status"]["enum"] == ["ready", "not_ready"]
    assert ready["responses"]["503"]["content"]["application/json"]["schema"] == schema
    assert paths["/livez"]["get"]["operationId"] == "ProbeService_GetLiveness"


def test_each_component_is_a_grpc_health_service(serving: Any) -> None:
    assert _check(serving.address, "nexus.component.database") == HC.SERVING
    assert _check(serving.address, "nexus.component.envoy") == HC.SERVING
    statuses = _list(serving.address)
    assert statuses["nexus.component.database"] == HC.SERVING
    assert statuses["nexus.component.envoy"] == HC.SERVING
    assert statuses["nexus.workflow.v1.WorkflowService"] == HC.SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        _check(serving.address, "nexus.component.no_such_thing")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture
def own_pg_database(pg_url: str) -> Iterator[tuple[str, str]]:
    """A PostgreSQL database of its own, so dropping it disturbs nothing else."""
    name = f"nexus_ready_{uuid.uuid4().hex[:10]}"
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


def test_not_ready_but_alive_while_the_database_is_gone(
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
            assert client.get("/readyz").status_code == 200
            _admin(pg_url, f'DROP DATABASE "{name}" WITH (FORCE)')
            deadline = time.monotonic() + WAIT
            while client.get("/readyz").status_code == 200:
                assert time.monotonic() < deadline, "/readyz never said 503"
                time.sleep(0.05)
            ready = client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert "x-nexus-http-status" not in ready.headers
            assert ready.json() == {
                "status": "not_ready",
                "checks": {"started": True, "database": False},
            }
            alive = client.get("/livez")
            assert alive.status_code == 200 and alive.json() == {"status": "alive"}
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json()["components"]["database"] == {"status": "unhealthy"}
            assert _check(info.address, "nexus.component.database") == HC.NOT_SERVING
            # Envoy still runs: its component stays healthy
            assert health.json()["components"]["envoy"]["status"] == "healthy"
    finally:
        run.stop()


def test_not_ready_once_stopping(_nodes: None, envoy_path: Path, tmp_path: Path) -> None:
    app = build_app(f"sqlite:///{tmp_path / 'ready.db'}", models=False)
    run = Running(app)
    info = run.start()
    try:
        assert app._started
        with grpc.insecure_channel(info.address) as ch:
            stub = pgrpc.ProbeServiceStub(ch)  # type: ignore[no-untyped-call]
            _, call = stub.GetReadiness.with_call(ppb.GetReadinessRequest(), timeout=WAIT)
            assert ("x-nexus-http-status", "503") not in call.initial_metadata()
    finally:
        run.stop()
    assert not app._started
    assert "envoy" not in app.health.names()


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_DATABASE_URL"] = f"sqlite:///{tmp_path / 'app.db'}"
    env["PYTHONPATH"] = str(ROOT)
    return env


def _adapters(parent: int) -> list[int]:
    """The live MCP adapter processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"clients.mcp" in argv:
            found.append(int(entry.name))
    return found


@pytest.mark.timeout(120)  # three processes start on a shared machine
def test_nexus_serve_reports_envoy_and_the_mcp_adapter(tmp_path: Path, envoy_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve", str(APP), "--grpc-port", "0",
         "--api-port", "0", "--mcp", "--mcp-port", "0"],
        cwd=tmp_path, env=_env(tmp_path), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner: list[str] = []
        deadline = time.monotonic() + 60
        while not banner or "Ctrl-C stops it" not in banner[-1]:
            assert time.monotonic() < deadline, banner
            line = proc.stdout.readline()
            assert line, f"serve ended: {banner}"
            banner.append(line.rstrip())
        grpc_address = re.search(r"Nexus gRPC server on (\S+) ", banner[0])
        api = next(b for b in banner if b.startswith("Envoy on http://")).split()[2]
        assert grpc_address, banner
        with httpx.Client(base_url=api, timeout=WAIT) as client:
            health = client.get("/health").json()
            assert health["status"] == "healthy"
            assert health["components"]["mcp"] == {"status": "healthy", "restarts": 0}
            assert health["components"]["envoy"] == {"status": "healthy", "restarts": 0}
            assert _check(grpc_address.group(1), "nexus.component.mcp") == HC.SERVING

            # the adapter dies: the server restarts it, and says so
            [first] = _adapters(proc.pid)
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + WAIT * 2
            while True:
                mcp = client.get("/health").json()["components"]["mcp"]
                if mcp == {"status": "healthy", "restarts": 1}:
                    break
                # meanwhile the server itself stays healthy
                assert client.get("/health").json()["status"] == "healthy"
                assert time.monotonic() < deadline, mcp
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(WAIT * 2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)


def test_the_query_cache_is_a_component(tmp_path: Path) -> None:
    from dataflow import DataFlow
    from nexus_server import Nexus

    async def run() -> dict[str, Any]:
        db = DataFlow(f"sqlite:///{tmp_path / 'cached.db'}", enable_caching=True)
        app = Nexus(grpc_port=0, api_port=None, mcp_port=None)
        app.integrate_dataflow(db)
        try:
            async with (
                asyncio.timeout(WAIT),
                app.serving() as info,
                grpc.aio.insecure_channel(info.address) as ch,
            ):
                stub = pgrpc.ProbeServiceStub(ch)  # type: ignore[no-untyped-call]
                body = await stub.GetHealth(ppb.GetHealthRequest(), timeout=WAIT)
                doc: dict[str, Any] = json.loads(body.data)
                return doc
        finally:
            await db.close()

    doc = asyncio.run(run())
    assert doc["status"] == "healthy"
    cache = doc["components"]["cache"]
    assert cache["status"] == "healthy" and cache["backend"] == "memory"
    assert {"hits", "misses"} <= set(cache)
