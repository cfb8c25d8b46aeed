"""The runtimes: order, concurrency, ids, events, cancellation, timeout, failures, inputs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest

from workflow import (
    AsyncLocalRuntime,
    Event,
    EventKind,
    ExecutionCancelledError,
    ExecutionTimeoutError,
    InvalidInputsError,
    LocalRuntime,
    Node,
    NodeExecutionError,
    Output,
    Param,
    Workflow,
    WorkflowBuilder,
    WorkflowError,
    current_execution,
    register_node,
)

BOUND = 5.0  # seconds: every wait in these tests is bounded by this


def chain(n: int) -> Workflow:
    b = WorkflowBuilder()
    b.add_node("TConst", "n0", {"value": "{{start}}"})
    for i in range(1, n):
        b.add_node("TAdd", f"n{i}", {"b": 1})
        b.add_connection(f"n{i - 1}", "value" if i == 1 else "sum", f"n{i}", "a")
    return b.build()


def two_waiters() -> Workflow:
    """Two independent nodes that each wait for the other's event."""
    b = WorkflowBuilder()
    b.add_node("TWait", "left", {"signal": "left", "wait": "right", "value": 1})
    b.add_node("TWait", "right", {"signal": "right", "wait": "left", "value": 2})
    return b.build()


# -- order and concurrency -------------------------------------------------------------


async def test_chain_runs_in_dependency_order(recorder: Any) -> None:
    wf = chain(5)
    results = await AsyncLocalRuntime().execute_workflow_async(wf, {"start": 10}, on_event=recorder)
    assert results == {
        "n0": {"value": 10},
        "n1": {"sum": 11},
        "n2": {"sum": 12},
        "n3": {"sum": 13},
        "n4": {"sum": 14},
    }
    started = [e.node_id for e in recorder.events if e.kind is EventKind.NODE_STARTED]
    assert started == ["n0", "n1", "n2", "n3", "n4"]


def diamond() -> Workflow:
    """top feeds left and right, which both feed join."""
    b = WorkflowBuilder()
    b.add_node("TConst", "top", {"value": 1})
    b.add_node("TAdd", "left", {"b": 10})
    b.add_node("TAdd", "right", {"b": 100})
    b.add_node("TAdd", "join", {})
    b.add_connection("top", "value", "left", "a")
    b.add_connection("top", "value", "right", "a")
    b.add_connection("left", "sum", "join", "a")
    b.add_connection("right", "sum", "join", "b")
    return b.build()


async def test_diamond_waits_for_both_branches(recorder: Any) -> None:
    wf = diamond()
    assert wf.order == ("top", "left", "right", "join")
    results = await AsyncLocalRuntime().execute_workflow_async(wf, on_event=recorder)
    assert results["join"] == {"sum": 112}
    kinds = [(str(e.kind), e.node_id) for e in recorder.events]
    join_start = kinds.index(("node_started", "join"))
    assert kinds.index(("node_completed", "left")) < join_start
    assert kinds.index(("node_completed", "right")) < join_start


async def test_independent_branches_run_concurrently(gate: Any) -> None:
    # each node waits for an event the other sets: run one after the other, this deadlocks
    wf = two_waiters()
    async with asyncio.timeout(BOUND):
        results = await AsyncLocalRuntime().execute_workflow_async(wf)
    assert results == {"left": {"value": 1}, "right": {"value": 2}}
    assert sorted(gate.log) == ["end left", "end right", "start left", "start right"]


async def test_branches_after_a_shared_parent_run_concurrently(gate: Any) -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "root", {"value": 7})
    b.add_node("TWait", "left", {"signal": "left", "wait": "right"})
    b.add_node("TWait", "right", {"signal": "right", "wait": "left"})
    b.add_connection("root", "value", "left", "value")
    b.add_connection("root", "value", "right", "value")
    async with asyncio.timeout(BOUND):
        results = await AsyncLocalRuntime().execute_workflow_async(b.build())
    assert results == {"root": {"value": 7}, "left": {"value": 7}, "right": {"value": 7}}


# -- execution ids and events ----------------------------------------------------------


async def test_each_execution_has_its_own_id() -> None:
    b = WorkflowBuilder().add_node("TExecId", "who", {})
    wf = b.build()
    rt = AsyncLocalRuntime()
    r1, id1 = await rt.execute(wf)
    r2, id2 = await rt.execute(wf)
    assert r1 == {"who": {"id": id1}}
    assert r2 == {"who": {"id": id2}}
    assert id1 != id2
    r3 = await rt.execute_workflow_async(wf, execution_id="my-run")
    assert r3 == {"who": {"id": "my-run"}}
    assert current_execution() is None


def test_sync_runtime_gives_the_execution_id() -> None:
    wf = WorkflowBuilder().add_node("TExecId", "who", {}).build()
    with LocalRuntime() as rt:
        results, run_id = rt.execute(wf)
        results2, run_id2 = rt.execute(wf)  # the runtime is reusable
    assert results == {"who": {"id": run_id}}
    assert results2 == {"who": {"id": run_id2}}
    assert run_id != run_id2


async def test_events_of_a_successful_run(recorder: Any) -> None:
    wf = chain(2)
    results, run_id = await AsyncLocalRuntime().execute(wf, {"start": 1}, on_event=recorder)
    assert [(str(e.kind), e.node_id) for e in recorder.events] == [
        ("execution_started", None),
        ("node_started", "n0"),
        ("node_completed", "n0"),
        ("node_started", "n1"),
        ("node_completed", "n1"),
        ("execution_completed", None),
    ]
    assert {e.execution_id for e in recorder.events} == {run_id}
    completed = [e for e in recorder.events if e.kind is EventKind.NODE_COMPLETED]
    assert [e.outputs for e in completed] == [{"value": 1}, {"sum": 2}]
    assert [e.node_type for e in completed] == ["TConst", "TAdd"]
    for e in completed:
        assert isinstance(e.duration, float)
        assert e.duration >= 0.0
    last = recorder.events[-1]
    assert last.kind.terminal
    assert last.results == results
    assert isinstance(last.duration, float)
    assert last.error is None


async def test_events_of_a_failing_run(recorder: Any) -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "ok", {"value": 1})
    b.add_node("TBoom", "boom", {})
    b.add_connection("ok", "value", "boom", "value")
    with pytest.raises(NodeExecutionError):
        await AsyncLocalRuntime().execute_workflow_async(b.build(), on_event=recorder)
    assert recorder.kinds() == [
        "execution_started",
        "node_started",
        "node_completed",
        "node_started",
        "node_failed",
        "execution_failed",
    ]
    failed = recorder.events[4]
    assert failed.node_id == "boom"
    assert isinstance(failed.duration, float)
    assert isinstance(failed.error, NodeExecutionError)
    assert recorder.events[5].error is failed.error


async def test_stream_yields_every_event_ending_with_the_results() -> None:
    wf = chain(3)
    events = [e async for e in AsyncLocalRuntime().stream(wf, {"start": 5}, execution_id="s1")]
    assert [str(e.kind) for e in events] == [
        "execution_started",
        "node_started",
        "node_completed",
        "node_started",
        "node_completed",
        "node_started",
        "node_completed",
        "execution_completed",
    ]
    assert {e.execution_id for e in events} == {"s1"}
    assert events[-1].results == {"n0": {"value": 5}, "n1": {"sum": 6}, "n2": {"sum": 7}}


async def test_stream_ends_with_execution_failed() -> None:
    wf = WorkflowBuilder().add_node("TBoom", "boom", {}).build()
    async with asyncio.timeout(BOUND):
        events = [e async for e in AsyncLocalRuntime().stream(wf)]
    assert [str(e.kind) for e in events] == [
        "execution_started",
        "node_started",
        "node_failed",
        "execution_failed",
    ]
    assert isinstance(events[-1].error, NodeExecutionError)
    assert events[-1].error.node_id == "boom"


async def test_stream_rejects_bad_inputs_before_the_first_event() -> None:
    with pytest.raises(InvalidInputsError, match="start: required input is missing"):
        async for _ in AsyncLocalRuntime().stream(chain(1)):
            pytest.fail("no event expected")


async def test_closing_a_stream_early_cancels_the_execution(gate: Any) -> None:
    wf = WorkflowBuilder().add_node("TWait", "w", {"signal": "in", "wait": "never"}).build()
    async with asyncio.timeout(BOUND):
        stream = AsyncLocalRuntime().stream(wf)
        seen = []
        async for event in stream:
            seen.append(str(event.kind))
            if event.kind is EventKind.NODE_STARTED:
                break
        await stream.aclose()  # type: ignore[attr-defined]
    assert seen == ["execution_started", "node_started"]
    assert gate.cancelled == ["w"]


# -- cancellation and timeout ----------------------------------------------------------


async def test_cancelling_the_task_cancels_the_run(gate: Any, recorder: Any) -> None:
    b = WorkflowBuilder()
    b.add_node("TWait", "a", {"signal": "a", "wait": "never"})
    b.add_node("TWait", "b", {"signal": "b", "wait": "never"})
    b.add_node("TAdd", "after", {"b": 1})
    b.add_node("TConst", "one", {"value": 1})
    b.add_connection("one", "value", "after", "a")
    b.add_connection("after", "sum", "a", "value")
    wf = b.build()
    task = asyncio.create_task(AsyncLocalRuntime().execute_workflow_async(wf, on_event=recorder))
    async with asyncio.timeout(BOUND):
        await gate["a"].wait()
        await gate["b"].wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sorted(gate.cancelled) == ["a", "b"]
    assert recorder.events[-1].kind is EventKind.EXECUTION_CANCELLED
    assert "cancelled" in str(recorder.events[-1].error)
    assert recorder.kinds().count("execution_cancelled") == 1


async def test_cancelling_a_stream_consumer_reports_cancelled(gate: Any) -> None:
    wf = WorkflowBuilder().add_node("TWait", "w", {"signal": "in", "wait": "never"}).build()
    events: list[Event] = []
    rt = AsyncLocalRuntime()

    async def consume() -> None:
        async for e in rt.stream(wf):
            events.append(e)

    task = asyncio.create_task(consume())
    async with asyncio.timeout(BOUND):
        await gate["in"].wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert gate.cancelled == ["w"]
    assert [str(e.kind) for e in events] == ["execution_started", "node_started"]


async def test_timeout_names_the_running_nodes(gate: Any, recorder: Any) -> None:
    b = WorkflowBuilder()
    b.add_node("TWait", "slow1", {"wait": "never"})
    b.add_node("TWait", "slow2", {"wait": "never"})
    b.add_node("TConst", "quick", {"value": 1})
    wf = b.build()
    async with asyncio.timeout(BOUND):
        with pytest.raises(ExecutionTimeoutError) as info:
            await AsyncLocalRuntime().execute_workflow_async(wf, timeout=0.05, on_event=recorder)
    assert info.value.running == ["slow1", "slow2"]
    assert info.value.timeout == 0.05
    assert str(info.value) == "execution timed out after 0.05s (running nodes: slow1, slow2)"
    assert sorted(gate.cancelled) == ["slow1", "slow2"]
    assert recorder.events[-1].kind is EventKind.EXECUTION_FAILED
    assert recorder.events[-1].error is info.value


async def test_timeout_names_a_node_running_alone(gate: Any) -> None:
    wf = WorkflowBuilder().add_node("TWait", "only", {"wait": "never"}).build()
    async with asyncio.timeout(BOUND):
        with pytest.raises(ExecutionTimeoutError) as info:
            await AsyncLocalRuntime(timeout=0.05).execute_workflow_async(wf)
    assert info.value.running == ["only"]


def test_sync_runtime_timeout(gate: Any) -> None:
    wf = WorkflowBuilder().add_node("TWait", "only", {"wait": "never"}).build()
    with LocalRuntime() as rt, pytest.raises(ExecutionTimeoutError, match="running nodes: only"):
        rt.execute(wf, timeout=0.05)


async def test_a_run_within_its_timeout_completes() -> None:
    results = await AsyncLocalRuntime(timeout=BOUND).execute_workflow_async(chain(3), {"start": 0})
    assert results["n2"] == {"sum": 2}


# -- failures --------------------------------------------------------------------------


async def test_failing_node_names_node_and_cause_and_stops_siblings(gate: Any) -> None:
    b = WorkflowBuilder()
    b.add_node("TWait", "waiter", {"signal": "waiting", "wait": "never"})
    b.add_node("TWait", "trigger", {"wait": "waiting"})
    b.add_node("TBoom", "boom", {})
    b.add_connection("trigger", "value", "boom", "value")
    async with asyncio.timeout(BOUND):
        with pytest.raises(NodeExecutionError) as info:
            await AsyncLocalRuntime().execute_workflow_async(b.build())
    err = info.value
    assert (err.node_id, err.node_type) == ("boom", "TBoom")
    assert isinstance(err.cause, ValueError)
    assert str(err) == "node 'boom' (TBoom) failed: ValueError: kaboom"
    assert gate.cancelled == ["waiter"]


def test_failing_node_in_the_sync_runtime() -> None:
    wf = WorkflowBuilder().add_node("TBoom", "boom", {}).build()
    with LocalRuntime() as rt, pytest.raises(NodeExecutionError, match="node 'boom'"):
        rt.execute(wf)


@register_node
class TReturnsList(Node):
    outputs = {"x": Output(int)}

    def run(self) -> Any:
        return [1, 2]


async def test_a_node_returning_a_non_mapping_fails_clearly() -> None:
    wf = WorkflowBuilder().add_node("TReturnsList", "bad", {}).build()
    with pytest.raises(NodeExecutionError) as info:
        await AsyncLocalRuntime().execute_workflow_async(wf)
    assert str(info.value) == (
        "node 'bad' (TReturnsList) failed: "
        "TypeError: run() returned list, expected a dict of outputs"
    )


async def test_untyped_output_is_checked_against_a_typed_param_at_run_time() -> None:
    b = WorkflowBuilder()
    b.add_node("TAnything", "src", {"value": "not a number"})
    b.add_node("TAdd", "add", {})
    b.add_connection("src", "value", "add", "a")
    with pytest.raises(NodeExecutionError) as info:
        await AsyncLocalRuntime().execute_workflow_async(b.build())
    assert info.value.node_id == "add"
    assert "parameter 'a' from src.value: expected int, got str 'not a number'" in str(info.value)


async def test_a_missing_open_output_fails_the_consumer() -> None:
    b = WorkflowBuilder()
    b.add_node("PythonCodeNode", "src", {"code": "result = {'a': 1}"})
    b.add_node("TAnything", "dst", {})
    b.add_connection("src", "b", "dst", "value")
    with pytest.raises(NodeExecutionError) as info:
        await AsyncLocalRuntime().execute_workflow_async(b.build())
    assert info.value.node_id == "dst"
    assert "upstream node 'src' produced no output 'b'" in str(info.value)


# -- execution inputs ------------------------------------------------------------------


def typed_inputs() -> Workflow:
    b = WorkflowBuilder()
    b.add_node("TConst", "c", {"value": "{{n}}"})
    b.add_node("TFloat", "f", {"x": "{{x}}"})
    b.add_node("TFlag", "g", {"flag": "{{flag}}"})
    b.add_node("TWait", "w", {"signal": "ran"})
    return b.build()


async def test_bad_inputs_are_rejected_before_any_node_runs(gate: Any, recorder: Any) -> None:
    rt = AsyncLocalRuntime()
    with pytest.raises(InvalidInputsError) as info:
        await rt.execute_workflow_async(
            typed_inputs(), {"n": "3", "flag": True, "extra": 1}, on_event=recorder
        )
    errors = {e.input: e.message for e in info.value.errors}
    assert errors == {
        "n": "expected int, got str '3'",
        "extra": "unknown input (this workflow's inputs: flag, n, x)",
        "x": "required input is missing (float)",
    }
    for name in ("n", "extra", "x"):
        assert f"{name}: " in str(info.value)
    assert recorder.events == []
    assert gate.log == []


def test_bad_inputs_in_the_sync_runtime(gate: Any) -> None:
    with LocalRuntime() as rt, pytest.raises(InvalidInputsError, match="n: required input"):
        rt.execute(typed_inputs(), {"x": 1.0, "flag": False})
    assert gate.log == []


async def test_bool_is_not_an_int() -> None:
    with pytest.raises(InvalidInputsError) as info:
        await AsyncLocalRuntime().execute_workflow_async(
            typed_inputs(), {"n": True, "x": 1.0, "flag": False}
        )
    assert [str(e) for e in info.value.errors] == ["n: expected int, got bool True"]


async def test_int_is_not_a_bool() -> None:
    with pytest.raises(InvalidInputsError) as info:
        await AsyncLocalRuntime().execute_workflow_async(
            typed_inputs(), {"n": 1, "x": 1.0, "flag": 1}
        )
    assert [str(e) for e in info.value.errors] == ["flag: expected bool, got int 1"]


async def test_int_widens_to_float(gate: Any) -> None:
    results = await AsyncLocalRuntime().execute_workflow_async(
        typed_inputs(), {"n": 1, "x": 2, "flag": False}
    )
    assert results["f"] == {"x": 2.0}
    assert type(results["f"]["x"]) is float


async def test_none_for_a_non_nullable_input() -> None:
    with pytest.raises(InvalidInputsError, match="n: expected int, got null"):
        await AsyncLocalRuntime().execute_workflow_async(
            typed_inputs(), {"n": None, "x": 1.0, "flag": False}
        )


# -- shared resources ------------------------------------------------------------------

RESOURCE_LOG: list[Any] = []


@register_node
class TUsesResource(Node):
    """Gets the execution's shared resource; fails when told to."""

    parameters = {"fail": Param(bool, default=False), "value": Param(Any, required=False)}
    outputs = {"resource": Output(Any)}

    async def run(self, fail: bool, value: Any) -> Mapping[str, Any]:
        ctx = current_execution()
        assert ctx is not None
        res = await ctx.resource("conn", self._open)
        if fail:
            raise RuntimeError("node failed after using the resource")
        return {"resource": res}

    @staticmethod
    @contextlib.asynccontextmanager
    async def _open() -> AsyncIterator[str]:
        RESOURCE_LOG.append("enter")
        await asyncio.sleep(0)  # let the other node ask for it meanwhile
        try:
            yield f"conn-{len(RESOURCE_LOG)}"
        except BaseException as exc:
            RESOURCE_LOG.append(("exit", type(exc).__name__))
            raise
        RESOURCE_LOG.append(("exit", None))


def resource_workflow(fail: bool) -> Workflow:
    b = WorkflowBuilder(atomic=True)
    # r1 and r2 start together and both ask for the resource while it is being opened
    b.add_node("TUsesResource", "r1", {})
    b.add_node("TUsesResource", "r2", {})
    b.add_node("TUsesResource", "r3", {"fail": fail})
    b.add_connection("r1", "resource", "r3", "value")
    return b.build()


async def test_resource_is_shared_once_per_execution() -> None:
    RESOURCE_LOG.clear()
    results = await AsyncLocalRuntime().execute_workflow_async(resource_workflow(False))
    assert results == {
        "r1": {"resource": "conn-1"},
        "r2": {"resource": "conn-1"},
        "r3": {"resource": "conn-1"},
    }
    assert RESOURCE_LOG == ["enter", ("exit", None)]
    RESOURCE_LOG.clear()
    await AsyncLocalRuntime().execute_workflow_async(resource_workflow(False))
    assert RESOURCE_LOG == ["enter", ("exit", None)]  # a new one for the next execution


async def test_resource_is_exited_with_the_exception_on_failure() -> None:
    RESOURCE_LOG.clear()
    with pytest.raises(NodeExecutionError, match="node 'r3'"):
        await AsyncLocalRuntime().execute_workflow_async(resource_workflow(True))
    assert RESOURCE_LOG == ["enter", ("exit", "NodeExecutionError")]


# -- the sync runtime ------------------------------------------------------------------


async def test_local_runtime_inside_a_running_loop_raises_clearly() -> None:
    with pytest.raises(RuntimeError, match="called from a running event loop"):
        LocalRuntime().execute(chain(1), {"start": 1})


def test_local_runtime_errors_are_workflow_errors() -> None:
    assert issubclass(NodeExecutionError, WorkflowError)
    assert issubclass(InvalidInputsError, WorkflowError)
    assert issubclass(ExecutionTimeoutError, WorkflowError)


@register_node
class TMaybe(Node):
    """Outputs a nullable int."""

    parameters = {"value": Param(int | None, required=False)}
    outputs = {"value": Output(int | None)}

    def run(self, value: int | None) -> Mapping[str, Any]:
        return {"value": value}


async def test_a_null_from_a_nullable_output_is_checked_at_run_time() -> None:
    b = WorkflowBuilder()
    b.add_node("TMaybe", "m", {"value": "{{v}}"})
    b.add_node("TAdd", "add", {})
    b.add_connection("m", "value", "add", "a")
    wf = b.build()
    rt = AsyncLocalRuntime()
    assert (await rt.execute_workflow_async(wf, {"v": 4}))["add"] == {"sum": 4}
    with pytest.raises(NodeExecutionError) as info:
        await rt.execute_workflow_async(wf, {"v": None})
    assert info.value.node_id == "add"
    assert "parameter 'a' from m.value: expected int, got null" in str(info.value)


async def test_an_emit_callback_sees_a_terminal_event_for_foreign_errors() -> None:
    class Stop(BaseException):
        pass

    events: list[Event] = []

    def on_event(e: Event) -> None:
        events.append(e)
        if e.kind is EventKind.NODE_STARTED:
            raise Stop("callback gave up")

    with pytest.raises(Stop):
        await AsyncLocalRuntime().execute_workflow_async(chain(1), {"start": 1}, on_event=on_event)
    assert [str(e.kind) for e in events] == [
        "execution_started",
        "node_started",
        "execution_failed",
    ]
    assert str(events[-1].error) == "execution failed: Stop: callback gave up"


def test_sync_runtime_reports_cancellation_as_an_error() -> None:
    async def cancel_myself() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)

    events: list[Event] = []
    wf = WorkflowBuilder().add_node("PythonCodeNode", "c", {"function": cancel_myself}).build()
    with LocalRuntime() as rt, pytest.raises(ExecutionCancelledError, match="cancelled"):
        rt.execute(wf, on_event=events.append)
    assert [str(e.kind) for e in events] == [
        "execution_started",
        "node_started",
        "execution_cancelled",
    ]


async def test_a_node_failing_before_it_runs_is_started_then_failed(recorder: Any) -> None:
    b = WorkflowBuilder()
    b.add_node("TAnything", "src", {"value": "x"})
    b.add_node("TAdd", "add", {})
    b.add_connection("src", "value", "add", "a")
    with pytest.raises(NodeExecutionError):
        await AsyncLocalRuntime().execute_workflow_async(b.build(), on_event=recorder)
    assert recorder.kinds("add") == ["node_started", "node_failed"]


class _Opener:
    """A resource factory that can fail on enter or on a clean exit."""

    def __init__(self, fail_enter: bool = False, fail_commit: bool = False) -> None:
        self.fail_enter = fail_enter
        self.fail_commit = fail_commit
        self.entered = 0

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[str]:
        self.entered += 1
        await asyncio.sleep(0)
        if self.fail_enter:
            raise ConnectionError("database is down")
        yield "conn"
        if self.fail_commit:
            raise ConnectionError("commit failed")


OPENER = _Opener()


@register_node
class TOpens(Node):
    outputs = {"resource": Output(Any)}

    async def run(self) -> Mapping[str, Any]:
        ctx = current_execution()
        assert ctx is not None
        return {"resource": await ctx.resource("db", OPENER)}


def two_openers() -> Workflow:
    b = WorkflowBuilder()
    b.add_node("TOpens", "o1", {})
    b.add_node("TOpens", "o2", {})
    return b.build()


async def test_a_failing_resource_factory_fails_the_execution(recorder: Any) -> None:
    global OPENER
    OPENER = _Opener(fail_enter=True)
    async with asyncio.timeout(BOUND):
        with pytest.raises(NodeExecutionError) as info:
            await AsyncLocalRuntime().execute_workflow_async(two_openers(), on_event=recorder)
    assert info.value.node_id in ("o1", "o2")
    assert str(info.value).endswith("failed: ConnectionError: database is down")
    assert OPENER.entered == 1
    assert recorder.events[-1].kind is EventKind.EXECUTION_FAILED


async def test_a_resource_failing_to_commit_fails_the_execution(recorder: Any) -> None:
    global OPENER
    OPENER = _Opener(fail_commit=True)
    with pytest.raises(WorkflowError) as info:
        await AsyncLocalRuntime().execute_workflow_async(two_openers(), on_event=recorder)
    assert str(info.value) == ("committing the execution's shared resources failed: commit failed")
    assert OPENER.entered == 1
    assert recorder.kinds().count("node_completed") == 2
    assert recorder.events[-1].kind is EventKind.EXECUTION_FAILED


def test_event_is_a_frozen_dataclass() -> None:
    import dataclasses

    e = Event(EventKind.NODE_STARTED, "x", "n", "T")
    assert isinstance(e.timestamp, float)
    assert e.timestamp > 0
    assert (e.duration, e.outputs, e.results, e.error) == (None, None, None, None)
    assert [f.name for f in dataclasses.fields(Event)] == [
        "kind",
        "execution_id",
        "node_id",
        "node_type",
        "duration",
        "outputs",
        "results",
        "error",
        "timestamp",
    ]
    moved = dataclasses.replace(e, node_id="m")
    assert (moved.node_id, moved.timestamp, moved.kind) == ("m", e.timestamp, e.kind)
    assert moved == Event(EventKind.NODE_STARTED, "x", "m", "T", timestamp=e.timestamp)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.node_id = "z"  # type: ignore[misc]


# -- run_validated and chains -----------------------------------------------------------


@register_node
class TRvFails(Node):
    """Fails with a ValueError naming its input."""

    parameters = {"x": Param(int)}
    outputs = {"x": Output(int)}

    def run(self, x: int) -> dict[str, Any]:
        raise ValueError(f"no good: {x}")


# -- chains: recognised at build time, run node after node ----------------------------


def test_a_linear_workflow_is_a_chain_in_dependency_order() -> None:
    wf = chain(4)
    assert wf._chain is not None
    assert [p.id for p in wf._chain] == ["n0", "n1", "n2", "n3"]


def test_a_single_node_is_a_chain() -> None:
    wf = WorkflowBuilder().add_node("TConst", "only", {"value": 1}).build()
    assert wf._chain is not None
    assert [p.id for p in wf._chain] == ["only"]


def test_two_connections_from_the_same_node_still_make_a_chain() -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "x", {"value": 2})
    b.add_node("TAdd", "y", {})
    b.add_connection("x", "value", "y", "a")
    b.add_connection("x", "value", "y", "b")
    wf = b.build()
    assert wf._chain is not None
    assert [p.id for p in wf._chain] == ["x", "y"]


def test_fan_out_fan_in_and_independent_roots_are_not_chains() -> None:
    assert diamond()._chain is None
    b = WorkflowBuilder()
    b.add_node("TConst", "a", {"value": 1})
    b.add_node("TConst", "b", {"value": 2})
    assert b.build()._chain is None


async def test_a_chain_and_a_diamond_give_the_results_of_every_node() -> None:
    rt = AsyncLocalRuntime()
    assert await rt.execute_workflow_async(chain(3), {"start": 5}) == {
        "n0": {"value": 5},
        "n1": {"sum": 6},
        "n2": {"sum": 7},
    }
    assert await rt.execute_workflow_async(diamond()) == {
        "top": {"value": 1},
        "left": {"sum": 11},
        "right": {"sum": 101},
        "join": {"sum": 112},
    }


async def test_a_failing_node_in_a_chain_stops_the_chain(recorder: Any) -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "first", {"value": 1})
    b.add_node("TRvFails", "bad", {})
    b.add_node("TConst", "never", {})
    b.add_connection("first", "value", "bad", "x")
    b.add_connection("bad", "x", "never", "value")
    wf = b.build()
    assert wf._chain is not None
    with pytest.raises(NodeExecutionError) as info:
        await AsyncLocalRuntime().execute_workflow_async(wf, on_event=recorder)
    assert info.value.node_id == "bad"
    assert "no good: 1" in str(info.value)
    started = [e.node_id for e in recorder.events if e.kind is EventKind.NODE_STARTED]
    assert started == ["first", "bad"]
    assert recorder.events[-1].kind is EventKind.EXECUTION_FAILED


async def test_a_timeout_in_a_chain_names_the_running_node(gate: Any) -> None:
    b = WorkflowBuilder()
    b.add_node("TConst", "first", {"value": 1})
    b.add_node("TWait", "slow", {"wait": "never"})
    b.add_connection("first", "value", "slow", "value")
    wf = b.build()
    assert wf._chain is not None
    async with asyncio.timeout(BOUND):
        with pytest.raises(ExecutionTimeoutError) as info:
            await AsyncLocalRuntime(timeout=0.05).execute_workflow_async(wf)
    assert info.value.running == ["slow"]
    assert gate.cancelled == ["slow"]


# -- run_validated ----------------------------------------------------------------------


async def test_run_validated_does_not_validate_again(monkeypatch: pytest.MonkeyPatch) -> None:
    wf = chain(2)
    inputs = wf.validate_inputs({"start": 3})

    def refuse(parameters: Any) -> dict[str, Any]:
        raise AssertionError("validated twice")

    monkeypatch.setattr(wf, "validate_inputs", refuse)
    results = await AsyncLocalRuntime().run_validated(wf, inputs, execution_id="e1")
    assert results == {"n0": {"value": 3}, "n1": {"sum": 4}}


async def test_execute_workflow_async_still_validates() -> None:
    with pytest.raises(InvalidInputsError):
        await AsyncLocalRuntime().execute_workflow_async(chain(2), {"start": "three"})


async def test_run_validated_emits_what_execute_workflow_async_emits(recorder: Any) -> None:
    wf = chain(3)
    rt = AsyncLocalRuntime()
    await rt.run_validated(
        wf, wf.validate_inputs({"start": 1}), execution_id="run-7", on_event=recorder
    )
    reference: list[Event] = []
    await rt.execute_workflow_async(wf, {"start": 1}, on_event=reference.append)

    def seen(events: list[Event]) -> list[tuple[str, str | None, Any, Any]]:
        return [(str(e.kind), e.node_id, e.outputs, e.results) for e in events]

    assert seen(recorder.events) == seen(reference)
    assert len(reference) == 8
    assert {e.execution_id for e in recorder.events} == {"run-7"}


@pytest.mark.parametrize("given", [None, ""])
async def test_run_validated_makes_an_execution_id_when_none_is_given(
    recorder: Any, given: str | None
) -> None:
    wf = chain(1)
    await AsyncLocalRuntime().run_validated(wf, {"start": 1}, execution_id=given, on_event=recorder)
    ids = {e.execution_id for e in recorder.events}
    assert len(ids) == 1
    (only,) = ids
    assert len(only) == 32


async def test_run_validated_uses_the_runtime_timeout_unless_given_one(gate: Any) -> None:
    wf = WorkflowBuilder().add_node("TWait", "only", {"wait": "never"}).build()
    async with asyncio.timeout(BOUND):
        with pytest.raises(ExecutionTimeoutError) as info:
            await AsyncLocalRuntime(timeout=0.05).run_validated(wf, {})
        assert info.value.timeout == 0.05
        with pytest.raises(ExecutionTimeoutError) as info:
            await AsyncLocalRuntime(timeout=BOUND).run_validated(wf, {}, timeout=0.02)
        assert info.value.timeout == 0.02
