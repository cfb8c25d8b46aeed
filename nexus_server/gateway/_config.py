"""Where credentials come from: `AuthConfig`, from code and from the environment.

Sources, any number of them at once:

- API keys given in code (`api_keys`), or by the operator as `NEXUS_API_KEY_<NAME>=<key>`
  environment variables. An environment key is the operator's root credential: its
  principal is `key:<name lowercased>` with the role `admin`. (`NEXUS_API_KEY` without a
  name is the clients' credential variable, not a server key.)
- `NEXUS_JWT_SECRET`: HS256 tokens signed with a shared secret (at least 32 bytes).
- `NEXUS_JWT_PUBLIC_KEY`: RS256 or ES256 tokens verified with one PEM public key (the
  algorithm follows the key: RSA is RS256, an EC P-256 key is ES256).
- `NEXUS_JWKS_URL` with `NEXUS_JWT_ISSUER` and `NEXUS_JWT_AUDIENCE`: tokens of an OIDC
  provider, verified with the keys its JWKS document publishes.

API keys the server manages (`nexus keys create`) live in its database, not here.

Every configuration error is a `ValueError` of one line naming the option or variable
and the reason, never the secret value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._principal import ADMIN

__all__ = [
    "DEFAULT_LEEWAY",
    "ENV_KEY_PREFIX",
    "MIN_API_KEY_LENGTH",
    "MIN_JWT_SECRET_BYTES",
    "ApiKeySpec",
    "AuthConfig",
]

#: Environment variables `NEXUS_API_KEY_<NAME>` each give one API key.
ENV_KEY_PREFIX = "NEXUS_API_KEY_"
#: The shortest API key accepted from configuration (a guessable key is no key).
MIN_API_KEY_LENGTH = 16
#: The longest API key accepted (it travels in a header).
MAX_API_KEY_LENGTH = 512
#: The shortest HS256 secret (RFC 7518 section 3.2: at least the hash's size).
MIN_JWT_SECRET_BYTES = 32
#: Seconds of clock skew allowed on `exp`, `nbf` and `iat` by default.
DEFAULT_LEEWAY = 30.0

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,59}$")
_ROLE = re.compile(r"^[a-z][a-z0-9_-]{0,59}$")
_CLAIM = re.compile(r"^[A-Za-z0-9_:./-]{1,128}$")
# printable ASCII without space: what fits a header value unchanged
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")
_MAX_TENANT = 128


@dataclass(frozen=True, slots=True)
class ApiKeySpec:
    """An API key given in configuration.

    Attributes:
        key: the key itself (at least 16 printable ASCII characters, no spaces).
        roles: the roles it grants (`admin` by default: configured keys are the
            operator's).
        tenant: the tenant of its calls, or None.
    """

    key: str
    roles: frozenset[str] = frozenset({ADMIN})
    tenant: str | None = None

    def __repr__(self) -> str:  # the key never shows in a log or a traceback
        return f"ApiKeySpec(key=<hidden>, roles={sorted(self.roles)!r}, tenant={self.tenant!r})"


def _check_key(key: object, where: str) -> None:
    if not isinstance(key, str):
        raise ValueError(f"{where}: an API key must be a string")
    if len(key) < MIN_API_KEY_LENGTH:
        raise ValueError(
            f"{where}: the API key is {len(key)} characters long; at least "
            f"{MIN_API_KEY_LENGTH} (use a random one: python -c "
            f"'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if len(key) > MAX_API_KEY_LENGTH:
        raise ValueError(f"{where}: the API key is longer than {MAX_API_KEY_LENGTH} characters")
    if not _KEY_CHARS.match(key):
        raise ValueError(
            f"{where}: the API key may hold only printable ASCII characters without spaces"
        )


def _check_tenant(tenant: object, where: str) -> None:
    if tenant is None:
        return
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"{where}: the tenant must be a non-empty string or None")
    if len(tenant) > _MAX_TENANT or "\x00" in tenant:
        raise ValueError(f"{where}: the tenant must be at most {_MAX_TENANT} characters, no NUL")


def _check_roles(roles: object, where: str) -> frozenset[str]:
    if isinstance(roles, str) or not isinstance(roles, Iterable):
        raise ValueError(f"{where}: roles must be a collection of role names")
    out = frozenset(roles)
    if not out:
        raise ValueError(f"{where}: at least one role is needed")
    for role in out:
        if not isinstance(role, str) or not _ROLE.match(role):
            raise ValueError(
                f"{where}: role {str(role)[:60]!r} is not lower case letters, digits, "
                "'_' and '-' (starting with a letter, at most 60 characters)"
            )
    return out


def public_key_algorithm(pem: str, where: str) -> str:
    """The JWS algorithm a PEM public key verifies: RS256 for RSA (2048 bits at least),
    ES256 for an EC key on P-256. Anything else is a ValueError naming `where`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnicodeEncodeError):
        raise ValueError(
            f"{where}: not a PEM public key (expected '-----BEGIN PUBLIC KEY-----')"
        ) from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"{where}: the RSA key has {key.key_size} bits; at least 2048")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"{where}: the EC key is on {key.curve.name}; ES256 needs P-256")
        return "ES256"
    raise ValueError(f"{where}: the key must be RSA (RS256) or EC P-256 (ES256)")


@dataclass(frozen=True)
class AuthConfig:
    """The credential sources of a server (see the module's documentation).

    Attributes:
        api_keys: name -> `ApiKeySpec`; the principal of each is `key:<name>`.
        jwt_secret: the HS256 secret (at least 32 bytes).
        jwt_public_key: a PEM public key (RSA: RS256; EC P-256: ES256).
        jwks_url: an OIDC provider's JWKS document (http or https); needs
            `jwt_issuer` and `jwt_audience`.
        jwt_issuer: the `iss` every token must carry, when set.
        jwt_audience: the audience every token must name in `aud`, when set.
        roles_claim: the claim holding a token's roles (a list of strings, or a
            space-separated string).
        tenant_claim: the claim holding a token's tenant (a string).
        leeway: seconds of clock skew allowed on `exp`, `nbf` and `iat`.
    """

    api_keys: Mapping[str, ApiKeySpec] = field(default_factory=dict)
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    roles_claim: str = "roles"
    tenant_claim: str = "tenant"
    leeway: float = DEFAULT_LEEWAY

    def __post_init__(self) -> None:
        keys: dict[str, ApiKeySpec] = {}
        seen: set[str] = set()
        for name, spec in dict(self.api_keys).items():
            where = f"api_keys[{str(name)[:60]!r}]"
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(
                    f"{where}: a key name is lower snake case (letters, digits, '_', "
                    "starting with a letter, at most 60 characters)"
                )
            if not isinstance(spec, ApiKeySpec):
                raise ValueError(f"{where}: expects an ApiKeySpec")
            _check_key(spec.key, where)
            _check_roles(spec.roles, where)
            _check_tenant(spec.tenant, where)
            if spec.key in seen:
                raise ValueError(f"{where}: the same key is configured under two names")
            seen.add(spec.key)
            keys[name] = spec
        object.__setattr__(self, "api_keys", MappingProxyType(keys))
        if self.jwt_secret is not None:
            _check_secret(self.jwt_secret, "jwt_secret")
        if self.jwt_public_key is not None:
            public_key_algorithm(self.jwt_public_key, "jwt_public_key")
        if self.jwks_url is not None:
            _check_jwks(self.jwks_url, self.jwt_issuer, self.jwt_audience, "jwks_url")
        for option in ("jwt_issuer", "jwt_audience"):
            value = getattr(self, option)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{option}: expects a non-empty string")
        for option in ("roles_claim", "tenant_claim"):
            value = getattr(self, option)
            if not isinstance(value, str) or not _CLAIM.match(value):
                raise ValueError(f"{option}: expects a claim name (letters, digits, _:./-)")
        leeway = self.leeway
        if isinstance(leeway, bool) or not isinstance(leeway, int | float) or leeway < 0:
            raise ValueError("leeway: expects a number of seconds, 0 or more")
        if leeway > 300:
            raise ValueError("leeway: at most 300 seconds (a larger skew keeps expired tokens)")

    def __repr__(self) -> str:
        return f"AuthConfig(sources={list(self.sources())!r})"

    @property
    def jwt_algorithm(self) -> str | None:
        """The algorithm of `jwt_public_key` (RS256 or ES256), None without one."""
        if self.jwt_public_key is None:
            return None
        return public_key_algorithm(self.jwt_public_key, "jwt_public_key")

    def sources(self) -> tuple[str, ...]:
        """The names of the configured credential sources (for logs and the fail-closed
        start check): `api_keys`, `jwt_secret`, `jwt_public_key`, `jwks_url`. Managed
        API keys are not configuration: `Authenticator.has_source` counts them."""
        found = []
        if self.api_keys:
            found.append("api_keys")
        for option in ("jwt_secret", "jwt_public_key", "jwks_url"):
            if getattr(self, option) is not None:
                found.append(option)
        return tuple(found)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> AuthConfig:
        """The configuration from `environ` (default: `os.environ`) merged with explicit
        `options` (the fields of `AuthConfig`); an explicit option that is not None wins
        over its variable. An explicit `api_keys` entry wins over an environment key of
        the same name.

        Variables: `NEXUS_API_KEY_<NAME>` (principal `key:<name lowercased>`, role
        `admin`), `NEXUS_JWT_SECRET`, `NEXUS_JWT_PUBLIC_KEY`, `NEXUS_JWKS_URL`,
        `NEXUS_JWT_ISSUER`, `NEXUS_JWT_AUDIENCE`. An empty variable counts as unset.

        Raises:
            ValueError: one line naming the variable or option and the reason.
        """
        env = os.environ if environ is None else environ
        unknown = set(options) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise TypeError(f"AuthConfig.from_env: unknown option(s) {sorted(unknown)}")
        keys: dict[str, ApiKeySpec] = {}
        for var in sorted(env):
            if not var.startswith(ENV_KEY_PREFIX):
                continue
            value = env[var]
            if not value:
                continue
            name = var[len(ENV_KEY_PREFIX) :].lower()
            if not _NAME.match(name):
                raise ValueError(
                    f"{var}: the name after {ENV_KEY_PREFIX} must be letters, digits and "
                    "'_', starting with a letter, at most 60 characters"
                )
            _check_key(value, var)
            keys[name] = ApiKeySpec(value)
        explicit_keys = options.pop("api_keys", None) or {}
        keys.update(explicit_keys)

        def pick(option: str, var: str) -> tuple[Any, str]:
            value = options.pop(option, None)
            if value is not None:
                return value, option
            return env.get(var) or None, var

        secret, secret_from = pick("jwt_secret", "NEXUS_JWT_SECRET")
        if secret is not None:
            _check_secret(secret, secret_from)
        public, public_from = pick("jwt_public_key", "NEXUS_JWT_PUBLIC_KEY")
        if public is not None:
            public_key_algorithm(public, public_from)
        jwks, jwks_from = pick("jwks_url", "NEXUS_JWKS_URL")
        issuer, _ = pick("jwt_issuer", "NEXUS_JWT_ISSUER")
        audience, _ = pick("jwt_audience", "NEXUS_JWT_AUDIENCE")
        if jwks is not None:
            _check_jwks(jwks, issuer, audience, jwks_from)
        rest = {k: v for k, v in options.items() if v is not None}
        return cls(
            api_keys=keys,
            jwt_secret=secret,
            jwt_public_key=public,
            jwks_url=jwks,
            jwt_issuer=issuer,
            jwt_audience=audience,
            **rest,
        )


def _check_secret(secret: object, where: str) -> None:
    if not isinstance(secret, str):
        raise ValueError(f"{where}: expects a string")
    size = len(secret.encode("utf-8"))
    if size < MIN_JWT_SECRET_BYTES:
        raise ValueError(
            f"{where}: the HS256 secret is {size} bytes long; at least {MIN_JWT_SECRET_BYTES}"
        )


def _check_jwks(url: object, issuer: object, audience: object, where: str) -> None:
    if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url):
        raise ValueError(f"{where}: expects an http:// or https:// URL")
    if not issuer or not audience:
        missing = [
            n for n, v in (("NEXUS_JWT_ISSUER", issuer), ("NEXUS_JWT_AUDIENCE", audience)) if not v
        ]
        raise ValueError(
            f"{where}: a JWKS URL needs the issuer and audience the tokens must carry; "
            f"set {' and '.join(missing)} (or the jwt_issuer/jwt_audience options)"
        )
