"""A local cluster (issue 18): 3 `nexus serve --no-envoy` replicas on one PostgreSQL
database of their own, and one real Envoy from `nexus envoy-config --upstream` x3.

- executions through Envoy reach all three replicas (Envoy's per-replica request
  counts), REST through the same Envoy works, and every write lands once in the one
  database;
- a replica that stops is taken out by the active health checks, and the calls that
  follow all succeed on the other two;
- replicas started at the same moment on an empty database all start (their schema
  changes take turns, under a PostgreSQL advisory lock).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import struct_pb2

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc

Serve = Callable[..., Awaitable[Any]]
Front = Callable[..., Awaitable[Any]]

#: Executions sent through Envoy in each phase, and the concurrency they are sent at.
CALLS = 60
CONCURRENCY = 6
CALL_TIMEOUT = 10.0
#: Bound for the health checks to take a stopped replica out.
EJECT_WITHIN = 20.0


async def _execute(address: str, tag: str, n: int) -> list[str]:
    """`n` create_entry executions through `address` (each with a request_id, sent as
    the header too); their execution ids."""
    todo = list(range(n))
    ids: list[str] = []

    async def worker() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            while todo:
                i = todo.pop()
                key = f"{tag}-{i}"
                inputs = struct_pb2.Struct()
                inputs.update({"name": "Cluster", "email": f"{key}@cluster.test"})
                done = await stub.ExecuteWorkflow(
                    wpb.ExecuteWorkflowRequest(name="create_entry", inputs=inputs, request_id=key),
                    metadata=(("x-nexus-request-id", key),),
                    timeout=CALL_TIMEOUT,
                )
                assert done.state == wpb.Execution.STATE_SUCCEEDED, done
                ids.append(done.id)

    async with asyncio.timeout(60):
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return ids


async def _emails(db_url: str, tag: str) -> list[str]:
    conn = await asyncpg.connect(db_url, timeout=5)
    try:
        rows = await conn.fetch("SELECT email FROM entry WHERE email LIKE $1", f"{tag}-%")
    finally:
        await conn.close()
    return [r["email"] for r in rows]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend_url", ["postgres"], indirect=True)
async def test_envoy_balances_three_replicas_and_ejects_a_stopped_one(
    backend_url: str, serve: Serve, front: Front
) -> None:
    replicas = [await serve(backend_url) for _ in range(3)]
    envoy = await front(backend_url, replicas)
    tag = uuid.uuid4().hex[:8]

    ids = await _execute(envoy.address, f"{tag}-a", CALLS)
    hosts = await asyncio.to_thread(envoy.hosts)
    per_replica = {r.address: hosts[r.address].rq_success for r in replicas}
    print(f"executions per replica through Envoy: {per_replica}")
    # every replica answered some (a health check is no request: rq_* count calls only)
    assert all(n > 0 for n in per_replica.values()), per_replica
    assert sum(per_replica.values()) >= CALLS, per_replica
    assert len(set(ids)) == CALLS
    emails = await _emails(backend_url, f"{tag}-a")
    assert sorted(emails) == sorted(f"{tag}-a-{i}@cluster.test" for i in range(CALLS))

    # REST through the same Envoy reaches the replicas as well (a read, retried)
    async with httpx.AsyncClient(base_url=f"http://{envoy.address}", timeout=10) as http:
        listed = await http.get("/v1/workflows")
        assert listed.status_code == 200, listed.text
        assert "create_entry" in {w["name"] for w in listed.json()["workflows"]}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
        # a REST write with its key in the header too (retryable through Envoy)
        key = f"{tag}-rest"
        body = {"inputs": {"name": "Rest", "email": f"{key}-0@cluster.test"}, "request_id": key}
        headers = {"x-nexus-request-id": key}
        written = await http.post("/v1/workflows/create_entry:execute", json=body, headers=headers)
        assert written.status_code == 200, written.text
        again = await http.post("/v1/workflows/create_entry:execute", json=body, headers=headers)
        assert again.json()["id"] == written.json()["id"]
        # a header that is not the body's key is the client's mistake: 400, nothing runs
        body["request_id"] = f"{key}-other"
        refused = await http.post("/v1/workflows/create_entry:execute", json=body, headers=headers)
        assert refused.status_code == 400, refused.text
        assert refused.json()["details"][0]["reason"] == "REQUEST_INVALID"
    assert await _emails(backend_url, key) == [f"{key}-0@cluster.test"]

    # a replica stops (gracefully): the health checks take it out
    gone = replicas[0]
    await gone.stop()
    hosts = await envoy.wait_hosts(
        lambda hs: (
            not hs[gone.address].healthy and all(hs[r.address].healthy for r in replicas[1:])
        ),
        "the stopped replica to fail its health checks",
        timeout=EJECT_WITHIN,
    )
    print(f"stopped replica in Envoy: {hosts[gone.address].flags}")
    assert hosts[gone.address].flags.get("failed_active_health_check") is True
    before = {a: h.rq_success for a, h in hosts.items()}

    ids = await _execute(envoy.address, f"{tag}-b", CALLS)
    assert len(set(ids)) == CALLS
    hosts = await asyncio.to_thread(envoy.hosts)
    after = {a: h.rq_success - before[a] for a, h in hosts.items()}
    print(f"executions per replica after the stop: {after}")
    assert after[gone.address] == 0, after
    assert sum(after.values()) >= CALLS
    emails = await _emails(backend_url, f"{tag}-b")
    assert sorted(emails) == sorted(f"{tag}-b-{i}@cluster.test" for i in range(CALLS))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend_url", ["postgres"], indirect=True)
async def test_replicas_started_at_once_on_an_empty_database_all_start(
    backend_url: str, serve: Serve, front: Front
) -> None:
    # a Deployment's pods, or compose's services, start together: each creates the
    # schema it finds missing
    replicas = await asyncio.gather(*(serve(backend_url) for _ in range(3)))
    envoy = await front(backend_url, replicas)
    tag = uuid.uuid4().hex[:8]
    ids = await _execute(envoy.address, tag, 12)
    assert len(set(ids)) == 12
    assert len(await _emails(backend_url, tag)) == 12
