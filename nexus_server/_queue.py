"""Asynchronous executions: a durable queue in the app's database, leases and caps.

An asynchronous execution (StartExecution, or ExecuteWorkflow with `mode: "async"`) is
a row of `nexus_executions` in state QUEUED, committed before the call returns. Every
server process (replica) on the database claims queued rows while it has room, in one
transaction: `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL (two replicas never
claim the same row, and neither waits for the other), `BEGIN IMMEDIATE` on SQLite (one
writer at a time, across processes). No broker: the database is the queue.

Wake-up: a replica that queues an execution wakes its own claimer and tells the others
on the replicas' bus (`_bus.py`, the one the workflow registry and remote watches use:
no connection of the queue's own): on PostgreSQL, `NOTIFY nexus_queue` in the queuing
transaction, so it leaves when the row is committed; through Redis or SQLite's bus
table, a message once the transaction committed. Each claimer also polls every
`QueueOptions.poll_interval` seconds (the safety net for a lost message or a bus that
was reconnecting).

Leases: each row a replica runs (claimed, or a synchronous execution's RUNNING row)
names that replica (`runner`) and holds `lease_until`, renewed every
`QueueOptions.heartbeat` seconds by one UPDATE per replica. Every replica sweeps, as
often, the unfinished rows whose lease expired: a synchronous execution is marked
INTERRUPTED (as a restart always did); a queued one is queued again when its workflow
is registered `retryable=True` (with its request_id, at most `max_attempts` runs),
else marked FAILED with reason EXECUTION_LOST. So a dead replica's executions are
settled within `lease + heartbeat` seconds. At startup, a replica also settles at once
the rows of server processes of its own host that no longer exist (one server
restarted after a crash) and rows without a lease (written by an earlier version).
A settled row names no runner, and a record's upsert applies only on its runner's row
(`Store`), so a process taken for dead that finishes after all changes nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as _dt
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from dataflow import AlreadyExistsError, cache_scope, current_tenant, tenant_scope
from workflow import Workflow

from ._bus import Bus
from ._errors import ApiError
from ._executions import Executions, _storable_inputs, error_dict, new_execution_id
from ._registry import WorkflowRegistry
from ._store import ACTIVE_SQL, EXECUTIONS, ExecutionRecord, body_hash, check_request_id

__all__ = ["ExecutionQueue", "QueueOptions", "QueuedWorkflow", "check_mode"]

_log = logging.getLogger("nexus_server")

#: The PostgreSQL notification channel a queued execution is announced on.
CHANNEL = "nexus_queue"
#: Candidate rows one sweep looks at (the rest wait for the next sweep).
SWEEP_BATCH = 500

_E = EXECUTIONS

#: The runner ids of the queues open in this process (several apps may serve in one).
_OPEN_HERE: set[str] = set()


@dataclass(frozen=True)
class QueueOptions:
    """How a server process runs asynchronous executions (`Nexus(queue=...)`).

    Args:
        max_running: queued executions this process runs at once (its capacity); the
            rest wait in the queue for a process with room.
        lease: seconds a running execution's lease lasts; a process that has not
            renewed it by then is taken for dead and its executions are settled.
        heartbeat: seconds between lease renewals (and sweeps for expired leases);
            less than `lease`, so that a live process never loses one.
        poll_interval: seconds between looks at the queue without a notification.
        max_attempts: runs of a retryable execution at most (the first included).
    """

    max_running: int = 8
    lease: float = 10.0
    heartbeat: float = 3.0
    poll_interval: float = 2.0
    max_attempts: int = 3

    def check(self) -> None:
        """Raises ValueError naming the first option that is not valid."""
        if not isinstance(self.max_running, int) or self.max_running < 1:
            raise ValueError(f"QueueOptions(max_running={self.max_running!r}): expects >= 1")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"QueueOptions(max_attempts={self.max_attempts!r}): expects >= 1")
        for name in ("lease", "heartbeat", "poll_interval"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"QueueOptions({name}={value!r}): expects seconds > 0")
        if self.heartbeat >= self.lease:
            raise ValueError(
                f"QueueOptions(heartbeat={self.heartbeat!r}): must be less than "
                f"lease={self.lease!r}, or a live process would lose its leases"
            )


@dataclass(frozen=True)
class QueuedWorkflow:
    """A workflow's own queue options (`Nexus.register(..., retryable=, max_running=)`).

    Args:
        retryable: run it again when the process running it is lost (it must be safe
            to run twice; its request_id is kept), instead of failing EXECUTION_LOST.
        max_running: its queued executions one process runs at once (None: only the
            process's `QueueOptions.max_running` bounds them).
    """

    retryable: bool = False
    max_running: int | None = None


def check_mode(mode: str) -> bool:
    """Whether ExecuteWorkflow's `mode` asks for an asynchronous execution."""
    if mode in ("", "sync"):
        return False
    if mode == "async":
        return True
    raise ApiError(
        "REQUEST_INVALID",
        'mode must be "sync" or "async"',
        [("mode", 'must be "sync" (the default) or "async"')],
    )


def new_runner_id() -> str:
    """This process's id in the rows it runs: host, process id and a random part (a
    process id is reused; the random part tells two lives apart)."""
    host = socket.gethostname()[:40]
    return f"{host}:{os.getpid()}:{os.urandom(4).hex()}"


def _gone_here(runner: str) -> bool:
    """Whether `runner` was a process of this host that no longer exists."""
    host, _, rest = runner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname()[:40] or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return runner not in _OPEN_HERE  # else an earlier process had this id
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists, another user's
    return False


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _stored_error(reason: str, message: str) -> dict[str, Any]:
    return error_dict(ApiError(reason, message))


class ExecutionQueue:
    """Queues asynchronous executions, claims and runs them, and keeps the leases of
    this process's executions (see the module's docstring).

    Args:
        executions: runs what is claimed (and writes the records).
        registry: the workflows this process can run (it claims only those).
        options: capacity, lease and polling.
        workflows: per-workflow options by name.
        bus: the replicas' bus, when other processes share the database: it carries
            the wake-ups (subscribe happens here, before the bus starts).
    """

    def __init__(
        self,
        executions: Executions,
        registry: WorkflowRegistry,
        options: QueueOptions,
        workflows: Mapping[str, QueuedWorkflow],
        bus: Bus | None = None,
    ) -> None:
        self.executions = executions
        self.db = executions.store.db
        self.registry = registry
        self.options = options
        self.workflows = workflows
        self.runner = new_runner_id()
        executions.runner = self.runner
        executions.lease = options.lease
        #: claimed executions running here, by id (their tasks)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._by_workflow: collections.Counter[str] = collections.Counter()
        self._wake = asyncio.Event()
        self._claimer: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self.bus = bus
        if bus is not None:
            bus.subscribe(CHANNEL, lambda _payload: self._wake.set())
            bus.on_reconnect(self._wake.set)  # anything queued while it was not listening
        #: the server is stopping: a retryable execution its stop cancels is queued again
        self._stopping = False
        #: what this process did since it started (`snapshot`, GET /health's `queue`)
        self.claimed_total = 0
        self.settled_total: collections.Counter[str] = collections.Counter()
        #: QUEUED executions in the database (every replica's), as counted at the last
        #: heartbeat; None until first counted
        self.waiting: int | None = None

    def snapshot(self) -> dict[str, Any]:
        """The queue as this process sees it, for GET /health's `queue` component and
        the `nexus_queue_*` metrics: executions waiting in the database (counted at each
        heartbeat), those it runs now and its cap, what it claimed, and what it settled for
        lost processes, by the state it gave them (QUEUED again, FAILED with
        EXECUTION_LOST, INTERRUPTED)."""
        return {
            "status": "healthy",
            "waiting": self.waiting,
            "running": len(self.tasks),
            "max_running": self.options.max_running,
            "claimed_total": self.claimed_total,
            "settled_total": dict(self.settled_total),
        }

    # -- queuing -----------------------------------------------------------------------

    async def enqueue(
        self,
        name: str,
        wf: Workflow,
        raw_inputs: Mapping[str, Any],
        *,
        caller: str,
        request_id: str = "",
    ) -> ExecutionRecord:
        """Validate the inputs and queue an execution, committed when this returns; or
        return the one `request_id` started already.

        Raises:
            InvalidInputsError: bad inputs (nothing is queued).
            ApiError: REQUEST_ID_CONFLICT when the request_id was used with other inputs.
        """
        check_request_id(request_id)
        inputs = wf.validate_inputs(raw_inputs)
        stored = _storable_inputs(inputs)
        hash_ = body_hash(name, raw_inputs) if request_id else None
        if request_id:
            found = await self.executions._find(caller, request_id, hash_)
            if found is not None:
                return found[1]
        now = _now()
        rec = ExecutionRecord(
            id=new_execution_id(),
            workflow=name,
            state="QUEUED",
            caller=caller,
            request_id=request_id or None,
            request_hash=hash_,
            inputs=stored,
            outputs=None,
            error=None,
            create_time=now,
            start_time=None,
            end_time=None,
            attempts=0,
            retryable=self.workflows.get(name, QueuedWorkflow()).retryable,
            tenant=current_tenant(),  # the caller's (the gateway's scope of the call)
        )
        try:
            async with self.db.transaction():
                await self.executions.store.insert_execution(rec)
                async with self.db.connection() as conn:
                    await self._notify(conn)
        except AlreadyExistsError:
            # another call recorded this request_id first: its execution answers
            found = await self.executions._find(caller, request_id, hash_) if request_id else None
            if found is None:
                raise
            return found[1]
        await self._announce()
        return rec

    async def _notify(self, conn: Any) -> None:
        """Announce queued work on a bus that lives in the database (PostgreSQL's), on
        `conn`: the queuing transaction's, so that it is delivered when the rows are
        committed. Other buses are told by `_announce`, after the commit."""
        if self.bus is not None and self.bus.transactional:
            await self.bus.publish_in(conn, CHANNEL, "")

    async def _announce(self) -> None:
        """Once queued work is committed: wake this process's claimer, and the other
        replicas' through a bus outside the database's transactions (Redis, SQLite's
        table). Best effort: their polls are the safety net."""
        self._wake.set()
        if self.bus is not None and not self.bus.transactional:
            try:
                await self.bus.publish(CHANNEL, "")
            except Exception as exc:
                _log.debug("announcing queued executions failed: %s", exc)

    async def cancel_queued(self, execution_id: str) -> ExecutionRecord | None:
        """Cancel an execution still waiting in the queue; None when it is not (any
        more) queued."""
        error = _stored_error("EXECUTION_CANCELLED", "the execution was cancelled")
        async with self.db.connection() as conn:
            done = await conn.execute(
                _E.update()
                .where(sa.text(ACTIVE_SQL), _E.c.id == execution_id, _E.c.state == "QUEUED")
                .values(state="CANCELLED", error=error, end_time=_now())
            )
        if not done.rowcount:
            return None
        return await self.executions.store.get_execution(execution_id)

    async def left_queue(self, rec: ExecutionRecord) -> ExecutionRecord:
        """`rec` once it is no longer QUEUED (claimed, here or by another process, or
        cancelled): what a watcher of a queued execution follows. Waits as long as the
        caller does (its deadline, or until it goes away)."""
        delay = 0.02
        while rec.state == "QUEUED" and rec.id not in self.executions.running:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            rec = await self.executions.get(rec.id)  # what this process holds, else the row
        return rec

    # -- life cycle --------------------------------------------------------------------

    async def open(self) -> None:
        """Settle what dead processes left, then start claiming and keeping leases."""
        _OPEN_HERE.add(self.runner)
        settled = await self.sweep(startup=True)
        if settled:
            _log.warning("settled %d execution(s) of stopped server processes", settled)
        self.waiting = await self.count_waiting()
        self._claimer = asyncio.create_task(self._claim_loop(), name="queue-claimer")
        self._keeper = asyncio.create_task(self._keep_loop(), name="queue-leases")

    async def stop_claiming(self) -> None:
        """Claim nothing more (the server is stopping); leases are still kept, and a
        retryable execution the stop cancels goes back to the queue."""
        self._stopping = True
        if self._claimer is not None:
            self._claimer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._claimer
            self._claimer = None

    async def close(self) -> None:
        """Stop everything (after the executions were finished or cancelled)."""
        await self.stop_claiming()
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        _OPEN_HERE.discard(self.runner)

    # -- claiming ----------------------------------------------------------------------

    def _room(self, name: str) -> int:
        cap = self.workflows.get(name, QueuedWorkflow()).max_running
        return self.options.max_running if cap is None else cap - self._by_workflow[name]

    async def _claim_loop(self) -> None:
        while True:
            self._wake.clear()
            free = self.options.max_running - len(self.tasks)
            if free > 0:
                try:
                    for rec in await self.claim(free):
                        self._start(rec)
                except Exception as exc:  # the database is down: the next poll tries again
                    _log.warning("claiming queued executions failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.poll_interval):
                    await self._wake.wait()

    async def claim(self, free: int) -> list[ExecutionRecord]:
        """Claim at most `free` queued executions of workflows registered here (within
        their own caps), oldest first, in one transaction; return them RUNNING."""
        names = [n for n in self.registry.names() if self._room(n) > 0]
        if not names:
            return []
        queued = (sa.text(ACTIVE_SQL), _E.c.state == "QUEUED", _E.c.workflow.in_(names))
        # a look without any lock first: an empty queue costs no write lock (SQLite's is
        # the whole database's) and no transaction
        async with self.db.connection() as conn:
            if (await conn.execute(sa.select(_E.c.id).where(*queued).limit(1))).first() is None:
                return []
        query = (
            _E.select()
            .where(*queued)
            .order_by(_E.c.id)
            .limit(free)
            .with_for_update(skip_locked=True)
        )
        now = _now()
        until = now + _dt.timedelta(seconds=self.options.lease)
        claimed: list[ExecutionRecord] = []
        # on SQLite, `transaction()` takes the database's write lock before the first
        # read (BEGIN IMMEDIATE), so two processes never read the same queued rows;
        # PostgreSQL locks the rows read instead (FOR UPDATE SKIP LOCKED)
        async with self.db.transaction(), self.db.connection() as conn:
            rows = (await conn.execute(query)).mappings().all()
            room = {n: self._room(n) for n in names}
            for row in rows:
                if room[row["workflow"]] > 0:
                    room[row["workflow"]] -= 1
                    claimed.append(ExecutionRecord.from_row(row))
            if not claimed:
                return []
            done = await conn.execute(
                _E.update()
                .where(_E.c.id.in_([r.id for r in claimed]), _E.c.state == "QUEUED")
                .values(
                    state="RUNNING",
                    runner=self.runner,
                    lease_until=until,
                    start_time=now,
                    attempts=sa.func.coalesce(_E.c.attempts, 0) + 1,
                )
            )
            if done.rowcount != len(claimed):  # never, with the locks above: claim none
                raise RuntimeError("queued executions changed while being claimed")
        self.claimed_total += len(claimed)
        for rec in claimed:
            rec.state, rec.runner, rec.lease_until = "RUNNING", self.runner, until
            rec.start_time = now
            rec.attempts = (rec.attempts or 0) + 1
        return claimed

    def _start(self, rec: ExecutionRecord) -> None:
        self._by_workflow[rec.workflow] += 1
        self.tasks[rec.id] = asyncio.create_task(self._run(rec), name=f"queued-{rec.id}")

    async def _run(self, rec: ExecutionRecord) -> None:
        try:
            try:
                wf = self.registry.get(rec.workflow).workflow
            except ApiError as exc:  # deleted since it was claimed
                rec.state, rec.error, rec.end_time = "FAILED", error_dict(exc), _now()
                self.executions.writer.put(rec)
                await self.executions.writer.committed(rec.id)
                return
            # as the caller that queued it: its tenant's rows, its cache entries
            with tenant_scope(rec.tenant), cache_scope(rec.caller):
                ended = await self.executions.run_claimed(rec, wf)
            if self._stopping and ended.state == "CANCELLED" and rec.retryable:
                await self._give_back(rec)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # its record could not be written: its lease lapses
            _log.warning("queued execution %s could not be recorded: %s", rec.id, exc)
        finally:
            self.tasks.pop(rec.id, None)
            self._by_workflow[rec.workflow] -= 1
            if not self._by_workflow[rec.workflow]:
                del self._by_workflow[rec.workflow]
            self._wake.set()

    async def _give_back(self, rec: ExecutionRecord) -> None:
        """Queue again a retryable execution this process's stop cancelled (its record,
        CANCELLED, is committed): another process, or this one's next start, runs it."""
        async with self.db.transaction(), self.db.connection() as conn:
            done = await conn.execute(
                _E.update()
                .where(_E.c.id == rec.id, _E.c.state == "CANCELLED", _E.c.runner == self.runner)
                .values(
                    state="QUEUED",
                    runner=None,
                    lease_until=None,
                    start_time=None,
                    end_time=None,
                    error=None,
                    outputs=None,
                )
            )
            if done.rowcount:
                await self._notify(conn)
                _log.info("execution %s queued again: the server stopped", rec.id)
        if done.rowcount:
            await self._announce()

    # -- leases ------------------------------------------------------------------------

    async def _keep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat)
            try:
                await self.renew()
                settled = await self.sweep()
                if settled:
                    _log.warning("settled %d execution(s) of lost server processes", settled)
                self.waiting = await self.count_waiting()
            except Exception as exc:  # the database is down: the next beat tries again
                _log.warning("renewing execution leases failed: %s", exc)

    async def count_waiting(self) -> int:
        """How many executions wait in the queue (QUEUED), every replica's."""
        query = (
            sa.select(sa.func.count())
            .select_from(_E)
            .where(sa.text(ACTIVE_SQL), _E.c.state == "QUEUED")
        )
        async with self.db.connection() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def renew(self) -> int:
        """Extend the lease of every row this process runs; returns how many."""
        if not self.executions.running:
            return 0
        until = _now() + _dt.timedelta(seconds=self.options.lease)
        async with self.db.connection() as conn:
            done = await conn.execute(
                _E.update()
                .where(
                    sa.text(ACTIVE_SQL),
                    _E.c.state.in_(("PENDING", "RUNNING")),
                    _E.c.runner == self.runner,
                )
                .values(lease_until=until)
            )
        return int(done.rowcount or 0)

    def _lost(self, row: sa.RowMapping, now: _dt.datetime, startup: bool) -> bool:
        runner, until = row["runner"], row["lease_until"]
        if runner == self.runner:
            return False
        if until is None:
            return startup  # written by an earlier version, which had no leases
        if until.tzinfo is None:
            until = until.replace(tzinfo=_dt.UTC)
        return bool(until < now or (startup and runner and _gone_here(runner)))

    async def sweep(self, *, startup: bool = False) -> int:
        """Settle the unfinished executions whose lease expired (see the module's
        docstring). Returns how many were settled."""
        now = _now()
        running = sa.and_(sa.text(ACTIVE_SQL), _E.c.state.in_(("PENDING", "RUNNING")))
        expired: sa.ColumnElement[bool] = _E.c.lease_until < now
        if startup:  # also rows without a lease, and those of this host's processes
            # ("%" or "_" in a host name match more: `_lost` checks each row exactly)
            here = socket.gethostname()[:40]
            expired = sa.or_(expired, _E.c.lease_until.is_(None), _E.c.runner.like(f"{here}:%"))
        candidates = (
            sa.select(_E.c.id, _E.c.runner, _E.c.lease_until)
            .where(running, expired)
            .limit(SWEEP_BATCH)
        )
        async with self.db.connection() as conn:
            rows = (await conn.execute(candidates)).mappings().all()
        lost = [r["id"] for r in rows if self._lost(r, now, startup)]
        if not lost:
            return 0
        settled = requeued = 0
        async with self.db.transaction(), self.db.connection() as conn:  # locks, as in _claim
            locked = (
                (
                    await conn.execute(
                        _E.select()
                        .where(running, _E.c.id.in_(lost))
                        .with_for_update(skip_locked=True)
                    )
                )
                .mappings()
                .all()
            )
            for row in locked:
                if not self._lost(row, now, startup):
                    continue  # renewed meanwhile
                values = self._settlement(row)
                self.settled_total[values["state"]] += 1
                requeued += values["state"] == "QUEUED"
                await conn.execute(
                    _E.update().where(_E.c.id == row["id"], running).values(**values)
                )
                settled += 1
            if requeued:
                await self._notify(conn)
        if requeued:
            await self._announce()
        return settled

    def _settlement(self, row: sa.RowMapping) -> dict[str, Any]:
        """The new values of a row whose runner is lost."""
        attempts = row["attempts"]
        if attempts is None:  # a synchronous execution: as a restart always marked them
            error = _stored_error(
                "EXECUTION_INTERRUPTED", "the server stopped while this execution was running"
            )
            return {"state": "INTERRUPTED", "error": error, "end_time": _now(), "runner": None}
        if row["retryable"] and attempts < self.options.max_attempts:
            _log.warning("execution %s lost its server process: queued again", row["id"])
            return {"state": "QUEUED", "runner": None, "lease_until": None, "start_time": None}
        error = _stored_error(
            "EXECUTION_LOST",
            "the server process running this execution stopped before it finished"
            + (f" ({attempts} attempts)" if row["retryable"] else ""),
        )
        return {"state": "FAILED", "error": error, "end_time": _now(), "runner": None}
