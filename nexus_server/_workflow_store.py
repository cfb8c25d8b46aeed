"""Workflows registered over the network, stored in the app's database.

Every replica serving one database serves the same set of them, and they survive
restarts. `RegisterWorkflow` and `DeleteWorkflow` write `nexus_workflows` (name, the
workflow's definition as `Workflow.to_definition()` makes it, owner, version,
update_time) and bump the one-row change counter `nexus_workflow_changes` in the same
transaction: the counter's row lock orders every change across replicas, and its value
is the changed row's `version` (so versions grow with every change, across deletions
too). After the commit a message on the bus (`_bus`) tells the other replicas, which
re-read the table (within about a second: at once on PostgreSQL, after a poll of
`_bus.SQLITE_POLL` seconds on SQLite). The safety net: every `REREAD` seconds, and
each time the bus (re)connects, a replica reads the counter and re-reads the table
when it changed.

Workflows registered in code (`app.register`) are never stored: every replica has them
from its code, and a stored workflow never replaces one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import logging
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa

from dataflow import DataFlow
from workflow import Workflow, WorkflowBuilder

from ._bus import Bus
from ._errors import ApiError, brief
from ._registry import Registered, WorkflowRegistry, no_room

__all__ = ["CHANNEL", "REREAD", "WorkflowStore"]

_log = logging.getLogger("nexus_server")
_META = sa.MetaData()

WORKFLOWS = sa.Table(
    "nexus_workflows",
    _META,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("definition", sa.JSON, nullable=False),
    sa.Column("owner", sa.String(256), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)
CHANGES = sa.Table(
    "nexus_workflow_changes",
    _META,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
)
_COUNTER_ROW = (
    "INSERT INTO nexus_workflow_changes (id, version) VALUES (1, 0) ON CONFLICT (id) DO NOTHING"
)

#: The bus channel that says "the stored workflows changed".
CHANNEL = "nexus_workflows"
#: Seconds between two reads of the change counter (the safety net under the bus).
REREAD = 10.0


def _utc(value: _dt.datetime) -> _dt.datetime:
    return value.replace(tzinfo=_dt.UTC) if value.tzinfo is None else value


def _build(definition: dict[str, Any]) -> Workflow:
    return WorkflowBuilder.from_definition(definition).build()


class WorkflowStore:
    """The stored workflows of one database, mirrored into a `WorkflowRegistry`.

    Args:
        db: the app's database.
        registry: the app's registry (its code-registered workflows are left alone).
        bus: how replicas tell each other of a change (None: this process alone, e.g.
            an in-memory SQLite database).
        reread: seconds between two reads of the change counter.
        allow_code_nodes: serve stored workflows with code-bearing nodes (a replica
            that refuses them at registration does not serve those another one took).
    """

    def __init__(
        self,
        db: DataFlow,
        registry: WorkflowRegistry,
        bus: Bus | None,
        *,
        reread: float = REREAD,
        allow_code_nodes: bool = False,
    ) -> None:
        self.db = db
        self.allow_code_nodes = allow_code_nodes
        self.registry = registry
        self.bus = bus
        self.reread = reread
        #: name -> the version of its last change seen here (a deletion's too)
        self._seen: dict[str, int] = {}
        #: names this store put in the registry
        self._stored: set[str] = set()
        #: the change counter as of the last re-read
        self.version = 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if bus is not None:
            bus.subscribe(CHANNEL, lambda _payload: self._wake.set())
            bus.on_reconnect(self._wake.set)

    async def initialize(self) -> None:
        """Create the tables if missing, then load every stored workflow."""

        def setup(conn: sa.Connection) -> _Snapshot:
            _META.create_all(conn)
            conn.execute(sa.text(_COUNTER_ROW))
            return _read(conn, {})

        try:
            snapshot = await self.db.run_sync(setup)  # one transaction: a quick start
        except Exception:
            # another replica starting at the same moment created them first
            snapshot = await self.db.run_sync(setup)
        async with self._lock:
            await self._load(*snapshot)

    def start(self) -> None:
        """Keep the registry in step with the database (until `close`)."""
        self._task = asyncio.create_task(self._keep_in_step(), name="nexus-workflow-store")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def put(
        self,
        name: str,
        wf: Workflow,
        owner: str,
        *,
        replace: bool,
        limit: int,
        check_owner: Callable[[str], None],
    ) -> Registered:
        """Store `wf` as `name` (a new one, or with `replace` a replacement of a stored
        one whose owner `check_owner` accepts), then register it here.

        Raises:
            ApiError: WORKFLOW_ALREADY_EXISTS, CONSTRAINT_VIOLATION (no room), or what
                `check_owner` raises.
        """
        definition = wf.to_definition()
        now = _dt.datetime.now(_dt.UTC)

        def write(conn: sa.Connection) -> tuple[int, ApiError | None]:
            # a refusal is returned, not raised: DataFlow would take it for a database
            # error (the counter's bump commits either way, harmlessly)
            version = _bump(conn)
            row = conn.execute(sa.select(WORKFLOWS.c.owner).where(WORKFLOWS.c.name == name)).first()
            values = {"definition": definition, "owner": owner, "version": version}
            if row is not None:
                refused = _refusal(check_owner, row[0])
                if refused is None and not replace:
                    refused = ApiError(
                        "WORKFLOW_ALREADY_EXISTS",
                        f"workflow {brief(name)} already exists (set replace to overwrite it)",
                        [("name", "already registered")],
                    )
                if refused is None:
                    conn.execute(
                        WORKFLOWS.update()
                        .where(WORKFLOWS.c.name == name)
                        .values(update_time=now, **values)
                    )
                return version, refused
            count = conn.execute(sa.select(sa.func.count()).select_from(WORKFLOWS)).scalar_one()
            if count >= limit:
                return version, no_room(limit)
            conn.execute(WORKFLOWS.insert().values(name=name, update_time=now, **values))
            return version, None

        version, refused = await self.db.run_sync(write)
        if refused is not None:
            raise refused
        item = self._apply(name, wf, owner, version, now)
        await self._announce(name, version)
        return item

    async def delete(self, name: str, check_owner: Callable[[str], None]) -> None:
        """Delete the stored workflow `name` (whose owner `check_owner` accepts).

        Raises:
            ApiError: WORKFLOW_NOT_FOUND (with the closest name), or what `check_owner`
                raises.
        """

        def remove(conn: sa.Connection) -> tuple[int, bool, ApiError | None]:
            version = _bump(conn)
            row = conn.execute(sa.select(WORKFLOWS.c.owner).where(WORKFLOWS.c.name == name)).first()
            if row is None:
                return version, False, None
            refused = _refusal(check_owner, row[0])
            if refused is None:
                conn.execute(WORKFLOWS.delete().where(WORKFLOWS.c.name == name))
            return version, True, refused

        version, found, refused = await self.db.run_sync(remove)
        if refused is not None:
            raise refused
        self._forget(name, version)
        if not found:
            # deleted by another replica already (this one may not have heard yet)
            self.registry.get(name)  # WORKFLOW_NOT_FOUND, naming the closest name
            raise ApiError("WORKFLOW_NOT_FOUND", f"workflow {brief(name)} not found")
        await self._announce(name, version)

    async def refresh(self) -> None:
        """Make the registry hold what the database holds now."""
        async with self._lock:
            seen = dict(self._seen)
            # a plain connection in a worker thread on a SQLite file at start (as
            # DataFlow's migration): start-up does not load SQLAlchemy's asyncio extension
            counter, rows, definitions = await self.db.run_sync(lambda c: _read(c, seen))
            await self._load(counter, rows, definitions)

    async def _load(self, counter: int, rows: list[Any], definitions: dict[str, Any]) -> None:
        """Apply a snapshot of the table (`_read`) to the registry (hold `_lock`)."""
        changed = [r for r in rows if r[2] > self._seen.get(r[0], 0)]
        for name, owner, version, update_time in changed:
            definition = definitions.get(name)
            if definition is None:
                continue  # deleted between the two reads: the next re-read tells
            if name in self.registry and self.registry.get(name).builtin:
                _log.warning(
                    "stored workflow %r not served: the app's code registers a "
                    "workflow of that name",
                    name,
                )
                self._seen[name] = version
                continue
            try:
                wf = await asyncio.to_thread(_build, definition)
                if not wf.exposable and not self.allow_code_nodes:
                    raise ValueError("it has code-bearing nodes and allow_code_nodes is off")
            except Exception as exc:
                _log.error("stored workflow %r cannot be served: %s", name, exc)
                self._seen[name] = version
                if name in self._stored:  # an earlier version of it is no more
                    self._forget(name, version)
                continue
            if version > self._seen.get(name, 0):  # no newer change meanwhile
                self._apply(name, wf, owner, version, _utc(update_time))
        present = {r[0] for r in rows}
        for name in list(self._stored):
            # gone from the table, and not registered here after the table was read
            if name not in present and self._seen.get(name, 0) <= counter:
                self._forget(name, self._seen.get(name, 0))
        self.version = max(self.version, counter)

    def _apply(
        self, name: str, wf: Workflow, owner: str, version: int, when: _dt.datetime
    ) -> Registered:
        self._seen[name] = version
        self._stored.add(name)
        return self.registry.add(name, wf, builtin=False, owner=owner, update_time=when)

    def _forget(self, name: str, version: int) -> None:
        self._seen[name] = max(version, self._seen.get(name, 0))
        if name in self._stored:
            self._stored.discard(name)
            if name in self.registry and not self.registry.get(name).builtin:
                self.registry.remove(name)

    async def _announce(self, name: str, version: int) -> None:
        """Tell the other replicas (after the commit: a lost message is caught by their
        re-read)."""
        self.version = max(self.version, version)
        if self.bus is None:
            return
        try:
            await self.bus.publish(CHANNEL, json.dumps({"name": name, "version": version}))
        except Exception as exc:
            _log.warning("telling other replicas of workflow %r failed: %s", name, exc)

    async def _keep_in_step(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.reread):
                    await self._wake.wait()
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                if not woken:
                    woken = await self.db.run_sync(_counter) != self.version
                if woken:
                    await self.refresh()
            except Exception as exc:
                _log.warning("re-reading the stored workflows failed: %s", exc)


_Snapshot = tuple[int, list[Any], dict[str, Any]]


def _read(conn: sa.Connection, seen: dict[str, int]) -> _Snapshot:
    """(the change counter, every row but its definition, the definitions of the rows
    that changed since `seen`)."""
    counter = _counter(conn)
    rows = list(
        conn.execute(
            sa.select(
                WORKFLOWS.c.name, WORKFLOWS.c.owner, WORKFLOWS.c.version, WORKFLOWS.c.update_time
            )
        ).all()
    )
    changed = [r[0] for r in rows if r[2] > seen.get(r[0], 0)]
    definitions: dict[str, Any] = {}
    if changed:
        found = conn.execute(
            sa.select(WORKFLOWS.c.name, WORKFLOWS.c.definition).where(WORKFLOWS.c.name.in_(changed))
        )
        definitions = {n: _document(d) for n, d in found.all()}
    return counter, rows, definitions


def _bump(conn: sa.Connection) -> int:
    """Increment the change counter (its row lock orders concurrent changes)."""
    conn.execute(CHANGES.update().where(CHANGES.c.id == 1).values(version=CHANGES.c.version + 1))
    return _counter(conn)


def _counter(conn: sa.Connection) -> int:
    value = conn.execute(sa.select(CHANGES.c.version).where(CHANGES.c.id == 1)).scalar()
    return int(value or 0)


def _refusal(check: Callable[[str], None], owner: str) -> ApiError | None:
    """What `check(owner)` raises, or None."""
    try:
        check(owner)
    except ApiError as exc:
        return exc
    return None


def _document(value: Any) -> dict[str, Any]:
    """A JSON column's value (some drivers return the text)."""
    doc = json.loads(value) if isinstance(value, str | bytes) else value
    if not isinstance(doc, dict):
        raise TypeError("a stored definition is not a JSON object")
    return doc
