"""REST fixtures: a real Nexus gRPC server with the real Envoy in front, on ephemeral ports.

The server runs in a background thread with its own event loop, one per test module
(`running`), so tests are plain synchronous functions using httpx and a sync gRPC channel.
Envoy picks its own listener port (`api_port=0`); the supervisor reads it back from
Envoy's admin API once `/ready` answers, so no port is ever guessed.

The app has the `Contact` and `Company` models and these workflows:

- `create_contact(name, email, company=None, score=0)`
- `boom(message)`: a node that raises RuntimeError (NODE_FAILED, 409)
- `internal(message)`: a node that raises an INTERNAL_ERROR (500)

When the Envoy binary cannot be found the tests are skipped, saying why; with `CI=true`
they fail instead.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from dataflow import DataFlow, field
from nexus_server import ApiError, Nexus, Serving
from nexus_server._errors import code_of
from workflow import Node, Output, Param, WorkflowBuilder, register_node, unregister_node

#: Every wait in these tests is bounded by this many seconds.
WAIT = 15.0
CORS_ORIGIN = "https://app.example.com"


class RestBoomNode(Node):
    """Always fails with RuntimeError(message): NODE_FAILED."""

    __test__ = False
    type_name = "RestBoomNode"
    parameters = {"message": Param(str)}
    outputs = {"never": Output(str)}

    def run(self, message: str) -> dict[str, Any]:
        raise RuntimeError(message)


class RestInternalNode(Node):
    """Always fails with an INTERNAL_ERROR (what an unexpected failure becomes)."""

    __test__ = False
    type_name = "RestInternalNode"
    parameters = {"message": Param(str)}
    outputs = {"never": Output(str)}

    def run(self, message: str) -> dict[str, Any]:
        raise ApiError("INTERNAL_ERROR", "internal error (logged on the server)")


def build_app(db_url: str, *, models: bool = True, **options: Any) -> Nexus:
    """The test app on port 0 (gRPC and Envoy). `models=False`: only the `boom`
    workflow and no models (node types are global: one app with models at a time)."""
    app = Nexus(grpc_port=0, api_port=0, **options)
    db = DataFlow(db_url)
    app.integrate_dataflow(db)
    if not models:
        boom = WorkflowBuilder("Always fails.")
        boom.add_node("RestBoomNode", "explode", {"message": "{{message}}"})
        app.register("boom", boom.build())
        return app

    @db.model
    class Company:
        """A company contacts work for."""

        id: str
        name: str = field(unique=True)
        employees: int = 0

    @db.model
    class Contact:
        """A person to keep in touch with."""

        id: str
        name: str
        email: str = field(unique=True, description="where to write to")
        company: str | None = None
        score: int = 0

    app.integrate_dataflow(db)
    create = WorkflowBuilder("Create a contact.")
    create.add_input("name", str, description="the contact's full name")
    create.add_input("email", str)
    create.add_input("company", str | None, default=None)
    create.add_input("score", int, default=0)
    create.add_node(
        "ContactCreateNode",
        "create",
        {"name": "{{name}}", "email": "{{email}}", "company": "{{company}}", "score": "{{score}}"},
    )
    app.register("create_contact", create.build())
    boom = WorkflowBuilder("Always fails.")
    boom.add_node("RestBoomNode", "explode", {"message": "{{message}}"})
    app.register("boom", boom.build())
    internal = WorkflowBuilder("Always fails unexpectedly.")
    internal.add_node("RestInternalNode", "explode", {"message": "{{message}}"})
    app.register("internal", internal.build())
    return app


class Running:
    """A Nexus app served (with Envoy) from a background thread's event loop."""

    def __init__(self, app: Nexus, *, envoy: bool = True) -> None:
        self.app = app
        self.envoy = envoy
        self._ready: Future[Serving] = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="nexus-rest", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            try:
                async with self.app.serving(envoy=self.envoy) as info:
                    self._ready.set_result(info)
                    await self._stop.wait()
            finally:
                if self.app.db is not None:
                    # frees the model's node types for the next app in this process
                    await self.app.db.close()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def start(self) -> Serving:
        self._thread.start()
        return self._ready.result(timeout=60)

    def call(self, coro: Any, timeout: float = WAIT) -> Any:
        """Run a coroutine on the server's loop (e.g. the supervisor's methods)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="session")
def _nodes() -> Iterator[None]:
    register_node(RestBoomNode)
    register_node(RestInternalNode)
    yield
    unregister_node("RestBoomNode")
    unregister_node("RestInternalNode")


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, _nodes: None, envoy_path: Path
) -> Iterator[Running]:
    """The module's app, served with Envoy in front (per module, not per session:
    model node types are global, so the app is closed before other suites run)."""
    db = tmp_path_factory.mktemp("rest") / "nexus.db"
    run = Running(build_app(f"sqlite:///{db}", cors_origins=[CORS_ORIGIN], grace_period=2))
    run.start()
    yield run
    run.stop()


@pytest.fixture(scope="module")
def serving(running: Running) -> Serving:
    info = running._ready.result(0)
    assert info.api_port is not None
    return info


@pytest.fixture(scope="module")
def base_url(serving: Serving) -> str:
    return f"http://{serving.api_address}"


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=WAIT) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_channel(serving: Serving) -> Iterator[grpc.Channel]:
    """A channel straight to the gRPC server (not through Envoy)."""
    with grpc.insecure_channel(serving.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=WAIT)
        yield ch


@pytest.fixture(scope="module")
def envoy_channel(serving: Serving) -> Iterator[grpc.Channel]:
    """A plain gRPC channel to Envoy's port."""
    assert serving.api_address is not None
    with grpc.insecure_channel(serving.api_address) as ch:
        grpc.channel_ready_future(ch).result(timeout=WAIT)
        yield ch


@pytest.fixture
def unique() -> str:
    """A short unique text, so tests sharing the session's database never collide."""
    return uuid.uuid4().hex[:10]


def _assert_status_body(
    body: Any, code: int, reason: str | None = None, *, gateway: bool = False
) -> dict[str, Any]:
    """`body` is a JSON google.rpc.Status with `code` (and an ErrorInfo of `reason`, whose
    declared code is `code`, sent by Envoy itself when `gateway`)."""
    assert isinstance(body, dict), body
    assert set(body) == {"code", "message", "details"}, body
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    if reason is not None:
        infos = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
        assert len(infos) == 1, body
        assert infos[0]["reason"] == reason, body
        assert infos[0]["domain"] == "nexus", body
        assert code_of(reason).value[0] == code, f"errors.proto declares another code: {body}"
        assert (infos[0].get("metadata", {}).get("source") == "gateway") is gateway, body
    return body


@pytest.fixture(scope="session")
def status_body() -> Any:
    """`status_body(body, code, reason=None, *, gateway=False)` asserts `body` is a JSON
    google.rpc.Status with that code (and one ErrorInfo with that reason, from the
    gateway or from the server) and returns it."""
    return _assert_status_body


@pytest.fixture(scope="session")
def cors_origin() -> str:
    return CORS_ORIGIN


@pytest.fixture
def run_app(tmp_path: Path, _nodes: None, envoy_path: Path) -> Iterator[Any]:
    """`run_app(envoy=True, **nexus_options)`: another app (without models: see
    `build_app`) served in this test and stopped at the end, for tests that stop or break
    things."""
    started: list[Running] = []

    def run(*, envoy: bool = True, **options: Any) -> Running:
        r = Running(
            build_app(f"sqlite:///{tmp_path / 'own.db'}", models=False, **options), envoy=envoy
        )
        started.append(r)
        r.start()
        return r

    yield run
    for r in started:
        r.stop()
