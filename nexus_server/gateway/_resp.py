"""The few Redis commands the rate limiter sends, over RESP2 on asyncio streams.

Why not redis-py: the environment this project is built in does not ship it. The
limiter needs four commands (AUTH, SELECT, EVALSHA, EVAL) and one reply shape (an array
of two integers); this module is that and no more. Swap it for `redis.asyncio` when the
dependency is available: `RedisClient.evalsha` is the one method the limiter calls.

Connections are pooled (at most `max_connections`, opened on demand); every command is
bounded by `timeout` seconds, and a connection that failed or timed out is closed, never
reused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["RedisClient", "RedisError"]


class RedisError(Exception):
    """Redis answered with an error, or not in RESP."""


def _encode(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def _reply(reader: asyncio.StreamReader) -> Any:
    line = await reader.readline()
    if not line.endswith(b"\r\n"):
        raise RedisError("connection closed")
    kind, body = line[:1], line[1:-2]
    if kind == b"+":
        return body.decode()
    if kind == b"-":
        raise RedisError(body.decode(errors="replace"))
    if kind == b":":
        return int(body)
    if kind == b"$":
        size = int(body)
        if size < 0:
            return None
        data = await reader.readexactly(size + 2)
        return data[:-2]
    if kind == b"*":
        size = int(body)
        return None if size < 0 else [await _reply(reader) for _ in range(size)]
    raise RedisError(f"not a RESP reply: {line[:20]!r}")


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def call(self, *parts: str) -> Any:
        self.writer.write(_encode(*parts))
        await self.writer.drain()
        return await _reply(self.reader)

    def close(self) -> None:
        self.writer.close()


class RedisClient:
    """A small pool of RESP connections to the Redis of `url`
    (`redis://[user:password@]host[:port][/db]`)."""

    def __init__(self, url: str, *, max_connections: int = 16, timeout: float = 1.0) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 6379
        self._db = int(parts.path.strip("/") or 0)
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self._timeout = timeout
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(max_connections)

    async def _open(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self._host, self._port)
        conn = _Connection(reader, writer)
        try:
            if self._password is not None:
                auth = (self._user, self._password) if self._user else (self._password,)
                await conn.call("AUTH", *auth)
            if self._db:
                await conn.call("SELECT", str(self._db))
        except BaseException:
            conn.close()
            raise
        return conn

    async def command(self, *parts: str) -> Any:
        """Send one command and return its reply (RedisError for an error reply)."""
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            try:
                async with asyncio.timeout(self._timeout):
                    if conn is None:
                        conn = await self._open()
                    reply = await conn.call(*parts)
            except RedisError as exc:
                if conn is not None and "connection closed" not in str(exc):
                    self._idle.append(conn)  # an error reply: the connection is fine
                elif conn is not None:
                    conn.close()
                raise
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            self._idle.append(conn)
            return reply

    async def evalsha(self, sha: str, script: str, keys: Sequence[str], args: Sequence[str]) -> Any:
        """Run a Lua script by its SHA1, loading it (EVAL) when Redis does not know it."""
        try:
            return await self.command("EVALSHA", sha, str(len(keys)), *keys, *args)
        except RedisError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.command("EVAL", script, str(len(keys)), *keys, *args)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()
