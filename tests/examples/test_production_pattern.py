"""The original's "Production Pattern" (reference document 000, lines 239-273) as the
package examples/production/ (`app.py` is the original's code with import lines added
above it; `models.py` and `workflows.py` are the modules it imports), served as a user
serves it, `nexus serve examples/production/app.py`, on a PostgreSQL database of its
own. Each option it sets has an effect that the test sees from outside the process:

- `enable_auth=True`: REST without a credential is 401, with the admin key 200;
- `enable_monitoring=True`: `GET /metrics` on the metrics port counts the calls;
- `enable_metrics=True`: statement latencies and the pool (`connection_pool_size=20`
  is its `max`);
- `enable_caching=True`: the second read of a record is a cache hit, and a read after
  an update sees the update;
- `skip_migration=True` (with `auto_migrate=False`): a table that lacks a column is
  left as it is (no migration), and the server says so at start;
- `enable_model_persistence=False`: no model registry table is made;
- `auto_discovery=False`: a workflow file in the working folder is not imported.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "examples" / "production"
REFERENCE = sorted((ROOT.parent / "shared" / "reference").glob("000_*.txt"))
ADMIN_URL = os.environ.get("NEXUS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
KEY = "nxk_production_pattern_test_" + secrets.token_hex(8)
WAIT = 60.0

#: A deployment's migration step, run before the app (which sets `auto_migrate=False,
#: skip_migration=True`): the current Contact, and a Company one column short (`industry`
#: came later), as an older release left it.
MIGRATE = """
import asyncio
import sys

from dataflow import DataFlow
from production.models import Contact

db = DataFlow(sys.argv[1])
db.model(Contact)


@db.model
class Company:
    id: str
    name: str


async def main() -> None:
    await db.initialize()
    await db.close()


asyncio.run(main())
"""

#: A workflow file that auto-discovery would import (and register as `stray`).
STRAY = """
from workflow import WorkflowBuilder

builder = WorkflowBuilder()
builder.add_node("PythonCodeNode", "x", {"code": "result = {'ok': True}"})
workflow = builder.build()
"""


def _code(text: str) -> list[str]:
    lines = text.splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return lines


def test_the_app_is_the_original_with_only_import_lines_added() -> None:
    if not REFERENCE:
        pytest.skip("the original's documents are not beside the repository")
    lines = REFERENCE[0].read_text().splitlines()
    body = lines[lines.index("## Production Pattern") :]
    first = body.index("```python") + 1
    original = body[first : body.index("```", first)]
    ported = _code((PACKAGE / "app.py").read_text())
    added, kept = ported[: -len(original)], ported[-len(original) :]
    assert kept == original
    assert [line for line in added if line.strip()] == [
        "from nexus_server import Nexus",
        "from dataflow import DataFlow",
        "from .workflows import register_workflows",
    ]


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def database(pg_url: str) -> Iterator[str]:
    """A database of this test's own (pg_url: PostgreSQL is there, or the test skips)."""
    name = f"nexus_prod_{secrets.token_hex(6)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    url = f"{ADMIN_URL.rpartition('/')[0]}/{name}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'examples'}{os.pathsep}{ROOT}"}
    try:
        subprocess.run(
            [sys.executable, "-c", MIGRATE, url], env=env, check=True, timeout=WAIT
        )  # fmt: skip
        yield url
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _run(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


Started = tuple[subprocess.Popen[str], list[str], list[str]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _start(argv: list[str], cwd: Path, env: dict[str, str]) -> Started:
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    err: list[str] = []
    ready = threading.Event()

    def read_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line.rstrip("\n"))
            if "Ctrl-C stops it" in line:
                ready.set()
        ready.set()

    def read_err() -> None:
        assert proc.stderr is not None
        err.extend(proc.stderr)

    threading.Thread(target=read_out, daemon=True).start()
    threading.Thread(target=read_err, daemon=True).start()
    if not ready.wait(WAIT) or not any("Ctrl-C stops it" in line for line in out):
        proc.kill()
        proc.wait(timeout=WAIT)
        raise AssertionError(f"the app did not start: {out} {''.join(err)[-3000:]}")
    return proc, out, err


def _samples(text: str) -> Samples:
    found: Samples = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            found[(match.group(1), labels)] = float(match.group(3))
    return found


def _value(found: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and want <= ls)


@pytest.mark.timeout(180)
async def test_the_production_pattern_serves_with_each_option_in_effect(
    tmp_path: Path, database: str
) -> None:
    api, mcp, grpc_port, metrics = _port(), _port(), _port(), _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "PG", "DATABASE_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database,
        "API_PORT": str(api),
        "MCP_PORT": str(mcp),
        "NEXUS_API_KEY_OPS": KEY,
    }
    (tmp_path / "stray_workflow.py").write_text(STRAY)  # auto_discovery=False: not imported
    argv = [
        sys.executable, "-m", "nexus_server", "serve", str(PACKAGE / "app.py"),
        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics),
    ]  # fmt: skip
    proc, out, err = await asyncio.to_thread(_start, argv, tmp_path, env)
    try:
        assert "  workflows: create_contact, get_contact, list_companies" in out
        assert "  models:    Contact, Company" in out
        assert f"  metrics:   http://127.0.0.1:{metrics}/metrics" in out
        base = f"http://127.0.0.1:{api}"
        auth = {"x-api-key": KEY}
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
            body = {"inputs": {"name": "Ada", "email": "ada@example.com", "company": "AE"}}
            anonymous = await client.post("/workflows/create_contact/execute", json=body)
            assert anonymous.status_code == 401, anonymous.text  # enable_auth
            made = await client.post("/workflows/create_contact/execute", json=body, headers=auth)
            assert made.status_code == 200, made.text
            contact = made.json()["outputs"]["create"]
            for _ in range(2):  # the second read comes from the DataFlow cache
                read = await client.get(f"/v1/contacts/{contact['id']}", headers=auth)
                assert read.status_code == 200, read.text
                assert read.json()["email"] == "ada@example.com"
            updated = await client.patch(
                f"/v1/contacts/{contact['id']}", json={"email": "ada@new.example"}, headers=auth
            )
            assert updated.status_code == 200, updated.text
            again = await client.get(f"/v1/contacts/{contact['id']}", headers=auth)
            assert again.json()["email"] == "ada@new.example"  # the write invalidated it
            stray = await client.post("/workflows/stray/execute", json={}, headers=auth)
            assert stray.status_code == 404, stray.text  # auto_discovery=False
        async with httpx.AsyncClient(timeout=WAIT) as client:
            scraped = await client.get(f"http://127.0.0.1:{metrics}/metrics")
        assert scraped.status_code == 200
        found = _samples(scraped.text)
        execute = "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow"
        # enable_monitoring: the calls, by method, channel and code
        assert _value(found, "nexus_calls_total", method=execute, channel="rest", code="OK") == 1
        assert _value(found, "nexus_auth_failures_total", reason="CREDENTIALS_MISSING") >= 1
        # enable_metrics: statements and the pool, whose size connection_pool_size set
        assert _value(found, "dataflow_query_duration_seconds_count") >= 2
        assert _value(found, "dataflow_pool_connections", state="max") == 20
        # enable_caching: one miss then a hit for the same record
        assert _value(found, "nexus_cache_requests_total", cache="dataflow", result="hit") >= 1
        assert _value(found, "nexus_cache_requests_total", cache="dataflow", result="miss") >= 1
        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, WAIT)
        assert code == 0, "".join(err)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)
    # skip_migration: the server trusted the schema (and said a column is missing)
    columns = await _run(
        database,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'company'",
    )
    names = {r["column_name"] for r in columns}
    assert "name" in names and "industry" not in names
    assert "industry" in "".join(err)
    # enable_model_persistence=False: no model registry table
    registry = await _run(database, "SELECT to_regclass('dataflow_model_registry') AS t")
    assert registry[0]["t"] is None
