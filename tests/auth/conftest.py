"""Fixtures of the access matrix: one real stack with authentication on, the credentials,
a driver per channel and a trusted checker.

- `stack` (module): the matrix app (`matrix_app.py`) served by `Nexus.serving(envoy=True)`
  on its own event loop in a thread (gRPC, and REST and gRPC-Web through the real Envoy),
  with `NEXUS_JWT_SECRET` and the operator key `NEXUS_API_KEY_ADMIN` in the environment it
  starts with, on SQLite in a temporary directory; and the real MCP adapter
  (`nexus-mcp --transport http`) as a subprocess in front of it, holding no credential.
- `Stack.bearer(credential)`: the `Authorization` value of each credential of the matrix
  (`CREDENTIALS`): none, malformed, bad signature, expired, valid without the role, valid
  with the role (tenant A), other tenant (valid with the role, tenant B). Tokens are
  HS256 JWTs made here with PyJWT.
- `Stack.seed(batch, a, b)`: that many Notes in tenants A and B, through gRPC with each
  tenant's token; returns their ids.
- The checker reads what is really there, around the gateway: rows per tenant straight
  from the SQLite file, executions and workflows through gRPC with the operator's key.
- `record_cell(...)`: adds a cell to the summary printed at the end of the run.

Test modules use fixtures only (importlib mode: nothing is imported from here by name).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import struct_pb2

from nexus_api.nexus.model.v1 import model_service_pb2 as m
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg
from nexus_server import Nexus, Serving

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: Every wait of these tests is bounded by this many seconds.
WAIT = 20.0

#: The credentials of the matrix, in the order the summary prints them.
CREDENTIALS = (
    "none",
    "malformed",
    "bad_signature",
    "expired",
    "no_role",
    "role",
    "other_tenant",
)
TENANT_A = "tenant-a"
TENANT_B = "tenant-b"
#: The batch of the Notes every read cell reads (seeded once, never written by a cell).
SHARED = "shared"
#: The operator's key (`NEXUS_API_KEY_ADMIN`): role admin, no tenant.
ADMIN_KEY = "matrix-admin-" + secrets.token_urlsafe(24)
JWT_SECRET = "matrix-secret-" + secrets.token_urlsafe(32)
OTHER_SECRET = "another-secret-" + secrets.token_urlsafe(32)
#: Three dot-separated parts, so it is read as a JWT, none of them decodes.
MALFORMED = "this-is-not.a.valid-jwt!"


def _load(name: str) -> ModuleType:
    # a sibling file, not a package: loaded by path (test folders are not importable)
    spec = importlib.util.spec_from_file_location(
        f"nexus_auth_{name}", Path(__file__).with_name(f"{name}.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


matrix_app = _load("matrix_app")


def make_token(
    sub: str,
    roles: list[str],
    tenant: str | None,
    *,
    secret: str = JWT_SECRET,
    lifetime: float = 600.0,
) -> str:
    """An HS256 JWT with the claims the server reads (sub, exp, roles, tenant)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "roles": roles, "iat": now, "exp": now + int(lifetime)}
    if tenant is not None:
        claims["tenant"] = tenant
    return jwt.encode(claims, secret, algorithm="HS256")


def _bearers() -> dict[str, str | None]:
    role = [matrix_app.ROLE]
    return {
        "none": None,
        "malformed": MALFORMED,
        "bad_signature": make_token("mallory", role, TENANT_A, secret=OTHER_SECRET),
        # an hour in the past: far beyond any clock skew the server allows
        "expired": make_token("ada", role, TENANT_A, lifetime=-3600),
        "no_role": make_token("olive", [matrix_app.OUTSIDER], TENANT_A),
        "role": make_token("ada", role, TENANT_A),
        "other_tenant": make_token("bob", role, TENANT_B),
    }


def _admin_metadata() -> tuple[tuple[str, str], ...]:
    return (("x-api-key", ADMIN_KEY),)


# ---------------------------------------------------------------------------- the stack


class _Served:
    """The app served with Envoy from a background thread's event loop."""

    def __init__(self, app: Nexus) -> None:
        self.app = app
        self._ready: Future[Serving] = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="nexus-matrix", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            try:
                async with self.app.serving(envoy=True) as info:
                    self._ready.set_result(info)
                    await self._stop.wait()
            finally:
                if self.app.db is not None:
                    await self.app.db.close()  # frees the model's node types
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def start(self) -> Serving:
        self._thread.start()
        return self._ready.result(timeout=60)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the server did not stop"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a client subprocess: none of ours (no server secret, no stored
    login: a private config directory), PYTHONPATH at the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def _start_mcp_http(address: str, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    """`nexus-mcp --transport http --port 0` against `address`; returns the process and the
    URL it announces once bound."""
    proc = subprocess.Popen(
        [str(VENV_BIN / "nexus-mcp"), "--transport", "http", "--port", "0", "--server", address],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        deadline = time.monotonic() + WAIT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                proc.kill()
                raise AssertionError(f"nexus-mcp announced no port: {''.join(seen)}")
            try:
                line = pool.submit(proc.stderr.readline).result(timeout=remaining)
            except concurrent.futures.TimeoutError:
                continue  # the deadline check above ends the wait
            if not line:
                raise AssertionError(f"nexus-mcp exited ({proc.poll()}): {''.join(seen)}")
            seen.append(line)
            match = re.search(r"streamable HTTP on (http://\S+/mcp)", line)
            if match:
                # keep draining its log, so a full pipe never blocks it
                threading.Thread(target=proc.stderr.read, daemon=True).start()
                return proc, match.group(1)


@dataclass
class Stack:
    """The running stack and what the cells need of it."""

    address: str
    rest_url: str
    mcp_url: str
    db_path: Path
    table: str
    tenant_column: str
    config_dir: Path
    bearers: dict[str, str | None]
    channel: grpc.Channel
    #: how many Notes of each tenant each batch was seeded with (batch -> tenant -> n)
    seeded: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def bearer(self, credential: str) -> str | None:
        """The bearer value of `credential` (None: send none)."""
        return self.bearers[credential]

    # -- writes the cells start from (with tenant tokens, through the gateway)

    def seed(self, batch: str, a: int, b: int) -> dict[str, list[str]]:
        """Create `a` Notes of tenant A and `b` of tenant B in `batch`; their ids."""
        stub = mg.ModelServiceStub(self.channel)  # type: ignore[no-untyped-call]
        ids: dict[str, list[str]] = {}
        for tenant, count, cred in ((TENANT_A, a, "role"), (TENANT_B, b, "other_tenant")):
            if not count:
                ids[tenant] = []
                continue
            request = m.BulkCreateRecordsRequest(model=matrix_app.MODEL)
            for i in range(count):
                request.records.append(struct_of({"title": f"{batch} {i}", "batch": batch}))
            token = self.bearers[cred]
            stub.BulkCreateRecords(
                request, timeout=WAIT, metadata=(("authorization", f"Bearer {token}"),)
            )
            ids[tenant] = sorted(self.row_ids(batch, tenant))
        self.seeded[batch] = ids
        return ids

    # -- the trusted checker: around the gateway

    def _sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=WAIT)
        try:
            return list(conn.execute(query, args))
        finally:
            conn.close()

    def rows(self, batch: str) -> dict[str, int]:
        """How many Notes of `batch` each tenant has (tenants with none left out)."""
        found = self._sql(
            f'SELECT "{self.tenant_column}", COUNT(*) FROM "{self.table}" '
            "WHERE batch = ? GROUP BY 1",
            batch,
        )
        return {str(tenant): int(n) for tenant, n in found}

    def row_ids(self, batch: str, tenant: str) -> list[str]:
        found = self._sql(
            f'SELECT id FROM "{self.table}" WHERE batch = ? AND "{self.tenant_column}" = ?',
            batch,
            tenant,
        )
        return [str(r[0]) for r in found]

    def executions(self, batch: str) -> int:
        """How many executions of the workflow were recorded with `batch` as input (the
        operator sees every principal's executions)."""
        stub = wg.WorkflowServiceStub(self.channel)  # type: ignore[no-untyped-call]
        n, token = 0, ""
        while True:
            resp = stub.ListExecutions(
                w.ListExecutionsRequest(
                    workflow=matrix_app.WORKFLOW, page_size=1000, page_token=token
                ),
                timeout=WAIT,
                metadata=_admin_metadata(),
            )
            n += sum(1 for e in resp.executions if e.inputs.fields["batch"].string_value == batch)
            token = resp.next_page_token
            if not token:
                return n

    def workflow_exists(self, name: str) -> bool:
        stub = wg.WorkflowServiceStub(self.channel)  # type: ignore[no-untyped-call]
        try:
            stub.GetWorkflow(
                w.GetWorkflowRequest(name=name), timeout=WAIT, metadata=_admin_metadata()
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True


def struct_of(data: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(data)
    return s


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, envoy_path: Path) -> Iterator[Stack]:
    """The whole stack, once for the module (see the module's docstring)."""
    del envoy_path  # the fixture skips (or fails under CI) without Envoy
    tmp = tmp_path_factory.mktemp("matrix")
    db_path = tmp / "nexus.db"
    config_dir = tmp / "config"
    config_dir.mkdir(mode=0o700)
    patch = pytest.MonkeyPatch()
    for name in [k for k in os.environ if k.startswith("NEXUS_")]:
        patch.delenv(name)
    patch.setenv("NEXUS_JWT_SECRET", JWT_SECRET)
    patch.setenv("NEXUS_API_KEY_ADMIN", ADMIN_KEY)
    served: _Served | None = None
    mcp: subprocess.Popen[str] | None = None
    try:
        app = matrix_app.build_app(f"sqlite:///{db_path}")
        served = _Served(app)
        info = served.start()
        assert info.api_port is not None and app.db is not None
        model = app.db.model_info(matrix_app.MODEL)
        tenant_column = model.tenant_field
        assert tenant_column, "Note is declared tenant-scoped"
        mcp, mcp_url = _start_mcp_http(info.address, clean_env(XDG_CONFIG_HOME=str(config_dir)))
        with grpc.insecure_channel(info.address) as channel:
            grpc.channel_ready_future(channel).result(timeout=WAIT)
            yield Stack(
                address=info.address,
                rest_url=f"http://{info.api_address}",
                mcp_url=mcp_url,
                db_path=db_path,
                table=model.table,
                tenant_column=tenant_column,
                config_dir=config_dir,
                bearers=_bearers(),
                channel=channel,
            )
    finally:
        if mcp is not None:
            mcp.terminate()
            try:
                mcp.wait(WAIT)
            except subprocess.TimeoutExpired:
                mcp.kill()
                mcp.wait(WAIT)
        if served is not None:
            served.stop()
        patch.undo()


@pytest.fixture(scope="session")
def client_env() -> Any:
    """`client_env(**extra)`: the environment of a client subprocess (`clean_env`)."""
    return clean_env


# ---------------------------------------------------------------------------- the summary

#: (channel, credential, operation) -> what the cell saw, for the summary.
_CELLS: dict[tuple[str, str, str], str] = {}


@pytest.fixture(scope="session")
def record_cell() -> Any:
    """`record_cell(channel, credential, operation, seen)`: one cell for the summary."""

    def record(channel: str, credential: str, operation: str, seen: str) -> None:
        _CELLS[(channel, credential, operation)] = seen

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The cells covered: one line per channel and operation, one column per credential."""
    if not _CELLS:
        return
    tr = terminalreporter
    tr.section("access matrix: cells covered")
    keys = sorted({(c, o) for c, _, o in _CELLS})
    width = max(len(f"{c} {o}") for c, o in keys)
    tr.write_line(" " * (width + 2) + " | ".join(f"{c:<22}" for c in CREDENTIALS))
    for channel, op in keys:
        seen = [_CELLS.get((channel, cred, op), "-") for cred in CREDENTIALS]
        tr.write_line(f"{channel + ' ' + op:<{width}}  " + " | ".join(f"{s:<22}" for s in seen))
    tr.write_line(f"{len(_CELLS)} cells")
