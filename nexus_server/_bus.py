"""Messages between the server processes that share one database.

Replicas are stateless apart from the database, so the database carries what one
replica tells the others (a workflow registered, an execution's events, a cancel
request):

- PostgreSQL: LISTEN/NOTIFY. One connection of its own per process listens (reconnected
  with backoff when it drops; `on_reconnect` callbacks then re-read what may have been
  missed meanwhile); a message is sent with `pg_notify` through the app's DataFlow, so a
  message sent inside a transaction leaves when it commits. A payload holds at most
  `MAX_PAYLOAD` bytes (PostgreSQL's limit is 8000).
- SQLite (several processes on one machine sharing a file): a small table,
  `nexus_bus`, that every process polls every `SQLITE_POLL` seconds through a connection
  of its own (so DataFlow's single connection and its statement hooks never see it).
  Messages older than `SQLITE_KEEP` seconds are deleted.
- Redis, when the app configures one (`Nexus(rate_limit_backend="redis://...")`): its
  pub/sub, on channels named after the database (`nexus:bus:<hash of its URL>:<channel>`),
  so that apps on other databases sharing the Redis never hear each other. The database
  then carries no message at all.

Delivery is at most once and best effort: what a message says must also be readable
from the database (the receivers' periodic re-reads are the safety net).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa

from dataflow import DataFlow

__all__ = ["MAX_PAYLOAD", "Bus", "PgBus", "RedisBus", "SqliteBus", "bus_for"]

_log = logging.getLogger("nexus_server")

#: The most UTF-8 bytes one message's payload may hold (PostgreSQL's NOTIFY takes
#: fewer than 8000).
MAX_PAYLOAD = 7900
#: Seconds between two polls of the SQLite bus table.
SQLITE_POLL = 0.25
#: Seconds a message stays in the SQLite bus table.
SQLITE_KEEP = 60.0
#: Seconds between two checks that the PostgreSQL listening connection still answers.
PG_CHECK = 5.0
#: The longest wait between two attempts to reconnect the listening connection.
PG_BACKOFF_MAX = 5.0

#: The listening connection's `application_name` (in `pg_stat_activity`).
APPLICATION_NAME = "nexus-bus"

Handler = Callable[[str], None]


class Bus:
    """Channels of text messages between the processes sharing a database.

    Subscribe before `start()`. Handlers run on the event loop and must not block; an
    exception of one is logged and does not stop the others.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}
        self._reconnected: list[Callable[[], None]] = []
        #: the task that listens (or polls) from `start()` until `close()`
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, channel: str, handler: Handler) -> None:
        self._handlers.setdefault(channel, []).append(handler)

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time listening (re)starts: messages sent meanwhile may be
        lost, so the subscriber re-reads the database."""
        self._reconnected.append(callback)

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Stop listening (the subclass then releases what it holds)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def publish(self, channel: str, payload: str) -> None:
        raise NotImplementedError

    #: whether `publish_in` can make a message part of a database transaction
    transactional = False

    async def publish_in(self, conn: Any, channel: str, payload: str) -> None:
        """Send a message as part of the transaction open on `conn` (a connection of
        the app's DataFlow): delivered when it commits, never if it rolls back. Only a
        bus that lives in that database can (`transactional`); with the others, the
        caller publishes once the transaction has committed."""
        raise NotImplementedError(f"{type(self).__name__} cannot publish in a transaction")

    @staticmethod
    def check_payload(payload: str) -> None:
        size = len(payload.encode())
        if size > MAX_PAYLOAD:
            raise ValueError(f"a bus message holds at most {MAX_PAYLOAD} bytes, not {size}")

    def _deliver(self, channel: str, payload: str) -> None:
        for handler in self._handlers.get(channel, ()):
            try:
                handler(payload)
            except Exception:
                _log.exception("handling a message of channel %s failed", channel)

    def _listening(self) -> None:
        for callback in self._reconnected:
            try:
                callback()
            except Exception:
                _log.exception("a bus reconnect callback failed")

    async def _keep_listening(
        self, session: Callable[[Callable[[], None]], Awaitable[None]], where: str
    ) -> None:
        """Run `session` (one connection listening, until it drops or fails) again and
        again, forever, until cancelled, waiting between two with backoff (0.25 s,
        doubled up to `PG_BACKOFF_MAX`). A session calls the callback it is given once
        it listens: the wait starts again from 0.25 s, and the `on_reconnect` callbacks
        run. `where` names the transport in the warning a failure logs."""
        delay = 0.25

        def connected() -> None:
            nonlocal delay
            delay = 0.25
            self._listening()

        while True:
            try:
                await session(connected)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _log.warning(
                    "listening for other replicas%s failed (%s); retrying in %.1f s",
                    where,
                    type(exc).__name__,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, PG_BACKOFF_MAX)


def bus_for(db: DataFlow, redis_url: str | None = None) -> Bus | None:
    """The bus of the replicas of `db`'s database: Redis pub/sub with `redis_url`, else
    the database's own; None for an in-memory SQLite database (no other process can
    share it)."""
    url = sa.engine.make_url(db.url)
    if redis_url is not None:
        shown = url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)
        space = hashlib.sha256(shown.encode()).hexdigest()[:16]
        return RedisBus(redis_url, f"nexus:bus:{space}:")
    if db.dialect == "postgresql":
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        return PgBus(db, dsn)
    path = url.database or ""
    if db.dialect == "sqlite" and path and path != ":memory:" and "mode=memory" not in db.url:
        return SqliteBus(path)
    return None


class PgBus(Bus):
    """LISTEN/NOTIFY on PostgreSQL (see the module's docstring)."""

    transactional = True

    def __init__(self, db: DataFlow, dsn: str) -> None:
        super().__init__()
        self._db = db
        self._dsn = dsn

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="nexus-bus-listen")

    async def publish(self, channel: str, payload: str) -> None:
        # checked before taking a connection: a message too large is the caller's
        # mistake (ValueError), not a database failure
        self.check_payload(payload)
        async with self._db.connection() as conn:
            await _pg_notify(conn, channel, payload)

    async def publish_in(self, conn: Any, channel: str, payload: str) -> None:
        self.check_payload(payload)
        await _pg_notify(conn, channel, payload)

    async def _listen(self) -> None:
        """Listen on every subscribed channel; reconnect with backoff (forever, until
        closed) when the connection drops or stops answering."""
        await self._keep_listening(self._session, "")

    async def _session(self, connected: Callable[[], None]) -> None:
        """One connection listening, until it drops or stops answering."""
        import asyncpg

        conn: Any = None
        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=PG_BACKOFF_MAX,
                # what operators see in pg_stat_activity
                server_settings={"application_name": APPLICATION_NAME},
            )
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c, lost=lost: lost.set())
            for channel in self._handlers:
                await conn.add_listener(channel, self._notified)
            connected()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PG_CHECK):
                        await lost.wait()
                if not lost.is_set():
                    # a half-open connection never says it is closed: ask it
                    await conn.fetchval("SELECT 1", timeout=PG_CHECK)
            _log.warning("the database connection listening for other replicas dropped")
        finally:
            if conn is not None:
                conn.terminate()

    def _notified(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        self._deliver(channel, payload)


class SqliteBus(Bus):
    """A polled table on SQLite (see the module's docstring)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path
        # one thread: sqlite3 connections are used by the thread that made them
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nexus-bus")
        self._conn: sqlite3.Connection | None = None
        self._last = 0

    async def start(self) -> None:
        self._last = await self._call(self._open)
        self._listening()
        self._task = asyncio.create_task(self._poll(), name="nexus-bus-poll")

    async def close(self) -> None:
        await super().close()
        with contextlib.suppress(Exception):
            await self._call(self._close)
        self._thread.shutdown(wait=False)

    async def publish(self, channel: str, payload: str) -> None:
        self.check_payload(payload)
        await self._call(self._insert, channel, payload)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, fn, *args)

    def _open(self) -> int:
        conn = sqlite3.connect(self._path, timeout=30.0, isolation_level=None)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS nexus_bus (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "channel TEXT NOT NULL, payload TEXT NOT NULL, create_time REAL NOT NULL)"
        )
        self._conn = conn
        row = conn.execute("SELECT coalesce(max(id), 0) FROM nexus_bus").fetchone()
        return int(row[0])

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _insert(self, channel: str, payload: str) -> None:
        assert self._conn is not None
        now = time.time()
        with self._conn:  # isolation_level=None: `with` does not begin; do it here
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute(
                "INSERT INTO nexus_bus (channel, payload, create_time) VALUES (?, ?, ?)",
                (channel, payload, now),
            )
            self._conn.execute("DELETE FROM nexus_bus WHERE create_time < ?", (now - SQLITE_KEEP,))
            self._conn.execute("COMMIT")

    def _read(self, after: int) -> list[tuple[int, str, str]]:
        assert self._conn is not None
        rows = self._conn.execute(
            "SELECT id, channel, payload FROM nexus_bus WHERE id > ? ORDER BY id LIMIT 1000",
            (after,),
        ).fetchall()
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(SQLITE_POLL)
            try:
                rows = await self._call(self._read, self._last)
            except Exception as exc:
                _log.warning("reading messages of other processes failed: %s", exc)
                continue
            for id_, channel, payload in rows:
                self._last = id_
                self._deliver(channel, payload)


class RedisBus(Bus):
    """Redis pub/sub (see the module's docstring)."""

    def __init__(self, url: str, prefix: str) -> None:
        super().__init__()
        import redis.asyncio as aioredis

        self._client = aioredis.Redis.from_url(
            url, socket_timeout=PG_CHECK, socket_connect_timeout=PG_CHECK
        )
        self._prefix = prefix

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="nexus-bus-redis")

    async def close(self) -> None:
        await super().close()
        await self._client.aclose()

    async def publish(self, channel: str, payload: str) -> None:
        self.check_payload(payload)
        await self._client.publish(self._prefix + channel, payload)

    async def _listen(self) -> None:
        """Subscribe to every channel; resubscribe with backoff (forever, until closed)
        when the connection drops."""
        await self._keep_listening(self._session, " on Redis")

    async def _session(self, connected: Callable[[], None]) -> None:
        """One subscription, until its connection drops (it never returns otherwise)."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*(self._prefix + c for c in self._handlers))
            connected()
            while True:
                msg = await pubsub.get_message(timeout=PG_CHECK)
                if msg is None:
                    await pubsub.ping()  # a half-open connection: find out
                    continue
                if msg.get("type") != "message":
                    continue
                channel = _text(msg["channel"]).removeprefix(self._prefix)
                self._deliver(channel, _text(msg["data"]))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


async def _pg_notify(conn: Any, channel: str, payload: str) -> None:
    """NOTIFY `channel` on `conn` (a connection of the app's DataFlow): delivered when
    its transaction commits."""
    await conn.execute(
        sa.text("SELECT pg_notify(:channel, :payload)"),
        {"channel": channel, "payload": payload},
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
