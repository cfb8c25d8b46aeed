"""The Nexus gRPC server against bare grpc.aio servers measured in the same run.

Every server runs in a process of its own (`nexus serve` on a generated app; this file
with `--serve echo|driver` for the baselines); the load comes from `h2load` (nghttp2's
HTTP/2 load generator, written in C, Debian package `nghttp2-client`) sending
gRPC-framed requests over one HTTP/2 connection with 1, 16 or 64 concurrent streams.
A C load generator needs a fraction of a core, so on this 2-core machine the server
under test gets a core of its own, and the client is never what limits the figure.

Measured:

* requests/s, p50 and p99 latency of
  - ExecuteWorkflow of `noop` (one registered node returning a constant), of
    `create_contact` (one ContactCreateNode) and of `list_contacts` (one ContactListNode:
    a page of 10 of 100 contacts, filtered, ordered by name), and the typed
    `ContactService/GetContact` by id, on a Nexus server with a SQLite file (WAL),
    execution records persisted;
  - baselines: a bare grpc.aio echo server (a generic handler on raw bytes) and a bare
    grpc.aio server whose handlers use aiosqlite directly (SELECT by id; INSERT +
    COMMIT; the list page's SQL, rows sent as JSON), on a SQLite file with the same
    pragmas;
  each Nexus figure is printed with its ratio to its baseline (target >= 0.6; noop
  >= 0.7 of the echo server), and the noop figures with two reference rows, the same
  server with ExecuteWorkflow replaced (`bench/_reference_reply.py`): answering a
  constant reply, the ceiling that gRPC and the gateway chain leave for running and
  recording an execution; and making, recording and answering an execution's record
  without running anything, the ceiling of any execution recorded in the process;
* the cost of authentication: ExecuteWorkflow noop served with authentication off and
  on in the same run, called with an env API key, an HS256 JWT and a managed key, beside
  a second auth-off server as a control (target: >= 0.9 of auth off at concurrency 16),
  then the gateway's admission of one call timed in process (`bench/_auth_cost.py`);
* ExecuteWorkflow (`noop`, `create_contact`) with OpenTelemetry tracing at 1 % sampling
  against the same app with tracing off, both served in this run (target ratio >= 0.9;
  `--only-tracing`, `--skip-tracing`; skipped when the SDK is not installed);
* the cost of Prometheus metrics: ExecuteWorkflow (noop and create_contact) on the same
  app served twice, `enable_monitoring=True` against off, alternating rounds (target:
  metrics cost under 5 %, i.e. ratio >= 0.95);
* every core (`--only-workers`, `--skip-workers`): ExecuteWorkflow noop and
  create_contact on PostgreSQL at concurrency 64 over 16 connections, `nexus serve
  --workers 2` beside `--workers 1` beside a bare grpc.aio echo server, straight to the
  gRPC port and through Envoy (targets: 2 workers >= 1.5x one, and >= 1.0x the echo
  server, straight to the port), beside the echo server served from two processes
  sharing its port (what a second CPU gives the bare server on this machine); with
  `--cpu`, the calls/s that the 2 workers' CPU per call allows with no CPU idle;
* time from process start to answering grpc.health.v1 Check with 100 models and
  `enable_model_persistence=True` (target < 1 s), beside the same for the bare echo
  server, and the peak RSS (VmHWM) of that server after some calls (target < 150 MB).

Every load is bounded by a request count and a time budget (a calibration round sizes
the count to `--seconds`; the h2load process itself has a timeout). gRPC errors are
invisible to h2load (HTTP 200 with a grpc-status trailer), so each run is checked: the
response bytes must add up for reads, the rows written must match for writes.

Run: `.venv/bin/python bench/grpc.py` (`--quick` for a short run; `--only-auth` or
`--skip-auth` for the authentication table alone or without it). To measure a change,
`--against CHECKOUT` also serves the noop, list_contacts and create_contact workflows
from another checkout (a `git worktree` of main, say) and prints this checkout's ratio to it,
alternating rounds.
`--cpu` also prints, for each figure's best round, the CPU time per call of each server's
event-loop thread and of its other threads (from /proc), and how idle the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import dataclasses
import datetime as dt
import functools
import importlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This file is named grpc.py: run as a script, its directory would shadow the grpc
# package (and the type checker maps `import grpc` to it). So it leaves sys.path and
# grpc and the stubs are imported by name at run time.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

grpc: Any = importlib.import_module("grpc")
health_pb2: Any = importlib.import_module("grpc_health.v1.health_pb2")
health_pb2_grpc: Any = importlib.import_module("grpc_health.v1.health_pb2_grpc")
wf_pb2: Any = importlib.import_module("nexus_api.nexus.workflow.v1.workflow_service_pb2")
model_pb2: Any = importlib.import_module("nexus_api.nexus.model.v1.model_service_pb2")

RATIO_TARGET = 0.6
#: ExecuteWorkflow noop against the echo server (issue 20: with margin, at every concurrency)
NOOP_TARGET = 0.7
RSS_TARGET_MB = 150.0
STARTUP_TARGET_S = 1.0
CONCURRENCY = (1, 16, 64)

EXECUTE = "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow"
GET_CONTACT = "/nexus.models.v1.ContactService/GetContact"
LIST_MODELS = "/nexus.model.v1.ModelService/ListModels"
ECHO = "/bench.Echo/Echo"
DRIVER_GET = "/bench.Driver/Get"
DRIVER_CREATE = "/bench.Driver/Create"
DRIVER_LIST = "/bench.Driver/List"

COLS = "id, name, email, company, score, created_at, updated_at"
#: The SQL of the `list_contacts` workflow's page (DataFlow's, on the bare table).
LIST_SQL = (
    f"SELECT {COLS} FROM raw_contact WHERE score >= ? "
    "ORDER BY name ASC NULLS FIRST, id ASC NULLS FIRST LIMIT ?"
)

# ---- the app under test (written to a file and served by `nexus serve`) -----------------

APP = '''
"""Generated by bench/grpc.py: a Contact model, {extra} more models, two workflows."""

import os
from typing import Any

from dataflow import DataFlow
from nexus_server import Nexus
from workflow import Node, Output, Param, WorkflowBuilder, register_node


@register_node
class BenchNoop(Node):
    """Returns a constant: the cheapest node there is."""

    parameters = {{"x": Param(int, default=0)}}
    outputs = {{"x": Output(int)}}

    def run(self, x: int) -> dict[str, Any]:
        return {{"x": x}}


app = Nexus(grpc_port=0, auto_discovery=False{nexus_options})
db = DataFlow(os.environ["NEXUS_DATABASE_URL"], enable_model_persistence=True)
for i in range({extra}):
    db.model(type(f"Model{{i}}", (), {{"__annotations__": {{
        "id": str, "name": str, "email": str | None, "score": int, "active": bool}}}}))


@db.model
class Contact:
    """A person (email not unique: h2load sends the same request every time)."""

    id: str
    name: str
    email: str
    company: str | None = None
    score: int = 0


app.integrate_dataflow(db)

noop = WorkflowBuilder("One trivial node.")
noop.add_node("BenchNoop", "noop", {{"x": 1}})
app.register("noop", noop.build(){noop_options})

create = WorkflowBuilder("Create a contact.")
create.add_input("name", str)
create.add_input("email", str)
create.add_input("company", str | None, default=None)
create.add_node(
    "ContactCreateNode", "create", {{"name": "{{{{name}}}}", "email": "{{{{email}}}}",
                                     "company": "{{{{company}}}}"}}
)
app.register("create_contact", create.build())

listing = WorkflowBuilder("A page of 10 contacts, filtered and ordered.")
listing.add_node(
    "ContactListNode", "list", {{"filter": {{"score": {{"$gte": 0}}}}, "order_by": ["name"],
                                 "limit": 10}}
)
app.register("list_contacts", listing.build())
'''


def write_app(
    directory: Path, models: int, *, auth: bool = False, monitoring: bool = False
) -> Path:
    """The app file. `auth`: authentication follows `BENCH_AUTH=1` in the server's
    environment, and `noop` may be run by the role `bench` (see `run_auth`).
    `monitoring`: Prometheus metrics follow `BENCH_MONITORING=1` (see `run_metrics`)."""
    path = (
        directory / f"bench_app_{models}{'_auth' if auth else ''}{'_mon' if monitoring else ''}.py"
    )
    options = (
        {"nexus_options": ', enable_auth=os.environ.get("BENCH_AUTH") == "1"',
         "noop_options": ', roles=["bench"]'}
        if auth else {"nexus_options": "", "noop_options": ""}
    )  # fmt: skip
    if monitoring:
        options["nexus_options"] += (
            ', enable_monitoring=os.environ.get("BENCH_MONITORING") == "1", metrics_port=0'
        )
    path.write_text(APP.format(extra=models - 1, **options))
    return path


# ---- the bare baselines (`--serve echo|driver`, in a process of their own) ------------


async def serve_bare(kind: str, db_path: str | None, port: int) -> None:
    """A bare grpc.aio server: echo (raw bytes back) or aiosqlite handlers, plus the
    standard health service; prints `READY <port>` and serves until SIGTERM/SIGINT."""
    health: Any = importlib.import_module("grpc_health.v1.health")
    server = grpc.aio.server()

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    handlers: dict[str, Any] = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    service = "bench.Echo"
    conn: aiosqlite.Connection | None = None
    if kind == "driver":
        assert db_path is not None
        conn = await aiosqlite.connect(db_path)
        for pragma in ("busy_timeout = 30000", "journal_mode = WAL", "synchronous = NORMAL"):
            await conn.execute(f"PRAGMA {pragma}")
        db = conn

        async def get(request: bytes, context: Any) -> bytes:
            rows = list(
                await db.execute_fetchall(
                    f"SELECT {COLS} FROM raw_contact WHERE id = ?", (request.decode(),)
                )
            )
            if not rows:
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such contact")
            return json.dumps(list(rows[0])).encode()

        async def create(request: bytes, context: Any) -> bytes:
            body = json.loads(request)
            now = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(" ")
            rows = list(
                await db.execute_fetchall(
                    f"INSERT INTO raw_contact ({COLS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    f"RETURNING {COLS}",
                    (str(uuid.uuid4()), body["name"], body["email"], None, 0, now, now),
                )
            )
            await db.commit()
            return json.dumps(list(rows[0])).encode()

        async def list_(request: bytes, context: Any) -> bytes:
            # a page of 10 (one more row read: is there a next page?), as DataFlow does
            rows = list(await db.execute_fetchall(LIST_SQL, (0, 11)))
            return json.dumps([list(r) for r in rows[:10]]).encode()

        handlers = {
            "Get": grpc.unary_unary_rpc_method_handler(get),
            "Create": grpc.unary_unary_rpc_method_handler(create),
            "List": grpc.unary_unary_rpc_method_handler(list_),
        }
        service = "bench.Driver"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    if conn is not None:
        await conn.close()


def serve_processes(args: argparse.Namespace) -> None:
    """`--serve KIND`, from `--processes` processes on one port: this one and children,
    each started and READY before this one serves; stopped with it."""
    if args.processes > 1 and not args.port:
        raise SystemExit("--processes needs a fixed --port (they share it)")
    children = []
    try:
        for _ in range(args.processes - 1):
            cmd = bare_cmd(args.serve, args.port, Path(args.db) if args.db else None)
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            children.append(child)
            assert child.stdout is not None
            if not child.stdout.readline().startswith("READY"):
                raise SystemExit(f"a child of --processes {args.processes} did not start")
        asyncio.run(serve_bare(args.serve, args.db, args.port))
    finally:
        for child in children:
            child.send_signal(signal.SIGINT)
        for child in children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()


def make_driver_db(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(
            "CREATE TABLE raw_contact (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
            "email TEXT NOT NULL, company TEXT, score BIGINT NOT NULL, "
            "created_at DATETIME NOT NULL, updated_at DATETIME NOT NULL)"
        )
        conn.commit()


# ---- processes -------------------------------------------------------------------------


@dataclasses.dataclass
class Server:
    name: str
    proc: subprocess.Popen[str]
    address: str
    #: the file its stderr goes to (a pipe nobody reads would block a server that logs)
    log: Path | None = None

    def state(self) -> str:
        """ "running", or how it ended and the end of its log (for error messages)."""
        if self.proc.poll() is None:
            return "running"
        tail = self.log.read_text(errors="replace")[-3000:] if self.log else ""
        return f"exited with {self.proc.returncode}: {tail}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)

    def vm(self, key: str) -> float:
        """A VmXXX line of /proc/PID/status, in MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
        raise KeyError(key)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def child_env(db_url: str | None = None) -> dict[str, str]:
    # this checkout first; the caller's own PYTHONPATH entries after it
    extra = os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), extra) if p)}
    if db_url is not None:
        env["NEXUS_DATABASE_URL"] = db_url
    return env


@functools.cache
def serve_options() -> tuple[str, ...]:
    """`--no-envoy` and `--no-mcp` where `nexus serve` has them: the gRPC server is what
    is measured (Envoy and the MCP adapter are processes of their own, started beside
    it, and every server's adapter would want the same default port)."""
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "serve", "--help"],
        capture_output=True, text=True, timeout=60, env=child_env(), check=True,
    )  # fmt: skip
    return tuple(o for o in ("--no-envoy", "--no-mcp") if o in done.stdout)


def nexus_cmd(app: Path, port: int, module: str = "nexus_server") -> list[str]:
    """`nexus serve APP` on `port`; `module` "bench._reference_reply" serves it with
    ExecuteWorkflow replaced by the reference that `BENCH_REFERENCE` in its environment
    names (the noop figures' reference rows)."""
    return [sys.executable, "-m", module, "serve", str(app), "--grpc-port", str(port),
            "--log-level", "warning", *serve_options()]  # fmt: skip


def bare_cmd(kind: str, port: int, db: Path | None = None, processes: int = 1) -> list[str]:
    """A bare baseline server; `processes` > 1 serves it from that many processes sharing
    the port (SO_REUSEPORT, grpc's default on Linux), children of the first."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", kind, "--port", str(port)]
    if processes > 1:
        cmd += ["--processes", str(processes)]
    return [*cmd, "--db", str(db)] if db is not None else cmd


def start(name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[Server, float]:
    """Start a server on the port in `cmd`; return it once health answers SERVING, and the
    seconds from just before the process was started."""
    port = int(cmd[cmd.index("--grpc-port" if "--grpc-port" in cmd else "--port") + 1])
    log = cwd / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}-{port}.log"
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, text=True, stdout=subprocess.DEVNULL, stderr=err
        )
    server = Server(name, proc, f"127.0.0.1:{port}", log)
    try:
        seconds = wait_healthy(server, t0, deadline=30.0)
    except BaseException:
        server.stop()
        raise
    SERVERS[server.address] = server
    return server, seconds


#: Every server started, by address (h2load's errors say how the server is doing).
SERVERS: dict[str, Server] = {}


def wait_healthy(server: Server, t0: float, deadline: float) -> float:
    """Poll until the server answers health SERVING; seconds since `t0`."""
    end = time.monotonic() + deadline
    host, port = server.address.split(":")
    # First the port (a refused connection would put the channel into reconnect backoff,
    # up to a second, which would then be measured), then the health service.
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} {server.state()}")
        try:
            socket.create_connection((host, int(port)), timeout=0.1).close()
            break
        except OSError:
            if time.monotonic() > end:
                raise TimeoutError(
                    f"{server.name}: port {port} closed after {deadline} s"
                ) from None
            time.sleep(0.002)
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{server.name}: not SERVING after {deadline} s")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=left)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - t0
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    raise
            time.sleep(0.002)


def call(
    address: str,
    method: str,
    body: bytes,
    timeout: float = 10.0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """One unary call with raw bytes in and out."""
    with grpc.insecure_channel(address) as channel:
        response: bytes = channel.unary_unary(method)(
            body, timeout=timeout, metadata=metadata or None
        )
        return response


# ---- load ------------------------------------------------------------------------------


@dataclasses.dataclass
class Load:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    data_bytes: int
    http_failed: int
    #: with --cpu: CPU µs per call of the server's event-loop thread, of its other
    #: threads, and the share of the machine left idle during the round
    cpu: tuple[float, float, float] | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def h2load(
    address: str,
    method: str,
    body: bytes,
    concurrency: int,
    n: int,
    timeout: float,
    headers: tuple[str, ...] = (),
    connections: int = 1,
) -> Load:
    """`n` gRPC calls of `method` with `body` over `connections` connections (one by
    default), `concurrency` streams in all, each with the extra `headers`
    ("name: value")."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "body"
        data.write_bytes(b"\x00" + len(body).to_bytes(4, "big") + body)  # gRPC framing
        log = Path(tmp) / "log"
        streams = max(1, concurrency // connections)
        cmd = ["h2load", "-n", str(n), "-c", str(connections), "-t", "1", "-m", str(streams),
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               *itertools.chain.from_iterable(("-H", h) for h in headers),
               "-d", str(data), "--log-file", str(log), f"http://{address}{method}"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        server = SERVERS.get(address)
        where = f"; the server is {server.state()}" if server else ""
        if done.returncode != 0:
            raise RuntimeError(
                f"h2load failed ({done.returncode}): {done.stdout}{done.stderr}{where}"
            )
        out = done.stdout
        finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
        reqs = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
        traffic = re.search(r"\((\d+)\) data", out)
        if not (finished and reqs and traffic):
            raise RuntimeError(f"cannot read h2load's output:\n{out}{where}")
        seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
        lat = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line)
    succeeded = int(reqs.group(3))
    return Load(
        requests=succeeded,
        seconds=seconds,
        p50_ms=lat[len(lat) // 2] / 1000,
        p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1000,
        data_bytes=int(traffic.group(1)),
        http_failed=n - succeeded,
    )


@dataclasses.dataclass
class Case:
    """One measured RPC: where, what, and how to tell that every call succeeded."""

    label: str
    address: str
    method: str
    body: bytes
    #: bytes of one response (fixed-size responses), or None
    response_size: int | None = None
    #: counts the successful calls so far (for writes), or None
    count: Callable[[], int] | None = None
    #: the serving process, for `--cpu` (set once the servers are up)
    pid: int = 0
    #: extra request headers ("name: value"), e.g. a credential
    headers: tuple[str, ...] = ()
    #: HTTP/2 connections the load is spread over (the concurrency is shared by them)
    connections: int = 1
    #: the least ratio to its baseline that meets the target (None: no target, a
    #: reference row)
    target: float | None = RATIO_TARGET


def requests_for(case: Case, concurrency: int, args: argparse.Namespace) -> int:
    """Requests for one round: what a short calibration run says fits in `args.seconds`,
    at least 200, at most `args.max_requests`."""
    calib = h2load(
        case.address, case.method, case.body, concurrency, 50 * concurrency, 60, case.headers,
        case.connections,
    )  # fmt: skip
    return int(min(args.max_requests, max(200, calib.rps * args.seconds)))


def one_round(case: Case, concurrency: int, n: int, args: argparse.Namespace) -> tuple[Load, int]:
    """One bounded round; returns the load and how many calls failed (gRPC errors
    included: rows not written, or response bytes missing)."""
    before = case.count() if case.count else 0
    cpu0 = cpu_times(case.pid) if args.cpu else None
    load = h2load(
        case.address, case.method, case.body, concurrency, n, args.seconds * 5 + 30,
        case.headers, case.connections,
    )  # fmt: skip
    if cpu0 is not None:
        (loop0, others0, busy0, all0), (loop1, others1, busy1, all1) = cpu0, cpu_times(case.pid)
        per_call = 1e6 / max(load.requests, 1)
        idle = 1 - (busy1 - busy0) / max(all1 - all0, 1e-9)
        load = dataclasses.replace(
            load, cpu=((loop1 - loop0) * per_call, (others1 - others0) * per_call, idle)
        )
    bad = load.http_failed
    if case.count is not None:
        bad += load.requests - (settled(case.count, before + load.requests) - before)
    elif case.response_size is not None:
        frame = case.response_size + 5
        bad += round((load.requests * frame - load.data_bytes) / frame)
    return load, bad


def settled(count: Callable[[], int], expected: int, limit: float = 5.0) -> int:
    """`count()` once it reaches `expected` and stops changing, or after `limit` seconds:
    execution records are written behind (a few milliseconds after each call returns, more
    on a busy machine), so the last ones may still be on their way; a round that left
    before they all arrived would see them counted in the next one."""
    deadline = time.monotonic() + limit
    last = count()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = count()
        if now == last and now >= expected:
            return now
        last = now
    return last


def _descendants(pid: int) -> list[int]:
    """`pid` and the processes it started, theirs, and so on (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def cpu_times(pid: int) -> tuple[float, float, float, float]:
    """Seconds of CPU used so far by process `pid`'s main thread (the event loop) and by
    its other threads (grpc's), then the machine's busy and total seconds (/proc/stat).
    The processes it started count too (`nexus serve --workers N`'s workers, and its
    Envoy): their main threads as loops, their other threads as others."""
    tick = os.sysconf("SC_CLK_TCK")
    loop = others = 0.0
    for proc in _descendants(pid):
        with contextlib.suppress(FileNotFoundError):
            tasks = list(Path(f"/proc/{proc}/task").iterdir())
            for task in tasks:
                try:
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                except FileNotFoundError:  # a thread that just ended
                    continue
                seconds = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
                if task.name == str(proc):
                    loop += seconds
                else:
                    others += seconds
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(jiffies) / tick
    return loop, others, total - (jiffies[3] + jiffies[4]) / tick, total


def measure(
    base_case: Case, case: Case, concurrency: int, args: argparse.Namespace
) -> tuple[tuple[Load, str], tuple[Load, str]]:
    """`measure_all` of a baseline and a case."""
    base, measured = measure_all((base_case, case), concurrency, args)
    return base, measured


def measure_all(
    cases: Sequence[Case], concurrency: int, args: argparse.Namespace
) -> list[tuple[Load, str]]:
    """The best round (by req/s) of each case, over `args.rounds` rounds that alternate
    between them, so that all see the same drift of a shared machine. Each figure comes
    with a note when calls failed.

    Why the best and why five: on these shared machines other tenants only ever slow a
    round down, and by a lot (one server's rounds spread by 15-27 % in one minute), so
    the best round is the closest to what the server can do; with three rounds one of
    the two servers often had no undisturbed round at all (docs/benchmarks.md)."""
    sizes = [requests_for(c, concurrency, args) for c in cases]
    best: list[Load | None] = [None] * len(cases)
    failed = [0] * len(cases)
    for _ in range(args.rounds):
        for i, c in enumerate(cases):
            load, bad = one_round(c, concurrency, sizes[i], args)
            failed[i] += bad
            current = best[i]
            if current is None or load.rps > current.rps:
                best[i] = load
    out = []
    for found, bad in zip(best, failed, strict=True):
        assert found is not None
        out.append((found, f"{bad} failed call(s)" if bad else ""))
    return out


def executions(db: Path, workflow: str) -> Callable[[], int]:
    def count() -> int:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            row = conn.execute(
                "SELECT count(*) FROM nexus_executions WHERE workflow = ? AND state = 'SUCCEEDED'",
                (workflow,),
            ).fetchone()
            return int(row[0])

    return count


def rows(db: Path, table: str) -> Callable[[], int]:
    def count() -> int:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

    return count


def print_request_ids(base: str, this: str, where: str, args: argparse.Namespace) -> None:
    """ExecuteWorkflow create_contact with a unique request_id per call (durable before
    the reply), this checkout against `where`, alternating rounds. h2load sends one body
    for every request, so these calls come from a grpc.aio client process
    (`--drive`), which costs about as much CPU as the server: compare the two servers
    with each other, not with the table above."""
    print(
        f"\nExecuteWorkflow create_contact with a request_id per call (grpc.aio client "
        f"process; best of {args.rounds} alternating round(s) of {args.seconds:g} s)"
    )
    header = f"{'case':<40} {'conc':>4} {'req/s':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for conc in (1, 16):
        best = {base: 0.0, this: 0.0}
        for r in range(args.rounds):
            for address in (base, this):
                best[address] = max(best[address], drive(address, conc, args.seconds, r))
        print(f"{'create_contact served from ' + where:<40} {conc:>4} {best[base]:>9,.0f}")
        print(
            f"{'create_contact (this checkout)':<40} {conc:>4} {best[this]:>9,.0f} "
            f"{best[this] / best[base]:>6.2f}",
            flush=True,
        )


def drive(address: str, concurrency: int, seconds: float, round_: int) -> float:
    """Calls per second of a `--drive` client process (bounded by `seconds` and a
    timeout); every call must succeed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--drive", address,
           "--concurrency", str(concurrency), "--seconds", str(seconds),
           "--tag", f"{uuid.uuid4().hex[:8]}-{round_}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 5 + 30)
    if done.returncode != 0:
        raise RuntimeError(f"the client failed: {done.stderr[-2000:]}")
    calls, spent = json.loads(done.stdout)
    return float(calls) / float(spent)


async def drive_calls(address: str, concurrency: int, seconds: float, tag: str) -> None:
    """`--drive`: `concurrency` workers calling create_contact, each call with a request_id
    of its own, for `seconds`; prints [calls, seconds] as JSON."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(EXECUTE)
        counter = itertools.count()
        stop = time.perf_counter() + seconds
        done = 0

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                i = next(counter)
                req = wf_pb2.ExecuteWorkflowRequest(name="create_contact", request_id=f"{tag}-{i}")
                req.inputs.update({"name": f"P {i}", "email": f"p{i}@example.org"})
                reply = wf_pb2.Execution.FromString(await call(req.SerializeToString(), timeout=30))
                assert reply.state == wf_pb2.Execution.STATE_SUCCEEDED, reply
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        print(json.dumps([done, time.perf_counter() - started]))


def execute_body(workflow: str, inputs: dict[str, Any] | None = None) -> bytes:
    req = wf_pb2.ExecuteWorkflowRequest(name=workflow)
    req.inputs.update(inputs or {})
    body: bytes = req.SerializeToString()
    return body


def get_contact_body(contact_id: str) -> bytes:
    # GetContactRequest {string id = 1}: the typed message, encoded by hand (it exists only
    # in the server's runtime descriptors and the exported .proto)
    raw = contact_id.encode()
    return b"\x0a" + bytes([len(raw)]) + raw


def run_load(args: argparse.Namespace, tmp: Path) -> list[str]:
    """The throughput table; returns the missed targets."""
    driver_db = tmp / "driver.db"
    make_driver_db(driver_db)
    nexus_db = tmp / "nexus.db"
    servers: list[Server] = []
    try:
        echo, _ = start("echo", bare_cmd("echo", free_port()), child_env(), tmp)
        servers.append(echo)
        driver, _ = start("driver", bare_cmd("driver", free_port(), driver_db), child_env(), tmp)
        servers.append(driver)
        app = write_app(tmp, 1)
        nexus_env = child_env(f"sqlite:///{nexus_db}")
        nexus, _ = start("nexus", nexus_cmd(app, free_port()), nexus_env, tmp)
        servers.append(nexus)
        references: dict[str, Server] = {}
        for reference in ("constant", "record"):
            reference_env = {
                **child_env(f"sqlite:///{tmp / f'{reference}.db'}"),
                "BENCH_REFERENCE": reference,
            }
            reference_cmd = nexus_cmd(app, free_port(), "bench._reference_reply")
            references[reference], _ = start(reference, reference_cmd, reference_env, tmp)
            servers.append(references[reference])
        constant, record = references["constant"], references["record"]
        other: Server | None = None
        if args.against:
            other_db = tmp / "other.db"
            other_env = {**child_env(f"sqlite:///{other_db}"), "PYTHONPATH": args.against}
            other, _ = start("other", nexus_cmd(app, free_port()), other_env, tmp)
            servers.append(other)

        # seed both databases with the same 100 contacts; read the 50th back in the load
        nexus_ids, driver_ids = [], []
        for i in range(100):
            person = {"name": f"Person {i}", "email": f"p{i}@example.org"}
            out = wf_pb2.Execution.FromString(
                call(nexus.address, EXECUTE, execute_body("create_contact", person))
            )
            nexus_ids.append(out.outputs["create"]["id"])
            if other is not None:  # the same contacts: its list pair reads the same page
                call(other.address, EXECUTE, execute_body("create_contact", person))
            row = json.loads(call(driver.address, DRIVER_CREATE, json.dumps(person).encode()))
            driver_ids.append(row[0])
        get_body = get_contact_body(nexus_ids[50])
        contact = call(nexus.address, GET_CONTACT, get_body)
        driver_row = call(driver.address, DRIVER_GET, driver_ids[50].encode())
        driver_list = call(driver.address, DRIVER_LIST, b"page")
        listed = wf_pb2.Execution.FromString(
            call(nexus.address, EXECUTE, execute_body("list_contacts"))
        )
        assert len(listed.outputs["list"]["records"]) == 10, listed
        noop = wf_pb2.Execution.FromString(call(nexus.address, EXECUTE, execute_body("noop")))
        assert noop.state == wf_pb2.Execution.STATE_SUCCEEDED, noop
        echo_body = execute_body("noop")
        constant_reply = call(constant.address, EXECUTE, echo_body)  # run once, for real
        assert wf_pb2.Execution.FromString(constant_reply).outputs == noop.outputs
        record_reply = call(record.address, EXECUTE, echo_body)  # the first runs for real
        assert wf_pb2.Execution.FromString(record_reply).outputs == noop.outputs
        load_person = {"name": "Load Test", "email": "load@example.org"}

        # each entry: the baseline, the case judged against it, then reference rows
        pairs: list[tuple[Case, ...]] = [
            (
                Case("bare echo (raw bytes)", echo.address, ECHO, echo_body, len(echo_body)),
                Case("ExecuteWorkflow noop", nexus.address, EXECUTE, echo_body,
                     count=executions(nexus_db, "noop"), target=NOOP_TARGET),
                # the ceiling: the same server with the execution replaced (no
                # workflow run, no record), so gRPC and the gateway chain alone
                Case("  same, constant reply", constant.address, EXECUTE, echo_body,
                     len(constant_reply), target=None),
                # the floor of recording: a record made, written and answered, nothing
                # else (no inputs checked, no workflow run, no events)
                Case("  same, record only", record.address, EXECUTE, echo_body,
                     count=executions(tmp / "record.db", "noop"), target=None),
            ),
            (
                Case("bare aiosqlite SELECT by id", driver.address, DRIVER_GET,
                     driver_ids[50].encode(), len(driver_row)),
                Case("ContactService/GetContact", nexus.address, GET_CONTACT, get_body,
                     len(contact)),
            ),
            (  # before the create load: both tables hold the same 100 contacts
                Case("bare aiosqlite List 10", driver.address, DRIVER_LIST, b"page",
                     len(driver_list)),
                Case("ExecuteWorkflow list_contacts", nexus.address, EXECUTE,
                     execute_body("list_contacts"),
                     count=executions(nexus_db, "list_contacts")),
            ),
            (
                Case("bare aiosqlite INSERT+COMMIT", driver.address, DRIVER_CREATE,
                     json.dumps(load_person).encode(),
                     count=rows(driver_db, "raw_contact")),
                Case("ExecuteWorkflow create_contact", nexus.address, EXECUTE,
                     execute_body("create_contact", load_person),
                     count=executions(nexus_db, "create_contact")),
            ),
        ]  # fmt: skip
        if other is not None:
            assert args.against is not None
            where = Path(args.against).name
            pairs.insert(3, (  # before the create load, which grows both tables
                Case(f"list_contacts served from {where}", other.address, EXECUTE,
                     execute_body("list_contacts"),
                     count=executions(tmp / "other.db", "list_contacts")),
                Case("ExecuteWorkflow list_contacts", nexus.address, EXECUTE,
                     execute_body("list_contacts"),
                     count=executions(nexus_db, "list_contacts"), target=None),
            ))  # fmt: skip
            pairs.append((
                Case(f"noop served from {where}", other.address, EXECUTE,
                     echo_body, count=executions(tmp / "other.db", "noop")),
                Case("ExecuteWorkflow noop", nexus.address, EXECUTE, echo_body,
                     count=executions(nexus_db, "noop"), target=None),
            ))  # fmt: skip
            pairs.append((
                Case(f"create_contact served from {where}", other.address, EXECUTE,
                     execute_body("create_contact", load_person),
                     count=executions(tmp / "other.db", "create_contact")),
                Case("ExecuteWorkflow create_contact", nexus.address, EXECUTE,
                     execute_body("create_contact", load_person),
                     count=executions(nexus_db, "create_contact"), target=None),
            ))  # fmt: skip
        pids = {s.address: s.proc.pid for s in servers}
        for pair in pairs:
            for c in pair:
                c.pid = pids[c.address]
        missed = []
        print(
            f"\nThroughput and latency (h2load, 1 HTTP/2 connection; best of {args.rounds} "
            f"alternating round(s) of up to {args.seconds:g} s each)"
        )
        header = (
            f"{'case':<32} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
            f" {'ratio':>6}  target"
        )
        print(header)
        print("-" * len(header))
        for base_case, *cases in pairs:
            for conc in CONCURRENCY:
                results = measure_all((base_case, *cases), conc, args)
                (base, base_note), *loads = results
                print(
                    f"{base_case.label:<32} {conc:>4} {base.rps:>9,.0f} {base.p50_ms:>8.2f}"
                    f" {base.p99_ms:>8.2f} {'':>6}  (baseline)"
                    f"{'  ' + base_note if base_note else ''}"
                )
                for case, (load, note) in zip(cases, loads, strict=True):
                    ratio = load.rps / base.rps
                    if case.target is None:
                        # a reference row, or a comparison with another checkout (its
                        # ratio is the change)
                        verdict = "(vs that checkout)" if " served from " in base_case.label else ""
                    else:
                        verdict = f"{'ok' if ratio >= case.target else 'MISSED'} ({case.target:g})"
                        if ratio < case.target:
                            missed.append(f"{case.label} at concurrency {conc}: {ratio:.2f}")
                    print(
                        f"{case.label:<32} {conc:>4} {load.rps:>9,.0f} {load.p50_ms:>8.2f}"
                        f" {load.p99_ms:>8.2f} {ratio:>6.2f}  {verdict}"
                        f"{'  ' + note if note else ''}",
                        flush=True,
                    )
                if args.cpu:
                    figures = []
                    for c, (ld, _) in zip((base_case, *cases), results, strict=True):
                        assert ld.cpu is not None
                        loop, others, idle = ld.cpu
                        figures.append(
                            f"{c.label.strip()}: loop {loop:.0f} µs, other threads "
                            f"{others:.0f} µs, machine {idle:.0%} idle"
                        )
                    print(f"{'':<32} {'':>4}  CPU per call: " + "; ".join(figures))
            print()
        if other is not None:
            assert args.against is not None
            print_request_ids(other.address, nexus.address, Path(args.against).name, args)
        rss = {s.name: s.vm("VmHWM") for s in servers}
        print(
            "peak RSS after the load: "
            + ", ".join(f"{name} {mb:.0f} MB" for name, mb in rss.items())
        )
        return missed
    finally:
        for s in servers:
            s.stop()


#: Metrics on may cost at most this fraction of the throughput with them off.
METRICS_COST_TARGET = 0.05


def run_metrics(args: argparse.Namespace, tmp: Path) -> list[str]:
    """ExecuteWorkflow with Prometheus metrics on against off (the same app file, two
    servers, alternating rounds); returns the missed targets."""
    app = write_app(tmp, 1, monitoring=True)
    servers: list[Server] = []
    try:
        off_db, on_db = tmp / "metrics-off.db", tmp / "metrics-on.db"
        # two servers at once: neither runs an MCP adapter (both would take its port)
        off_cmd = [*nexus_cmd(app, free_port()), "--no-mcp"]
        off, _ = start("metrics off", off_cmd, child_env(f"sqlite:///{off_db}"), tmp)
        servers.append(off)
        # --metrics-control: the second server has metrics off too (an A/A run: the
        # ratios it prints are the bench's own bias and noise on this machine)
        on_env = {
            **child_env(f"sqlite:///{on_db}"),
            "BENCH_MONITORING": "0" if args.metrics_control else "1",
        }
        on_label = "metrics off (control)" if args.metrics_control else "metrics on"
        on, _ = start("metrics on", [*nexus_cmd(app, free_port()), "--no-mcp"], on_env, tmp)
        servers.append(on)
        person = {"name": "Load Test", "email": "load@example.org"}
        noop, create = execute_body("noop"), execute_body("create_contact", person)
        pairs = [
            (
                Case("noop, metrics off", off.address, EXECUTE, noop,
                     count=executions(off_db, "noop")),
                Case(f"noop, {on_label}", on.address, EXECUTE, noop,
                     count=executions(on_db, "noop")),
            ),
            (
                Case("create_contact, metrics off", off.address, EXECUTE, create,
                     count=executions(off_db, "create_contact")),
                Case(f"create_contact, {on_label}", on.address, EXECUTE, create,
                     count=executions(on_db, "create_contact")),
            ),
        ]  # fmt: skip
        for pair in pairs:
            for c in pair:
                c.pid = off.proc.pid if c.address == off.address else on.proc.pid
        print(
            f"\nMetrics (enable_monitoring=True) against off: ExecuteWorkflow, best of "
            f"{args.rounds} alternating round(s) of up to {args.seconds:g} s each"
        )
        header = f"{'case':<32} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}"
        print(header)
        print("-" * len(header))
        missed = []
        for base_case, case in pairs:
            for conc in CONCURRENCY:
                (base, base_note), (load, note) = measure(base_case, case, conc, args)
                ratio = load.rps / base.rps
                for c, m, r, n in ((base_case, base, "", base_note), (case, load, ratio, note)):
                    shown = f"{r:>6.2f}" if r else f"{'':>6}"
                    print(
                        f"{c.label:<32} {conc:>4} {m.rps:>9,.0f} {m.p50_ms:>8.2f}"
                        f" {m.p99_ms:>8.2f} {shown}{'  ' + n if n else ''}",
                        flush=True,
                    )
                if args.cpu:
                    # CPU time per call: what the shared machine's noise moves least
                    assert base.cpu is not None and load.cpu is not None
                    off_us, on_us = sum(base.cpu[:2]), sum(load.cpu[:2])
                    cost = on_us / off_us - 1
                    print(
                        f"{'':<32} {'':>4}  server CPU per call: off {off_us:.0f} µs, "
                        f"on {on_us:.0f} µs ({cost:+.1%})"
                    )
                    if cost > METRICS_COST_TARGET:
                        missed.append(f"{case.label} at concurrency {conc}: {cost:+.1%} CPU")
                elif ratio < 1 - METRICS_COST_TARGET:
                    missed.append(f"{case.label} at concurrency {conc}: {ratio:.2f} of off")
            print()
        per_call = observation_cost()
        print(
            f"what monitoring adds to one ExecuteWorkflow call of a one-node workflow, "
            f"measured in this process: {per_call:.1f} µs"
        )
        # the scrape itself: what the metrics port answers after the load
        port = _metrics_port(on)
        if port is not None:
            t0 = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
                size = sum(len(chunk) for chunk in iter(lambda: sock.recv(65536), b""))
            took = (time.perf_counter() - t0) * 1e3
            print(f"one scrape of /metrics: {size:,} bytes in {took:.1f} ms")
        return missed
    finally:
        for s in servers:
            s.stop()


def observation_cost(calls: int = 100_000, repeats: int = 5) -> float:
    """CPU microseconds that monitoring adds to one ExecuteWorkflow call of a one-node
    workflow: the chain's observation (in-flight gauge, histogram, counter) and the
    execution's (running gauge, counter, histogram, one node histogram), in a loop,
    timed in thread CPU time (the best of `repeats`): a figure the shared machine's
    noise barely moves, unlike the throughput ratio."""
    metrics_mod = importlib.import_module("nexus_server.gateway._metrics")
    metrics = metrics_mod.Metrics()
    method = metrics.for_method(EXECUTE)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(calls):
            started = time.perf_counter()
            method.in_flight.inc()
            metrics.execution_started("noop")
            metrics.node_ended("noop", "BenchNoop", "completed", 0.0001)
            metrics.execution_ended("noop", "SUCCEEDED", 0.0002)
            method.in_flight.dec()
            method.ended("grpc", "OK", time.perf_counter() - started)
        best = min(best, (time.thread_time() - t0) / calls * 1e6)
    return best


def _metrics_port(server: Server) -> int | None:
    """The metrics port the server listens on besides its gRPC port (from /proc)."""
    grpc_port = int(server.address.rsplit(":", 1)[1])
    ports = set()
    for fd in Path(f"/proc/{server.proc.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                ports.add(link[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in ports:  # LISTEN
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if port != grpc_port:
                return port
    return None


# ---- every core: nexus serve --workers N (issue 18) --------------------------------------

#: `--workers 2` against `--workers 1`, and against the bare echo server (straight to the
#: gRPC port), on this machine.
WORKERS_TARGET = 1.5
WORKERS_ECHO_TARGET = 1.0
WORKERS_CONCURRENCY = 64
WORKERS_CONNECTIONS = 16
PG_URL = os.environ.get("NEXUS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def pg_admin(sql: str) -> None:
    asyncpg: Any = importlib.import_module("asyncpg")

    async def run() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def pg_executions(url: str, workflow: str) -> Callable[[], int]:
    """Counts the SUCCEEDED executions of `workflow` in the PostgreSQL database `url`."""
    asyncpg: Any = importlib.import_module("asyncpg")

    async def run() -> int:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM nexus_executions WHERE workflow = $1 "
                    "AND state = 'SUCCEEDED'",
                    workflow,
                )
            )
        finally:
            await conn.close()

    return lambda: asyncio.run(run())


def workers_cmd(app: Path, workers: int, grpc_port: int, api_port: int) -> list[str]:
    return [sys.executable, "-m", "nexus_server", "serve", str(app), "--workers", str(workers),
            "--grpc-port", str(grpc_port), "--api-port", str(api_port), "--no-mcp",
            "--log-level", "warning"]  # fmt: skip


def print_workers_bound(two: Load, echo_rps: float) -> None:
    """With `--cpu`: the calls/s the `--workers 2` round's CPU per call allows on this
    machine (every process's CPU, h2load's and PostgreSQL's included, so the machine's
    busy share): its calls/s / (1 - idle), and that against the echo server."""
    assert two.cpu is not None
    full = two.rps / max(1 - two.cpu[2], 1e-9)
    print(
        f"{'':<40}   at this CPU per call, the machine with no CPU idle serves "
        f"{full:,.0f} calls/s: {full / echo_rps:.2f}x echo"
    )


def run_workers(args: argparse.Namespace, tmp: Path) -> list[str]:
    """ExecuteWorkflow on PostgreSQL served by `--workers 2` and `--workers 1` (each with
    its Envoy), beside the bare echo server, at concurrency 64 over 16 connections;
    returns the missed targets."""
    try:
        pg_admin("SELECT 1")
    except Exception as exc:
        print(f"\nworkers table skipped: PostgreSQL at {PG_URL} unreachable ({exc})")
        return []
    app = write_app(tmp, 1)
    base = PG_URL.rpartition("/")[0]
    names = {n: f"nexus_bench_w{n}_{secrets.token_hex(4)}" for n in (1, 2)}
    servers: list[Server] = []
    try:
        echo, _ = start("echo", bare_cmd("echo", free_port()), child_env(), tmp)
        servers.append(echo)
        # what a second core gives the bare server itself on this machine
        echo2, _ = start("echo x2", bare_cmd("echo", free_port(), processes=2), child_env(), tmp)
        servers.append(echo2)
        nexus: dict[int, tuple[Server, str, str]] = {}
        for n, name in names.items():
            pg_admin(f'CREATE DATABASE "{name}"')
            url = f"{base}/{name}"
            api = f"127.0.0.1:{free_port()}"
            cmd = workers_cmd(app, n, free_port(), int(api.rsplit(":", 1)[1]))
            server, _ = start(f"workers {n}", cmd, child_env(url), tmp)
            servers.append(server)
            # the gRPC port answers first; Envoy is started once the workers are up
            wait_healthy(Server(f"workers {n} Envoy", server.proc, api), 0.0, 60.0)
            nexus[n] = (server, api, url)
        person = {"name": "Load Test", "email": "load@example.org"}
        bodies = {"noop": execute_body("noop"), "create_contact": execute_body(
            "create_contact", person)}  # fmt: skip
        for server, api, _ in nexus.values():
            for body in bodies.values():  # every path answers before it is measured
                for address in (server.address, api):
                    reply = wf_pb2.Execution.FromString(call(address, EXECUTE, body))
                    assert reply.state == wf_pb2.Execution.STATE_SUCCEEDED, reply
        echo_case = Case("bare grpc.aio echo, 1 process", echo.address, ECHO, bodies["noop"],
                         len(bodies["noop"]), connections=WORKERS_CONNECTIONS)  # fmt: skip
        echo_case.pid = echo.proc.pid
        echo2_case = Case("bare grpc.aio echo, 2 processes", echo2.address, ECHO,
                          bodies["noop"], len(bodies["noop"]),
                          connections=WORKERS_CONNECTIONS)  # fmt: skip
        echo2_case.pid = echo2.proc.pid
        print(
            f"\nEvery core: --workers 2 against --workers 1 (PostgreSQL; concurrency "
            f"{WORKERS_CONCURRENCY} over {WORKERS_CONNECTIONS} connections; best of "
            f"{args.rounds} alternating round(s) of up to {args.seconds:g} s each; "
            f"{os.cpu_count()} CPUs shared with h2load, Envoy and PostgreSQL)"
        )
        header = f"{'case':<40} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs 1':>6} {'vs echo':>8}"
        print(header)
        print("-" * len(header))
        missed = []
        for workflow, body in bodies.items():
            for path in ("direct", "Envoy"):
                cases = [echo_case, echo2_case] if path == "direct" else []
                for n, (server, api, url) in nexus.items():
                    case = Case(f"{workflow}, --workers {n}, {path}",
                                server.address if path == "direct" else api, EXECUTE, body,
                                count=pg_executions(url, workflow),
                                connections=WORKERS_CONNECTIONS)  # fmt: skip
                    case.pid = server.proc.pid
                    cases.append(case)
                results = measure_all(cases, WORKERS_CONCURRENCY, args)
                echo_rps = results[0][0].rps if path == "direct" else None
                one = results[-2][0].rps
                for c, (load, note) in zip(cases, results, strict=True):
                    # "vs 1": two processes against one of the same server
                    vs_one, vs_echo = f"{'':>6}", f"{'':>8}"
                    if c is echo2_case and echo_rps:
                        vs_one = f"{load.rps / echo_rps:>6.2f}"
                    elif "--workers 2" in c.label:
                        vs_one = f"{load.rps / one:>6.2f}"
                    if echo_rps and c is not echo_case and c is not echo2_case:
                        vs_echo = f"{load.rps / echo_rps:>8.2f}"
                    print(
                        f"{c.label:<40} {load.rps:>9,.0f} {load.p50_ms:>8.2f} {load.p99_ms:>8.2f}"
                        f" {vs_one} {vs_echo}{'  ' + note if note else ''}",
                        flush=True,
                    )
                    if load.cpu is not None:  # --cpu: the server's processes, Envoy's too
                        loop_us, other_us, idle = load.cpu
                        print(
                            f"{'':<40}   CPU per call {loop_us + other_us:,.0f} µs (main "
                            f"threads {loop_us:,.0f}), machine {idle:.0%} idle"
                        )
                two = results[-1][0].rps
                if echo_rps and results[-1][0].cpu is not None:
                    print_workers_bound(results[-1][0], echo_rps)
                if two / one < WORKERS_TARGET:
                    missed.append(f"{workflow} {path}: --workers 2 at {two / one:.2f}x of 1")
                if echo_rps and two / echo_rps < WORKERS_ECHO_TARGET:
                    missed.append(f"{workflow} {path}: --workers 2 at {two / echo_rps:.2f}x echo")
            print()
        return missed
    finally:
        for s in servers:
            s.stop()
        for name in names.values():
            with contextlib.suppress(Exception):
                pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---- the cost of authentication (issue 16) ----------------------------------------------

TABLE_HEADER = (
    f"{'case':<32} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}  target"
)

#: Authentication may cost at most 10 % of the calls per second at concurrency 16.
AUTH_TARGET = 0.9
AUTH_TARGET_CONCURRENCY = 16
CONTROL = "auth off, 2nd server (control)"
PRINCIPAL = "/nexus.auth.v1.AuthService/GetPrincipal"
CREATE_KEY = "/nexus.auth.v1.AuthService/CreateApiKey"
#: Variables of the caller's environment that would add or change a credential source.
_AUTH_ENV = ("NEXUS_API_KEY", "NEXUS_JWT_", "NEXUS_JWKS_", "NEXUS_ENV", "NEXUS_TOKEN")


@dataclasses.dataclass(frozen=True)
class Credential:
    """One way of sending a credential in the auth section."""

    label: str
    #: the request header ("name: value"), or None for no credential
    header: str | None
    #: the principal the server must see (GetPrincipal's id)
    principal: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.header is None:
            return ()
        name, _, value = self.header.partition(": ")
        return ((name, value),)


def auth_env(db_url: str, *, on: bool, api_key: str, jwt_secret: str) -> dict[str, str]:
    """A server's environment: authentication on (an env API key `bench` and an HS256
    secret) or off; none of the caller's own credential variables."""
    env = {k: v for k, v in child_env(db_url).items() if not k.startswith(_AUTH_ENV)}
    if on:
        env |= {"BENCH_AUTH": "1", "NEXUS_API_KEY_BENCH": api_key, "NEXUS_JWT_SECRET": jwt_secret}
    return env


def principal_of(address: str, credential: Credential) -> str:
    """GetPrincipal's id for `credential` (proof that the server authenticated it)."""
    auth_pb2: Any = importlib.import_module("nexus_api.nexus.auth.v1.auth_service_pb2")
    reply = call(address, PRINCIPAL, b"", metadata=credential.metadata())
    return str(auth_pb2.Principal.FromString(reply).id)


def managed_key(address: str, admin: Credential) -> str:
    """A managed key (`nxk_...`, role `bench`) created through AuthService/CreateApiKey
    with the `admin` credential."""
    auth_pb2: Any = importlib.import_module("nexus_api.nexus.auth.v1.auth_service_pb2")
    request = auth_pb2.CreateApiKeyRequest(name="bench_managed", roles=["bench"])
    reply = call(address, CREATE_KEY, request.SerializeToString(), metadata=admin.metadata())
    return str(auth_pb2.CreateApiKeyResponse.FromString(reply).key)


def check_refused(address: str) -> None:
    """With authentication on, noop without a credential must be UNAUTHENTICATED (else
    the figures of the auth-on server would measure nothing)."""
    try:
        call(address, EXECUTE, execute_body("noop"))
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            return
        raise RuntimeError(
            f"noop without a credential: {exc.code()}, not UNAUTHENTICATED"
        ) from None
    raise RuntimeError("noop without a credential succeeded on the auth-on server")


def run_auth(args: argparse.Namespace, tmp: Path) -> list[str]:
    """ExecuteWorkflow noop served with authentication off and on, in the same run: with
    it on, an env API key (`x-api-key`), an HS256 JWT (`authorization: Bearer`) and a
    managed key (one database read per call); each figure's ratio to auth off. Then the
    admission of one call timed in process (`bench/_auth_cost.py`). Returns the missed
    targets."""
    jwt: Any = importlib.import_module("jwt")
    api_key = secrets.token_urlsafe(32)
    jwt_secret = secrets.token_urlsafe(48)
    now = int(time.time())
    token = jwt.encode(
        # valid for the whole run: the server remembers a verified token until its exp
        {"sub": "bench", "roles": ["bench"], "iat": now, "exp": now + 6 * 3600},
        jwt_secret,
        algorithm="HS256",
    )
    app = write_app(tmp, 1, auth=True)
    off_db, on_db, control_db = tmp / "auth_off.db", tmp / "auth_on.db", tmp / "control.db"
    keys = {"api_key": api_key, "jwt_secret": jwt_secret}
    servers: list[Server] = []
    try:
        off, _ = start("auth off", nexus_cmd(app, free_port()),
                       auth_env(f"sqlite:///{off_db}", on=False, **keys), tmp)  # fmt: skip
        servers.append(off)
        # a second auth-off server, measured last in each round: its ratio to the first is
        # the noise of this run between two processes that do the same thing
        control, _ = start("control", nexus_cmd(app, free_port()),
                           auth_env(f"sqlite:///{control_db}", on=False, **keys), tmp)  # fmt: skip
        servers.append(control)
        on, _ = start("auth on", nexus_cmd(app, free_port()),
                      auth_env(f"sqlite:///{on_db}", on=True, **keys), tmp)  # fmt: skip
        servers.append(on)
        check_refused(on.address)
        env_key = Credential("auth on, env API key", f"x-api-key: {api_key}", "key:bench")
        credentials = [
            (off, Credential("auth off", None, "anonymous")),
            (on, env_key),
            (on, Credential("auth on, JWT HS256", f"authorization: Bearer {token}", "jwt:bench")),
        ]
        try:
            key = managed_key(on.address, env_key)
        except grpc.RpcError as exc:
            print(f"\n(no managed key: CreateApiKey answered {exc.code()}; that case is left out)")
        else:
            credentials.append(
                (on, Credential("auth on, managed key (DB)", f"x-api-key: {key}",
                                "key:bench_managed"))
            )  # fmt: skip
        credentials.append((control, Credential(CONTROL, None, "anonymous")))
        body = execute_body("noop")
        cases = []
        for server, credential in credentials:
            seen = principal_of(server.address, credential)
            if seen != credential.principal:
                raise RuntimeError(
                    f"{credential.label}: the server sees {seen!r}, not {credential.principal!r}"
                )
            reply = wf_pb2.Execution.FromString(
                call(server.address, EXECUTE, body, metadata=credential.metadata())
            )
            assert reply.state == wf_pb2.Execution.STATE_SUCCEEDED, reply
            db = {off.address: off_db, control.address: control_db}.get(server.address, on_db)
            cases.append(
                Case(credential.label, server.address, EXECUTE, body,
                     count=executions(db, "noop"), pid=server.proc.pid,
                     headers=(credential.header,) if credential.header else ())
            )  # fmt: skip
        missed = print_auth_table(cases, args)
    finally:
        for s in servers:
            s.stop()
    # where the difference is: the chain's admission of one call, timed in process
    auth_cost: Any = importlib.import_module("bench._auth_cost")
    auth_cost.print_costs(asyncio.run(auth_cost.admission_costs()))
    return missed


def print_auth_table(cases: list[Case], args: argparse.Namespace) -> list[str]:
    """The auth section's table (the first case is auth off, the last another auth-off
    server, as a control); returns the missed targets."""
    print(
        "\nThe cost of authentication: ExecuteWorkflow noop (h2load, 1 HTTP/2 connection; "
        f"best of {args.rounds} alternating round(s) of up to {args.seconds:g} s each; "
        f"target: ratio >= {AUTH_TARGET:g} at concurrency {AUTH_TARGET_CONCURRENCY})"
    )
    print(TABLE_HEADER)
    print("-" * len(TABLE_HEADER))
    missed = []
    for conc in CONCURRENCY:
        results = measure_all(cases, conc, args)
        base = results[0][0]
        for case, (load, note) in zip(cases, results, strict=True):
            if case is cases[0]:
                ratio_text, verdict = "", "(baseline)"
            else:
                ratio = load.rps / base.rps
                ratio_text = f"{ratio:.2f}"
                verdict = ""
                if case.label == CONTROL:
                    verdict = "(the noise: same code)"
                elif conc == AUTH_TARGET_CONCURRENCY:
                    verdict = "ok" if ratio >= AUTH_TARGET else "MISSED"
                    if ratio < AUTH_TARGET:
                        missed.append(f"{case.label} at concurrency {conc}: {ratio:.2f}")
            print(
                f"{case.label:<32} {conc:>4} {load.rps:>9,.0f} {load.p50_ms:>8.2f}"
                f" {load.p99_ms:>8.2f} {ratio_text:>6}  {verdict}"
                f"{'  ' + note if note else ''}",
                flush=True,
            )
            if args.cpu:
                assert load.cpu is not None
                loop, others, idle = load.cpu
                print(
                    f"{'':<32} {'':>4}  CPU per call: loop {loop:.0f} µs, other threads "
                    f"{others:.0f} µs, machine {idle:.0%} idle"
                )
        print()
    return missed


#: The packages `nexus serve` imports from this checkout.
PACKAGES = ("nexus_server", "dataflow", "workflow", "nexus_api", "clients")


#: Tracing with 1 % of calls sampled may cost at most this share of throughput.
TRACING_TARGET = 0.90


def run_tracing(args: argparse.Namespace, tmp: Path) -> list[str]:
    """ExecuteWorkflow with tracing on (1 % of calls sampled, spans batched to the
    console exporter, whose output goes nowhere) against the same app with tracing off,
    both served in this run; returns the missed targets."""
    try:
        importlib.import_module("opentelemetry.sdk.trace")
    except ImportError:
        print("\nTracing: skipped (the OpenTelemetry SDK is not installed)")
        return []
    app = write_app(tmp, 1)
    servers: list[Server] = []
    missed = []
    try:
        off_db, on_db = tmp / "tracing-off.db", tmp / "tracing-on.db"
        off_env = child_env(f"sqlite:///{off_db}")
        on_env = {
            **child_env(f"sqlite:///{on_db}"),
            # extra entries of this process's path too: where the SDK may be
            "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path[1:]]),
            "OTEL_TRACES_EXPORTER": "console",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
        }
        # two servers at once: neither may take the default MCP port
        off, _ = start("tracing off", [*nexus_cmd(app, free_port()), "--no-mcp"], off_env, tmp)
        servers.append(off)
        on, _ = start("tracing 1 %", [*nexus_cmd(app, free_port()), "--no-mcp"], on_env, tmp)
        servers.append(on)
        person = {"name": "Load Test", "email": "load@example.org"}
        pairs = [
            (
                Case("noop, tracing off", off.address, EXECUTE, execute_body("noop"),
                     count=executions(off_db, "noop")),
                Case("noop, tracing 1 %", on.address, EXECUTE, execute_body("noop"),
                     count=executions(on_db, "noop")),
            ),
            (
                Case("create_contact, tracing off", off.address, EXECUTE,
                     execute_body("create_contact", person),
                     count=executions(off_db, "create_contact")),
                Case("create_contact, tracing 1 %", on.address, EXECUTE,
                     execute_body("create_contact", person),
                     count=executions(on_db, "create_contact")),
            ),
        ]  # fmt: skip
        for pair in pairs:
            for c in pair:
                c.pid = off.proc.pid if c.address == off.address else on.proc.pid
        print(
            f"\nTracing: ExecuteWorkflow with tracing at 1 % sampling vs off (best of "
            f"{args.rounds} alternating round(s); target ratio >= {TRACING_TARGET:.2f})"
        )
        header = f"{'case':<32} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}"
        print(header)
        print("-" * len(header))
        for base_case, case in pairs:
            for conc in CONCURRENCY:
                (base, base_note), (load, note) = measure(base_case, case, conc, args)
                ratio = load.rps / base.rps
                ok = ratio >= TRACING_TARGET
                print(
                    f"{base_case.label:<32} {conc:>4} {base.rps:>9,.0f} {base.p50_ms:>8.2f}"
                    f" {base.p99_ms:>8.2f} {'':>6}{'  ' + base_note if base_note else ''}"
                )
                print(
                    f"{case.label:<32} {conc:>4} {load.rps:>9,.0f} {load.p50_ms:>8.2f}"
                    f" {load.p99_ms:>8.2f} {ratio:>6.2f}  {'ok' if ok else 'MISSED'}"
                    f"{'  ' + note if note else ''}",
                    flush=True,
                )
                if not ok:
                    missed.append(f"{case.label} at concurrency {conc}: {ratio:.2f}")
        return missed
    finally:
        for s in servers:
            s.stop()


def run_startup(args: argparse.Namespace, tmp: Path) -> list[str]:
    """Start-to-health with `args.models` models (persistence on) and the peak RSS.

    Our packages are compiled to bytecode first, as an installed package is (pip
    compiles at install; Python writes the cache at the first import): where
    PYTHONDONTWRITEBYTECODE is set, an uncompiled checkout would be compiled again at
    every start measured (about 100 ms; docs/server.md, "Start-up")."""
    for package in PACKAGES:
        compileall.compile_dir(ROOT / package, quiet=1)
    app = write_app(tmp, args.models)
    bare: list[float] = []
    empty: list[float] = []
    existing: list[float] = []
    hwm: list[float] = []
    bare_hwm: list[float] = []
    for i in range(args.startup_runs):
        echo, t = start("echo", bare_cmd("echo", free_port()), child_env(), tmp)
        bare.append(t)
        bare_hwm.append(echo.vm("VmHWM"))
        echo.stop()
        url = f"sqlite:///{tmp}/startup{i}.db"
        for times in (empty, existing):  # first start creates the tables, then they exist
            server, t = start("nexus", nexus_cmd(app, free_port()), child_env(url), tmp)
            try:
                times.append(t)
                if times is existing:
                    exercise(server.address)
                    hwm.append(server.vm("VmHWM"))
            finally:
                server.stop()

    def show(label: str, xs: list[float], base: list[float] | None = None) -> None:
        ms = sorted(x * 1000 for x in xs)
        ratio = f"  ({statistics.median(xs) / statistics.median(base):.1f}x bare)" if base else ""
        print(f"  {label:<52} {ms[0]:>6.0f} ms min {statistics.median(ms):>6.0f} ms median{ratio}")

    print(
        f"\nProcess start to health SERVING ({args.startup_runs} runs; "
        f"{args.models} models, enable_model_persistence=True, SQLite file; "
        "our packages compiled to bytecode first)"
    )
    show("bare grpc.aio echo server + health", bare)
    show(f"nexus serve, {args.models} models, empty database", empty, bare)
    show(f"nexus serve, {args.models} models, tables exist", existing, bare)
    print(f"\nPeak RSS (VmHWM), {args.models} models, after {EXERCISE_CALLS} calls")
    print(f"  bare grpc.aio echo server + health          {max(bare_hwm):>6.1f} MB")
    print(f"  nexus serve, {args.models} models{'':<26}{max(hwm):>6.1f} MB")
    missed = []
    worst = max(statistics.median(empty), statistics.median(existing))
    if worst >= STARTUP_TARGET_S:
        missed.append(f"start to health {worst * 1000:.0f} ms (target < 1000 ms)")
    if max(hwm) >= RSS_TARGET_MB:
        missed.append(f"peak RSS {max(hwm):.0f} MB (target < {RSS_TARGET_MB:.0f} MB)")
    return missed


EXERCISE_CALLS = 300


def exercise(address: str) -> None:
    """Some work before reading the peak RSS: list the models, create and read contacts."""
    with grpc.insecure_channel(address) as channel:
        execute = channel.unary_unary(EXECUTE)
        get = channel.unary_unary(GET_CONTACT)
        listing = channel.unary_unary(LIST_MODELS)
        for i in range(EXERCISE_CALLS // 3):
            body = execute_body("create_contact", {"name": f"P{i}", "email": f"p{i}@example.org"})
            out = wf_pb2.Execution.FromString(execute(body, timeout=10))
            get(get_contact_body(out.outputs["create"]["id"]), timeout=10)
            listing(model_pb2.ListModelsRequest(page_size=1000).SerializeToString(), timeout=10)


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nexus-bench-") as tmp:
        yield Path(tmp)


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (about a minute)")
    p.add_argument("--seconds", type=float, help="time budget per round (default 3; quick 1)")
    p.add_argument("--rounds", type=int, help="rounds per figure, best kept (default 5; quick 1)")
    p.add_argument("--max-requests", type=int, default=100_000, help="request cap per round")
    p.add_argument("--models", type=int, default=100, help="models for start-up and RSS")
    p.add_argument("--startup-runs", type=int, help="start-up runs (default 5; quick 2)")
    p.add_argument("--skip-load", action="store_true", help="only start-up and RSS")
    p.add_argument("--skip-startup", action="store_true", help="only the throughput tables")
    p.add_argument("--skip-auth", action="store_true", help="without the authentication table")
    p.add_argument(
        "--only-auth",
        "--auth-only",
        action="store_true",
        help="only the authentication table (auth off/on)",
    )
    p.add_argument("--skip-workers", action="store_true", help="without the workers table")
    p.add_argument(
        "--only-workers",
        action="store_true",
        help="only the workers table (--workers 2 vs 1 vs echo, PostgreSQL, direct and Envoy)",
    )
    p.add_argument("--skip-metrics", action="store_true", help="without the metrics table")
    p.add_argument("--only-metrics", action="store_true", help="only the metrics table (on/off)")
    p.add_argument(
        "--metrics-control",
        action="store_true",
        help="the metrics table with metrics off on both servers (the bench's own bias)",
    )
    p.add_argument(
        "--skip-tracing", action="store_true", help="no tracing (1 %% sampled) vs off table"
    )
    p.add_argument(
        "--only-tracing", action="store_true", help="only the tracing (1 %% sampled) vs off table"
    )
    p.add_argument(
        "--against",
        metavar="CHECKOUT",
        help="also serve the noop, list_contacts and create_contact workflows from another "
        "checkout of this repository (e.g. `git worktree add /tmp/main main`) and print "
        "this one's ratio to it",
    )
    p.add_argument(
        "--cpu",
        action="store_true",
        help="also print, for the best rounds, each server's CPU time per call (its "
        "event-loop thread and its other threads) and how idle the machine was",
    )
    # internal: serve a bare baseline in this process
    p.add_argument("--serve", choices=["echo", "driver"], help=argparse.SUPPRESS)
    # internal: the client process of print_request_ids
    p.add_argument("--drive", metavar="ADDRESS", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="r", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.drive:
        asyncio.run(drive_calls(args.drive, args.concurrency, args.seconds or 3.0, args.tag))
        return 0
    if args.serve:
        serve_processes(args)
        return 0
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.startup_runs = args.startup_runs or (2 if args.quick else 5)
    if args.against:
        args.against = str(Path(args.against).resolve())
        if not (Path(args.against) / "nexus_server" / "__init__.py").is_file():
            p.error(f"--against {args.against}: not a checkout of this repository")
    if (not args.skip_load or args.only_tracing) and shutil.which("h2load") is None:
        print("h2load not found: apt-get install nghttp2-client (or --skip-load)")
        return 2
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, grpcio {grpc.__version__}")
    missed: list[str] = []
    with workdir() as tmp:
        if args.only_tracing:
            args.skip_load = args.skip_startup = True
        if args.only_workers:
            args.skip_startup = True
        only = args.only_auth or args.only_metrics or args.only_tracing or args.only_workers
        if not args.skip_load and not only:
            missed += run_load(args, tmp)
        if not args.skip_load and not args.skip_workers and (args.only_workers or not only):
            missed += run_workers(args, tmp)
        if not (args.skip_load or args.skip_auth or args.only_metrics or args.only_workers):
            missed += run_auth(args, tmp)
        if not (args.skip_metrics or args.only_auth or args.only_tracing or args.only_workers):
            missed += run_metrics(args, tmp)
        if not (
            args.skip_tracing
            or args.only_auth
            or args.only_metrics
            or args.only_workers
            or shutil.which("h2load") is None
        ):
            missed += run_tracing(args, tmp)
        if not args.skip_startup and not only:
            missed += run_startup(args, tmp)
    print()
    if missed:
        print("targets missed:\n  " + "\n  ".join(missed))
    else:
        print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
