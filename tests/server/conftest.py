"""Server fixtures: a real Nexus on an ephemeral port, a grpc.aio channel, the stubs.

`backend` is "sqlite" unless a module parametrizes it (indirectly) with
`pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)`; then the
same tests run against a fresh SQLite file and a fresh PostgreSQL schema.

The default app has the `Contact` and `Company` models and these workflows, registered
in code (builtin):

- `create_contact(name, email, company=None, score=0)`
- `acme_contacts(limit=50)`: lists contacts with a fixed filter `{"company": "Acme"}`
- `create_and_read(name, email)`: creates a contact, then reads it back (two nodes)
- `gated(gate, value=0)`: one `TestGateNode` that waits until the test sets
  `gates[gate]` (see the `gates` fixture), so slow executions never sleep blindly
- `boom(message)`: one `TestBoomNode` that raises RuntimeError(message)
- `read_contact(id)`: one ContactReadNode (fails with RECORD_NOT_FOUND for unknown ids)

Test modules get everything through fixtures (importlib mode: nothing is imported from
this file by name).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from dataflow import DataFlow, field
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving
from workflow import Node, Output, Param, WorkflowBuilder, register_node, unregister_node

#: Every wait in these tests is bounded by this many seconds.
WAIT = 10.0

_GATES: dict[str, asyncio.Event] = {}


def _gate(name: str) -> asyncio.Event:
    return _GATES.setdefault(name, asyncio.Event())


class TestGateNode(Node):
    """Waits until the test releases its gate (an asyncio.Event), then returns `value`.

    Sets `<gate>:started` when it starts and `<gate>:cancelled` when it is cancelled.
    """

    __test__ = False
    type_name = "TestGateNode"
    parameters = {"gate": Param(str), "value": Param(int, default=0)}
    outputs = {"value": Output(int)}

    async def run(self, gate: str, value: int) -> dict[str, Any]:
        _gate(f"{gate}:started").set()
        try:
            await _gate(gate).wait()
        except asyncio.CancelledError:
            _gate(f"{gate}:cancelled").set()
            raise
        return {"value": value}


class TestBoomNode(Node):
    """Always fails with RuntimeError(message)."""

    __test__ = False
    type_name = "TestBoomNode"
    parameters = {"message": Param(str)}
    outputs = {"never": Output(str)}

    def run(self, message: str) -> dict[str, Any]:
        raise RuntimeError(message)


#: The machine's Redis. Tests name their channels and keys after a database of their own.
REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis URL, once it answers; the test is skipped without it (and
    fails under CI=true)."""
    client = redis.Redis.from_url(REDIS, socket_timeout=2)
    try:
        client.ping()
    except Exception as exc:  # pragma: no cover - the machine runs Redis
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Redis at {REDIS}: {exc}")
        pytest.skip(f"no Redis at {REDIS}: {exc}")
    finally:
        client.close()
    return REDIS


@pytest.fixture
def gates() -> Iterator[dict[str, asyncio.Event]]:
    """The gates of `TestGateNode`, by name (an unknown name is created on first use).

    `gates["g"].set()` releases the node waiting on gate "g"; `gates["g:started"]` is set
    once it runs, `gates["g:cancelled"]` once it was cancelled.
    """

    class _Gates(dict[str, asyncio.Event]):
        def __missing__(self, key: str) -> asyncio.Event:
            return _gate(key)

    yield _Gates()
    for ev in _GATES.values():
        ev.set()  # anything still waiting lets go
    _GATES.clear()


@pytest.fixture(autouse=True)
def _test_nodes() -> Iterator[None]:
    register_node(TestGateNode)
    register_node(TestBoomNode)
    yield
    unregister_node("TestGateNode")
    unregister_node("TestBoomNode")


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The database the app uses: "sqlite" unless parametrized indirectly."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
async def db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty database: a new SQLite file, or the session's PostgreSQL database with
    its public schema dropped and recreated."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'nexus.db'}"
    pg: str = request.getfixturevalue("pg_url")
    conn = await asyncpg.connect(pg, timeout=5)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
    return pg


def declare_models(db: DataFlow) -> None:
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
        phone_number: str | None = None


def register_workflows(app: Nexus) -> None:
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

    acme = WorkflowBuilder("Contacts of Acme.")
    acme.add_input("limit", int, default=50)
    acme.add_node(
        "ContactListNode",
        "list",
        {"filter": {"company": "Acme"}, "order_by": ["name"], "limit": "{{limit}}"},
    )
    app.register("acme_contacts", acme.build())

    two = WorkflowBuilder("Create a contact and read it back.")
    two.add_node("ContactCreateNode", "create", {"name": "{{name}}", "email": "{{email}}"})
    two.add_node("ContactReadNode", "read")
    two.add_connection("create", "id", "read", "id")
    app.register("create_and_read", two.build())

    gated = WorkflowBuilder("Waits for the test's gate.")
    gated.add_node("TestGateNode", "wait", {"gate": "{{gate}}", "value": "{{value}}"})
    gated.add_input("value", int, default=0)
    app.register("gated", gated.build())

    boom = WorkflowBuilder("Always fails.")
    boom.add_node("TestBoomNode", "explode", {"message": "{{message}}"})
    app.register("boom", boom.build())

    read = WorkflowBuilder("Read one contact.")
    read.add_node("ContactReadNode", "read", {"id": "{{id}}"})
    app.register("read_contact", read.build())


@pytest.fixture
async def make_app(db_url: str) -> AsyncIterator[Callable[..., Nexus]]:
    """`make_app(**nexus_options)`: a Nexus on port 0 with a fresh DataFlow (Contact and
    Company) on the test database and the standard workflows. `models=False` leaves the
    models out; `url=` picks another database. Every DataFlow made is closed after the
    test (close it yourself before making another app with the same models)."""
    made: list[DataFlow] = []

    def make(*, models: bool = True, workflows: bool = True, **options: Any) -> Nexus:
        url = options.pop("url", db_url)
        options.setdefault("grace_period", 2.0)
        app = Nexus(grpc_port=0, **options)
        db = DataFlow(url)
        made.append(db)
        if models:
            declare_models(db)
        app.integrate_dataflow(db)
        if workflows and models:
            register_workflows(app)
        return app

    yield make
    for db in reversed(made):
        await db.close()


async def wait_serving(channel: grpc.aio.Channel, service: str = "") -> None:
    """Poll the health service until it answers SERVING, within `WAIT` seconds."""
    stub = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(WAIT):
        while True:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    raise
            await asyncio.sleep(0.02)


@pytest.fixture
def connect() -> Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]]:
    """`async with connect(serving) as channel`: a channel to a served app, once healthy."""

    @contextlib.asynccontextmanager
    async def open_channel(serving: Serving) -> AsyncIterator[grpc.aio.Channel]:
        async with grpc.aio.insecure_channel(serving.address) as channel:
            await wait_serving(channel)
            yield channel

    return open_channel


@pytest.fixture
async def app(make_app: Callable[..., Nexus]) -> Nexus:
    """The default app (not started)."""
    return make_app()


@pytest.fixture
async def serving(app: Nexus) -> AsyncIterator[Serving]:
    """The default app, serving."""
    async with asyncio.timeout(WAIT):
        cm = app.serving()
        info = await cm.__aenter__()
    try:
        yield info
    finally:
        async with asyncio.timeout(WAIT):
            await cm.__aexit__(None, None, None)


@pytest.fixture
async def channel(
    serving: Serving,
    connect: Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]],
) -> AsyncIterator[grpc.aio.Channel]:
    async with connect(serving) as ch:
        yield ch


@pytest.fixture
def wf(channel: grpc.aio.Channel) -> Any:
    """A WorkflowService stub on the default app."""
    return wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]


@pytest.fixture
def ms(channel: grpc.aio.Channel) -> Any:
    """A ModelService stub on the default app."""
    return mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]


def error_details(
    err: grpc.aio.AioRpcError,
) -> tuple[error_details_pb2.ErrorInfo, list[tuple[str, str]]]:
    """The ErrorInfo and the field violations of a failed call's google.rpc.Status."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no grpc-status-details-bin in {err!r}"
    assert status.code == err.code().value[0]
    infos: list[error_details_pb2.ErrorInfo] = []
    violations: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
    assert len(infos) == 1, f"expected exactly one ErrorInfo, got {infos}"
    assert infos[0].domain == "nexus"
    return infos[0], violations


@pytest.fixture
def expect_error() -> Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]:
    """`meta, violations = await expect_error(call, code, reason, fields=[...])`.

    Awaits `call` (bounded), asserts it fails with `code` and `ErrorInfo.reason`, and,
    when `fields` is given, that the BadRequest violations name exactly those fields (in
    order). Returns the ErrorInfo metadata and the (field, description) violations.
    """

    async def check(
        call: Awaitable[Any],
        code: grpc.StatusCode,
        reason: str,
        *,
        fields: list[str] | None = None,
    ) -> tuple[dict[str, str], list[tuple[str, str]]]:
        try:
            async with asyncio.timeout(WAIT):
                result = await call
        except grpc.aio.AioRpcError as err:
            assert err.code() == code, f"{err.code()} {err.details()}"
            info, violations = error_details(err)
            assert info.reason == reason, f"{info.reason}: {err.details()}"
            if fields is not None:
                assert [f for f, _ in violations] == fields, violations
            return dict(info.metadata), violations
        raise AssertionError(f"expected {code.name}/{reason}, the call returned {result!r}")

    return check


@pytest.fixture
def details() -> Callable[
    [grpc.aio.AioRpcError], tuple[error_details_pb2.ErrorInfo, list[tuple[str, str]]]
]:
    """`info, violations = details(err)` for errors caught by the test itself."""
    return error_details
