"""`nexus serve --mcp`: the MCP adapter as a supervised child process of the server.

`nexus serve` runs as a user runs it (the `nexus` CLI, which hands `serve` to
`python -m nexus_server`), on ephemeral ports; the real `mcp` client connects over
streamable HTTP. The adapter is found among the server's child processes in /proc.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest
from mcp import Client

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "contacts_app.py"
WAIT = 20.0


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
            continue  # it ended meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"clients.mcp" in argv:
            found.append(int(entry.name))
    return found


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=1.0)
    except httpx.TransportError:
        return False
    return True


async def _until(check: object, what: str) -> object:
    """Poll `check()` (in a thread) until it returns something truthy, within WAIT."""
    assert callable(check)
    deadline = time.monotonic() + WAIT
    while True:
        value = await anyio.to_thread.run_sync(check)
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


@dataclass
class Served:
    proc: asyncio.subprocess.Process
    grpc_address: str
    mcp_url: str
    banner: list[str]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    """`nexus serve APP --mcp` on ephemeral ports, without Envoy; killed if still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", "serve", str(APP),
        "--grpc-port", "0", "--no-envoy", "--mcp", "--mcp-port", "0",
        cwd=tmp_path, env=_env(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        banner: list[str] = []
        async with asyncio.timeout(WAIT * 2):
            while not banner or "Ctrl-C stops it" not in banner[-1]:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    assert proc.stderr is not None
                    err = (await proc.stderr.read()).decode()
                    pytest.fail(f"serve ended: {banner}\n{err}")
                banner.append(line.rstrip())
        grpc_match = re.search(r"Nexus gRPC server on (127\.0\.0\.1:\d+)", banner[0])
        mcp_lines = [b for b in banner if b.startswith("MCP adapter on ")]
        assert grpc_match and len(mcp_lines) == 1, banner
        url = mcp_lines[0].split()[3]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/mcp", url), url
        yield Served(proc, grpc_match.group(1), url, banner)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _list_and_call(url: str, email: str) -> None:
    with anyio.fail_after(WAIT):
        async with Client(url, read_timeout_seconds=WAIT) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"run_create_contact", "run_search_contacts", "contacts_create"} <= names
            result = await client.call_tool("run_create_contact", {"name": "M", "email": email})
            assert not result.is_error, result.content
            assert result.structured_content["create"]["email"] == email


@pytest.mark.timeout(120)  # three interpreters start, one twice, on a shared machine
async def test_serve_runs_supervises_and_stops_the_mcp_adapter(served: Served) -> None:
    proc = served.proc
    # the addresses are printed once the adapter answers
    assert served.banner.index(next(b for b in served.banner if b.startswith("MCP"))) > 0
    assert await anyio.to_thread.run_sync(_answers, served.mcp_url)
    await _list_and_call(served.mcp_url, "first@serve-mcp.org")

    [first] = _adapters(proc.pid)
    os.kill(first, signal.SIGKILL)
    restarted = await _until(
        lambda: [p for p in _adapters(proc.pid) if p != first], "the adapter was restarted"
    )
    assert isinstance(restarted, list) and len(restarted) == 1
    second = restarted[0]
    await _until(lambda: _answers(served.mcp_url), "the restarted adapter answers")
    await _list_and_call(served.mcp_url, "second@serve-mcp.org")  # the same URL again

    proc.send_signal(signal.SIGINT)
    async with asyncio.timeout(WAIT * 2):
        code = await proc.wait()
    assert proc.stdout is not None and proc.stderr is not None
    out = (await proc.stdout.read()).decode()
    err = (await proc.stderr.read()).decode()
    assert code == 0, err
    assert "stopping" in out
    assert "MCP adapter exited with -9; restarting it" in err
    assert "MCP adapter restarted on " + served.mcp_url in err
    with pytest.raises(ProcessLookupError):  # stopped and reaped by the server
        os.kill(second, 0)
    assert not await anyio.to_thread.run_sync(_answers, served.mcp_url)


def test_serve_reports_a_taken_mcp_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "clients.cli", "serve", str(APP), "--grpc-port", "0",
             "--no-envoy", "--mcp", "--mcp-port", str(port)],
            cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=WAIT * 2,
        )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert f"cannot start the MCP adapter on port {port}" in done.stderr
    assert "Address already in use" in done.stderr
    assert "--mcp-port" in done.stderr
    assert "Traceback" not in done.stderr
    assert "MCP adapter on" not in done.stdout


def test_serve_help_has_the_mcp_flags_and_checks_them(tmp_path: Path) -> None:
    nexus = [sys.executable, "-m", "clients.cli", "serve"]
    env = _env(tmp_path)
    shown = subprocess.run(
        [*nexus, "--help"], env=env, capture_output=True, text=True, timeout=WAIT
    )
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"--mcp\s+run the MCP adapter", shown.stdout), shown.stdout
    assert re.search(r"--mcp-port\s+MCP_PORT", shown.stdout), shown.stdout
    # MCP is served by default (the app's mcp_port): --mcp-port with --no-mcp contradicts
    both = subprocess.run(
        [*nexus, str(APP), "--mcp-port", "0", "--no-mcp"],
        env=env, capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert both.returncode == 2
    assert "--mcp-port and --no-mcp contradict each other" in both.stderr
