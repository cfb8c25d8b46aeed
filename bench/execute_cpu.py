"""CPU time of one ExecuteWorkflow call in process: the servicer called directly.

What the server's event-loop thread spends per call on `WorkflowServicer.ExecuteWorkflow`
(request parsed from bytes, the execution run and recorded, the reply serialized),
without gRPC or the gateway chain: `time.thread_time` over many calls, the record
writer's commits included (the calls are followed by a drain), best of a few rounds.
Unlike end-to-end throughput, this hardly moves with the machine's load, so a change of
a few microseconds shows. Workflows, as in `bench/grpc.py`:

- `noop`: one node returning a constant;
- `list_contacts`: one `ContactListNode` reading a page of 10 of 100 seeded contacts
  (`{"score": {"$gte": 0}}`, ordered by name), on a SQLite file;
- `list_contacts` with a request_id per call (recorded with its writes, in one
  transaction, before the reply);
- `noop_gateway`: `noop` through the gateway chain as the server wraps every method
  (`gateway.Gateway` with authentication off, then the decoding guard), the request
  decoded and the reply encoded by the method handler's own (de)serializers.

Usage: `.venv/bin/python -m bench.execute_cpu [--calls N] [--rounds R]`. Under
callgrind (`valgrind --tool=callgrind --callgrind-out-file=/dev/null`) it gives
instruction counts that do not depend on the load at all; `--only` picks one case.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from dataflow import DataFlow
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_server._errors import guard_method
from nexus_server._executions import Executions
from nexus_server._registry import WorkflowRegistry
from nexus_server._store import Store
from nexus_server._workflow_service import WorkflowServicer
from nexus_server.gateway import Gateway, Policy
from nexus_server.gateway._audit import AuditTrail
from workflow import AsyncLocalRuntime, Node, Output, Param, WorkflowBuilder, register_node


@register_node
class BenchCpuNoop(Node):
    """Returns a constant: the cheapest node there is."""

    parameters = {"x": Param(int, default=0)}
    outputs = {"x": Output(int)}

    def run(self, x: int) -> dict[str, Any]:
        return {"x": x}


class _Context:
    """The parts of a servicer context ExecuteWorkflow and the gateway chain use."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("user-agent", "grpc-python-bench"),)

    def code(self) -> None:
        return None

    async def send_initial_metadata(self, metadata: Any) -> None:
        return None

    async def abort(self, code: Any, details: str, trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"the call failed: {code} {details}")


#: The method the gateway case calls.
EXECUTE = "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow"


def _through_gateway(servicer: WorkflowServicer, registry: WorkflowRegistry) -> Any:
    """ExecuteWorkflow's method handler as the server registers it: behind the gateway
    chain (authentication off, the audit trail's table off) and the decoding guard."""
    gateway = Gateway(
        authenticator=None,
        policy=Policy(),
        registry=registry,
        audit=AuditTrail(None, table=False),
        typed_models={},
    )
    handler = grpc.unary_unary_rpc_method_handler(
        servicer.ExecuteWorkflow,
        request_deserializer=wpb.ExecuteWorkflowRequest.FromString,
        response_serializer=wpb.Execution.SerializeToString,
    )
    return gateway.method(EXECUTE, guard_method(EXECUTE, handler))


async def _setup(path: Path) -> tuple[WorkflowServicer, Executions, DataFlow, Any]:
    db = DataFlow(f"sqlite:///{path}")

    @db.model
    class Contact:
        id: str
        name: str
        email: str
        company: str | None = None
        score: int = 0

    await db.initialize()
    create = WorkflowBuilder("Create a contact.")
    create.add_input("name", str)
    create.add_input("email", str)
    create.add_node("ContactCreateNode", "create", {"name": "{{name}}", "email": "{{email}}"})
    creating = create.build()
    runtime = AsyncLocalRuntime()
    for i in range(100):
        await runtime.execute_workflow_async(
            creating, {"name": f"contact {i:03d}", "email": f"c{i}@example.com"}
        )
    store = Store(db)
    await store.initialize()
    executions = Executions(store)
    executions.open()
    registry = WorkflowRegistry()
    noop = WorkflowBuilder("One trivial node.")
    noop.add_node("BenchCpuNoop", "noop", {"x": 1})
    registry.add("noop", noop.build(), builtin=True)
    listing = WorkflowBuilder("A page of 10 contacts, filtered and ordered.")
    listing.add_node(
        "ContactListNode",
        "list",
        {"filter": {"score": {"$gte": 0}}, "order_by": ["name"], "limit": 10},
    )
    registry.add("list_contacts", listing.build(), builtin=True)
    servicer = WorkflowServicer(
        registry,
        executions,
        allow_code_nodes=False,
        gateway=None,  # type: ignore[arg-type]  # ExecuteWorkflow does not use it
    )
    return servicer, executions, db, _through_gateway(servicer, registry)


async def _round(
    servicer: WorkflowServicer,
    executions: Executions,
    name: str,
    calls: int,
    ids: bool,
    method: Any = None,
) -> float:
    """µs of this thread's CPU per call over `calls` calls, then a drain of the records.
    `method`: call the method handler (the gateway case) instead of the servicer."""
    ctx = _Context()
    body = wpb.ExecuteWorkflowRequest(name=name).SerializeToString()
    prefix = f"{time.time_ns()}-"
    t0 = time.thread_time()
    if method is not None:
        decode, call, encode = (
            method.request_deserializer,
            method.unary_unary,
            method.response_serializer,
        )
        for _ in range(calls):
            encode(await call(decode(body), ctx))
    for i in range(calls if method is None else 0):
        request = wpb.ExecuteWorkflowRequest.FromString(body)
        if ids:
            request.request_id = f"{prefix}{i}"
        reply = await servicer.ExecuteWorkflow(request, ctx)
        reply.SerializeToString()
    await executions.drain()
    return (time.thread_time() - t0) / calls * 1e6


async def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000, help="calls per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds per case (best kept)")
    p.add_argument("--only", choices=["noop", "list_contacts", "list_contacts_id", "noop_gateway"])
    args = p.parse_args()
    cases = [("noop", "noop", False), ("list_contacts", "list_contacts", False)]
    cases.append(("list_contacts_id", "list_contacts", True))
    cases.append(("noop_gateway", "noop", False))
    with tempfile.TemporaryDirectory(prefix="nexus-execute-cpu-") as tmp:
        servicer, executions, db, method = await _setup(Path(tmp) / "bench.db")
        try:
            print(f"ExecuteWorkflow in process, µs of CPU per call (best of {args.rounds})")
            for label, name, ids in cases:
                if args.only and label != args.only:
                    continue
                via = method if label.endswith("_gateway") else None
                warm = min(args.calls, 200)
                await _round(servicer, executions, name, warm, ids, via)
                best = min(
                    [
                        await _round(servicer, executions, name, args.calls, ids, via)
                        for _ in range(args.rounds)
                    ]
                )
                print(f"{label:<20} {best:8.1f}")
        finally:
            await executions.close(1.0)
            await db.close()


if __name__ == "__main__":
    asyncio.run(main())
