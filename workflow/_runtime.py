"""Runtimes: execute a Workflow in dependency order, independent branches concurrently."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from ._builder import Workflow, _NodePlan
from ._errors import (
    ExecutionCancelledError,
    ExecutionTimeoutError,
    NodeExecutionError,
    WorkflowError,
)
from ._types import check_value

__all__ = [
    "AsyncLocalRuntime",
    "Event",
    "EventKind",
    "ExecutionContext",
    "LocalRuntime",
    "NodeHook",
    "current_execution",
]


class EventKind(enum.StrEnum):
    EXECUTION_STARTED = "execution_started"
    NODE_STARTED = "node_started"
    NODE_COMPLETED = "node_completed"
    NODE_FAILED = "node_failed"
    EXECUTION_COMPLETED = "execution_completed"
    EXECUTION_FAILED = "execution_failed"
    EXECUTION_CANCELLED = "execution_cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {EventKind.EXECUTION_COMPLETED, EventKind.EXECUTION_FAILED, EventKind.EXECUTION_CANCELLED}
)


@dataclass(frozen=True, init=False)
class Event:
    """Something that happened during an execution.

    Attributes:
        kind: what happened.
        execution_id: the execution it belongs to.
        node_id / node_type: set on node events.
        duration: seconds, on node_completed / node_failed and on terminal events.
        outputs: the node's outputs on node_completed.
        results: every node's outputs on execution_completed.
        error: the error on node_failed / execution_failed / execution_cancelled.
        timestamp: wall-clock time (seconds since the epoch).
    """

    kind: EventKind
    execution_id: str
    node_id: str | None = None
    node_type: str | None = None
    duration: float | None = None
    outputs: Mapping[str, Any] | None = None
    results: Mapping[str, Mapping[str, Any]] | None = None
    error: WorkflowError | None = None
    timestamp: float = field(default_factory=time.time)

    # Hand-written for speed (the runtime makes three per node): one dict update instead of
    # the generated frozen __init__'s nine object.__setattr__ calls; same signature.
    def __init__(
        self,
        kind: EventKind,
        execution_id: str,
        node_id: str | None = None,
        node_type: str | None = None,
        duration: float | None = None,
        outputs: Mapping[str, Any] | None = None,
        results: Mapping[str, Mapping[str, Any]] | None = None,
        error: WorkflowError | None = None,
        timestamp: float | None = None,
    ) -> None:
        self.__dict__.update(
            kind=kind,
            execution_id=execution_id,
            node_id=node_id,
            node_type=node_type,
            duration=duration,
            outputs=outputs,
            results=results,
            error=error,
            timestamp=time.time() if timestamp is None else timestamp,
        )


EventCallback = Callable[[Event], None]

#: `AsyncLocalRuntime.node_hook`: called with a node's id and type name as the node
#: starts; the context manager it returns is entered around the node's `run` (a tracer
#: makes a span of it). The runtime knows nothing else of who listens.
NodeHook = Callable[[str, str], AbstractContextManager[Any]]


class ExecutionContext:
    """Per-execution facts and shared resources, available to nodes through
    `current_execution()`.

    Nodes that need one resource per execution (DataFlow's shared transaction) get it
    with `await ctx.resource(key, factory)`: the first caller enters the async context
    manager `factory()` returns; every node of the execution gets the same value; it is
    exited when the execution ends, with the execution's exception if it failed.
    """

    __slots__ = ("_resources", "_stack", "atomic", "execution_id", "workflow")

    def __init__(self, workflow: Workflow, execution_id: str) -> None:
        self.workflow = workflow
        self.execution_id = execution_id
        self.atomic = workflow.atomic
        self._stack: contextlib.AsyncExitStack | None = None
        self._resources: dict[str, asyncio.Future[Any]] = {}

    async def resource(
        self, key: str, factory: Callable[[], AbstractAsyncContextManager[Any]]
    ) -> Any:
        fut = self._resources.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._resources[key] = fut
        try:
            if self._stack is None:
                self._stack = contextlib.AsyncExitStack()
            value = await self._stack.enter_async_context(factory())
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: the raise below reports it
            del self._resources[key]
            raise
        fut.set_result(value)
        return value

    async def _close(self, exc: BaseException | None) -> None:
        if self._stack is None:
            return
        stack, self._stack = self._stack, None
        if exc is None:
            await stack.aclose()
        else:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)


_CURRENT: contextvars.ContextVar[ExecutionContext | None] = contextvars.ContextVar(
    "nexus_workflow_execution", default=None
)


def current_execution() -> ExecutionContext | None:
    """The execution the calling node runs in (None outside a workflow execution)."""
    return _CURRENT.get()


class AsyncLocalRuntime:
    """Runs workflows on the current event loop.

    Args:
        timeout: default per-execution timeout in seconds (None: no limit).
        node_hook: entered around each node's run (`NodeHook`); None: nothing is.
    """

    def __init__(self, *, timeout: float | None = None, node_hook: NodeHook | None = None) -> None:
        self.timeout = timeout
        self.node_hook = node_hook

    async def execute_workflow_async(
        self,
        workflow: Workflow,
        parameters: Mapping[str, Any] | None = None,
        *,
        execution_id: str | None = None,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Run `workflow` and return every node's outputs, by node id.

        Raises:
            InvalidInputsError: before any node runs, if inputs are missing or mistyped.
            NodeExecutionError: naming the node that failed and the cause.
            ExecutionTimeoutError: when `timeout` (or the runtime's default) elapsed.
            asyncio.CancelledError: when the calling task is cancelled (a
                `execution_cancelled` event is emitted first).
        """
        return await self.run_validated(
            workflow,
            workflow.validate_inputs(parameters),
            execution_id=execution_id,
            timeout=timeout,
            on_event=on_event,
        )

    async def execute(
        self,
        workflow: Workflow,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
    ) -> tuple[dict[str, dict[str, Any]], str]:
        """Like `execute_workflow_async`, returning `(results, execution_id)`."""
        execution_id = uuid.uuid4().hex
        results = await self.execute_workflow_async(
            workflow, parameters, execution_id=execution_id, timeout=timeout, on_event=on_event
        )
        return results, execution_id

    async def stream(
        self,
        workflow: Workflow,
        parameters: Mapping[str, Any] | None = None,
        *,
        execution_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[Event]:
        """Run `workflow`, yielding its events; the last one is terminal (completed, failed
        or cancelled) and carries the results or the error. Invalid inputs raise before
        the first event. Closing the iterator early cancels the execution."""
        inputs = workflow.validate_inputs(parameters)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        task = asyncio.ensure_future(
            self.run_validated(
                workflow,
                inputs,
                execution_id=execution_id,
                timeout=timeout,
                on_event=queue.put_nowait,
            )
        )
        # the outcome travels in the terminal event; keep the task's own quiet
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            while True:
                event = await queue.get()
                yield event
                if event.kind.terminal:
                    return
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def run_validated(
        self,
        workflow: Workflow,
        inputs: dict[str, Any],
        *,
        execution_id: str | None = None,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
    ) -> dict[str, dict[str, Any]]:
        """`execute_workflow_async` for inputs that `workflow.validate_inputs` returned
        already (a server that validated them to answer a bad request before starting
        anything): they are not validated again. Raises as `execute_workflow_async`,
        except for invalid inputs."""
        execution_id = execution_id or uuid.uuid4().hex
        if timeout is None:
            timeout = self.timeout
        emit = on_event
        hook = self.node_hook
        ctx = ExecutionContext(workflow, execution_id)
        token = _CURRENT.set(ctx)
        running: dict[asyncio.Future[Any], str] = {}
        active: set[str] = set()
        started = 0.0
        if emit:
            started = time.perf_counter()
            emit(Event(EventKind.EXECUTION_STARTED, execution_id))
        try:
            try:
                if timeout is None:
                    results = await _drive(
                        workflow, inputs, running, active, emit, execution_id, hook
                    )
                else:
                    async with asyncio.timeout(timeout):
                        results = await _drive(
                            workflow, inputs, running, active, emit, execution_id, hook
                        )
            except TimeoutError:
                raise ExecutionTimeoutError(timeout or 0.0, sorted(active)) from None
            finally:
                if running:
                    await _cancel_all(running)
        except asyncio.CancelledError as exc:
            await _close_quietly(ctx, exc)
            if emit:
                err = ExecutionCancelledError("execution was cancelled")
                emit(_terminal(EventKind.EXECUTION_CANCELLED, execution_id, started, error=err))
            raise
        except WorkflowError as exc:
            await _close_quietly(ctx, exc)
            if emit:
                emit(_terminal(EventKind.EXECUTION_FAILED, execution_id, started, error=exc))
            raise
        except BaseException as exc:
            await _close_quietly(ctx, exc)
            if emit:
                # a stream waits for a terminal event: it must get one whatever happened
                failure = WorkflowError(f"execution failed: {type(exc).__name__}: {exc}")
                emit(_terminal(EventKind.EXECUTION_FAILED, execution_id, started, error=failure))
            raise
        finally:
            _CURRENT.reset(token)
        try:
            if ctx._stack is not None:  # shared resources were opened
                await ctx._close(None)
        except Exception as exc:
            commit_err = WorkflowError(f"committing the execution's shared resources failed: {exc}")
            if emit:
                emit(_terminal(EventKind.EXECUTION_FAILED, execution_id, started, error=commit_err))
            raise commit_err from exc
        if emit:
            emit(_terminal(EventKind.EXECUTION_COMPLETED, execution_id, started, results=results))
        return results


def _terminal(kind: EventKind, execution_id: str, started: float, **kw: Any) -> Event:
    return Event(kind, execution_id, duration=time.perf_counter() - started, **kw)


async def _close_quietly(ctx: ExecutionContext, exc: BaseException) -> None:
    # the execution's own error is what the caller must see, not a rollback failure
    with contextlib.suppress(Exception):
        await ctx._close(exc)


async def _cancel_all(running: dict[asyncio.Future[Any], str]) -> None:
    if not running:
        return
    for t in running:
        t.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    running.clear()


async def _drive(
    workflow: Workflow,
    inputs: dict[str, Any],
    running: dict[asyncio.Future[Any], str],
    active: set[str],
    emit: EventCallback | None,
    execution_id: str,
    hook: NodeHook | None,
) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    chain = workflow._chain
    if chain is not None:  # node after node: nothing can run beside another
        for plan in chain:
            results[plan.id] = await _run_node(
                plan, inputs, results, active, emit, execution_id, hook
            )
        return results
    plans = workflow._plans
    remaining = dict(workflow._n_deps)
    ready = list(workflow._roots)

    def complete(nid: str, outputs: dict[str, Any]) -> None:
        results[nid] = outputs
        for succ in plans[nid].successors:
            remaining[succ] -= 1
            if remaining[succ] == 0:
                ready.append(succ)

    while ready or running:
        if len(ready) == 1 and not running:
            # a chain: run the next node inline, no task needed
            nid = ready.pop()
            complete(
                nid, await _run_node(plans[nid], inputs, results, active, emit, execution_id, hook)
            )
            continue
        for nid in ready:
            task = asyncio.ensure_future(
                _run_node(plans[nid], inputs, results, active, emit, execution_id, hook)
            )
            running[task] = nid
        ready.clear()
        done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        for fut in done:
            nid = running.pop(fut)
            complete(nid, fut.result())
    return results


async def _run_node(
    plan: _NodePlan,
    inputs: dict[str, Any],
    results: dict[str, dict[str, Any]],
    active: set[str],
    emit: EventCallback | None,
    execution_id: str,
    hook: NodeHook | None,
) -> dict[str, Any]:
    nid = plan.id
    t0 = 0.0
    if emit:
        emit(Event(EventKind.NODE_STARTED, execution_id, nid, plan.type_name))
        t0 = time.perf_counter()
    active.add(nid)
    try:
        kwargs = dict(plan.static)
        for pname, tmpl in plan.templates:
            fallback = plan.defaults_for.get(pname)
            if fallback is not None and fallback[0] not in inputs:
                kwargs[pname] = fallback[1]
            else:
                kwargs[pname] = tmpl.render(inputs)
        for inc in plan.incoming:
            outputs = results[inc.source]
            if inc.output not in outputs:
                raise ValueError(f"upstream node '{inc.source}' produced no output '{inc.output}'")
            value: Any = outputs[inc.output]
            if inc.check is not None:
                try:
                    value = check_value(inc.check, value)
                except TypeError as exc:
                    raise TypeError(
                        f"parameter '{inc.input}' from {inc.source}.{inc.output}: {exc}"
                    ) from None
            kwargs[inc.input] = value
        if hook is None:
            value = plan.run(**kwargs)
            if plan.node._is_async:
                value = await value
        else:
            with hook(nid, plan.type_name):
                value = plan.run(**kwargs)
                if plan.node._is_async:
                    value = await value
        if isinstance(value, dict):
            out: dict[str, Any] = value
        elif isinstance(value, Mapping):
            out = dict(value)
        else:
            raise TypeError(f"run() returned {type(value).__name__}, expected a dict of outputs")
    except asyncio.CancelledError:
        raise  # the node stays in `active`: it was running when the execution stopped
    except Exception as exc:
        active.discard(nid)
        err = NodeExecutionError(nid, plan.type_name, exc)
        if emit:
            dur = time.perf_counter() - t0
            emit(Event(EventKind.NODE_FAILED, execution_id, nid, plan.type_name, dur, error=err))
        raise err from exc
    active.discard(nid)
    if emit:
        dur = time.perf_counter() - t0
        emit(Event(EventKind.NODE_COMPLETED, execution_id, nid, plan.type_name, dur, outputs=out))
    return out


class LocalRuntime:
    """Runs workflows synchronously, on an event loop of its own.

    For code that has no event loop (scripts, notebooks' plain cells). Inside async code
    use `AsyncLocalRuntime`. The loop is kept between calls (so database pools opened by
    nodes stay usable) and closed by `close()` or when used as a context manager.
    """

    def __init__(self, *, timeout: float | None = None) -> None:
        self._async = AsyncLocalRuntime(timeout=timeout)
        self._loop: asyncio.AbstractEventLoop | None = None

    def execute(
        self,
        workflow: Workflow,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        on_event: EventCallback | None = None,
    ) -> tuple[dict[str, dict[str, Any]], str]:
        """Run `workflow`; return `(results, execution_id)`. Raises as
        `AsyncLocalRuntime.execute_workflow_async` does."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "LocalRuntime.execute() was called from a running event loop; "
                "use `await AsyncLocalRuntime().execute_workflow_async(...)` instead"
            )
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        try:
            return self._loop.run_until_complete(
                self._async.execute(workflow, parameters, timeout=timeout, on_event=on_event)
            )
        except asyncio.CancelledError:
            raise ExecutionCancelledError("execution was cancelled") from None

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()
        self._loop = None

    def __del__(self) -> None:
        # `LocalRuntime().execute(...)` used once must not leave an unclosed loop behind
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed() and not loop.is_running():
            loop.close()

    def __enter__(self) -> LocalRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
