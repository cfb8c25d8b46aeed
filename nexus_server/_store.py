"""Durable records of executions and of idempotent requests, in the DataFlow database.

Execution rows survive restarts (GetExecution works afterwards); rows whose server
process is gone are marked INTERRUPTED (or, queued ones, re-queued or FAILED
EXECUTION_LOST) by the lease sweep of `_queue.py`, never left RUNNING. Idempotency rows are
keyed by (caller, request_id), never by the body, and remember a hash of the body so that
a reused key with another body is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from dataflow import DataFlow, ValidationError

from ._jsonable import to_jsonable

__all__ = [
    "MAX_CALLER",
    "MAX_REQUEST_ID",
    "ExecutionRecord",
    "Store",
    "body_hash",
    "check_request_id",
]

_log = logging.getLogger("nexus_server")
_META = sa.MetaData()

EXECUTIONS = sa.Table(
    "nexus_executions",
    _META,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("workflow", sa.String(128), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("caller", sa.String(256), nullable=False),
    sa.Column("request_id", sa.String(256), nullable=True),
    sa.Column("request_hash", sa.String(64), nullable=True),
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Column("outputs", sa.JSON, nullable=True),
    sa.Column("error", sa.JSON, nullable=True),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
    sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
    # leases (`_queue.py`): the server process running the execution, renewing
    # `lease_until` while it runs; `attempts` counts the claims of a queued
    # (asynchronous) execution and is NULL for the others
    sa.Column("runner", sa.String(64), nullable=True),
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=True),
    sa.Column("retryable", sa.Boolean, nullable=True),
    # the tenant a queued execution runs as (its caller's, when it was queued)
    sa.Column("tenant", sa.String(256), nullable=True),
)
#: Columns added after the table's first version, added to an older table at startup.
_ADDED_COLUMNS = (
    ("runner", "VARCHAR(64)"),
    ("lease_until", "TIMESTAMP WITH TIME ZONE"),
    ("attempts", "INTEGER"),
    ("retryable", "BOOLEAN"),
    ("tenant", "VARCHAR(256)"),
)
# Two indexes besides the primary key, because every execution writes a row and each
# index is one more B-tree that every row goes into (docs/benchmarks.md, "The
# executions table"):
# - Ids begin with their creation time in microseconds (`new_execution_id`), so the
#   primary key is also the listing order (newest first: id descending), and this one
#   lists a workflow's executions in that order.
_BY_WORKFLOW = sa.Index("ix_nexus_executions_workflow_id", EXECUTIONS.c.workflow, EXECUTIONS.c.id)
# - An idempotency key is unique per caller, across server processes; executions run
#   without a request_id (most) stay out of this index. Created by its SQL (the same on
#   SQLite and PostgreSQL): declared on the table, its dialect options would import
#   SQLAlchemy's PostgreSQL dialect at every start (65 ms).
_REQUEST_KEY = "uq_nexus_executions_caller_request"
_REQUEST_KEY_DDL = (
    f"CREATE UNIQUE INDEX IF NOT EXISTS {_REQUEST_KEY} ON nexus_executions "
    "(caller, request_id) WHERE request_id IS NOT NULL"
)
# - The executions not finished yet (the queue, the leases to renew or check): few rows
#   whatever the table's size, and a finished row never enters it. Queries on it repeat
#   its predicate word for word (`ACTIVE_SQL`), so that SQLite uses it too.
ACTIVE_STATES = ("QUEUED", "PENDING", "RUNNING")
ACTIVE_SQL = "state IN ('QUEUED', 'PENDING', 'RUNNING')"
_ACTIVE_DDL = (
    "CREATE INDEX IF NOT EXISTS ix_nexus_executions_active ON nexus_executions "
    f"(state, id) WHERE {ACTIVE_SQL}"
)
#: Indexes of earlier versions, dropped at startup: (create_time, id) for the listing
#: order, (workflow) alone. Earlier versions also made (caller, request_id) a unique
#: constraint of every row; it is dropped where the database can drop it (PostgreSQL);
#: SQLite cannot without copying the table, and it stays there (correct, only slower).
_OLD_INDEXES = ("ix_nexus_executions_order", "ix_nexus_executions_workflow")
_OLD_CONSTRAINT = "uq_nexus_executions_request"

REQUESTS = sa.Table(
    "nexus_requests",
    _META,
    sa.Column("caller", sa.String(256), primary_key=True),
    sa.Column("request_id", sa.String(256), primary_key=True),
    sa.Column("method", sa.String(256), nullable=False),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)

RUNNING_STATES = ("PENDING", "RUNNING")
#: The columns a later version of an execution row changes.
_CHANGING = ("state", "outputs", "error", "end_time")

#: The longest `request_id` the contract accepts.
MAX_REQUEST_ID = 128

#: The longest caller identity stored with executions and idempotency records.
MAX_CALLER = 256


def check_request_id(request_id: str) -> None:
    """Refuse a `request_id` longer than the contract allows (the caller's mistake, not
    a database error later)."""
    if len(request_id) > MAX_REQUEST_ID:
        from ._errors import ApiError

        raise ApiError(
            "REQUEST_INVALID",
            f"request_id is {len(request_id)} characters long; at most {MAX_REQUEST_ID}",
            [("request_id", f"longer than {MAX_REQUEST_ID} characters")],
        )
    if "\x00" in request_id:
        from ._errors import ApiError

        raise ApiError(
            "REQUEST_INVALID",
            "request_id may not contain the NUL character",
            [("request_id", "contains the NUL character")],
        )


def body_hash(*parts: Any) -> str:
    """A stable hash of a request body (JSON-canonical)."""
    text = json.dumps(to_jsonable(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _utc(value: _dt.datetime | None) -> _dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=_dt.UTC) if value.tzinfo is None else value


@dataclass(slots=True)
class ExecutionRecord:
    """One row of `nexus_executions`."""

    id: str
    workflow: str
    state: str
    caller: str
    request_id: str | None
    request_hash: str | None
    inputs: dict[str, Any]
    outputs: dict[str, Any] | None
    error: dict[str, Any] | None
    create_time: _dt.datetime
    start_time: _dt.datetime | None
    end_time: _dt.datetime | None
    #: the server process running it (`_queue.Leases`), renewing `lease_until`
    runner: str | None = None
    lease_until: _dt.datetime | None = None
    #: claims of a queued execution so far; None for one not queued
    attempts: int | None = None
    #: a queued execution whose workflow may run again when its runner is lost
    retryable: bool | None = None
    #: the tenant a queued execution runs as
    tenant: str | None = None
    #: `outputs` with their JSON text, when made together (`_jsonable.stored_json`):
    #: the row takes the text while `outputs` is still that document (no second encoding)
    outputs_json: tuple[dict[str, Any], str] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    @classmethod
    def from_row(cls, row: sa.RowMapping) -> ExecutionRecord:
        return cls(
            id=row["id"],
            workflow=row["workflow"],
            state=row["state"],
            caller=row["caller"],
            request_id=row["request_id"],
            request_hash=row["request_hash"],
            inputs=row["inputs"] or {},
            outputs=row["outputs"],
            error=row["error"],
            create_time=_utc(row["create_time"]) or _dt.datetime.now(_dt.UTC),
            start_time=_utc(row["start_time"]),
            end_time=_utc(row["end_time"]),
            runner=row.get("runner"),
            lease_until=_utc(row.get("lease_until")),
            attempts=row.get("attempts"),
            retryable=row.get("retryable"),
            tenant=row.get("tenant"),
        )


class Store:
    """Execution and idempotency rows, through the DataFlow database's connections."""

    def __init__(self, db: DataFlow) -> None:
        self.db = db

    async def initialize(self) -> None:
        """Create the tables if missing, or bring an older version's up to date.

        Executions a stop interrupted are no longer marked here: with several server
        processes on one database, a RUNNING row may be another live process's. The
        lease sweep of `_queue.Leases` marks those whose runner is gone.
        """

        def setup(conn: sa.Connection) -> None:
            existed = conn.dialect.has_table(conn, EXECUTIONS.name)
            _META.create_all(conn)
            if existed:
                _upgrade_indexes(conn)
            conn.execute(sa.text(_REQUEST_KEY_DDL))
            conn.execute(sa.text(_ACTIVE_DDL))

        await self.db.run_sync(setup)

    async def write_executions(self, records: Sequence[ExecutionRecord]) -> list[str]:
        """Insert or update these executions (by id) in one transaction.

        Returns the ids of records dropped because another server process recorded
        their (caller, request_id) first (that one answers the request); every other
        failure raises, so the caller can try again.
        """
        db = self.db
        # read before the first await: RecordWriter's contract (records keep changing).
        # Their documents were checked when they were made (inputs, outputs, errors)
        rows = [_row(r, self._checked_value) for r in records]
        try:
            await db.executemany(self._upsert, rows)
            return []
        except Exception as exc:
            if not _is_unique_violation(exc):
                # a record that cannot be stored must not hold up every record behind
                # it: check each one, store those that cannot be FAILED, and try again
                checked = [_storable_row(r, db.driver_value) for r in records]
                if checked == rows:
                    raise
                rows = checked
                try:
                    await db.executemany(self._upsert, rows)
                    return []
                except Exception as again:
                    if not _is_unique_violation(again):
                        raise
        dropped: list[str] = []
        for rec, row in zip(records, rows, strict=True):  # find the row at fault
            try:
                await db.executemany(self._upsert, [row])
            except Exception as exc:
                if not _is_unique_violation(exc):
                    raise
                _log.warning(
                    "execution %s not recorded: its request_id was recorded by another "
                    "server process first",
                    rec.id,
                )
                dropped.append(rec.id)
        return dropped

    async def insert_execution(self, rec: ExecutionRecord) -> None:
        """Insert one execution in the current `transaction()` (an execution that commits
        with its workflow's writes). Raises `AlreadyExistsError` when its request_id was
        recorded first by another server process."""
        values = {c.name: getattr(rec, c.name) for c in EXECUTIONS.columns}
        async with self.db.connection() as conn:
            # the values as parameters of one statement: compiled once, then cached
            await conn.execute(_INSERT_EXECUTION, values)

    @functools.cached_property
    def _checked_value(self) -> Callable[[Any], Any]:
        return functools.partial(self.db.driver_value, checked=True)

    @functools.cached_property
    def _upsert(self) -> str:
        """Driver SQL: insert an execution row, or update the columns that change."""
        names = [c.name for c in EXECUTIONS.columns]
        values = ", ".join(self.db.placeholder(i + 1) for i in range(len(names)))
        changing = ", ".join(f"{c} = excluded.{c}" for c in _CHANGING)
        # only the row's runner changes it: a process taken for dead (its lease expired,
        # the row settled by another: `_queue.py`) that finishes after all changes nothing
        return (
            f"INSERT INTO {EXECUTIONS.name} ({', '.join(names)}) VALUES ({values}) "
            f"ON CONFLICT (id) DO UPDATE SET {changing} "
            f"WHERE {EXECUTIONS.name}.runner IS NOT DISTINCT FROM excluded.runner"
        )

    async def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        async with self.db.connection() as conn:
            row = (
                (await conn.execute(EXECUTIONS.select().where(EXECUTIONS.c.id == execution_id)))
                .mappings()
                .first()
            )
        return ExecutionRecord.from_row(row) if row else None

    async def find_request(self, caller: str, request_id: str) -> ExecutionRecord | None:
        async with self.db.connection() as conn:
            row = (
                (
                    await conn.execute(
                        EXECUTIONS.select().where(
                            EXECUTIONS.c.caller == caller, EXECUTIONS.c.request_id == request_id
                        )
                    )
                )
                .mappings()
                .first()
            )
        return ExecutionRecord.from_row(row) if row else None

    async def list_executions(
        self,
        workflow: str | None,
        state: str | None,
        page_size: int,
        page_token: str,
        caller: str | None = None,
    ) -> tuple[list[ExecutionRecord], str]:
        """Newest first (ids begin with their creation time), keyset-paginated on id;
        with `caller`, only the executions that principal started."""
        q = EXECUTIONS.select()
        if workflow:
            q = q.where(EXECUTIONS.c.workflow == workflow)
        if state:
            q = q.where(EXECUTIONS.c.state == state)
        if caller is not None:
            q = q.where(EXECUTIONS.c.caller == caller)
        context = f"executions:{workflow or ''}:{state or ''}:{caller or ''}"
        if page_token:
            last_id = await self.db.verify_token(page_token, context)
            q = q.where(EXECUTIONS.c.id < last_id.decode("utf-8", "replace"))
        q = q.order_by(EXECUTIONS.c.id.desc()).limit(page_size + 1)
        async with self.db.connection() as conn:
            rows = (await conn.execute(q)).mappings().all()
        records = [ExecutionRecord.from_row(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size and records:
            # signed with the database's secret and bound to this listing's filters
            token = await self.db.sign_token(records[-1].id.encode(), context)
        return records, token

    async def find_response(self, caller: str, request_id: str) -> tuple[str, str, bytes] | None:
        """(method, body hash, serialized response) stored for an idempotent write."""
        async with self.db.connection() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        REQUESTS.c.method, REQUESTS.c.request_hash, REQUESTS.c.response
                    ).where(REQUESTS.c.caller == caller, REQUESTS.c.request_id == request_id)
                )
            ).first()
        return (row[0], row[1], bytes(row[2])) if row else None

    async def save_response(
        self, caller: str, request_id: str, method: str, hash_: str, response: bytes
    ) -> None:
        """Store the response of an idempotent write; call it inside the write's
        transaction so both commit or neither does."""
        async with self.db.connection() as conn:
            await conn.execute(
                REQUESTS.insert().values(
                    caller=caller,
                    request_id=request_id,
                    method=method,
                    request_hash=hash_,
                    response=response,
                    create_time=_dt.datetime.now(_dt.UTC),
                )
            )


#: The INSERT of one execution (its values bound as parameters).
_INSERT_EXECUTION = EXECUTIONS.insert()


def _storable_row(rec: ExecutionRecord, driver: Callable[[Any], Any]) -> tuple[Any, ...]:
    """`_row`, or, for a record the database could not store (the executions refuse such
    inputs and outputs first, so this is a last resort), the row of a failure saying so:
    a record that can never be written must not hold up every record behind it."""
    try:
        return _row(rec, driver)
    except ValidationError as exc:
        _log.error("execution %s cannot be stored as it is (%s); storing it FAILED", rec.id, exc)
        error = {"code": 13, "message": "the execution's record could not be stored"}
        failed = dataclasses.replace(rec, state="FAILED", inputs={}, outputs=None, error=error)
        return _row(failed, driver)


def _row(rec: ExecutionRecord, driver: Callable[[Any], Any]) -> tuple[Any, ...]:
    """An execution's column values for the driver, in EXECUTIONS' column order (its
    inputs, outputs and error are JSON documents already)."""
    created = driver(rec.create_time)
    started = rec.start_time
    outputs: Any = rec.outputs
    encoded = rec.outputs_json
    if outputs is not None:
        outputs = encoded[1] if encoded is not None and encoded[0] is outputs else driver(outputs)
    return (
        rec.id,
        rec.workflow,
        rec.state,
        rec.caller,
        rec.request_id,
        rec.request_hash,
        driver(rec.inputs),
        outputs,
        None if rec.error is None else driver(rec.error),
        created,
        # a unary execution starts when it is created: one conversion for both
        created if started is rec.create_time else None if started is None else driver(started),
        None if rec.end_time is None else driver(rec.end_time),
        rec.runner,
        # a finished row's lease means nothing (and most rows are written once, finished)
        None if rec.lease_until is None or rec.end_time is not None else driver(rec.lease_until),
        rec.attempts,
        rec.retryable,
        rec.tenant,
    )


def _is_unique_violation(exc: BaseException) -> bool:
    from dataflow import AlreadyExistsError

    if isinstance(exc, AlreadyExistsError):
        return True
    text = str(exc).lower()
    return "unique" in text or "duplicate key" in text


def _upgrade_indexes(conn: sa.Connection) -> None:
    """Give a table made by an earlier version today's indexes (see `_OLD_INDEXES`)."""
    inspector = sa.inspect(conn)
    columns = {c["name"] for c in inspector.get_columns(EXECUTIONS.name)}
    for name, sql_type in _ADDED_COLUMNS:
        if name not in columns:
            conn.execute(sa.text(f"ALTER TABLE {EXECUTIONS.name} ADD COLUMN {name} {sql_type}"))
    have = {ix["name"] for ix in inspector.get_indexes(EXECUTIONS.name)}
    for name in _OLD_INDEXES:
        if name in have:
            conn.execute(sa.text(f"DROP INDEX {name}"))
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text(f"ALTER TABLE {EXECUTIONS.name} DROP CONSTRAINT IF EXISTS {_OLD_CONSTRAINT}")
        )
    if _BY_WORKFLOW.name not in have:
        _BY_WORKFLOW.create(conn)
