"""The replicas' bus (`_bus`) on the real engines, and stored workflows shared by two apps
in one process (the subprocess scenarios are in test_replicas.py).

- PostgreSQL: a message arrives; when the listening connection is killed (by the
  database, as an operator or a failover would), it reconnects, says so, and messages
  arrive again. A message published in a transaction arrives at its commit, and never
  when it rolls back.
- SQLite: two buses on one file hear each other.
- Redis: the same through pub/sub.
- An event too large for one message is forwarded trimmed.
- Two apps on one database: the registry's limit and owners hold across them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2

from dataflow import DataFlow
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import ApiKeySpec, AuthConfig, Limits, Nexus, Policy
from nexus_server._bus import APPLICATION_NAME, MAX_PAYLOAD, Bus, PgBus, RedisBus, bus_for
from nexus_server._remote import RemoteExecutions

WAIT = 10.0
POSTGRES = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


class Inbox:
    """What a bus delivered, and how often it (re)started listening."""

    def __init__(self, bus: Bus, channel: str = "test") -> None:
        self.got: asyncio.Queue[str] = asyncio.Queue()
        self.listening = 0
        self._again = asyncio.Event()
        bus.subscribe(channel, self.got.put_nowait)
        bus.on_reconnect(self._listened)

    def _listened(self) -> None:
        self.listening += 1
        self._again.set()

    async def listened(self, times: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.listening < times:
                self._again.clear()
                await self._again.wait()

    async def next(self) -> str:
        async with asyncio.timeout(WAIT):
            return await self.got.get()


@POSTGRES
async def test_postgres_bus_delivers_and_comes_back_after_its_connection_is_killed(
    db_url: str,
) -> None:
    db = DataFlow(db_url)
    await db.initialize()
    bus = bus_for(db)
    assert isinstance(bus, PgBus)
    inbox = Inbox(bus)
    await bus.start()
    try:
        await inbox.listened(1)
        await bus.publish("test", "one")
        assert await inbox.next() == "one"

        name = db_url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(db_url, timeout=5)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = $1 AND application_name = $2",
                name,
                APPLICATION_NAME,
            )
        finally:
            await admin.close()
        assert killed == 1
        await inbox.listened(2)  # reconnected: its subscribers re-read what they missed
        await bus.publish("test", "two")
        assert await inbox.next() == "two"
        with pytest.raises(ValueError, match="at most"):
            await bus.publish("test", "x" * (MAX_PAYLOAD + 1))
    finally:
        await bus.close()
        await db.close()


@POSTGRES
async def test_postgres_bus_publishes_in_a_transaction_when_it_commits_only(
    db_url: str,
) -> None:
    """What the queue announces queued executions with: the message is part of the
    transaction that queues them."""
    db = DataFlow(db_url)
    await db.initialize()
    bus = bus_for(db)
    assert isinstance(bus, PgBus) and bus.transactional
    inbox = Inbox(bus)
    await bus.start()
    try:
        await inbox.listened(1)
        with pytest.raises(RuntimeError, match="roll back"):
            async with db.transaction():
                async with db.connection() as conn:
                    await bus.publish_in(conn, "test", "rolled back")
                raise RuntimeError("roll back")
        async with db.transaction():
            async with db.connection() as conn:
                await bus.publish_in(conn, "test", "committed")
            with pytest.raises(TimeoutError):  # not before the commit
                async with asyncio.timeout(0.5):
                    await inbox.got.get()
        # notifications arrive in commit order: the rolled-back one would be first
        assert await inbox.next() == "committed"
        assert inbox.got.empty()
    finally:
        await bus.close()
        await db.close()


async def test_sqlite_buses_on_one_file_hear_each_other(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first_db, second_db = DataFlow(url), DataFlow(url)
    await first_db.initialize()
    await second_db.initialize()
    first, second = bus_for(first_db), bus_for(second_db)
    assert first is not None and second is not None
    inbox = Inbox(second)
    await first.start()
    await second.start()
    try:
        # a message cannot be part of a transaction: the queue publishes after commits
        assert not first.transactional
        with pytest.raises(NotImplementedError, match="cannot publish in a transaction"):
            await first.publish_in(None, "test", "in a transaction")
        await first.publish("test", "hello")
        assert await inbox.next() == "hello"
        await first.publish("other", "not for the inbox")
        await first.publish("test", "again")
        assert await inbox.next() == "again"
    finally:
        await first.close()
        await second.close()
        await first_db.close()
        await second_db.close()
    assert bus_for(DataFlow("sqlite:///:memory:")) is None  # nobody else to tell


async def test_redis_bus_delivers_within_its_database_only(tmp_path: Path, redis_url: str) -> None:
    dbs = [DataFlow(f"sqlite:///{tmp_path / name}") for name in ("a.db", "a.db", "b.db")]
    buses = [bus_for(db, redis_url) for db in dbs]
    assert all(isinstance(b, RedisBus) for b in buses)
    sender, same, other = (b for b in buses if b is not None)
    inbox, elsewhere = Inbox(same), Inbox(other)
    for bus in (sender, same, other):
        await bus.start()
    try:
        await inbox.listened(1)
        await elsewhere.listened(1)
        await sender.publish("test", "hello")
        assert await inbox.next() == "hello"
        await asyncio.sleep(0)  # nothing crosses to another database's apps
        assert elsewhere.got.empty()
    finally:
        for bus in (sender, same, other):
            await bus.close()


def test_a_large_event_is_forwarded_trimmed() -> None:
    event = wpb.ExecutionEvent(execution_id="x", sequence=3)
    event.node_completed.node_id = "big"
    event.node_completed.outputs.update({"blob": "y" * 20_000})
    payload = RemoteExecutions._event_payload(event, "token", 3)
    assert payload is not None and len(payload.encode()) <= MAX_PAYLOAD
    small = wpb.ExecutionEvent(execution_id="x", sequence=4)
    small.node_completed.node_id = "small"
    small.node_completed.outputs.update({"text": "kept"})
    kept = RemoteExecutions._event_payload(small, "token", 4)
    assert kept is not None and "token" in kept
    import base64
    import json

    decoded = wpb.ExecutionEvent.FromString(base64.b64decode(json.loads(kept)["event"]))
    assert decoded.node_completed.outputs["text"] == "kept"
    trimmed = wpb.ExecutionEvent.FromString(base64.b64decode(json.loads(payload)["event"]))
    assert trimmed.node_completed.node_id == "big" and not trimmed.node_completed.outputs.fields


def _definition(text: str) -> wpb.WorkflowDefinition:
    d = wpb.WorkflowDefinition(description=text)
    params = struct_pb2.Struct()
    params.update({"message": "{{message}}"})
    d.nodes.add(id="explode", type="TestBoomNode", params=params)
    return d


async def _error(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code(), err.value.details() or ""


KEYS = {"ada": "ada-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef"}


def _as(who: str) -> tuple[tuple[str, str]]:
    return (("x-api-key", KEYS[who]),)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_two_apps_share_the_registry_limit_and_owners(
    make_app: Callable[..., Nexus], connect: Any
) -> None:
    options = {
        "limits": Limits(max_workflows=1),
        "enable_auth": True,
        "auth": AuthConfig(
            api_keys={
                who: ApiKeySpec(key, roles=frozenset({"registrar"})) for who, key in KEYS.items()
            }
        ),
        "policy": Policy({"registrar": ["workflow:register"]}),
    }
    # one process: the models of one DataFlow at a time (the test's nodes need none)
    first, second = make_app(models=False, **options), make_app(models=False, **options)
    async with (
        first.serving() as one,
        second.serving() as two,
        connect(one) as ch1,
        connect(two) as ch2,
    ):
        a, b = wgrpc.WorkflowServiceStub(ch1), wgrpc.WorkflowServiceStub(ch2)
        first_one = wpb.RegisterWorkflowRequest(name="first", definition=_definition("1"))
        await a.RegisterWorkflow(first_one, metadata=_as("ada"))
        # the limit counts what the database holds, whether the second app has
        # heard of the first registration yet or not
        code, details = await _error(
            b.RegisterWorkflow(
                wpb.RegisterWorkflowRequest(name="second", definition=_definition("2")),
                metadata=_as("ada"),
            )
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "max_workflows" in details
        # only its owner may replace or delete it, on any app (checked against the
        # database's row, not what the app has heard)
        replace = wpb.RegisterWorkflowRequest(
            name="first", definition=_definition("3"), replace=True
        )
        code, _ = await _error(b.RegisterWorkflow(replace, metadata=_as("bob")))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        delete = wpb.DeleteWorkflowRequest(name="first")
        code, _ = await _error(b.DeleteWorkflow(delete, metadata=_as("bob")))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        await b.DeleteWorkflow(delete, metadata=_as("ada"))
        code, _ = await _error(a.DeleteWorkflow(delete, metadata=_as("ada")))
        assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_an_app_refusing_code_nodes_does_not_serve_stored_ones(
    make_app: Callable[..., Nexus], connect: Any
) -> None:
    code = wpb.WorkflowDefinition(description="Doubles n.")
    params = struct_pb2.Struct()
    params.update({"code": "result = {'n': n * 2}", "n": "{{n}}"})
    code.nodes.add(id="run", type="PythonCodeNode", params=params)
    taking = make_app(models=False, allow_code_nodes=True)
    async with taking.serving() as one, connect(one) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)
        await stub.RegisterWorkflow(wpb.RegisterWorkflowRequest(name="double", definition=code))
        await stub.RegisterWorkflow(
            wpb.RegisterWorkflowRequest(name="boom", definition=_definition("plain"))
        )
    # started after the registrations: it loads them from the database at start
    refusing = make_app(models=False)
    async with refusing.serving() as two, connect(two) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)
        listed = await stub.ListWorkflows(wpb.ListWorkflowsRequest())
        assert [w.name for w in listed.workflows] == ["boom"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_a_lost_message_is_caught_by_the_periodic_reread(db_url: str) -> None:
    """Two stores on one database with no bus at all (every message lost): the one that
    did not make a change still sees it, from its re-read of the change counter."""
    from nexus_server._registry import WorkflowRegistry
    from nexus_server._workflow_store import WorkflowStore
    from workflow import WorkflowBuilder

    db = DataFlow(db_url)
    await db.initialize()
    writer = WorkflowStore(db, WorkflowRegistry(), None)
    reader_registry = WorkflowRegistry()
    reader = WorkflowStore(db, reader_registry, None, reread=0.05)
    try:
        await writer.initialize()
        await reader.initialize()
        reader.start()
        wf = WorkflowBuilder("Fails.")
        wf.add_node("TestBoomNode", "explode", {"message": "{{message}}"})

        def anyone(owner: str) -> None:
            pass

        await writer.put("boom", wf.build(), "ada", replace=False, limit=10, check_owner=anyone)

        async def until(present: bool) -> None:
            async with asyncio.timeout(WAIT):
                seen = reader_registry.version
                while ("boom" in reader_registry) != present:
                    seen = await reader_registry.wait_changed(seen)

        await until(True)
        item = reader_registry.get("boom")
        assert item.owner == "ada" and not item.builtin
        assert item.workflow.to_definition() == wf.build().to_definition()
        await writer.delete("boom", anyone)
        await until(False)
    finally:
        await reader.close()
        await writer.close()
        await db.close()
