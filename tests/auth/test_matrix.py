"""The access matrix: every channel x every kind of credential x four operations.

Channels: gRPC (the stubs), REST and gRPC-Web through the real Envoy, the CLI as a
subprocess (`--token`/`--api-key`), MCP through the real `mcp` client over streamable
HTTP (the adapter as a subprocess, forwarding the caller's credential), and a smaller
check of MCP over stdio with the credential in the environment.

Credentials: none, malformed, bad signature, expired, valid without the role, valid with
the role (tenant A), other tenant (valid with the role, tenant B): JWTs; then a managed
API key with the role (tenant A) and a revoked one, sent as `x-api-key`.

Operations: execute `add_note` (writes a Note), read Notes (`ListRecords`), bulk-delete
Notes, register a workflow. MCP has no bulk-delete or register tool (its tools are the
workflows and each model's single-record operations, see docs/mcp.md): for MCP those two
cells check that no such tool is listed, and MCP's one deleting tool, `notes_delete`,
gets a row of its own.

Every cell asserts the exact outcome on its channel (gRPC code and ErrorInfo reason with
the permission named, the HTTP status, the CLI's exit code 7 and reason, MCP's 401 with
its challenge or isError with the code) and what is in the database afterwards, read
around the gateway (`_cells.check`); no channel echoes the credential; the development
labels `x-nexus-caller`/`x-nexus-tenant` sent along are ignored. Then: the audit trail
holds every refusal under the channel it came through, and a refusal tells nothing of
whether what was asked for exists. One stack serves the whole module, on SQLite;
`test_matrix_postgres.py` runs the server-side channels again on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx
import pytest
from mcp import Client, StdioServerParameters

from clients._grpc import ApiFailure
from nexus_api.nexus.model.v1 import model_service_pb2 as m
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg

# loaded by conftest.py, by path (test folders are not packages)
_cells = sys.modules["nexus_auth__cells"]
_stack = sys.modules["nexus_auth__stack"]

ROOT = Path(__file__).resolve().parents[2]
WAIT = _stack.WAIT
pytestmark = pytest.mark.timeout(120)


def _cells_of(channel: str, operations: tuple[str, ...] = _cells.OPERATIONS) -> list[Any]:
    return [
        pytest.param(_cells.Cell(channel, cred, op), id=f"{cred}-{op}")
        for op in operations
        for cred in _stack.CREDENTIALS
    ]


@pytest.mark.parametrize("cell", _cells_of("grpc"))
def test_grpc(stack: Any, cell: Any, record_cell: Any) -> None:
    _cells.seed(stack, cell)
    got = _cells.call_grpc(stack, cell)
    _cells.check(stack, cell, got)
    record_cell(cell.channel, cell.credential, cell.operation, _cells.seen(cell, got))


@pytest.mark.parametrize("cell", _cells_of("rest"))
def test_rest_through_envoy(stack: Any, cell: Any, record_cell: Any) -> None:
    _cells.seed(stack, cell)
    got = _cells.call_rest(stack, cell)
    _cells.check(stack, cell, got)
    assert got.http == _cells.HTTP_STATUS[got.code], got
    record_cell(cell.channel, cell.credential, cell.operation, _cells.seen(cell, got))


@pytest.mark.parametrize("cell", _cells_of("grpcweb"))
def test_grpc_web_through_envoy(stack: Any, cell: Any, record_cell: Any) -> None:
    _cells.seed(stack, cell)
    got = _cells.call_grpc_web(stack, cell)
    _cells.check(stack, cell, got)
    record_cell(cell.channel, cell.credential, cell.operation, _cells.seen(cell, got))


@pytest.fixture(scope="module", autouse=True)
def cli_outcomes(
    request: pytest.FixtureRequest, stack: Any, client_env: Any
) -> Iterator[dict[str, Any]]:
    """The outcome of each selected CLI cell, by batch (a future until it is done).

    Each CLI cell is a subprocess that mostly spends its time starting Python, so they
    all start when the module's first test does, eight at a time in the background,
    while the other channels' cells run (every cell has its own rows and workflow name,
    so none sees another's writes); `test_cli` waits for its own.
    """
    cells: list[Any] = [
        item.callspec.params["cell"]
        for item in request.session.items
        if isinstance(item, pytest.Function)
        and item.module is request.module
        and item.originalname == "test_cli"
    ]
    env = client_env(XDG_CONFIG_HOME=str(stack.config_dir), HOME=str(stack.config_dir))
    for cell in cells:
        _cells.seed(stack, cell)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        yield {cell.batch: pool.submit(_cells.call_cli, stack, cell, env) for cell in cells}


@pytest.mark.parametrize("cell", _cells_of("cli"))
def test_cli(stack: Any, cell: Any, cli_outcomes: dict[str, Any], record_cell: Any) -> None:
    got = cli_outcomes[cell.batch].result(timeout=WAIT * 4)
    _cells.check(stack, cell, got)
    assert got.exit == (0 if got.code == "OK" else 7), got
    record_cell(cell.channel, cell.credential, cell.operation, _cells.seen(cell, got))


@pytest.mark.parametrize("cell", _cells_of("mcp", ("execute", "read", "delete")))
async def test_mcp_over_http(stack: Any, mcp_url: str, cell: Any, record_cell: Any) -> None:
    await anyio.to_thread.run_sync(_cells.seed, stack, cell)
    got = await _cells.call_mcp(stack, cell)
    await anyio.to_thread.run_sync(_cells.check, stack, cell, got)
    record_cell(cell.channel, cell.credential, cell.operation, _cells.seen(cell, got))


@pytest.mark.parametrize("credential", ["no_role", "role", "other_tenant", "api_key"])
async def test_mcp_has_no_bulk_delete_or_register_tool(
    stack: Any, mcp_url: str, credential: str, record_cell: Any
) -> None:
    """No MCP tool bulk-deletes or registers, whoever asks; a workflow's tool is listed
    only to a principal who may run it."""
    async with _cells.mcp_client(stack, credential) as client:
        with anyio.fail_after(WAIT):
            tools = {t.name for t in (await client.list_tools()).tools}
    assert not {t for t in tools if "bulk" in t or "register" in t}, tools
    assert ("run_add_note" in tools) is (credential != "no_role"), tools
    for op in ("bulk_delete", "register"):
        record_cell("mcp", credential, op, "no tool")


STDIO_CREDENTIALS = ("none", "expired", "no_role", "role", "api_key", "revoked_key")


async def _stdio_call(stack: Any, cell: Any, env: dict[str, str]) -> Any:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "clients.mcp"], env=env, cwd=str(ROOT)
    )
    async with Client(params, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            result = await client.call_tool("run_add_note", cell.inputs())
    return _cells.mcp_result(result)


@pytest.fixture(scope="module")
def stdio_outcomes(stack: Any, client_env: Any) -> dict[str, Any]:
    """The stdio cells' outcomes by credential: one adapter subprocess each, all at
    once (each its own event loop in a thread), with `NEXUS_TOKEN` in its environment."""

    def run(credential: str) -> Any:
        sent = stack.credential(credential)
        env = client_env(NEXUS_SERVER=stack.address, XDG_CONFIG_HOME=str(stack.config_dir))
        if sent is not None:
            env["NEXUS_TOKEN" if sent.kind == "token" else "NEXUS_API_KEY"] = sent.value
        cell = _cells.Cell("stdio", credential, "execute")
        return asyncio.run(_stdio_call(stack, cell, env))

    with concurrent.futures.ThreadPoolExecutor(len(STDIO_CREDENTIALS)) as pool:
        futures = {c: pool.submit(run, c) for c in STDIO_CREDENTIALS}
        return {c: f.result(timeout=WAIT * 3) for c, f in futures.items()}


@pytest.mark.parametrize("credential", STDIO_CREDENTIALS)
def test_mcp_over_stdio(
    stack: Any, credential: str, stdio_outcomes: dict[str, Any], record_cell: Any
) -> None:
    """stdio: the adapter sends the credential of its environment (`NEXUS_TOKEN`)."""
    cell = _cells.Cell("stdio", credential, "execute")
    got = stdio_outcomes[credential]
    _cells.check(stack, cell, got)
    record_cell("mcp-stdio", credential, "execute", _cells.seen(cell, got))


def test_audit_trail_holds_every_refusal(stack: Any) -> None:
    """Last: the refusals of the cells above are in the audit trail, each under the
    channel it came through (Envoy names REST and gRPC-Web whatever the client claims)."""
    checked = _cells.check_audit_trail(stack)
    assert checked, "no refusal was recorded by the cells (run them first)"


def _grpc_answer(call: Any, request: Any, metadata: list[tuple[str, str]]) -> tuple[str, str]:
    try:
        call(request, timeout=WAIT, metadata=metadata)
    except grpc.RpcError as exc:
        failure = ApiFailure.from_rpc_error(exc)
        return failure.code, failure.reason
    raise AssertionError(f"{request}: a refused caller was served")


def _rest_answer(
    url: str, body: dict[str, Any], metadata: list[tuple[str, str]]
) -> tuple[int, str]:
    resp = httpx.post(url, json=body, headers=dict(metadata), timeout=WAIT)
    return resp.status_code, resp.json()["details"][0]["reason"]


@pytest.mark.parametrize("credential", ["none", "no_role"])
def test_a_refusal_tells_nothing_of_existence(stack: Any, credential: str) -> None:
    """A refused caller gets the same answer, over gRPC and REST, for a workflow or model
    that exists and one that does not: no hint of what it may not see."""
    sent = stack.metadata(credential)
    workflows = wg.WorkflowServiceStub(stack.channel)  # type: ignore[no-untyped-call]
    models = mg.ModelServiceStub(stack.channel)  # type: ignore[no-untyped-call]
    for real, absent in (("add_note", "no_such_flow"), ("Note", "Nope")):
        seen = set()
        for name in (real, absent):
            if real == "add_note":
                grpc_answer = _grpc_answer(
                    workflows.ExecuteWorkflow, w.ExecuteWorkflowRequest(name=name), sent
                )
                rest_answer = _rest_answer(
                    f"{stack.rest_url}/v1/workflows/{name}:execute", {"inputs": {}}, sent
                )
            else:
                grpc_answer = _grpc_answer(
                    models.ListRecords, m.ListRecordsRequest(model=name), sent
                )
                rest_answer = _rest_answer(
                    f"{stack.rest_url}/v1/models/{name}/records:search", {}, sent
                )
            # (the permission a PERMISSION_DENIED names is the one asked for: left out)
            seen.add((grpc_answer, rest_answer))
        assert len(seen) == 1, f"{real} and {absent} answered differently: {seen}"


def test_no_credential_in_logs_or_database(stack: Any) -> None:
    """Last: after every cell, no credential is in a log line or in the database."""
    assert _cells.check_no_secret_kept(stack) > 0
