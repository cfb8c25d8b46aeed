"""An acknowledged call is never lost and never run twice: `kill -9` of `nexus serve`
under write load, and a PostgreSQL outage mid-load (issue 14, sections 3 and 5).

Both drive `create_entry` with several concurrent clients, each call with a request_id
and an email of its own (bounded: `CALLS` calls within `LOAD_SECONDS`), then retry
every call that was sent, acknowledged or not, with the same request_id, and check:

- every acknowledged call's execution record exists, and its retry answers with the
  same execution (0 lost);
- no request wrote its entry twice: `Entry.email` is not unique, so a second run of a
  request would leave two rows with its email (0 duplicates);
- a retry of an unacknowledged call either runs it now or answers with the failure
  recorded for it (ABORTED when a crash interrupted it), and nothing else; a call the
  outage failed (UNAVAILABLE) kept nothing and is not recorded, so its retry runs it;
- a request recorded as failed wrote nothing (its only writes go to the app's
  database, so its record commits in the same transaction as them: the record and the
  data never disagree).
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc

Details = Callable[[grpc.aio.AioRpcError], tuple[str, dict[str, str], list[str]]]
Serve = Callable[..., Awaitable[Any]]

#: Calls planned per load (at most this many are sent).
CALLS = 400
#: Concurrent clients, each on a channel of its own.
WORKERS = 8
#: The load must be over within this many seconds.
LOAD_SECONDS = 20.0
#: The client deadline of every call; a call taking this long hung.
CALL_TIMEOUT = 10.0
#: During the outage every call must have failed within this many seconds.
FAIL_FAST = 5.0
#: Bound for health changes and for the server to come back.
WAIT = 30.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Code = grpc.StatusCode
UNAVAILABLE = Code.UNAVAILABLE
#: What an error message must not show: a driver's or Python's exception class (ours,
#: dataflow's DatabaseError, is allowed), an errno, an address.
LEAK = re.compile(
    r"(?<![A-Za-z])(?!DatabaseError\b)[A-Z][A-Za-z]*(Error|Exception)\b|Errno|asyncpg|127\.0\.0\.1"
)


@dataclass
class Call:
    """One planned ExecuteWorkflow call and what became of it."""

    request_id: str
    email: str
    sent: bool = False
    phase: str = ""  # the fault's phase when it was sent: "up", "stopping", "down"
    ended: str = ""  # the fault's phase when it was answered
    execution_id: str = ""  # set when acknowledged
    error: Code | None = None
    message: str = ""
    failed_id: str = ""  # the execution a failure names (ErrorInfo metadata), if any
    seconds: float = 0.0
    retry: str = ""  # how its retry was answered (see `retry_all`)
    retry_id: str = ""

    @property
    def acked(self) -> bool:
        return bool(self.execution_id)

    def request(self) -> wpb.ExecuteWorkflowRequest:
        inputs = struct_pb2.Struct()
        inputs.update({"name": "Load", "email": self.email})
        return wpb.ExecuteWorkflowRequest(
            name="create_entry", inputs=inputs, request_id=self.request_id
        )


def plan(tag: str, n: int = CALLS) -> list[Call]:
    run = uuid.uuid4().hex[:8]
    return [Call(f"{tag}-{run}-{i}", f"{tag}-{run}-{i}@faults.test") for i in range(n)]


@dataclass
class Load:
    """Sends the planned calls from `WORKERS` clients until they are all sent or `stop`
    is set; `on_reply` sees each call as it ends. While `go` is clear no new call is
    sent (the calls in flight go on)."""

    address: str
    calls: list[Call]
    details: Details
    on_reply: Callable[[Call], None] = lambda call: None
    phase: Callable[[], str] = lambda: "up"
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    go: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.go.set()

    async def _worker(self, todo: collections.deque[Call]) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            while todo and not self.stop.is_set():
                await self.go.wait()  # bounded by `run`'s timeout
                call = todo.popleft()
                call.sent, call.phase = True, self.phase()
                started = time.monotonic()
                try:
                    done = await stub.ExecuteWorkflow(call.request(), timeout=CALL_TIMEOUT)
                    call.execution_id = done.id
                except grpc.aio.AioRpcError as err:
                    call.error, call.message = err.code(), err.details() or ""
                    call.failed_id = self.details(err)[1].get("execution_id", "")
                call.seconds = time.monotonic() - started
                call.ended = self.phase()
                self.on_reply(call)

    async def run(self) -> None:
        todo = collections.deque(self.calls)
        try:
            async with asyncio.timeout(LOAD_SECONDS):
                await asyncio.gather(*(self._worker(todo) for _ in range(WORKERS)))
        except TimeoutError:
            raise AssertionError(f"the load was not over within {LOAD_SECONDS} s") from None


async def retry_all(address: str, calls: list[Call], details: Details) -> None:
    """Retry every sent call once with its request_id and sort the answers into
    `Call.retry`: "same" (the acknowledged execution), "other" (an execution other than
    the acknowledged one: the call ran twice), "ran" (an unacknowledged call ran now),
    "recorded:<CODE>" (the failure recorded for it, with its execution id) or
    "error:<CODE>:<reason>" (anything else)."""
    todo = collections.deque(c for c in calls if c.sent)

    async def worker() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            while todo:
                call = todo.popleft()
                try:
                    done = await stub.ExecuteWorkflow(call.request(), timeout=CALL_TIMEOUT)
                except grpc.aio.AioRpcError as err:
                    reason, metadata, _ = details(err)
                    if metadata.get("execution_id"):
                        call.retry, call.retry_id = (
                            f"recorded:{err.code().name}",
                            metadata["execution_id"],
                        )
                    else:
                        call.retry = f"error:{err.code().name}:{reason}:{err.details()}"
                    continue
                call.retry_id = done.id
                if call.acked:
                    call.retry = "same" if done.id == call.execution_id else "other"
                else:
                    call.retry = "ran"

    async with asyncio.timeout(LOAD_SECONDS * 2):
        await asyncio.gather(*(worker() for _ in range(WORKERS)))


async def entries_by_email(channel: grpc.aio.Channel) -> collections.Counter[str]:
    """How many Entry rows hold each email (every page of ListRecords)."""
    stub = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    counts: collections.Counter[str] = collections.Counter()
    token = ""
    async with asyncio.timeout(WAIT):
        while True:
            page = await stub.ListRecords(
                mpb.ListRecordsRequest(
                    model="Entry", page_size=1000, page_token=token, fields=["email"]
                ),
                timeout=CALL_TIMEOUT,
            )
            counts.update(str(r["email"]) for r in page.records)
            token = page.next_page_token
            if not token:
                return counts


async def wait_health(address: str, status: int, within: float = WAIT) -> float:
    """Follow the health service's Watch stream until it reports `status`; return how
    long that took."""
    started = time.monotonic()
    async with asyncio.timeout(within), grpc.aio.insecure_channel(address) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        async for resp in stream:
            if resp.status == status:
                return time.monotonic() - started
    raise AssertionError(f"the health stream ended before reporting {status}")


async def audit(
    address: str, calls: list[Call], allowed_recorded: set[str]
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """What both tests check after `retry_all`: returns what it covered and the
    problems found, by kind (see `assert_none`)."""
    sent = [c for c in calls if c.sent]
    acked = [c for c in sent if c.acked]
    async with grpc.aio.insecure_channel(address) as channel:
        counts = await entries_by_email(channel)
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        missing = []
        for call in acked:
            try:
                rec = await stub.GetExecution(
                    wpb.GetExecutionRequest(id=call.execution_id), timeout=CALL_TIMEOUT
                )
                if rec.state != wpb.Execution.STATE_SUCCEEDED:
                    missing.append(f"{call.request_id}: {wpb.Execution.State.Name(rec.state)}")
            except grpc.aio.AioRpcError as err:
                missing.append(f"{call.request_id}: {err.code().name}")
    outcomes = collections.Counter(":".join(c.retry.split(":")[:2]) for c in sent)
    doubled = [f"{c.request_id} x{counts[c.email]}" for c in sent if counts[c.email] > 1]
    unwritten = [c.request_id for c in sent if c.retry in ("same", "ran") and counts[c.email] != 1]
    # create_entry writes only to the app's database, so its record commits with its
    # write: an execution recorded as failed or interrupted wrote nothing
    failed_but_written = [
        f"{c.request_id}: {c.retry}"
        for c in sent
        if c.retry.startswith("recorded:") and counts[c.email] != 0
    ]
    unexpected = [
        f"{c.request_id}: {c.retry}"
        for c in sent
        if not c.acked and c.retry not in ("ran", *(f"recorded:{x}" for x in allowed_recorded))
    ]
    ours = {c.email for c in calls}
    strangers = [e for e in counts if e not in ours]
    summary = {
        "sent": len(sent),
        "acked": len(acked),
        "unacked": len(sent) - len(acked),
        "retried": len(sent),
        "entries": sum(counts.values()),
    }
    summary["retries answered"] = dict(outcomes)
    problems = {
        "acknowledged executions without their record": missing,
        "acknowledged calls whose retry did not return their execution": [
            f"{c.request_id}: {c.retry}" for c in acked if c.retry != "same"
        ],
        "requests that wrote their entry twice": doubled,
        "succeeded without exactly one entry": unwritten,
        "recorded as failed, but their entry was written": failed_but_written,
        "unexpected answers to retries of unacknowledged calls": unexpected,
        "entries nobody asked for": strangers,
    }
    return summary, problems


def assert_none(summary: dict[str, Any], problems: dict[str, list[str]]) -> None:
    """Print what a test covered, then fail listing every kind of problem found."""
    print(f"covered: {summary}")
    found = {k: f"{len(v)}: {v[:6]}" for k, v in problems.items() if v}
    assert not found, f"covered {summary}; " + "; ".join(f"{k} ({v})" for k, v in found.items())


@pytest.mark.timeout(150)
@pytest.mark.parametrize("backend_url", ["sqlite", "postgres"], indirect=True)
async def test_kill_9_under_write_load_loses_and_doubles_nothing(
    backend_url: str, serve: Serve, details: Details
) -> None:
    server = await serve(backend_url)
    calls = plan("kill")
    kill_after = CALLS // 2  # acknowledged calls before the kill, with more in flight
    acked = 0

    def on_reply(call: Call) -> None:
        nonlocal acked
        acked += call.acked
        if acked >= kill_after and not load.stop.is_set():
            server.kill9()
            load.stop.set()

    load = Load(server.address, calls, details, on_reply)
    await load.run()
    assert load.stop.is_set(), f"the load ended before {kill_after} calls were acknowledged"
    await server.wait()
    in_flight = [c for c in calls if c.sent and not c.acked]
    # the calls that failed were the ones in flight at the kill, nothing before it
    assert all(c.error is not None for c in in_flight)
    assert len(in_flight) <= WORKERS, [(c.error, c.message) for c in in_flight[:5]]

    again = await serve(backend_url)
    await retry_all(again.address, calls, details)
    summary, problems = await audit(again.address, calls, {"ABORTED"})
    assert_none({"database": backend_url.split(":")[0], **summary}, problems)


@pytest.mark.timeout(150)
async def test_postgres_outage_fails_fast_recovers_and_loses_nothing(
    pg_cluster: Any, serve: Serve, details: Details
) -> None:
    server = await serve(pg_cluster.url)
    await wait_health(server.address, SERVING)
    calls = plan("outage")
    outage_after = CALLS // 4
    phase = "up"
    acked = 0
    stopping: list[asyncio.Task[None]] = []

    async def take_down() -> None:
        # no call is sent while PostgreSQL is stopping (the calls in flight at the stop
        # go on): on a fast machine the rest of the load could end before the stop
        # does, leaving no call for the outage itself
        nonlocal phase
        phase = "stopping"
        load.go.clear()
        try:
            await asyncio.to_thread(pg_cluster.stop, "immediate")
        finally:
            phase = "down"
            load.go.set()

    def on_reply(call: Call) -> None:
        nonlocal acked
        acked += call.acked
        if acked >= outage_after and not stopping:
            stopping.append(asyncio.create_task(take_down()))

    watcher = asyncio.create_task(wait_health(server.address, NOT_SERVING))
    load = Load(server.address, calls, details, on_reply, phase=lambda: phase)
    await load.run()
    assert stopping, f"the load ended before {outage_after} calls were acknowledged"
    await stopping[0]
    problems: dict[str, list[str]] = {}
    try:
        not_serving_after = await watcher
    except TimeoutError:
        not_serving_after = -1.0
        problems["health did not say NOT_SERVING during the outage"] = [server.log_tail(500)]

    # during the outage: every call failed fast, with UNAVAILABLE, naming no address
    # or driver
    sent = [c for c in calls if c.sent]
    down = [c for c in sent if c.phase == "down"]
    assert down, "no call was sent while the database was down"
    problems["calls that took longer than FAIL_FAST"] = [
        f"{c.request_id}: {c.seconds:.2f} s, {c.error}" for c in sent if c.seconds > FAIL_FAST
    ]
    problems["calls that failed otherwise than UNAVAILABLE"] = [
        f"{c.request_id}: {c.error} {c.message}" for c in sent if c.error not in (None, UNAVAILABLE)
    ]
    problems["calls acknowledged while the database was down"] = [
        c.request_id for c in down if c.acked
    ]
    problems["calls that failed before the outage"] = [
        f"{c.request_id}: {c.error} {c.message}" for c in sent if c.ended == "up" and not c.acked
    ]
    problems["messages showing addresses or driver details"] = [
        c.message
        for c in sent
        if c.error is not None and (LEAK.search(c.message) or str(pg_cluster.port) in c.message)
    ]

    # the database comes back: the same server recovers, without a restart
    await asyncio.to_thread(pg_cluster.start)
    serving_after = await wait_health(server.address, SERVING)
    fresh = plan("after", 20)
    await Load(server.address, fresh, details).run()
    problems["calls after the recovery that failed"] = [
        f"{c.request_id}: {c.error} {c.message}" for c in fresh if not c.acked
    ]

    await retry_all(server.address, calls + fresh, details)
    # create_entry runs in one transaction with its record: one the outage rolled back
    # kept nothing and is not recorded, so its retry runs it now (once: the audit below
    # counts its entries); a failure of any other kind is the request's result
    problems["retries answered otherwise than the failure they first got"] = [
        f"{c.request_id}: {c.error.name if c.error else ''} {c.failed_id}, then {c.retry} "
        f"{c.retry_id}"
        for c in calls
        if c.failed_id
        and c.error is not None
        and not (c.error.name == "UNAVAILABLE" and c.retry == "ran")
        and (c.retry_id != c.failed_id or c.retry != f"recorded:{c.error.name}")
    ]
    summary, lost_or_doubled = await audit(
        server.address, calls + fresh, {"UNAVAILABLE", "ABORTED"}
    )
    summary.update(
        {
            "sent while down": len(down),
            "slowest call (s)": round(max(c.seconds for c in sent), 2),
            "NOT_SERVING after (s)": round(not_serving_after, 2),
            "SERVING after PostgreSQL's restart (s)": round(serving_after, 2),
        }
    )
    assert server.proc.returncode is None, "the server exited"
    assert_none(summary, {**problems, **lost_or_doubled})
