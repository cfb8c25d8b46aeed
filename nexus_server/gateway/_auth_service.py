"""AuthService: who the caller is, and the API keys the server manages.

No permission is checked here: the gateway chain requires `admin` for the key methods
before they run, and a valid credential for GetPrincipal.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Any, TypeAlias

from google.protobuf import timestamp_pb2

from nexus_api.nexus.auth.v1 import auth_service_pb2 as apb
from nexus_api.nexus.auth.v1 import auth_service_pb2_grpc as agrpc

from .._convert import page_size
from .._errors import ApiError, abort, brief
from ._authn import Authenticator
from ._keys import ApiKeyExistsError, ApiKeyNotFoundError, ApiKeyRecord, KeyStore
from ._principal import CURRENT_PRINCIPAL

__all__ = ["AuthServicer"]

# grpc ships no type information: its servicer context is Any to the type checker
Context: TypeAlias = Any

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,59}$")
_ROLE = re.compile(r"^[a-z][a-z0-9_-]{0,59}$")
_MAX_TENANT = 128
_MAX_ROLES = 100


def _timestamp(value: _dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _api_key_message(record: ApiKeyRecord) -> apb.ApiKey:
    msg = apb.ApiKey(
        name=record.name,
        roles=list(record.roles),
        tenant=record.tenant or "",
        prefix=record.prefix,
        creator=record.creator,
        create_time=_timestamp(record.create_time),
    )
    if record.expire_time is not None:
        msg.expire_time.CopyFrom(_timestamp(record.expire_time))
    if record.revoke_time is not None:
        msg.revoke_time.CopyFrom(_timestamp(record.revoke_time))
    return msg


def _check_name(name: str) -> None:
    if not name:
        raise ApiError("REQUEST_INVALID", "name is required", [("name", "required")])
    if not _NAME.match(name):
        raise ApiError(
            "REQUEST_INVALID",
            f"name {brief(name)} is not lower snake case (letters, digits and '_', starting "
            "with a letter, at most 60 characters)",
            [("name", "not lower snake case, at most 60 characters")],
        )


class AuthServicer(agrpc.AuthServiceServicer):
    """Implements nexus.auth.v1.AuthService.

    Args:
        authenticator: the server's authenticator (its configured key names are
            reserved: a managed key may not take one).
        keys: the managed keys' store; None on a server without a database (the key
            methods then fail with FAILED_PRECONDITION / API_KEYS_UNAVAILABLE).
        auth_enabled: whether the server authenticates callers.
    """

    def __init__(
        self, authenticator: Authenticator | None, keys: KeyStore | None, auth_enabled: bool
    ) -> None:
        self.authenticator = authenticator
        self.keys = keys
        self.auth_enabled = auth_enabled

    def _store(self) -> KeyStore:
        if self.keys is None:
            raise ApiError(
                "API_KEYS_UNAVAILABLE",
                "this server keeps no API keys: it has no database (start it with a "
                "DataFlow database to manage keys)",
            )
        return self.keys

    async def GetPrincipal(
        self, request: apb.GetPrincipalRequest, context: Context
    ) -> apb.Principal:
        try:
            principal = CURRENT_PRINCIPAL.get()
            if principal is None:
                if self.auth_enabled:
                    raise ApiError("CREDENTIALS_MISSING", "the call carries no credential")
                return apb.Principal(id="anonymous", authentication="none", auth_enabled=False)
            return apb.Principal(
                id=principal.id,
                roles=sorted(principal.roles),
                tenant=principal.tenant or "",
                authentication=principal.authentication,
                auth_enabled=self.auth_enabled,
            )
        except Exception as exc:
            await abort(context, exc)

    async def CreateApiKey(
        self, request: apb.CreateApiKeyRequest, context: Context
    ) -> apb.CreateApiKeyResponse:
        try:
            store = self._store()
            name = request.name
            _check_name(name)
            roles = list(request.roles)
            if not roles:
                raise ApiError(
                    "REQUEST_INVALID",
                    "roles: at least one role is required",
                    [("roles", "at least one role is required")],
                )
            if len(roles) > _MAX_ROLES:
                raise ApiError(
                    "REQUEST_INVALID",
                    f"roles: at most {_MAX_ROLES} roles",
                    [("roles", f"more than {_MAX_ROLES} roles")],
                )
            bad = [(i, r) for i, r in enumerate(roles) if not _ROLE.match(r)]
            if bad:
                raise ApiError(
                    "REQUEST_INVALID",
                    f"roles[{bad[0][0]}]: {brief(bad[0][1])} is not a role name (lower case "
                    "letters, digits, '_' and '-', starting with a letter, at most 60 "
                    "characters)",
                    [(f"roles[{i}]", "not a role name") for i, _ in bad[:20]],
                )
            tenant = request.tenant
            if len(tenant) > _MAX_TENANT or "\x00" in tenant:
                raise ApiError(
                    "REQUEST_INVALID",
                    f"tenant: at most {_MAX_TENANT} characters, without NUL",
                    [("tenant", f"longer than {_MAX_TENANT} characters or contains NUL")],
                )
            expire: _dt.datetime | None = None
            if request.HasField("expire_time"):
                expire = request.expire_time.ToDatetime(tzinfo=_dt.UTC)
                if expire <= _dt.datetime.now(_dt.UTC):
                    raise ApiError(
                        "REQUEST_INVALID",
                        "expire_time must be in the future",
                        [("expire_time", "not in the future")],
                    )
            if self.authenticator is not None and name in self.authenticator.config.api_keys:
                raise ApiError(
                    "API_KEY_ALREADY_EXISTS",
                    f"the server's configuration has an API key named {name!r}",
                    metadata={"api_key": name},
                )
            principal = CURRENT_PRINCIPAL.get()
            creator = principal.id if principal is not None else "anonymous"
            try:
                record, key = await store.create(name, roles, tenant or None, expire, creator)
            except ApiKeyExistsError:
                raise ApiError(
                    "API_KEY_ALREADY_EXISTS",
                    f"an API key named {name!r} exists (revoke it first to reuse the name)",
                    metadata={"api_key": name},
                ) from None
            return apb.CreateApiKeyResponse(api_key=_api_key_message(record), key=key)
        except Exception as exc:
            await abort(context, exc)

    async def ListApiKeys(
        self, request: apb.ListApiKeysRequest, context: Context
    ) -> apb.ListApiKeysResponse:
        try:
            store = self._store()
            size = page_size(request.page_size)
            records, token = await store.list(size, request.page_token, request.show_revoked)
            return apb.ListApiKeysResponse(
                api_keys=[_api_key_message(r) for r in records], next_page_token=token
            )
        except Exception as exc:
            await abort(context, exc)

    async def RevokeApiKey(self, request: apb.RevokeApiKeyRequest, context: Context) -> apb.ApiKey:
        try:
            store = self._store()
            name = request.name
            if not name:
                raise ApiError("REQUEST_INVALID", "name is required", [("name", "required")])
            if not _NAME.match(name):
                raise ApiError(
                    "API_KEY_NOT_FOUND",
                    f"no API key is named {brief(name)}",
                    metadata={"api_key": name[:60]},
                )
            try:
                record = await store.revoke(name)
            except ApiKeyNotFoundError:
                raise ApiError(
                    "API_KEY_NOT_FOUND",
                    f"no API key is named {name!r}",
                    metadata={"api_key": name},
                ) from None
            return _api_key_message(record)
        except Exception as exc:
            await abort(context, exc)
