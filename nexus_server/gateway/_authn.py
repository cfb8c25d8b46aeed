"""Authentication: from a call's metadata to its `Principal`.

Credentials: `x-api-key: <key>`, or `authorization: Bearer <key or JWT>` (a JWT has three
dot-separated base64url parts; any other bearer value is taken for an API key). A call
carries at most one credential; two, a scheme other than Bearer, or a value that is not
printable ASCII or is too long, is CREDENTIALS_INVALID (never a guess at which one was
meant).

API keys are checked in this order: the configured ones (a dictionary of their SHA-256
digests, so no comparison runs over the key's characters), then the managed ones (one
database read per call: a revocation is seen on the next call).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from collections.abc import Sequence

from ._config import AuthConfig
from ._jwt import JwtVerifier
from ._keys import KEY_PREFIX, KeyStore
from ._principal import AuthError, Principal

__all__ = ["MAX_CREDENTIAL_LENGTH", "Authenticator"]

#: The longest credential header value accepted (a JWT with many claims fits).
MAX_CREDENTIAL_LENGTH = 8192

_JWT_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
_HEADERS = ("x-api-key", "authorization")


def _text(name: str, value: str | bytes) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            raise AuthError("CREDENTIALS_INVALID", f"the {name} header is not ASCII") from None
    if len(value) > MAX_CREDENTIAL_LENGTH:
        raise AuthError(
            "CREDENTIALS_INVALID",
            f"the {name} header is longer than {MAX_CREDENTIAL_LENGTH} characters",
        )
    if not _PRINTABLE.match(value):
        raise AuthError("CREDENTIALS_INVALID", f"the {name} header is not printable ASCII")
    return value


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Authenticator:
    """Turns a call's credential into a `Principal`.

    Args:
        config: the configured sources (API keys, JWT keys).
        keys: the managed keys' store (None: a server without a database).
        jwt: the JWT verifier (default: one for `config`).
    """

    def __init__(
        self, config: AuthConfig, keys: KeyStore | None = None, *, jwt: JwtVerifier | None = None
    ) -> None:
        self.config = config
        self.keys = keys
        self.jwt = jwt or JwtVerifier(config)
        self._configured: dict[bytes, Principal] = {
            _digest(spec.key): Principal(
                id=f"key:{name}", roles=spec.roles, tenant=spec.tenant, authentication="api_key"
            )
            for name, spec in config.api_keys.items()
        }

    async def authenticate(self, metadata: Sequence[tuple[str, str | bytes]]) -> Principal | None:
        """The principal of the call's credential; None when the call has none.

        Raises:
            AuthError: CREDENTIALS_INVALID (malformed, unknown, revoked, badly signed,
                claims not accepted) or CREDENTIALS_EXPIRED.
            JwksUnavailable: a JWT whose key is in a JWKS that cannot be fetched now (the
                gateway answers UNAVAILABLE).
        """
        found: str | None = None
        token: str | None = None
        for name, value in metadata:
            if name not in _HEADERS:
                continue
            if found is not None:
                raise AuthError(
                    "CREDENTIALS_INVALID",
                    f"the call carries two credentials ({found} and {name}); send one",
                )
            found = name
            text = _text(name, value)
            if name == "x-api-key":
                token = text.strip()
            else:
                scheme, _, rest = text.strip().partition(" ")
                if scheme.lower() != "bearer":
                    raise AuthError(
                        "CREDENTIALS_INVALID",
                        "the authorization header must read 'Bearer <token or API key>'",
                    )
                token = rest.strip()
        if found is None:
            return None
        if not token:
            raise AuthError("CREDENTIALS_INVALID", f"the {found} header is empty")
        if found == "authorization" and _JWT_SHAPE.match(token):
            configured = self._configured.get(_digest(token))
            if configured is not None:
                return configured
            if not self.jwt.enabled:
                raise AuthError(
                    "CREDENTIALS_INVALID",
                    "the bearer token is a JWT and this server accepts none (no JWT key is "
                    "configured)",
                )
            return await self.jwt.verify(token)
        return await self._api_key(token)

    async def _api_key(self, key: str) -> Principal:
        configured = self._configured.get(_digest(key))
        if configured is not None:
            return configured
        if self.keys is not None and key.startswith(KEY_PREFIX):
            record = await self.keys.lookup(key)
            if record is not None:
                if record.revoke_time is not None:
                    raise AuthError("CREDENTIALS_INVALID", "the API key was revoked")
                if record.expired(_dt.datetime.now(_dt.UTC)):
                    raise AuthError("CREDENTIALS_EXPIRED", "the API key has expired")
                return Principal(
                    id=f"key:{record.name}",
                    roles=frozenset(record.roles),
                    tenant=record.tenant,
                    authentication="api_key",
                )
        raise AuthError("CREDENTIALS_INVALID", "the API key is not one this server knows")

    async def has_source(self) -> bool:
        """Whether any credential could be accepted: a configured source, or at least
        one managed key in force (the fail-closed start check)."""
        if self.config.sources():
            return True
        return self.keys is not None and await self.keys.count_active() > 0
