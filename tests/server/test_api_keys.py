"""API keys the server manages: the store on SQLite and PostgreSQL, the authenticator
over it (expiry, revocation seen by another server's store on its next lookup), and
AuthService over a real grpc.aio server."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2

from dataflow import DataFlow, ValidationError
from nexus_api.nexus.auth.v1 import auth_service_pb2 as apb
from nexus_api.nexus.auth.v1 import auth_service_pb2_grpc as agrpc
from nexus_server.gateway import CURRENT_PRINCIPAL, AuthError, Principal
from nexus_server.gateway._auth_service import AuthServicer
from nexus_server.gateway._authn import Authenticator
from nexus_server.gateway._config import ApiKeySpec, AuthConfig
from nexus_server.gateway._keys import (
    API_KEYS,
    ApiKeyExistsError,
    ApiKeyNotFoundError,
    KeyStore,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True),
]

NOW = dt.datetime.now(dt.UTC)


async def who(a: Authenticator, metadata: list[tuple[str, Any]]) -> Principal:
    """The principal of a call that must carry a credential."""
    found = await a.authenticate(metadata)
    assert found is not None
    return found


ADMIN = Principal("key:root", frozenset({"admin"}), None, "api_key")


@pytest.fixture
async def open_db(db_url: str) -> AsyncIterator[Callable[[], Any]]:
    """`await open_db()`: a KeyStore on a new DataFlow of the test database (several may
    share it, as replicas do), initialized; closed after the test."""
    made: list[DataFlow] = []

    async def make() -> KeyStore:
        db = DataFlow(db_url)
        made.append(db)
        store = KeyStore(db)
        await store.initialize()
        return store

    yield make
    for db in made:
        await db.close()


@pytest.fixture
async def store(open_db: Callable[[], Any]) -> KeyStore:
    result: KeyStore = await open_db()
    return result


async def test_create_then_lookup(store: KeyStore) -> None:
    record, key = await store.create("ci_bot", ["reader", "writer"], "acme", None, "key:root")
    assert key.startswith(f"nxk_{record.id}_") and len(key) == 64
    assert record.prefix == f"nxk_{record.id}"
    found = await store.lookup(key)
    assert found == record
    assert found.roles == ("reader", "writer") and found.tenant == "acme"
    assert found.creator == "key:root" and found.expire_time is None
    assert found.revoke_time is None
    # a wrong secret, another id, or a malformed key finds nothing
    assert await store.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert await store.lookup(f"nxk_{'0' * 16}_{key[21:]}") is None
    for bad in ("", "nxk_", key + "x", key.upper(), "x" * 64):
        assert await store.lookup(bad) is None


async def test_only_a_salted_hash_is_stored(store: KeyStore) -> None:
    _, key1 = await store.create("one", ["reader"], None, None, "key:root")
    _, key2 = await store.create("two", ["reader"], None, None, "key:root")
    async with store.db.connection() as conn:
        rows = (await conn.execute(sa.select(API_KEYS))).mappings().all()
    dump = repr([dict(r) for r in rows])
    for key in (key1, key2):
        secret = key[21:]
        assert secret not in dump and key not in dump
    assert rows[0]["salt"] != rows[1]["salt"] and rows[0]["hash"] != rows[1]["hash"]


async def test_names_are_unique_among_keys_in_force(store: KeyStore) -> None:
    first, _ = await store.create("deploy", ["ops"], None, None, "key:root")
    with pytest.raises(ApiKeyExistsError):
        await store.create("deploy", ["ops"], None, None, "key:root")
    revoked = await store.revoke("deploy")
    assert revoked.id == first.id and revoked.revoke_time is not None
    again = await store.revoke("deploy")  # a no-op
    assert again.revoke_time == revoked.revoke_time
    second, _ = await store.create("deploy", ["ops"], None, None, "key:root")
    assert second.id != first.id
    with pytest.raises(ApiKeyNotFoundError):
        await store.revoke("never_made")


async def test_list_pages_newest_first(store: KeyStore) -> None:
    made = []
    for i in range(5):
        record, _ = await store.create(f"k{i}", ["reader"], None, None, "key:root")
        made.append(record.name)
    await store.revoke("k2")
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page, token = await store.list(2, token)
        assert len(page) <= 2
        seen += [r.name for r in page]
        if not token:
            break
    assert seen == ["k4", "k3", "k1", "k0"]
    everything, token = await store.list(50, "", show_revoked=True)
    assert [r.name for r in everything] == ["k4", "k3", "k2", "k1", "k0"] and token == ""
    _, token = await store.list(2)
    with pytest.raises(ValidationError) as info:  # issued for another listing
        await store.list(2, token, show_revoked=True)
    assert info.value.field == "page_token"
    with pytest.raises(ValidationError):
        await store.list(2, token[:-2] + "xx")
    assert await store.count_active() == 4


async def test_authenticator_over_managed_keys(store: KeyStore) -> None:
    a = Authenticator(AuthConfig(), store)
    assert not await a.has_source()
    _, key = await store.create("ci", ["reader"], "acme", None, "key:root")
    assert await a.has_source()
    p = await a.authenticate([("x-api-key", key)])
    assert p == Principal("key:ci", frozenset({"reader"}), "acme", "api_key")
    assert await a.authenticate([("authorization", f"Bearer {key}")]) == p
    for bad in (key[:-1] + ("A" if key[-1] != "A" else "B"), "nxk_garbage"):
        with pytest.raises(AuthError) as info:
            await a.authenticate([("x-api-key", bad)])
        assert info.value.reason == "CREDENTIALS_INVALID"
        assert key[21:] not in info.value.message and bad not in info.value.message


async def test_expired_key(store: KeyStore) -> None:
    a = Authenticator(AuthConfig(), store)
    _, key = await store.create("old", ["reader"], None, NOW - dt.timedelta(seconds=1), "x")
    with pytest.raises(AuthError) as info:
        await a.authenticate([("x-api-key", key)])
    assert info.value.reason == "CREDENTIALS_EXPIRED"
    assert key not in info.value.message
    assert await store.count_active() == 0 and not await a.has_source()
    _, later = await store.create("later", ["reader"], None, NOW + dt.timedelta(hours=1), "x")
    assert (await who(a, [("x-api-key", later)])).id == "key:later"


async def test_revocation_is_seen_by_another_replica_on_its_next_call(
    open_db: Callable[[], Any],
) -> None:
    one: KeyStore = await open_db()
    two: KeyStore = await open_db()
    a1 = Authenticator(AuthConfig(), one)
    a2 = Authenticator(AuthConfig(), two)
    _, key = await one.create("shared", ["reader"], None, None, "key:root")
    assert (await who(a2, [("x-api-key", key)])).id == "key:shared"
    await one.revoke("shared")
    for a in (a2, a1):
        with pytest.raises(AuthError) as info:
            await a.authenticate([("x-api-key", key)])
        assert info.value.reason == "CREDENTIALS_INVALID" and "revoked" in info.value.message


async def test_configured_keys_come_before_managed_ones(store: KeyStore) -> None:
    root = "root-key-0123456789abcdef"
    a = Authenticator(AuthConfig(api_keys={"root": ApiKeySpec(root)}), store)
    assert (await who(a, [("x-api-key", root)])).roles == {"admin"}


# --- AuthService over gRPC ------------------------------------------------------------


def _with_principal(servicer: AuthServicer, principal: Principal | None) -> Any:
    """The servicer with CURRENT_PRINCIPAL set around every method, as the chain does."""

    class Wrapped(agrpc.AuthServiceServicer):
        pass

    for name in ("GetPrincipal", "CreateApiKey", "ListApiKeys", "RevokeApiKey"):
        inner = getattr(servicer, name)

        async def method(self: Any, request: Any, context: Any, inner: Any = inner) -> Any:
            token = CURRENT_PRINCIPAL.set(principal)
            try:
                return await inner(request, context)
            finally:
                CURRENT_PRINCIPAL.reset(token)

        setattr(Wrapped, name, method)
    return Wrapped()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    """`await serve(servicer, principal)`: an AuthService stub on a real server."""
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def start(servicer: AuthServicer, principal: Principal | None = ADMIN) -> Any:
        server = grpc.aio.server()
        agrpc.add_AuthServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _with_principal(servicer, principal), server
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        async with asyncio.timeout(10):
            await channel.channel_ready()
        return agrpc.AuthServiceStub(channel)  # type: ignore[no-untyped-call]

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(None)


async def failure(call: Any) -> tuple[grpc.StatusCode, str, str, list[str]]:
    """(code, message, ErrorInfo reason, violated fields) of a failing call."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    err = info.value
    status = rpc_status.from_call(err)
    assert status is not None
    reason, fields = "", []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            ei = error_details_pb2.ErrorInfo()
            detail.Unpack(ei)
            reason = ei.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            fields = [v.field for v in br.field_violations]
    return err.code(), err.details() or "", reason, fields


async def test_service_create_list_revoke(store: KeyStore, serve: Callable[..., Any]) -> None:
    authn = Authenticator(AuthConfig(api_keys={"root": ApiKeySpec("r" * 20)}), store)
    stub = await serve(AuthServicer(authn, store, auth_enabled=True))
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(NOW + dt.timedelta(days=1))
    made = await stub.CreateApiKey(
        apb.CreateApiKeyRequest(name="ci", roles=["reader"], tenant="acme", expire_time=expire)
    )
    key = made.key
    assert made.api_key.name == "ci" and list(made.api_key.roles) == ["reader"]
    assert made.api_key.creator == "key:root" and made.api_key.tenant == "acme"
    assert key.startswith(made.api_key.prefix + "_")
    assert made.api_key.expire_time.seconds == expire.seconds
    assert not made.api_key.HasField("revoke_time")
    assert (await who(authn, [("x-api-key", key)])).id == "key:ci"

    listed = await stub.ListApiKeys(apb.ListApiKeysRequest())
    assert [k.name for k in listed.api_keys] == ["ci"]
    assert key[21:] not in str(listed)

    revoked = await stub.RevokeApiKey(apb.RevokeApiKeyRequest(name="ci"))
    assert revoked.HasField("revoke_time")
    with pytest.raises(AuthError):
        await authn.authenticate([("x-api-key", key)])
    assert list((await stub.ListApiKeys(apb.ListApiKeysRequest())).api_keys) == []
    shown = await stub.ListApiKeys(apb.ListApiKeysRequest(show_revoked=True))
    assert [k.name for k in shown.api_keys] == ["ci"]

    code, _, reason, _ = await failure(stub.RevokeApiKey(apb.RevokeApiKeyRequest(name="nope")))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "API_KEY_NOT_FOUND")
    code, _, reason, _ = await failure(
        stub.CreateApiKey(apb.CreateApiKeyRequest(name="root", roles=["x"]))
    )
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "API_KEY_ALREADY_EXISTS")
    await stub.CreateApiKey(apb.CreateApiKeyRequest(name="dup", roles=["x"]))
    code, message, reason, _ = await failure(
        stub.CreateApiKey(apb.CreateApiKeyRequest(name="dup", roles=["x"]))
    )
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "API_KEY_ALREADY_EXISTS")
    assert "dup" in message
    code, _, reason, _ = await failure(
        stub.ListApiKeys(apb.ListApiKeysRequest(page_token="forged"))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "PAGE_TOKEN_INVALID")


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"name": "", "roles": ["r"]}, "name"),
        ({"name": "Bad-Name", "roles": ["r"]}, "name"),
        ({"name": "x" * 61, "roles": ["r"]}, "name"),
        ({"name": "ok", "roles": []}, "roles"),
        ({"name": "ok", "roles": ["reader", "Not A Role"]}, "roles[1]"),
        ({"name": "ok", "roles": ["r"], "tenant": "t" * 129}, "tenant"),
        ({"name": "ok", "roles": ["r"], "tenant": "a\x00b"}, "tenant"),
        ({"name": "ok", "roles": ["r"], "expire_time": "past"}, "expire_time"),
    ],
)
async def test_service_refuses_bad_requests(
    store: KeyStore, serve: Callable[..., Any], request_fields: dict[str, Any], field: str
) -> None:
    stub = await serve(AuthServicer(Authenticator(AuthConfig(), store), store, True))
    if request_fields.get("expire_time") == "past":
        past = timestamp_pb2.Timestamp()
        past.FromDatetime(NOW - dt.timedelta(minutes=1))
        request_fields["expire_time"] = past
    code, message, reason, fields = await failure(
        stub.CreateApiKey(apb.CreateApiKeyRequest(**request_fields))
    )
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert fields == [field] and field.split("[")[0] in message
    assert len(message) < 300
    assert await store.count_active() == 0


async def test_get_principal(store: KeyStore, serve: Callable[..., Any]) -> None:
    who = Principal("jwt:alice", frozenset({"writer", "reader"}), "acme", "jwt")
    stub = await serve(AuthServicer(None, store, auth_enabled=True), who)
    got = await stub.GetPrincipal(apb.GetPrincipalRequest())
    assert got == apb.Principal(
        id="jwt:alice",
        roles=["reader", "writer"],
        tenant="acme",
        authentication="jwt",
        auth_enabled=True,
    )
    off = await serve(AuthServicer(None, None, auth_enabled=False), None)
    got = await off.GetPrincipal(apb.GetPrincipalRequest())
    assert (got.id, got.authentication, got.auth_enabled) == ("anonymous", "none", False)
    on = await serve(AuthServicer(None, None, auth_enabled=True), None)
    code, _, reason, _ = await failure(on.GetPrincipal(apb.GetPrincipalRequest()))
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "CREDENTIALS_MISSING")


async def test_service_without_a_database(serve: Callable[..., Any], backend: str) -> None:
    stub = await serve(AuthServicer(None, None, auth_enabled=True))
    for call in (
        stub.CreateApiKey(apb.CreateApiKeyRequest(name="x", roles=["r"])),
        stub.ListApiKeys(apb.ListApiKeysRequest()),
        stub.RevokeApiKey(apb.RevokeApiKeyRequest(name="x")),
    ):
        code, message, reason, _ = await failure(call)
        assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "API_KEYS_UNAVAILABLE")
        assert "database" in message
