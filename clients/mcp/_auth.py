"""`nexus-mcp` over HTTP as an OAuth 2.1 resource server (the MCP authorization spec).

The adapter checks no credential itself and holds none: the Nexus server decides. For
each HTTP request to the MCP endpoint, `ResourceServer` reads the caller's credential
(`Authorization: Bearer ...` or `X-API-Key`) and asks the server who it is
(`AuthService.GetPrincipal`, one call per request, so a revoked key is refused on its
next request). When the server's authentication is on and it refuses the credential, the
request is answered 401 with `WWW-Authenticate: Bearer resource_metadata="..."`, which is
how an MCP client discovers the authorization server (RFC 9728, served at
`/.well-known/oauth-protected-resource/mcp` and `/.well-known/oauth-protected-resource`).
Otherwise the request goes on to the MCP transport, and every gRPC call made for it
carries exactly that credential (`Adapter` reads it from the request, see `_server.py`).

With the server's authentication off, nothing here is in the way: GetPrincipal answers
for anyone. When the server cannot be reached (or predates AuthService), requests go on
as well: every tool call then fails or succeeds on the server's own check.

A session (`Mcp-Session-Id`) belongs to the principal that opened it: another principal
presenting its id gets 404, as for an unknown session, so it can neither read that
session's stream nor learn that it exists.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
from mcp.shared.auth import ProtectedResourceMetadata
from pydantic import AnyHttpUrl, ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._grpc import CREDENTIAL, ApiFailure, Credential

if TYPE_CHECKING:
    from nexus_api.nexus.auth.v1 import auth_service_pb2

__all__ = [
    "METADATA_PATH",
    "CredentialError",
    "ResourceServer",
    "credential_of",
    "protected_resource_metadata",
]

log = logging.getLogger("nexus.mcp")

#: The RFC 9728 well-known path; the resource's own path is appended to it.
METADATA_PATH = "/.well-known/oauth-protected-resource"
#: Sessions remembered with their principal (the oldest are forgotten first).
_MAX_BOUND_SESSIONS = 10_000
#: Longest server message quoted in a 401 body.
_MAX_DESCRIPTION = 200


class CredentialError(ValueError):
    """The request's credential headers cannot be read as one credential."""


def credential_of(headers: Mapping[str, str]) -> Credential | None:
    """The credential an HTTP request carries: `Authorization: Bearer <token>` (a JWT, or
    an API key sent as a bearer token: passed on unchanged, the server tells them apart)
    or `X-API-Key: <key>`; None without either. An `Authorization` header of another
    scheme is not a credential for this resource and is ignored.

    Raises:
        CredentialError: both headers are given, or the bearer token is empty.
    """
    auth = headers.get("authorization")
    key = headers.get("x-api-key")
    bearer: str | None = None
    if auth is not None:
        scheme, _, rest = auth.strip().partition(" ")
        if scheme.lower() == "bearer":
            bearer = rest.strip()
            if not bearer:
                raise CredentialError("Authorization: the Bearer token is empty")
    if bearer is not None and key is not None:
        raise CredentialError("send one credential: Authorization: Bearer or X-API-Key, not both")
    if bearer is not None:
        return Credential("token", bearer)
    if key is not None:
        if not key.strip():
            raise CredentialError("X-API-Key: the key is empty")
        return Credential("api_key", key.strip())
    return None


def protected_resource_metadata(
    resource: str, authorization_servers: Sequence[str]
) -> dict[str, Any]:
    """The RFC 9728 document of `resource`, validated by the `mcp` SDK's own model (the
    one its client parses), as JSON.

    Raises:
        ValueError: `resource` or an authorization server is not an http(s) URL, or
            there is no authorization server.
    """
    try:
        doc = ProtectedResourceMetadata(
            resource=AnyHttpUrl(resource),
            authorization_servers=[AnyHttpUrl(url) for url in authorization_servers],
            bearer_methods_supported=["header"],
            resource_name="Nexus MCP adapter",
        )
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"]) from None
    out: dict[str, Any] = doc.model_dump(mode="json", exclude_none=True)
    return out


def check_authorization_servers(urls: Sequence[str]) -> list[str]:
    """`urls` if each is an http(s) URL (checked at start, so a typo is not found by the
    first client that fails to sign in)."""
    for url in urls:
        try:
            protected_resource_metadata("http://127.0.0.1/mcp", [url])
        except ValueError as exc:
            raise ValueError(f"{url[:100]!r} is not an http(s) URL ({exc})") from None
    return list(urls)


class ResourceServer:
    """ASGI middleware in front of the MCP transport (see the module docstring).

    Args:
        app: the MCP streamable HTTP application.
        principal: asks the Nexus server who a credential is: returns the `Principal`
            message, or raises `grpc.RpcError`.
        authorization_servers: the authorization servers the metadata names; none: no
            metadata document (401s then carry no `resource_metadata`).
        resource_url: this resource's canonical URL (the one clients dial, e.g. behind
            a TLS proxy); None: read from each request (`http://<Host>/mcp`).
        path: the MCP endpoint's path.
    """

    def __init__(
        self,
        app: ASGIApp,
        principal: Any,
        *,
        authorization_servers: Sequence[str] = (),
        resource_url: str | None = None,
        path: str = "/mcp",
    ) -> None:
        self.app = app
        self._principal = principal
        self.authorization_servers = check_authorization_servers(authorization_servers)
        if resource_url is not None:
            try:
                protected_resource_metadata(resource_url, ["http://127.0.0.1/"])
            except ValueError as exc:
                raise ValueError(f"{resource_url[:100]!r} is not an http(s) URL ({exc})") from None
        self.resource_url = resource_url
        self.path = path
        self._sessions: OrderedDict[str, str] = OrderedDict()
        #: Whether the server authenticated callers at the last request (None: unknown).
        self.auth_enabled: bool | None = None

    # ------------------------------------------------------------------ URLs

    def _resource(self, scope: Scope) -> str:
        if self.resource_url is not None:
            return self.resource_url
        host = Headers(scope=scope).get("host")
        if not host:
            server = scope.get("server") or ("127.0.0.1", 0)
            host = f"{server[0]}:{server[1]}"
        return f"{scope.get('scheme', 'http')}://{host}{self.path}"

    def metadata_url(self, scope: Scope) -> str:
        """Where this resource's RFC 9728 metadata is: the well-known path inserted
        between the resource's origin and its path."""
        parts = urlsplit(self._resource(scope))
        return f"{parts.scheme}://{parts.netloc}{METADATA_PATH}{parts.path.rstrip('/')}"

    def _metadata_paths(self, scope: Scope) -> tuple[str, str]:
        path = urlsplit(self._resource(scope)).path.rstrip("/")
        return METADATA_PATH + path, METADATA_PATH

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in self._metadata_paths(scope):
            await self._serve_metadata(scope, send)
            return
        if path.rstrip("/") != self.path:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            credential = credential_of(headers)
        except CredentialError as exc:
            await _json(send, 400, {"error": "invalid_request", "error_description": str(exc)})
            return
        token = CREDENTIAL.set(credential)
        try:
            principal = await self._principal()
        except grpc.RpcError as exc:
            failure = ApiFailure.from_rpc_error(exc)
            if failure.code != "UNAUTHENTICATED":
                # the server is down, or predates AuthService: its own check on each
                # call decides (the adapter grants nothing by itself)
                await self.app(scope, receive, send)
                return
            self.auth_enabled = True
            await self._unauthorized(scope, send, credential is not None, failure)
            return
        finally:
            CREDENTIAL.reset(token)
        self.auth_enabled = bool(principal.auth_enabled)
        if not principal.auth_enabled:
            await self.app(scope, receive, send)
            return
        await self._bound(scope, receive, send, headers, principal)

    async def _bound(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: Headers,
        principal: auth_service_pb2.Principal,
    ) -> None:
        """Serve the request in the session of its own principal only."""
        session = headers.get("mcp-session-id")
        if session is not None:
            owner = self._sessions.get(session)
            if owner is not None and owner != principal.id:
                await _json(
                    send,
                    404,
                    {
                        "jsonrpc": "2.0",
                        "id": None,
                        "error": {"code": -32600, "message": "Session not found"},
                    },
                )
                return
            await self.app(scope, receive, send)
            return

        async def remember(message: Message) -> None:
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", ()):
                    if name.lower() == b"mcp-session-id":
                        self._sessions[value.decode("latin-1")] = principal.id
                        while len(self._sessions) > _MAX_BOUND_SESSIONS:
                            self._sessions.popitem(last=False)
            await send(message)

        await self.app(scope, receive, remember)

    async def _unauthorized(
        self, scope: Scope, send: Send, sent: bool, failure: ApiFailure
    ) -> None:
        params: list[str] = []
        if sent:
            params.append('error="invalid_token"')
        if self.authorization_servers:
            params.append(f'resource_metadata="{self.metadata_url(scope)}"')
        challenge = "Bearer " + ", ".join(params) if params else "Bearer"
        description = f"{failure.reason}: {failure.message}" if failure.reason else failure.message
        if len(description) > _MAX_DESCRIPTION:
            description = description[: _MAX_DESCRIPTION - 1] + "…"
        body = {"error": "invalid_token" if sent else "unauthorized"}
        body["error_description"] = description or "authentication required"
        await _json(send, 401, body, [(b"www-authenticate", challenge.encode("latin-1"))])

    async def _serve_metadata(self, scope: Scope, send: Send) -> None:
        if not self.authorization_servers:
            await _json(send, 404, {"error": "no authorization server is configured"})
            return
        if scope["method"] != "GET":
            await _json(send, 405, {"error": "only GET"}, [(b"allow", b"GET")])
            return
        doc = protected_resource_metadata(self._resource(scope), self.authorization_servers)
        await _json(send, 200, doc, [(b"cache-control", b"public, max-age=3600")])


async def _json(
    send: Send,
    status: int,
    doc: Mapping[str, Any],
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
