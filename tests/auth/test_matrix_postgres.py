"""The access matrix on PostgreSQL: the server's side of every cell again (gRPC, and
REST through the real Envoy) with the app's database on PostgreSQL, where tenant
filtering, stamping and the bulk delete run other SQL than on SQLite.

The channels that are clients only (CLI, MCP) do nothing database-specific: they run in
`test_matrix.py`, on SQLite.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

# loaded by conftest.py, by path (test folders are not packages)
_cells = sys.modules["nexus_auth__cells"]
_stack = sys.modules["nexus_auth__stack"]

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def matrix_backend() -> str:
    return "postgres"


def _cells_of(channel: str) -> list[Any]:
    return [
        pytest.param(_cells.Cell(channel, cred, op), id=f"{cred}-{op}")
        for op in _cells.OPERATIONS
        for cred in _stack.CREDENTIALS
    ]


@pytest.mark.parametrize("cell", _cells_of("pg-grpc"))
def test_grpc_on_postgres(stack: Any, cell: Any, record_cell: Any) -> None:
    _cells.seed(stack, cell)
    got = _cells.call_grpc(stack, cell)
    _cells.check(stack, cell, got)
    record_cell(cell.channel, cell.credential, cell.operation, _cells.seen(cell, got))


@pytest.mark.parametrize("cell", _cells_of("pg-rest"))
def test_rest_on_postgres(stack: Any, cell: Any, record_cell: Any) -> None:
    _cells.seed(stack, cell)
    got = _cells.call_rest(stack, cell)
    _cells.check(stack, cell, got)
    assert got.http == _cells.HTTP_STATUS[got.code], got
    record_cell(cell.channel, cell.credential, cell.operation, _cells.seen(cell, got))


def test_audit_trail_holds_every_refusal_on_postgres(stack: Any) -> None:
    checked = _cells.check_audit_trail(stack)
    assert checked, "no refusal was recorded by the cells (run them first)"


def test_no_credential_in_logs_or_database_on_postgres(stack: Any) -> None:
    """Last: after every cell, no credential is in a log line or in the database."""
    assert _cells.check_no_secret_kept(stack) > 0
