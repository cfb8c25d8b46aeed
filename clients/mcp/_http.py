"""The streamable-HTTP server of `nexus-mcp`: uvicorn with bounds on slow and idle clients.

uvicorn times out a connection only while it is idle between two requests
(`timeout_keep_alive`); a client that connects and sends its request headers slowly, or
never, would hold its connection (a file descriptor) for as long as it likes. Each
connection here gets `header_timeout` seconds from when it opens (or from the first byte
of each following request on a kept-alive connection) to complete its request headers,
and is closed otherwise. `max_connections` bounds the connections and requests served
at once: beyond it uvicorn answers 503 instead of accepting more work.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HEADER_TIMEOUT", "KEEP_ALIVE", "MAX_CONNECTIONS", "MAX_HEADER_BYTES", "http_config"]

#: Seconds a connection gets to send complete request headers (`--header-timeout`).
HEADER_TIMEOUT = 10.0
#: Connections (and requests in progress) served at once (`--max-connections`).
MAX_CONNECTIONS = 1000
#: Seconds an idle kept-alive connection stays open between two requests.
KEEP_ALIVE = 5
#: Largest request head (request line and headers) accepted, in bytes.
MAX_HEADER_BYTES = 16 * 1024


class _HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not
    complete `header_timeout` seconds after it opened (or after the first byte of a
    following request). The deadline is not moved by data arriving: a client that
    sends one byte a second is closed all the same."""

    header_timeout: float = HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._header_timer is None:  # the first byte of a following request
                self._arm()
        else:  # the headers are complete (or the connection is ending)
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def http_config(
    app: Any,
    *,
    header_timeout: float = HEADER_TIMEOUT,
    max_connections: int = MAX_CONNECTIONS,
    graceful_shutdown: int = 5,
) -> uvicorn.Config:
    """The uvicorn configuration of the adapter's HTTP server (the socket is bound by the
    caller and passed to `Server.serve`)."""
    protocol = type(
        "HeaderTimeoutProtocol", (_HeaderTimeoutProtocol,), {"header_timeout": header_timeout}
    )
    return uvicorn.Config(
        app,
        http=protocol,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=graceful_shutdown,
        timeout_keep_alive=KEEP_ALIVE,
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
    )
