"""Envoy within limits: its admin interface is a 0600 unix socket in the server's private
directory (no TCP admin port), and a bounded flood of idle connections on its port leaves
new REST clients served while Envoy closes the idle connections after the configured
idle timeout."""

from __future__ import annotations

import os
import selectors
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from nexus_server._envoy import admin_get
from nexus_server._limits import Limits

#: Idle connections the flood opens (bounded in count; each is closed by the test).
FLOOD = 300
#: A new client must be answered within this many seconds while the flood runs.
ANSWER_BOUND = 5.0


def _listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports process `pid` listens on (from /proc: its sockets' inodes)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _wait_closed(socks: list[socket.socket], within: float) -> int:
    """Wait until the peer closed every socket; returns how many are still open."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = len(socks)
    deadline = time.monotonic() + within
    try:
        while open_ and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, deadline - time.monotonic())):
                sock: Any = key.fileobj
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    open_ -= 1
    finally:
        sel.close()
    return open_


def test_admin_is_a_private_unix_socket_and_no_tcp_port(run_app: Callable[..., Any]) -> None:
    running = run_app()
    info = running._ready.result(0)
    sup = info.envoy
    assert sup is not None and sup.pid is not None
    mode = os.stat(sup.admin_socket).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(sup.workdir).st_mode) == 0o700
    assert admin_get(sup.admin_socket, "/ready")[0] == 200  # the server still reaches it
    assert _listening_tcp_ports(sup.pid) == {info.api_port}


def test_an_idle_flood_leaves_rest_served_and_is_closed(run_app: Callable[..., Any]) -> None:
    running = run_app(limits=Limits(connection_idle_timeout=1.0))
    info = running._ready.result(0)
    flood = [socket.create_connection(("127.0.0.1", info.api_port), timeout=5)]
    try:
        flood += [
            socket.create_connection(("127.0.0.1", info.api_port), timeout=5)
            for _ in range(FLOOD - 1)
        ]
        started = time.monotonic()
        with httpx.Client(base_url=f"http://{info.api_address}", timeout=ANSWER_BOUND) as c:
            resp = c.get("/v1/workflows")
        assert resp.status_code == 200, resp.text
        assert time.monotonic() - started < ANSWER_BOUND
        assert [w["name"] for w in resp.json()["workflows"]] == ["boom"]
        # Envoy closes every connection that made no request after the idle timeout
        assert _wait_closed(flood, 15.0) == 0
    finally:
        for s in flood:
            s.close()


def test_default_idle_timeout_keeps_a_quiet_connection(run_app: Callable[..., Any]) -> None:
    """The control case: with the default idle timeout (minutes) a quiet connection
    stays open, so the test above measures the configured limit."""
    running = run_app()
    info = running._ready.result(0)
    with socket.create_connection(("127.0.0.1", info.api_port), timeout=5) as s:
        assert _wait_closed([s], 2.0) == 1
