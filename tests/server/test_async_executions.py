"""Asynchronous executions: StartExecution (and ExecuteWorkflow `mode: "async"`) return
at once with a QUEUED execution; the durable queue in the app's database runs each one
exactly once on a server process with room, survives restarts, respects the caps, and
settles the executions of a killed process through leases (EXECUTION_LOST, or run again
when retryable)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import jwt
import pytest
import sqlalchemy as sa
from google.protobuf import struct_pb2
from prometheus_client.parser import text_string_to_metric_families

from dataflow import DataFlow
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, QueueOptions, Serving
from nexus_server._store import EXECUTIONS
from nexus_server.gateway import Policy
from workflow import Node, Output, Param, WorkflowBuilder, register_node, unregister_node

WAIT = 10.0
#: Seconds a server subprocess gets to start (importing everything on a busy machine).
STARTUP = 30.0
ROOT = Path(__file__).resolve().parents[2]
S = wpb.Execution.State
FINAL = (S.STATE_SUCCEEDED, S.STATE_FAILED, S.STATE_CANCELLED, S.STATE_INTERRUPTED)
#: Short leases, so that a killed process's executions are settled within a second or two.
FAST = QueueOptions(lease=1.0, heartbeat=0.25, poll_interval=0.2)

both = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

#: Runs of each `QueueTestTallyNode` key, and how many ran at once at most.
TALLY: collections.Counter[str] = collections.Counter()
ACTIVE = {"now": 0, "peak": 0}
#: The gates `QueueTestTallyNode` waits on, by name; `<name>:started` is set when it runs.
GATES: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)


class QueueTestTallyNode(Node):
    """Counts its runs per `key` (the side effect that must happen once), then waits for
    the gate named `gate` when one is given."""

    __test__ = False
    type_name = "QueueTestTallyNode"
    parameters = {"key": Param(str), "gate": Param(str, default="")}
    outputs = {"key": Output(str)}

    async def run(self, key: str, gate: str) -> dict[str, Any]:
        TALLY[key] += 1
        ACTIVE["now"] += 1
        ACTIVE["peak"] = max(ACTIVE["peak"], ACTIVE["now"])
        try:
            if gate:
                GATES[f"{gate}:started"].set()
                await GATES[gate].wait()
        finally:
            ACTIVE["now"] -= 1
        return {"key": key}


class QueueTestHangNode(Node):
    """In this process, returns at once (the re-run of a retryable execution); the
    killed server's node of the same type hangs (see APP)."""

    __test__ = False
    type_name = "QueueTestHangNode"
    parameters = {"x": Param(int)}
    outputs = {"x": Output(int)}

    async def run(self, x: int) -> dict[str, Any]:
        return {"x": x}


@pytest.fixture(autouse=True)
def _queue_nodes() -> Iterator[None]:
    TALLY.clear()
    ACTIVE.update(now=0, peak=0)
    GATES.clear()
    register_node(QueueTestTallyNode)
    register_node(QueueTestHangNode)
    yield
    for event in GATES.values():
        event.set()  # anything still waiting lets go
    unregister_node("QueueTestTallyNode")
    unregister_node("QueueTestHangNode")


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def tally_workflow() -> Any:
    b = WorkflowBuilder("Counts its runs.")
    b.add_input("gate", str, default="")
    b.add_node("QueueTestTallyNode", "tally", {"key": "{{key}}", "gate": "{{gate}}"})
    return b.build()


@contextlib.asynccontextmanager
async def served(app: Nexus, *, envoy: bool = False) -> AsyncIterator[tuple[Serving, Any]]:
    async with asyncio.timeout(WAIT):
        cm = app.serving(envoy=envoy)
        info = await cm.__aenter__()
    try:
        async with grpc.aio.insecure_channel(info.address) as channel:
            yield info, wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
    finally:
        async with asyncio.timeout(WAIT):
            await cm.__aexit__(None, None, None)


async def until_state(wf: Any, execution_id: str, *states: int) -> wpb.Execution:
    """Poll GetExecution until the execution is in one of `states` (within WAIT)."""
    async with asyncio.timeout(WAIT):
        while True:
            ex = await wf.GetExecution(wpb.GetExecutionRequest(id=execution_id), timeout=WAIT)
            if ex.state in states:
                return ex
            assert ex.state not in FINAL, ex
            await asyncio.sleep(0.02)


async def occupied(
    wf: Any, gates: dict[str, asyncio.Event], key: str, gate: str, keys: list[str]
) -> tuple[wpb.Execution, list[wpb.Execution]]:
    """Start a `tally` execution held by `gate` (once it runs), then queue one per `keys`."""
    held = await wf.StartExecution(
        wpb.StartExecutionRequest(name="tally", inputs=struct(key=key, gate=gate)), timeout=WAIT
    )
    await started(gates, gate)
    queued = [
        await wf.StartExecution(
            wpb.StartExecutionRequest(name="tally", inputs=struct(key=k)), timeout=WAIT
        )
        for k in keys
    ]
    return held, queued


@pytest.fixture
def gates() -> dict[str, asyncio.Event]:
    """The gates of `QueueTestTallyNode` (created on first use)."""
    return GATES


async def started(gates: dict[str, asyncio.Event], *names: str) -> None:
    async with asyncio.timeout(WAIT):
        for name in names:
            await gates[f"{name}:started"].wait()


# -- the contract --------------------------------------------------------------------------


@both
async def test_start_returns_queued_at_once_then_runs_to_its_result(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(queue=QueueOptions(max_running=1))
    app.register("tally", tally_workflow())
    async with served(app) as (_, wf):
        first = await wf.StartExecution(
            wpb.StartExecutionRequest(name="tally", inputs=struct(key="a", gate="a")),
            timeout=WAIT,
        )
        assert first.id and first.state == S.STATE_QUEUED
        assert first.inputs["key"] == "a" and not first.HasField("start_time")
        # the original's form; the only slot is taken, so it stays queued meanwhile
        second = await wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="tally", inputs=struct(key="b"), mode="async"),
            timeout=WAIT,
        )
        assert second.state == S.STATE_QUEUED
        await started(gates, "a")
        running = await until_state(wf, first.id, S.STATE_RUNNING)
        assert running.HasField("start_time")
        assert (await wf.GetExecution(wpb.GetExecutionRequest(id=second.id))).state == (
            S.STATE_QUEUED
        )
        gates["a"].set()
        done = await until_state(wf, first.id, S.STATE_SUCCEEDED)
        assert done.outputs["tally"]["key"] == "a"
        later = await until_state(wf, second.id, S.STATE_SUCCEEDED)
        assert later.outputs["tally"]["key"] == "b"
        # the original's status route takes the workflow's name: another's is not found
        status = await wf.GetExecution(wpb.GetExecutionRequest(id=first.id, workflow="tally"))
        assert status == done
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await wf.GetExecution(wpb.GetExecutionRequest(id=first.id, workflow="boom"))
        assert other.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(TALLY) == {"a": 1, "b": 1}


async def test_requests_are_checked_before_anything_is_queued(
    make_app: Callable[..., Nexus], expect_error: Any
) -> None:
    app = make_app()
    app.register("tally", tally_workflow())
    async with served(app) as (_, wf):
        await expect_error(
            wf.ExecuteWorkflow(
                wpb.ExecuteWorkflowRequest(name="tally", inputs=struct(key="a"), mode="later")
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUEST_INVALID",
            fields=["mode"],
        )
        await expect_error(
            wf.StartExecution(wpb.StartExecutionRequest(name="tally", inputs=struct(k=1))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INPUTS_INVALID",
        )
        await expect_error(
            wf.StartExecution(wpb.StartExecutionRequest(name="nope")),
            grpc.StatusCode.NOT_FOUND,
            "WORKFLOW_NOT_FOUND",
        )
        listed = await wf.ListExecutions(wpb.ListExecutionsRequest())
        assert listed.executions == []
        # a request_id: the retry returns the queued execution, other inputs conflict
        req = wpb.StartExecutionRequest(name="tally", inputs=struct(key="r"), request_id="r-1")
        one = await wf.StartExecution(req, timeout=WAIT)
        again = await wf.StartExecution(req, timeout=WAIT)
        assert again.id == one.id
        await expect_error(
            wf.StartExecution(
                wpb.StartExecutionRequest(name="tally", inputs=struct(key="x"), request_id="r-1")
            ),
            grpc.StatusCode.ALREADY_EXISTS,
            "REQUEST_ID_CONFLICT",
        )
        await until_state(wf, one.id, S.STATE_SUCCEEDED)
    assert dict(TALLY) == {"r": 1}


async def test_a_queued_execution_can_be_cancelled(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(queue=QueueOptions(max_running=1))
    app.register("tally", tally_workflow())
    async with served(app) as (_, wf):
        busy = await wf.StartExecution(
            wpb.StartExecutionRequest(name="tally", inputs=struct(key="a", gate="c")),
            timeout=WAIT,
        )
        await started(gates, "c")
        waiting = await wf.StartExecution(
            wpb.StartExecutionRequest(name="tally", inputs=struct(key="b")), timeout=WAIT
        )
        cancelled = await wf.CancelExecution(wpb.CancelExecutionRequest(id=waiting.id))
        assert cancelled.state == S.STATE_CANCELLED
        assert cancelled.error.code == grpc.StatusCode.CANCELLED.value[0]
        gates["c"].set()
        await until_state(wf, busy.id, S.STATE_SUCCEEDED)
        assert (await wf.GetExecution(wpb.GetExecutionRequest(id=waiting.id))).state == (
            S.STATE_CANCELLED
        )
    assert dict(TALLY) == {"a": 1}


async def test_watching_a_queued_execution_follows_it_once_it_runs(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(queue=QueueOptions(max_running=1))
    app.register("tally", tally_workflow())
    async with served(app) as (_, wf):
        busy = await wf.StartExecution(
            wpb.StartExecutionRequest(name="tally", inputs=struct(key="a", gate="w")),
            timeout=WAIT,
        )
        await started(gates, "w")
        queued = await wf.StartExecution(
            wpb.StartExecutionRequest(name="tally", inputs=struct(key="b")), timeout=WAIT
        )
        stream = wf.WatchExecution(wpb.WatchExecutionRequest(id=queued.id), timeout=WAIT)
        gates["w"].set()
        events = [ev async for ev in stream]
        kinds = [ev.WhichOneof("event") for ev in events]
        # (its node events too when the watcher was there before it ended)
        assert kinds[-1] == "execution_completed", kinds
        final = events[-1].execution_completed.execution
        assert final.state == S.STATE_SUCCEEDED and final.outputs["tally"]["key"] == "b"
        await until_state(wf, busy.id, S.STATE_SUCCEEDED)


async def test_rest_through_envoy_queues_and_reads_the_status(
    make_app: Callable[..., Nexus], envoy_path: Path, gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(api_port=0)
    app.register("tally", tally_workflow())
    async with (
        served(app, envoy=True) as (info, _),
        httpx.AsyncClient(base_url=f"http://{info.api_address}", timeout=WAIT) as c,
    ):
        made = await c.post(
            "/workflows/tally/execute",
            json={"inputs": {"key": "rest", "gate": "rest"}, "mode": "async"},
        )
        assert made.status_code == 200, made.text
        body = made.json()
        assert body["state"] == "STATE_QUEUED" and body["id"]
        await started(gates, "rest")
        status = await c.get(f"/workflows/tally/status/{body['id']}")
        assert status.status_code == 200, status.text
        assert status.json()["state"] == "STATE_RUNNING"
        gates["rest"].set()
        async with asyncio.timeout(WAIT):
            while True:
                status = await c.get(f"/workflows/tally/status/{body['id']}")
                if status.json()["state"] == "STATE_SUCCEEDED":
                    break
                await asyncio.sleep(0.02)
        assert status.json()["outputs"] == {"tally": {"key": "rest"}}
        # the AIP route does the same
        v1 = await c.post("/v1/workflows/tally:start", json={"inputs": {"key": "v1"}})
        assert v1.status_code == 200, v1.text
        assert v1.json()["state"] == "STATE_QUEUED"
        other = await c.get(f"/workflows/boom/status/{body['id']}")
        assert other.status_code == 404
        assert other.json()["details"][0]["reason"] == "EXECUTION_NOT_FOUND"
        bad = await c.post(
            "/workflows/tally/execute", json={"inputs": {"key": "x"}, "mode": "later"}
        )
        assert bad.status_code == 400
        assert "mode" in bad.json()["message"]


# -- durability and exactly once -------------------------------------------------------------


@both
async def test_queued_executions_survive_a_restart_and_run_once(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    first = make_app(queue=QueueOptions(max_running=1), grace_period=0.1)
    first.register("tally", tally_workflow())
    async with served(first) as (_, wf):
        blocker, queued = await occupied(wf, gates, "blocker", "never", [f"k{i}" for i in range(5)])
        for ex in queued:  # the only slot is taken: they wait
            got = await wf.GetExecution(wpb.GetExecutionRequest(id=ex.id))
            assert got.state == S.STATE_QUEUED
    # the graceful stop cancelled the one running; the queued ones are still queued
    assert first.db is not None
    await first.db.close()
    assert dict(TALLY) == {"blocker": 1}

    second = make_app()
    second.register("tally", tally_workflow())
    async with served(second) as (_, wf):
        assert (await wf.GetExecution(wpb.GetExecutionRequest(id=blocker.id))).state == (
            S.STATE_CANCELLED
        )
        for ex in queued:
            done = await until_state(wf, ex.id, S.STATE_SUCCEEDED)
            assert done.outputs["tally"]["key"] == ex.inputs["key"]
    assert dict(TALLY) == {"blocker": 1, **{f"k{i}": 1 for i in range(5)}}


async def test_a_stop_gives_a_retryable_execution_back_to_the_queue(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    first = make_app(grace_period=0.1)
    first.register("tally", tally_workflow(), retryable=True)
    async with served(first) as (_, wf):
        ex = await wf.StartExecution(
            wpb.StartExecutionRequest(name="tally", inputs=struct(key="r", gate="r")),
            timeout=WAIT,
        )
        await started(gates, "r")
    assert first.db is not None
    await first.db.close()

    gates["r"].set()
    second = make_app()
    second.register("tally", tally_workflow(), retryable=True)
    async with served(second) as (_, wf):
        done = await until_state(wf, ex.id, S.STATE_SUCCEEDED)
        assert done.outputs["tally"]["key"] == "r"
        assert second.db is not None
        async with second.db.connection() as conn:
            attempts = (
                await conn.execute(sa.select(EXECUTIONS.c.attempts).where(EXECUTIONS.c.id == ex.id))
            ).scalar_one()
    assert attempts == 2
    assert dict(TALLY) == {"r": 2}  # retryable: the cut run and the whole one


@both
async def test_two_servers_on_one_database_claim_different_executions(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    # two slots each: four gated executions can only all start if both claim two
    a = make_app(queue=QueueOptions(max_running=2, poll_interval=0.2))
    b = make_app(models=False, queue=QueueOptions(max_running=2, poll_interval=0.2))
    for app in (a, b):
        app.register("tally", tally_workflow())
    async with served(a) as (_, wa), served(b) as (_, wb):
        gated = [
            await (wa if i % 2 else wb).StartExecution(
                wpb.StartExecutionRequest(name="tally", inputs=struct(key=f"g{i}", gate=f"g{i}")),
                timeout=WAIT,
            )
            for i in range(4)
        ]
        await started(gates, *(f"g{i}" for i in range(4)))
        # and many more, started on both, while those hold two slots of each
        more = [
            await (wa if i % 2 else wb).StartExecution(
                wpb.StartExecutionRequest(name="tally", inputs=struct(key=f"m{i}")),
                timeout=WAIT,
            )
            for i in range(30)
        ]
        for i in range(4):
            gates[f"g{i}"].set()
        for ex in gated + more:
            await until_state(wa, ex.id, S.STATE_SUCCEEDED)
        assert a.db is not None
        async with a.db.connection() as conn:
            rows = (await conn.execute(sa.select(EXECUTIONS.c.id, EXECUTIONS.c.runner))).all()
    runners = {runner for _, runner in rows}
    assert len(rows) == 34 and len(runners) == 2 and None not in runners
    # every side effect happened exactly once
    assert dict(TALLY) == {**{f"g{i}": 1 for i in range(4)}, **{f"m{i}": 1 for i in range(30)}}


@pytest.mark.parametrize(
    ("backend", "bus"),
    [("postgres", "postgres"), ("postgres", "redis"), ("sqlite", "sqlite")],
    indirect=["backend"],
)
async def test_the_bus_wakes_the_other_servers_at_once(
    make_app: Callable[..., Nexus],
    gates: dict[str, asyncio.Event],
    bus: str,
    pg_admin: Any,
    request: pytest.FixtureRequest,
) -> None:
    """A queued execution wakes the other replicas' claimers through the replicas' bus
    (PostgreSQL's NOTIFY, Redis, SQLite's bus table), the queue holding no connection
    of its own."""
    options: dict[str, Any] = {}
    if bus == "redis":
        options["rate_limit_backend"] = request.getfixturevalue("redis_url")
    # b polls once a minute: only the bus can wake it within the test's bound
    a = make_app(queue=QueueOptions(max_running=1), **options)
    b = make_app(
        models=False,
        queue=QueueOptions(poll_interval=60.0, lease=120.0, heartbeat=60.0),
        **options,
    )
    for app in (a, b):
        app.register("tally", tally_workflow())
    async with served(a) as (_, wa), served(b) as (_, wb):
        if bus == "postgres":
            # one listening connection per server process: the bus's (the queue's
            # wake-ups share it)
            listening = await pg_admin(
                "SELECT application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
            )
            assert {row[0] for row in listening} <= {"nexus-bus"}, listening
        busy = await wa.StartExecution(
            wpb.StartExecutionRequest(name="tally", inputs=struct(key="busy", gate="busy")),
            timeout=WAIT,
        )
        await started(gates, "busy")
        for i in range(3):  # a has no room: b runs them, woken by each message
            ex = await wa.StartExecution(
                wpb.StartExecutionRequest(name="tally", inputs=struct(key=f"n{i}")),
                timeout=WAIT,
            )
            done = await until_state(wb, ex.id, S.STATE_SUCCEEDED)
            assert done.owner == ex.owner
        gates["busy"].set()
        await until_state(wa, busy.id, S.STATE_SUCCEEDED)
    assert dict(TALLY) == {"busy": 1, "n0": 1, "n1": 1, "n2": 1}


@pytest.fixture
def pg_admin(backend: str, db_url: str) -> Callable[[str], Any]:
    """`await pg_admin(sql)`: the rows of `sql` on the test's PostgreSQL database."""

    async def run(sql: str) -> list[Any]:
        conn = await asyncpg.connect(db_url, timeout=5)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()

    return run


# -- what the queue reports ------------------------------------------------------------------


async def test_the_queue_is_in_the_metrics_and_the_health_component(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(
        queue=QueueOptions(max_running=1, lease=1.0, heartbeat=0.2, poll_interval=0.2),
        enable_monitoring=True,
        metrics_port=None,
    )
    app.register("tally", tally_workflow())

    def read(serving: Serving) -> dict[str, float]:
        assert serving.metrics is not None
        text = serving.metrics.exposition().decode()
        return {
            s.name + (f"{{{s.labels['state']}}}" if "state" in s.labels else ""): s.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("nexus_queue")
            for s in family.samples
            if not s.name.endswith("_created")
        }

    async def settles(serving: Serving, **expected: float) -> dict[str, float]:
        async with asyncio.timeout(WAIT):
            while True:
                found = read(serving)
                if all(found.get(k) == v for k, v in expected.items()):
                    return found
                await asyncio.sleep(0.05)

    async with served(app) as (serving, wf):
        busy, queued = await occupied(wf, gates, "busy", "busy", ["q0", "q1"])
        # the one slot is taken: two wait, counted at the next heartbeat
        found = await settles(
            serving,
            nexus_queue_waiting=2,
            nexus_queue_running=1,
            nexus_queue_capacity=1,
            nexus_queue_claimed_total=1,
        )
        assert not any(k.startswith("nexus_queue_settled_total") for k in found), found
        component = app.health.state("queue")  # GET /health's component
        assert component is not None and component["waiting"] == 2, component
        assert component["running"] == 1 and component["max_running"] == 1
        gates["busy"].set()
        for ex in [busy, *queued]:
            await until_state(wf, ex.id, S.STATE_SUCCEEDED)
        await settles(
            serving, nexus_queue_waiting=0, nexus_queue_running=0, nexus_queue_claimed_total=3
        )


# -- caps --------------------------------------------------------------------------------------


async def test_caps_per_process_and_per_workflow_hold(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    app = make_app(queue=QueueOptions(max_running=3))
    app.register("tally", tally_workflow(), max_running=2)
    app.register("other", tally_workflow())
    async with served(app) as (_, wf):
        capped = [
            await wf.StartExecution(
                wpb.StartExecutionRequest(name="tally", inputs=struct(key=f"t{i}", gate=f"t{i}")),
                timeout=WAIT,
            )
            for i in range(4)
        ]
        await started(gates, "t0", "t1")
        # this one is claimed by a pass that passes over the older capped ones
        probe = await wf.StartExecution(
            wpb.StartExecutionRequest(name="other", inputs=struct(key="probe")), timeout=WAIT
        )
        await until_state(wf, probe.id, S.STATE_SUCCEEDED)
        states = [(await wf.GetExecution(wpb.GetExecutionRequest(id=ex.id))).state for ex in capped]
        assert states == [S.STATE_RUNNING, S.STATE_RUNNING, S.STATE_QUEUED, S.STATE_QUEUED]
        # the process's own cap: 2 of tally and 1 other fill its 3 slots
        held = await wf.StartExecution(
            wpb.StartExecutionRequest(name="other", inputs=struct(key="o1", gate="o1")),
            timeout=WAIT,
        )
        await started(gates, "o1")
        waiting = await wf.StartExecution(
            wpb.StartExecutionRequest(name="other", inputs=struct(key="o2")), timeout=WAIT
        )
        assert ACTIVE["now"] == 3
        assert (await wf.GetExecution(wpb.GetExecutionRequest(id=waiting.id))).state == (
            S.STATE_QUEUED
        )
        for name in ("t0", "t1", "t2", "t3", "o1"):
            gates[name].set()
        for ex in [*capped, held, waiting]:
            await until_state(wf, ex.id, S.STATE_SUCCEEDED)
    assert ACTIVE["peak"] <= 3
    assert sum(TALLY.values()) == 7


# -- a killed server process -------------------------------------------------------------------

APP = """
import asyncio, sys

from dataflow import DataFlow
from nexus_server import Nexus, QueueOptions
from workflow import Node, Output, Param, WorkflowBuilder, register_node


@register_node
class QueueTestHangNode(Node):
    parameters = {"x": Param(int)}
    outputs = {"x": Output(int)}

    async def run(self, x):
        await asyncio.Event().wait()  # until the process is killed
        return {"x": x}


app = Nexus(
    grpc_port=0, api_port=None, mcp_port=None,
    queue=QueueOptions(max_running=2, lease=1.0, heartbeat=0.25, poll_interval=0.2),
)
app.integrate_dataflow(DataFlow(sys.argv[1]))
for name, retryable in (("hang", False), ("hang_retry", True)):
    wf = WorkflowBuilder()
    wf.add_node("QueueTestHangNode", "hang", {"x": "{{x}}"})
    app.register(name, wf.build(), retryable=retryable)
app.start()
"""


def hang_app(other: Nexus) -> None:
    for name, retryable in (("hang", False), ("hang_retry", True)):
        b = WorkflowBuilder()
        b.add_node("QueueTestHangNode", "hang", {"x": "{{x}}"})
        other.register(name, b.build(), retryable=retryable)


@both
async def test_a_killed_process_executions_are_lost_or_run_again(
    make_app: Callable[..., Nexus], db_url: str, tmp_path: Path
) -> None:
    script = tmp_path / "queue_app.py"
    script.write_text(textwrap.dedent(APP))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), db_url, stdout=subprocess.PIPE, env=env, cwd=tmp_path
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(STARTUP):
            line = (await proc.stdout.readline()).decode()
        found = re.search(r"\bon (127\.0\.0\.1:\d+)", line)
        assert found, line
        async with grpc.aio.insecure_channel(found.group(1)) as channel:
            killed = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            lost = await killed.StartExecution(
                wpb.StartExecutionRequest(name="hang", inputs=struct(x=1)), timeout=WAIT
            )
            retried = await killed.StartExecution(
                wpb.StartExecutionRequest(name="hang_retry", inputs=struct(x=2), request_id="rr"),
                timeout=WAIT,
            )
            await until_state(killed, lost.id, S.STATE_RUNNING)
            await until_state(killed, retried.id, S.STATE_RUNNING)
            # its two slots are taken: these wait in the queue
            waiting = [
                await killed.StartExecution(
                    wpb.StartExecutionRequest(name="hang", inputs=struct(x=10 + i)),
                    timeout=WAIT,
                )
                for i in range(3)
            ]
            for ex in waiting:
                got = await killed.GetExecution(wpb.GetExecutionRequest(id=ex.id))
                assert got.state == S.STATE_QUEUED

            # another server process on the same database, before the kill
            other = make_app(models=False, queue=FAST)
            hang_app(other)
            async with served(other) as (_, wf):
                proc.send_signal(signal.SIGKILL)
                async with asyncio.timeout(WAIT):
                    await proc.wait()
                # within lease + heartbeat (1.25 s here; WAIT bounds the test)
                failed = await until_state(wf, lost.id, S.STATE_FAILED)
                assert failed.error.code == grpc.StatusCode.ABORTED.value[0]
                assert "stopped before it finished" in failed.error.message
                again = await until_state(wf, retried.id, S.STATE_SUCCEEDED)
                assert again.outputs["hang"]["x"] == 2 and again.request_id == "rr"
                # what the killed process had queued runs on the other one
                for i, ex in enumerate(waiting):
                    done = await until_state(wf, ex.id, S.STATE_SUCCEEDED)
                    assert done.outputs["hang"]["x"] == 10 + i
                assert other.db is not None
                async with other.db.connection() as conn:
                    attempts = (
                        await conn.execute(
                            sa.select(EXECUTIONS.c.attempts).where(EXECUTIONS.c.id == retried.id)
                        )
                    ).scalar_one()
                assert attempts == 2
                # GET /health's `queue` component says what this process did
                queue = other.health.state("queue")
                assert queue is not None and queue["status"] == "healthy"
                assert queue["settled_total"] == {"FAILED": 1, "QUEUED": 1}
                assert queue["claimed_total"] == 1 + len(waiting)  # the retried one, the waiting
                assert queue["max_running"] == FAST.max_running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@both
async def test_a_live_process_executions_are_not_touched_by_another_start(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    # what the startup sweep used to do wrong with several processes on one database
    a = make_app(queue=FAST)
    a.register("tally", tally_workflow())
    async with served(a) as (_, wa):
        running = wa.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="tally", inputs=struct(key="s", gate="s"))
        )
        pending = asyncio.ensure_future(running)
        queued = await wa.StartExecution(
            wpb.StartExecutionRequest(name="tally", inputs=struct(key="q", gate="q")),
            timeout=WAIT,
        )
        await started(gates, "s", "q")
        b = make_app(models=False, queue=FAST)
        b.register("tally", tally_workflow())
        async with served(b) as (_, wb):
            # several lease periods: each renewed by a, so b leaves them alone
            for _ in range(3):
                await asyncio.sleep(FAST.lease)
                got = await wb.ListExecutions(wpb.ListExecutionsRequest(state=S.STATE_RUNNING))
                assert len(got.executions) == 2
            gates["s"].set()
            gates["q"].set()
            async with asyncio.timeout(WAIT):
                done = await pending
            assert done.state == S.STATE_SUCCEEDED
            await until_state(wb, queued.id, S.STATE_SUCCEEDED)
    assert dict(TALLY) == {"s": 1, "q": 1}


@both
async def test_a_process_taken_for_dead_changes_nothing_when_it_finishes(
    make_app: Callable[..., Nexus], gates: dict[str, asyncio.Event]
) -> None:
    slow = make_app(queue=QueueOptions(lease=60.0, heartbeat=30.0))
    slow.register("tally", tally_workflow())
    async with served(slow) as (_, ws):
        ex = await ws.StartExecution(
            wpb.StartExecutionRequest(name="tally", inputs=struct(key="late", gate="late")),
            timeout=WAIT,
        )
        await started(gates, "late")
        await until_state(ws, ex.id, S.STATE_RUNNING)
        assert slow.db is not None
        async with slow.db.connection() as conn:  # its lease lapses (a long pause)
            await conn.execute(
                EXECUTIONS.update()
                .where(EXECUTIONS.c.id == ex.id)
                .values(lease_until=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
            )
        sweeper = make_app(models=False, queue=FAST)
        sweeper.register("tally", tally_workflow())
        async with served(sweeper) as (_, wf):
            lost = await until_state(wf, ex.id, S.STATE_FAILED)
            gates["late"].set()  # the slow process finishes after all
            async with asyncio.timeout(WAIT):
                # its own reply shows its finished record until written, then the row:
                # still the sweep's, if the late record changed nothing (else SUCCEEDED
                # for good, and this loop runs out of time)
                while True:
                    seen = await ws.GetExecution(wpb.GetExecutionRequest(id=ex.id))
                    if seen.state == S.STATE_FAILED:
                        break
                    await asyncio.sleep(0.02)
            assert dict(TALLY) == {"late": 1}
            assert seen == lost
            assert await wf.GetExecution(wpb.GetExecutionRequest(id=ex.id)) == lost
            assert "stopped before it finished" in lost.error.message


@both
async def test_a_queued_execution_runs_as_its_callers_tenant(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "q" * 40
    monkeypatch.setenv("NEXUS_JWT_SECRET", secret)

    def creds(sub: str, tenant: str) -> Any:
        claims = {"sub": sub, "roles": ["staff"], "tenant": tenant, "exp": int(time.time()) + 600}
        return (("authorization", "Bearer " + jwt.encode(claims, secret, algorithm="HS256")),)

    db = DataFlow(db_url)

    @db.model(tenant_scoped=True)
    class Note:
        id: str
        title: str

    add = WorkflowBuilder()
    add.add_node("NoteCreateNode", "add", {"title": "{{title}}"})
    count = WorkflowBuilder()
    count.add_node("NoteCountNode", "count", {})
    app = Nexus(
        grpc_port=0,
        enable_auth=True,
        grace_period=2.0,
        policy=Policy({"staff": ["model:Note:*", "workflow:*:execute"]}),
    )
    app.integrate_dataflow(db)
    app.register("add_note", add.build())
    app.register("count_notes", count.build())
    acme, globex = creds("ann", "acme"), creds("bob", "globex")
    try:
        async with served(app) as (_, wf):
            ex = await wf.StartExecution(
                wpb.StartExecutionRequest(name="add_note", inputs=struct(title="hi")),
                metadata=acme,
                timeout=WAIT,
            )
            async with asyncio.timeout(WAIT):
                while True:
                    got = await wf.GetExecution(wpb.GetExecutionRequest(id=ex.id), metadata=acme)
                    if got.state not in (S.STATE_QUEUED, S.STATE_RUNNING):
                        break
                    await asyncio.sleep(0.02)
            assert got.state == S.STATE_SUCCEEDED, got.error
            assert got.outputs["add"]["tenant_id"] == "acme"
            for who, expected in ((acme, 1), (globex, 0)):
                counted = await wf.ExecuteWorkflow(
                    wpb.ExecuteWorkflowRequest(name="count_notes"), metadata=who, timeout=WAIT
                )
                assert counted.outputs["count"]["count"] == expected
    finally:
        await db.close()


async def test_queue_options_are_checked() -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        Nexus(queue=QueueOptions(lease=1.0, heartbeat=2.0))
    with pytest.raises(ValueError, match="max_running"):
        Nexus(queue=QueueOptions(max_running=0))
    with pytest.raises(TypeError, match="QueueOptions"):
        Nexus(queue={"max_running": 1})  # type: ignore[arg-type]
    app = Nexus()
    with pytest.raises(ValueError, match="max_running"):
        app.register("tally", tally_workflow(), max_running=0)


async def test_count_records_after_queued_creates(
    make_app: Callable[..., Nexus],
) -> None:
    """A queued workflow's writes are the app's: five queued creates, five contacts."""
    app = make_app()
    async with served(app) as (info, wf):
        made = [
            await wf.StartExecution(
                wpb.StartExecutionRequest(
                    name="create_contact",
                    inputs=struct(name=f"C{i}", email=f"c{i}@x.io"),
                    request_id=f"c-{i}",
                ),
                timeout=WAIT,
            )
            for i in range(5)
        ]
        for ex in made:
            await until_state(wf, ex.id, S.STATE_SUCCEEDED)
        async with grpc.aio.insecure_channel(info.address) as channel:
            ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            count = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"))
        assert count.count == 5
