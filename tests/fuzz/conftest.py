"""Fuzz fixtures: a real Nexus gRPC server in a background thread, on SQLite or PostgreSQL.

The server runs on its own event loop in a thread (as in tests/clients), so the fuzzers
are plain synchronous code sending bytes with a sync channel, and a slow or stuck call
shows up as a deadline, never as a hung test. Its app has two models:

- `Gadget`: one field of every DataFlow type (str, int, float, bool, bytes, Decimal,
  datetime, date, UUID, Enum, dict, list), so every typed conversion is fuzzed;
- `Counter`: an `int` id (generated ids after explicit ones);

and the workflows `create_gadget(name, count=0)`, `list_gadgets(limit=10)` and
`bump(label, value=0)` (creates a Counter).

`fuzz_server` is per module and parametrized over the backends through `backend`
(indirect): a test module runs its fuzzer on a fresh SQLite file and on a fresh
PostgreSQL schema (skipped when PostgreSQL is unreachable, failing under CI=true: see
tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import enum
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dataflow import DataFlow, field
from nexus_server import Nexus, Serving
from workflow import WorkflowBuilder

#: Every wait in these fixtures is bounded by this many seconds.
WAIT = 30.0


class Color(enum.Enum):
    """The enum field's values."""

    RED = "red"
    GREEN = "green"


def build_app(db_url: str) -> tuple[Nexus, DataFlow]:
    """The fuzz app (not started) and its DataFlow."""
    app = Nexus(grpc_port=0, grace_period=2.0)
    db = DataFlow(db_url)

    @db.model
    class Gadget:
        """A record with a field of every type."""

        id: str
        name: str = field(unique=True)
        count: int = 0
        ratio: float = 0.0
        active: bool = False
        blob: bytes | None = None
        price: decimal.Decimal | None = None
        seen_at: dt.datetime | None = None
        born_on: dt.date | None = None
        token: uuid.UUID | None = None
        color: Color | None = None
        meta: dict[str, Any] | None = None
        tags: list[Any] | None = None

    @db.model
    class Counter:
        """A record with a generated integer id."""

        id: int
        label: str
        value: int = 0

    app.integrate_dataflow(db)

    create = WorkflowBuilder("Create a gadget.")
    create.add_input("name", str)
    create.add_input("count", int, default=0)
    create.add_node("GadgetCreateNode", "create", {"name": "{{name}}", "count": "{{count}}"})
    app.register("create_gadget", create.build())

    listing = WorkflowBuilder("List gadgets.")
    listing.add_input("limit", int, default=10)
    listing.add_node("GadgetListNode", "list", {"order_by": ["name"], "limit": "{{limit}}"})
    app.register("list_gadgets", listing.build())

    bump = WorkflowBuilder("Create a counter.")
    bump.add_input("label", str)
    bump.add_input("value", int, default=0)
    bump.add_node("CounterCreateNode", "create", {"label": "{{label}}", "value": "{{value}}"})
    app.register("bump", bump.build())
    return app, db


@dataclass
class FuzzServer:
    """A running fuzz app: its address, backend and the loop it runs on."""

    address: str
    backend: str
    serving: Serving
    loop: asyncio.AbstractEventLoop

    def run_on_loop(self, coro: Any, timeout: float = WAIT) -> Any:
        """Run a coroutine on the server's loop."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def wait_healthy(address: str, timeout: float = WAIT) -> None:
    """Block until the server's health service answers SERVING (bounded)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=True)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def _fresh_schema(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """The database of the module's server: "sqlite" unless parametrized indirectly."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture(scope="module")
def fuzz_server(
    backend: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[FuzzServer]:
    """The fuzz app served from a thread of its own, on a fresh database of `backend`."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'nexus.db'}"
    else:
        url = str(request.getfixturevalue("pg_url"))
        asyncio.run(_fresh_schema(url))
    ready: Future[tuple[Serving, asyncio.AbstractEventLoop]] = Future()
    stop: list[asyncio.Event] = []

    async def serve() -> None:
        app, db = build_app(url)
        stop.append(asyncio.Event())
        try:
            async with app.serving() as info:
                ready.set_result((info, asyncio.get_running_loop()))
                await stop[0].wait()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise
        finally:
            await db.close()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), name="nexus-fuzz", daemon=True)
    thread.start()
    info, loop = ready.result(WAIT)
    wait_healthy(info.address)
    try:
        yield FuzzServer(info.address, backend, info, loop)
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(WAIT)
        assert not thread.is_alive(), "the fuzz server did not stop"
