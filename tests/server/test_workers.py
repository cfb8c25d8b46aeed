"""`nexus serve APP --workers N`: N server processes behind one Envoy and one port.

The server is a real `nexus serve --workers 2` subprocess (`workers_app.py`), on a SQLite
file and on a PostgreSQL database of its own. Which worker answered a call is in the
health document (`components.worker.pid`): calls through Envoy (gRPC and REST) and
straight to the shared grpc_port reach both. A worker killed with SIGKILL is restarted
while the other answers; SIGTERM lets a call in flight on each worker finish; the
metrics port sums the calls of both; concurrent writes from both workers all succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from dataflow import DataFlow
from nexus_api.nexus.health.v1 import probe_service_pb2 as ppb
from nexus_api.nexus.health.v1 import probe_service_pb2_grpc as pgrpc
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus
from nexus_server._envoy import EnvoyOptions, envoy_config
from nexus_server._workers import check_shareable, parse_workers

ROOT = Path(__file__).resolve().parents[2]
APP = Path(__file__).with_name("workers_app.py")
#: Seconds the server gets to start (two Python processes importing everything, on a
#: machine shared with other work), and every other bounded wait.
START = 90.0
WAIT = 30.0
#: Attempts at reaching both workers (each picks one of two: missing one of them in
#: this many is a chance of 2**-99).
ATTEMPTS = 100

pytestmark = pytest.mark.timeout(300)


@dataclass
class Server:
    """A running `nexus serve --workers 2`, from what it printed."""

    proc: asyncio.subprocess.Process
    shared: str  # host:port of the shared grpc_port
    own: list[str]  # host:port of each worker's own port
    api: str  # host:port of Envoy
    metrics: str  # URL of the metrics port
    gates: Path
    log: Path


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _until_in(path: Path, text: str) -> str:
    """The content of `path` once it contains `text` (bounded by WAIT)."""
    async with asyncio.timeout(WAIT):
        while True:
            content = await asyncio.to_thread(_read, path)
            if text in content:
                return content
            await asyncio.sleep(0.05)


async def _banner(log: Path, proc: asyncio.subprocess.Process) -> dict[str, str]:
    """The parent's banner lines (the workers' log lines are in the same file)."""
    found: dict[str, str] = {}
    patterns = {
        "shared": r"^Nexus gRPC server on (\S+:\d+), 2 workers",
        "own": r"^  workers' own ports \(Envoy's endpoints\): ([\d, ]+)$",
        "api": r"^Envoy on http://(\S+:\d+) ",
        "metrics": r"^  metrics of all workers: (\S+)$",
    }
    async with asyncio.timeout(START):
        while len(found) < len(patterns):
            text = await asyncio.to_thread(_read, log)
            if proc.returncode is not None:
                raise AssertionError(f"exited with {proc.returncode}: {text[-3000:]}")
            for line in text.splitlines():
                for key, pattern in patterns.items():
                    match = re.match(pattern, line)
                    if match:
                        found[key] = match.group(1)
            await asyncio.sleep(0.1)
    return found


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, db_url: str) -> AsyncIterator[Server]:
    gates = tmp_path / "gates"
    gates.mkdir()
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "NEXUS_DATABASE_URL": db_url,
        "WORKERS_TEST_GATES": str(gates),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nexus_server", "serve", str(APP), "--workers", "2",
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        found = await _banner(log, proc)
        host = found["shared"].rsplit(":", 1)[0]
        own = [f"{host}:{p.strip()}" for p in found["own"].split(",")]
        yield Server(proc, found["shared"], own, found["api"], found["metrics"], gates, log)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(WAIT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


def _fresh_channel(address: str) -> grpc.aio.Channel:
    # a subchannel pool of its own: a new TCP connection, not one another channel of
    # this process holds (the kernel picks the worker of each new connection)
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


async def _health(channel: grpc.aio.Channel) -> dict[str, Any]:
    body = await pgrpc.ProbeServiceStub(channel).GetHealth(ppb.GetHealthRequest(), timeout=WAIT)
    doc: dict[str, Any] = json.loads(body.data)
    return doc


async def _worker(channel: grpc.aio.Channel) -> tuple[int, int]:
    """(index, pid) of the worker that answered a GetHealth call."""
    worker = (await _health(channel))["components"]["worker"]
    return int(worker["index"]), int(worker["pid"])


async def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        text = (await client.get(url)).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _calls(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], method: str) -> float:
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "nexus_calls_total" and ("method", method) in labels
    )


def _inputs(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _open_gate(gates: Path, gate: str) -> None:
    (gates / f"{gate}.go").write_text("go")


async def _started(gates: Path, gate: str) -> int:
    """The pid of the worker running the held call `gate`, once it started."""
    path = gates / f"{gate}.started"
    async with asyncio.timeout(WAIT):
        while True:
            pid = await asyncio.to_thread(_read, path)
            if pid:
                return int(pid)
            await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the backends -------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A SQLite file, or a PostgreSQL database of the test's own (dropped after it)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/app.db"
        return
    base_url: str = request.getfixturevalue("pg_url")
    name = f"nexus_workers_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(base_url, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{base_url.rsplit('/', 1)[0]}/{name}"
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# -- units ----------------------------------------------------------------------------------


def test_workers_is_a_count_or_auto() -> None:
    assert parse_workers("3") == 3
    assert parse_workers("auto") == (os.cpu_count() or 1)
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(Exception, match="whole number of 1 or more"):
            parse_workers(bad)


@pytest.mark.parametrize("value", ["0", "many"])
def test_a_bad_workers_value_is_a_usage_error_naming_it(value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "serve", str(APP), "--workers", value],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--workers" in done.stderr and "whole number of 1 or more" in done.stderr
    assert "Traceback" not in done.stderr


def test_what_each_worker_would_keep_to_itself_is_refused(tmp_path: Path) -> None:
    def app(url: str, **options: Any) -> Nexus:
        caching = options.pop("caching", False)
        nexus = Nexus(grpc_port=0, **options)
        nexus.integrate_dataflow(DataFlow(url, enable_caching=caching or None))
        return nexus

    file = f"sqlite:///{tmp_path / 'app.db'}"
    with pytest.raises(ValueError, match=r"--workers 2: .*SQLite database in memory"):
        check_shareable(app("sqlite:///:memory:"), 2)
    with pytest.raises(ValueError, match=r"--workers 2: .*cache_url='redis://"):
        check_shareable(app(file, caching=True), 2)
    with pytest.raises(ValueError, match=r"--workers 3: .*3 times the limit.*rate_limit_backend"):
        check_shareable(app(file, rate_limit=100), 3)
    # shared state, or none at all, is fine
    check_shareable(app(file), 2)
    check_shareable(app(file, rate_limit=100, rate_limit_backend="redis://127.0.0.1:6379/0"), 2)


def test_envoy_balances_between_the_workers_by_least_request() -> None:
    one = envoy_config(b"", EnvoyOptions(grpc_port=7000))
    two = envoy_config(b"", EnvoyOptions(grpc_port=7001, grpc_ports=(7001, 7002)))

    def cluster(config: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = next(
            c for c in config["static_resources"]["clusters"] if c["name"] == "nexus_grpc"
        )
        return found

    def ports(config: dict[str, Any]) -> list[int]:
        endpoints = cluster(config)["load_assignment"]["endpoints"][0]["lb_endpoints"]
        return [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]

    assert ports(one) == [7000] and "lb_policy" not in cluster(one)
    assert ports(two) == [7001, 7002] and cluster(two)["lb_policy"] == "LEAST_REQUEST"
    vhost = two["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]
    # only failures before a request reached a worker are retried: a write never runs twice
    assert set(vhost["retry_policy"]["retry_on"].split(",")) == {
        "connect-failure",
        "refused-stream",
        "reset-before-request",
    }


# -- a real server of two workers -----------------------------------------------------------


async def test_a_worker_that_cannot_start_fails_the_start_with_its_reason(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "NEXUS_DATABASE_URL": f"sqlite:///{tmp_path}/missing/dir/app.db",
        "WORKERS_TEST_GATES": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexus_server", "serve", str(APP), "--workers", "2",
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(START):
        out, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 3, text
    assert "nexus: cannot open the database" in text  # the worker's own line
    assert "nexus: worker 0 did not start (worker 0 exited with 3)" in text
    assert "Traceback" not in text and "Nexus gRPC server on" not in out.decode()


async def test_two_workers_share_calls_writes_and_metrics_and_drain_on_sigterm(
    tmp_path: Path, db_url: str
) -> None:
    async with serve(tmp_path, db_url) as server:
        # through Envoy (gRPC): least request spreads calls over both workers
        seen: dict[int, int] = {}
        health_calls = 0
        async with grpc.aio.insecure_channel(server.api) as channel:
            for _ in range(ATTEMPTS):
                index, pid = await _worker(channel)
                health_calls += 1
                seen[index] = pid
                if len(seen) == 2:
                    break
        assert sorted(seen) == [0, 1] and seen[0] != seen[1]
        pids = set(seen.values())

        # through Envoy (REST): the same workers
        rest: set[int] = set()
        async with httpx.AsyncClient(base_url=f"http://{server.api}", timeout=WAIT) as client:
            for _ in range(ATTEMPTS):
                reply = await client.get("/health")
                health_calls += 1
                assert reply.status_code == 200, reply.text
                rest.add(reply.json()["components"]["worker"]["pid"])
                if rest == pids:
                    break
        assert rest == pids

        # straight to the shared grpc_port: each new connection lands on one of them
        direct: set[int] = set()
        for _ in range(ATTEMPTS):
            async with _fresh_channel(server.shared) as channel:
                direct.add((await _worker(channel))[1])
                health_calls += 1
            if direct == pids:
                break
        assert direct == pids

        # the metrics port sums both workers' counts, and their scrape-time values
        # (copied to the shared files every second): each worker's pool of 5 (SQLite: 1)
        samples = await _metrics(server.metrics)
        assert _calls(samples, "/nexus.health.v1.ProbeService/GetHealth") == health_calls
        database = "sqlite" if db_url.startswith("sqlite") else "postgresql"
        pool_max = ("dataflow_pool_connections", (("database", database), ("state", "max")))
        breaker = ("nexus_circuit_breaker_state", (("dependency", "database"),))
        both = 2 * (1 if database == "sqlite" else 5)
        async with asyncio.timeout(WAIT):  # until both workers' first copies are in
            while samples.get(pool_max) != both:
                assert samples.get(pool_max, 0) < both, samples.get(pool_max)
                await asyncio.sleep(0.2)
                samples = await _metrics(server.metrics)
        assert samples[breaker] == 0  # closed (the worst of both)
        # through Envoy (expose_metrics=True) as well
        via_envoy = await _metrics(f"http://{server.api}/metrics")
        assert via_envoy[pool_max] == both
        assert _calls(via_envoy, "/nexus.health.v1.ProbeService/GetHealth") == health_calls

        # concurrent writes from both workers to the one database: none fails
        per_worker, concurrency = 60, 8
        channels = [grpc.aio.insecure_channel(address) for address in server.own]
        try:
            pending = asyncio.Semaphore(concurrency * 2)

            async def write(channel: grpc.aio.Channel, i: int) -> str:
                async with pending:
                    reply = await wgrpc.WorkflowServiceStub(channel).ExecuteWorkflow(
                        wpb.ExecuteWorkflowRequest(name="note", inputs=_inputs(text=f"n{i}")),
                        timeout=WAIT,
                    )
                return wpb.Execution.State.Name(reply.state)

            async with asyncio.timeout(120):
                states = await asyncio.gather(
                    *(write(channels[i % 2], i) for i in range(2 * per_worker))
                )
            assert states == ["STATE_SUCCEEDED"] * (2 * per_worker)
            count = await mgrpc.ModelServiceStub(channels[0]).CountRecords(
                mpb.CountRecordsRequest(model="Note"), timeout=WAIT
            )
            assert count.count == 2 * per_worker
        finally:
            for channel in channels:
                await channel.close()

        # SIGTERM drains both: a call held in flight on each worker completes
        calls = []
        holders = [grpc.aio.insecure_channel(address) for address in server.own]
        try:
            for i, channel in enumerate(holders):
                calls.append(
                    asyncio.ensure_future(
                        wgrpc.WorkflowServiceStub(channel).ExecuteWorkflow(
                            wpb.ExecuteWorkflowRequest(name="hold", inputs=_inputs(gate=f"g{i}")),
                            timeout=START,
                        )
                    )
                )
            held = {await _started(server.gates, f"g{i}") for i in range(2)}
            assert held == pids  # one call in flight on each worker
            server.proc.send_signal(signal.SIGTERM)
            # the workers stop taking calls, but wait for these
            await _until_in(server.log, "stopping")
            assert server.proc.returncode is None
            for i in range(2):
                await asyncio.to_thread(_open_gate, server.gates, f"g{i}")
            async with asyncio.timeout(WAIT):
                replies = await asyncio.gather(*calls)
        finally:
            for channel in holders:
                await channel.close()
        assert [wpb.Execution.State.Name(r.state) for r in replies] == ["STATE_SUCCEEDED"] * 2
        assert {int(r.outputs["hold"]["pid"]) for r in replies} == pids
        async with asyncio.timeout(WAIT):
            code = await server.proc.wait()
        assert code == 0, _read(server.log)[-3000:]
        assert not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_a_worker_killed_with_sigkill_is_restarted_while_the_other_answers(
    tmp_path: Path, db_url: str
) -> None:
    async with serve(tmp_path, db_url) as server:
        workers: dict[int, int] = {}
        async with grpc.aio.insecure_channel(server.api) as channel:
            for _ in range(ATTEMPTS):
                index, pid = await _worker(channel)
                workers[index] = pid
                if len(workers) == 2:
                    break
            assert sorted(workers) == [0, 1]
            os.kill(workers[0], signal.SIGKILL)
            answered, failed = 0, 0
            restarted: int | None = None
            async with asyncio.timeout(START):
                while restarted is None:
                    try:
                        index, pid = await _worker(channel)
                    except grpc.aio.AioRpcError:
                        failed += 1
                        await asyncio.sleep(0.05)
                        continue
                    answered += 1
                    if index == 0:
                        assert pid != workers[0]  # never the killed process
                        restarted = pid
                    else:
                        assert pid == workers[1]
                    await asyncio.sleep(0.02)
        assert not _alive(workers[0])
        # Envoy hands a call it cannot deliver to the dead worker to the other one: at
        # most a call sent on the dead worker's connection as it died may fail
        assert answered > 1 and failed <= 1, (answered, failed)
        # the restarted worker serves the shared port too
        direct: set[int] = set()
        for _ in range(ATTEMPTS):
            async with _fresh_channel(server.shared) as channel:
                direct.add((await _worker(channel))[1])
            if direct == {restarted, workers[1]}:
                break
        assert direct == {restarted, workers[1]}
