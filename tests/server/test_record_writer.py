"""RecordWriter (write-behind with group commit), alone: coalescing, batching, retries
after failures, bounded memory, and draining on stop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from nexus_server import _record_writer
from nexus_server._record_writer import RecordWriter


class Sink:
    """Records each written batch; fails the first `failures` writes."""

    def __init__(self, failures: int = 0, gate: asyncio.Event | None = None) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.failures = failures
        self.gate = gate

    async def write(self, batch: Sequence[tuple[str, int]]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            raise OSError("database unavailable")
        self.batches.append(list(batch))

    @property
    def rows(self) -> list[tuple[str, int]]:
        return [row for batch in self.batches for row in batch]


def writer(sink: Sink, **kw: Any) -> RecordWriter[tuple[str, int]]:
    return RecordWriter(sink.write, lambda row: row[0], **kw)


async def test_the_latest_version_of_a_row_is_written_once() -> None:
    sink = Sink()
    w = writer(sink)
    w.start()
    w.put(("a", 1))
    w.put(("b", 1))
    w.put(("a", 2))  # replaces the queued version of "a"
    await w.drain()
    assert sorted(sink.rows) == [("a", 2), ("b", 1)]
    assert w.pending == {}
    await w.stop()


async def test_rows_queued_while_a_batch_is_written_share_the_next_commit() -> None:
    gate = asyncio.Event()
    sink = Sink(gate=gate)
    w = writer(sink, linger=0)
    w.start()
    w.put(("first", 0))
    await asyncio.sleep(0)  # the writer takes "first" and waits on the gate
    for i in range(50):
        w.put((f"r{i}", i))
    gate.set()
    await w.drain()
    assert sink.batches[0] == [("first", 0)]
    assert len(sink.batches) == 2 and len(sink.batches[1]) == 50
    await w.stop()


async def test_a_failed_batch_is_kept_and_written_later() -> None:
    sink = Sink(failures=2)
    w = writer(sink, retry_delay=0.01)
    w.start()
    w.put(("a", 1))
    w.put(("b", 2))
    await asyncio.wait_for(w.drain(), 10)
    assert sorted(sink.rows) == [("a", 1), ("b", 2)]
    await w.stop()


async def test_a_newer_version_queued_during_a_write_stays_queued() -> None:
    gate = asyncio.Event()
    sink = Sink(gate=gate)
    w = writer(sink, linger=0)
    w.start()
    w.put(("a", 1))
    await asyncio.sleep(0)  # version 1 is being written
    w.put(("a", 2))
    gate.set()
    await w.drain()
    assert sink.rows == [("a", 1), ("a", 2)]
    await w.stop()


async def test_an_item_changed_while_its_earlier_state_is_written_is_written_again() -> None:
    gate = asyncio.Event()
    written: list[dict[str, str]] = []

    async def write(batch: Sequence[dict[str, str]]) -> None:
        states = [dict(item) for item in batch]  # read before the first await
        await gate.wait()
        written.extend(states)

    w: RecordWriter[dict[str, str]] = RecordWriter(write, lambda item: item["id"], linger=0)
    w.start()
    record = {"id": "e1", "state": "RUNNING"}
    w.put(record)
    await asyncio.sleep(0)  # the RUNNING state is being written
    record["state"] = "SUCCEEDED"  # the same object, changed, and put again
    w.put(record)
    gate.set()
    await w.drain()
    assert written == [
        {"id": "e1", "state": "RUNNING"},
        {"id": "e1", "state": "SUCCEEDED"},
    ]
    await w.stop()


async def test_new_rows_wait_for_room_when_the_queue_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_record_writer, "MAX_PENDING", 3)
    gate = asyncio.Event()
    sink = Sink(gate=gate)
    w = writer(sink)
    w.start()
    for i in range(3):
        await w.wait_for_room()
        w.put((f"r{i}", i))
    waiting = asyncio.create_task(w.wait_for_room())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # three rows pending: a fourth waits
    w.put(("r0", 99))  # a later version of a queued row never waits
    gate.set()
    await asyncio.wait_for(waiting, 10)
    await w.stop()
    assert ("r0", 99) in sink.rows


async def test_stop_writes_everything_queued() -> None:
    sink = Sink()
    w = writer(sink)
    w.start()
    for i in range(2500):  # more than one batch (MAX_BATCH rows each)
        w.put((f"r{i}", i))
    await w.stop()
    assert len(sink.rows) == 2500
    assert max(len(b) for b in sink.batches) <= _record_writer.MAX_BATCH


# -- linger: waiting, once a row arrives, for more to share its transaction -------------


async def test_rows_put_within_the_linger_window_are_written_in_one_batch() -> None:
    sink = Sink()
    w = writer(sink, linger=0.2)
    w.start()
    for i in range(5):
        w.put((f"r{i}", i))
        await asyncio.sleep(0)  # the writer wakes up between the rows
    await asyncio.sleep(0.05)
    assert sink.batches == []  # still lingering
    await w.drain()
    assert sink.batches == [[(f"r{i}", i) for i in range(5)]]
    await w.stop()


async def test_a_lingering_batch_is_written_when_the_linger_ends() -> None:
    sink = Sink()
    done = asyncio.Event()
    w = RecordWriter(sink.write, lambda row: row[0], written=lambda _: done.set(), linger=0.05)
    w.start()
    w.put(("a", 1))
    await asyncio.sleep(0)
    w.put(("b", 2))
    await asyncio.wait_for(done.wait(), 5)  # no drain: the linger runs out by itself
    assert sink.batches == [[("a", 1), ("b", 2)]]
    assert w.pending == {}
    await w.stop()


async def test_drain_cuts_a_long_linger_short() -> None:
    sink = Sink()
    w = writer(sink, linger=30)
    w.start()
    w.put(("a", 1))
    w.put(("b", 2))
    await asyncio.sleep(0.01)  # the writer is lingering
    await asyncio.wait_for(w.drain(), 5)
    assert sink.batches == [[("a", 1), ("b", 2)]]
    assert w.pending == {}
    # the next row lingers again: draining hurried one batch, not every later one
    w.put(("c", 3))
    await asyncio.sleep(0.05)
    assert sink.rows == [("a", 1), ("b", 2)]
    await asyncio.wait_for(w.drain(), 5)
    assert sink.batches[1:] == [[("c", 3)]]
    await w.stop()


async def test_stop_cuts_a_long_linger_short_and_writes_everything() -> None:
    sink = Sink()
    w = writer(sink, linger=30)
    w.start()
    for i in range(3):
        w.put((f"r{i}", i))
    await asyncio.sleep(0.01)  # the writer is lingering
    await asyncio.wait_for(w.stop(), 5)
    assert sink.batches == [[(f"r{i}", i) for i in range(3)]]
    assert w.pending == {}


async def test_committed_returns_once_the_row_is_written_without_lingering() -> None:
    sink = Sink()
    w = writer(sink, linger=60)  # a waiter must not wait for the linger
    w.start()
    w.put(("a", 1))
    await asyncio.wait_for(w.committed("a"), 5)
    assert sink.rows == [("a", 1)]
    await asyncio.wait_for(w.committed("a"), 1)  # written already: returns at once
    await w.stop()


async def test_committed_waits_for_the_version_put_last() -> None:
    gate = asyncio.Event()
    sink = Sink(gate=gate)
    w = writer(sink, linger=0)
    w.start()
    w.put(("a", 1))
    await asyncio.sleep(0)  # version 1 is being written
    w.put(("a", 2))
    waiting = asyncio.create_task(w.committed("a"))
    gate.set()
    await asyncio.wait_for(waiting, 5)
    assert sink.rows == [("a", 1), ("a", 2)]
    await w.stop()


async def test_rows_waited_for_together_share_one_commit() -> None:
    gate = asyncio.Event()
    sink = Sink(gate=gate)
    w = writer(sink, linger=0)
    w.start()
    w.put(("first", 0))
    await asyncio.sleep(0)  # a transaction is under way
    for i in range(20):
        w.put((f"r{i}", i))
    waiters = [asyncio.create_task(w.committed(f"r{i}")) for i in range(20)]
    gate.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert len(sink.batches) == 2 and len(sink.batches[1]) == 20
    await w.stop()


async def test_a_failed_commit_is_raised_to_its_waiters_and_retried() -> None:
    sink = Sink(failures=1)
    w = writer(sink, retry_delay=0.01)
    w.start()
    w.put(("a", 1))
    with pytest.raises(OSError, match="database unavailable"):
        await asyncio.wait_for(w.committed("a"), 5)
    await asyncio.wait_for(w.drain(), 5)  # kept, and written by the retry
    assert sink.rows == [("a", 1)]
    await w.stop()


async def test_a_row_refused_for_good_is_dropped_and_its_waiter_told() -> None:
    written: list[tuple[str, int]] = []

    async def write(batch: Sequence[tuple[str, int]]) -> list[str]:
        written.extend(row for row in batch if row[0] != "taken")
        return ["taken"]

    w: RecordWriter[tuple[str, int]] = RecordWriter(write, lambda row: row[0], linger=0)
    w.start()
    w.put(("taken", 1))
    w.put(("free", 2))
    with pytest.raises(_record_writer.RecordRejected):
        async with asyncio.timeout(5):  # awaited at once, as the server does after put
            await w.committed("taken")
    await asyncio.wait_for(w.committed("free"), 5)
    assert written == [("free", 2)] and w.pending == {}
    await w.stop()


async def test_a_discarded_row_is_not_written() -> None:
    sink = Sink()
    w = writer(sink, linger=60)
    w.start()
    w.put(("a", 1))
    w.discard("a")
    w.put(("b", 2))
    await asyncio.wait_for(w.drain(), 5)
    assert sink.rows == [("b", 2)]
    await w.stop()
