"""The database's circuit breaker against a real PostgreSQL outage: a throwaway cluster
(`pg_cluster`) that the test stops and starts again.

- DataFlow on its own, through a TCP proxy that counts connection attempts: after the
  configured run of failures the breaker opens and every call is refused at once
  (`CircuitOpenError`) without a connection attempt; after the delay one trial call
  goes through (half-open), fails while the cluster is down (open again), and, once
  the cluster is back, succeeds (closed). Nothing acknowledged is lost and nothing
  refused was written.
- The server: while the breaker is open, calls fail with UNAVAILABLE, reason
  `DEPENDENCY_UNAVAILABLE`, a `google.rpc.RetryInfo` and metadata `dependency`; `GET
  /health`'s document (ProbeService.GetHealth) shows the breaker open; an execution the
  breaker refused is not recorded, so its retry with the same request_id runs it once
  the database is back.

Assertions are about states and connection counts, never about time; the times of the
refused calls are printed (pytest -s) beside the time of one connection attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from dataflow import (
    BreakerOptions,
    CircuitBreaker,
    CircuitOpenError,
    DatabaseError,
    DataFlow,
    DataFlowError,
)
from nexus_api.nexus.health.v1 import probe_service_pb2 as ppb
from nexus_api.nexus.health.v1 import probe_service_pb2_grpc as pgrpc
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus
from nexus_server._errors import status_of
from workflow import NodeExecutionError, WorkflowBuilder

#: Bound of every wait (a state change, the cluster coming back).
WAIT = 30.0
#: The most calls a loop makes while waiting for a state.
MAX_CALLS = 200
#: The breaker of these tests: opens at the third failure, a trial after 0.5 s.
OPTIONS = BreakerOptions(failures=3, reset_after=0.5)


class CountingProxy:
    """A TCP proxy on a free port of 127.0.0.1 in front of `host:port`, counting the
    connections it accepts (each is a connection attempt of the client's). When the
    upstream refuses, the client's connection is closed."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port_up = host, port
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_r, up_w = await asyncio.open_connection(self.host, self.port_up)
            except OSError:
                return
            try:
                await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
            finally:
                up_w.close()
        finally:
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        with contextlib.suppress(OSError):
            dst.close()


@pytest.fixture
async def proxy(pg_cluster: Any) -> AsyncIterator[CountingProxy]:
    p = CountingProxy("127.0.0.1", pg_cluster.port)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


def declare(db: DataFlow) -> type[Any]:
    @db.model
    class Note:
        id: str
        text: str

    return Note


async def until_half_open(db: DataFlow) -> None:
    """Wait out the breaker's delay (bounded): open becomes half-open by itself."""
    br = db.breaker
    assert br is not None
    for _ in range(MAX_CALLS):
        if state(br) == "half_open":
            return
        await asyncio.sleep(br.retry_after() + 0.01)
    raise AssertionError(f"the breaker is still {state(br)}")


def state(breaker: CircuitBreaker | None) -> str:
    """The breaker's state, as plain text (mypy would narrow `breaker.state` between
    two reads, but it changes with time)."""
    assert breaker is not None
    return breaker.state


async def test_outage_opens_fails_fast_half_opens_and_closes(
    pg_cluster: Any, proxy: CountingProxy
) -> None:
    db = DataFlow(
        f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres",
        breaker=OPTIONS,
        connection_pool_size=2,
    )
    try:
        Note = declare(db)
        ops = db.ops(Note)
        br = db.breaker
        assert br is not None
        acked: set[str] = set()
        for i in range(20):
            acked.add((await ops.create(id=f"before-{i}", text="up"))["id"])
        assert state(br) == "closed" and br.quiet

        await asyncio.to_thread(pg_cluster.stop, "immediate")
        # the run of failures: each call tries to reach the database, until the third
        refused: set[str] = set()
        outcomes: list[str] = []
        attempt_seconds: list[float] = []
        for i in range(MAX_CALLS):
            if state(br) == "open":
                break
            key = f"down-{i}"
            started = time.perf_counter()
            try:
                await ops.create(id=key, text="down")
                acked.add(key)
                outcomes.append("ok")
            except DatabaseError as exc:
                assert exc.unreachable, exc
                attempt_seconds.append(time.perf_counter() - started)
                refused.add(key)
                outcomes.append("unreachable")
        assert state(br) == "open", outcomes
        assert outcomes.count("unreachable") == OPTIONS.failures
        assert br.opened_total == 1

        # open: refused at once, without a connection attempt
        attempts = proxy.accepted
        fast: list[float] = []
        for i in range(50):
            key = f"open-{i}"
            started = time.perf_counter()
            with pytest.raises(CircuitOpenError) as ei:
                if i % 3 == 0:
                    await ops.create(id=key, text="open")
                elif i % 3 == 1:
                    await ops.read("before-0")
                else:
                    await ops.list(limit=5)
            fast.append(time.perf_counter() - started)
            refused.add(key)
            assert ei.value.dependency == "database"
            assert 0 < ei.value.retry_after <= OPTIONS.reset_after
            if state(br) != "open":
                break  # the delay passed meanwhile (a slow machine)
        # none of the refused calls tried to connect; asyncpg's pool restores its floor
        # of connections in the background, at most once a second (longer than the
        # breaker's delay), so one attempt may be its own
        assert proxy.accepted - attempts <= 1, "a refused call tried to connect"
        assert br.rejected_total == len(fast)
        print(
            f"\nrefused while open: {len(fast)} calls, median "
            f"{statistics.median(fast) * 1e6:.0f} us; a failed connection attempt took "
            f"{statistics.median(attempt_seconds) * 1e6:.0f} us (refused at once here; "
            f"a connect timeout is seconds)"
        )

        # half-open: one trial call, which fails while the cluster is down: open again
        await until_half_open(db)
        with pytest.raises(DatabaseError) as trial:
            await ops.count()
        assert trial.value.unreachable
        assert state(br) == "open" and br.opened_total == 2

        # the cluster comes back: the next trial succeeds and the breaker closes
        await asyncio.to_thread(pg_cluster.start)
        async with asyncio.timeout(WAIT):
            for i in range(MAX_CALLS):
                await until_half_open(db)
                key = f"back-{i}"
                try:
                    await ops.create(id=key, text="back")
                except DataFlowError:
                    refused.add(key)  # a stale pooled connection: the next trial
                    continue
                acked.add(key)
                break
        assert state(br) == "closed" and br.quiet

        # nothing lost, nothing refused was written
        listed = {r["id"] for r in (await ops.list(limit=1000))["records"]}
        assert listed == acked
        assert not (listed & refused)
        assert await ops.count() == len(acked)
    finally:
        await db.close()


# -- through the server ---------------------------------------------------------------


def status_details(err: grpc.aio.AioRpcError) -> tuple[str, dict[str, str], float | None]:
    """The ErrorInfo reason and metadata and the RetryInfo delay (None without one)."""
    status = rpc_status.from_call(err)
    reason, meta, delay = "", {}, None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, meta = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            delay = retry.retry_delay.ToTimedelta().total_seconds()
    return reason, meta, delay


async def health(channel: grpc.aio.Channel) -> dict[str, Any]:
    stub = pgrpc.ProbeServiceStub(channel)  # type: ignore[no-untyped-call]
    body = await stub.GetHealth(ppb.GetHealthRequest(), timeout=WAIT)
    doc: dict[str, Any] = json.loads(body.data)
    return doc


@pytest.mark.timeout(120)
async def test_server_answers_dependency_unavailable_with_retry_info(pg_cluster: Any) -> None:
    # no health pings during the test (a ping that answers would close the breaker): the
    # breaker recovers through its own trial call
    app = Nexus(grpc_port=0, health_check_interval=3600.0, grace_period=1.0)
    db = DataFlow(pg_cluster.url, breaker=OPTIONS)
    declare(db)
    app.integrate_dataflow(db)
    add_note = WorkflowBuilder("Add a note.")
    add_note.add_input("text", str)
    add_note.add_node("NoteCreateNode", "create", {"text": "{{text}}"})
    app.register("add_note", add_note.build())
    br = db.breaker
    assert br is not None
    record = struct_pb2.Struct()
    record.update({"text": "before"})
    try:
        async with (
            app.serving() as served,
            grpc.aio.insecure_channel(served.address) as channel,
        ):
            ms = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            wf = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            await ms.CreateRecord(mpb.CreateRecordRequest(model="Note", record=record))
            doc = await health(channel)
            assert doc["status"] == "healthy"
            assert doc["components"]["breaker"]["state"] == "closed"

            await asyncio.to_thread(pg_cluster.stop, "immediate")
            reasons: list[str] = []
            err: grpc.aio.AioRpcError | None = None
            for _ in range(MAX_CALLS):
                try:
                    await ms.CountRecords(mpb.CountRecordsRequest(model="Note"), timeout=WAIT)
                    reasons.append("OK")
                    continue
                except grpc.aio.AioRpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
                    reason = status_details(e)[0]
                    reasons.append(reason)
                    if reason == "DEPENDENCY_UNAVAILABLE":
                        err = e
                        break
            assert err is not None, reasons
            assert set(reasons[:-1]) <= {"DATABASE_UNAVAILABLE"}, reasons
            reason, meta, delay = status_details(err)
            assert meta == {"dependency": "database"}
            assert delay is not None and 0 < delay <= OPTIONS.reset_after
            message = err.details() or ""
            assert "database unavailable" in message and "retry in" in message
            assert str(pg_cluster.port) not in message and "127.0.0.1" not in message
            doc = await health(channel)
            assert doc["status"] == "unhealthy"
            assert doc["components"]["breaker"]["state"] in ("open", "half_open")
            assert doc["components"]["breaker"]["opened_total"] >= 1

            # an execution the breaker refuses: UNAVAILABLE, not recorded
            request_id = f"note-{uuid.uuid4().hex[:8]}"
            inputs = struct_pb2.Struct()
            inputs.update({"text": "during"})
            call = wpb.ExecuteWorkflowRequest(name="add_note", inputs=inputs, request_id=request_id)
            if state(br) != "open":  # the delay passed: let the trial fail first
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await ms.CountRecords(mpb.CountRecordsRequest(model="Note"), timeout=WAIT)
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await wf.ExecuteWorkflow(call, timeout=WAIT)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value.details()
            reason, meta, delay = status_details(ei.value)
            assert reason == "DEPENDENCY_UNAVAILABLE", ei.value.details()
            assert meta["dependency"] == "database" and delay is not None

            # the database comes back: a trial closes the breaker, the retry runs
            await asyncio.to_thread(pg_cluster.start)
            async with asyncio.timeout(WAIT):
                for _ in range(MAX_CALLS):
                    await until_half_open(db)
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await ms.CountRecords(mpb.CountRecordsRequest(model="Note"), timeout=WAIT)
                    if state(br) == "closed":
                        break
            assert state(br) == "closed"
            done = await wf.ExecuteWorkflow(call, timeout=WAIT)
            assert done.state == wpb.Execution.STATE_SUCCEEDED, done
            again = await wf.ExecuteWorkflow(call, timeout=WAIT)
            assert again.id == done.id  # answered, not run twice
            count = await ms.CountRecords(mpb.CountRecordsRequest(model="Note"), timeout=WAIT)
            assert count.count == 2  # "before" and the retried execution's note
            doc = await health(channel)
            assert doc["components"]["breaker"]["state"] == "closed"
            assert doc["components"]["breaker"]["status"] == "healthy"
    finally:
        await db.close()


def test_circuit_open_error_maps_to_dependency_unavailable() -> None:
    """The mapping alone (no cluster needed): a breaker of a node's own dependency, raised
    directly or from inside a node, is UNAVAILABLE/DEPENDENCY_UNAVAILABLE with RetryInfo."""
    exc = CircuitOpenError("payments", 2.5, 5)
    for raised, extra in (
        (exc, {}),
        (NodeExecutionError("charge", "ChargeNode", exc), {"node_id": "charge"}),
    ):
        status = status_of(raised)
        assert status.code == code_pb2.UNAVAILABLE
        info = error_details_pb2.ErrorInfo()
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info) and status.details[-1].Unpack(retry)
        assert info.reason == "DEPENDENCY_UNAVAILABLE"
        assert info.metadata["dependency"] == "payments"
        assert extra.items() <= dict(info.metadata).items()
        assert retry.retry_delay.ToMilliseconds() == 2500
        assert "payments unavailable" in status.message and "retry in 2.5 s" in status.message
