"""The audit trail: one entry per call that changed something, and per refusal.

Every entry is written as one JSON line on the `nexus.audit` logger (always), and, when
the audit table is on, stored in `nexus_audit` in the app's database. Storing is
write-behind: `AuditTrail.record` only queues the entry (a call never waits for, or fails
because of, its audit row), and one background task inserts queued entries in batches.
The queue is bounded: while the database is down and the queue is full, new entries are
not stored (their log lines still are) and one error per such burst says how many.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import contextvars
import datetime as _dt
import functools
import json
import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from dataflow import DataFlow

__all__ = [
    "AUDIT",
    "MAX_PRINCIPAL",
    "AuditEntry",
    "AuditRecord",
    "AuditTrail",
    "bounded",
]

_log = logging.getLogger("nexus.audit")
#: Problems of the trail itself (the database refusing its rows) go to the server's log,
#: not among the audit lines.
_server_log = logging.getLogger("nexus_server")

_META = sa.MetaData()

#: Column sizes, in characters: values are cut to them before they are stored or logged.
MAX_PRINCIPAL = 256
_SIZES = {
    "principal": MAX_PRINCIPAL,
    "tenant": 128,
    "channel": 16,
    "method": 256,
    "resource": 256,
    "request_id": 128,
    "code": 32,
    "reason": 64,
}

AUDIT = sa.Table(
    "nexus_audit",
    _META,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("principal", sa.String(_SIZES["principal"]), nullable=False),
    sa.Column("tenant", sa.String(_SIZES["tenant"]), nullable=True),
    sa.Column("channel", sa.String(_SIZES["channel"]), nullable=False),
    sa.Column("method", sa.String(_SIZES["method"]), nullable=False),
    sa.Column("resource", sa.String(_SIZES["resource"]), nullable=False),
    sa.Column("request_id", sa.String(_SIZES["request_id"]), nullable=False),
    sa.Column("code", sa.String(_SIZES["code"]), nullable=False),
    sa.Column("reason", sa.String(_SIZES["reason"]), nullable=False),
)
# Ids begin with the entry's time in microseconds, so the primary key is the
# newest-first order; this index serves one principal's entries in that order.
_BY_PRINCIPAL = sa.Index("ix_nexus_audit_principal_id", AUDIT.c.principal, AUDIT.c.id)

#: Entries waiting to be stored at most (about 1 KiB each); beyond, new ones are dropped.
MAX_QUEUE = 10_000
#: Entries inserted in one transaction at most.
MAX_BATCH = 500
#: Seconds the writer waits, once an entry arrives, for more to share its transaction.
LINGER = 0.05


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audited call.

    Attributes:
        time: when the call ended (UTC).
        principal: the principal's id, "" when no valid credential came.
        tenant: the principal's tenant, None for none.
        channel: `grpc`, `rest`, `grpc-web`, `cli` or `mcp`.
        method: the full gRPC method (`/nexus.model.v1.ModelService/DeleteRecord`).
        resource: what the call touched (`model:Contact`, `workflow:w`), "" for nothing.
        request_id: the call's idempotency key, "" for none.
        code: the gRPC status code name (`OK`, `PERMISSION_DENIED`, ...).
        reason: the ErrorInfo reason of a failed call, "" otherwise.
    """

    time: _dt.datetime
    principal: str
    tenant: str | None
    channel: str
    method: str
    resource: str
    request_id: str
    code: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A stored entry and its id (time-ordered: a larger id is a later entry)."""

    id: str
    entry: AuditEntry


def _text(value: str, limit: int) -> str:
    """`value` as a column takes it: at most `limit` characters, no NUL (PostgreSQL
    refuses it in text), valid UTF-8 (a lone surrogate would fail the insert)."""
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def bounded(entry: AuditEntry) -> AuditEntry:
    """`entry` with every value cut to its column's size and made storable, its time
    in UTC (a naive time is taken as UTC)."""
    when = entry.time
    when = when.replace(tzinfo=_dt.UTC) if when.tzinfo is None else when.astimezone(_dt.UTC)
    tenant = entry.tenant
    return AuditEntry(
        time=when,
        principal=_text(entry.principal, _SIZES["principal"]),
        tenant=None if tenant is None else _text(tenant, _SIZES["tenant"]),
        channel=_text(entry.channel, _SIZES["channel"]),
        method=_text(entry.method, _SIZES["method"]),
        resource=_text(entry.resource, _SIZES["resource"]),
        request_id=_text(entry.request_id, _SIZES["request_id"]),
        code=_text(entry.code, _SIZES["code"]),
        reason=_text(entry.reason, _SIZES["reason"]),
    )


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


def _new_id(when: _dt.datetime) -> str:
    """32 hex digits: `when` in microseconds since the epoch, then 72 random bits (ids
    sort by time, and two entries of one microsecond still differ)."""
    micros = max(0, (when - _EPOCH) // _dt.timedelta(microseconds=1))
    return f"{micros:014x}{os.urandom(9).hex()}"


def _log_line(entry: AuditEntry) -> str:
    return json.dumps(
        {
            "audit": True,
            "time": entry.time.isoformat(timespec="microseconds"),
            "principal": entry.principal,
            "tenant": entry.tenant,
            "channel": entry.channel,
            "method": entry.method,
            "resource": entry.resource,
            "request_id": entry.request_id,
            "code": entry.code,
            "reason": entry.reason,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def _utc(value: _dt.datetime) -> _dt.datetime:
    return value.replace(tzinfo=_dt.UTC) if value.tzinfo is None else value.astimezone(_dt.UTC)


class AuditTrail:
    """Records audit entries: a log line each, and a row each when the table is on.

    Args:
        db: the app's database (None: log lines only).
        table: whether entries are stored in `nexus_audit` (needs `db`).
        max_queue: entries waiting to be stored at most; beyond, new entries are not
            stored (their log lines are written) until the database catches up.
        retry_delay: seconds before a failed insert is tried again (its entries stay
            queued: a short outage delays rows, it does not lose them).
        linger: seconds the writer waits, once an entry arrives, for more to share its
            transaction (`flush` and `close` cut it short).

    `record` must be called on the event loop's thread (the gateway chain does).
    Entries recorded before `initialize` wait in the queue until it starts the writer.
    """

    def __init__(
        self,
        db: DataFlow | None,
        *,
        table: bool,
        max_queue: int = MAX_QUEUE,
        retry_delay: float = 0.5,
        linger: float = LINGER,
    ) -> None:
        if table and db is None:
            raise ValueError("the audit table needs a database")
        self.db = db
        self.table = table
        self._max_queue = max_queue
        self._retry_delay = retry_delay
        self._linger = linger
        self._queue: deque[tuple[str, AuditEntry]] = deque()
        self._queued = 0  # entries ever queued
        self._stored = 0  # entries ever taken off the queue (written, or given up at close)
        self._dropped = 0  # entries not queued since the last report
        self._failing = False  # the last insert failed (logged once per outage)
        self._wakeup = asyncio.Event()
        self._urgent = asyncio.Event()
        self._flushers: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """How many entries wait to be stored."""
        return len(self._queue)

    async def initialize(self) -> None:
        """Create `nexus_audit` and its index if missing, and start the writer (when the
        table is on; otherwise nothing)."""
        if not self.table or self.db is None or self._closed:
            return

        def setup(conn: sa.Connection) -> None:
            _META.create_all(conn)

        await self.db.run_sync(setup)
        if self._task is None:
            # a context of its own: the writer never joins the transaction, nor carries
            # the principal, of the call that happened to start it
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="nexus-audit-writer", context=contextvars.Context()
            )

    @property
    def active(self) -> bool:
        """Whether an entry recorded now goes anywhere (the table, or the log at INFO):
        the chain builds none otherwise."""
        return (self.table and not self._closed) or _log.isEnabledFor(logging.INFO)

    def record(self, entry: AuditEntry) -> None:
        """Log `entry` and queue it for the table. Never blocks, never raises for the
        database: a call is never slowed down or failed by its audit row."""
        entry = bounded(entry)
        if _log.isEnabledFor(logging.INFO):
            _log.info("%s", _log_line(entry))
        if not self.table or self._closed:
            return
        if len(self._queue) >= self._max_queue:
            self._dropped += 1
            return
        self._queue.append((_new_id(entry.time), entry))
        self._queued += 1
        self._wakeup.set()

    async def flush(self) -> None:
        """Return once every entry queued so far is stored. Waits as long as the
        database is down (bound it with a timeout where that matters)."""
        target = self._queued
        if self._stored >= target or self._task is None:
            return
        fut = asyncio.get_running_loop().create_future()
        self._flushers.append((target, fut))
        self._urgent.set()
        self._wakeup.set()
        try:
            await fut
        finally:
            self._flushers = [f for f in self._flushers if f[1] is not fut]

    async def close(self, timeout: float = 5.0) -> None:
        """Store what is queued (waiting at most `timeout` seconds: entries still
        queued then are given up, with an error saying how many), then stop the writer.
        Entries recorded afterwards are only logged."""
        self._closed = True
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        lost = len(self._queue)
        if lost:
            self._queue.clear()
            self._stored += lost
            _server_log.error(
                "%d audit entr%s not stored in the audit table: the database did not "
                "take them before the server stopped (their log lines were written)",
                lost,
                "y was" if lost == 1 else "ies were",
            )
        self._report_dropped()
        for _, fut in self._flushers:
            if not fut.done():
                fut.set_result(None)

    async def list(
        self,
        page_size: int,
        page_token: str = "",
        *,
        principal: str = "",
        failed_only: bool = False,
    ) -> tuple[builtins.list[AuditRecord], str]:
        """Stored entries, newest first, `page_size` at most, and the token of the next
        page ("" on the last). Entries still queued are not listed (`flush` first).

        Raises:
            RuntimeError: the table is off.
            dataflow.ValidationError: on `page_token`, for a token this database did not
                issue for the same filters.
        """
        if not self.table or self.db is None:
            raise RuntimeError("the audit table is not enabled")
        db = self.db
        q = AUDIT.select()
        if principal:
            q = q.where(AUDIT.c.principal == principal)
        if failed_only:
            q = q.where(AUDIT.c.code != "OK")
        context = f"audit:{int(failed_only)}:{principal}"
        if page_token:
            last = await db.verify_token(page_token, context)
            q = q.where(AUDIT.c.id < last.decode("utf-8", "replace"))
        q = q.order_by(AUDIT.c.id.desc()).limit(page_size + 1)
        async with db.connection() as conn:
            rows = (await conn.execute(q)).mappings().all()
        records = [_from_row(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size and records:
            token = await db.sign_token(records[-1].id.encode(), context)
        return records, token

    # -- the writer ------------------------------------------------------------------

    @functools.cached_property
    def _insert(self) -> str:
        assert self.db is not None
        names = [c.name for c in AUDIT.columns]
        values = ", ".join(self.db.placeholder(i + 1) for i in range(len(names)))
        # a batch whose commit was not confirmed is sent again: rows it did store are
        # skipped, not refused
        return (
            f"INSERT INTO {AUDIT.name} ({', '.join(names)}) VALUES ({values}) "
            "ON CONFLICT (id) DO NOTHING"
        )

    def _rows(self, batch: Sequence[tuple[str, AuditEntry]]) -> builtins.list[tuple[Any, ...]]:
        assert self.db is not None
        driver = self.db.driver_value
        return [
            (
                id_,
                driver(e.time, checked=True),
                e.principal,
                e.tenant,
                e.channel,
                e.method,
                e.resource,
                e.request_id,
                e.code,
                e.reason,
            )
            for id_, e in batch
        ]

    async def _run(self) -> None:
        assert self.db is not None
        while True:
            await self._wakeup.wait()
            if self._linger > 0 and not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self._linger)
            self._wakeup.clear()
            while self._queue:
                n = min(len(self._queue), MAX_BATCH)
                batch = [self._queue[i] for i in range(n)]
                try:
                    await self.db.executemany(self._insert, self._rows(batch))
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if not self._failing:
                        self._failing = True
                        _server_log.exception(
                            "storing %d audit entr%s failed; retrying every %gs",
                            n,
                            "y" if n == 1 else "ies",
                            self._retry_delay,
                        )
                    self._urgent.clear()
                    await asyncio.sleep(self._retry_delay)
                    continue
                if self._failing:
                    self._failing = False
                    _server_log.info("audit entries are stored again")
                for _ in range(n):
                    self._queue.popleft()
                self._stored += n
                self._report_dropped()
                self._settle()
            self._urgent.clear()

    def _settle(self) -> None:
        for target, fut in self._flushers:
            if target <= self._stored and not fut.done():
                fut.set_result(None)

    def _report_dropped(self) -> None:
        """One error for the entries dropped since the last report (a burst ends when
        the queue has room again)."""
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            _server_log.error(
                "%d audit entr%s not stored in the audit table: the queue was full "
                "(%d entries) while the database was not keeping up (their log lines "
                "were written)",
                dropped,
                "y was" if dropped == 1 else "ies were",
                self._max_queue,
            )


def _from_row(row: sa.RowMapping) -> AuditRecord:
    return AuditRecord(
        id=row["id"],
        entry=AuditEntry(
            time=_utc(row["time"]),
            principal=row["principal"],
            tenant=row["tenant"],
            channel=row["channel"],
            method=row["method"],
            resource=row["resource"],
            request_id=row["request_id"],
            code=row["code"],
            reason=row["reason"],
        ),
    )
