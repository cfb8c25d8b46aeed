"""Client fixtures: a real Nexus gRPC server in a background thread, and the CLI.

The server runs on its own event loop in a thread, so sync tests can run the CLI as a
subprocess and async tests (the MCP client) can talk to it too. Its app has the example's
models (Contact, Company) and these workflows, registered in code:

- `create_contact(name, email, company=None)`, `search_contacts(query, min_score=0,
  limit=20)`: as in `examples/contacts_app.py`;
- `gated(gate, value=0)`: one `ClientsGateNode` that waits until the test releases its
  gate (`server.gates.release(name)`), so slow executions never sleep blindly;
- `two_steps(name, email)`: create a contact, then read it back (two nodes);
- `boom(message)`: one node that always fails.

`rest_url` puts the real Envoy in front of that same server (for the parity test); when
the Envoy binary is missing it skips, or fails under `CI=true` (`tests/rest`'s rule).

Test modules use fixtures only (importlib mode: nothing is imported from here by name).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dataflow import DataFlow
from dataflow import field as model_field
from nexus_server import Nexus, Serving
from nexus_server._envoy import (
    EnvoyOptions,
    EnvoySupervisor,
    merged_descriptor_set,
    transcoded_services,
)
from workflow import Node, Output, Param, WorkflowBuilder, register_node, unregister_node

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: Every wait in these tests is bounded by this many seconds.
WAIT = 20.0


class Gates:
    """Named gates shared between the test thread and the server's event loop."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._started: dict[str, threading.Event] = {}
        self._cancelled: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def _event(self, name: str) -> asyncio.Event:
        return self._events.setdefault(name, asyncio.Event())  # only on the server loop

    def started(self, name: str) -> threading.Event:
        with self._lock:
            return self._started.setdefault(name, threading.Event())

    def cancelled(self, name: str) -> threading.Event:
        with self._lock:
            return self._cancelled.setdefault(name, threading.Event())

    def release(self, name: str) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._set, name)

    def _set(self, name: str) -> None:
        self._event(name).set()

    def release_all(self) -> None:
        if self.loop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._set_all)

    def _set_all(self) -> None:
        for event in self._events.values():
            event.set()

    async def wait(self, name: str) -> None:
        self.started(name).set()
        try:
            await self._event(name).wait()
        except asyncio.CancelledError:
            self.cancelled(name).set()
            raise


GATES = Gates()


class ClientsGateNode(Node):
    """Waits until the test releases its gate, then returns `value`."""

    type_name = "ClientsGateNode"
    parameters = {"gate": Param(str), "value": Param(int, default=0)}
    outputs = {"value": Output(int)}

    async def run(self, gate: str, value: int) -> dict[str, Any]:
        await GATES.wait(gate)
        return {"value": value}


class ClientsBoomNode(Node):
    """Always fails with RuntimeError(message)."""

    type_name = "ClientsBoomNode"
    parameters = {"message": Param(str)}
    outputs = {"never": Output(str)}

    def run(self, message: str) -> dict[str, Any]:
        raise RuntimeError(message)


def build_app(db_url: str) -> tuple[Nexus, DataFlow]:
    app = Nexus(grpc_port=0, grace_period=1.0)
    db = DataFlow(db_url)

    @db.model
    class Company:
        """A company contacts work for."""

        id: str
        name: str = model_field(unique=True)
        industry: str | None = None
        employees: int = 0

    @db.model
    class Contact:
        """A person to keep in touch with."""

        id: str
        name: str = model_field(searchable=True)  # as in examples/contacts_app.py
        email: str = model_field(unique=True, description="where to write to")
        company: str | None = model_field(default=None, searchable=True)
        score: int = 0

    app.integrate_dataflow(db)

    create = WorkflowBuilder("Create a contact.")
    create.add_input("name", str, description="the contact's full name")
    create.add_input("email", str, description="the contact's email address")
    create.add_input("company", str | None, default=None, description="their company")
    create.add_node(
        "ContactCreateNode",
        "create",
        {"name": "{{name}}", "email": "{{email}}", "company": "{{company}}"},
    )
    app.register("create_contact", create.build())

    search = WorkflowBuilder("Find contacts whose name contains a text.")
    search.add_input("query", str, description="text the name contains (any case)")
    search.add_input("min_score", int, default=0, description="lowest score to list")
    search.add_input("limit", int, default=20, description="at most this many contacts")
    search.add_node(
        "ContactListNode",
        "search",
        {
            "filter": {"name": {"$ilike": "%{{query}}%"}, "score": {"$gte": "{{min_score}}"}},
            "order_by": ["-score", "name"],
            "limit": "{{limit}}",
        },
    )
    app.register("search_contacts", search.build())

    gated = WorkflowBuilder("Waits for the test's gate.")
    gated.add_input("gate", str, description="the gate to wait for")
    gated.add_input("value", int, default=0, description="the value to return")
    gated.add_node("ClientsGateNode", "wait", {"gate": "{{gate}}", "value": "{{value}}"})
    app.register("gated", gated.build())

    two = WorkflowBuilder("Create a contact and read it back.")
    two.add_node("ContactCreateNode", "create", {"name": "{{name}}", "email": "{{email}}"})
    two.add_node("ContactReadNode", "read")
    two.add_connection("create", "id", "read", "id")
    app.register("two_steps", two.build())

    boom = WorkflowBuilder("Always fails.")
    boom.add_node("ClientsBoomNode", "explode", {"message": "{{message}}"})
    app.register("boom", boom.build())
    return app, db


@dataclass
class Server:
    """A running server: its address, the gates of `gated`, a sync channel."""

    address: str
    gates: Gates
    loop: asyncio.AbstractEventLoop
    app: Nexus
    serving: Serving
    env: dict[str, str] = field(default_factory=dict)

    def run_on_loop(self, coro: Any, timeout: float = WAIT) -> Any:
        """Run a coroutine on the server's loop (e.g. to register a workflow in code)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def _wait_healthy(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=WAIT, wait_for_ready=True)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def app_builder() -> Any:
    """How `server` makes its app and DataFlow from a database URL (`build_app`); a test
    module overrides this fixture to serve other models with the same machinery."""
    return build_app


@pytest.fixture(scope="module")
def server_db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The database `server` serves: a new SQLite file; a test module overrides this
    fixture to run the same tests on PostgreSQL as well."""
    return f"sqlite:///{tmp_path_factory.mktemp('clients') / 'nexus.db'}"


@pytest.fixture(scope="module")
def server(server_db_url: str, app_builder: Any) -> Iterator[Server]:
    """One real Nexus gRPC server for the session, in a thread with its own loop."""
    register_node(ClientsGateNode)
    register_node(ClientsBoomNode)
    db_url = server_db_url
    ready: Future[tuple[Serving, asyncio.AbstractEventLoop, Nexus]] = Future()
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        app, db = app_builder(db_url)
        GATES.loop = asyncio.get_running_loop()
        stop.append(asyncio.Event())
        try:
            async with app.serving() as info:
                ready.set_result((info, asyncio.get_running_loop(), app))
                await stop[0].wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise
        finally:
            await db.close()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    info, loop, app = ready.result(WAIT)
    _wait_healthy(info.address)
    try:
        yield Server(info.address, GATES, loop, app, info)
    finally:
        GATES.release_all()
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(WAIT)
        unregister_node("ClientsGateNode")
        unregister_node("ClientsBoomNode")


@pytest.fixture(scope="module")
def rest_url(server: Server, envoy_path: Path) -> Iterator[str]:
    """The real Envoy (REST through the gRPC-JSON transcoder) in front of `server`, on a
    port Envoy picks; yields its base URL. Supervised on the server's own loop, as
    `Nexus.serving(envoy=True)` does it."""
    typed = server.serving.typed
    supervisor = EnvoySupervisor(
        merged_descriptor_set(typed),
        EnvoyOptions(
            grpc_port=server.serving.port, api_port=0, services=transcoded_services(typed)
        ),
        binary=envoy_path,
    )
    server.run_on_loop(supervisor.start(), timeout=supervisor.ready_timeout + WAIT)
    try:
        yield f"http://127.0.0.1:{supervisor.api_port}"
    finally:
        server.run_on_loop(supervisor.stop())


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(scope="module")
def cli_env(server: Server) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_SERVER"] = server.address
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "200"
    return env


@pytest.fixture
def cli(cli_env: dict[str, str]) -> Any:
    """`cli(*args, input=None, env=None)`: run `python -m clients.cli` as a subprocess."""

    def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "clients.cli", *args],
            input=input,
            capture_output=True,
            text=True,
            env={**cli_env, **(env or {})},
            cwd=str(ROOT),
            timeout=WAIT * 2,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run


@pytest.fixture
def cli_popen(cli_env: dict[str, str]) -> Any:
    """`cli_popen(*args)`: start the CLI without waiting (for watch and cancel)."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env,
            cwd=str(ROOT),
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


@pytest.fixture
def mcp_http(cli_env: dict[str, str]) -> Iterator[Any]:
    """`mcp_http(*args)`: start `nexus-mcp --transport http --port 0 *args` against the
    server as a subprocess; returns the URL it announces once it has bound its port (no
    port picked here and released: nothing can take it in between). Stopped after the
    test."""
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> str:
        proc = subprocess.Popen(
            [str(VENV_BIN / "nexus-mcp"), "--transport", "http", "--port", "0", *args],
            env=cli_env,
            cwd=str(ROOT),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stderr is not None
        seen: list[str] = []
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            deadline = time.monotonic() + WAIT
            while True:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"nexus-mcp announced no port: {''.join(seen)}"
                try:
                    line = pool.submit(proc.stderr.readline).result(timeout=remaining)
                except concurrent.futures.TimeoutError:
                    continue  # the deadline check above ends the wait
                assert line, f"nexus-mcp exited ({proc.poll()}): {''.join(seen)}"
                seen.append(line)
                match = re.search(r"streamable HTTP on (http://\S+/mcp)", line)
                if match:
                    return match.group(1)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)


@pytest.fixture
def unique() -> Iterator[Any]:
    """`unique("ada")`: a name never used before in this session (the database is shared)."""
    counter = iter(range(1, 1_000_000))
    token = os.urandom(3).hex()

    def make(prefix: str) -> str:
        return f"{prefix}-{token}-{next(counter)}"

    yield make
