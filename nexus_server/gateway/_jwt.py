"""JWT verification with PyJWT: which key, which algorithm, which claims.

The algorithm is never the token's choice alone: each configured key accepts exactly
one (the HS256 secret only HS256, an RSA public key only RS256, a P-256 key only ES256,
a JWKS key the algorithm its `kty`/`crv`/`alg` says), and PyJWT is told that one. So
`alg: none` is refused, and so is an HS256 token "signed" with the RSA public key's PEM
as its secret (algorithm confusion). `exp` and `sub` are required; `nbf` and `iat` are
checked; `iss` and `aud` when configured (always with a JWKS URL). Clock skew: the
configuration's leeway (30 s by default).

A verified token is remembered until its `exp` (at most `CACHE_SIZE` of them), so a
client that sends the same token on every call pays a dictionary lookup, not a
signature check.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

import jwt
from jwt.types import Options

from ._config import AuthConfig
from ._principal import AuthError, Principal

__all__ = [
    "CACHE_SIZE",
    "JWKS_REFRESH_INTERVAL",
    "JWKS_TIMEOUT",
    "JwksCache",
    "JwksUnavailable",
    "JwtVerifier",
]

_log = logging.getLogger("nexus_server.gateway")

#: Verified tokens remembered (each until its `exp`).
CACHE_SIZE = 10_000
#: Seconds a JWKS fetch may take.
JWKS_TIMEOUT = 5.0
#: At most one JWKS fetch per this many seconds, however many unknown `kid`s arrive.
JWKS_REFRESH_INTERVAL = 10.0
#: The largest JWKS document read.
_MAX_JWKS_BYTES = 1 << 20
_MAX_SUBJECT = 200
_MAX_ROLES = 100
_MAX_ROLE = 128
_MAX_TENANT = 128

# asymmetric algorithms a JWKS key may carry (symmetric `oct` keys are never taken from
# a URL: a published secret is no secret)
_JWKS_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class JwksUnavailable(Exception):
    """The JWKS document could not be fetched and no key we hold verifies the token: the
    provider (or the way to it) is down, not the caller's credential wrong. The gateway
    answers UNAVAILABLE, so the client retries."""


class JwksCache:
    """The keys of one JWKS URL, by `kid`, fetched on first use and again when a token
    names a `kid` we do not hold (key rotation), at most once per `refresh_interval`
    seconds, so junk `kid`s cannot make us hammer the provider.

    Args:
        url: the JWKS document's http(s) URL.
        timeout: seconds one fetch may take.
        refresh_interval: the least time between two fetches.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = JWKS_TIMEOUT,
        refresh_interval: float = JWKS_REFRESH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self._clock = clock
        self._keys: dict[str | None, tuple[Any, str]] = {}
        self._fetched_at: float | None = None
        self._last_ok = False
        self._lock = asyncio.Lock()
        #: How many fetches were made (tests read it).
        self.fetches = 0

    async def key_for(self, kid: str | None, alg: str) -> tuple[Any, str]:
        """The key and algorithm for a token's `kid` (None: the document's only key).

        Raises:
            AuthError: CREDENTIALS_INVALID, the key is unknown (after a refetch when one
                is allowed) or is not for `alg`.
            JwksUnavailable: the document could not be fetched and no key held matches.
        """
        found = self._find(kid)
        if found is None:
            async with self._lock:
                found = self._find(kid)
                if found is None and self._may_fetch():
                    await self._fetch()
                    found = self._find(kid)
            if found is None:
                if not self._last_ok:
                    raise JwksUnavailable("the identity provider's JWKS could not be fetched")
                if kid is None:
                    message = "the token has no 'kid' header to choose a key of the JWKS by"
                else:
                    message = "the token's key id ('kid') is not in the provider's JWKS"
                raise AuthError("CREDENTIALS_INVALID", message)
        key_alg = found[1]
        if alg != key_alg:
            raise AuthError(
                "CREDENTIALS_INVALID",
                f"the token's algorithm {alg[:20]!r} is not its key's ({key_alg})",
            )
        return found

    def _find(self, kid: str | None) -> tuple[Any, str] | None:
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def _may_fetch(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self.refresh_interval

    async def _fetch(self) -> None:
        self._fetched_at = self._clock()
        self.fetches += 1
        try:
            document = await asyncio.to_thread(self._download)
            keys = _parse_jwks(document)
        except Exception as exc:
            self._last_ok = False
            # the URL is the operator's configuration, fine for the log; the reason only
            _log.warning("JWKS fetch from %s failed: %s", self.url, type(exc).__name__)
            return
        # a document without a usable key is the provider's fault, like a failed fetch
        self._last_ok = bool(keys)
        if keys:
            self._keys = keys
        else:
            _log.warning("the JWKS at %s has no usable key", self.url)

    def _download(self) -> Any:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            body = response.read(_MAX_JWKS_BYTES + 1)
        if len(body) > _MAX_JWKS_BYTES:
            raise ValueError("the JWKS document is larger than 1 MiB")
        return json.loads(body)


def _parse_jwks(document: Any) -> dict[str | None, tuple[Any, str]]:
    """kid -> (key, algorithm) of the usable asymmetric keys of a JWKS document."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str | None, tuple[Any, str]] = {}
    for entry in document["keys"]:
        if not isinstance(entry, Mapping) or entry.get("kty") == "oct":
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK.from_dict(dict(entry))
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue  # a key type PyJWT cannot use (or a broken entry): skip it
        alg = jwk.algorithm_name
        if alg not in _JWKS_ALGORITHMS:
            continue
        kid = entry.get("kid")
        keys[kid if isinstance(kid, str) else None] = (jwk.key, alg)
    return keys


class JwtVerifier:
    """Verifies JWTs against the configured keys and makes their principals.

    Args:
        config: the sources (`jwt_secret`, `jwt_public_key`, `jwks_url`), claims and
            leeway.
        jwks: the JWKS cache to use (default: one for `config.jwks_url`).
        now: wall-clock seconds, for the verified-token cache.
    """

    def __init__(
        self,
        config: AuthConfig,
        *,
        jwks: JwksCache | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._now = now
        self._secret = config.jwt_secret
        self._public_key: Any = None
        if config.jwt_public_key is not None:
            from cryptography.hazmat.primitives import serialization

            # parsed once: PyJWT would parse the PEM again for every token
            self._public_key = serialization.load_pem_public_key(config.jwt_public_key.encode())
        self._public_alg = config.jwt_algorithm
        if jwks is None and config.jwks_url is not None:
            jwks = JwksCache(config.jwks_url)
        self.jwks = jwks
        self._cache: dict[bytes, tuple[Principal, float]] = {}
        self._options: Options = {
            "require": ["exp", "sub"]
            + (["iss"] if config.jwt_issuer else [])
            + (["aud"] if config.jwt_audience else []),
            # without a configured audience there is nothing to check it against
            "verify_aud": config.jwt_audience is not None,
        }

    @property
    def enabled(self) -> bool:
        """Whether any JWT source is configured."""
        return self._secret is not None or self._public_key is not None or self.jwks is not None

    async def verify(self, token: str) -> Principal:
        """The principal of a valid token.

        Raises:
            AuthError: CREDENTIALS_EXPIRED for an expired token, CREDENTIALS_INVALID
                naming the check that failed for anything else.
            JwksUnavailable: the JWKS could not be fetched and no held key fits.
        """
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit[1] > self._now():
                return hit[0]
            del self._cache[digest]
        principal, exp = await self._verify(token)
        self._remember(digest, principal, exp)
        return principal

    def _remember(self, digest: bytes, principal: Principal, exp: float) -> None:
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            now = self._now()
            for key in [k for k, (_, e) in cache.items() if e <= now]:
                del cache[key]
            if len(cache) >= CACHE_SIZE:
                # the oldest tenth goes at once, so a full cache is not scanned per token
                for key in list(itertools.islice(cache, CACHE_SIZE // 10)):
                    del cache[key]
        cache[digest] = (principal, exp)

    async def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("CREDENTIALS_INVALID", "the token is not a well-formed JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthError("CREDENTIALS_INVALID", "the token has no 'alg' header")
        if alg.lower() == "none":
            raise AuthError("CREDENTIALS_INVALID", "unsigned tokens (alg 'none') are refused")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("CREDENTIALS_INVALID", "the token's 'kid' header is not a string")
        key: Any
        if alg == "HS256" and self._secret is not None:
            key = self._secret
        elif self._public_alg == alg and (kid is None or self.jwks is None):
            key = self._public_key
        elif self.jwks is not None and alg in _JWKS_ALGORITHMS:
            key, _ = await self.jwks.key_for(kid, alg)
        else:
            raise AuthError(
                "CREDENTIALS_INVALID",
                f"the token's algorithm {alg[:20]!r} is not accepted by this server "
                f"(accepted: {', '.join(self._accepted()) or 'none'})",
            )
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.config.jwt_audience,
                issuer=self.config.jwt_issuer,
                leeway=self.config.leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("CREDENTIALS_EXPIRED", "the token has expired (exp)") from None
        except jwt.PyJWTError as exc:
            raise AuthError("CREDENTIALS_INVALID", _reason(exc)) from None
        return self._principal(claims), float(claims["exp"])

    def _accepted(self) -> list[str]:
        found = []
        if self._secret is not None:
            found.append("HS256")
        if self._public_alg is not None:
            found.append(self._public_alg)
        if self.jwks is not None:
            found.append("the JWKS keys' algorithms")
        return found

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUBJECT or _CONTROL.search(sub):
            raise AuthError(
                "CREDENTIALS_INVALID",
                f"the token's 'sub' must be a string of 1 to {_MAX_SUBJECT} characters "
                "without control characters",
            )
        name = self.config.roles_claim
        raw = claims.get(name, [])
        if isinstance(raw, str):
            raw = raw.split()
        if not isinstance(raw, list) or not all(
            isinstance(r, str) and 0 < len(r) <= _MAX_ROLE for r in raw
        ):
            raise AuthError(
                "CREDENTIALS_INVALID",
                f"the token's {name[:60]!r} claim must be a list of role names or a "
                "space-separated string",
            )
        if len(raw) > _MAX_ROLES:
            raise AuthError(
                "CREDENTIALS_INVALID",
                f"the token's {name[:60]!r} claim has over {_MAX_ROLES} roles",
            )
        tname = self.config.tenant_claim
        tenant = claims.get(tname)
        if tenant is not None and (
            not isinstance(tenant, str)
            or not tenant
            or len(tenant) > _MAX_TENANT
            or "\x00" in tenant
        ):
            raise AuthError(
                "CREDENTIALS_INVALID",
                f"the token's {tname[:60]!r} claim must be a string of 1 to {_MAX_TENANT} "
                "characters",
            )
        return Principal(id=f"jwt:{sub}", roles=frozenset(raw), tenant=tenant, authentication="jwt")


def _reason(exc: jwt.PyJWTError) -> str:
    """Which check failed, in words that never quote the token."""
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token has no {exc.claim!r} claim"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "the token is not valid yet (nbf or iat is in the future)"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "the token's issuer (iss) is not the one this server accepts"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "the token's audience (aud) does not name this server"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the token's signature does not verify"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "the token's algorithm is not accepted for its key"
    if isinstance(exc, jwt.InvalidKeyError):
        return "the token's key is not usable for its algorithm"
    if isinstance(exc, jwt.exceptions.InvalidSubjectError):
        return "the token's 'sub' claim is not a string"
    if isinstance(exc, jwt.InvalidIssuedAtError):
        return "the token's 'iat' claim is not a number"
    if isinstance(exc, jwt.DecodeError):
        return "the token is not a well-formed JWT"
    # InvalidJTIError, ...: claims of the wrong type; PyJWT's words name the claim and
    # never the token
    return f"the token's claims are not accepted: {str(exc)[:120]}"
