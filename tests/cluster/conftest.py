"""Cluster fixtures: replicas of `nexus serve --no-envoy` on one PostgreSQL database,
and one real Envoy in front of them, configured by `nexus envoy-config --upstream`.

- `serve`, `backend_url` and `details` are the fault tests' fixtures
  (`tests/faults/conftest.py`, loaded by path: test folders are not packages): a
  replica is `await serve(db_url)`, the fault app (`tests/faults/faults_app.py`, its
  workflows registered in code) on a free port, killed at the end of the test.
- `front(db_url, replicas)`: an `Envoy` process from `nexus envoy-config APP --upstream
  A --upstream B ...` on a free port, its admin interface on a unix socket in
  tmp_path; `Envoy.hosts()` reads each replica's state and request counts from it.

Test modules use fixtures only (importlib mode: nothing is imported from here by name).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from nexus_server._envoy import admin_get

ROOT = Path(__file__).resolve().parents[2]
FAULTS = ROOT / "tests" / "faults"
APP = FAULTS / "faults_app.py"
#: Seconds Envoy may take to start, and a replica to become healthy in it.
START_TIMEOUT = 30.0


def _load_faults_conftest() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "nexus_cluster_faults_conftest", FAULTS / "conftest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_faults = _load_faults_conftest()
serve = _faults.serve
backend_url = _faults.backend_url
details = _faults.details


@dataclass
class Host:
    """One replica as Envoy sees it (`/clusters` of its admin interface)."""

    address: str
    healthy: bool
    flags: dict[str, Any]
    rq_success: int
    rq_error: int
    rq_total: int


class Envoy:
    """A real Envoy in front of the replicas."""

    def __init__(self, proc: subprocess.Popen[bytes], admin: Path, log: Path) -> None:
        self.proc = proc
        self.admin = admin
        self.log = log
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hosts(self) -> dict[str, Host]:
        """Every replica of the `nexus_grpc` cluster, by `host:port`."""
        status, body = admin_get(self.admin, "/clusters?format=json", timeout=5.0)
        assert status == 200, body
        found: dict[str, Host] = {}
        for cluster in json.loads(body).get("cluster_statuses", []):
            if cluster["name"] != "nexus_grpc":
                continue
            for h in cluster.get("host_statuses", []):
                sock = h["address"]["socket_address"]
                stats = {s["name"]: int(s.get("value", 0)) for s in h.get("stats", [])}
                flags = h.get("health_status", {})
                healthy = flags.get("eds_health_status") == "HEALTHY" and not any(
                    v is True for v in flags.values()
                )
                address = f"{sock['address']}:{sock['port_value']}"
                found[address] = Host(
                    address,
                    healthy,
                    flags,
                    stats.get("rq_success", 0),
                    stats.get("rq_error", 0),
                    stats.get("rq_total", 0),
                )
        return found

    async def wait_hosts(
        self, pred: Callable[[dict[str, Host]], bool], what: str, timeout: float = START_TIMEOUT
    ) -> dict[str, Host]:
        """Poll `hosts()` (every 0.1 s, at most `timeout` s) until `pred` holds."""
        deadline = time.monotonic() + timeout
        while True:
            hosts = await asyncio.to_thread(self.hosts)
            if pred(hosts):
                return hosts
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {hosts}")
            await asyncio.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""


def _listener_port(admin: Path) -> int | None:
    if not admin.exists():
        return None
    try:
        status, _ = admin_get(admin, "/ready")
        if status != 200:
            return None
        status, body = admin_get(admin, "/listeners?format=json")
    except OSError:
        return None
    for listener in json.loads(body).get("listener_statuses", []) if status == 200 else []:
        if listener.get("name") == "nexus_api":
            return int(listener["local_address"]["socket_address"]["port_value"])
    return None


def envoy_config_for(db_url: str, upstreams: Sequence[str], admin: Path) -> str:
    """The YAML `nexus envoy-config APP --upstream ...` prints (a real subprocess)."""
    args = [f"--upstream={u}" for u in upstreams]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_DATABASE_URL"] = db_url
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    command = [sys.executable, "-m", "nexus_server", "envoy-config", str(APP), *args]
    command += ["--api-host", "127.0.0.1", "--api-port", "0", "--admin-socket", str(admin)]
    proc = subprocess.run(
        [*command, "--embed-descriptor"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _popen_envoy(binary: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        command = [str(binary), "-c", str(config), "--disable-hot-restart"]
        command += ["--use-dynamic-base-id", "--log-level", "warning", "--concurrency", "1"]
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture
async def front(
    tmp_path: Path, envoy_path: Path
) -> AsyncIterator[Callable[[str, Sequence[Any]], Awaitable[Envoy]]]:
    """`await front(db_url, replicas)`: a started Envoy in front of `replicas` (each
    with an `address`), once every replica is healthy in it."""
    started: list[Envoy] = []

    async def start(db_url: str, replicas: Sequence[Any]) -> Envoy:
        admin = tmp_path / f"envoy-{len(started)}.sock"
        config = tmp_path / f"envoy-{len(started)}.yaml"
        config.write_text(
            await asyncio.to_thread(envoy_config_for, db_url, [r.address for r in replicas], admin)
        )
        log = tmp_path / f"envoy-{len(started)}.log"
        proc = _popen_envoy(envoy_path, config, log)
        envoy = Envoy(proc, admin, log)
        started.append(envoy)
        deadline = time.monotonic() + START_TIMEOUT
        while (port := await asyncio.to_thread(_listener_port, admin)) is None:
            assert proc.poll() is None, f"Envoy exited: {envoy.log_tail()}"
            assert time.monotonic() < deadline, f"Envoy did not start: {envoy.log_tail()}"
            await asyncio.sleep(0.1)
        envoy.port = port
        wanted = {r.address for r in replicas}
        await envoy.wait_hosts(
            lambda hosts: set(hosts) == wanted and all(h.healthy for h in hosts.values()),
            "every replica healthy in Envoy",
        )
        return envoy

    yield start
    for envoy in started:
        envoy.proc.kill()
        envoy.proc.wait(timeout=15)
