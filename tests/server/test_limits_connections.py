"""Idle connections cannot hold the gRPC server: a bounded flood of idle TCP connections
leaves new clients served, and the server closes idle connections after the configured
time (a TCP connection that never completes its HTTP/2 handshake, and an HTTP/2
connection that never makes a call)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_server import Nexus
from nexus_server._limits import Limits

#: Idle connections the flood opens (bounded: the test process holds them too).
FLOOD = 300
#: A new client must be answered within this many seconds while the flood runs.
ANSWER_BOUND = 5.0
#: The client's HTTP/2 connection preface and an empty SETTINGS frame.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def _closed_by_peer(reader: asyncio.StreamReader, within: float) -> bool:
    """Read until the peer closes the connection; False if it is still open `within`
    seconds from now."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def _open_idle(port: int, count: int) -> list[tuple[Any, Any]]:
    conns = []
    for _ in range(count):
        conns.append(await asyncio.open_connection("127.0.0.1", port))
    return conns


def _close(conns: list[tuple[Any, Any]]) -> None:
    for _, writer in conns:
        writer.close()


async def _health(address: str) -> float:
    """Seconds a brand-new client needs to get SERVING from the health service."""
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=ANSWER_BOUND
        )
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    return time.monotonic() - started


async def test_an_idle_flood_leaves_new_clients_served_and_is_closed(
    make_app: Callable[..., Nexus],
) -> None:
    limits = Limits(handshake_timeout=1.0, connection_idle_timeout=1.0)
    app = make_app(limits=limits)
    async with asyncio.timeout(60), app.serving() as info:
        flood = await _open_idle(info.port, FLOOD)
        try:
            assert await _health(info.address) < ANSWER_BOUND
            # every connection that never sent a byte is closed after the handshake timeout
            closed = await asyncio.gather(*(_closed_by_peer(r, 10.0) for r, _ in flood))
            assert all(closed), f"{closed.count(False)} of {FLOOD} still open"
        finally:
            _close(flood)
        assert await _health(info.address) < ANSWER_BOUND


async def test_an_http2_connection_without_calls_is_closed_when_idle(
    make_app: Callable[..., Nexus],
) -> None:
    app = make_app(limits=Limits(connection_idle_timeout=1.0))
    async with asyncio.timeout(30), app.serving() as info:
        reader, writer = await asyncio.open_connection("127.0.0.1", info.port)
        try:
            writer.write(PREFACE)
            await writer.drain()
            first = await asyncio.wait_for(reader.read(9), 5)
            assert first[3:4] == b"\x04", first  # the server's SETTINGS: a live HTTP/2 link
            started = time.monotonic()
            assert await _closed_by_peer(reader, 10.0)
            assert time.monotonic() - started >= 0.5  # idle-closed, not refused
        finally:
            writer.close()


async def test_default_limits_keep_an_http2_connection_open(
    make_app: Callable[..., Nexus],
) -> None:
    """The control case: with the default idle timeout (minutes) the same connection
    stays open, so the test above measures the limit, not some other close."""
    app = make_app()
    async with asyncio.timeout(30), app.serving() as info:
        reader, writer = await asyncio.open_connection("127.0.0.1", info.port)
        try:
            writer.write(PREFACE)
            await writer.drain()
            assert not await _closed_by_peer(reader, 2.0)
        finally:
            writer.close()


def test_grpc_options_carry_every_limit() -> None:
    opts = dict(Limits(max_connections=500, connection_idle_timeout=2.5).grpc_options())
    assert opts["grpc.max_allowed_incoming_connections"] == 500
    assert opts["grpc.max_connection_idle_ms"] == 2500
    assert opts["grpc.server_handshake_timeout_ms"] == 10_000
    assert opts["grpc.max_connection_age_ms"] == 3_600_000
    assert opts["grpc.max_connection_age_grace_ms"] == 3_600_000
    assert opts["grpc.keepalive_time_ms"] == 60_000
    assert Limits().connections >= 64
