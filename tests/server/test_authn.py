"""Authentication pieces, each with real things: the configuration from the environment,
JWT verification with real keys (HS256, RS256, ES256, a JWKS server on 127.0.0.1), and
the authenticator over configured API keys. Managed keys: test_api_keys.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from nexus_server.gateway import AuthError, Principal
from nexus_server.gateway._authn import MAX_CREDENTIAL_LENGTH, Authenticator
from nexus_server.gateway._config import ApiKeySpec, AuthConfig
from nexus_server.gateway._jwt import JwksCache, JwksUnavailable, JwtVerifier

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cret-for-tests-" + "x" * 24  # 41 bytes
ROOT_KEY = "root-key-0123456789abcdef"
ISSUER = "https://idp.test"
AUDIENCE = "nexus-api"


# --- keys -----------------------------------------------------------------------------


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "exp": now + 600, "iat": now, "roles": ["reader"]}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    """A token made by hand (what an attacker would send), signed by `sign`."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(payload).encode())
    return head + "." + _b64(sign(head.encode()))


async def refused(
    verify: Callable[[str], Any], token: str, reason: str = "CREDENTIALS_INVALID"
) -> str:
    """Asserts `verify(token)` fails with `reason`; returns the message, which must not
    contain the token nor any of its parts."""
    with pytest.raises(AuthError) as info:
        await verify(token)
    assert info.value.reason == reason, info.value.message
    message = info.value.message
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in message
    assert SECRET not in message
    return message


# --- configuration --------------------------------------------------------------------


def test_env_api_keys_are_admin_keys_named_by_the_variable() -> None:
    config = AuthConfig.from_env({"NEXUS_API_KEY_OPS_TEAM": ROOT_KEY, "NEXUS_API_KEY": "x"})
    assert set(config.api_keys) == {"ops_team"}
    spec = config.api_keys["ops_team"]
    assert spec.key == ROOT_KEY and spec.roles == {"admin"} and spec.tenant is None
    assert config.sources() == ("api_keys",)
    assert ROOT_KEY not in repr(config) and ROOT_KEY not in repr(spec)


@pytest.mark.parametrize(
    ("environ", "names"),
    [
        ({"NEXUS_API_KEY_OPS": "short-key"}, "NEXUS_API_KEY_OPS"),
        ({"NEXUS_API_KEY_OPS": "has a space in it!!"}, "NEXUS_API_KEY_OPS"),
        ({"NEXUS_API_KEY_9X": ROOT_KEY}, "NEXUS_API_KEY_9X"),
        ({"NEXUS_JWT_SECRET": "too-short-secret"}, "NEXUS_JWT_SECRET"),
        ({"NEXUS_JWT_PUBLIC_KEY": "not a pem"}, "NEXUS_JWT_PUBLIC_KEY"),
        ({"NEXUS_JWKS_URL": "https://idp.test/jwks"}, "NEXUS_JWT_ISSUER and NEXUS_JWT_AUDIENCE"),
        (
            {"NEXUS_JWKS_URL": "https://idp.test/jwks", "NEXUS_JWT_ISSUER": ISSUER},
            "NEXUS_JWT_AUDIENCE",
        ),
        ({"NEXUS_JWKS_URL": "file:///etc/passwd"}, "NEXUS_JWKS_URL"),
    ],
)
def test_config_errors_name_the_variable_never_the_value(
    environ: dict[str, str], names: str
) -> None:
    with pytest.raises(ValueError) as info:
        AuthConfig.from_env(environ)
    message = str(info.value)
    assert names in message and "\n" not in message
    for value in environ.values():
        if "://" not in value:
            assert value not in message


def test_explicit_options_win_over_the_environment() -> None:
    other = "another-secret-that-is-long-enough-000"
    config = AuthConfig.from_env(
        {"NEXUS_JWT_SECRET": SECRET, "NEXUS_API_KEY_OPS": ROOT_KEY},
        jwt_secret=other,
        api_keys={"ops": ApiKeySpec("explicit-key-0123456789", frozenset({"reader"}))},
        leeway=5,
    )
    assert config.jwt_secret == other and config.leeway == 5
    assert config.api_keys["ops"].key == "explicit-key-0123456789"
    # an explicit value is checked under its option's name
    with pytest.raises(ValueError, match=r"^jwt_secret:"):
        AuthConfig.from_env({}, jwt_secret="short")


def test_public_key_algorithm_follows_the_key(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    assert AuthConfig(jwt_public_key=_pem(rsa_key)).jwt_algorithm == "RS256"
    assert AuthConfig(jwt_public_key=_pem(ec_key)).jwt_algorithm == "ES256"
    p384 = _pem(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ValueError, match="P-256"):
        AuthConfig.from_env({"NEXUS_JWT_PUBLIC_KEY": p384})


def test_sources_and_empty_config() -> None:
    assert AuthConfig().sources() == ()
    assert AuthConfig.from_env({}).sources() == ()
    config = AuthConfig.from_env(
        {
            "NEXUS_JWT_SECRET": SECRET,
            "NEXUS_JWKS_URL": "http://127.0.0.1:1/jwks",
            "NEXUS_JWT_ISSUER": ISSUER,
            "NEXUS_JWT_AUDIENCE": AUDIENCE,
        }
    )
    assert config.sources() == ("jwt_secret", "jwks_url")
    assert SECRET not in repr(config)


def test_explicit_config_is_checked() -> None:
    with pytest.raises(ValueError, match=r"^api_keys\['ops'\]: the API key is 5"):
        AuthConfig(api_keys={"ops": ApiKeySpec("short")})
    with pytest.raises(ValueError, match="role"):
        AuthConfig(api_keys={"ops": ApiKeySpec(ROOT_KEY, frozenset({"Bad Role"}))})
    with pytest.raises(ValueError, match="two names"):
        AuthConfig(api_keys={"a": ApiKeySpec(ROOT_KEY), "b": ApiKeySpec(ROOT_KEY)})
    with pytest.raises(ValueError, match=r"^leeway"):
        AuthConfig(leeway=-1)


# --- JWT: one key ---------------------------------------------------------------------


async def test_hs256_token_gives_its_principal() -> None:
    verifier = JwtVerifier(AuthConfig(jwt_secret=SECRET))
    token = jwt.encode(claims(roles=["reader", "writer"], tenant="acme"), SECRET, "HS256")
    p = await verifier.verify(token)
    assert p == Principal("jwt:alice", frozenset({"reader", "writer"}), "acme", "jwt")
    spaced = jwt.encode(claims(roles="reader admin"), SECRET, "HS256")
    assert (await verifier.verify(spaced)).roles == {"reader", "admin"}
    no_roles = jwt.encode(claims(roles=None), SECRET, "HS256")
    assert (await verifier.verify(no_roles)).roles == frozenset()


async def test_custom_claims_and_issuer_audience_on_hs256() -> None:
    config = AuthConfig(
        jwt_secret=SECRET,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        roles_claim="groups",
        tenant_claim="org",
    )
    verifier = JwtVerifier(config)
    good = jwt.encode(
        claims(iss=ISSUER, aud=AUDIENCE, groups=["ops"], org="t1", roles=None), SECRET, "HS256"
    )
    p = await verifier.verify(good)
    assert p.roles == {"ops"} and p.tenant == "t1"
    assert "iss" in await refused(
        verifier.verify, jwt.encode(claims(iss="https://evil", aud=AUDIENCE), SECRET, "HS256")
    )
    assert "aud" in await refused(
        verifier.verify, jwt.encode(claims(iss=ISSUER, aud="other"), SECRET, "HS256")
    )
    assert "'aud'" in await refused(
        verifier.verify, jwt.encode(claims(iss=ISSUER), SECRET, "HS256")
    )


async def test_rs256_and_es256_tokens(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    rs = JwtVerifier(AuthConfig(jwt_public_key=_pem(rsa_key)))
    assert (await rs.verify(jwt.encode(claims(), rsa_key, "RS256"))).id == "jwt:alice"
    es = JwtVerifier(AuthConfig(jwt_public_key=_pem(ec_key)))
    assert (await es.verify(jwt.encode(claims(sub="bob"), ec_key, "ES256"))).id == "jwt:bob"
    # each key verifies its algorithm only
    await refused(rs.verify, jwt.encode(claims(), ec_key, "ES256"))
    await refused(es.verify, jwt.encode(claims(), rsa_key, "RS256"))
    await refused(rs.verify, jwt.encode(claims(), rsa_key, "RS384"))


async def test_expiry_with_leeway() -> None:
    now = int(time.time())
    verifier = JwtVerifier(AuthConfig(jwt_secret=SECRET, leeway=30))
    expired = jwt.encode(claims(exp=now - 120), SECRET, "HS256")
    assert "exp" in await refused(verifier.verify, expired, "CREDENTIALS_EXPIRED")
    within = jwt.encode(claims(exp=now - 5), SECRET, "HS256")
    assert (await verifier.verify(within)).id == "jwt:alice"


async def test_not_before_in_the_future() -> None:
    verifier = JwtVerifier(AuthConfig(jwt_secret=SECRET))
    early = jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, "HS256")
    assert "nbf" in await refused(verifier.verify, early)


async def test_bad_signature() -> None:
    verifier = JwtVerifier(AuthConfig(jwt_secret=SECRET))
    other = jwt.encode(claims(), "another-secret-of-enough-length-000000", "HS256")
    assert "signature" in await refused(verifier.verify, other)
    good = jwt.encode(claims(), SECRET, "HS256")
    head, _, sig = good.split(".")
    tampered_body = _b64(json.dumps(claims(roles=["admin"])).encode())
    await refused(verifier.verify, f"{head}.{tampered_body}.{sig}")


async def test_alg_none_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    for config in (AuthConfig(jwt_secret=SECRET), AuthConfig(jwt_public_key=_pem(rsa_key))):
        verifier = JwtVerifier(config)
        for alg in ("none", "None", "NONE"):
            token = forge({"alg": alg, "typ": "JWT"}, claims(roles=["admin"]), lambda _: b"")
            assert "none" in (await refused(verifier.verify, token)).lower()


async def test_hs256_signed_with_the_public_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = _pem(rsa_key)

    def with_pem(data: bytes) -> bytes:
        return hmac.new(pem.encode(), data, hashlib.sha256).digest()

    token = forge({"alg": "HS256", "typ": "JWT"}, claims(roles=["admin"]), with_pem)
    # only the public key configured: HS256 is not accepted at all
    message = await refused(JwtVerifier(AuthConfig(jwt_public_key=pem)).verify, token)
    assert "HS256" in message and "RS256" in message
    # a secret configured as well: HS256 is checked with the secret, never the PEM
    both = JwtVerifier(AuthConfig(jwt_secret=SECRET, jwt_public_key=pem))
    assert "signature" in await refused(both.verify, token)
    # and an RS256 token is checked with the public key only
    assert (await both.verify(jwt.encode(claims(), rsa_key, "RS256"))).id == "jwt:alice"


async def test_exp_and_sub_are_required() -> None:
    verifier = JwtVerifier(AuthConfig(jwt_secret=SECRET))
    assert "'exp'" in await refused(verifier.verify, jwt.encode(claims(exp=None), SECRET, "HS256"))
    assert "'sub'" in await refused(verifier.verify, jwt.encode(claims(sub=None), SECRET, "HS256"))


@pytest.mark.parametrize(
    "token",
    [
        "abc.def.ghi",
        "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln",  # the payload is not JSON
        "bm90IGpzb24.eyJzdWIiOiJ4In0.c2ln",  # the header is not JSON
        "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiJ4In0.c2ln",  # no alg
    ],
)
async def test_malformed_tokens(token: str) -> None:
    await refused(JwtVerifier(AuthConfig(jwt_secret=SECRET)).verify, token)


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"roles": "admin", "sub": 5}, "sub"),
        ({"roles": [1, 2]}, "roles"),
        ({"roles": {"admin": True}}, "roles"),
        ({"tenant": 7}, "tenant"),
        ({"sub": "x" * 300}, "sub"),
        ({"sub": "bad\nline"}, "sub"),
    ],
)
async def test_claims_of_the_wrong_shape(over: dict[str, Any], words: str) -> None:
    verifier = JwtVerifier(AuthConfig(jwt_secret=SECRET))
    assert words in await refused(verifier.verify, jwt.encode(claims(**over), SECRET, "HS256"))


async def test_verified_tokens_are_remembered_until_they_expire(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [time.time()]
    verifier = JwtVerifier(AuthConfig(jwt_secret=SECRET, leeway=0), now=lambda: clock[0])
    decodes = []
    real = jwt.decode

    def counting(*args: Any, **kwargs: Any) -> Any:
        decodes.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    token = jwt.encode(claims(exp=int(clock[0]) + 2), SECRET, "HS256")
    first = await verifier.verify(token)
    for _ in range(5):
        assert await verifier.verify(token) is first
    assert len(decodes) == 1
    # past its exp the cached principal is not used: the token is checked again (and
    # refused, as expired, since PyJWT reads the real clock: move the token instead)
    clock[0] += 3
    expired = jwt.encode(claims(exp=int(time.time()) - 10), SECRET, "HS256")
    await refused(verifier.verify, expired, "CREDENTIALS_EXPIRED")
    assert len(decodes) == 2
    assert await verifier.verify(token) == first  # decoded again: real exp not yet passed
    assert len(decodes) == 3


# --- JWKS -----------------------------------------------------------------------------


class Jwks:
    """A JWKS document served over HTTP on 127.0.0.1 by a thread of this process."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.requests = 0
        jwks = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jwks.requests += 1
                body = json.dumps(jwks.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, *entries: tuple[str, Any, str]) -> None:
        keys = []
        for kid, key, alg in entries:
            tool = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
            jwk = tool.to_jwk(key.public_key(), as_dict=True)
            jwk.update(kid=kid, use="sig", alg=alg)
            keys.append(jwk)
        self.document = {"keys": keys}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks_server() -> Iterator[Jwks]:
    server = Jwks()
    yield server
    server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def oidc(url: str) -> AuthConfig:
    return AuthConfig(jwks_url=url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)


def oidc_token(key: Any, alg: str, kid: str | None, **over: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**{"iss": ISSUER, "aud": AUDIENCE, **over}), key, alg, headers=headers)


async def test_jwks_rsa_and_ec_keys(
    jwks_server: Jwks, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks_server.publish(("r1", rsa_key, "RS256"), ("e1", ec_key, "ES256"))
    clock = Clock()
    cache = JwksCache(jwks_server.url, refresh_interval=10, clock=clock)
    verifier = JwtVerifier(oidc(jwks_server.url), jwks=cache)
    assert (await verifier.verify(oidc_token(rsa_key, "RS256", "r1"))).id == "jwt:alice"
    p = await verifier.verify(oidc_token(ec_key, "ES256", "e1", sub="bob", tenant="t"))
    assert p == Principal("jwt:bob", frozenset({"reader"}), "t", "jwt")
    assert jwks_server.requests == 1 and cache.fetches == 1
    # a key verifies its own algorithm only (ES256 token naming the RSA key's kid)
    await refused(verifier.verify, oidc_token(ec_key, "ES256", "r1"))
    # signed with a key that is not the one its kid names
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert "signature" in await refused(verifier.verify, oidc_token(other, "RS256", "r1"))
    # with a JWKS, issuer and audience are always checked
    await refused(verifier.verify, oidc_token(rsa_key, "RS256", "r1", iss="https://evil"))
    await refused(verifier.verify, oidc_token(rsa_key, "RS256", "r1", aud="someone-else"))
    await refused(
        verifier.verify, jwt.encode(claims(iss=ISSUER), rsa_key, "RS256", headers={"kid": "r1"})
    )
    # several keys: a token must say which
    assert "kid" in await refused(verifier.verify, oidc_token(rsa_key, "RS256", None))
    assert jwks_server.requests == 1


async def test_jwks_rotation_is_picked_up(
    jwks_server: Jwks, rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    jwks_server.publish(("old", rsa_key, "RS256"))
    clock = Clock()
    cache = JwksCache(jwks_server.url, refresh_interval=10, clock=clock)
    verifier = JwtVerifier(oidc(jwks_server.url), jwks=cache)
    assert (await verifier.verify(oidc_token(rsa_key, "RS256", "old"))).id == "jwt:alice"
    # the provider rotates: a token with the new kid makes us fetch again
    jwks_server.publish(("old", rsa_key, "RS256"), ("new", rsa_key2, "RS256"))
    clock.now += 11
    token = oidc_token(rsa_key2, "RS256", "new", sub="carol")
    assert (await verifier.verify(token)).id == "jwt:carol"
    assert jwks_server.requests == 2


async def test_unknown_kids_refetch_at_most_once_per_interval(
    jwks_server: Jwks, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.publish(("k1", rsa_key, "RS256"))
    clock = Clock()
    cache = JwksCache(jwks_server.url, refresh_interval=10, clock=clock)
    verifier = JwtVerifier(oidc(jwks_server.url), jwks=cache)
    await verifier.verify(oidc_token(rsa_key, "RS256", "k1"))
    assert jwks_server.requests == 1
    for i in range(30):
        message = await refused(verifier.verify, oidc_token(rsa_key, "RS256", f"junk{i}"))
        assert "kid" in message
    assert jwks_server.requests == 1  # within the interval: no fetch at all
    clock.now += 10
    for i in range(30):
        await refused(verifier.verify, oidc_token(rsa_key, "RS256", f"more{i}"))
    assert jwks_server.requests == 2  # one fetch for the whole burst
    # a known kid keeps working throughout
    assert (await verifier.verify(oidc_token(rsa_key, "RS256", "k1", sub="z"))).id == "jwt:z"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_jwks_unreachable_is_unavailable_not_invalid(rsa_key: rsa.RSAPrivateKey) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/jwks"
    verifier = JwtVerifier(oidc(url), jwks=JwksCache(url, timeout=2, clock=Clock()))
    with pytest.raises(JwksUnavailable) as info:
        await verifier.verify(oidc_token(rsa_key, "RS256", "k1"))
    assert "127.0.0.1" not in str(info.value)


async def test_jwks_without_usable_keys_is_unavailable(
    jwks_server: Jwks, rsa_key: rsa.RSAPrivateKey
) -> None:
    # a symmetric key is never taken from a URL
    jwks_server.document = {"keys": [{"kty": "oct", "kid": "k1", "k": _b64(SECRET.encode())}]}
    verifier = JwtVerifier(oidc(jwks_server.url), jwks=JwksCache(jwks_server.url, clock=Clock()))
    token = jwt.encode(claims(iss=ISSUER, aud=AUDIENCE), SECRET, "HS256", headers={"kid": "k1"})
    await refused(verifier.verify, token)  # HS256 is not a JWKS algorithm at all
    with pytest.raises(JwksUnavailable):
        await verifier.verify(oidc_token(rsa_key, "RS256", "k1"))


async def test_jwks_fetch_does_not_block_the_event_loop(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    """A provider that answers slowly holds up only the calls that need it."""
    import asyncio

    release = threading.Event()
    body = json.dumps(
        {"keys": [dict(RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), kid="k")]}
    ).encode()

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            release.wait(10)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks"
        verifier = JwtVerifier(oidc(url), jwks=JwksCache(url, clock=Clock()))
        pending = asyncio.create_task(verifier.verify(oidc_token(rsa_key, "RS256", "k")))
        ticks = 0
        async with asyncio.timeout(5):
            while ticks < 20:  # the loop keeps turning while the fetch waits
                await asyncio.sleep(0)
                ticks += 1
        assert not pending.done()
        release.set()
        async with asyncio.timeout(10):
            assert (await pending).id == "jwt:alice"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


# --- the authenticator over configured keys -------------------------------------------


def authn(**options: Any) -> Authenticator:
    config = AuthConfig(
        api_keys={
            "ops": ApiKeySpec(ROOT_KEY),
            "viewer": ApiKeySpec("viewer-key-0123456789", frozenset({"reader"}), "acme"),
        },
        **options,
    )
    return Authenticator(config)


async def invalid(a: Authenticator, metadata: list[tuple[str, Any]], words: str) -> None:
    with pytest.raises(AuthError) as info:
        await a.authenticate(metadata)
    assert info.value.reason == "CREDENTIALS_INVALID"
    assert words in info.value.message
    for _, value in metadata:
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        for word in text.split():
            if len(word) >= 12:
                assert word not in info.value.message


async def test_no_credential_is_none() -> None:
    a = authn()
    assert await a.authenticate([]) is None
    assert await a.authenticate([("x-nexus-caller", "bob"), ("user-agent", "x")]) is None


async def test_configured_api_keys_on_both_headers() -> None:
    a = authn()
    root = await a.authenticate([("x-api-key", ROOT_KEY)])
    assert root == Principal("key:ops", frozenset({"admin"}), None, "api_key")
    assert await a.authenticate([("authorization", f"Bearer {ROOT_KEY}")]) == root
    assert await a.authenticate([("authorization", f"bearer  {ROOT_KEY} ")]) == root
    viewer = await a.authenticate([("x-api-key", "viewer-key-0123456789")])
    assert viewer == Principal("key:viewer", frozenset({"reader"}), "acme", "api_key")


async def test_malformed_credentials() -> None:
    a = authn()
    await invalid(a, [("x-api-key", ROOT_KEY), ("authorization", f"Bearer {ROOT_KEY}")], "two")
    await invalid(a, [("x-api-key", ROOT_KEY), ("x-api-key", ROOT_KEY)], "two")
    await invalid(a, [("authorization", f"Basic {ROOT_KEY}")], "Bearer")
    await invalid(a, [("authorization", "Bearer")], "empty")
    await invalid(a, [("x-api-key", "")], "empty")
    await invalid(a, [("x-api-key", "ключ-0123456789abcdef")], "ASCII")
    await invalid(a, [("x-api-key", "ключ-0123456789abcdef".encode())], "ASCII")
    await invalid(a, [("x-api-key", "k" * (MAX_CREDENTIAL_LENGTH + 1))], "longer")
    await invalid(a, [("x-api-key", "unknown-key-0123456789")], "not one this server knows")
    await invalid(a, [("x-api-key", ROOT_KEY[:-1])], "not one this server knows")
    await invalid(a, [("authorization", "Bearer nxk_0123456789abcdef_" + "A" * 43)], "knows")


async def test_bearer_jwt_routes_to_the_verifier() -> None:
    a = authn(jwt_secret=SECRET)
    token = jwt.encode(claims(), SECRET, "HS256")
    found = await a.authenticate([("authorization", f"Bearer {token}")])
    assert found is not None and found.id == "jwt:alice"
    expired = jwt.encode(claims(exp=int(time.time()) - 600), SECRET, "HS256")
    with pytest.raises(AuthError) as info:
        await a.authenticate([("authorization", f"Bearer {expired}")])
    assert info.value.reason == "CREDENTIALS_EXPIRED"
    # no JWT source: a JWT is refused, saying why
    await invalid(authn(), [("authorization", f"Bearer {token}")], "no JWT key")
    # x-api-key never carries a JWT
    await invalid(a, [("x-api-key", token)], "not one this server knows")


async def test_has_source() -> None:
    assert await authn().has_source()
    assert await Authenticator(AuthConfig(jwt_secret=SECRET)).has_source()
    assert not await Authenticator(AuthConfig()).has_source()


async def test_the_token_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from nexus_server.gateway import _jwt

    monkeypatch.setattr(_jwt, "CACHE_SIZE", 50)
    verifier = JwtVerifier(AuthConfig(jwt_secret=SECRET))
    for i in range(200):
        await verifier.verify(jwt.encode(claims(sub=f"u{i}"), SECRET, "HS256"))
        assert len(verifier._cache) <= 50


async def test_a_concurrent_burst_of_unknown_kids_fetches_once(
    jwks_server: Jwks, rsa_key: rsa.RSAPrivateKey
) -> None:
    import asyncio

    jwks_server.publish(("k1", rsa_key, "RS256"))
    verifier = JwtVerifier(
        oidc(jwks_server.url), jwks=JwksCache(jwks_server.url, refresh_interval=10, clock=Clock())
    )
    tokens = [oidc_token(rsa_key, "RS256", f"junk{i}") for i in range(40)]
    tokens.append(oidc_token(rsa_key, "RS256", "k1"))
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)
    assert jwks_server.requests == 1
    assert all(isinstance(r, AuthError) for r in results[:-1])
    assert isinstance(results[-1], Principal)
