"""`DataFlow`: declares models, owns the engine, runs migrations and transactions."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import sys
import time
import weakref
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, overload

from sqlalchemy import Connection, MetaData, Table, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.schema import CreateTable

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from ._metrics import DataFlowMetrics

from workflow import Node, RegistryError, current_execution, register_node, unregister_node

from ._breaker import BreakerOptions, CircuitBreaker
from ._cache import (
    DEFAULT_CACHE_MAX_ENTRIES,
    DEFAULT_CACHE_TTL,
    MemoryCache,
    QueryCache,
    RedisCache,
    default_prefix,
)
from ._errors import (
    AlreadyExistsError,
    ConflictError,
    DatabaseError,
    DataFlowError,
    MigrationError,
    ModelError,
    SchemaMissingError,
    ValidationError,
)
from ._fastpath import Prepared, driver_value
from ._model import ModelInfo, parse_model
from ._nodes import make_nodes
from ._ops import ModelOps
from ._schema import (
    META,
    META_TABLE,
    REGISTRY_TABLE,
    apply_migration,
    build_table,
    plan_migration,
    registry_table,
)
from ._sqltypes import dialect_insert
from ._tokens import sign, verify
from ._values import INT_MAX, INT_MIN, clean_any

__all__ = ["DataFlow", "StatementHook"]

#: `DataFlow.set_statement_hook`: called with a statement's text (placeholders, never
#: values) as it is sent; the context manager it returns spans the statement.
StatementHook = Callable[[str], contextlib.AbstractContextManager[Any]]

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_URL = "sqlite:///nexus.db"

#: The most rows `executemany` writes on the caller's thread (SQLite; about 10 µs each).
EXECUTEMANY_HERE_ROWS = 1000
#: Rows written on the caller's thread (SQLite) between two checkpoints of the log.
CHECKPOINT_ROWS = 2000
#: SQLite virtual-machine steps a List or Count may take on the caller's thread (well
#: under a millisecond's work): a query that needs more is interrupted there and run
#: again in the driver's thread (`DataFlow._fast_fetchall_now`).
HERE_QUERY_STEPS = 50_000
#: Calls of a query shape sent straight to the driver's thread after one was interrupted.
HERE_SKIP = 32
_PROGRESS_EVERY = 500
#: Seconds between attempts to reopen PostgreSQL's single-statement connection.
PG_RECONNECT_DELAY = 5.0
#: The most rows one bulk request may carry (`DataFlow(max_bulk_rows=...)`).
MAX_BULK_ROWS = 10_000
#: The key of the page-token secret in `dataflow_meta`.
_SECRET_KEY = "token_secret"

_log = logging.getLogger("dataflow")

#: Every DataFlow constructed and not yet collected (`DataFlow.owner_of`).
_LIVE: weakref.WeakSet[DataFlow] = weakref.WeakSet()


class _NotHere:
    """What `DataFlow._here` returns when the work must go to the driver's thread."""


_NOT_HERE = _NotHere()


class _Entry:
    """A declared model and what DataFlow made of it. ModelOps (its prepared statements)
    is built on first use, keeping declaration cheap."""

    __slots__ = ("_ops", "db", "info", "nodes", "table")

    def __init__(self, db: DataFlow, info: ModelInfo, table: Table) -> None:
        self.db = db
        self.info = info
        self.table = table
        self.nodes: dict[str, type[Node]] = {}
        self._ops: ModelOps | None = None

    @property
    def ops(self) -> ModelOps:
        if self._ops is None:
            self._ops = ModelOps(self.db, self.info, self.table)
        return self._ops


class _Tx:
    """A transaction shared by several operations (a `transaction()` block or one atomic
    workflow execution). Operations of one execution may run concurrently: the lock keeps
    them from interleaving on the connection."""

    __slots__ = ("conn", "lock", "written")

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.lock = asyncio.Lock()
        # the tables written in it: their cached reads end when it commits
        self.written: set[str] = set()


class _SharedTx:
    """The async context manager an atomic workflow execution enters once
    (`ExecutionContext.resource`); exited with the execution's error, it rolls back."""

    def __init__(self, db: DataFlow) -> None:
        self.db = db
        self._stack = contextlib.AsyncExitStack()
        self._tx: _Tx | None = None

    async def __aenter__(self) -> _Tx:
        # the circuit breaker admitted the statement that opens it (`_session`)
        try:
            await self._stack.enter_async_context(self.db._gate())
            conn = await self._stack.enter_async_context(self.db.engine.begin())
            await self.db._take_writer(conn)
        except BaseException as exc:
            await self._stack.aclose()
            if isinstance(exc, Exception) and not isinstance(exc, DataFlowError):
                raise self.db._fail(exc, None) from exc
            raise
        self._tx = _Tx(conn)
        return self._tx

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._stack.__aexit__(et, e, tb)
        except DataFlowError:
            raise
        except Exception as exc:
            raise self.db._fail(exc, None) from exc
        br = self.db._breaker
        if e is None and br is not None and not br.quiet:
            br.success()  # committed
        if et is None and self._tx is not None:  # committed
            await self.db._cache_written(self._tx.written)


class _Guarded:
    """One database operation under DataFlow's circuit breaker and error mapping
    (`DataFlow._guarded`). On entry the breaker admits it (`CircuitOpenError` while
    open; nothing is done while the breaker is quiet). On exit: a success when nothing
    was raised; a driver's exception is raised as DataFlow's (`DataFlow._fail`, which
    tells the breaker what it says); DataFlow's own errors, cancellations and
    `passthrough` are raised as they are, the trial (if this was it) passing to the next
    call."""

    __slots__ = ("_db", "_model", "_trial", "passthrough")

    def __init__(self, db: DataFlow, model: ModelInfo | None, admit: bool) -> None:
        self._db, self._model = db, model
        br = db._breaker
        self._trial = admit and br is not None and not br.quiet and br.admit()
        #: an exception of the guarded block's caller, raised on as it is
        self.passthrough: BaseException | None = None

    def __enter__(self) -> _Guarded:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        db = self._db
        if e is None:
            br = db._breaker
            if br is not None and not br.quiet:
                br.success()
        elif (
            isinstance(e, Exception)
            and not isinstance(e, DataFlowError)
            and e is not self.passthrough
        ):
            raise db._fail(e, self._model, self._trial) from e
        elif self._trial and db._breaker is not None:
            db._breaker.release(True)


def _async_url(url: str) -> tuple[str, str]:
    """The SQLAlchemy async URL for `url`, and the dialect name."""
    try:
        u = make_url(url)
    except sa_exc.ArgumentError as exc:
        raise ValidationError("database_url", str(exc)) from None
    backend = u.get_backend_name()
    if backend == "sqlite":
        return u.set(drivername="sqlite+aiosqlite").render_as_string(False), "sqlite"
    if backend in ("postgresql", "postgres"):
        return u.set(drivername="postgresql+asyncpg").render_as_string(False), "postgresql"
    raise ValidationError(
        "database_url", f"unsupported database {backend!r} (use sqlite:/// or postgresql://)"
    )


#: The PostgreSQL advisory lock that schema work takes for its transaction (`_migrate`,
#: `run_sync`): server processes starting together on one empty database (replicas
#: of a Deployment) change the schema one after the other, each seeing what the one
#: before made, instead of failing on each other's CREATE TABLE.
SCHEMA_LOCK_KEY = 0x6E657875


def _lock_schema(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})


def _schema_locked(fn: Callable[[Connection], R]) -> Callable[[Connection], R]:
    def locked(conn: Connection) -> R:
        _lock_schema(conn)
        return fn(conn)

    return locked


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # LIKE is case-sensitive on PostgreSQL; make SQLite agree ($ilike is the insensitive one)
    cur.execute("PRAGMA case_sensitive_like = ON")
    cur.execute("PRAGMA busy_timeout = 30000")
    cur.execute("PRAGMA journal_mode = WAL")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.close()


def _sqlite_manual_transactions(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


_PG_KEY = re.compile(r"Key \(([^)]*)\)=")
_NO_TABLE = re.compile(r"no such table: (?:\w+\.)?(\w+)|relation \"(?:\w+\.)?(\w+)\" does not")
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: (.*)$")
_NOT_NULL = re.compile(r"NOT NULL constraint failed: \w+\.(\w+)|column \"(\w+)\"")


def _fetch_bounded(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> list[Any] | None:
    """The rows of a read statement, or None when it took more than `HERE_QUERY_STEPS`
    steps (interrupted: it read nothing and changed nothing)."""
    budget = HERE_QUERY_STEPS // _PROGRESS_EVERY

    def progress() -> int:
        nonlocal budget
        budget -= 1
        return 1 if budget < 0 else 0  # nonzero: interrupt

    conn.set_progress_handler(progress, _PROGRESS_EVERY)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        if budget < 0:
            return None
        raise
    finally:
        conn.set_progress_handler(None, 0)


def _check_rows(rows: Sequence[Sequence[Any]]) -> None:
    """`executemany` rows meet the value rule (`_values.clean_any`), as records do."""
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            kind = type(v)
            if v is None or kind is bool:
                continue  # the common cases, inline
            if kind is str:
                if "\x00" not in v:
                    continue
            elif kind is int and INT_MIN <= v <= INT_MAX:
                continue
            try:
                clean_any(v)
            except TypeError as exc:
                raise ValidationError(f"rows[{i}][{j}]", str(exc)) from None


#: SQLSTATE codes and classes, and SQLite messages, that mean "cannot reach the
#: database" rather than "the database refused this statement".
_UNREACHABLE_STATES = ("08", "57P01", "57P02", "57P03", "53300")
_UNREACHABLE_CLASSES = (
    "ConnectionDoesNotExistError",
    "InterfaceError",
    "ConnectionFailureError",
    "CannotConnectNowError",
    "TooManyConnectionsError",
)


def _unreachable(exc: BaseException, cause: Any, code: str) -> bool:
    """Whether a driver error means "cannot reach the database" (refused, reset or lost
    connections, timeouts, a server shutting down or out of connection slots) rather
    than "the database refused this statement": what the circuit breaker counts."""
    if code.startswith(_UNREACHABLE_STATES) or isinstance(cause, OSError | TimeoutError):
        return True
    return any(type(c).__name__ in _UNREACHABLE_CLASSES for c in (cause, exc))


def _describe_failure(exc: BaseException, cause: Any, code: str, text: str, model: Any) -> str:
    """What failed, in words: never the driver's class, SQL, a path or an address."""
    what = f"{model.name}: " if model else ""
    table = f"the table {model.table!r}" if model else "a table"
    if code == "3D000":
        return f"{what}the database does not exist (create it first)"
    if code == "42703" or "no such column" in text:
        return f"{what}a column of {table} is missing; the schema differs from the model"
    if _unreachable(exc, cause, code):
        return f"{what}the database is unreachable"
    if "unable to open database file" in text:
        return f"{what}the database file cannot be opened"
    if code.startswith("53") or "database or disk is full" in text:
        return f"{what}the database is out of resources (disk, memory or connections)"
    if code == "57014":
        return f"{what}the statement was cancelled (a timeout)"
    if code.startswith("22"):
        return f"{what}the database refused a value"
    if "readonly" in text or "read-only" in text or code == "25006":
        return f"{what}the database is read-only"
    return f"{what}the database failed (the server log has the details)"


def _map_error(exc: BaseException, model: ModelInfo | None) -> DataFlowError:
    """Our exception for a driver/SQLAlchemy one (the one place this happens).

    Messages say what failed in words; the driver's own text (which may hold SQL, a
    file path or an address) only goes to the ``dataflow`` logger.
    """
    if isinstance(exc, DataFlowError):
        return exc
    name = model.name if model else "database"
    orig: Any = getattr(exc, "orig", None) or exc
    cause: Any = getattr(orig, "__cause__", None) or orig
    code = getattr(cause, "sqlstate", None) or getattr(orig, "pgcode", None)
    text = str(orig)
    if code == "23505" or "UNIQUE constraint failed" in text or "PRIMARY KEY" in text:
        detail = getattr(cause, "detail", None) or ""
        m = _PG_KEY.search(detail) or _PG_KEY.search(text)
        if m:
            fields = tuple(s.strip().strip('"') for s in m.group(1).split(","))
        else:
            ms = _SQLITE_UNIQUE.search(text)
            cols = ms.group(1).split(",") if ms else []
            fields = tuple(c.strip().rsplit(".", 1)[-1] for c in cols)
        return AlreadyExistsError(name, fields)
    if code == "23502" or "NOT NULL constraint failed" in text:
        m = _NOT_NULL.search(text)
        field = (m.group(1) or m.group(2)) if m else ""
        return ValidationError(field, "may not be null")
    if code == "42P01" or "no such table" in text:
        missing = _NO_TABLE.search(text)
        found = (missing.group(1) or missing.group(2)) if missing else None
        table = model.table if model else (found or "?")
        missing_table = SchemaMissingError(table, model.name if model else None)
        _log.warning("%s (%s)", missing_table, type(cause).__name__)
        return missing_table
    if code in ("40001", "40P01") or "database is locked" in text:
        return ConflictError(f"{name}: the transaction conflicted with another one; retry it")
    if isinstance(exc, sa_exc.IntegrityError) or (code and str(code).startswith("23")):
        return ConflictError(f"{name}: the write violates a constraint")
    code = str(code or "")
    message = _describe_failure(exc, cause, code, text, model)
    _log.warning("%s (%s: %s)", message, type(cause).__name__, _first_line(text))
    error = DatabaseError(message)
    error.unreachable = code not in ("3D000", "42703") and _unreachable(exc, cause, code)
    return error


async def _keep_session(conn: Any) -> None:
    """Fast-path connections change no session state (single autocommit statements),
    so returning one to the pool needs no reset query (a round trip per operation)."""


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:200]


class DataFlow:
    """Models declared as annotated classes, stored in SQLite or PostgreSQL, with
    generated CRUD workflow nodes and a direct async API.

    ```python
    db = DataFlow("postgresql://postgres@127.0.0.1:5432/app")

    @db.model
    class Contact:
        id: str
        email: str = field(unique=True)
        score: int = 0

    await db.initialize()
    c = await db.ops(Contact).create(email="ada@example.com")
    ```

    Args:
        database_url: ``sqlite:///path.db``, ``sqlite:///:memory:`` or
            ``postgresql://user@host:port/db`` (the async drivers aiosqlite and asyncpg
            are chosen for you). Default: ``sqlite:///nexus.db`` in the working directory,
            or ``$DATABASE_URL`` when set.
        auto_migrate: create missing tables, columns and indexes at `initialize()`.
            Destructive differences are always refused. When False, any difference is an
            error (MigrationError lists what would be needed).
        skip_migration: trust the schema: no comparison at all (fastest start).
        enable_model_persistence: store every model's schema in the
            ``dataflow_model_registry`` table at `initialize()`, in one statement.
        connection_pool_size: PostgreSQL connections kept open. SQLite uses a single
            connection, and DataFlow serialises access to it.
        echo: log SQL statements (SQLAlchemy's ``echo``).
        max_bulk_rows: the most rows (or ids) one bulk operation accepts; more is a
            ValidationError on ``records`` before any row is looked at.
        enable_caching: cache reads by id, lists, counts and searches (see "Caching" in
            docs/dataflow.md): in memory, or in Redis with `cache_url`. Every write to a
            model through DataFlow ends its cached reads once it commits; reads inside
            a transaction or an atomic workflow go to the database.
        cache_url: ``redis://host:port/db``: the cache lives in Redis, shared by every
            DataFlow (replica) using it with the same `cache_prefix`. Implies
            `enable_caching` (``enable_caching=False`` with it is refused).
        cache_ttl: seconds an entry is kept at most (default 60).
        cache_max_entries: entries the in-memory cache keeps (least recently used
            out first).
        cache_prefix: the Redis key prefix (default: derived from the database URL, so
            DataFlows on one database share entries and on two databases never do).
        enable_metrics: keep Prometheus metrics of the connection pool and of every
            statement's duration (`DataFlow.metrics`, a prometheus_client collector;
            `Nexus(enable_monitoring=True)` exposes it).
        breaker: the circuit breaker around the database (`BreakerOptions`; True, the
            default: 5 failures in a row to reach the database open it, a trial call
            after 5 s; False: none). While it is open, operations fail at once with
            `CircuitOpenError` instead of each waiting for a connection attempt of its
            own. Only "cannot reach the database" counts (connection refused, reset or
            lost; timeouts), never a statement the database refused. `DataFlow.breaker`
            reads its state.

    Declaring models does no I/O. `initialize()` connects, migrates and persists, once.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        auto_migrate: bool = True,
        skip_migration: bool = False,
        enable_model_persistence: bool = False,
        connection_pool_size: int = 10,
        echo: bool = False,
        max_bulk_rows: int = MAX_BULK_ROWS,
        enable_metrics: bool | None = None,
        enable_caching: bool | None = None,
        cache_url: str | None = None,
        cache_ttl: float = DEFAULT_CACHE_TTL,
        cache_max_entries: int = DEFAULT_CACHE_MAX_ENTRIES,
        cache_prefix: str | None = None,
        breaker: BreakerOptions | bool = True,
    ) -> None:
        if breaker is True:
            breaker = BreakerOptions()
        elif breaker is not False and not isinstance(breaker, BreakerOptions):
            raise ValidationError(
                "breaker", f"expects BreakerOptions(...), True or False, got {breaker!r}"
            )
        if not isinstance(max_bulk_rows, int) or max_bulk_rows < 1:
            raise ValidationError("max_bulk_rows", "expects a positive integer")
        if (
            not isinstance(connection_pool_size, int)
            or isinstance(connection_pool_size, bool)
            or connection_pool_size < 1
        ):
            raise ValidationError("connection_pool_size", "expects a positive integer")
        if enable_metrics not in (None, True, False):
            raise ValidationError("enable_metrics", "expects True or False")
        url = database_url or os.environ.get("DATABASE_URL") or DEFAULT_URL
        self._url, self.dialect = _async_url(url)
        self._cache: QueryCache | None = _make_cache(
            self._url,
            enable_caching,
            cache_url,
            cache_ttl,
            cache_max_entries,
            cache_prefix,
        )
        _LIVE.add(self)
        self.max_bulk_rows = max_bulk_rows
        self._breaker = (
            CircuitBreaker.from_options("database", breaker) if breaker is not False else None
        )
        self._secret: bytes | None = None
        self.auto_migrate = auto_migrate
        self.skip_migration = skip_migration
        self.enable_model_persistence = enable_model_persistence
        self._metadata = MetaData()
        self._registry = registry_table(self._metadata) if enable_model_persistence else None
        self._models: dict[str, _Entry] = {}
        self._tables: dict[str, str] = {}
        self._ready = False
        self._closed = False
        self._init_lock = asyncio.Lock()
        self._sqlite_lock = asyncio.Lock()
        self._tx: contextvars.ContextVar[_Tx | None] = contextvars.ContextVar(
            f"dataflow_tx_{id(self)}", default=None
        )
        self._resource_key = f"dataflow:{id(self)}"
        self._pool_size = connection_pool_size
        self._echo = echo
        self._pg_pool: Any = None
        # PostgreSQL: a connection of its own for single statements, used by one call at a
        # time (the others take one from the pool); see _pg_call
        self._pg_single: Any = None
        self._pg_single_busy = False
        self._pg_dsn = ""
        self._pg_error: type[BaseException] = Exception  # asyncpg.PostgresError, once loaded
        self._pg_reconnect: asyncio.Task[None] | None = None
        self._pg_reconnect_at = 0.0
        self._raw_sqlite: Any = None
        # a connection of its own to a SQLite file, used on the caller's thread (_here)
        self._here_conn: sqlite3.Connection | None = None
        self._here_rows = 0  # rows written through it since the last checkpoint
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._engine: AsyncEngine | None = None
        self._statement_hook: StatementHook | None = None
        self._statement_events = False
        db_path = make_url(self._url).database or ":memory:"
        self._sqlite_path = db_path
        # a file database is migrated through a plain (sync) engine in a worker thread,
        # so starting up does not load SQLAlchemy's asyncio extension (and the ORM it
        # imports): that is a third of the start-up time
        self._sync_init = (
            self.dialect == "sqlite" and db_path != ":memory:" and "memory" not in self._url
        )
        #: the pool and statement metrics (`enable_metrics=True`), else None
        self.metrics: DataFlowMetrics | None = None
        if enable_metrics:
            from ._metrics import DataFlowMetrics

            self.metrics = DataFlowMetrics(self.dialect, self._pool_use)

    def _pool_use(self) -> tuple[int, int, int] | None:
        """(in use, idle, max) connections: asyncpg's pool on PostgreSQL (the kept
        single-statement connection not counted), the one connection on SQLite."""
        pool = self._pg_pool
        if pool is not None:
            size, idle = pool.get_size(), pool.get_idle_size()
            return size - idle, idle, pool.get_max_size()
        if self.dialect == "sqlite":
            busy = int(self._sqlite_lock.locked())
            return busy, 1 - busy, 1
        return None

    def __repr__(self) -> str:
        return f"<DataFlow {self.url} models={list(self._models)}>"

    @staticmethod
    def owner_of(node_type: type[Node]) -> DataFlow | None:
        """The open DataFlow whose model generated `node_type`, if any (how an app
        finds the DataFlow its workflows use without `integrate_dataflow`)."""
        model = getattr(node_type, "dataflow_model", None)
        for db in list(_LIVE):
            entry = db._models.get(model) if isinstance(model, str) else None
            if entry is not None and node_type in entry.nodes.values():
                return db
        return None

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The circuit breaker around the database (None with ``breaker=False``):
        ``db.breaker.state`` is ``"closed"``, ``"open"`` or ``"half_open"``; its counters
        and `CircuitBreaker.snapshot` feed health and metrics."""
        return self._breaker

    @property
    def url(self) -> str:
        """The database URL in use (password hidden)."""
        return make_url(self._url).render_as_string(hide_password=True)

    @property
    def engine(self) -> AsyncEngine:
        """The SQLAlchemy async engine (for queries DataFlow does not generate). Created
        on first use; creating it does no I/O."""
        if self._engine is None:
            self._engine = self._make_engine()
        return self._engine

    def set_statement_hook(self, hook: StatementHook | None) -> None:
        """Have `hook(sql)` called as each SQL statement is sent, and the context
        manager it returns entered until the statement's result is back (a tracer makes
        a span of it). `sql` is the statement's text with placeholders, never values.
        Every statement DataFlow sends is seen, through SQLAlchemy or the fast path.
        None removes the hook. DataFlow knows nothing else of who listens."""
        self._statement_hook = hook
        if hook is not None and not self._statement_events:
            engine = self.engine.sync_engine
            event.listen(engine, "before_cursor_execute", self._statement_sent)
            event.listen(engine, "after_cursor_execute", self._statement_done)
            event.listen(engine, "handle_error", self._statement_failed)
            self._statement_events = True

    def _statement_sent(
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        hook = self._statement_hook
        if hook is not None and context is not None:
            scope = hook(statement)
            scope.__enter__()
            context._nexus_statement = scope

    def _statement_done(
        self, conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
    ) -> None:
        scope = getattr(context, "_nexus_statement", None)
        if scope is not None:
            context._nexus_statement = None
            scope.__exit__(None, None, None)

    def _statement_failed(self, info: Any) -> None:
        context = info.execution_context
        scope = getattr(context, "_nexus_statement", None)
        if scope is not None:
            context._nexus_statement = None
            exc = info.original_exception
            scope.__exit__(type(exc), exc, None)

    def _make_engine(self) -> AsyncEngine:
        from sqlalchemy.ext.asyncio import create_async_engine

        if self.dialect == "sqlite":
            from sqlalchemy.pool import StaticPool

            path = self._sqlite_path

            async def connect() -> Any:
                import aiosqlite

                pending = aiosqlite.connect(path)
                # as SQLAlchemy does: a forgotten close() must not keep the process alive
                worker: Any = getattr(pending, "_thread", pending)
                worker.daemon = True
                conn = await pending
                # the fast path talks to this one connection directly (under the gate)
                self._raw_sqlite = conn
                return conn

            engine = create_async_engine(
                self._url, poolclass=StaticPool, echo=self._echo, async_creator=connect
            )
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)

            def dropped(dbapi_conn: Any, *_: Any) -> None:
                # SQLAlchemy invalidates a connection an operation was cancelled in (or
                # that failed as disconnected) and closes it: the fast path must not
                # keep using it; the next one is opened through the engine
                if getattr(dbapi_conn, "driver_connection", None) is self._raw_sqlite:
                    self._raw_sqlite = None

            event.listen(engine.sync_engine, "invalidate", dropped)
            event.listen(engine.sync_engine, "close", dropped)
            self._time_statements(engine)
            return engine
        engine = create_async_engine(
            self._url,
            pool_size=self._pool_size,
            max_overflow=max(2, self._pool_size // 2),
            echo=self._echo,
        )
        self._time_statements(engine)
        return engine

    def _time_statements(self, engine: AsyncEngine) -> None:
        """With metrics on, time every statement SQLAlchemy runs on `engine`."""
        metrics = self.metrics
        if metrics is None:
            return

        def before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            conn.info["dataflow_started"] = time.perf_counter()

        def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
            started = conn.info.pop("dataflow_started", None)
            if started is not None:
                metrics.observe(statement, time.perf_counter() - started)

        event.listen(engine.sync_engine, "before_cursor_execute", before)
        event.listen(engine.sync_engine, "after_cursor_execute", after)

    async def _sqlite_connection(self) -> Any:
        """The aiosqlite connection (opened through the engine on first use)."""
        if self._raw_sqlite is None:
            async with self.engine.connect():
                pass
        return self._raw_sqlite

    # -- models ----------------------------------------------------------------------

    @overload
    def model(self, cls: type[T], /, *, tenant_scoped: bool = False) -> type[T]: ...

    @overload
    def model(
        self, cls: None = None, /, *, tenant_scoped: bool = False
    ) -> Callable[[type[T]], type[T]]: ...

    def model(
        self, cls: type[T] | None = None, /, *, tenant_scoped: bool = False
    ) -> type[T] | Callable[[type[T]], type[T]]:
        """Class decorator: declare `cls` as a model (no I/O). Used bare (``@db.model``)
        or with options (``@db.model(tenant_scoped=True)``).

        Registers the model's twelve node types. Declaring a model of the same name with
        the same fields again is a no-op; with different fields it is a ModelError.

        Args:
            tenant_scoped: every record belongs to one tenant, held in a ``tenant_id``
                field (added when not declared; see `dataflow.field`'s ``tenant``), and
                every operation sees and writes only the current tenant's records
                (`dataflow.tenant_scope`).

        Raises:
            ModelError: the class has an unsupported annotation (naming the class, field
                and type), no ``id``, a bad option, or redefines a model differently.
        """
        if cls is None:
            locals_ = sys._getframe(1).f_locals

            def declare(c: type[T]) -> type[T]:
                return self._declare(c, locals_, tenant_scoped)

            return declare
        return self._declare(cls, sys._getframe(1).f_locals, tenant_scoped)

    def _declare(self, cls: type[T], localns: Mapping[str, Any], tenant_scoped: bool) -> type[T]:
        if self._closed:
            raise DataFlowError("this DataFlow is closed")
        info = parse_model(cls, localns, tenant_scoped=tenant_scoped)
        old = self._models.get(info.name)
        if old is not None:
            if old.info.signature() != info.signature():
                raise ModelError(
                    f"model {info.name} is already declared with different fields "
                    f"({_diff(old.info, info)}); a model's fields change by changing its "
                    f"one declaration"
                )
            return cls
        owner = self._tables.get(info.table)
        if info.table in (META_TABLE, REGISTRY_TABLE):
            raise ModelError(f"model {info.name}: table {info.table!r} is DataFlow's own")
        if owner is not None:
            raise ModelError(f"model {info.name}: table {info.table!r} is used by model {owner}")
        table = build_table(info, self._metadata, self.dialect)
        entry = _Entry(self, info, table)
        nodes = make_nodes(info, lambda: entry.ops)
        done: list[str] = []
        try:
            for type_name, node_cls in nodes.items():
                register_node(node_cls)
                done.append(type_name)
        except RegistryError as exc:
            for n in done:
                unregister_node(n)
            self._metadata.remove(table)
            raise ModelError(
                f"model {info.name}: {exc} (is another DataFlow declaring the same model "
                f"still open? close() it first)"
            ) from None
        entry.nodes = nodes
        self._models[info.name] = entry
        self._tables[info.table] = info.name
        self._ready = False
        return cls

    def _entry(self, model: type[Any] | str) -> _Entry:
        name = model if isinstance(model, str) else getattr(model, "__name__", repr(model))
        try:
            return self._models[name]
        except KeyError:
            known = ", ".join(self._models) or "none"
            raise ValidationError("model", f"unknown model {name!r} (models: {known})") from None

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        """Every declared model, in declaration order (the introspection entry point)."""
        return tuple(e.info for e in self._models.values())

    def model_info(self, model: type[Any] | str) -> ModelInfo:
        """The metadata of one model, by class or name."""
        return self._entry(model).info

    def table(self, model: type[Any] | str) -> Table:
        """The SQLAlchemy table of a model (for hand-written Core queries)."""
        return self._entry(model).table

    def node_types(self, model: type[Any] | str | None = None) -> dict[str, type[Node]]:
        """The generated node classes (of one model, or of all), by node type name."""
        entries = [self._entry(model)] if model is not None else list(self._models.values())
        return {k: v for e in entries for k, v in e.nodes.items()}

    def describe(self) -> list[dict[str, Any]]:
        """Every model as JSON-friendly data (what persistence stores)."""
        return [e.info.describe() for e in self._models.values()]

    def ops(self, model: type[Any] | str) -> ModelOps:
        """The direct (no workflow) async API of a model, by class or name."""
        return self._entry(model).ops

    # -- lifecycle -------------------------------------------------------------------

    async def initialize(self) -> None:
        """Connect, migrate and persist model schemas. Idempotent: later calls return at
        once, unless models were declared since (then only those are migrated).

        Raises:
            MigrationError: the schema differs destructively (nothing was changed), or
                differs at all with ``auto_migrate=False``.
            DatabaseError: the database is unreachable or failed.
        """
        if self._ready:
            return
        if self._closed:
            raise DataFlowError("this DataFlow is closed")
        async with self._init_lock:
            if self._ready:
                return
            tables = [e.table for e in self._models.values()]
            if self._registry is not None:
                tables.append(self._registry)
            try:
                needs_io = (not self.skip_migration and tables) or (
                    self._registry is not None and self._models
                )
                if not needs_io:
                    pass  # the page-token secret is read at its first use
                elif self._sync_init and self._engine is None:
                    async with self._gate():
                        await asyncio.to_thread(self._migrate_in_thread, tables)
                else:
                    async with self._gate(), self.engine.begin() as conn:
                        await conn.run_sync(self._migrate, tables)
                if self.dialect == "postgresql" and self._pg_pool is None:
                    import asyncpg

                    dsn = make_url(self._url).set(drivername="postgresql")
                    self._pg_dsn = dsn.render_as_string(hide_password=False)
                    self._pg_error = asyncpg.PostgresError
                    self._pg_pool = await asyncpg.create_pool(
                        self._pg_dsn, min_size=1, max_size=self._pool_size, reset=_keep_session
                    )
                    self._pg_single = await asyncpg.connect(self._pg_dsn)
            except DataFlowError:
                raise
            except Exception as exc:
                raise self._fail(exc, None) from exc
            self._ready = True

    def _migrate(self, conn: Connection, tables: list[Table]) -> None:
        """Compare, migrate and persist, on a synchronous connection in a transaction."""
        _lock_schema(conn)
        if not self.skip_migration and tables:
            plan = plan_migration(conn, tables)
            if plan.refused:
                raise MigrationError(plan.refused)
            if not plan.empty:
                if not self.auto_migrate:
                    raise MigrationError(
                        [f"needed (auto_migrate is off): {s}" for s in plan.describe()]
                    )
                apply_migration(conn, plan)
        if self._registry is not None and self._models:
            conn.execute(self._persist_statement())
        self._load_secret(conn)

    def _load_secret(self, conn: Connection) -> None:
        """Read the per-database page-token secret from `dataflow_meta`, creating the
        table and the secret the first time (a concurrent first start keeps one)."""
        conn.execute(CreateTable(META, if_not_exists=True))
        ins = dialect_insert(self.dialect)(META).values(
            key=_SECRET_KEY, value=secrets.token_hex(32)
        )
        conn.execute(ins.on_conflict_do_nothing(index_elements=["key"]))
        value = conn.execute(select(META.c.value).where(META.c.key == _SECRET_KEY)).scalar_one()
        self._secret = str(value).encode()

    async def _token_secret(self) -> bytes:
        """The secret, read once (at `initialize()` when it migrates, else here, on the
        current transaction's connection when there is one)."""
        if self._secret is None:
            async with self._session(None) as (conn, _):
                await conn.run_sync(self._load_secret)
        assert self._secret is not None
        return self._secret

    async def sign_token(self, payload: bytes, context: str = "") -> str:
        """An opaque token carrying `payload`, signed (HMAC-SHA256) with this database's
        secret and bound to `context`: `verify_token` accepts it only with the same
        context. DataFlow's page tokens use it (context: model, order and filter); the
        server signs its own listings' tokens with it."""
        return sign(await self._token_secret(), context, payload)

    async def verify_token(self, token: str, context: str = "", field: str = "page_token") -> bytes:
        """The payload of a token `sign_token` made with this database's secret and the
        same `context`. The MAC is checked before anything in the token is parsed.

        Raises:
            ValidationError: on `field`: forged, altered, truncated, or issued for
                another context.
        """
        return verify(await self._token_secret(), context, token, field)

    def _migrate_in_thread(self, tables: list[Table]) -> None:
        self._sync_transaction(lambda conn: self._migrate(conn, tables))

    def _sync_transaction(self, fn: Callable[[Connection], R]) -> R:
        """`fn` in one transaction of a short-lived plain pysqlite engine on the file."""
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        url = make_url(self._url).set(drivername="sqlite+pysqlite")
        engine = create_engine(url, poolclass=NullPool, echo=self._echo)
        event.listen(engine, "connect", _sqlite_pragmas)
        # one real transaction around all the DDL (pysqlite would commit each statement
        # on its own): the migration is atomic, and a single commit is quicker
        event.listen(engine, "connect", _sqlite_manual_transactions)
        event.listen(engine, "begin", _sqlite_begin)
        try:
            with engine.begin() as conn:
                return fn(conn)
        finally:
            engine.dispose()

    def _persist_statement(self) -> Any:
        """One INSERT ... ON CONFLICT DO UPDATE carrying every model's row."""
        reg = self._registry
        assert reg is not None
        now = dt.datetime.now(dt.UTC)
        rows = []
        for e in self._models.values():
            text = json.dumps(e.info.describe(), sort_keys=True)
            rows.append(
                {
                    "name": e.info.name,
                    "table_name": e.info.table,
                    "schema_json": text,
                    "checksum": hashlib.sha256(text.encode()).hexdigest(),
                    "updated_at": now,
                }
            )
        ins = dialect_insert(self.dialect)(reg)
        stmt = ins.values(rows)
        return stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={
                n: stmt.excluded[n] for n in ("table_name", "schema_json", "checksum", "updated_at")
            },
        )

    async def close(self) -> None:
        """Dispose of the engine and unregister this instance's node types. The instance
        cannot be used afterwards."""
        if self._closed:
            return
        self._closed = True
        self._ready = False
        if self._cache is not None:
            await self._cache.close()
        for e in self._models.values():
            for type_name, cls in e.nodes.items():
                try:
                    from workflow import get_node_class

                    if get_node_class(type_name) is cls:
                        unregister_node(type_name)
                except RegistryError:
                    pass
        if self._checkpoint_task is not None:
            await self._checkpoint_task
        if self._here_conn is not None:
            here, self._here_conn = self._here_conn, None
            here.close()
        if self._pg_reconnect is not None:
            self._pg_reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pg_reconnect
        if self._pg_single is not None:
            single, self._pg_single = self._pg_single, None
            await single.close()
        if self._pg_pool is not None:
            pool, self._pg_pool = self._pg_pool, None
            await pool.close()
        if self._engine is not None:
            await self._engine.dispose()

    async def __aenter__(self) -> DataFlow:
        await self.initialize()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connections and transactions ------------------------------------------------

    def _gate(self) -> contextlib.AbstractAsyncContextManager[Any]:
        # SQLite has one writer and DataFlow one connection to it: take turns
        return self._sqlite_lock if self.dialect == "sqlite" else contextlib.nullcontext()

    async def _take_writer(self, conn: AsyncConnection) -> None:
        """SQLite: make the transaction just begun on `conn` (a `transaction()` block, an
        atomic execution) the database's one writer now, for all its length.

        Why: the gate serialises such transactions within this process only. Another
        process on the same file (`nexus serve --workers N`) would otherwise interleave
        with it: the driver begins a transaction at its first write, so the block's
        reads before it see a state another process may change before that write (a
        read-modify-write would lose the other's update). `BEGIN IMMEDIATE` takes
        SQLite's write lock at once, waiting up to the busy timeout (in the driver's
        thread) while another process holds it; single statements need no such care:
        each is atomic, and begins with its write."""
        if self.dialect == "sqlite":
            await conn.exec_driver_sql("BEGIN IMMEDIATE")

    @contextlib.asynccontextmanager
    async def _session(
        self, model: ModelInfo | None, write: bool = False
    ) -> AsyncIterator[tuple[AsyncConnection, bool]]:
        """A connection for one operation: the shared transaction when there is one
        (`transaction()` or an atomic workflow), else a transaction of its own. Yields
        (connection, shared). Maps every driver error to ours. Outside a `transaction()`
        block, the circuit breaker admits the operation first (`CircuitOpenError` while
        it is open)."""
        tx = self._tx.get()
        with self._guarded(model, admit=tx is None):
            if not self._ready:
                if self._closed:
                    raise DataFlowError("this DataFlow is closed")
                await self.initialize()
            if tx is None:
                ctx = current_execution()
                if ctx is not None and ctx.atomic:
                    tx = await ctx.resource(self._resource_key, lambda: _SharedTx(self))
            if tx is not None:
                async with tx.lock:
                    yield tx.conn, True
            else:
                async with self._gate(), self.engine.begin() as conn:
                    yield conn, False

    def _fail(
        self, exc: BaseException, model: ModelInfo | None, trial: bool = False
    ) -> DataFlowError:
        """`_map_error(exc, model)`, telling the circuit breaker what the failure says:
        the database could not be reached (a failure), or it answered and refused the
        statement (a success: it is reachable), or neither (the trial, if this was it,
        passes to the next call). An error that is already ours was told when it was
        mapped."""
        br = self._breaker
        if isinstance(exc, DataFlowError):
            if trial and br is not None:
                br.release(True)
            return exc
        error = _map_error(exc, model)
        if type(error) is DatabaseError and error.unreachable:
            self._forget_pooled_connections()
        if br is not None:
            if type(error) is DatabaseError:
                if error.unreachable:
                    br.failure()
                else:
                    br.release(trial)
            else:  # a unique or constraint violation, a missing table...: it answered
                br.success()
        return error

    def _forget_pooled_connections(self) -> None:
        """The database was unreachable: the connections SQLAlchemy's pool keeps are
        most likely dead too (a restarted server closed them). Start a new pool, so that
        once the database is back the next transaction connects afresh instead of
        failing on a dead connection; a failure on a single-statement fast path (its own
        connection, reconnected) would otherwise leave the pool's for the first caller
        after the outage to find. The old pool's connections are dropped, not closed
        (there is no server to say goodbye to)."""
        engine = self._engine
        if engine is not None and self.dialect == "postgresql":
            engine.sync_engine.dispose(close=False)

    def _guarded(self, model: ModelInfo | None, admit: bool = True) -> _Guarded:
        """A context manager around one database operation: admitted by the circuit
        breaker (with `admit`), its driver errors raised as DataFlow's (see `_Guarded`)."""
        return _Guarded(self, model, admit)

    async def ping(self, timeout: float = 2.0) -> bool:
        """Whether the database answers `SELECT 1` within `timeout` seconds (health
        checks use it; it never raises). Outside the circuit breaker: an answer closes
        an open breaker at once."""
        # on the driver: a timeout then abandons a query, where inside SQLAlchemy it
        # would invalidate (close) the connection the other operations share
        try:
            if self._pg_pool is not None:
                await self._pg_pool.fetchval("SELECT 1", timeout=timeout)
            else:
                async with asyncio.timeout(timeout):
                    if self.dialect == "sqlite":
                        async with self._sqlite_lock:
                            conn = self._raw_sqlite or await self._sqlite_connection()
                            await conn.execute_fetchall("SELECT 1")
                    else:
                        async with self.engine.connect() as sa_conn:
                            await sa_conn.exec_driver_sql("SELECT 1")
        except Exception:
            return False
        # the database answered: an open circuit breaker closes at once (the server's
        # health checks ping, so it never waits out its delay behind a healthy database).
        # A failed ping is not counted: a busy event loop can make one time out
        if self._breaker is not None:
            self._breaker.reset()
        return True

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection for statements DataFlow does not generate (the server's execution
        records use it): it joins the current `transaction()` or atomic workflow when
        there is one, else runs in a transaction of its own, committed on exit. Driver
        errors are mapped to DataFlow's, as for every operation."""
        async with self._session(None) as (conn, _):
            yield conn

    async def run_sync(self, fn: Callable[[Connection], R]) -> R:
        """Run `fn` with a synchronous SQLAlchemy connection in a transaction of its own,
        committed when it returns: setup work of DataFlow's users, such as creating their
        own tables. On a SQLite file before the first operation it runs in a worker
        thread on a short-lived plain engine, as the migration does, so startup does not
        load SQLAlchemy's asyncio extension. Errors are mapped to DataFlow's."""
        if not self._ready:
            await self.initialize()
        with self._guarded(None):
            if self._sync_init and self._engine is None:
                async with self._gate():
                    result = await asyncio.to_thread(self._sync_transaction, fn)
            else:
                async with self._gate(), self.engine.begin() as conn:
                    result = await conn.run_sync(_schema_locked(fn))
        return result

    # -- driver statements (outside SQLAlchemy) ---------------------------------------

    def placeholder(self, i: int) -> str:
        """The driver's placeholder for the i-th (1-based) argument of `executemany`."""
        return "?" if self.dialect == "sqlite" else f"${i}"

    def driver_value(self, value: Any, field: str = "value", *, checked: bool = False) -> Any:
        """`value` as the driver takes it in `executemany`, stored exactly as DataFlow's
        column types store it: datetimes (UTC) in the dialect's format, dicts and lists as
        JSON text; anything else unchanged.

        Args:
            checked: the caller checked `value` with `storable_reason` already (and a
                datetime is in UTC): it is not walked a second time.

        Raises:
            ValidationError: on `field`, for a value DataFlow's value rule refuses (NUL
                in text, an int outside 64 bits, NaN, a datetime that leaves year 1..9999
                in UTC...), as for every record.
        """
        if not checked:
            try:
                value = clean_any(value)
            except TypeError as exc:
                raise ValidationError(field, str(exc)) from None
        return driver_value(value, self.dialect == "sqlite")

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement of driver SQL (placeholders from `placeholder`, values from
        `driver_value`) for every argument row, in one transaction of its own, straight on
        the driver: no SQLAlchemy compile or type processing per row. For many small
        writes of known shape, like the server's execution records. Driver errors are
        mapped to DataFlow's.

        On a SQLite file, up to `EXECUTEMANY_HERE_ROWS` rows are written on the calling
        thread (about 10 µs a row, blocking it), on a connection that never waits for a
        lock; when another writer holds the database or another task's `transaction()`
        block is open, and for larger batches, they are written in the driver's thread,
        which waits its turn. PostgreSQL batches go through an asyncpg pool connection.

        Raises:
            DataFlowError: inside `transaction()` or an atomic workflow (the statement
                would not be part of it), or the database's error.
        """
        if not self._ready:
            await self.initialize()
        if not self._fast_ok():
            raise DataFlowError(
                "executemany() runs in a transaction of its own; it cannot join the current "
                "transaction"
            )
        if not rows:
            return
        _check_rows(rows)
        if self._pg_pool is None:
            if len(rows) > EXECUTEMANY_HERE_ROWS or isinstance(
                self._here(None, True, lambda c: c.executemany(sql, rows), len(rows)), _NotHere
            ):
                await self._fast_executemany(None, sql, [rows])
            return
        started = time.perf_counter() if self.metrics is not None else 0.0
        try:
            with self._guarded(None):
                async with self._pg_pool.acquire() as conn, conn.transaction():
                    await conn.executemany(sql, rows)
        finally:
            if self.metrics is not None:
                self.metrics.observe(sql, time.perf_counter() - started)

    async def fetchrow(self, sql: str, args: Sequence[Any] = ()) -> Sequence[Any] | None:
        """Run one read statement of driver SQL (placeholders from `placeholder`, values
        from `driver_value`) straight on the driver and return its first row as the
        driver gives it (None without one): no SQLAlchemy compile or result processing,
        so values come back raw (a datetime is text on SQLite). For hot single-row reads
        by key, like the server's API key lookup on every call. Driver errors are mapped
        to DataFlow's.

        Raises:
            DataFlowError: inside `transaction()` or an atomic workflow (it would not
                read through the shared transaction), or the database's error.
        """
        if not self._ready:
            await self.initialize()
        if not self._fast_ok():
            raise DataFlowError(
                "fetchrow() reads outside any transaction; it cannot join the current one"
            )
        return await self._fast_fetch(None, sql, list(args), False)

    def _here(
        self,
        model: ModelInfo | None,
        write: bool,
        work: Callable[[sqlite3.Connection], R],
        rows: int,
    ) -> R | _NotHere:
        """SQLite file databases: run `work` on the calling thread, on a connection of its
        own that never waits for a lock (a write in a transaction of its own). Returns
        `_NOT_HERE`, having done nothing, when it cannot: an in-memory database (a second
        connection would see another one), DataFlow's own connection in use (a
        `transaction()` block, say: a write must not land in its middle), or the database
        locked by another writer; the caller then goes through the driver's thread, which
        waits its turn. Errors are mapped to DataFlow's.

        Why: handing a statement to aiosqlite's thread costs the event loop more than
        running it. The thread must take the GIL back from a busy loop after every
        step (sqlite3 releases it around each one), and those handovers cost the loop
        several times the statement itself (docs/benchmarks.md, "Where the time goes").
        Only small, bounded work comes here: single records by key, and batches of at
        most `EXECUTEMANY_HERE_ROWS` rows.

        A read does not wait for DataFlow's connection: on its own WAL connection it sees
        the last committed state even while another task's transaction or the
        execution-record writer holds that connection (a task's own transaction never
        comes here: `_fast_ok`).
        """
        if not self._sync_init or (write and self._sqlite_lock.locked()):
            return _NOT_HERE
        try:
            conn = self._here_conn
            if conn is None:
                conn = self._here_conn = self._connect_here()
            try:
                if not write:
                    return work(conn)  # autocommit: reads the last committed state
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    return _NOT_HERE  # another writer holds the database: wait in the thread
                raise
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # the statement's own error is the one to report;
                    self._here_conn = None  # a connection that cannot roll back is not
                    conn.close()  # used again (the next call opens another)
                raise
        except Exception as exc:
            raise self._fail(exc, model) from exc
        self._here_rows += rows
        if self._here_rows >= CHECKPOINT_ROWS and self._checkpoint_task is None:
            self._here_rows = 0
            self._checkpoint_task = asyncio.create_task(self._checkpoint())
        return result

    def _connect_here(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._sqlite_path, isolation_level=None, check_same_thread=False)
        _sqlite_pragmas(conn, None)
        conn.execute("PRAGMA busy_timeout = 0")  # never wait on the caller's thread
        # checkpoints (copying the log into the database, with an fsync) run in a worker
        # thread (_checkpoint), never on the caller's
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

    async def _checkpoint(self) -> None:
        """Copy what was written on the caller's thread from the write-ahead log into the
        database, in a worker thread on a connection of its own (a passive checkpoint:
        it waits for no one, and no one waits for it)."""
        try:
            await asyncio.to_thread(self._checkpoint_now)
        except Exception as exc:  # the next one catches up
            _log.debug("checkpoint failed: %s", exc)
        finally:
            self._checkpoint_task = None

    def _checkpoint_now(self) -> None:
        conn = sqlite3.connect(self._sqlite_path, isolation_level=None)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            conn.close()

    async def _pg_call(self, method: str, sql: str, args: Sequence[Any]) -> Any:
        """PostgreSQL: one autocommit statement (`fetchrow` or `execute`) on the
        connection kept for single statements when it is free, else on a pool connection.

        Why: a pool's acquire and release cost about as much Python as the statement
        itself. A failure that is not the database refusing the statement (the
        connection broke, the call was cancelled mid-statement) retires the kept
        connection; the pool serves meanwhile, and a new one is opened in the
        background (at most every `PG_RECONNECT_DELAY` seconds).
        """
        conn = self._pg_single
        if conn is None or self._pg_single_busy or conn.is_closed():
            if conn is None or conn.is_closed():
                self._pg_single = None
                self._pg_reopen()
            return await getattr(self._pg_pool, method)(sql, *args)
        self._pg_single_busy = True
        try:
            return await getattr(conn, method)(sql, *args)
        except self._pg_error:
            raise  # the statement's own error: the connection is fine
        except BaseException:
            self._pg_single = None
            conn.terminate()
            raise
        finally:
            self._pg_single_busy = False

    def _pg_reopen(self) -> None:
        loop = asyncio.get_running_loop()
        if self._pg_reconnect is not None or loop.time() < self._pg_reconnect_at:
            return
        self._pg_reconnect_at = loop.time() + PG_RECONNECT_DELAY
        self._pg_reconnect = asyncio.create_task(self._pg_open_single())

    async def _pg_open_single(self) -> None:
        import asyncpg

        try:
            self._pg_single = await asyncpg.connect(self._pg_dsn, timeout=PG_RECONNECT_DELAY)
        except Exception as exc:  # the pool serves; the next retirement tries again
            _log.debug("reconnecting the single-statement connection failed: %s", exc)
        finally:
            self._pg_reconnect = None

    def _fast_ok(self) -> bool:
        """Whether a single statement may skip SQLAlchemy: no shared transaction."""
        if not self._ready or self._tx.get() is not None:
            return False
        ctx = current_execution()
        return ctx is None or not ctx.atomic

    async def _fast_fetch(
        self,
        model: ModelInfo | None,
        sql: str,
        args: list[Any],
        write: bool,
    ) -> Sequence[Any] | None:
        """`_fast_fetch_now`, observed (`_observed`)."""
        return await self._observed(model, sql, self._fast_fetch_now(model, sql, args, write))

    async def _observed(
        self, model: ModelInfo | None, sql: str, statement: Coroutine[Any, Any, R]
    ) -> R:
        """Await `statement` (one fast-path statement of text `sql`): admitted by the
        circuit breaker, its failure mapped to ours (`_fail`), inside the statement
        hook's scope when one is set, timed when metrics are on."""
        try:
            guard = self._guarded(model)
        except BaseException:
            statement.close()  # refused by the open breaker: never started
            raise
        hook, metrics = self._statement_hook, self.metrics
        started = time.perf_counter() if metrics is not None else 0.0
        try:
            with hook(sql) if hook is not None else contextlib.nullcontext(), guard:
                result = await statement
        finally:
            if metrics is not None:
                metrics.observe(sql, time.perf_counter() - started)
        return result

    async def _fast_fetch_now(
        self,
        model: ModelInfo | None,
        sql: str,
        args: list[Any],
        write: bool,
    ) -> Sequence[Any] | None:
        """Run one statement on the driver; return its first row (None if none)."""
        row: Sequence[Any] | None
        if self._pg_pool is not None:
            row = await self._pg_call("fetchrow", sql, args)
        else:
            here = self._here(model, write, lambda c: c.execute(sql, args).fetchall(), 1)
            if not isinstance(here, _NotHere):
                row = here[0] if here else None
            else:
                async with self._sqlite_lock:
                    conn = self._raw_sqlite or await self._sqlite_connection()
                    try:
                        rows = await conn.execute_fetchall(sql, args)
                        if write:
                            await conn.commit()
                    except BaseException:
                        if write:
                            await conn.rollback()
                        raise
                row = rows[0] if rows else None
        return row

    async def _fast_fetchall(
        self, model: ModelInfo, prep: Prepared, args: list[Any]
    ) -> Sequence[Sequence[Any]]:
        """`_fast_fetchall_now`, observed (`_observed`)."""
        return await self._observed(model, prep.sql, self._fast_fetchall_now(model, prep, args))

    async def _fast_fetchall_now(
        self, model: ModelInfo, prep: Prepared, args: list[Any]
    ) -> Sequence[Sequence[Any]]:
        """Run one read statement (a listing or a count) on the driver; return its rows.

        SQLite: on the caller's thread (`_here`) while it takes at most
        `HERE_QUERY_STEPS` steps; how much work a query does is not bounded by its page
        size (a filter may scan the table), so one that takes more is interrupted and run
        again in the driver's thread, and its shape's next `HERE_SKIP` calls go straight
        there."""
        sql = prep.sql
        rows: Sequence[Sequence[Any]] | None
        if self._pg_pool is not None:
            rows = await self._pg_call("fetch", sql, args)
        else:
            rows = None
            if prep.skip_here > 0:
                prep.skip_here -= 1
            else:
                here = self._here(model, False, lambda c: _fetch_bounded(c, sql, args), 0)
                if here is None:
                    prep.skip_here = HERE_SKIP
                elif not isinstance(here, _NotHere):
                    rows = here
            if rows is None:
                async with self._sqlite_lock:
                    conn = self._raw_sqlite or await self._sqlite_connection()
                    rows = list(await conn.execute_fetchall(sql, args))
        assert rows is not None
        return rows

    async def _fast_executemany(
        self, model: ModelInfo | None, sql: str, batches: Iterable[Sequence[Any]]
    ) -> None:
        """`_fast_executemany_now`, observed (`_observed`)."""
        await self._observed(model, sql, self._fast_executemany_now(sql, batches))

    async def _fast_executemany_now(self, sql: str, batches: Iterable[Sequence[Any]]) -> None:
        """Run one statement for many argument rows in one SQLite transaction, one
        `executemany` per batch (other tasks run while each batch is written)."""
        async with self._sqlite_lock:
            conn = self._raw_sqlite or await self._sqlite_connection()
            try:
                for args in batches:
                    await conn.executemany(sql, args)
                await conn.commit()
            except BaseException:
                await conn.rollback()
                raise

    async def _fast_execute(
        self, model: ModelInfo, sql: str, args: list[Any], *, here: bool = True
    ) -> int:
        """`_fast_execute_now`, observed (`_observed`)."""
        return await self._observed(model, sql, self._fast_execute_now(model, sql, args, here=here))

    async def _fast_execute_now(
        self, model: ModelInfo, sql: str, args: list[Any], *, here: bool = True
    ) -> int:
        """Run one write statement on the driver; return the rows affected. `here=False`
        (SQLite): never on the caller's thread (`_here`), for a write whose work is not
        bounded (by filter)."""
        if self._pg_pool is not None:
            status: str = await self._pg_call("execute", sql, args)
            n = int(status.rsplit(" ", 1)[-1])
        else:
            done = (
                self._here(model, True, lambda c: c.execute(sql, args).rowcount, 1)
                if here
                else _NOT_HERE
            )
            if not isinstance(done, _NotHere):
                n = done
            else:
                async with self._sqlite_lock:
                    conn = self._raw_sqlite or await self._sqlite_connection()
                    try:
                        cur = await conn.execute(sql, args)
                        n = int(cur.rowcount)
                        await cur.close()
                        await conn.commit()
                    except BaseException:
                        await conn.rollback()
                        raise
        return n

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """Group operations in one transaction: committed when the block ends, rolled
        back if it raises. A nested block joins the outer transaction.

        ```python
        async with db.transaction():
            a = await db.ops(Account).update(src, fields={"balance": ...})
            b = await db.ops(Account).update(dst, fields={"balance": ...})
        ```
        """
        if self._tx.get() is not None:
            yield
            return
        tx: _Tx | None = None
        # beginning, committing or rolling back failed: the driver's error (a plain
        # ConnectionRefusedError when the server is down) becomes ours; the block's own
        # exception is passed on as it is
        with self._guarded(None) as guard:
            await self.initialize()
            async with self._gate(), self.engine.begin() as conn:
                await self._take_writer(conn)
                tx = _Tx(conn)
                token = self._tx.set(tx)
                try:
                    yield
                except BaseException as exc:
                    guard.passthrough = exc
                    raise
                finally:
                    self._tx.reset(token)
        if tx is not None:  # committed: the models written end their cached reads
            await self._cache_written(tx.written)

    # -- the query cache -------------------------------------------------------------

    @property
    def cache(self) -> QueryCache | None:
        """The query cache (`enable_caching`), None when off. Its ``hits`` and
        ``misses`` count lookups; ``stats()`` returns them with the backend's name."""
        return self._cache

    def _caching(self) -> QueryCache | None:
        """The cache, when a read may use it now: not inside a shared transaction (a
        read there must see the transaction's own writes, and its result must not
        outlive a rollback)."""
        cache = self._cache
        if cache is None or self._tx.get() is not None:
            return None
        ctx = current_execution()
        if ctx is not None and ctx.atomic:
            return None
        return cache

    async def _written(self, model: ModelInfo) -> None:
        """A write to `model` completed: outside a shared transaction, its cached reads
        end now; inside one, when it commits."""
        if self._cache is None:
            return
        tx = self._tx.get()
        if tx is None:
            ctx = current_execution()
            if ctx is not None and ctx.atomic:
                # the write joined the execution's transaction, so it exists already
                tx = await ctx.resource(self._resource_key, lambda: _SharedTx(self))
        if tx is not None:
            tx.written.add(model.table)
        else:
            await self._cache.written({model.table})

    async def _cache_written(self, models: set[str]) -> None:
        if self._cache is not None and models:
            await self._cache.written(models)

    async def migration_plan(self) -> list[str]:
        """What `initialize()` would change, without changing it (one line per step or
        refused difference)."""
        tables = [e.table for e in self._models.values()]
        try:
            async with self._gate(), self.engine.connect() as conn:
                plan = await conn.run_sync(plan_migration, tables)
        except Exception as exc:
            raise self._fail(exc, None) from exc
        return plan.describe() + [f"refused: {r}" for r in plan.refused]


def _diff(a: ModelInfo, b: ModelInfo) -> str:
    fa, fb = a.field_map, b.field_map
    parts = [f"-{n}" for n in fa if n not in fb] + [f"+{n}" for n in fb if n not in fa]
    parts += [f"~{n}" for n in fa if n in fb and fa[n] != fb[n]]
    if a.indexes != b.indexes or a.unique_together != b.unique_together:
        parts.append("indexes")
    if a.table != b.table:
        parts.append("table name")
    if a.tenant_field != b.tenant_field:
        parts.append("tenant_scoped")
    return ", ".join(parts) or "options"


def _make_cache(
    url: str,
    enable: bool | None,
    cache_url: str | None,
    ttl: float,
    max_entries: int,
    prefix: str | None,
) -> QueryCache | None:
    """The query cache the options ask for (None: off), or ValidationError naming the
    option that is wrong."""
    if enable is not None and not isinstance(enable, bool):
        raise ValidationError("enable_caching", "expects True, False or None")
    if cache_url is not None and not isinstance(cache_url, str):
        raise ValidationError("cache_url", "expects a redis:// URL")
    if cache_url is not None and enable is False:
        raise ValidationError("cache_url", "given with enable_caching=False: drop one of them")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= 86400:
        raise ValidationError("cache_ttl", "expects seconds, more than 0 and at most 86400")
    if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
        raise ValidationError("cache_max_entries", "expects a positive integer")
    if prefix is not None and (not isinstance(prefix, str) or not prefix or len(prefix) > 200):
        raise ValidationError("cache_prefix", "expects 1 to 200 characters")
    if cache_url is not None:
        if not cache_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValidationError("cache_url", "expects a redis://, rediss:// or unix:// URL")
        return RedisCache(cache_url, prefix or default_prefix(url), float(ttl))
    if prefix is not None:
        raise ValidationError("cache_prefix", "applies to a Redis cache only (give cache_url)")
    if not enable:
        return None
    return MemoryCache(float(ttl), max_entries)
