"""The stack of the access matrix: the app served with authentication on, its credentials,
and a checker that reads what is really there.

- `open_stack(db_url, sql, tmp, backend=...)`: the matrix app (`matrix_app.py`) served
  by `Nexus.serving(envoy=True)` on its own event loop in a thread (gRPC, and REST and
  gRPC-Web through the real Envoy), started with `NEXUS_JWT_SECRET` and the operator key
  `NEXUS_API_KEY_ADMIN` in its environment.
- `mcp_adapter(stack)`: the real MCP adapter (`nexus-mcp --transport http`) as a
  subprocess in front of it, holding no credential.
- `Stack.credential(name)`: what each credential of the matrix (`CREDENTIALS`) sends:
  HS256 JWTs made here with PyJWT (`authorization: Bearer`), and managed API keys made
  through AuthService with the operator's key (`x-api-key`).
- `Stack.seed(batch, a, b)`: Notes of tenants A and B, written through gRPC with each
  tenant's token.
- The checker goes around the gateway: rows per tenant straight from the database
  (`sql`), executions and workflows through gRPC with the operator's key.

Loaded by path from `conftest.py` (test folders are not packages).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import jwt
from google.protobuf import struct_pb2

from clients._grpc import Credential
from nexus_api.nexus.auth.v1 import auth_service_pb2 as a
from nexus_api.nexus.auth.v1 import auth_service_pb2_grpc as ag
from nexus_api.nexus.model.v1 import model_service_pb2 as m
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg
from nexus_server import Nexus, Serving

__all__ = [
    "ADMIN_KEY",
    "CREDENTIALS",
    "JWT_SECRET",
    "SHARED",
    "TENANT_A",
    "TENANT_B",
    "WAIT",
    "Sql",
    "Stack",
    "clean_env",
    "load_sibling",
    "make_token",
    "mcp_adapter",
    "open_stack",
]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
#: Every wait of these tests is bounded by this many seconds.
WAIT = 20.0

#: The credentials of the matrix, in the order the summary prints them: the issue's
#: seven (JWTs), then a managed API key with the role (tenant A) and a revoked one.
CREDENTIALS = (
    "none",
    "malformed",
    "bad_signature",
    "expired",
    "no_role",
    "role",
    "other_tenant",
    "api_key",
    "revoked_key",
)
#: The managed API key of the "api_key" credential (principal `key:matrix_key`).
KEY_NAME = "matrix_key"
TENANT_A = "tenant-a"
TENANT_B = "tenant-b"
#: The batch of the Notes every read cell reads (seeded once, written by no cell).
SHARED = "shared"
#: The operator's key (`NEXUS_API_KEY_ADMIN`): role admin, no tenant.
ADMIN_KEY = "matrix-admin-" + secrets.token_urlsafe(24)
JWT_SECRET = "matrix-secret-" + secrets.token_urlsafe(32)
OTHER_SECRET = "another-secret-" + secrets.token_urlsafe(32)
#: Three dot-separated parts, so it is taken for a JWT; none of them decodes.
MALFORMED = "this-is-not.a.valid-jwt!"

#: The authorization server the MCP adapter names to clients it refuses (never called:
#: the matrix's tokens are made by the test).
AUTHORIZATION_SERVER = "https://login.example.org/realms/matrix"
#: Runs one query on the app's database (placeholders `?`), returns its rows.
Sql = Callable[..., list[tuple[Any, ...]]]


def load_sibling(name: str) -> ModuleType:
    """The module `name.py` of this folder, loaded once by path (test folders are not
    packages, and importlib mode imports nothing from them by name)."""
    key = f"nexus_auth_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


matrix_app = load_sibling("matrix_app")


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


def _tokens() -> dict[str, Credential | None]:
    role = [matrix_app.ROLE]
    tokens = {
        "malformed": MALFORMED,
        "bad_signature": make_token("mallory", role, TENANT_A, secret=OTHER_SECRET),
        # an hour in the past: far beyond any clock skew the server allows
        "expired": make_token("ada", role, TENANT_A, lifetime=-3600),
        "no_role": make_token("olive", [matrix_app.OUTSIDER], TENANT_A),
        "role": make_token("ada", role, TENANT_A),
        "other_tenant": make_token("bob", role, TENANT_B),
    }
    return {"none": None, **{k: Credential("token", v) for k, v in tokens.items()}}


def _managed_keys(channel: grpc.Channel) -> dict[str, Credential | None]:
    """The managed API keys of the matrix, made through AuthService with the operator's
    key: `matrix_key` (role matrix, tenant A) and `gone_key` (the same, revoked)."""
    stub = ag.AuthServiceStub(channel)  # type: ignore[no-untyped-call]
    keys: dict[str, Credential | None] = {}
    for credential, name in (("api_key", KEY_NAME), ("revoked_key", "gone_key")):
        made = stub.CreateApiKey(
            a.CreateApiKeyRequest(name=name, roles=[matrix_app.ROLE], tenant=TENANT_A),
            timeout=WAIT,
            metadata=admin_metadata(),
        )
        keys[credential] = Credential("api_key", made.key)
    stub.RevokeApiKey(
        a.RevokeApiKeyRequest(name="gone_key"), timeout=WAIT, metadata=admin_metadata()
    )
    return keys


def admin_metadata() -> tuple[tuple[str, str], ...]:
    return (("x-api-key", ADMIN_KEY),)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a client subprocess: none of our variables (so no server
    secret and no credential unless given), PYTHONPATH at the repository."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


# ---------------------------------------------------------------------------- serving


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


def _start_mcp_http(
    address: str, env: dict[str, str], log: list[str]
) -> tuple[subprocess.Popen[str], str]:
    """`nexus-mcp --transport http --port 0` against `address`; the process and the URL
    it announces once bound. Its log (stderr) goes on into `log`."""
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "nexus-mcp"),
            *("--transport", "http", "--port", "0", "--server", address),
            *("--authorization-server", AUTHORIZATION_SERVER),
        ],
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
                log.extend(seen)
                # keep reading its log, so a full pipe never blocks it
                threading.Thread(target=log.extend, args=(proc.stderr,), daemon=True).start()
                return proc, match.group(1)


def _stop_process(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(WAIT)


@dataclass
class Stack:
    """The running stack and what the cells need of it."""

    backend: str
    address: str
    rest_url: str
    mcp_url: str | None
    sql: Sql
    #: everything the app's database holds, as bytes (to look for what must not be there)
    dump: Callable[[], bytes]
    table: str
    tenant_column: str
    config_dir: Path
    credentials: dict[str, Credential | None]
    channel: grpc.Channel
    #: the ids each batch was seeded with (batch -> tenant -> ids)
    seeded: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    #: the refusals the cells saw (`_cells.Refusal`), which the audit trail must hold
    refusals: list[Any] = field(default_factory=list)
    #: whether the real MCP client could connect with a credential (by matrix name)
    mcp_connects: dict[str, bool] = field(default_factory=dict)
    #: every log line of the server (in this process) and of the MCP adapter
    logs: list[str] = field(default_factory=list)

    def credential(self, name: str) -> Credential | None:
        """What the credential `name` of the matrix sends (None: nothing)."""
        return self.credentials[name]

    def secret(self, name: str) -> str | None:
        """The token or key of `name`, which no answer may contain."""
        cred = self.credentials[name]
        return None if cred is None else cred.value

    def metadata(self, name: str) -> list[tuple[str, str]]:
        """The gRPC metadata (or HTTP headers) carrying `name`: `authorization: Bearer`
        for a token, `x-api-key` for a key."""
        cred = self.credentials[name]
        return [] if cred is None else [cred.metadata()]

    def seed(self, batch: str, a: int, b: int) -> dict[str, list[str]]:
        """`a` Notes of tenant A and `b` of tenant B in `batch`, each created by its own
        tenant's token; returns their ids per tenant."""
        stub = mg.ModelServiceStub(self.channel)  # type: ignore[no-untyped-call]
        ids: dict[str, list[str]] = {}
        for tenant, count, cred in ((TENANT_A, a, "role"), (TENANT_B, b, "other_tenant")):
            if count:
                request = m.BulkCreateRecordsRequest(model=matrix_app.MODEL)
                for i in range(count):
                    record = struct_pb2.Struct()
                    record.update({"title": f"{batch} {i}", "batch": batch})
                    request.records.append(record)
                stub.BulkCreateRecords(
                    request,
                    timeout=WAIT,
                    metadata=self.metadata(cred),
                )
            ids[tenant] = sorted(self.row_ids(batch, tenant))
            assert len(ids[tenant]) == count, (batch, tenant, ids)
        self.seeded[batch] = ids
        return ids

    # -- the checker: around the gateway

    def rows(self, batch: str) -> dict[str, int]:
        """How many Notes of `batch` each tenant has (tenants with none left out)."""
        found = self.sql(
            f'SELECT "{self.tenant_column}", COUNT(*) FROM "{self.table}" '
            "WHERE batch = ? GROUP BY 1",
            batch,
        )
        return {str(tenant): int(n) for tenant, n in found}

    def row_ids(self, batch: str, tenant: str) -> list[str]:
        found = self.sql(
            f'SELECT id FROM "{self.table}" WHERE batch = ? AND "{self.tenant_column}" = ?',
            batch,
            tenant,
        )
        return [str(r[0]) for r in found]

    def executions(self, batch: str) -> int:
        """How many executions of the workflow were recorded with `batch` as an input
        (the operator sees every principal's executions)."""
        stub = wg.WorkflowServiceStub(self.channel)  # type: ignore[no-untyped-call]
        n, token = 0, ""
        while True:
            resp = stub.ListExecutions(
                w.ListExecutionsRequest(
                    workflow=matrix_app.WORKFLOW, page_size=1000, page_token=token
                ),
                timeout=WAIT,
                metadata=admin_metadata(),
            )
            n += sum(1 for e in resp.executions if e.inputs.fields["batch"].string_value == batch)
            token = resp.next_page_token
            if not token:
                return n

    def workflow_exists(self, name: str) -> bool:
        stub = wg.WorkflowServiceStub(self.channel)  # type: ignore[no-untyped-call]
        try:
            stub.GetWorkflow(
                w.GetWorkflowRequest(name=name), timeout=WAIT, metadata=admin_metadata()
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return True


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """`values` as the only identity settings of the environment while the block runs
    (the server reads its credential configuration from the environment at start; an
    operator's own keys, tokens or NEXUS_ENV must not change what the matrix sees).
    Other settings (the Envoy binary, the test database) stay."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(_IDENTITY)}
    for name in saved:
        del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        for name in values:
            os.environ.pop(name, None)
        os.environ.update(saved)


#: The variables that say who calls or how callers are authenticated.
_IDENTITY = (
    "NEXUS_API_KEY",
    "NEXUS_JWT",
    "NEXUS_JWKS",
    "NEXUS_ENV",
    "NEXUS_TOKEN",
    "NEXUS_CALLER",
    "NEXUS_MCP_AUTHORIZATION_SERVER",
)


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a record that cannot be formatted
            self.lines.append(self.format(record))


@contextlib.contextmanager
def _logs_into(lines: list[str]) -> Iterator[None]:
    """Every log record of this process, at every level, into `lines` while the block
    runs (the server runs in this process: its log and its audit lines)."""
    root = logging.getLogger()
    handler, level = _Lines(lines), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def open_stack(
    db_url: str, sql: Sql, dump: Callable[[], bytes], tmp: Path, *, backend: str
) -> Iterator[Stack]:
    """The stack on `db_url` (see the module docstring), stopped at the end. `sql` runs
    a query on its database, `dump` returns all it holds."""
    config_dir = tmp / "config"
    config_dir.mkdir(mode=0o700)
    served: _Served | None = None
    logs: list[str] = []
    with (
        _environment(NEXUS_JWT_SECRET=JWT_SECRET, NEXUS_API_KEY_ADMIN=ADMIN_KEY),
        _logs_into(logs),
    ):
        try:
            app = matrix_app.build_app(db_url)
            served = _Served(app)
            info = served.start()
            assert info.api_address is not None and app.db is not None
            model = app.db.model_info(matrix_app.MODEL)
            assert model.tenant_field, "Note is declared tenant-scoped"
            with grpc.insecure_channel(info.address) as channel:
                grpc.channel_ready_future(channel).result(timeout=WAIT)
                credentials = {**_tokens(), **_managed_keys(channel)}
                yield Stack(
                    backend=backend,
                    address=info.address,
                    rest_url=f"http://{info.api_address}",
                    mcp_url=None,
                    sql=sql,
                    dump=dump,
                    table=model.table,
                    tenant_column=model.tenant_field,
                    config_dir=config_dir,
                    credentials=credentials,
                    channel=channel,
                    logs=logs,
                )
        finally:
            if served is not None:
                served.stop()


@contextlib.contextmanager
def mcp_adapter(stack: Stack) -> Iterator[str]:
    """The real MCP adapter over streamable HTTP in front of `stack` (a subprocess
    holding no credential); sets and yields `stack.mcp_url`, stopped at the end."""
    env = clean_env(XDG_CONFIG_HOME=str(stack.config_dir))
    adapter, url = _start_mcp_http(stack.address, env, stack.logs)
    try:
        stack.mcp_url = url
        yield url
    finally:
        stack.mcp_url = None
        _stop_process(adapter)
