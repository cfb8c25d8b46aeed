"""Load shedding under 4x overload: the latency of the calls a server admits.

A Nexus server (a child process, one event loop) serves `work`, one node with a fixed
capacity (`--work`):

* `pool` (the default): the node waits for one of 4 slots of a pool (as a call waits
  for a database connection), holds it for `--work-ms` (an await: a query), so the
  server does at most `4 / work-ms` calls a second and an excess waits inside the server;
* `cpu`: the node holds the event loop for `--work-ms` of CPU.

This file:

1. measures that capacity (calls/s) with closed-loop clients at concurrency `--cap`,
   and the p99 latency there (the baseline);
2. offers 4x that rate, open loop (a call is sent on schedule whether or not earlier
   ones returned, as independent users do), for `--seconds`, to
   - the same server without a cap: every call is queued, and latency grows with the
     backlog for as long as the overload lasts;
   - a server with `Limits(max_in_flight=--cap)`: calls past the cap fail at once with
     RESOURCE_EXHAUSTED (`OVERLOADED`); the admitted ones keep their latency;
   - the same server with Envoy in front, the load sent to Envoy's port: Envoy holds
     the requests in flight to `max_in_flight` and refuses the rest itself.

Prints, for each, the calls admitted and refused, p50 and p99 latency of admitted calls
and the p99's ratio to the baseline measured in the same run (target: bounded, a small
multiple, with the cap; without it the ratio grows with `--seconds`). Every load is
bounded by a call count and a time budget; every call has a deadline.

With `--work cpu` the server's own cap does not help, and this file shows it: grpc.aio
accepts one new call per turn of the event loop, so when the loop itself is the
bottleneck the backlog waits in gRPC's core, before any handler (and so any count of
calls in flight) sees it; Envoy's cap, in front of the loop, does (docs/operations.md,
"Load shedding").

Run: `.venv/bin/python bench/overload.py` (`--seconds 3` for a short run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/ holds a `grpc.py` benchmark that would shadow the grpc package
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE)]

import grpc  # noqa: E402
from google.protobuf import struct_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w  # noqa: E402
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc  # noqa: E402

DEADLINE = 30.0


# --- the server (child process) --------------------------------------------------------


async def serve(
    port: int, work_ms: float, cap: int | None, db: str, work: str, api_port: int | None
) -> None:
    from dataflow import DataFlow
    from nexus_server import Limits, Nexus
    from workflow import Node, Output, Param, WorkflowBuilder, register_node

    pool = asyncio.Semaphore(4)

    class BenchWorkNode(Node):
        """A fixed capacity: a pool slot held for `ms`, or `ms` of the loop's CPU."""

        type_name = "BenchWorkNode"
        parameters = {"ms": Param(float, default=1.0)}
        outputs = {"done": Output(bool)}

        async def run(self, ms: float) -> dict[str, Any]:
            if work == "pool":
                async with pool:
                    await asyncio.sleep(ms / 1000)
            else:
                end = time.perf_counter() + ms / 1000
                while time.perf_counter() < end:
                    pass
            return {"done": True}

    register_node(BenchWorkNode)
    app = Nexus(
        grpc_port=port,
        api_port=api_port,
        mcp_port=None,
        limits=Limits(max_in_flight=cap) if cap else None,
    )
    app.integrate_dataflow(DataFlow(db))
    wb = WorkflowBuilder("CPU work.")
    wb.add_node("BenchWorkNode", "work", {"ms": work_ms})
    app.register("work", wb.build())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with app.serving(envoy=api_port is not None):
        await stop.wait()


# --- the load (this process) -----------------------------------------------------------


def _request() -> w.ExecuteWorkflowRequest:
    return w.ExecuteWorkflowRequest(name="work", inputs=struct_pb2.Struct())


async def _wait_healthy(address: str, budget: float = 30.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(budget):
            while True:
                try:
                    resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.05)


async def closed_loop(address: str, concurrency: int, seconds: float) -> tuple[float, list[float]]:
    """Calls/s and latencies with `concurrency` clients calling back to back."""
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        end = time.perf_counter() + seconds

        async def client() -> None:
            for _ in range(1_000_000):  # bounded; the clock ends it first
                if time.perf_counter() >= end:
                    return
                t = time.perf_counter()
                await stub.ExecuteWorkflow(_request(), timeout=DEADLINE)
                latencies.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return len(latencies) / elapsed, latencies


async def open_loop(address: str, rate: float, seconds: float) -> tuple[list[float], int, int]:
    """Send `rate` calls/s for `seconds` (at most rate * seconds calls, each with a
    deadline); latencies of admitted calls, calls refused OVERLOADED, other failures."""
    admitted: list[float] = []
    refused = failed = 0
    codes: dict[str, int] = {}
    count = int(rate * seconds)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]

        async def one() -> None:
            nonlocal refused, failed
            t = time.perf_counter()
            try:
                await stub.ExecuteWorkflow(_request(), timeout=DEADLINE)
                admitted.append(time.perf_counter() - t)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refused += 1
                else:
                    failed += 1
                    codes[exc.code().name] = codes.get(exc.code().name, 0) + 1

        tasks = []
        start = time.perf_counter()
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        async with asyncio.timeout(DEADLINE + seconds):
            await asyncio.gather(*tasks)
    if codes:
        print("  failures:", codes)
    return admitted, refused, failed


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_server(
    port: int, args: argparse.Namespace, cap: int | None, tmp: str, api_port: int | None = None
) -> Any:
    db = f"sqlite:///{tmp}/bench-{port}.db"
    cmd = [sys.executable, __file__, "--serve", str(port), "--work-ms", str(args.work_ms)]
    cmd += ["--work", args.work]
    cmd += ["--db", db] + (["--server-cap", str(cap)] if cap else [])
    cmd += ["--api-port", str(api_port)] if api_port else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, cwd=tmp)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        baseline_p99 = None
        for cap, envoy in ((None, False), (args.cap, False), (args.cap, True)):
            port = free_port()
            api_port = free_port() if envoy else None
            proc = start_server(port, args, cap, tmp, api_port)
            try:
                address = f"127.0.0.1:{port}"
                await _wait_healthy(address)
                if api_port:  # the load goes through Envoy (gRPC on its port)
                    address = f"127.0.0.1:{api_port}"
                    await _wait_healthy(address)
                await closed_loop(address, 4, 0.5)  # warm up
                if baseline_p99 is None:
                    capacity, base = await closed_loop(address, args.cap, args.seconds)
                    baseline_p99 = _p(base, 0.99)
                    rate = 4 * capacity
                    print(
                        f"capacity: {capacity:.0f} calls/s at concurrency {args.cap} "
                        f"(p50 {_p(base, 0.5) * 1e3:.1f} ms, p99 {baseline_p99 * 1e3:.1f} ms); "
                        f"offering {rate:.0f} calls/s (4x) for {args.seconds:.0f} s"
                    )
                ok, refused, failed = await open_loop(address, rate, args.seconds)
                rows.append((cap, envoy, ok, refused, failed))
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        assert baseline_p99 is not None
        print(
            f"{'server':<26} {'admitted':>9} {'refused':>8} {'failed':>7} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'p99/base':>9}"
        )
        for cap, envoy, ok, refused, failed in rows:
            name = f"max_in_flight={cap}" if cap else "no cap (queues)"
            name += ", via Envoy" if envoy else ""
            p99 = _p(ok, 0.99)
            print(
                f"{name:<26} {len(ok):>9} {refused:>8} {failed:>7} {_p(ok, 0.5) * 1e3:>8.1f} "
                f"{p99 * 1e3:>8.1f} {p99 / baseline_p99:>9.2f}"
            )
        mean_ok = statistics.fmean(len(r[2]) for r in rows)
        print(f"(mean admitted per run {mean_ok:.0f}; baseline p99 {baseline_p99 * 1e3:.1f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each load")
    parser.add_argument(
        "--cap", type=int, default=16, help="max_in_flight, and the baseline's concurrency"
    )
    parser.add_argument("--work", choices=("pool", "cpu"), default="pool")
    parser.add_argument("--work-ms", type=float, default=20.0, help="work per call, ms")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--server-cap", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--api-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(
            serve(args.serve, args.work_ms, args.server_cap, args.db, args.work, args.api_port)
        )
        return 0
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
