"""Fixtures of the access matrix (tests/auth): one real stack per module, with
authentication on.

- `stack` (module): the matrix app and its channels on the module's `matrix_backend`
  (`_stack.open_stack`): SQLite in a temporary directory by default; a module that
  defines its own `matrix_backend` fixture returning "postgres" gets a database of its
  own on the machine's PostgreSQL server (skipped when it is unreachable, failed under
  CI=true). Rows are counted around the gateway, straight from the database.
- `mcp_url` (module): the real MCP adapter (`nexus-mcp --transport http`, a subprocess
  holding no credential) in front of the stack.
- `client_env(**extra)`: the environment of a client subprocess (no server secret, no
  credential unless given).
- `record_cell(channel, credential, operation, seen)`: one cell for the summary printed
  at the end of the run (`pytest_terminal_summary`).

The code lives in sibling modules this file loads by path (`_stack.py`, which loads
`matrix_app.py`, and `_cells.py`): test folders are not packages, and in importlib mode
nothing is imported from here by name. Test modules find them in `sys.modules`
(`nexus_auth__stack`, `nexus_auth__cells`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import secrets
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest


def _load_stack() -> ModuleType:
    key = "nexus_auth__stack"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name("_stack.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_stack = _load_stack()
_stack.load_sibling("_cells")

PG_URL = os.environ.get("NEXUS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _sqlite_sql(path: Path) -> Any:
    def run(query: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=_stack.WAIT)
        try:
            return list(conn.execute(query, args))
        finally:
            conn.close()

    return run


def _pg(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """One query on PostgreSQL (`?` placeholders), from any thread: its own loop in a
    thread of its own (a test may be running inside a loop already)."""
    numbered = query
    for i in range(1, len(args) + 1):
        numbered = numbered.replace("?", f"${i}", 1)

    async def go() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            return [tuple(r) for r in await conn.fetch(numbered, *args)]
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result(timeout=_stack.WAIT)


def _pg_dump(url: str) -> bytes:
    """Every row of every table of the database at `url`, as text."""
    tables = _pg(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    rows = [r for (t,) in tables for r in _pg(url, f'SELECT t::text FROM "{t}" t')]
    return "\n".join(str(r[0]) for r in rows).encode()


def _pg_admin(sql: str) -> None:
    _pg(PG_URL, sql)


@pytest.fixture(scope="module")
def matrix_backend() -> str:
    """The database the module's stack runs on: "sqlite" (a module may override it)."""
    return "sqlite"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, envoy_path: Path, matrix_backend: str
) -> Iterator[Any]:
    """The whole stack, once per module (see `_stack.open_stack`)."""
    del envoy_path  # this fixture skips, or fails under CI=true, without Envoy
    tmp = tmp_path_factory.mktemp("matrix")
    if matrix_backend == "sqlite":
        path = tmp / "nexus.db"
        with _stack.open_stack(
            f"sqlite:///{path}",
            _sqlite_sql(path),
            # the database's files as they are (its write-ahead log too)
            lambda: b"".join(p.read_bytes() for p in sorted(tmp.glob("nexus.db*"))),
            tmp,
            backend="sqlite",
        ) as running:
            yield running
        return
    assert matrix_backend == "postgres", matrix_backend
    name = f"nexus_matrix_{secrets.token_hex(6)}"
    try:
        _pg_admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        reason = f"PostgreSQL is unreachable ({type(exc).__name__})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    url = f"{PG_URL.rpartition('/')[0]}/{name}"
    try:
        with _stack.open_stack(
            url, lambda q, *a: _pg(url, q, *a), lambda: _pg_dump(url), tmp, backend="postgres"
        ) as running:
            yield running
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def mcp_url(stack: Any) -> Iterator[str]:
    """The MCP adapter over streamable HTTP in front of the module's stack (its URL; also
    `stack.mcp_url` while it runs)."""
    with _stack.mcp_adapter(stack) as url:
        yield url


@pytest.fixture(scope="session")
def client_env() -> Any:
    """`client_env(**extra)`: the environment of a client subprocess."""
    return _stack.clean_env


# ---------------------------------------------------------------------------- the summary

#: (channel, credential, operation) -> what the cell saw, for the summary.
_CELLS: dict[tuple[str, str, str], str] = {}


@pytest.fixture(scope="session")
def record_cell() -> Any:
    """`record_cell(channel, credential, operation, seen)`: one cell for the summary."""

    def record(channel: str, credential: str, operation: str, seen: str) -> None:
        _CELLS[(channel, credential, operation)] = seen

    return record


#: Shorter words for the summary's cells (its legend says them).
_SHORT = (
    ("CREDENTIALS_", ""),
    ("PERMISSION_DENIED", "DENIED"),
    ("RECORD_NOT_FOUND", "NOT_FOUND"),
    ("Bearer challenge", "challenge"),
)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The cells covered: a line per channel and operation, a column per credential."""
    if not _CELLS:
        return
    tr = terminalreporter
    tr.section("access matrix: cells covered")
    cells = dict(_CELLS)
    for key, text in cells.items():
        for long, short in _SHORT:
            text = text.replace(long, short)
        cells[key] = text
    rows = sorted({(c, o) for c, _, o in cells})
    width = max(len(f"{c} {o}") for c, o in rows)
    creds = _stack.CREDENTIALS
    col = max(len(s) for s in [*creds, *cells.values()])
    tr.write_line(" " * (width + 1) + " ".join(f"{c:<{col}}" for c in creds))
    for channel, op in rows:
        line = [cells.get((channel, cred, op), "-") for cred in creds]
        tr.write_line(f"{channel + ' ' + op:<{width}} " + " ".join(f"{s:<{col}}" for s in line))
    tr.write_line(
        f"{len(cells)} cells. MISSING/INVALID/EXPIRED: UNAUTHENTICATED (CREDENTIALS_...); "
        "DENIED: PERMISSION_DENIED naming the permission; gRPC-Web: grpc-status; "
        "challenge: HTTP 401 with WWW-Authenticate; no tool: MCP lists none for it."
    )
