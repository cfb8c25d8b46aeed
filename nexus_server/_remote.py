"""Watching and cancelling an execution that another replica runs.

Executions run in the process that started them; their records are in the shared
database. A replica asked to watch (WatchExecution, or StreamExecution with the
request_id of a running execution) or to cancel an execution that is RUNNING in its
record but not in this process asks the others over the bus (`_bus`):

- watch: it sends `{"op": "watch", "id": ..., "w": token}` on `CONTROL` (`token`
  names this watcher); the replica running the execution forwards its events to that
  watcher on `EVENTS`, from the first one it still buffers, each as a serialized
  `ExecutionEvent` (base64). An event too large for one message
  (`_bus.MAX_PAYLOAD`) is sent trimmed: without a node's outputs, the started event's
  inputs and an error's details (the final event carries the execution's full record).
  Once the execution ended and its record is committed, it sends `{"final": seq}`, and
  the watcher answers the final event from the record. The watcher also re-reads the
  record every `POLL` seconds (and repeats its request), so a lost message, or a
  replica that died, never leaves it waiting for good: with no bus at all (an
  in-memory SQLite database) that poll is all there is, and only the final event comes.
- cancel: it sends `{"op": "cancel", "id": ...}`; the replica running the execution
  cancels it; the caller's replica waits (at most `CANCEL_WAIT` seconds) for the record
  to say how it ended. Nobody ending it by then is SERVER_UNAVAILABLE (retryable).

Only events are forwarded, and only while someone watches from elsewhere: an execution
nobody watches remotely costs no message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from workflow import Event

from ._bus import MAX_PAYLOAD, Bus
from ._errors import ApiError, brief
from ._executions import Executions, RunningExecution
from ._store import RUNNING_STATES, ExecutionRecord

__all__ = ["CANCEL_WAIT", "CONTROL", "EVENTS", "POLL", "RemoteExecutions"]

_log = logging.getLogger("nexus_server")

#: Bus channel of watch and cancel requests.
CONTROL = "nexus_execution_control"
#: Bus channel of forwarded events.
EVENTS = "nexus_execution_events"
#: Seconds between two re-reads of a remotely watched execution's record.
POLL = 1.0
#: Seconds a remote cancel waits for the record to end.
CANCEL_WAIT = 10.0
#: Seconds a forwarded final event waits for the record to say the execution ended.
SETTLE_WAIT = 5.0
#: Messages queued per remote watcher; a watcher that falls behind loses node events
#: (never the final one: it is read from the record).
WATCH_QUEUE = 1000
#: Remote watchers one process forwards events to at once (more are not served: they
#: get the final event from the record).
MAX_FORWARDING = 1000

Encode = Callable[[Event, int, ExecutionRecord], wpb.ExecutionEvent]


class RemoteExecutions:
    """Watch and cancel requests between replicas (see the module's docstring).

    Args:
        executions: this process's executions.
        bus: the replicas' bus, or None (this process alone: polling only).
        encode: an event as the contract sends it (the servicer's own encoding).
    """

    def __init__(self, executions: Executions, bus: Bus | None, encode: Encode) -> None:
        self.executions = executions
        self.bus = bus
        self.encode = encode
        #: watcher token -> the queue of its messages
        self._watchers: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        #: (execution id, watcher token) -> the task forwarding its events
        self._forwarding: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._asking: set[asyncio.Task[None]] = set()
        if bus is not None:
            bus.subscribe(CONTROL, self._on_control)
            bus.subscribe(EVENTS, self._on_event)

    async def close(self) -> None:
        tasks = [*self._forwarding.values(), *self._asking]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- the watcher's side ----------------------------------------------------------

    async def watch(
        self, rec: ExecutionRecord
    ) -> AsyncIterator[tuple[wpb.ExecutionEvent | None, int, ExecutionRecord | None]]:
        """The events of `rec`'s execution, run elsewhere: `(event, seq, None)` for
        each forwarded event, then `(None, seq, record)` once it ended (the record as
        committed; `seq` the final event's sequence number)."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(WATCH_QUEUE)
        token = uuid.uuid4().hex
        self._watchers[token] = queue
        seen = 0
        try:
            await self._ask("watch", rec.id, token)
            while True:
                try:
                    async with asyncio.timeout(POLL):
                        msg = await queue.get()
                except TimeoutError:
                    now = await self.executions.store.get_execution(rec.id)
                    if now is not None and now.state not in RUNNING_STATES:
                        yield None, seen + 1, now
                        return
                    await self._ask("watch", rec.id, token)  # lost, or sent before it ran
                    continue
                if "final" in msg:
                    final = await self._ended(rec.id)
                    yield None, max(int(msg["final"]), seen + 1), final
                    return
                seq = int(msg["seq"])
                if seq > seen:
                    seen = seq
                    yield wpb.ExecutionEvent.FromString(base64.b64decode(msg["event"])), seq, None
        finally:
            del self._watchers[token]
            # the running replica may stop forwarding (best effort: else it stops at
            # the execution's end)
            with contextlib.suppress(RuntimeError):  # the loop is closing
                task = asyncio.get_running_loop().create_task(self._ask("unwatch", rec.id, token))
                self._asking.add(task)
                task.add_done_callback(self._asking.discard)

    async def _ended(self, execution_id: str) -> ExecutionRecord:
        """The record of an execution its replica says ended, once it says so (its
        commit and our read may cross), within `SETTLE_WAIT` seconds."""
        give_up = time.monotonic() + SETTLE_WAIT
        delay = 0.02
        while True:
            rec = await self.executions.store.get_execution(execution_id)
            if rec is None:
                raise ApiError("EXECUTION_NOT_FOUND", f"execution {brief(execution_id)} not found")
            if rec.state not in RUNNING_STATES or time.monotonic() >= give_up:
                return rec
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _on_event(self, payload: str) -> None:
        msg = json.loads(payload)
        queue = self._watchers.get(str(msg.get("w")))
        if queue is None:
            return  # another replica's watcher
        if queue.full():
            if "final" not in msg:
                return  # a slow watcher skips node events, never the end
            queue.get_nowait()
        queue.put_nowait(msg)

    # -- cancel ----------------------------------------------------------------------

    async def cancel(self, rec: ExecutionRecord) -> ExecutionRecord:
        """Ask the replica running `rec`'s execution to cancel it; return the record
        once it ended (CANCELLED, or how it ended first).

        Raises:
            ApiError: SERVER_UNAVAILABLE when it did not end within `CANCEL_WAIT` s.
        """
        give_up = time.monotonic() + CANCEL_WAIT
        asked = 0.0
        delay = 0.02
        while time.monotonic() < give_up:
            if self.bus is not None and time.monotonic() - asked >= POLL:
                await self._ask("cancel", rec.id)
                asked = time.monotonic()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
            now = await self.executions.store.get_execution(rec.id)
            if now is not None and now.state not in RUNNING_STATES:
                return now
        raise ApiError(
            "SERVER_UNAVAILABLE",
            f"execution {brief(rec.id)} runs on another server process that did not "
            f"confirm its cancellation within {CANCEL_WAIT:g} s; retry",
        )

    # -- the running replica's side --------------------------------------------------

    async def _ask(self, op: str, execution_id: str, token: str = "") -> None:
        if self.bus is None:
            return
        try:
            msg = {"op": op, "id": execution_id, "w": token}
            await self.bus.publish(CONTROL, json.dumps(msg))
        except Exception as exc:  # the poll goes on; the next ask may pass
            _log.warning("asking other replicas to %s an execution failed: %s", op, exc)

    def _on_control(self, payload: str) -> None:
        msg = json.loads(payload)
        execution_id, op = str(msg.get("id")), msg.get("op")
        key = (execution_id, str(msg.get("w")))
        if op == "unwatch":
            forwarding = self._forwarding.get(key)
            if forwarding is not None:
                forwarding.cancel()
            return
        run = self.executions.running.get(execution_id)
        if run is None:
            return  # not ours (or over already)
        if op == "cancel":
            if run.task is not None and not run.task.done():
                run.task.cancel()
        elif (
            op == "watch" and key not in self._forwarding and len(self._forwarding) < MAX_FORWARDING
        ):
            task = asyncio.create_task(self._forward(run, key[1]), name=f"forward-{execution_id}")
            self._forwarding[key] = task
            task.add_done_callback(lambda _t: self._forwarding.pop(key, None))

    async def _forward(self, run: RunningExecution, token: str) -> None:
        """Send `run`'s events to the watcher `token`, then its end."""
        bus = self.bus
        assert bus is not None
        rec = run.record
        try:
            seq = 0
            async for seq, event in run.watch():
                if event.kind.terminal:
                    break
                payload = self._event_payload(self.encode(event, seq, rec), token, seq)
                if payload is not None:
                    await bus.publish(EVENTS, payload)
            await run.wait()
            try:
                async with asyncio.timeout(self.executions.commit_timeout):
                    await self.executions.writer.committed(rec.id)
            except Exception as exc:  # the watchers read the record until it ends
                _log.warning("execution %s: its record is not committed yet (%s)", rec.id, exc)
            await bus.publish(EVENTS, json.dumps({"w": token, "final": seq}))
        except Exception as exc:
            _log.warning("forwarding the events of execution %s failed: %s", rec.id, exc)

    @staticmethod
    def _event_payload(event: wpb.ExecutionEvent, token: str, seq: int) -> str | None:
        """The message of one event, trimmed to fit (None: it cannot)."""
        for attempt in range(2):
            data = base64.b64encode(event.SerializeToString()).decode()
            payload = json.dumps({"w": token, "seq": seq, "event": data})
            if len(payload) <= MAX_PAYLOAD:
                return payload
            if attempt == 0:
                if event.HasField("node_completed"):
                    event.node_completed.ClearField("outputs")
                if event.HasField("execution_started"):
                    event.execution_started.ClearField("inputs")
                if event.HasField("node_failed"):
                    del event.node_failed.error.details[:]
        return None
