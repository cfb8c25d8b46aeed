"""Write-behind with group commit for execution records.

Writing an execution's record synchronously cost two database transactions per
execution (its RUNNING row, then its final row), ten times the cost of the workflow
itself. Records are therefore queued and written by one task, all pending rows in one
transaction: under load many executions share a commit, and an execution that ends
before its RUNNING row was written is written once, in its final state.

Once a row arrives, the writer waits `LINGER` (10 ms) for more before it writes: under
load one transaction then carries every execution of those 10 ms, instead of one per
few calls.

What this trades: an execution's record reaches the database up to about 10 ms after
the call returns. Until then it is served from memory (GetExecution, idempotent
retries), `ListExecutions` waits for the queue to drain (without lingering), and a
graceful stop drains it. A crash can lose the records of the last 10 ms or so; the
work the workflow did in the database is not affected (its own transactions are
committed by its nodes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["RecordWriter"]

T = TypeVar("T")

_log = logging.getLogger("nexus_server")

#: Rows waiting beyond this make writers wait (bounded memory while the database is slow).
MAX_PENDING = 10_000
#: Rows written in one transaction at most.
MAX_BATCH = 1_000
#: Seconds the writer waits, once a row arrives, for more to share its transaction.
LINGER = 0.01


class RecordWriter(Generic[T]):
    """Queues items by key (the latest version of an item wins) and writes them in
    batches.

    An item may keep changing after `put` (a running execution's record): put it again
    when it changes, and it is written again if a write of an earlier state of it was
    under way. `write` must read the items before its first `await`, so that what it
    writes is the state they had when the batch was taken.

    Args:
        write: writes a batch of items in one transaction (an upsert on the key).
        key: the key of an item (the execution id).
        written: called with each batch once it is committed.
        retry_delay: seconds before a failed batch is tried again (it is kept, never
            dropped, so a database outage delays records instead of losing them).
        linger: seconds to wait, once a row arrives, for more rows to join its batch
            (group commit: under load, one transaction per `linger` instead of one per
            few calls). `drain` and `stop` cut it short.
    """

    def __init__(
        self,
        write: Callable[[Sequence[T]], Awaitable[None]],
        key: Callable[[T], str],
        *,
        written: Callable[[Sequence[T]], None] = lambda batch: None,
        retry_delay: float = 0.5,
        linger: float = LINGER,
    ) -> None:
        self._write = write
        self._key = key
        self._written = written
        self._retry_delay = retry_delay
        self._linger = linger
        self._urgent = asyncio.Event()  # set by drain: write now, do not linger
        self.pending: dict[str, T] = {}
        self._puts: dict[str, int] = {}  # how many times each pending key was put
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="nexus-record-writer")

    @property
    def full(self) -> bool:
        """Whether a new item would have to `wait_for_room`."""
        return len(self.pending) >= MAX_PENDING

    async def wait_for_room(self) -> None:
        """Wait while the queue is full (the database is slower than the executions).
        Called before a new item's first `put`; later versions of it never wait, so an
        execution that started can always record its end."""
        while len(self.pending) >= MAX_PENDING:
            self._room.clear()
            await self._room.wait()

    def put(self, row: T) -> None:
        """Queue `row`, replacing a queued older version of it."""
        key = self._key(row)
        self.pending[key] = row
        self._puts[key] = self._puts.get(key, 0) + 1
        self._idle.clear()
        self._wakeup.set()

    async def drain(self) -> None:
        """Return once every row queued so far is written."""
        if self.pending or not self._idle.is_set():
            self._urgent.set()
            self._wakeup.set()
            await self._idle.wait()

    async def stop(self) -> None:
        """Write everything queued, then stop the writer task."""
        if self._task is None:
            return
        await self.drain()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if self._linger > 0 and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self._linger)
            self._wakeup.clear()
            while self.pending:
                keys = list(self.pending)[:MAX_BATCH]
                batch = [self.pending[k] for k in keys]
                puts = [self._puts[k] for k in keys]
                try:
                    await self._write(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _log.exception("writing %d execution record(s) failed; retrying", len(batch))
                    await asyncio.sleep(self._retry_delay)
                    continue
                for k, n in zip(keys, puts, strict=True):
                    # an item put again meanwhile stays queued: its newer state is unwritten
                    if self._puts.get(k) == n:
                        del self.pending[k], self._puts[k]
                self._written(batch)
                if len(self.pending) < MAX_PENDING:
                    self._room.set()
            self._urgent.clear()
            self._idle.set()
