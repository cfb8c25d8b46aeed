"""The original's "Complete Working Example" (reference document 000, lines 87-143),
ported by changing only its import lines (examples/kailash_complete_example.py), run as
a user runs it: `python app.py` and `nexus serve app.py`, driven with the original's curl
command (httpx) on port 8000 and an MCP client on port 3001.

As written it passes `enable_metrics=True, enable_caching=True`: both work since issue
17 (metrics of the pool and statements, the query cache), so it runs exactly as written.
Its
database URL is `postgresql://localhost:5432/mydb`: the test creates `mydb` if missing
(its tables too: the example sets `skip_migration=True`) and drops it after if it made
it; `PGUSER=postgres` is the only environment it is given for that URL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import httpx
import pytest
from mcp import Client

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "kailash_complete_example.py"
REFERENCE = sorted((ROOT.parent / "shared" / "reference").glob("000_*.txt"))
ADMIN_URL = os.environ.get("NEXUS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
WAIT = 60.0

MAKE_TABLES = """
import asyncio
import sys

from dataflow import DataFlow

db = DataFlow(sys.argv[1])


@db.model
class Contact:
    id: str
    name: str
    email: str
    company: str


@db.model
class Company:
    id: str
    name: str
    industry: str


async def main() -> None:
    await db.initialize()
    await db.close()


asyncio.run(main())
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "PG", "DATABASE_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PGUSER"] = "postgres"
    return env


def _code(text: str) -> list[str]:
    """The file without its leading comment (where it says what it is)."""
    lines = text.splitlines()
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return lines


def test_the_example_is_the_original_with_only_its_imports_changed() -> None:
    if not REFERENCE:
        pytest.skip("the original's documents are not beside the repository")
    lines = REFERENCE[0].read_text().splitlines()
    start = lines.index("## Complete Working Example")
    body = lines[start:]
    first = body.index("```python") + 1
    original = body[first : body.index("```", first)]
    ported = _code(EXAMPLE.read_text())
    assert len(original) == len(ported)
    changed = [(a, b) for a, b in zip(original, ported, strict=True) if a != b]
    assert changed == [
        ("from nexus import Nexus", "from nexus_server import Nexus"),
        (
            "from kailash.workflow.builder import WorkflowBuilder",
            "from workflow import WorkflowBuilder",
        ),
    ]  # fmt: skip


async def _admin(sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


@pytest.fixture
def mydb(pg_url: str) -> Iterator[str]:
    """The example's database `mydb`, with its tables; dropped after if made here."""
    exists = asyncio.run(_admin("SELECT 1 FROM pg_database WHERE datname = 'mydb'"))
    if not exists:
        asyncio.run(_admin("CREATE DATABASE mydb"))
    base, _, _ = ADMIN_URL.rpartition("/")
    url = f"{base}/mydb"
    try:
        subprocess.run(
            [sys.executable, "-c", MAKE_TABLES, url],
            env=_env(), check=True, capture_output=True, timeout=WAIT,
        )  # fmt: skip
        yield url
    finally:
        if not exists:
            asyncio.run(_admin("DROP DATABASE IF EXISTS mydb WITH (FORCE)"))


def _free(port: int) -> bool:
    with socket.socket() as sock:
        # as servers bind: a connection of a previous run in TIME_WAIT does not count
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _require_free_ports() -> None:
    busy = [p for p in (8000, 3001, 50051) if not _free(p)]
    if busy:
        pytest.fail(
            f"port(s) {busy} are in use: the original's example serves on 8000 (REST), "
            "3001 (MCP) and gRPC's default 50051; stop what listens there and run this "
            "test again"
        )


def _serve(argv: list[str], cwd: Path) -> tuple[subprocess.Popen[str], list[str], list[str]]:
    proc = subprocess.Popen(
        argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    banner: list[str] = []
    err: list[str] = []
    ready = threading.Event()

    def read_out() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            banner.append(line.rstrip("\n"))
            if "Ctrl-C stops it" in line:
                ready.set()
        ready.set()

    def read_err() -> None:
        assert proc.stderr is not None
        err.extend(proc.stderr)

    threading.Thread(target=read_out, daemon=True).start()
    threading.Thread(target=read_err, daemon=True).start()
    if not ready.wait(WAIT) or not any("Ctrl-C stops it" in line for line in banner):
        proc.kill()
        proc.wait(timeout=WAIT)
        raise AssertionError(f"the example did not start: {banner} {''.join(err)[-3000:]}")
    return proc, banner, err


async def _drive(email: str) -> None:
    """The original's curl command, then an MCP client on port 3001."""
    async with httpx.AsyncClient(timeout=WAIT) as client:
        done = await client.post(
            "http://localhost:8000/workflows/create_contact/execute",
            headers={"Content-Type": "application/json"},
            json={"inputs": {"name": "John Doe", "email": email, "company": "Acme Corp"}},
        )
    assert done.status_code == 200, done.text
    created = done.json()["outputs"]["create"]
    assert (created["name"], created["email"], created["company"]) == (
        "John Doe", email, "Acme Corp"
    )  # fmt: skip
    with anyio.fail_after(WAIT):
        async with Client("http://localhost:3001/mcp", read_timeout_seconds=WAIT) as mcp:
            names = {t.name for t in (await mcp.list_tools()).tools}
            assert {"run_create_contact", "contacts_list", "companies_create"} <= names
            result = await mcp.call_tool(
                "run_create_contact",
                {"name": "Ada", "email": f"mcp-{email}", "company": "Analytical Engines"},
            )
            assert not result.is_error, result.content
            listed = await mcp.call_tool("contacts_list", {"filter": {"email": email}})
            assert not listed.is_error, listed.content
            assert email in str(listed.structured_content)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["python", "serve"])
async def test_the_example_serves_rest_and_mcp_on_its_ports(
    tmp_path: Path, mydb: str, how: str
) -> None:
    _require_free_ports()
    app = tmp_path / "app.py"
    app.write_text(EXAMPLE.read_text())  # as written
    argv = [sys.executable, str(app)] if how == "python" else [
        sys.executable, "-m", "nexus_server", "serve", str(app)
    ]  # fmt: skip
    proc, banner, err = await asyncio.to_thread(_serve, argv, tmp_path)
    try:
        assert "Envoy on http://127.0.0.1:8000 (REST, gRPC-Web, Connect and gRPC)" in banner
        assert any(line.startswith("MCP adapter on http://127.0.0.1:3001/mcp") for line in banner)
        assert "  models:    Contact, Company" in banner
        await _drive(f"{how}@example.com")
        rows = await _mydb_contacts(mydb)
        assert f"{how}@example.com" in rows and f"mcp-{how}@example.com" in rows
        proc.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(proc.wait, WAIT)
        assert code == 0, "".join(err)[-3000:]
        assert not (tmp_path / "nexus.db").exists()  # executions went to mydb
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)


async def _mydb_contacts(url: str) -> set[str]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return {r["email"] for r in await conn.fetch("SELECT email FROM contact")}
    finally:
        await conn.close()
