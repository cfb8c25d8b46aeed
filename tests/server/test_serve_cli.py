"""`nexus serve` as a user runs it, and the server's health while the database is away."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dataflow import DataFlow
from nexus_server import Nexus

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "contacts_app.py"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(resp.status)


async def _wait_for(address: str, status: int, deadline: float = 15.0) -> None:
    """Follow the health service's Watch stream until it reports `status`."""
    async with asyncio.timeout(deadline), grpc.aio.insecure_channel(address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        async for resp in stream:
            if resp.status == status:
                return


@pytest.mark.parametrize(("option", "loop"), [((), "uvloop"), (("--loop", "asyncio"), "asyncio")])
async def test_serve_prints_address_answers_health_and_stops_on_ctrl_c(
    tmp_path: Path, option: tuple[str, ...], loop: str
) -> None:
    env = {**os.environ, "NEXUS_DATABASE_URL": f"sqlite:///{tmp_path}/app.db"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexus_server", "serve", str(APP),
        "--grpc-port", "0", "--no-envoy", "--no-mcp", *option,
        cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        match = re.match(r"Nexus gRPC server on (127\.0\.0\.1:\d+) \(started in \d+ ms\)", line)
        assert match, line
        address = match.group(1)
        assert await _health(address) == SERVING
        assert await _health(address, "nexus.models.v1.ContactService") == SERVING
        rest = (await proc.stdout.readline()).decode()
        assert rest.split() == ["workflows:", "create_contact,", "search_contacts"]
        await proc.stdout.readline()  # models
        # the event loop it serves on: uvloop by default (installed with nexus)
        assert (await proc.stdout.readline()).decode().split() == ["loop:", loop]
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            code = await proc.wait()
        assert code == 0
        out = (await proc.stdout.read()).decode()
        assert "stopping" in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert (tmp_path / "app.db").exists()
    assert not (tmp_path / "nexus.db").exists()


def test_loop_choices_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from nexus_server._cli import loop_factory

    assert loop_factory("asyncio") is None
    assert loop_factory("auto") is not None  # uvloop, installed with nexus
    with pytest.raises(ValueError, match="--loop 'trio'"):
        loop_factory("trio")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as where it is not installed
    assert loop_factory("auto") is None
    with pytest.raises(ValueError, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_serve_reports_an_app_that_cannot_load(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "serve", "missing.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "cannot load 'missing.py'" in done.stderr
    assert "Traceback" not in done.stderr


def test_metrics_port_without_monitoring_is_refused(tmp_path: Path) -> None:
    """`--metrics-port` on an app without `enable_monitoring=True` would serve nothing:
    refused, with what to do, before anything starts."""
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "serve", str(APP), "--metrics-port", "0"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "--metrics-port needs monitoring on" in done.stderr
    assert "enable_monitoring=True" in done.stderr
    assert "Traceback" not in done.stderr


def test_importing_our_packages_configures_no_logging() -> None:
    code = (
        "import logging, workflow, dataflow, nexus_server;"
        "root = logging.getLogger();"
        "print(len(root.handlers), logging.getLogger('nexus_server').handlers)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "[]"]


@pytest.fixture
async def pg_database(pg_url: str) -> AsyncIterator[tuple[str, str]]:
    """A database of its own, so that cutting it off does not disturb other tests."""
    name = f"nexus_health_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_url, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        base = pg_url.rsplit("/", 1)[0]
        yield f"{base}/{name}", name
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_health_is_not_serving_while_the_database_is_unreachable(
    pg_url: str, pg_database: tuple[str, str]
) -> None:
    url, name = pg_database
    db = DataFlow(url)

    @db.model
    class HealthProbe:
        id: str
        note: str = ""

    app = Nexus(grpc_port=0, health_check_interval=0.1)
    app.integrate_dataflow(db)
    admin = await asyncpg.connect(pg_url, timeout=5)
    try:
        async with app.serving() as info:
            assert await _health(info.address) == SERVING
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name,
            )
            await _wait_for(info.address, NOT_SERVING)
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await _wait_for(info.address, SERVING)
    finally:
        await admin.close()
        await db.close()


@pytest.mark.parametrize(
    ("args", "usage", "panels"),
    [
        (["serve"], "Usage: nexus serve [OPTIONS] APP", ["Arguments", "Options"]),
        (["proto"], "Usage: nexus proto [OPTIONS] COMMAND [ARGS]...", ["Options", "Commands"]),
        (["proto", "export"], "Usage: nexus proto export [OPTIONS] APP", ["Arguments"]),
        (["envoy-config"], "Usage: nexus envoy-config [OPTIONS] APP", ["Options"]),
    ],
)
def test_server_commands_help_looks_like_the_rest_of_the_cli(
    args: list[str], usage: str, panels: list[str]
) -> None:
    """The `nexus` CLI's look (usage line, description, rounded panels), flags without a
    metavar, choices listed; not argparse's own help."""
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert usage in out
    for title in panels:
        assert f"╭─ {title} " in out
    assert "positional arguments" not in out and "usage:" not in out
    if args == ["serve"]:
        assert "[debug|info|warning|error]" in out
        assert "--no-envoy  " in out and "NO_ENVOY" not in out  # a flag shows no metavar
