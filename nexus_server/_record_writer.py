"""Group commit for execution records.

Writing an execution's record by itself cost a database transaction per row, ten times
the cost of a trivial workflow. Records are therefore queued and written by one task,
all pending rows in one transaction: under load many executions share a commit, and an
execution that ends before its RUNNING row was written is written once, in its final
state.

A caller that must not answer before a row is in the database (an acknowledged
execution is never lost: `committed`) makes the writer write at once; rows that arrive
while a transaction is under way share the next one, so under load one commit carries
many calls without anyone waiting on a timer. Rows nobody waits for (an execution's
RUNNING state, when no request_id makes it matter) wait `LINGER` (10 ms) for company.

A failed transaction is retried (its rows are kept, never dropped); each waiter of the
failed rows is told at once (`committed` raises), so calls fail fast while the database
is down instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Generic, TypeVar

__all__ = ["RecordRejected", "RecordWriter"]

T = TypeVar("T")

_log = logging.getLogger("nexus_server")

#: Rows waiting beyond this make writers wait (bounded memory while the database is slow).
MAX_PENDING = 10_000
#: Rows written in one transaction at most.
MAX_BATCH = 1_000
#: Seconds the writer waits, once a row arrives, for more to share its transaction.
LINGER = 0.01


class RecordRejected(Exception):
    """The row was refused for good by `write` (its key is taken elsewhere); it is not
    queued any more."""


class RecordWriter(Generic[T]):
    """Queues items by key (the latest version of an item wins) and writes them in
    batches.

    An item may keep changing after `put` (a running execution's record): put it again
    when it changes, and it is written again if a write of an earlier state of it was
    under way. `write` must read the items before its first `await`, so that what it
    writes is the state they had when the batch was taken.

    Args:
        write: writes a batch of items in one transaction (an upsert on the key), and
            returns the keys of rows it refused for good (never retried), if any.
        key: the key of an item (the execution id).
        written: called with each batch once it is committed.
        retry_delay: seconds before a failed batch is tried again (it is kept, never
            dropped, so a database outage delays records instead of losing them).
        linger: seconds to wait, once a row arrives, for more rows to join its batch
            (group commit: under load, one transaction per `linger` instead of one per
            few calls). `drain`, `stop` and `committed` cut it short.
    """

    def __init__(
        self,
        write: Callable[[Sequence[T]], Awaitable[Collection[str] | None]],
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
        # key -> (the put count that must be written, the waiter's future)
        self._waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}

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

    async def committed(self, key: str) -> None:
        """Return once the version of `key` put last is in the database.

        The writer writes at once for it (no lingering). Await it right after `put`
        (before anything else yields): a refused row is forgotten once refused. Raises
        the write's exception
        when the transaction carrying it fails (the row stays queued and is retried), or
        `RecordRejected` when `write` refused it for good.
        """
        n = self._puts.get(key)
        if n is None:
            return  # not queued: the version put last is written
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append((n, fut))
        self._urgent.set()
        self._wakeup.set()
        try:
            await fut
        finally:
            waiting = self._waiters.get(key)
            if waiting is not None:
                waiting[:] = [w for w in waiting if w[1] is not fut]
                if not waiting:
                    del self._waiters[key]

    def discard(self, key: str) -> None:
        """Forget a queued row that must not be written any more (its execution never
        started). A transaction already carrying it may still write it."""
        self.pending.pop(key, None)
        self._puts.pop(key, None)

    def _settle(
        self,
        keys: Sequence[str],
        written: Sequence[int],
        error: BaseException | None,
        rejected: Collection[str] = (),
    ) -> None:
        """Wake the waiters of `keys` whose version was in the batch just finished."""
        for k, n in zip(keys, written, strict=True):
            waiting = self._waiters.get(k)
            if not waiting:
                continue
            for wanted, fut in waiting:
                if fut.done() or (error is None and wanted > n and k not in rejected):
                    continue
                if error is not None:
                    fut.set_exception(error)
                elif k in rejected:
                    fut.set_exception(RecordRejected(k))
                else:
                    fut.set_result(None)

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
                    rejected = set(await self._write(batch) or ())
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    _log.exception("writing %d execution record(s) failed; retrying", len(batch))
                    self._settle(keys, puts, exc)
                    self._urgent.clear()  # waiters were told: retry at the normal pace
                    await asyncio.sleep(self._retry_delay)
                    continue
                for k, n in zip(keys, puts, strict=True):
                    # an item put again meanwhile stays queued: its newer state is unwritten
                    if self._puts.get(k) == n or k in rejected:
                        self.pending.pop(k, None)
                        self._puts.pop(k, None)
                self._settle(keys, puts, None, rejected)
                self._written(batch)
                if len(self.pending) < MAX_PENDING:
                    self._room.set()
            self._urgent.clear()
            self._idle.set()
