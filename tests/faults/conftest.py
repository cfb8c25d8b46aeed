"""Fault fixtures: `nexus serve` as a real subprocess, databases to serve it on, and a
throwaway PostgreSQL cluster to take down.

- `serve(db_url, *flags, **env)`: starts `python -m nexus_server serve tests/faults/faults_app.py
  --grpc-port 0 --no-envoy` (see `faults_app.py` for its models and workflow), reads the
  address it prints, and returns a `NexusProcess` (address, pid, `kill9()`, `rss_mb()`).
  Every process started is killed at the end of the test. Its log goes to a file whose
  tail `NexusProcess.log_tail()` gives for failure messages.
- `backend_url`: an empty database, parametrized indirectly as "sqlite" (a file in
  tmp_path) or "postgres" (a database of its own on the machine's server, created here
  and dropped at the end: the session's `pg_url` says whether that server is there, and
  skips, or fails under CI=true, when it is not).
- `pg_cluster`: a started `PgCluster` (`pgcluster.py`) on a port of its own, removed at
  the end; skipped without initdb/pg_ctl, or failed under CI=true.
- `details(err)`: the ErrorInfo reason and metadata and the field violations of a failed
  call.

Test modules use fixtures only (importlib mode: nothing is imported from here by name).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ROOT = Path(__file__).resolve().parents[2]
APP = Path(__file__).with_name("faults_app.py")
#: Seconds a server may take to start and print its address.
START_TIMEOUT = 30.0


def _load_pgcluster() -> ModuleType:
    # a sibling file, not a package: loaded by path (test folders are not importable)
    spec = importlib.util.spec_from_file_location(
        "nexus_faults_pgcluster", Path(__file__).with_name("pgcluster.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


pgcluster = _load_pgcluster()


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
    pytest.skip(reason)


class NexusProcess:
    """One `nexus serve` subprocess of the fault app."""

    def __init__(self, proc: asyncio.subprocess.Process, address: str, log: Path) -> None:
        self.proc = proc
        self.address = address
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill9(self) -> None:
        """SIGKILL: no graceful stop, no drain, nothing flushed."""
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def wait(self, timeout: float = 15.0) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def stop(self, timeout: float = 15.0) -> None:
        """Ctrl-C, and SIGKILL if it does not stop within `timeout` seconds."""
        if self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            await self.wait(timeout)
        except TimeoutError:
            self.kill9()
            await self.wait()

    def rss_mb(self) -> float:
        """The server's resident memory now (VmRSS of /proc/PID/status), in MB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for pid {self.pid}")

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[NexusProcess]]]:
    """`await serve(db_url, *flags, **env)`: the fault app served on `db_url` by a real
    `nexus serve` on a free port of 127.0.0.1; extra `nexus serve` flags as arguments,
    extra environment variables as keywords."""
    started: list[NexusProcess] = []

    async def start(db_url: str, *flags: str, **env: str) -> NexusProcess:
        log = tmp_path / f"server-{len(started)}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
        environ.update(env)
        environ["NEXUS_DATABASE_URL"] = db_url
        environ["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nexus_server", "serve", str(APP),
                "--grpc-port", "0", "--no-envoy", "--no-mcp", "--log-level", "warning",
                *flags, cwd=tmp_path, env=environ, stdout=asyncio.subprocess.PIPE, stderr=err,
            )  # fmt: skip
        server = NexusProcess(proc, "", log)
        started.append(server)
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                line = (await proc.stdout.readline()).decode()
        except TimeoutError:
            raise AssertionError(f"nexus serve did not start: {server.log_tail()}") from None
        found = re.match(r"Nexus gRPC server on (127\.0\.0\.1:\d+) ", line)
        assert found, f"unexpected first line {line!r}; log: {server.log_tail()}"
        server.address = found.group(1)
        # the rest of what it prints is a few lines; drain it so the pipe never fills
        drain = asyncio.create_task(proc.stdout.read())
        drains.append(drain)
        return server

    drains: list[asyncio.Task[bytes]] = []
    yield start
    for server in started:
        server.kill9()
        with contextlib.suppress(TimeoutError):
            await server.wait()
    for drain in drains:
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await drain


@pytest.fixture
async def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database: a SQLite file, or a PostgreSQL database of this test's own
    on the machine's server (created now, dropped at the end)."""
    backend = str(getattr(request, "param", "sqlite"))
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'faults.db'}"
        return
    pg: str = request.getfixturevalue("pg_url")  # skips (or fails under CI) without a server
    name = f"nexus_faults_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{pg.rsplit('/', 1)[0]}/{name}"
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster, started, on a free port; removed at the end."""
    try:
        bindir = pgcluster.find_bindir()
        cluster = pgcluster.PgCluster(bindir)
    except pgcluster.PgClusterUnavailable as exc:
        _skip_or_fail(f"cannot run a throwaway PostgreSQL cluster: {exc}")
    try:
        try:
            cluster.init()
            cluster.start()
        except (RuntimeError, OSError) as exc:
            _skip_or_fail(f"cannot start a throwaway PostgreSQL cluster: {exc}")
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture
def details() -> Callable[[grpc.aio.AioRpcError], tuple[str, dict[str, str], list[str]]]:
    """`reason, metadata, fields = details(err)`: the ErrorInfo reason ("" without one)
    and metadata, and the fields of the BadRequest violations, of a failed call."""

    def read(err: grpc.aio.AioRpcError) -> tuple[str, dict[str, str], list[str]]:
        status = rpc_status.from_call(err)
        reason, metadata, fields = "", {}, []
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, metadata = info.reason, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields.extend(v.field for v in bad.field_violations)
        return reason, metadata, fields

    return read
