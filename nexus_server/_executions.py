"""Running executions: idempotent starts, event fan-out, cancellation and durable records.

Each execution runs in a task of its own. Its events are kept in a capped buffer that
watchers read from (a slow watcher skips node events it missed, never the final one);
the finished execution is written to the store, so memory holds only what is running.

Durability: an execution with a request_id (the caller's promise to retry, and ours to
run it once) is acknowledged only once durable, and never runs twice:

- when every node of its workflow writes only to the app's database (DataFlow nodes of
  the database the records live in), it runs in one transaction with its record: it
  happens entirely, recorded, or not at all (a crash leaves nothing; the retry runs it);
  a failure rolls its writes back and is recorded after;
- otherwise its RUNNING record is committed before any node runs, so a retry after a
  crash finds it (marked INTERRUPTED at the next start) instead of running it again.

Either way nobody hears of its end (the unary reply, a stream's final event) before its
record is committed. Commits outside a workflow's transaction are group commits shared
by concurrent calls. The record of an execution without a request_id is written behind
(within `LINGER`, many executions per commit): a crash can lose the records of the last
few milliseconds, never what the workflow's nodes committed (a commit per call would
cost about 40 % of a short workflow's throughput: docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as _dt
import json
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from google.protobuf.json_format import MessageToDict

from dataflow import AlreadyExistsError, DatabaseError, storable_reason
from workflow import AsyncLocalRuntime, Event, EventKind, Workflow

from ._errors import ApiError, brief, to_api_error
from ._jsonable import stored_json, to_jsonable
from ._record_writer import LINGER, RecordRejected, RecordWriter
from ._store import ACTIVE_STATES, ExecutionRecord, Store, body_hash, check_request_id

if TYPE_CHECKING:
    from .gateway._metrics import Metrics

__all__ = ["Executions", "RunningExecution", "error_dict"]

#: Seconds a call waits for an execution another server process runs (same request_id).
SETTLE_SECONDS = 300.0
#: Events kept per running execution; older node events are dropped past this.
EVENT_BUFFER = 1000

#: The reasons of a failure that means the database could not be reached (or its
#: circuit breaker refused the call at once).
_UNAVAILABLE = ("DATABASE_UNAVAILABLE", "DEPENDENCY_UNAVAILABLE")

_STATE_OF = {
    EventKind.EXECUTION_COMPLETED: "SUCCEEDED",
    EventKind.EXECUTION_FAILED: "FAILED",
    EventKind.EXECUTION_CANCELLED: "CANCELLED",
}


def _unrecorded() -> DatabaseError:
    return DatabaseError(
        "the execution could not be recorded: the database is unavailable; retry with "
        "the same request_id"
    )


class _TakenElsewhere(Exception):
    """Another server process committed the same request_id first (our run rolled back)."""

    def __init__(self, record: ExecutionRecord) -> None:
        self.record = record


class _Unreturnable(Exception):
    """The workflow ran, but its outputs cannot be returned: roll its writes back."""

    def __init__(self, error: dict[str, Any] | None) -> None:
        self.error = error


def _storable_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The inputs as the execution's record holds them (JSON), or INPUTS_INVALID naming
    each input the record could not hold (NUL, ints past 64 bits...)."""
    doc: dict[str, Any] = to_jsonable(inputs)
    if not doc or storable_reason(doc) is None:
        return doc
    bad = [
        (f"inputs.{name}", why)
        for name, value in doc.items()
        if (why := storable_reason(value)) is not None
    ]
    raise ApiError("INPUTS_INVALID", f"invalid inputs: {bad[0][0]}: {bad[0][1]}", bad)


def _succeeded(
    results: Any,
) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None, tuple[dict[str, Any], str] | None]:
    """(state, outputs, error, the outputs with their JSON text) of a workflow that
    returned `results`: converted, checked and encoded in one walk when they may be
    stored as they are (the record writer takes the text), else the exact path says why."""
    fast = stored_json(results)
    if fast is not None:
        return "SUCCEEDED", fast[0], None, fast
    try:
        outputs = to_jsonable(results)
    except TypeError as exc:
        why = f"cannot be returned: {exc}"
    else:
        unstorable = storable_reason(outputs)
        if unstorable is None:
            return "SUCCEEDED", outputs, None, None
        why = f"cannot be stored: {unstorable}"
    error = error_dict(ApiError("NODE_FAILED", f"the execution's outputs {why}"))
    return "FAILED", None, error, None


def error_dict(exc: BaseException) -> dict[str, Any]:
    """A stored error: the google.rpc.Status as proto3 JSON plus its reason (a NUL in a
    node's message, which no database stores, becomes U+FFFD)."""
    api = to_api_error(exc)
    doc: dict[str, Any] = MessageToDict(api.to_status())
    doc["reason"] = api.reason
    if storable_reason(doc) is not None:
        doc = json.loads(json.dumps(doc).replace("\\u0000", "\\ufffd"))
    return doc


def new_execution_id() -> str:
    """32 hex digits: the time in microseconds, then 72 random bits. Ids grow with time,
    so their index takes new rows at its end (not scattered pages), and stay
    unguessable."""
    return f"{time.time_ns() // 1000:014x}{os.urandom(9).hex()}"


class RunningExecution:
    """An execution running in this process, with its latest events (for watchers)."""

    __slots__ = (
        "_changed",
        "_done",
        "commit_error",
        "events",
        "finished",
        "record",
        "sequence",
        "task",
        "transactional",
    )

    def __init__(self, record: ExecutionRecord) -> None:
        self.record = record
        self.task: asyncio.Task[None] | None = None
        self.events: collections.deque[tuple[int, Event]] = collections.deque(maxlen=EVENT_BUFFER)
        self.sequence = 0
        #: whether the execution ended (its record holds how)
        self.finished = False
        #: why the final record could not be made durable (the call then fails with it)
        self.commit_error: Exception | None = None
        #: runs in one transaction with its record (see the module's docstring)
        self.transactional = False
        # created only when someone waits for the end (most executions end unwatched)
        self._done: asyncio.Event | None = None
        #: set (and replaced) on the next event; created only when someone watches
        self._changed: asyncio.Event | None = None

    def push(self, event: Event) -> None:
        self.sequence += 1
        self.events.append((self.sequence, event))
        if self._changed is not None:  # wake(), inlined: four events per execution
            self._changed.set()
            self._changed = None

    def wake(self) -> None:
        """Wake the watchers (a new event, or the execution is done)."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def finish(self) -> None:
        """Mark the execution ended: wakes whoever waits for it or watches it."""
        self.finished = True
        if self._done is not None:
            self._done.set()
        self.wake()

    async def wait(self) -> None:
        """Return once the execution has ended."""
        if not self.finished:
            if self._done is None:
                self._done = asyncio.Event()
            await self._done.wait()

    async def watch(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event from the first still buffered, then live ones, until the last."""
        seen = 0
        while True:
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            for seq, event in list(self.events):
                if seq > seen:
                    seen = seq
                    yield seq, event
                    if event.kind.terminal:
                        return
            if self.finished and seen >= self.sequence:
                return
            await changed.wait()


_NODE_OUTCOMES = {EventKind.NODE_COMPLETED: "completed", EventKind.NODE_FAILED: "failed"}


def _observing(
    push: Callable[[Event], None], metrics: Metrics, workflow: str
) -> Callable[[Event], None]:
    """`push`, also recording each node's run time (monitoring on)."""

    def on_event(event: Event) -> None:
        push(event)
        outcome = _NODE_OUTCOMES.get(event.kind)
        if outcome is not None and event.duration is not None:
            metrics.node_ended(workflow, event.node_type or "", outcome, event.duration)

    return on_event


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
        metrics: where executions and node runs are counted (monitoring on), or None.
    """

    def __init__(
        self,
        store: Store,
        timeout: float | None = None,
        *,
        commit_timeout: float = 5.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        #: seconds a call waits for its record to be durable before it fails UNAVAILABLE
        self.commit_timeout = commit_timeout
        self.runtime = AsyncLocalRuntime(timeout=timeout)
        #: entered around each execution (a tracer's span: `gateway._tracing`); the
        #: runtime's `node_hook` does the same for each node
        self.span: Callable[[str, str], AbstractContextManager[Any]] | None = None
        self.running: dict[str, RunningExecution] = {}
        self.writer: RecordWriter[ExecutionRecord] = RecordWriter(
            store.write_executions, lambda r: r.id, written=self._written
        )
        # (caller, request_id) -> execution id, for executions not yet in the database
        self._requests: dict[tuple[str, str], str] = {}
        self._request_locks = _KeyedLocks()
        self._local: weakref.WeakKeyDictionary[Workflow, bool] = weakref.WeakKeyDictionary()
        #: this server process's id in the rows it runs, and the seconds of a lease it
        #: renews on them (`_queue.Leases`); None: no leases (an Executions of its own)
        self.runner: str | None = None
        self.lease = 10.0
        #: (when, execution id) of the executions whose RUNNING row waits `LINGER`
        #: seconds before it is queued, in the order they started (so `when` grows): one
        #: timer for all of them instead of one per execution. One that ends first has
        #: left `running`; its entry, holding no reference to it, leaves when its time
        #: comes
        self._lingering: collections.deque[tuple[float, str]] = collections.deque()
        self._linger_timer: asyncio.TimerHandle | None = None

    def open(self) -> None:
        """Start writing execution records (call once the store is initialised)."""
        self.writer.start()

    async def close(self, grace: float) -> None:
        """Finish or cancel running executions, then write every pending record."""
        await self.shutdown(grace)
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
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

    async def execute(
        self,
        name: str,
        wf: Workflow,
        raw_inputs: Mapping[str, Any],
        *,
        caller: str,
        request_id: str = "",
    ) -> ExecutionRecord:
        """Run an execution to its end in the calling task (unary calls), or wait for the
        one `request_id` started. Cancelling the caller (client deadline, disconnect,
        CancelExecution) cancels the execution it started; it then ends CANCELLED.

        Raises:
            InvalidInputsError: bad inputs (nothing is started or stored).
            ApiError: REQUEST_ID_CONFLICT when the request_id was used with other inputs.
        """
        run, rec, inputs = await self._begin(name, wf, raw_inputs, caller, request_id)
        if inputs is not None:
            assert run is not None
            run.task = asyncio.current_task()
            await self._run(run, wf, inputs)
        elif run is not None:
            await run.wait()
        if run is None:
            return await self._settled(rec)
        if run.commit_error is not None:
            raise run.commit_error
        return await self._settled(run.record)  # another process's, when it took the key

    async def start(
        self,
        name: str,
        wf: Workflow,
        raw_inputs: Mapping[str, Any],
        *,
        caller: str,
        request_id: str = "",
    ) -> tuple[RunningExecution | None, ExecutionRecord, bool]:
        """Validate inputs and start an execution in a task of its own (streamed calls),
        or find the one `request_id` started.

        Returns the running execution (None when a finished one was found by its
        request_id), its record, and whether this call started it.

        Raises: as `execute`.
        """
        run, rec, inputs = await self._begin(name, wf, raw_inputs, caller, request_id)
        if inputs is None:
            return run, rec, False
        assert run is not None
        run.task = asyncio.create_task(self._run(run, wf, inputs), name=f"execution-{rec.id}")
        return run, rec, True

    async def run_claimed(self, rec: ExecutionRecord, wf: Workflow) -> ExecutionRecord:
        """Run a queued execution this process claimed (`_queue.ExecutionQueue`; its row
        is RUNNING already) to its end in the calling task, and return its record once
        committed. Cancelling the task cancels the execution (CANCELLED)."""
        run = RunningExecution(rec)
        self.running[rec.id] = run
        run.task = asyncio.current_task()
        try:
            inputs = wf.validate_inputs(rec.inputs)
        except Exception as exc:  # the workflow changed since it was queued
            self.running.pop(rec.id, None)
            rec.state, rec.error = "FAILED", error_dict(exc)
            rec.end_time = _dt.datetime.now(_dt.UTC)
            self.writer.put(rec)
            run.finish()
        else:
            await self._run(run, wf, inputs)
            if run.commit_error is not None:
                raise run.commit_error
        await self._commit(rec.id)
        return run.record

    async def _begin(
        self,
        name: str,
        wf: Workflow,
        raw_inputs: Mapping[str, Any],
        caller: str,
        request_id: str,
    ) -> tuple[RunningExecution | None, ExecutionRecord, dict[str, Any] | None]:
        """Validate, then either register a new execution (returned with its validated
        inputs, for the caller to run) or find the one `request_id` started (returned
        with None for inputs)."""
        check_request_id(request_id)
        inputs = wf.validate_inputs(raw_inputs)
        stored = _storable_inputs(inputs)
        if not request_id:
            if self.writer.full:
                await self.writer.wait_for_room()
            run = self._register(name, stored, caller, None, None, running_row="later")
            return run, run.record, inputs
        key = (caller, request_id)
        hash_ = body_hash(name, raw_inputs)
        async with self._request_locks.hold(key):  # one start per key at a time
            found = await self._find(caller, request_id, hash_)
            if found is not None:
                return (*found, None)
            if self.writer.full:
                await self.writer.wait_for_room()
            transactional = self._writes_only_here(wf)
            run = self._register(
                name,
                stored,
                caller,
                request_id,
                hash_,
                running_row="never" if transactional else "now",
            )
            run.transactional = transactional
            self._requests[key] = run.record.id
            if transactional:
                return run, run.record, inputs  # recorded with its writes, when they commit
            try:
                # the key is durable before any work starts: a retry after a crash
                # finds this execution (INTERRUPTED) instead of running it again
                await self._commit(run.record.id)
            except RecordRejected:
                self._forget(run)  # another server process recorded this key first
                found = await self._find(caller, request_id, hash_)
                if found is None:
                    raise _unrecorded() from None
                return (*found, None)
            except BaseException:
                self._forget(run)
                raise
            return run, run.record, inputs

    def _register(
        self,
        name: str,
        stored_inputs: dict[str, Any],
        caller: str,
        request_id: str | None,
        hash_: str | None,
        *,
        running_row: str,
    ) -> RunningExecution:
        """Track a new execution. Its RUNNING row is queued `"now"`, `"never"` (it is
        recorded with its writes), or `"later"`: only if it still runs `LINGER` seconds
        from now, so that a short execution is written once, in its final state, and the
        commits waited for by finished calls carry no RUNNING rows."""
        now = _dt.datetime.now(_dt.UTC)
        rec = ExecutionRecord(
            id=new_execution_id(),
            workflow=name,
            state="RUNNING",
            caller=caller,
            request_id=request_id,
            request_hash=hash_,
            inputs=stored_inputs,
            outputs=None,
            error=None,
            create_time=now,
            start_time=now,
            end_time=None,
        )
        if self.runner is not None:
            rec.runner = self.runner
            rec.lease_until = now + _dt.timedelta(seconds=self.lease)
        run = RunningExecution(rec)
        self.running[rec.id] = run
        if running_row == "now":
            self.writer.put(rec)
        elif running_row == "later":
            loop = asyncio.get_running_loop()
            due = loop.time() + LINGER
            self._lingering.append((due, rec.id))
            if self._linger_timer is None:
                self._linger_timer = loop.call_at(due, self._put_lingering)
        return run

    async def drain(self) -> None:
        """Write every execution's current state now (what ListExecutions reads)."""
        lingering = list(self._lingering)
        self._lingering.clear()
        for _, execution_id in lingering:
            self._put_running(execution_id)
        await self.writer.drain()

    def _put_lingering(self) -> None:
        """Queue the RUNNING rows of the executions still running `LINGER` seconds
        after they started; call again at the next one's time, but not sooner than
        `LINGER` from now: under load an execution starts every few hundred µs, and the
        timer fired for nearly every one. So a RUNNING row is queued between `LINGER`
        and twice `LINGER` after its execution started."""
        self._linger_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        lingering = self._lingering
        while lingering:
            due, execution_id = lingering[0]
            if due > now:
                self._linger_timer = loop.call_at(max(due, now + LINGER), self._put_lingering)
                return
            lingering.popleft()
            self._put_running(execution_id)

    def _put_running(self, execution_id: str) -> None:
        """Queue the RUNNING row of a lingering execution that still runs."""
        run = self.running.get(execution_id)
        if run is not None and not run.finished:  # an ended one left `running` first
            self.writer.put(run.record)

    def _writes_only_here(self, wf: Workflow) -> bool:
        """Whether every node of `wf` is a DataFlow node of the records' database."""
        known = self._local.get(wf)
        if known is None:
            db = self.store.db
            models = {m.name for m in db.models}
            known = bool(wf.nodes) and all(
                (model := getattr(type(node), "dataflow_model", None)) in models
                and db.node_types(model).get(type(node).type_name) is type(node)
                for node in wf.nodes.values()
            )
            self._local[wf] = known
        return known

    async def _settled(self, rec: ExecutionRecord) -> ExecutionRecord:
        """The record once its execution ended: one that another server process runs is
        read again until it ends, for `SETTLE_SECONDS` at most (or the caller's deadline);
        then it is returned as it is, RUNNING (that process may have died: its restart
        marks it INTERRUPTED)."""
        delay = 0.02
        give_up = time.monotonic() + SETTLE_SECONDS
        while rec.state in ACTIVE_STATES and time.monotonic() < give_up:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            rec = await self.store.get_execution(rec.id) or rec
        return rec

    async def _commit(self, execution_id: str) -> None:
        """Wait until the execution's record, as put last, is in the database.

        Raises:
            DatabaseError: it could not be written within `commit_timeout` seconds or
                its transaction failed (the row stays queued and is retried).
            RecordRejected: another server process holds its request_id.
        """
        try:
            async with asyncio.timeout(self.commit_timeout):
                await self.writer.committed(execution_id)
        except RecordRejected:
            raise
        except (TimeoutError, Exception) as exc:
            raise _unrecorded() from exc

    def _forget(self, run: RunningExecution) -> None:
        """Drop an execution that never started (its record could not be made durable)."""
        rec = run.record
        self.running.pop(rec.id, None)
        self.writer.discard(rec.id)
        if rec.request_id:
            self._requests.pop((rec.caller, rec.request_id), None)
        run.finish()

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
                f"request_id {brief(request_id)} was already used for a different request",
                [("request_id", "already used with other inputs or another workflow")],
                {"execution_id": rec.id},
            )
        return self.running.get(rec.id), rec

    async def _run(self, run: RunningExecution, wf: Workflow, inputs: dict[str, Any]) -> None:
        """`_run_recorded` inside the execution's span when tracing is on."""
        if self.span is None:
            await self._run_recorded(run, wf, inputs)
        else:
            with self.span(run.record.workflow, run.record.id):
                await self._run_recorded(run, wf, inputs)

    async def _run_recorded(
        self, run: RunningExecution, wf: Workflow, inputs: dict[str, Any]
    ) -> None:
        """Run the workflow and record how it ended. A cancellation ends the execution
        CANCELLED and is not raised on (the caller reads the record)."""
        rec = run.record
        outputs: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        encoded: tuple[dict[str, Any], str] | None = None
        state = "FAILED"
        recorded = False  # committed with the workflow's writes
        forgotten = False
        metrics = self.metrics
        if metrics is not None:
            started = time.perf_counter()
            metrics.execution_started(rec.workflow)
            on_event = _observing(run.push, metrics, rec.workflow)
        else:
            on_event = run.push
        try:
            if run.transactional:
                recorded = await self._run_in_transaction(run, wf, inputs, on_event)
                state, outputs, error = rec.state, rec.outputs, rec.error
            else:
                results = await self.runtime.run_validated(
                    wf, inputs, execution_id=rec.id, on_event=on_event
                )
                state, outputs, error, encoded = _succeeded(results)
        except asyncio.CancelledError:
            state = "CANCELLED"
            error = error_dict(ApiError("EXECUTION_CANCELLED", "the execution was cancelled"))
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # handled: the execution's end is its result
        except _TakenElsewhere as taken:
            run.record = taken.record  # another server process ran this request
            recorded = True
        except Exception as exc:
            error = error_dict(exc)
            # rolled back because the database was unavailable (or its circuit breaker
            # open: every node of a transactional execution is the database's): nothing
            # of it was kept, so it is not recorded and a retry with its request_id runs it
            forgotten = run.transactional and error.get("reason") in _UNAVAILABLE
        finally:
            if metrics is not None:
                ended = run.record.state if recorded else state
                metrics.execution_ended(rec.workflow, ended, time.perf_counter() - started)
            self.running.pop(rec.id, None)
            try:
                if recorded or forgotten:
                    self._requests.pop((rec.caller, rec.request_id or ""), None)
                    if forgotten:
                        rec.state, rec.error = "FAILED", error
                        rec.end_time = _dt.datetime.now(_dt.UTC)
                else:
                    rec.state, rec.outputs, rec.error = state, outputs, error
                    rec.outputs_json = encoded
                    rec.end_time = _dt.datetime.now(_dt.UTC)
                    self.writer.put(rec)  # again: its final state (once more, if need be)
                    if rec.request_id:
                        # acknowledged means recorded: nobody hears of the end before it is
                        await self._commit(rec.id)
            except RecordRejected:
                # another server process recorded this request_id first: its answer wins
                other = await self._other(rec)
                if other is None:
                    run.commit_error = _unrecorded()
                else:
                    run.record = other
            except Exception as exc:
                run.commit_error = exc
            finally:
                run.finish()

    async def _run_in_transaction(
        self,
        run: RunningExecution,
        wf: Workflow,
        inputs: dict[str, Any],
        on_event: Callable[[Event], None],
    ) -> bool:
        """Run `wf` in one transaction that also inserts its final record. Returns True
        when it committed; False when the workflow's outputs could not be returned (the
        record, FAILED, is then written on its own after the rollback)."""
        rec = run.record
        db = self.store.db
        try:
            async with db.transaction():
                results = await self.runtime.run_validated(
                    wf, inputs, execution_id=rec.id, on_event=on_event
                )
                state, outputs, error, _ = _succeeded(results)
                if state != "SUCCEEDED":
                    raise _Unreturnable(error)
                rec.state, rec.outputs, rec.error = state, outputs, error
                rec.end_time = _dt.datetime.now(_dt.UTC)
                await self.store.insert_execution(rec)
        except _Unreturnable as exc:
            rec.state, rec.outputs, rec.error = "FAILED", None, exc.error
            return False
        except AlreadyExistsError:
            other = await self._other(rec)
            if other is None:
                raise
            raise _TakenElsewhere(other) from None
        return True

    async def _other(self, rec: ExecutionRecord) -> ExecutionRecord | None:
        """The execution another server process recorded for `rec`'s request_id."""
        if not rec.request_id:
            return None
        other = await self.store.find_request(rec.caller, rec.request_id)
        return None if other is None or other.id == rec.id else other

    async def get(self, execution_id: str, owner: str | None = None) -> ExecutionRecord:
        """The execution `execution_id`; with `owner`, only if that principal started it
        (another's is NOT_FOUND, as if it did not exist)."""
        rec = self._unflushed(execution_id)
        if rec is None and len(execution_id) <= 64 and "\x00" not in execution_id:
            rec = await self.store.get_execution(execution_id)  # else no id can match
        if rec is None or (owner is not None and rec.caller != owner):
            raise ApiError(
                "EXECUTION_NOT_FOUND",
                f"execution {brief(execution_id)} not found",
                [("id", "no execution has this id")],
            )
        return rec

    async def cancel(self, execution_id: str, owner: str | None = None) -> ExecutionRecord:
        """Cancel `execution_id` (with `owner`: only that principal's, see `get`)."""
        run = self.running.get(execution_id)
        if run is not None and owner is not None and run.record.caller != owner:
            run = None  # another's: answered by `get` below as not found
        if run is None or run.task is None:
            rec = await self.get(execution_id, owner)
            if rec.state == "CANCELLED":
                return rec  # cancelling twice is not an error: the contract returns it unchanged
            raise ApiError(
                "EXECUTION_ALREADY_FINISHED",
                f"execution {brief(execution_id)} already finished ({rec.state})",
                metadata={"state": rec.state},
            )
        run.task.cancel()
        await run.wait()
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
