"""The cells of the access matrix: what each sends on each channel, and what it must see.

- `Cell(channel, credential, operation)`: one cell; its own batch of Notes and its own
  workflow name, so cells never share what they write.
- `call_grpc`, `call_rest`, `call_grpc_web`, `call_cli`, `call_mcp`: the operation of a
  cell on a channel, answered as an `Outcome` (the gRPC code name and ErrorInfo, the
  response document, and the channel's own form: HTTP status, exit code, isError).
- `seed(stack, cell)` before the call; `check(stack, cell, outcome)` after it: the exact
  outcome and what the database holds (a refused write wrote nothing; the other tenant
  touched only tenant B), the same rules on every channel.

Operations: execute `add_note` (writes a Note), read Notes (`ListRecords`), bulk-delete
Notes, register a workflow; and `delete` (one Note), which takes the bulk delete's place
on MCP, whose tools have no bulk delete (nor a register).

Loaded by path from `conftest.py` (test folders are not packages).
"""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import grpc
import httpx
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from clients._grpc import ApiFailure, to_json
from nexus_api.nexus.model.v1 import model_service_pb2 as m
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg

__all__ = [
    "AUTHORIZATION_SERVER",
    "DEVELOPMENT_LABELS",
    "HTTP_STATUS",
    "OPERATIONS",
    "PERMISSION",
    "PRINCIPAL",
    "REFUSED",
    "UNKNOWN_TOOL",
    "Cell",
    "Outcome",
    "Refusal",
    "call_cli",
    "call_grpc",
    "call_grpc_web",
    "call_mcp",
    "call_rest",
    "check",
    "check_audit_trail",
    "check_no_secret_kept",
    "mcp_client",
    "mcp_result",
    "seed",
    "seen",
]

# loaded by conftest.py, by path (test folders are not packages)
_stack = sys.modules["nexus_auth__stack"]
_app = sys.modules["nexus_auth_matrix_app"]

ROOT = Path(__file__).resolve().parents[2]
WAIT: float = _stack.WAIT
OPERATIONS = ("execute", "read", "bulk_delete", "register")
TENANT_A: str = _stack.TENANT_A
TENANT_B: str = _stack.TENANT_B
SHARED: str = _stack.SHARED
MODEL: str = _app.MODEL
WORKFLOW: str = _app.WORKFLOW
AUTHORIZATION_SERVER: str = _stack.AUTHORIZATION_SERVER

#: What each refused credential gets: (gRPC code, ErrorInfo reason).
REFUSED = {
    "none": ("UNAUTHENTICATED", "CREDENTIALS_MISSING"),
    "malformed": ("UNAUTHENTICATED", "CREDENTIALS_INVALID"),
    "bad_signature": ("UNAUTHENTICATED", "CREDENTIALS_INVALID"),
    "expired": ("UNAUTHENTICATED", "CREDENTIALS_EXPIRED"),
    "no_role": ("PERMISSION_DENIED", "PERMISSION_DENIED"),
    "revoked_key": ("UNAUTHENTICATED", "CREDENTIALS_INVALID"),
}
#: The tenant each accepted credential acts in.
TENANT_OF = {"role": TENANT_A, "api_key": TENANT_A, "other_tenant": TENANT_B}
#: The permission a PERMISSION_DENIED names, per operation.
PERMISSION: dict[str, str] = _app.OPERATION_PERMISSIONS
#: Sent on every call of gRPC, REST, gRPC-Web and the CLI: who and where the caller
#: claims to be. With authentication on they are ignored: a call without a valid
#: credential stays refused (and audited without a principal), tenant B's calls stay in
#: tenant B.
DEVELOPMENT_LABELS = {"x-nexus-caller": "jwt:ada", "x-nexus-tenant": TENANT_A}
#: The outcome of calling an MCP tool the caller is not shown.
UNKNOWN_TOOL = "UNKNOWN_TOOL"
HTTP_STATUS = {"OK": 200, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404}
CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}
#: Notes seeded (tenant A, tenant B) for the read cells (once), and per bulk-delete and
#: delete cell.
READ_SEED = (3, 1)
BULK_SEED = (2, 1)
DELETE_SEED = (1, 1)


# ---------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """One cell: what it sends, and where its own rows and workflow are."""

    channel: str
    credential: str
    operation: str

    @property
    def batch(self) -> str:
        return f"{self.channel}-{self.credential}-{self.operation}"

    @property
    def workflow(self) -> str:
        return f"reg_{self.channel.replace('-', '_')}_{self.credential}"

    def inputs(self) -> dict[str, Any]:
        return {"title": f"note of {self.batch}", "batch": self.batch}

    def definition(self) -> dict[str, Any]:
        return {
            "description": f"registered by the matrix cell {self.batch}",
            "nodes": [{"id": "list", "type": "NoteListNode", "params": {"limit": 1}}],
        }


@dataclass
class Outcome:
    """What a call answered, the same on every channel: the gRPC code name and the
    ErrorInfo, the response document when it succeeded, and the channel's own form
    (HTTP status, CLI exit code, MCP isError)."""

    code: str
    reason: str = ""
    permission: str | None = None
    message: str = ""
    doc: Any = None
    http: int | None = None
    exit: int | None = None
    is_error: bool | None = None
    text: str = ""

    def brief(self) -> str:
        return self.code if not self.reason or self.reason == self.code else self.reason


def _failure_outcome(failure: ApiFailure, **extra: Any) -> Outcome:
    return Outcome(
        failure.code,
        failure.reason,
        failure.metadata.get("permission"),
        failure.message,
        **extra,
    )


def _status_outcome(status: status_pb2.Status, **extra: Any) -> Outcome:
    reason, permission = "", None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, permission = info.reason, info.metadata.get("permission")
    return Outcome(
        CODE_NAMES.get(status.code, str(status.code)), reason, permission, status.message, **extra
    )


# ---------------------------------------------------------------------------- requests


def _request(cell: Cell) -> tuple[str, str, Any]:
    """The operation of `cell` as (service, method, request message)."""
    if cell.operation == "execute":
        req = w.ExecuteWorkflowRequest(name=WORKFLOW)
        req.inputs.update(cell.inputs())
        return "nexus.workflow.v1.WorkflowService", "ExecuteWorkflow", req
    if cell.operation == "read":
        lreq = m.ListRecordsRequest(model=MODEL, page_size=100)
        lreq.filter.update({"batch": SHARED})
        return "nexus.model.v1.ModelService", "ListRecords", lreq
    if cell.operation == "bulk_delete":
        dreq = m.BulkDeleteRecordsRequest(model=MODEL)
        dreq.filter.update({"batch": cell.batch})
        return "nexus.model.v1.ModelService", "BulkDeleteRecords", dreq
    assert cell.operation == "register"
    rreq = json_format.ParseDict(
        {"name": cell.workflow, "definition": cell.definition()}, w.RegisterWorkflowRequest()
    )
    return "nexus.workflow.v1.WorkflowService", "RegisterWorkflow", rreq


_RESPONSES: dict[str, Any] = {
    "ExecuteWorkflow": w.Execution,
    "ListRecords": m.ListRecordsResponse,
    "BulkDeleteRecords": m.BulkDeleteRecordsResponse,
    "RegisterWorkflow": w.Workflow,
}


# ---------------------------------------------------------------------------- channels


def call_grpc(stack: Any, cell: Cell) -> Outcome:
    service, method, request = _request(cell)
    metadata = [*DEVELOPMENT_LABELS.items(), *stack.metadata(cell.credential)]
    stubs: dict[str, Any] = {
        "nexus.workflow.v1.WorkflowService": wg.WorkflowServiceStub,
        "nexus.model.v1.ModelService": mg.ModelServiceStub,
    }
    stub = stubs[service](stack.channel)
    try:
        reply = getattr(stub, method)(request, timeout=WAIT, metadata=metadata)
    except grpc.RpcError as exc:
        failure = ApiFailure.from_rpc_error(exc)
        return _failure_outcome(failure, text=f"{exc.details()}\n{failure.render()}")
    return Outcome("OK", doc=to_json(reply))


def _rest_route(cell: Cell) -> tuple[str, dict[str, Any]]:
    if cell.operation == "execute":
        return f"/v1/workflows/{WORKFLOW}:execute", {"inputs": cell.inputs()}
    if cell.operation == "read":
        return f"/v1/models/{MODEL}/records:search", {"filter": {"batch": SHARED}}
    if cell.operation == "bulk_delete":
        return f"/v1/models/{MODEL}/records:bulkDelete", {"filter": {"batch": cell.batch}}
    return "/v1/workflows", {"name": cell.workflow, "definition": cell.definition()}


def _headers(stack: Any, cell: Cell) -> dict[str, str]:
    """The credential, the development labels, and a false channel name Envoy must
    replace (the audit trail names the channel a call really came through, whatever the
    client claims)."""
    return {
        **DEVELOPMENT_LABELS,
        "x-nexus-channel": "cli",
        **dict(stack.metadata(cell.credential)),
    }


def call_rest(stack: Any, cell: Cell) -> Outcome:
    path, body = _rest_route(cell)
    with httpx.Client(base_url=stack.rest_url, timeout=WAIT) as client:
        resp = client.post(path, json=body, headers=_headers(stack, cell))
    doc = resp.json()
    if resp.status_code == 200:
        return Outcome("OK", doc=doc, http=200, text=resp.text)
    assert set(doc) == {"code", "message", "details"}, resp.text
    status = json_format.ParseDict(doc, status_pb2.Status())
    return _status_outcome(status, http=resp.status_code, text=f"{resp.headers}\n{resp.text}")


def _grpc_web_frames(data: bytes) -> Iterator[tuple[int, bytes]]:
    at = 0
    while at < len(data):
        flags, size = data[at], struct.unpack(">I", data[at + 1 : at + 5])[0]
        yield flags, data[at + 5 : at + 5 + size]
        at += 5 + size


def call_grpc_web(stack: Any, cell: Cell) -> Outcome:
    service, method, request = _request(cell)
    payload = request.SerializeToString()
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"}
    with httpx.Client(base_url=stack.rest_url, timeout=WAIT) as client:
        resp = client.post(
            f"/{service}/{method}",
            content=b"\x00" + struct.pack(">I", len(payload)) + payload,
            headers={**headers, **_headers(stack, cell)},
        )
    assert resp.status_code == 200, resp.text  # gRPC-Web says the status in trailers
    trailers = {k.lower(): v for k, v in resp.headers.items() if k.lower().startswith("grpc-")}
    reply = None
    for flags, frame in _grpc_web_frames(resp.content):
        if flags & 0x80:  # the trailers frame
            for line in frame.decode().split("\r\n"):
                if ":" in line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            reply = _RESPONSES[method].FromString(frame)
    code = int(trailers["grpc-status"])
    if code == 0:
        assert reply is not None
        return Outcome("OK", doc=to_json(reply), http=200)
    details = trailers.get("grpc-status-details-bin")
    assert details, f"no status details in {trailers}"
    status = status_pb2.Status.FromString(base64.b64decode(details + "=" * (-len(details) % 4)))
    assert status.code == code
    return _status_outcome(status, http=resp.status_code, text=f"{trailers}\n{status}")


def _cli_args(cell: Cell) -> list[str]:
    if cell.operation == "execute":
        return ["-o", "json", "run", WORKFLOW, "--inputs", json.dumps(cell.inputs())]
    service, method, request = _request(cell)
    short = service.rsplit(".", 1)[-1]
    body = json_format.MessageToDict(request, preserving_proto_field_name=True)
    return ["-o", "json", "call", f"{short}/{method}", "--json", json.dumps(body)]


_CLI_ERROR = re.compile(r"^error: ([A-Z_]+)(?: \(([A-Z_]+)\))?: (.*)$", re.M)


def call_cli(stack: Any, cell: Cell, env: dict[str, str]) -> Outcome:
    sent = stack.credential(cell.credential)
    creds = [] if sent is None else [f"--{sent.kind.replace('_', '-')}", sent.value]
    env = {**env, "NEXUS_CALLER": DEVELOPMENT_LABELS["x-nexus-caller"]}
    proc = subprocess.run(
        [sys.executable, "-m", "clients.cli", "--server", stack.address, *creds, *_cli_args(cell)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(ROOT),
        timeout=WAIT * 2,
    )
    if proc.returncode == 0:
        return Outcome("OK", doc=json.loads(proc.stdout), exit=0)
    found = _CLI_ERROR.search(proc.stderr)
    if found is None:  # the cell fails on its own, showing what the CLI printed
        return Outcome(f"exit {proc.returncode}", exit=proc.returncode, text=proc.stderr[-2000:])
    permission = re.search(r"permission=(\S+)", proc.stderr)
    return Outcome(
        found.group(1),
        found.group(2) or "",
        permission.group(1).rstrip(",") if permission else None,
        found.group(3),
        exit=proc.returncode,
        text=proc.stdout + proc.stderr,
    )


_MCP_TOOLS = {"execute": f"run_{WORKFLOW}", "read": "notes_list", "delete": "notes_delete"}
_MCP_ERROR = re.compile(r"\b([A-Z][A-Z_]+) \(([A-Z_]+)\)")


def _mcp_arguments(stack: Any, cell: Cell) -> dict[str, Any]:
    if cell.operation == "execute":
        return cell.inputs()
    if cell.operation == "read":
        return {"filter": {"batch": SHARED}, "limit": 100}
    assert cell.operation == "delete"
    return {"id": stack.seeded[cell.batch][TENANT_A][0]}


def mcp_result(result: Any) -> Outcome:
    text = "\n".join(getattr(c, "text", "") for c in result.content)
    if not result.is_error:
        return Outcome("OK", doc=result.structured_content, is_error=False, text=text)
    if text.startswith("unknown tool "):  # not listed to this caller, as if absent
        return Outcome(UNKNOWN_TOOL, UNKNOWN_TOOL, is_error=True, text=text)
    found = _MCP_ERROR.search(text)
    if found is None:  # the cell fails on its own, showing the result's text
        return Outcome("isError without a code", is_error=True, text=text[:2000])
    permission = re.search(r"permission=(\S+)", text)
    return Outcome(
        found.group(1),
        found.group(2),
        permission.group(1).rstrip(",") if permission else None,
        text,
        is_error=True,
        text=text,
    )


def mcp_client(stack: Any, credential: str) -> Client:
    """The real MCP client over streamable HTTP, sending the matrix's `credential`."""
    headers = dict(stack.metadata(credential))
    transport = streamable_http_client(
        stack.mcp_url, http_client=create_mcp_http_client(headers=headers)
    )
    return Client(transport, read_timeout_seconds=WAIT)


async def call_mcp(stack: Any, cell: Cell) -> Outcome:
    if cell.credential in REFUSED and REFUSED[cell.credential][0] == "UNAUTHENTICATED":
        return await _mcp_unauthenticated(stack, cell.credential)
    async with mcp_client(stack, cell.credential) as client:
        with anyio.fail_after(WAIT):
            result = await client.call_tool(_MCP_TOOLS[cell.operation], _mcp_arguments(stack, cell))
    return mcp_result(result)


async def _mcp_unauthenticated(stack: Any, credential: str) -> Outcome:
    """A request without a valid credential is refused by the adapter's HTTP layer, as
    the MCP authorization spec says: 401 with `WWW-Authenticate: Bearer
    resource_metadata=...` (and `error="invalid_token"` when a token was sent), whose
    document (RFC 9728) names the authorization server; the real client then fails to
    connect, and no tool was called."""
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        **dict(stack.metadata(credential)),
    }
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "matrix", "version": "0"},
        },
    }
    async with httpx.AsyncClient(timeout=WAIT) as http:
        resp = await http.post(stack.mcp_url, json=initialize, headers=headers)
    challenge = resp.headers.get("www-authenticate", "")
    metadata = None
    found = re.search(r'resource_metadata="([^"]+)"', challenge)
    if found:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            metadata = (await http.get(found.group(1))).json()
    # the real client, once per credential (its answer does not depend on the tool)
    connected = stack.mcp_connects.get(credential)
    if connected is None:
        connected = True
        try:
            async with mcp_client(stack, credential) as client:
                with anyio.fail_after(WAIT):
                    await client.list_tools()
        except TimeoutError:
            raise
        except Exception:  # whatever the SDK raises on a 401
            connected = False
        stack.mcp_connects[credential] = connected
    return Outcome(
        f"HTTP {resp.status_code}",
        http=resp.status_code,
        doc=metadata,
        is_error=not connected,
        text=challenge,
    )


# ---------------------------------------------------------------------------- expectations


def seed(stack: Any, cell: Cell) -> None:
    if cell.operation == "read" and SHARED not in stack.seeded:
        stack.seed(SHARED, *READ_SEED)
    elif cell.operation == "bulk_delete":
        stack.seed(cell.batch, *BULK_SEED)
    elif cell.operation == "delete":
        stack.seed(cell.batch, *DELETE_SEED)


class Refusal(NamedTuple):
    """A refusal the audit trail must hold."""

    channel: str
    method: str
    code: str
    reason: str
    principal: str


#: The audit trail's name of each channel of the matrix.
AUDIT_CHANNEL = {"grpcweb": "grpc-web", "stdio": "mcp", "pg-grpc": "grpc", "pg-rest": "rest"}
#: The principal of each valid credential (`jwt:<sub>`).
PRINCIPAL = {
    "no_role": "jwt:olive",
    "role": "jwt:ada",
    "other_tenant": "jwt:bob",
    "api_key": f"key:{_stack.KEY_NAME}",
}
_METHODS = {
    "execute": "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow",
    "read": "/nexus.model.v1.ModelService/ListRecords",
    "bulk_delete": "/nexus.model.v1.ModelService/BulkDeleteRecords",
    "delete": "/nexus.model.v1.ModelService/DeleteRecord",
    "register": "/nexus.workflow.v1.WorkflowService/RegisterWorkflow",
}


def _audited_method(cell: Cell) -> str:
    """The RPC the refusal of `cell` is recorded under: the CLI's `run` asks for the
    workflow first (refused there), MCP runs a workflow by streaming it."""
    if cell.operation == "execute" and cell.channel == "cli":
        return "/nexus.workflow.v1.WorkflowService/GetWorkflow"
    if cell.operation == "execute" and cell.channel in ("mcp", "stdio"):
        return "/nexus.workflow.v1.WorkflowService/StreamExecution"
    return _METHODS[cell.operation]


def check(stack: Any, cell: Cell, got: Outcome) -> None:
    """The outcome and the database afterwards, the same rules on every channel."""
    op, cred = cell.operation, cell.credential
    secret = stack.secret(cred)
    assert secret is None or secret not in got.text + got.message, "the credential was echoed"
    seeded = stack.seeded.get(cell.batch)
    if cred in REFUSED:
        code, reason = REFUSED[cred]
        if cell.channel == "mcp" and code == "UNAUTHENTICATED":
            assert got.http == 401, got
            assert got.is_error, "the MCP client connected without a valid credential"
            assert got.text.startswith("Bearer "), got.text
            assert 'resource_metadata="' in got.text, got.text
            assert ('error="invalid_token"' in got.text) is (cred != "none"), got.text
            assert got.doc is not None and got.doc["authorization_servers"] == [
                AUTHORIZATION_SERVER
            ], got.doc
        elif cell.channel in ("mcp", "stdio") and cred == "no_role" and op == "execute":
            # MCP lists a workflow's tool only to who may run it: to anyone else it is an
            # unknown tool, as one that does not exist (no hint that it does)
            assert got.code == UNKNOWN_TOOL, got
            assert got.text.startswith(f"unknown tool 'run_{WORKFLOW}'"), got
        else:
            assert (got.code, got.reason) == (code, reason), got
            if code == "PERMISSION_DENIED":
                assert got.permission == PERMISSION[op], got
        # what reached the server: not MCP's 401s, nor a tool MCP does not show
        if cell.channel not in ("mcp", "stdio") or got.code not in (UNKNOWN_TOOL, "HTTP 401"):
            stack.refusals.append(
                Refusal(
                    AUDIT_CHANNEL.get(cell.channel, cell.channel),
                    _audited_method(cell),
                    code,
                    reason,
                    "" if code == "UNAUTHENTICATED" else PRINCIPAL[cred],
                )
            )
        # nothing written
        if op == "execute":
            assert stack.rows(cell.batch) == {}
            assert stack.executions(cell.batch) == 0
        elif op in ("bulk_delete", "delete"):
            assert stack.rows(cell.batch) == {
                TENANT_A: len(seeded[TENANT_A]),
                TENANT_B: len(seeded[TENANT_B]),
            }
        elif op == "register":
            assert not stack.workflow_exists(cell.workflow)
        return
    tenant = TENANT_OF[cred]
    other = TENANT_B if tenant == TENANT_A else TENANT_A
    if op == "delete" and cred == "other_tenant":
        # tenant A's record is, for tenant B, a record that does not exist
        assert (got.code, got.reason) == ("NOT_FOUND", "RECORD_NOT_FOUND"), got
        assert stack.rows(cell.batch) == {TENANT_A: 1, TENANT_B: 1}
        return
    assert got.code == "OK", got
    if op == "execute":
        assert stack.rows(cell.batch) == {tenant: 1}
        assert stack.executions(cell.batch) == 1
        if cell.channel not in ("mcp", "stdio"):  # MCP's result is the outputs alone
            assert got.doc["state"] == "STATE_SUCCEEDED", got.doc
            assert got.doc["owner"] == PRINCIPAL[cred], got.doc
    elif op == "read":
        ids = sorted(r["id"] for r in got.doc["records"])
        assert ids == stack.seeded[SHARED][tenant], (ids, stack.seeded[SHARED])
        assert {r["batch"] for r in got.doc["records"]} == {SHARED}
    elif op == "bulk_delete":
        assert int(got.doc["deleted_count"]) == len(seeded[tenant]), got.doc
        assert stack.rows(cell.batch) == {other: len(seeded[other])}
    elif op == "delete":
        assert stack.rows(cell.batch) == {TENANT_B: 1}
    else:
        assert got.doc["name"] == cell.workflow, got.doc
        assert got.doc["owner"] == PRINCIPAL[cred], got.doc
        assert stack.workflow_exists(cell.workflow)


def seen(cell: Cell, got: Outcome) -> str:
    if cell.channel == "mcp" and got.http == 401:
        return "401 Bearer challenge"
    if cell.channel.endswith("rest"):
        return f"{got.http} {got.brief()}"
    if cell.channel == "cli":
        return f"exit {got.exit} {got.brief() if got.code != 'OK' else ''}".strip()
    if cell.channel in ("mcp", "stdio") and got.is_error:
        return f"isError {got.brief()}"
    return got.brief()


def check_audit_trail(stack: Any) -> dict[str, int]:
    """Every refusal the cells saw is in the audit trail (`nexus_audit`, read straight
    from the database), under the channel it really came through.

    gRPC, REST and gRPC-Web: the trail's failed calls of the channel are exactly the
    cells' refusals (method, code, reason, principal), no more, no fewer. The CLI and
    MCP make calls of their own around the one the cell is about (the CLI's `run` asks
    for the workflow first, the MCP adapter lists the tools): there, each refusal's
    code, reason and principal are in the trail under that channel. Waits (bounded) for
    the trail's write-behind. Returns the refusals checked per channel.
    """
    exact = {"grpc", "rest", "grpc-web"}
    expected = Counter(r for r in stack.refusals if r.channel in exact)
    loose = {
        (r.channel, r.code, r.reason, r.principal) for r in stack.refusals if r.channel not in exact
    }
    deadline = time.monotonic() + WAIT
    while True:
        rows = stack.sql(
            "SELECT channel, method, code, reason, principal FROM nexus_audit WHERE code <> 'OK'"
        )
        trail = [Refusal(*(str(v or "") for v in row)) for row in rows]
        got = Counter(r for r in trail if r.channel in exact)
        seen_loose = {(r.channel, r.code, r.reason, r.principal) for r in trail}
        if got == expected and loose <= seen_loose:
            return dict(Counter(r.channel for r in stack.refusals))
        if time.monotonic() > deadline:
            missing = (expected - got) + Counter(loose - seen_loose)
            extra = got - expected
            raise AssertionError(f"audit trail: missing {dict(missing)}; extra {dict(extra)}")
        time.sleep(0.05)


def check_no_secret_kept(stack: Any) -> int:
    """No credential of the matrix (tokens, API keys, the operator's key, the JWT secret)
    is in the server's log (every record, every level), the MCP adapter's log, or
    anything the app's database holds (audit rows, executions, workflows, API keys:
    those store a salted hash). Returns how many log lines were searched."""
    secrets = [v for v in (stack.secret(c) for c in stack.credentials) if v is not None]
    secrets += [_stack.ADMIN_KEY, _stack.JWT_SECRET]
    logs = "\n".join(stack.logs)
    assert "nexus.audit" in logs, "the server's log was not captured"
    stored = stack.dump()
    # the role's executions are stored with their owner: the rows were read
    assert PRINCIPAL["role"].encode() in stored, "the database's rows were not read"
    for secret in secrets:
        assert secret not in logs, f"a credential is in the log ({secret[:6]}...)"
        assert secret.encode() not in stored, f"a credential is stored ({secret[:6]}...)"
    return len(stack.logs)
