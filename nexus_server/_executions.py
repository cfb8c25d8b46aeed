"""Running executions: idempotent starts, event fan-out, cancellation and durable records.

Each execution runs in a task of its own. Its events are kept in a capped buffer that
watchers read from (a slow watcher skips node events it missed, never the final one);
the finished execution is written to the store, so memory holds only what is running.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as _dt
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.json_format import MessageToDict

from workflow import AsyncLocalRuntime, Event, EventKind, Workflow

from ._errors import ApiError, to_api_error
from ._jsonable import to_jsonable
from ._record_writer import RecordWriter
from ._store import ExecutionRecord, Store, body_hash, check_request_id

__all__ = ["Executions", "RunningExecution", "error_dict"]

#: Events kept per running execution; older node events are dropped past this.
EVENT_BUFFER = 1000

_STATE_OF = {
    EventKind.EXECUTION_COMPLETED: "SUCCEEDED",
    EventKind.EXECUTION_FAILED: "FAILED",
    EventKind.EXECUTION_CANCELLED: "CANCELLED",
}


def error_dict(exc: BaseException) -> dict[str, Any]:
    """A stored error: the google.rpc.Status as proto3 JSON plus its reason."""
    api = to_api_error(exc)
    doc: dict[str, Any] = MessageToDict(api.to_status())
    doc["reason"] = api.reason
    return doc


@dataclass
class RunningExecution:
    """An execution running in this process."""

    record: ExecutionRecord
    task: asyncio.Task[None] | None = None
    events: collections.deque[tuple[int, Event]] = field(
        default_factory=lambda: collections.deque(maxlen=EVENT_BUFFER)
    )
    sequence: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, event: Event) -> None:
        self.sequence += 1
        self.events.append((self.sequence, event))
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    async def watch(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event from the first still buffered, then live ones, until the last."""
        seen = 0
        while True:
            changed = self.changed
            for seq, event in list(self.events):
                if seq > seen:
                    seen = seq
                    yield seq, event
                    if event.kind.terminal:
                        return
            if self.done.is_set() and seen >= self.sequence:
                return
            await changed.wait()


class _KeyedLocks:
    """One lock per key, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[Any, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Any) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class Executions:
    """Starts, tracks and records executions.

    Args:
        store: where execution rows live.
        timeout: default per-execution timeout in seconds (None: no limit).
    """

    def __init__(self, store: Store, timeout: float | None = None) -> None:
        self.store = store
        self.runtime = AsyncLocalRuntime(timeout=timeout)
        self.running: dict[str, RunningExecution] = {}
        self.writer: RecordWriter[ExecutionRecord] = RecordWriter(
            store.write_executions, lambda r: r.id, written=self._written
        )
        # (caller, request_id) -> execution id, for executions not yet in the database
        self._requests: dict[tuple[str, str], str] = {}
        self._request_locks = _KeyedLocks()

    def open(self) -> None:
        """Start writing execution records (call once the store is initialised)."""
        self.writer.start()

    async def close(self, grace: float) -> None:
        """Finish or cancel running executions, then write every pending record."""
        await self.shutdown(grace)
        await self.writer.stop()

    def _written(self, batch: Sequence[ExecutionRecord]) -> None:
        for rec in batch:
            if rec.request_id and rec.id not in self.running and rec.id not in self.writer.pending:
                self._requests.pop((rec.caller, rec.request_id), None)

    def _unflushed(self, execution_id: str) -> ExecutionRecord | None:
        run = self.running.get(execution_id)
        if run is not None:
            return run.record
        return self.writer.pending.get(execution_id)

    async def _record(self, rec: ExecutionRecord) -> None:
        # a snapshot: the running record keeps changing while the writer holds this one
        await self.writer.put(dataclasses.replace(rec))

    async def start(
        self,
        name: str,
        wf: Workflow,
        raw_inputs: Mapping[str, Any],
        *,
        caller: str,
        request_id: str = "",
    ) -> tuple[RunningExecution | None, ExecutionRecord, bool]:
        """Validate inputs and start an execution, or find the one `request_id` started.

        Returns the running execution (None when a finished one was found by its
        request_id), its record, and whether this call started it.

        Raises:
            InvalidInputsError: bad inputs (nothing is started or stored).
            ApiError: REQUEST_ID_CONFLICT when the request_id was used with other inputs.
        """
        check_request_id(request_id)
        inputs = wf.validate_inputs(raw_inputs)
        if not request_id:
            return (*await self._launch(name, wf, inputs, caller, None, None), True)
        key = (caller, request_id)
        hash_ = body_hash(name, raw_inputs)
        async with self._request_locks.hold(key):  # one start per key at a time
            found = await self._find(caller, request_id, hash_)
            if found is not None:
                return (*found, False)
            run, rec = await self._launch(name, wf, inputs, caller, request_id, hash_)
            self._requests[key] = rec.id
            return run, rec, True

    async def _launch(
        self,
        name: str,
        wf: Workflow,
        inputs: dict[str, Any],
        caller: str,
        request_id: str | None,
        hash_: str | None,
    ) -> tuple[RunningExecution, ExecutionRecord]:
        now = _dt.datetime.now(_dt.UTC)
        rec = ExecutionRecord(
            id=uuid.uuid4().hex,
            workflow=name,
            state="RUNNING",
            caller=caller,
            request_id=request_id,
            request_hash=hash_,
            inputs=to_jsonable(inputs),
            outputs=None,
            error=None,
            create_time=now,
            start_time=now,
            end_time=None,
        )
        run = RunningExecution(rec)
        self.running[rec.id] = run
        await self._record(rec)
        run.task = asyncio.create_task(self._run(run, wf, inputs), name=f"execution-{rec.id}")
        return run, rec

    async def _find(
        self, caller: str, request_id: str, hash_: str | None
    ) -> tuple[RunningExecution | None, ExecutionRecord] | None:
        known = self._requests.get((caller, request_id))
        rec = self._unflushed(known) if known else None
        if rec is None:
            rec = await self.store.find_request(caller, request_id)
        if rec is None:
            return None
        if rec.request_hash != hash_:
            raise ApiError(
                "REQUEST_ID_CONFLICT",
                f"request_id {request_id!r} was already used for a different request",
                [("request_id", "already used with other inputs or another workflow")],
                {"execution_id": rec.id},
            )
        return self.running.get(rec.id), rec

    async def _run(self, run: RunningExecution, wf: Workflow, inputs: dict[str, Any]) -> None:
        rec = run.record
        outputs: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        state = "FAILED"
        try:
            results = await self.runtime.execute_workflow_async(
                wf, inputs, execution_id=rec.id, on_event=run.push
            )
            try:
                outputs = to_jsonable(results)
                state = "SUCCEEDED"
            except TypeError as exc:
                error = error_dict(
                    ApiError("NODE_FAILED", f"the execution's outputs cannot be returned: {exc}")
                )
        except asyncio.CancelledError:
            state = "CANCELLED"
            error = error_dict(ApiError("EXECUTION_CANCELLED", "the execution was cancelled"))
        except Exception as exc:
            error = error_dict(exc)
        finally:
            rec.state, rec.outputs, rec.error = state, outputs, error
            rec.end_time = _dt.datetime.now(_dt.UTC)
            try:
                await asyncio.shield(self._record(rec))
            finally:
                run.done.set()
                run.changed.set()
                self.running.pop(rec.id, None)

    async def wait(self, run: RunningExecution, *, owner: bool) -> ExecutionRecord:
        """Wait for an execution to finish. When the waiter is the call that started it
        (`owner`), cancelling the waiter (client deadline, disconnect) cancels it too."""
        assert run.task is not None
        try:
            await asyncio.shield(run.task)
        except asyncio.CancelledError:
            if not owner:
                raise
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run.task
            raise
        return run.record

    async def get(self, execution_id: str) -> ExecutionRecord:
        rec = self._unflushed(execution_id) or await self.store.get_execution(execution_id)
        if rec is None:
            raise ApiError(
                "EXECUTION_NOT_FOUND",
                f"execution {execution_id!r} not found",
                [("id", "no execution has this id")],
            )
        return rec

    async def cancel(self, execution_id: str) -> ExecutionRecord:
        run = self.running.get(execution_id)
        if run is None or run.task is None:
            rec = await self.get(execution_id)
            if rec.state == "CANCELLED":
                return rec  # cancelling twice is not an error: the contract returns it unchanged
            raise ApiError(
                "EXECUTION_ALREADY_FINISHED",
                f"execution {execution_id!r} already finished ({rec.state})",
                metadata={"state": rec.state},
            )
        run.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(run.task)
        return run.record

    async def shutdown(self, grace: float) -> None:
        """Let running executions finish for `grace` seconds, then cancel the rest."""
        tasks = [r.task for r in self.running.values() if r.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
