"""Several `nexus serve --no-envoy` processes on one database act as one server.

Real processes on ephemeral ports: workflows registered on one replica are served by
the others (and survive a restart); an execution running on one replica is watched from
a second and cancelled from a third. The same scenario runs on a PostgreSQL database of
its own (LISTEN/NOTIFY), on one with Redis configured (pub/sub), and on one SQLite file
shared by the processes (the polled bus table).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf import struct_pb2

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc

#: Every wait of this module is bounded by this many seconds.
WAIT = 30.0
REDIS = "redis://127.0.0.1:6379/0"

# The app each replica serves: `slow` runs a fast node, then waits (bounded) until the
# file named by its `gate` input exists, so a test holds it running across processes.
APP = """
import asyncio, os, pathlib, time
from typing import Any
from dataflow import DataFlow
from nexus_server import Nexus
from workflow import Node, Output, Param, WorkflowBuilder, register_node


@register_node
class StepNode(Node):
    type_name = "StepNode"
    parameters = {"text": Param(str)}
    outputs = {"text": Output(str)}

    def run(self, text: str) -> dict[str, Any]:
        return {"text": text}


@register_node
class FileGateNode(Node):
    type_name = "FileGateNode"
    parameters = {"gate": Param(str)}
    outputs = {"opened": Output(bool)}

    async def run(self, gate: str) -> dict[str, Any]:
        give_up = time.monotonic() + 60
        while not pathlib.Path(gate).exists() and time.monotonic() < give_up:
            await asyncio.sleep(0.02)
        return {"opened": pathlib.Path(gate).exists()}


app = Nexus(
    grpc_port=0,
    api_port=None,
    mcp_port=None,
    grace_period=1.0,
    rate_limit_backend=os.environ.get("REPLICA_REDIS_URL"),
)
app.integrate_dataflow(DataFlow(os.environ["REPLICA_DATABASE_URL"]))
slow = WorkflowBuilder("A step, then wait for the gate file.")
slow.add_node("StepNode", "first", {"text": "{{text}}"})
slow.add_node("FileGateNode", "wait", {"gate": "{{gate}}"})
app.register("slow", slow.build())
"""

_LISTENING = re.compile(r"Nexus gRPC server on (127\.0\.0\.1:\d+)")


def _struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _greeting(prefix: str = "Hello") -> wpb.WorkflowDefinition:
    d = wpb.WorkflowDefinition(description="Greets.")
    d.nodes.add(id="greet", type="StepNode", params=_struct(text=f"{prefix} {{{{name}}}}"))
    return d


class Replica:
    """One `nexus serve --no-envoy --no-mcp` process, and a channel to it."""

    def __init__(self, app: Path, db: Database, workdir: Path) -> None:
        self.app, self.db, self.workdir = app, db, workdir
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: Any = None
        self.address = ""

    async def start(self) -> None:
        env = {**os.environ, "REPLICA_DATABASE_URL": self.db.url}
        if self.db.redis:
            env["REPLICA_REDIS_URL"] = self.db.redis
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "nexus_server", "serve", str(self.app),
            "--grpc-port", "0", "--no-envoy", "--no-mcp", "--log-level", "warning",
            cwd=self.workdir, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(WAIT):
            line = (await self.proc.stdout.readline()).decode()
        match = _LISTENING.match(line)
        assert match, f"the replica did not start: {line!r}"
        self.address = match.group(1)
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = wgrpc.WorkflowServiceStub(self.channel)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(WAIT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        assert proc is None or proc.returncode == 0, f"exit status {proc.returncode}"

    async def names(self) -> list[str]:
        listed = await self.stub.ListWorkflows(wpb.ListWorkflowsRequest(), timeout=5)
        return [w.name for w in listed.workflows]


async def _until(what: str, check: Callable[[], Awaitable[bool]]) -> float:
    """Poll `check` until it holds (within `WAIT` seconds); returns the seconds it took."""
    started = time.monotonic()
    async with asyncio.timeout(WAIT):
        for _ in range(int(WAIT / 0.02)):
            if await check():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"{what}: not within {WAIT:g} s")
    took = time.monotonic() - started
    print(f"{what}: {took * 1e3:.0f} ms")
    return took


@dataclass
class Database:
    """Where the replicas meet: a database URL, and Redis's URL when they use Redis."""

    url: str
    redis: str | None = None
    #: the Redis channels a message was published on (Redis only)
    channels: list[str] = field(default_factory=list)


async def _redis_channels(db: Database) -> AsyncIterator[None]:
    """Record the channels of the replicas' Redis messages meanwhile; skip without Redis
    (fail under CI=true)."""
    client = aioredis.Redis.from_url(REDIS, socket_timeout=5)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.psubscribe("nexus:bus:*")
    except Exception as exc:  # pragma: no cover - the machine runs Redis
        await client.aclose()
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Redis at {REDIS}: {exc}")
        pytest.skip(f"no Redis at {REDIS}: {exc}")

    async def record() -> None:
        while True:
            msg = await pubsub.get_message(timeout=1.0)
            if msg is not None and msg.get("type") == "pmessage":
                db.channels.append(msg["channel"].decode())

    task = asyncio.create_task(record())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pubsub.aclose()
        await client.aclose()


@pytest.fixture(params=["postgres", "postgres+redis", "sqlite"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A database of the replicas' own: a new PostgreSQL database (with Redis for their
    messages, or not), or a SQLite file."""
    if request.param == "sqlite":
        yield Database(f"sqlite:///{tmp_path / 'shared.db'}")
        return
    pg_url: str = request.getfixturevalue("pg_url")
    name = f"nexus_replicas_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_url, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        db = Database(f"{pg_url.rsplit('/', 1)[0]}/{name}")
        if request.param == "postgres+redis":
            db.redis = REDIS
            async for _ in _redis_channels(db):
                yield db
        else:
            yield db
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def replicas(database: Database, tmp_path: Path) -> AsyncIterator[list[Replica]]:
    """Three replicas on `database` (the first started alone: it creates the tables)."""
    app = tmp_path / "replica_app.py"
    app.write_text(APP)
    made = [Replica(app, database, tmp_path) for _ in range(3)]
    try:
        await made[0].start()
        await asyncio.gather(made[1].start(), made[2].start())
        yield made
    finally:
        for replica in made:
            if replica.proc is not None and replica.proc.returncode is None:
                replica.proc.kill()
                await replica.proc.wait()
            if replica.channel is not None:
                await replica.channel.close()


async def test_a_registration_reaches_every_replica_and_survives_a_restart(
    replicas: list[Replica], database: Database
) -> None:
    one, two, three = replicas
    greet = wpb.RegisterWorkflowRequest(name="greet", definition=_greeting())
    registered = await one.stub.RegisterWorkflow(greet, timeout=10)
    assert not registered.builtin

    async def everywhere() -> bool:
        return all(["greet" in await r.names() for r in (two, three)])

    await _until("registration seen by 2 replicas", everywhere)
    got = await three.stub.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(name="greet", inputs=_struct(name="Ada")), timeout=10
    )
    assert got.outputs["greet"]["text"] == "Hello Ada"
    assert (await two.stub.GetWorkflow(wpb.GetWorkflowRequest(name="greet"))).definition == (
        registered.definition
    )

    # a replacement on replica 3 replaces it on replica 1
    again = wpb.RegisterWorkflowRequest(name="greet", definition=_greeting("Hi"), replace=True)
    await three.stub.RegisterWorkflow(again, timeout=10)

    async def replaced() -> bool:
        got = await one.stub.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="greet", inputs=_struct(name="Bo")), timeout=10
        )
        return bool(got.outputs["greet"]["text"] == "Hi Bo")

    await _until("replacement seen by replica 1", replaced)

    # deleted on replica 2: gone on 1 and 3
    await two.stub.DeleteWorkflow(wpb.DeleteWorkflowRequest(name="greet"), timeout=10)

    async def gone() -> bool:
        return all(["greet" not in await r.names() for r in (one, three)])

    await _until("deletion seen by 2 replicas", gone)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await one.stub.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="greet", inputs=_struct(name="Cy")), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    # a second registration of the same name on another replica is refused
    kept = wpb.RegisterWorkflowRequest(name="kept", definition=_greeting())
    await one.stub.RegisterWorkflow(kept, timeout=10)
    other = wpb.RegisterWorkflowRequest(name="kept", definition=_greeting("Yo"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await two.stub.RegisterWorkflow(other, timeout=10)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS

    # a network registration never replaces the app's own workflow
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await two.stub.RegisterWorkflow(
            wpb.RegisterWorkflowRequest(name="slow", definition=_greeting(), replace=True),
            timeout=10,
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # a restarted replica serves the stored registrations from its start
    await two.stop()
    await two.start()
    assert "kept" in await two.names()
    got = await two.stub.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(name="kept", inputs=_struct(name="Di")), timeout=10
    )
    assert got.outputs["greet"]["text"] == "Hello Di"
    for replica in replicas:
        await replica.stop()
    if database.redis:  # the messages went through Redis
        assert any(c.endswith(":nexus_workflows") for c in database.channels)


def _stream(replica: Replica, tmp_path: Path, gate: str, request_id: str = "") -> Any:
    return replica.stub.StreamExecution(
        wpb.StreamExecutionRequest(
            name="slow",
            inputs=_struct(text="step", gate=str(tmp_path / gate)),
            request_id=request_id,
        ),
        timeout=WAIT,
    )


async def _running_on(
    replica: Replica, tmp_path: Path, gate: str, request_id: str = ""
) -> tuple[Any, str]:
    """Start `slow` on `replica` (a stream kept open); returns the stream and the id."""
    stream = _stream(replica, tmp_path, gate, request_id)
    first = await stream.read()
    assert first.WhichOneof("event") == "execution_started"
    return stream, first.execution_id


async def _rest(stream: Any) -> list[Any]:
    """The events left on `stream` (read with `read()`: a call read so once cannot be
    iterated), bounded by `WAIT`."""
    events = []
    async with asyncio.timeout(WAIT):
        while (event := await stream.read()) is not grpc.aio.EOF:
            events.append(event)
    return events


async def _watch(replica: Replica, execution_id: str, seen: list[Any]) -> None:
    call = replica.stub.WatchExecution(wpb.WatchExecutionRequest(id=execution_id), timeout=WAIT)
    async for event in call:
        seen.append(event)


async def _recorded_running(replica: Replica, execution_id: str) -> bool:
    try:
        got = await replica.stub.GetExecution(wpb.GetExecutionRequest(id=execution_id), timeout=5)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:  # its RUNNING row is not written yet
            raise
        return False
    return bool(got.state == wpb.Execution.STATE_RUNNING)


async def test_an_execution_is_watched_and_cancelled_from_other_replicas(
    replicas: list[Replica], database: Database, tmp_path: Path
) -> None:
    one, two, three = replicas
    stream, execution_id = await _running_on(three, tmp_path, "never")
    await _until("running row visible", lambda: _recorded_running(two, execution_id))

    seen: list[Any] = []
    watcher = asyncio.create_task(_watch(two, execution_id, seen))

    async def waiting_seen() -> bool:
        return any(
            e.WhichOneof("event") == "node_started" and e.node_started.node_id == "wait"
            for e in seen
        )

    await _until("events forwarded to the watcher", waiting_seen)
    kinds = [e.WhichOneof("event") for e in seen]
    assert kinds[:4] == ["execution_started", "node_started", "node_completed", "node_started"]
    completed = seen[2].node_completed
    assert completed.node_id == "first" and completed.outputs["text"] == "step"
    assert [e.sequence for e in seen] == sorted({e.sequence for e in seen})

    # a second watcher, joining later on another replica, gets every event too
    late: list[Any] = []
    second = asyncio.create_task(_watch(one, execution_id, late))

    async def late_caught_up() -> bool:
        return [e.sequence for e in late] == [e.sequence for e in seen[:4]]

    await _until("events forwarded to a second watcher", late_caught_up)

    cancelled = await one.stub.CancelExecution(
        wpb.CancelExecutionRequest(id=execution_id), timeout=WAIT
    )
    assert cancelled.state == wpb.Execution.STATE_CANCELLED
    async with asyncio.timeout(WAIT):
        await watcher
    assert seen[-1].WhichOneof("event") == "execution_cancelled"
    async with asyncio.timeout(WAIT):
        await second
    assert [e.WhichOneof("event") for e in late] == [e.WhichOneof("event") for e in seen]
    assert seen[-1].execution_cancelled.execution.state == wpb.Execution.STATE_CANCELLED
    record = await one.stub.GetExecution(wpb.GetExecutionRequest(id=execution_id), timeout=5)
    assert record.state == wpb.Execution.STATE_CANCELLED
    # the stream on the replica that ran it ends cancelled too
    assert (await _rest(stream))[-1].WhichOneof("event") == "execution_cancelled"

    # one that completes: the watcher's last event carries its outputs; the same
    # request (its request_id) streamed on another replica streams that execution
    stream, execution_id = await _running_on(three, tmp_path, "open", request_id="once")
    await _until("running row visible", lambda: _recorded_running(one, execution_id))
    seen = []
    watcher = asyncio.create_task(_watch(one, execution_id, seen))
    await _until("events forwarded to the watcher", waiting_seen)
    retried = _stream(two, tmp_path, "open", request_id="once")
    first = await retried.read()
    assert first.execution_id == execution_id  # not run a second time
    assert first.WhichOneof("event") == "execution_started"
    (tmp_path / "open").touch()
    async with asyncio.timeout(WAIT):
        await watcher
    final = seen[-1]
    assert final.WhichOneof("event") == "execution_completed"
    assert final.execution_completed.execution.outputs["wait"]["opened"] is True
    assert (await _rest(stream))[-1].WhichOneof("event") == "execution_completed"
    again_streamed = [first, *await _rest(retried)]
    assert [e.WhichOneof("event") for e in again_streamed] == [e.WhichOneof("event") for e in seen]
    assert {e.execution_id for e in again_streamed} == {execution_id}

    # watching a finished one from anywhere: its final state, from the record
    again: list[Any] = []
    await _watch(two, execution_id, again)
    assert [e.WhichOneof("event") for e in again] == ["execution_completed"]

    # cancelling it now: it already finished
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await two.stub.CancelExecution(wpb.CancelExecutionRequest(id=execution_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for replica in replicas:
        await replica.stop()
    if database.redis:  # the messages went through Redis
        ends = {c.rsplit(":", 1)[1] for c in database.channels}
        assert {"nexus_execution_control", "nexus_execution_events"} <= ends
