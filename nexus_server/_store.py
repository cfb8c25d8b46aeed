"""Durable records of executions and of idempotent requests, in the DataFlow database.

Execution rows survive restarts (GetExecution works afterwards); rows a restart
interrupted are marked INTERRUPTED at startup, never left RUNNING. Idempotency rows are
keyed by (caller, request_id), never by the body, and remember a hash of the body so that
a reused key with another body is refused.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from dataflow import DataFlow

from ._jsonable import to_jsonable

__all__ = ["ExecutionRecord", "Store", "body_hash"]

_META = sa.MetaData()

EXECUTIONS = sa.Table(
    "nexus_executions",
    _META,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("workflow", sa.String(128), nullable=False, index=True),
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
    sa.UniqueConstraint("caller", "request_id", name="uq_nexus_executions_request"),
    sa.Index("ix_nexus_executions_order", "create_time", "id"),
)

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


def body_hash(*parts: Any) -> str:
    """A stable hash of a request body (JSON-canonical)."""
    text = json.dumps(to_jsonable(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _utc(value: _dt.datetime | None) -> _dt.datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=_dt.UTC) if value.tzinfo is None else value


@dataclass
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
        )


class Store:
    """Execution and idempotency rows, through the DataFlow database's connections."""

    def __init__(self, db: DataFlow) -> None:
        self.db = db

    async def initialize(self) -> int:
        """Create the tables if missing; mark executions a restart interrupted. Returns how
        many were marked."""
        async with self.db.connection() as conn:
            await conn.run_sync(_META.create_all)
            result = await conn.execute(
                EXECUTIONS.update()
                .where(EXECUTIONS.c.state.in_(RUNNING_STATES))
                .values(
                    state="INTERRUPTED",
                    end_time=_dt.datetime.now(_dt.UTC),
                    error={
                        "code": 10,
                        "message": "the server stopped while this execution was running",
                        "reason": "EXECUTION_INTERRUPTED",
                    },
                )
            )
            return int(result.rowcount or 0)

    async def insert_execution(self, rec: ExecutionRecord) -> bool:
        """Insert a new execution; False when (caller, request_id) is already taken."""
        values = {
            "id": rec.id,
            "workflow": rec.workflow,
            "state": rec.state,
            "caller": rec.caller,
            "request_id": rec.request_id,
            "request_hash": rec.request_hash,
            "inputs": to_jsonable(rec.inputs),
            "create_time": rec.create_time,
            "start_time": rec.start_time,
        }
        try:
            async with self.db.connection() as conn:
                await conn.execute(EXECUTIONS.insert().values(**values))
        except Exception as exc:  # the unique (caller, request_id) was taken meanwhile
            if rec.request_id and _is_unique_violation(exc):
                return False
            raise
        return True

    async def finish_execution(
        self,
        execution_id: str,
        state: str,
        outputs: dict[str, Any] | None,
        error: dict[str, Any] | None,
        end_time: _dt.datetime,
    ) -> None:
        async with self.db.connection() as conn:
            await conn.execute(
                EXECUTIONS.update()
                .where(EXECUTIONS.c.id == execution_id)
                .values(state=state, outputs=outputs, error=error, end_time=end_time)
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
        self, workflow: str | None, state: str | None, page_size: int, page_token: str
    ) -> tuple[list[ExecutionRecord], str]:
        """Newest first, keyset-paginated on (create_time, id)."""
        q = EXECUTIONS.select()
        if workflow:
            q = q.where(EXECUTIONS.c.workflow == workflow)
        if state:
            q = q.where(EXECUTIONS.c.state == state)
        if page_token:
            t, last_id = _decode_token(page_token)
            q = q.where(
                sa.or_(
                    EXECUTIONS.c.create_time < t,
                    sa.and_(EXECUTIONS.c.create_time == t, EXECUTIONS.c.id < last_id),
                )
            )
        q = q.order_by(EXECUTIONS.c.create_time.desc(), EXECUTIONS.c.id.desc()).limit(page_size + 1)
        async with self.db.connection() as conn:
            rows = (await conn.execute(q)).mappings().all()
        records = [ExecutionRecord.from_row(r) for r in rows[:page_size]]
        token = ""
        if len(rows) > page_size and records:
            last = records[-1]
            token = _encode_token(last.create_time, last.id)
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


def _is_unique_violation(exc: BaseException) -> bool:
    from dataflow import AlreadyExistsError

    if isinstance(exc, AlreadyExistsError):
        return True
    text = str(exc).lower()
    return "unique" in text or "duplicate key" in text


def _encode_token(t: _dt.datetime, last_id: str) -> str:
    raw = json.dumps([t.isoformat(), last_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[_dt.datetime, str]:
    from ._errors import ApiError

    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        t, last_id = json.loads(raw)
        return _dt.datetime.fromisoformat(t), str(last_id)
    except Exception:
        raise ApiError(
            "PAGE_TOKEN_INVALID",
            "page_token is not one this server returned",
            [("page_token", "not a token returned by ListExecutions")],
        ) from None
