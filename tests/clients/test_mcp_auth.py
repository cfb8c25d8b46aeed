"""`nexus-mcp` with the server's authentication on: an OAuth 2.1 resource server over
HTTP, the environment's credential over stdio, and tools per principal.

A Nexus app with authentication on runs on the test's event loop (port 0): an operator
API key (`NEXUS_API_KEY_OPS`, role admin) and HS256 tokens (`NEXUS_JWT_SECRET`); the
workflow `hello` may be run by the role `greeter`, `secret` by `vault` only; the model
`Note` is readable by the built-in role `reader`. The adapter runs as the real
`nexus-mcp` subprocess (HTTP and stdio) and is driven by the real `mcp.Client` (or by
plain HTTP requests where the test is about status codes and headers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx2
import jwt
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.auth import ProtectedResourceMetadata
from mcp.shared.exceptions import MCPError

from clients.mcp._auth import CredentialError, credential_of
from dataflow import DataFlow
from nexus_server import Nexus
from workflow import WorkflowBuilder

WAIT = 20.0
ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NEXUS_MCP = str(VENV_BIN / "nexus-mcp")
#: The operator's API key (an environment key: role admin).
OPS_KEY = "nxk-test-operator-" + os.urandom(8).hex()
SECRET = "s" * 16 + os.urandom(16).hex()
ISSUER = "https://login.example.org/realms/nexus"


def _token(sub: str, *roles: str, ttl: float = 600, secret: str = SECRET) -> str:
    now = int(time.time())
    claims = {"sub": sub, "roles": list(roles), "iat": now, "exp": now + int(ttl)}
    return jwt.encode(claims, secret, algorithm="HS256")


def _build(app: Nexus, db: DataFlow) -> None:
    @db.model
    class Note:
        id: str
        text: str = ""

    app.integrate_dataflow(db)
    hello = WorkflowBuilder("Say hello.")
    hello.add_node("PythonCodeNode", "greet", {"code": "result = 'hi ' + who", "who": "{{who}}"})
    app.register("hello", hello.build(), roles=["greeter"])
    secret = WorkflowBuilder("Only for the vault.")
    secret.add_node("PythonCodeNode", "open", {"code": "result = 42"})
    app.register("secret", secret.build(), roles=["vault"])


@dataclass
class Served:
    address: str


@contextlib.asynccontextmanager
async def _serve(tmp_path: Path, *, auth: bool) -> AsyncIterator[Served]:
    app = Nexus(grpc_port=0, grace_period=1.0, enable_auth=auth)
    db = DataFlow(f"sqlite:///{tmp_path / 'auth.db'}")
    _build(app, db)
    try:
        async with app.serving() as info:
            yield Served(info.address)
    finally:
        await db.close()


@pytest.fixture
def auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's credential sources (read from the environment at start)."""
    for name in list(os.environ):
        if name.startswith("NEXUS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NEXUS_API_KEY_OPS", OPS_KEY)
    monkeypatch.setenv("NEXUS_JWT_SECRET", SECRET)


@pytest.fixture
async def served(auth_env: None, tmp_path: Path) -> AsyncIterator[Served]:
    async with _serve(tmp_path, auth=True) as s:
        yield s


def _child_env(address: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_SERVER=address, PYTHONPATH=str(ROOT), **extra)
    return env


@dataclass
class HttpAdapter:
    url: str
    proc: asyncio.subprocess.Process
    log: list[str]

    @property
    def base(self) -> str:
        return self.url.removesuffix("/mcp")


@contextlib.asynccontextmanager
async def _http_adapter(address: str, *args: str) -> AsyncIterator[HttpAdapter]:
    """`nexus-mcp --transport http --port 0 *args` (its stderr kept in `log`)."""
    proc = await asyncio.create_subprocess_exec(
        NEXUS_MCP, "--transport", "http", "--port", "0", "--poll-interval", "0.2", *args,
        env=_child_env(address), cwd=str(ROOT),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    log: list[str] = []
    url = ""
    with anyio.fail_after(WAIT):
        while not url:
            line = (await proc.stderr.readline()).decode()
            assert line, f"nexus-mcp exited ({proc.returncode}): {''.join(log)}"
            log.append(line)
            match = re.search(r"streamable HTTP on (http://\S+/mcp)", line)
            url = match.group(1) if match else ""

    async def drain() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.append(line.decode())

    reader = asyncio.create_task(drain())
    try:
        yield HttpAdapter(url, proc, log)
    finally:
        if proc.returncode is None:
            proc.terminate()
        with anyio.fail_after(WAIT):
            await proc.wait()
            await reader


@pytest.fixture
async def adapter(served: Served) -> AsyncIterator[HttpAdapter]:
    async with _http_adapter(
        served.address, "--authorization-server", ISSUER, "--log-level", "debug"
    ) as a:
        yield a


def _client(url: str, headers: dict[str, str] | None = None) -> Client:
    """The real MCP client over streamable HTTP, sending `headers` on every request."""
    transport = streamable_http_client(url, http_client=create_mcp_http_client(headers=headers))
    return Client(transport, read_timeout_seconds=WAIT)


async def _tool_names(url: str, headers: dict[str, str]) -> set[str]:
    async with _client(url, headers) as client:
        return {t.name for t in (await client.list_tools()).tools}


_INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}
_ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


# ---------------------------------------------------------------------------- unit


def test_credential_of_reads_one_credential() -> None:
    assert credential_of({}) is None
    bearer = credential_of({"authorization": "Bearer abc.def"})
    assert bearer is not None and bearer.metadata() == ("authorization", "Bearer abc.def")
    key = credential_of({"x-api-key": "k1"})
    assert key is not None and key.metadata() == ("x-api-key", "k1")
    # another scheme is no credential for this resource
    assert credential_of({"authorization": "Basic dXNlcjpwYXNz"}) is None
    with pytest.raises(CredentialError, match="not both"):
        credential_of({"authorization": "Bearer t", "x-api-key": "k"})
    with pytest.raises(CredentialError, match="empty"):
        credential_of({"authorization": "Bearer  "})


def test_nexus_serve_passes_the_authorization_servers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from nexus_server._mcp_process import McpProcess, authorization_servers_from_env

    monkeypatch.delenv("NEXUS_MCP_AUTHORIZATION_SERVER", raising=False)
    monkeypatch.delenv("NEXUS_JWT_ISSUER", raising=False)
    assert authorization_servers_from_env() == []
    monkeypatch.setenv("NEXUS_JWT_ISSUER", ISSUER)
    assert authorization_servers_from_env() == [ISSUER]
    monkeypatch.setenv("NEXUS_MCP_AUTHORIZATION_SERVER", "https://a.example, https://b.example")
    servers = authorization_servers_from_env()
    assert servers == ["https://a.example", "https://b.example"]
    command = McpProcess("127.0.0.1:1", authorization_servers=servers).command(tmp_path)
    flags = [command[i + 1] for i, a in enumerate(command) if a == "--authorization-server"]
    assert flags == servers
    assert "--authorization-server" not in McpProcess("127.0.0.1:1").command(tmp_path)


def test_a_bad_authorization_server_stops_the_adapter_at_start() -> None:
    import subprocess

    done = subprocess.run(
        [NEXUS_MCP, "--transport", "http", "--port", "0", "--authorization-server", "nope"],
        env=_child_env("127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode != 0
    assert "--authorization-server" in done.stderr and "URL" in done.stderr


# ---------------------------------------------------------------------------- HTTP


async def test_no_credential_is_401_with_the_resource_metadata(adapter: HttpAdapter) -> None:
    metadata_url = f"{adapter.base}/.well-known/oauth-protected-resource/mcp"
    async with httpx2.AsyncClient(timeout=WAIT) as http:
        bare = await http.post(adapter.url, json=_INIT, headers=_ACCEPT)
        assert bare.status_code == 401
        assert bare.headers["www-authenticate"] == f'Bearer resource_metadata="{metadata_url}"'

        bad = "not-a-valid-token-" + os.urandom(6).hex()
        for headers in ({"authorization": f"Bearer {bad}"}, {"x-api-key": bad}):
            refused = await http.post(adapter.url, json=_INIT, headers={**_ACCEPT, **headers})
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == (
                f'Bearer error="invalid_token", resource_metadata="{metadata_url}"'
            )
            assert refused.json()["error"] == "invalid_token"
            assert bad not in refused.text
        expired = _token("ann", "greeter", ttl=-3600)
        late = await http.post(
            adapter.url, json=_INIT, headers={**_ACCEPT, "authorization": f"Bearer {expired}"}
        )
        assert late.status_code == 401
        assert "CREDENTIALS_EXPIRED" in late.json()["error_description"]
        # the GET stream of a session is guarded as well
        stream = await http.get(adapter.url, headers={"accept": "text/event-stream"})
        assert stream.status_code == 401

        both = await http.post(
            adapter.url,
            json=_INIT,
            headers={**_ACCEPT, "authorization": "Bearer a", "x-api-key": "b"},
        )
        assert both.status_code == 400 and "not both" in both.json()["error_description"]

        # RFC 9728: the document at the URL the challenge names, and at the root
        for url in (metadata_url, f"{adapter.base}/.well-known/oauth-protected-resource"):
            got = await http.get(url)
            assert got.status_code == 200, url
            doc = ProtectedResourceMetadata.model_validate(got.json())
            assert str(doc.resource) == adapter.url
            assert [str(a) for a in doc.authorization_servers] == [ISSUER]
            assert doc.bearer_methods_supported == ["header"]
    # the real client without a credential cannot connect
    with anyio.fail_after(WAIT), pytest.raises(Exception):  # noqa: B017 (the SDK's own error)
        async with _client(adapter.url) as client:
            await client.list_tools()
    assert bad not in "".join(adapter.log)


async def test_bearer_token_and_api_key_are_accepted(served: Served) -> None:
    token = _token("ann", "greeter")
    async with _http_adapter(served.address, "--log-level", "debug") as adapter:
        for headers in (
            {"authorization": f"Bearer {token}"},
            {"x-api-key": OPS_KEY},
            {"authorization": f"Bearer {OPS_KEY}"},  # an API key sent as a bearer token
        ):
            with anyio.fail_after(WAIT):
                async with _client(adapter.url, headers) as client:
                    result = await client.call_tool("run_hello", {"who": "ann"})
                    assert not result.is_error, result.content
                    assert result.structured_content == {"greet": {"result": "hi ann"}}
    # the adapter's whole log (it has stopped), at DEBUG, and never a credential
    log = "".join(adapter.log)
    assert "DEBUG" in log
    assert token not in log and OPS_KEY not in log


async def test_tools_list_shows_what_the_principal_may_use(adapter: HttpAdapter) -> None:
    with anyio.fail_after(WAIT):
        greeter = await _tool_names(
            adapter.url, {"authorization": f"Bearer {_token('ann', 'greeter')}"}
        )
        admin = await _tool_names(adapter.url, {"x-api-key": OPS_KEY})
        reader = await _tool_names(
            adapter.url, {"authorization": f"Bearer {_token('rob', 'reader')}"}
        )
    assert greeter == {"run_hello"}
    assert {"run_hello", "run_secret", "notes_list", "notes_delete"} <= admin
    assert "run_secret" not in reader and "run_hello" not in reader
    assert "notes_list" in reader
    # a tool the caller cannot see is unknown to it, like one that does not exist
    with anyio.fail_after(WAIT):
        async with _client(
            adapter.url, {"authorization": f"Bearer {_token('ann', 'greeter')}"}
        ) as client:
            hidden = await client.call_tool("run_secret", {})
            missing = await client.call_tool("run_nothing_here", {})
    assert hidden.is_error and missing.is_error
    assert hidden.content[0].text.startswith("unknown tool 'run_secret'")  # type: ignore[union-attr]
    assert "run_secret" not in missing.content[0].text  # type: ignore[union-attr]


def _audited(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The audit trail's log lines so far."""
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "nexus.audit"]


async def test_a_refused_permission_is_an_error_result(
    adapter: HttpAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nexus.audit")
    with anyio.fail_after(WAIT):
        async with _client(adapter.url, {"x-api-key": OPS_KEY}) as admin:
            made = await admin.call_tool("notes_create", {"id": "n1", "text": "keep me"})
            assert not made.is_error, made.content
        reader = {"authorization": f"Bearer {_token('rob', 'reader')}"}
        async with _client(adapter.url, reader) as client:
            got = await client.call_tool("notes_get", {"id": "n1"})
            assert not got.is_error and got.structured_content["text"] == "keep me"
            refused = await client.call_tool("notes_delete", {"id": "n1"})
        async with _client(adapter.url, {"x-api-key": OPS_KEY}) as admin:
            count = await admin.call_tool("notes_count", {})
    assert refused.is_error
    text = refused.content[0].text  # type: ignore[union-attr]
    assert text.startswith("PERMISSION_DENIED"), text
    assert "model:Note:delete" in text
    assert count.structured_content == {"count": "1"}  # nothing was deleted
    # the calls came through the MCP channel, each as its own caller
    entries = {(e["principal"], e["code"], e["channel"]) for e in _audited(caplog)}
    assert ("key:ops", "OK", "mcp") in entries
    assert ("jwt:rob", "PERMISSION_DENIED", "mcp") in entries


async def test_a_session_belongs_to_its_principal(adapter: HttpAdapter) -> None:
    async with httpx2.AsyncClient(timeout=WAIT) as http:
        ann = {**_ACCEPT, "authorization": f"Bearer {_token('ann', 'greeter')}"}
        opened = await http.post(adapter.url, json=_INIT, headers=ann)
        assert opened.status_code == 200, opened.text
        session = opened.headers["mcp-session-id"]
        listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
        version = {"mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
        await http.post(
            adapter.url,
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            headers={**ann, **version},
        )
        own = await http.post(adapter.url, json=listing, headers={**ann, **version})
        assert own.status_code == 200 and "run_hello" in own.text
        other = {**_ACCEPT, "authorization": f"Bearer {_token('bob', 'greeter')}", **version}
        stolen = await http.post(adapter.url, json=listing, headers=other)
        assert stolen.status_code == 404
        assert "run_hello" not in stolen.text


async def test_a_revoked_key_is_refused_on_its_next_request(
    served: Served, adapter: HttpAdapter
) -> None:
    """Nothing is cached past a request: a managed key revoked while its session is open
    is refused on the session's next request."""
    from nexus_api.nexus.auth.v1 import auth_service_pb2 as a
    from nexus_api.nexus.auth.v1 import auth_service_pb2_grpc as ag

    async with grpc.aio.insecure_channel(served.address) as channel:
        keys = ag.AuthServiceStub(channel)  # type: ignore[no-untyped-call]
        ops = (("x-api-key", OPS_KEY),)
        made = await keys.CreateApiKey(
            a.CreateApiKeyRequest(name="greeter_bot", roles=["greeter"]), metadata=ops
        )
        with anyio.fail_after(WAIT):
            async with _client(adapter.url, {"x-api-key": made.key}) as client:
                first = await client.call_tool("run_hello", {"who": "a"})
                assert not first.is_error, first.content
                await keys.RevokeApiKey(a.RevokeApiKeyRequest(name="greeter_bot"), metadata=ops)
                with pytest.raises(Exception):  # noqa: B017 (the transport's error for a 401)
                    await client.call_tool("run_hello", {"who": "b"})
    assert made.key not in "".join(adapter.log)


# ---------------------------------------------------------------------------- stdio


def _stdio(address: str, **env: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=NEXUS_MCP,
        args=["--poll-interval", "0.2"],
        env=_child_env(address, **env),
        cwd=str(ROOT),
    )


async def test_stdio_uses_the_environments_credential(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nexus.audit")
    with anyio.fail_after(WAIT):
        async with Client(_stdio(served.address, NEXUS_API_KEY=OPS_KEY)) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"run_hello", "run_secret", "notes_create"} <= names
            made = await client.call_tool("notes_create", {"id": "s1"})
            assert not made.is_error, made.content
        created = [e for e in _audited(caplog) if e["method"].endswith("/CreateRecord")]
        assert [(e["principal"], e["channel"], e["code"]) for e in created] == [
            ("key:ops", "mcp", "OK")
        ]
        token = _token("ann", "greeter")
        async with Client(_stdio(served.address, NEXUS_TOKEN=token)) as client:
            assert {t.name for t in (await client.list_tools()).tools} == {"run_hello"}
            ran = await client.call_tool("run_hello", {"who": "env"})
            assert ran.structured_content == {"greet": {"result": "hi env"}}
        async with Client(_stdio(served.address)) as client:
            with pytest.raises(MCPError, match="UNAUTHENTICATED"):
                await client.list_tools()


async def test_stdio_watches_for_changes_with_its_credential(served: Served) -> None:
    """The adapter's polling sends the environment's credential too: a workflow
    registered over the network is announced (`tools/list_changed`)."""
    from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
    from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg

    definition = w.WorkflowDefinition(description="Added over the network.")
    definition.nodes.add(id="list", type="NoteListNode").params.update({"limit": 1})
    ops = (("x-api-key", OPS_KEY),)
    async with (
        grpc.aio.insecure_channel(served.address) as channel,
        Client(_stdio(served.address, NEXUS_API_KEY=OPS_KEY), read_timeout_seconds=WAIT) as client,
    ):
        with anyio.fail_after(WAIT):
            assert "run_added" not in {t.name for t in (await client.list_tools()).tools}
            async with client.listen(tools_list_changed=True) as sub:
                await wg.WorkflowServiceStub(channel).RegisterWorkflow(  # type: ignore[no-untyped-call]
                    w.RegisterWorkflowRequest(name="added", definition=definition), metadata=ops
                )
                await sub.__anext__()
            assert "run_added" in {t.name for t in (await client.list_tools()).tools}


# ---------------------------------------------------------------------------- auth off


async def test_auth_off_is_unchanged(auth_env: None, tmp_path: Path) -> None:
    async with (
        _serve(tmp_path, auth=False) as served,
        _http_adapter(served.address) as adapter,
    ):
        with anyio.fail_after(WAIT):
            async with _client(adapter.url) as client:
                names = {t.name for t in (await client.list_tools()).tools}
                assert {"run_hello", "run_secret", "notes_create"} <= names
                result = await client.call_tool("run_hello", {"who": "x"})
                assert not result.is_error, result.content
            async with httpx2.AsyncClient(timeout=WAIT) as http:
                # no authorization server configured: no metadata document
                got = await http.get(f"{adapter.base}/.well-known/oauth-protected-resource")
                assert got.status_code == 404
