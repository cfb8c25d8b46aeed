"""No request can stall or bloat the server (issue 14, sections 2 and 5), against a real
`nexus serve` subprocess whose memory we read from /proc:

- a ~4 MB BulkCreateRecords of 800,000 tiny rows is refused with INVALID_ARGUMENT naming
  `records` (the cap on rows per bulk request), quickly, while the server's resident
  memory stays bounded and small calls on other connections keep answering;
- RegisterWorkflow with a ~1.8 MB definition (a PythonCodeNode with huge code; a huge
  deeply nested expression) and with short but deeply nested expressions (which make
  Python's parser raise MemoryError or RecursionError) is refused with INVALID_ARGUMENT,
  quickly, while small calls keep answering. The server accepts code nodes here
  (`allow_code_nodes=True`), so the refusal has to come from the size and depth checks,
  not from the code-node rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
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

#: Rows in the big bulk request: every third `{"s": null}`, the others `{}`, 4.0 MB
#: in all (under gRPC's default 4 MiB message limit).
BULK_ROWS = 800_000
#: A refusal must come within this many seconds.
REFUSE_WITHIN = 5.0
#: The server's resident memory may grow by less than this many MB meanwhile.
RSS_GROWTH_MB = 300.0
#: A small call made meanwhile must answer within this many seconds.
SMALL_CALL_WITHIN = 2.0
#: The deadline of the big calls (a call taking this long stalled the server).
BIG_CALL_TIMEOUT = 30.0


@dataclass
class Probe:
    """While a big call runs: small calls (health, GetRecord) on a channel of their own,
    one after another, timing each, and the server's resident memory every 10 ms."""

    address: str
    item_id: str
    rss: Callable[[], float]
    calls: int = 0
    slowest: float = 0.0
    failures: list[str] = field(default_factory=list)
    peak_rss: float = 0.0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _small_calls(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            models = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
            while not self._stop.is_set():
                for call in (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=REFUSE_WITHIN * 2),
                    models.GetRecord(
                        mpb.GetRecordRequest(model="Item", id=self.item_id),
                        timeout=REFUSE_WITHIN * 2,
                    ),
                ):
                    started = time.monotonic()
                    try:
                        await call
                    except grpc.aio.AioRpcError as err:
                        self.failures.append(f"{err.code().name}: {err.details()}")
                    self.slowest = max(self.slowest, time.monotonic() - started)
                    self.calls += 1
                await asyncio.sleep(0.02)  # pacing, so the probe is not a load of its own

    async def _memory(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.rss())
            await asyncio.sleep(0.01)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Probe]:
        tasks = [asyncio.create_task(self._small_calls()), asyncio.create_task(self._memory())]
        try:
            yield self
        finally:
            self._stop.set()
            async with asyncio.timeout(REFUSE_WITHIN * 2 + 1):
                await asyncio.gather(*tasks)


def bulk_payload(rows: int) -> bytes:
    """A serialized BulkCreateRecordsRequest for `Item` with `rows` tiny records, built
    by repeating the bytes of three records (building 800,000 Structs would take the
    test longer than the server needs to refuse them)."""
    three = mpb.BulkCreateRecordsRequest()
    three.records.add()
    three.records.add()
    three.records.add().update({"s": None})
    head = mpb.BulkCreateRecordsRequest(model="Item").SerializeToString()
    return head + three.SerializeToString() * (rows // 3) + b"\x12\x00" * (rows % 3)


async def seed_item(address: str) -> str:
    """One Item, for the probes' GetRecord; returns its id."""
    async with grpc.aio.insecure_channel(address) as channel:
        models = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        item = await models.CreateRecord(
            mpb.CreateRecordRequest(model="Item", record=struct_pb2.Struct()), timeout=10
        )
        # warm up the paths the probes take, so the baseline memory includes them
        for _ in range(20):
            await models.GetRecord(mpb.GetRecordRequest(model="Item", id=item["id"]), timeout=10)
        return str(item["id"])


@pytest.mark.timeout(120)
async def test_a_4_mb_bulk_create_is_refused_quickly_in_bounded_memory(
    tmp_path: Any, serve: Serve, details: Details
) -> None:
    server = await serve(f"sqlite:///{tmp_path / 'bulk.db'}")
    item_id = await seed_item(server.address)
    payload = bulk_payload(BULK_ROWS)
    assert 3_900_000 < len(payload) < 4 * 1024 * 1024, len(payload)
    baseline = server.rss_mb()
    probe = Probe(server.address, item_id, server.rss_mb)
    async with grpc.aio.insecure_channel(server.address) as channel:
        bulk = channel.unary_unary(
            "/nexus.model.v1.ModelService/BulkCreateRecords",
            request_serializer=None,  # the payload is already serialized
            response_deserializer=mpb.BulkCreateRecordsResponse.FromString,
        )
        async with probe.running():
            started = time.monotonic()
            try:
                done = await bulk(payload, timeout=BIG_CALL_TIMEOUT)
                outcome, fields = f"created {done.created_count}", []
            except grpc.aio.AioRpcError as err:
                reason, _, fields = details(err)
                outcome = f"{err.code().name} {reason} {fields}: {err.details()[:200]}"
            took = time.monotonic() - started
        models = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        count = await models.CountRecords(mpb.CountRecordsRequest(model="Item"), timeout=10)

    growth = probe.peak_rss - baseline
    summary = (
        f"bulk of {BULK_ROWS} rows ({len(payload) / 1e6:.1f} MB): {outcome} in {took:.2f} s; "
        f"RSS {baseline:.0f} MB -> peak {probe.peak_rss:.0f} MB; {probe.calls} small calls "
        f"meanwhile, slowest {probe.slowest:.3f} s; {count.count - 1} rows written"
    )
    print(summary)
    assert outcome.startswith("INVALID_ARGUMENT"), summary
    assert "records" in fields, f"{summary}: the violation must name `records`"
    assert took < REFUSE_WITHIN, summary
    assert growth < RSS_GROWTH_MB, summary
    assert probe.calls > 0 and not probe.failures, f"{summary}: {probe.failures[:5]}"
    assert probe.slowest < SMALL_CALL_WITHIN, summary
    assert count.count == 1, f"{summary}: a refused bulk request wrote {count.count - 1} rows"


def code_definition(code: str) -> wpb.WorkflowDefinition:
    """A definition with one PythonCodeNode running `code`."""
    definition = wpb.WorkflowDefinition()
    node = definition.nodes.add(id="code", type="PythonCodeNode")
    node.params.update({"code": code})
    return definition


#: name -> code of the definitions that must be refused.
HUGE = {
    "huge_code": "x = 1\n" * 300_000,  # 1.8 MB of statements
    "huge_nesting": "result = " + "[" * 900_000 + "]" * 900_000,  # 1.8 MB, one expression
    "deep_unary": "result = " + "-" * 20_000 + "1",  # 20 kB; the parser: MemoryError
    "deep_sum": "result = " + "1+" * 20_000 + "1",  # 40 kB; the parser: RecursionError
}


@pytest.mark.timeout(120)
async def test_huge_or_deeply_nested_workflow_definitions_are_refused_without_stalling(
    tmp_path: Any, serve: Serve, details: Details
) -> None:
    server = await serve(f"sqlite:///{tmp_path / 'register.db'}", NEXUS_FAULTS_ALLOW_CODE="1")
    item_id = await seed_item(server.address)
    results: list[str] = []
    problems: list[str] = []
    async with grpc.aio.insecure_channel(server.address) as channel:
        workflows = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        for name, code in HUGE.items():
            request = wpb.RegisterWorkflowRequest(name=name, definition=code_definition(code))
            probe = Probe(server.address, item_id, server.rss_mb)
            outcome = "registered"
            async with probe.running():
                started = time.monotonic()
                try:
                    await workflows.RegisterWorkflow(request, timeout=BIG_CALL_TIMEOUT)
                except grpc.aio.AioRpcError as err:
                    reason, _, fields = details(err)
                    outcome = f"{err.code().name} {reason} {fields}"
                    if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        problems.append(f"{name}: {outcome}: {err.details()[:200]}")
                took = time.monotonic() - started
            line = (
                f"{name} ({request.ByteSize() / 1e6:.2f} MB): {outcome} in {took:.2f} s; "
                f"{probe.calls} small calls meanwhile, slowest {probe.slowest:.3f} s"
            )
            results.append(line)
            if outcome == "registered":
                problems.append(f"{name}: registered")
            if took >= REFUSE_WITHIN:
                problems.append(f"{name}: took {took:.2f} s")
            if probe.slowest >= SMALL_CALL_WITHIN or probe.failures or not probe.calls:
                problems.append(f"{name}: small calls {probe.slowest:.2f} s {probe.failures[:3]}")
        listed = await workflows.ListWorkflows(wpb.ListWorkflowsRequest(), timeout=10)
        kept = [w.name for w in listed.workflows if w.name in HUGE]
        if kept:
            problems.append(f"registered after all: {kept}")
    print("\n".join(results))
    assert not problems, "; ".join(problems) + "\n" + "\n".join(results)
    assert server.proc.returncode is None
