"""Runtime overhead of the workflow engine, against calling the nodes directly.

Measures, in one process and one run (these machines are shared and noisy):

* per-node overhead for chains of 1, 10 and 100 trivial nodes: a registered Node subclass
  whose `run` returns a constant dict, and a PythonCodeNode running a one-line code string;
  the baseline calls the same `run` directly the same number of times. Two more rows:
  "wide" (one node feeding n-1 independent ones, run as concurrent tasks) and "+events"
  (an `on_event` callback receiving every event, as the server's streaming does);
* executions per second of a 1-node workflow (async and sync runtimes) beside direct calls
  per second of the same node.

Each figure is the best of a few rounds; every loop is bounded by a count and a time
budget. Run: `.venv/bin/python bench/runtime.py` (`--quick` for a short run).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workflow import (
    AsyncLocalRuntime,
    LocalRuntime,
    Node,
    Output,
    Param,
    Workflow,
    WorkflowBuilder,
    register_node,
)

TARGET_US = 50.0
_CONST = {"x": 1}
CODE = "result = {'x': x}"


@register_node
class BenchNoop(Node):
    """Returns a constant dict: the cheapest node there is."""

    parameters = {"x": Param(int, default=0)}
    outputs = {"x": Output(int)}

    def run(self, x: int) -> Mapping[str, Any]:
        return _CONST


def chain(node_type: str, n: int, *, wide: bool = False) -> Workflow:
    """n nodes, each fed by the previous one; with `wide`, n-1 nodes all fed by the first
    (independent branches, which the runtime runs as concurrent tasks)."""
    code = node_type == "PythonCodeNode"
    b = WorkflowBuilder()
    b.add_node(node_type, "n0", {"code": CODE, "x": 1} if code else {"x": 1})
    for i in range(1, n):
        b.add_node(node_type, f"n{i}", {"code": CODE} if code else {})
        b.add_connection("n0" if wide else f"n{i - 1}", "x", f"n{i}", "x")
    return b.build()


async def best_per_call(
    fn: Callable[[], Awaitable[Any]], calls: int, rounds: int, budget: float
) -> float:
    """Best seconds per call of `await fn()` over `rounds` rounds of `calls` calls, stopping
    early once `budget` seconds have been spent (at least one round always runs)."""
    best = float("inf")
    deadline = time.perf_counter() + budget
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            await fn()
        best = min(best, (time.perf_counter() - t0) / calls)
        if time.perf_counter() > deadline:
            break
    return best


def direct_call(node_type: str, n: int) -> Callable[[], Awaitable[Any]]:
    """The baseline: the same node `run` called n times in a row, directly."""
    if node_type == "PythonCodeNode":
        wf = chain(node_type, 1)
        run = wf.nodes["n0"].run

        async def call_code() -> None:
            for _ in range(n):
                await run(code=CODE, x=1)  # type: ignore[misc]

        return call_code
    node = BenchNoop("n0", {})
    run_sync = node.run

    async def call_sync() -> None:
        for _ in range(n):
            run_sync(x=1)

    return call_sync


CASES = [
    # (label, node type, wide, with events)
    ("BenchNoop", "BenchNoop", False, False),
    ("PythonCodeNode", "PythonCodeNode", False, False),
    ("BenchNoop wide", "BenchNoop", True, False),
    ("BenchNoop+events", "BenchNoop", False, True),
]


async def bench_chains(quick: bool) -> list[tuple[str, int, float, float]]:
    rt = AsyncLocalRuntime()
    rows: list[tuple[str, int, float, float]] = []
    for label, node_type, wide, events in CASES:
        for n in (1, 10, 100):
            if (wide or events) and n == 1:
                continue  # same as the plain 1-node chain
            calls = max(20, (200 if quick else 2000) // n)
            rounds = 3 if quick else 7
            budget = 1.0 if quick else 4.0
            wf = chain(node_type, n, wide=wide)
            # sanity: the workflow really runs every node
            results = await rt.execute_workflow_async(wf)
            assert len(results) == n and results[f"n{n - 1}"] == {"x": 1}, results
            sink: list[Any] = []
            on_event = sink.append if events else None

            async def execute(
                wf: Workflow = wf, on_event: Any = on_event, sink: list[Any] = sink
            ) -> None:
                await rt.execute_workflow_async(wf, on_event=on_event)
                sink.clear()

            base = await best_per_call(direct_call(node_type, n), calls, rounds, budget)
            run = await best_per_call(execute, calls, rounds, budget)
            rows.append((label, n, base, run))
    return rows


async def bench_async_throughput(quick: bool) -> tuple[float, float]:
    rt = AsyncLocalRuntime()
    wf = chain("BenchNoop", 1)
    calls, rounds, budget = (2000, 3, 1.0) if quick else (20000, 5, 4.0)

    async def execute() -> None:
        await rt.execute_workflow_async(wf)

    base = await best_per_call(direct_call("BenchNoop", 1), calls, rounds, budget)
    run = await best_per_call(execute, calls, rounds, budget)
    return 1 / base, 1 / run


def bench_sync_throughput(quick: bool) -> float:
    wf = chain("BenchNoop", 1)
    calls, rounds, budget = (1000, 3, 1.0) if quick else (10000, 5, 4.0)
    best = float("inf")
    deadline = time.perf_counter() + budget
    with LocalRuntime() as rt:
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(calls):
                rt.execute(wf)
            best = min(best, (time.perf_counter() - t0) / calls)
            if time.perf_counter() > deadline:
                break
    return 1 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    args = parser.parse_args()

    print(f"Python {sys.version.split()[0]}, target: < {TARGET_US:g} us runtime overhead per node")
    print()
    print("Per-node overhead (chain of n nodes, best round; baseline = run() called n times)")
    header = (
        f"{'case':<18}{'n':>5}{'baseline/exec':>15}{'runtime/exec':>15}"
        f"{'ratio':>8}{'overhead/node':>16}  target"
    )
    print(header)
    print("-" * len(header))
    worst = 0.0
    for node_type, n, base, run in asyncio.run(bench_chains(args.quick)):
        overhead = (run - base) / n * 1e6
        worst = max(worst, overhead)
        ok = "ok" if overhead < TARGET_US else "ABOVE"
        print(
            f"{node_type:<18}{n:>5}{base * 1e6:>13.1f}us{run * 1e6:>13.1f}us"
            f"{run / base:>7.1f}x{overhead:>14.1f}us  {ok}"
        )
    print()
    direct, async_rate = asyncio.run(bench_async_throughput(args.quick))
    sync_rate = bench_sync_throughput(args.quick)
    print("Executions per second, 1-node workflow (BenchNoop)")
    print(f"  direct run() calls      {direct:>12,.0f}/s  (baseline)")
    print(f"  AsyncLocalRuntime       {async_rate:>12,.0f}/s  ({direct / async_rate:.1f}x slower)")
    print(f"  LocalRuntime (sync)     {sync_rate:>12,.0f}/s  ({direct / sync_rate:.1f}x slower)")
    print()
    verdict = "within" if worst < TARGET_US else "ABOVE"
    print(f"worst per-node overhead: {worst:.1f} us ({verdict} the {TARGET_US:g} us target)")


if __name__ == "__main__":
    main()
