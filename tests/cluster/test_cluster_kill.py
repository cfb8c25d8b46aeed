"""`kill -9` of one of three replicas under write load through Envoy (issue 18), and a
graceful stop of one.

16 concurrent clients send `create_entry` executions, each with a request_id of its own
(in the body, and as the `x-nexus-request-id` header that lets Envoy retry it on
another replica), through one Envoy from `nexus envoy-config --upstream` x3; one
replica is killed with SIGKILL once a third of the calls are acknowledged. A client
retries a failed call itself (same request_id) at most `CLIENT_ATTEMPTS` times. Then:

- the client-visible error rate (calls still failed after the client's retries) is
  under 1 %;
- no acknowledged write is lost: its execution is SUCCEEDED, its entry is in the
  database, and a retry of the call with its request_id answers the same execution;
- none is duplicated: `Entry.email` is not unique, so a request run twice would leave
  two rows with its email (counted in the database);
- Envoy takes the dead replica out (outlier ejection, health checks).

A second test stops a replica gracefully (a rolling restart) under a load WITHOUT
request_ids: no call fails (see `--drain-delay`).
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server._envoy import admin_get

Serve = Callable[..., Awaitable[Any]]
Front = Callable[..., Awaitable[Any]]

#: Calls sent in all, by `CONCURRENCY` clients (each on a channel of its own).
CALLS = 600
CONCURRENCY = 16
#: The kill comes once this many calls are acknowledged.
KILL_AFTER = CALLS // 3
#: Attempts of one call by the client (its own retries, same request_id).
CLIENT_ATTEMPTS = 3
CALL_TIMEOUT = 10.0
#: The whole load must be over within this many seconds.
LOAD_SECONDS = 90.0
#: `nexus serve --drain-delay` of the graceful-stop test: Envoy's health checks
#: (every 2 s, out after 2 failures) notice NOT_SERVING within it.
DRAIN_DELAY = "5"
#: The graceful-stop test's load: at most this many calls, going on until the replica
#: has stopped and this many more were answered.
STOP_CALLS = 20_000
AFTER_STOP = 100
#: Codes a client retries (the call may not have run, or ran and will be found).
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}


@dataclass
class Call:
    request_id: str
    email: str
    attempts: int = 0
    execution_id: str = ""
    errors: list[str] | None = None

    def request(self) -> wpb.ExecuteWorkflowRequest:
        inputs = struct_pb2.Struct()
        inputs.update({"name": "Kill", "email": self.email})
        return wpb.ExecuteWorkflowRequest(
            name="create_entry", inputs=inputs, request_id=self.request_id
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-nexus-request-id", self.request_id),)


async def _send(stub: Any, call: Call) -> None:
    """One call with the client's own retries."""
    call.errors = []
    while call.attempts < CLIENT_ATTEMPTS:
        call.attempts += 1
        try:
            done = await stub.ExecuteWorkflow(
                call.request(), metadata=call.metadata, timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as err:
            call.errors.append(f"{err.code().name}: {err.details()}")
            if err.code() not in RETRIED:
                return
            await asyncio.sleep(0.05 * call.attempts)
            continue
        call.execution_id = done.id
        return


def _retry_stats(admin: Any) -> dict[str, int]:
    status, body = admin_get(admin, "/stats?filter=^cluster\\.nexus_grpc\\.upstream_rq_retry")
    assert status == 200
    stats = {}
    for line in body.decode().splitlines():
        name, _, value = line.partition(": ")
        stats[name.rsplit(".", 1)[-1]] = int(value)
    return stats


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend_url", ["postgres"], indirect=True)
async def test_kill_9_of_a_replica_under_write_load_through_envoy(
    backend_url: str, serve: Serve, front: Front
) -> None:
    replicas = [await serve(backend_url) for _ in range(3)]
    envoy = await front(backend_url, replicas)
    victim = replicas[1]
    run = uuid.uuid4().hex[:8]
    calls = [Call(f"kill-{run}-{i}", f"kill-{run}-{i}@cluster.test") for i in range(CALLS)]
    todo = collections.deque(calls)
    acked = 0
    killed_at = 0.0

    async def worker() -> None:
        nonlocal acked, killed_at
        async with grpc.aio.insecure_channel(envoy.address) as channel:
            stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            while todo:
                call = todo.popleft()
                await _send(stub, call)
                acked += bool(call.execution_id)
                if acked >= KILL_AFTER and not killed_at:
                    killed_at = time.monotonic()
                    victim.kill9()

    started = time.monotonic()
    async with asyncio.timeout(LOAD_SECONDS):
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    seconds = time.monotonic() - started
    assert killed_at, "the load ended before the kill"
    await victim.wait()

    failed = [c for c in calls if not c.execution_id]
    client_retried = [c for c in calls if c.attempts > 1]
    # the dead replica is out: its connections failed (outlier ejection) or its health
    # checks did
    hosts = await envoy.wait_hosts(
        lambda hs: not hs[victim.address].healthy, "the killed replica taken out", timeout=20
    )
    retries = await asyncio.to_thread(_retry_stats, envoy.admin)

    conn = await asyncpg.connect(backend_url, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT email, count(*) AS n FROM entry WHERE email LIKE $1 GROUP BY email",
            f"kill-{run}-%",
        )
    finally:
        await conn.close()
    counts = {r["email"]: int(r["n"]) for r in rows}

    # every acknowledged call again, with its request_id, through Envoy: the same
    # execution answers (whichever replica ran it), and nothing runs twice
    async with grpc.aio.insecure_channel(envoy.address) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        not_same: list[str] = []
        for call in (c for c in calls if c.execution_id):
            again = await stub.ExecuteWorkflow(
                call.request(), metadata=call.metadata, timeout=CALL_TIMEOUT
            )
            if again.id != call.execution_id or again.state != wpb.Execution.STATE_SUCCEEDED:
                not_same.append(f"{call.request_id}: {again.id} {again.state}")

    covered = {
        "calls": CALLS,
        "concurrency": CONCURRENCY,
        "acknowledged": CALLS - len(failed),
        "failed after the client's retries": len(failed),
        "calls the client retried": len(client_retried),
        "Envoy retries": retries,
        "requests per replica": {a: h.rq_total for a, h in hosts.items()},
        "killed": victim.address,
        "killed replica in Envoy": hosts[victim.address].flags,
        "load seconds": round(seconds, 1),
        "entries": sum(counts.values()),
    }
    print(f"covered: {covered}")
    lost = [c.request_id for c in calls if c.execution_id and counts.get(c.email) != 1]
    doubled = [f"{e} x{n}" for e, n in counts.items() if n > 1]
    assert len(failed) / CALLS < 0.01, (covered, [(c.request_id, c.errors) for c in failed][:5])
    assert not lost, (covered, lost[:5])
    assert not doubled, (covered, doubled[:5])
    assert not not_same, (covered, not_same[:5])
    # the kill happened mid-load: the killed replica had answered calls before it, and
    # the others answered calls after it
    assert hosts[victim.address].rq_total > 0, covered
    # and it hit calls in flight, which were retried (by Envoy, or by their client)
    assert retries.get("upstream_rq_retry", 0) + len(client_retried) > 0, covered
    assert set(counts) <= {c.email for c in calls}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend_url", ["postgres"], indirect=True)
async def test_a_replica_stopping_gracefully_under_load_fails_no_call(
    backend_url: str, serve: Serve, front: Front
) -> None:
    """A rolling restart's stop (SIGINT: the server's graceful stop) of one replica under
    write load WITHOUT request_ids, which Envoy never retries once a replica has them:
    its in-flight calls finish, and the calls it refuses from then on (refused streams,
    refused connections) are retried on the others by Envoy. No call fails, every
    acknowledged write is in the database once.

    `--drain-delay` covers what Envoy cannot retry: calls a replica has received but not
    yet started when it stops taking calls (grpc cancels them) would fail; with the
    delay, Envoy's health checks have moved new calls away before that moment."""
    replicas = [await serve(backend_url, "--drain-delay", DRAIN_DELAY) for _ in range(3)]
    envoy = await front(backend_url, replicas)
    leaving = replicas[0]
    run = uuid.uuid4().hex[:8]
    # the load goes on until the replica has stopped and AFTER_STOP more calls were
    # answered (at most STOP_CALLS in all)
    emails = collections.deque(f"stop-{run}-{i}@cluster.test" for i in range(STOP_CALLS))
    acked: list[str] = []
    failed: list[str] = []
    stopping: list[asyncio.Task[None]] = []
    after_stop = 0

    def more() -> bool:
        return bool(emails) and not (stopping and stopping[0].done() and after_stop >= AFTER_STOP)

    async def worker() -> None:
        nonlocal after_stop
        async with grpc.aio.insecure_channel(envoy.address) as channel:
            stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            while more():
                email = emails.popleft()
                inputs = struct_pb2.Struct()
                inputs.update({"name": "Stop", "email": email})
                try:
                    await stub.ExecuteWorkflow(
                        wpb.ExecuteWorkflowRequest(name="create_entry", inputs=inputs),
                        timeout=CALL_TIMEOUT,
                    )
                    acked.append(email)
                    after_stop += bool(stopping and stopping[0].done())
                except grpc.aio.AioRpcError as err:
                    failed.append(f"{email}: {err.code().name} {err.details()}")
                if len(acked) >= KILL_AFTER and not stopping:
                    stopping.append(asyncio.create_task(leaving.stop()))

    async with asyncio.timeout(LOAD_SECONDS):
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    assert stopping and stopping[0].done(), "the load ended before the replica stopped"
    assert after_stop >= AFTER_STOP, f"only {after_stop} calls after the stop"
    assert leaving.proc.returncode == 0, leaving.log_tail()

    hosts = await asyncio.to_thread(envoy.hosts)
    retries = await asyncio.to_thread(_retry_stats, envoy.admin)
    conn = await asyncpg.connect(backend_url, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT email, count(*) AS n FROM entry WHERE email LIKE $1 GROUP BY email",
            f"stop-{run}-%",
        )
    finally:
        await conn.close()
    counts = {r["email"]: int(r["n"]) for r in rows}
    covered = {
        "calls": len(acked) + len(failed),
        "acknowledged": len(acked),
        "after the stop": after_stop,
        "failed": len(failed),
        "Envoy retries": retries,
        "requests per replica": {a: h.rq_total for a, h in hosts.items()},
        "stopped": leaving.address,
        "entries": sum(counts.values()),
    }
    print(f"covered: {covered}")
    assert not failed, (covered, failed[:5])
    assert all(counts.get(e) == 1 for e in acked), covered
    assert sum(counts.values()) == len(acked), covered
    assert hosts[leaving.address].rq_total > 0, covered
