"""The gateway chain over a real server: who may call what, whose executions and
workflows one sees, development labels, discovery, health, and the audit trail.

Credentials: an env API key (`NEXUS_API_KEY_ROOT`, role admin) and HS256 tokens signed
with `NEXUS_JWT_SECRET`, made here with PyJWT.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from nexus_api.nexus.auth.v1 import auth_service_pb2 as apb
from nexus_api.nexus.auth.v1 import auth_service_pb2_grpc as agrpc
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving
from nexus_server.gateway import Policy

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
Connect = Callable[[Serving], contextlib.AbstractAsyncContextManager[grpc.aio.Channel]]
SECRET = "s" * 40
ROOT_KEY = "root-key-0123456789abcdef"
ROOT = (("x-api-key", ROOT_KEY),)


def token(sub: str, roles: list[str], *, tenant: str | None = None, exp: int = 600) -> str:
    claims: dict[str, Any] = {"sub": sub, "roles": roles, "exp": int(time.time()) + exp}
    if tenant:
        claims["tenant"] = tenant
    return jwt.encode(claims, SECRET, algorithm="HS256")


def bearer(value: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {value}"),)


def inputs(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


@pytest.fixture
def auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_JWT_SECRET", SECRET)
    monkeypatch.setenv("NEXUS_API_KEY_ROOT", ROOT_KEY)


@pytest.fixture
async def secured(
    auth_env: None, make_app: Callable[..., Nexus], connect: Connect
) -> AsyncIterator[grpc.aio.Channel]:
    """The default app with authentication on: `create_contact` granted to `sales`,
    `acme_contacts` public, `sales` may read and write contacts."""
    app = make_app(
        enable_auth=True,
        policy=Policy({"sales": ["model:Contact:read", "model:Contact:write"]}),
    )
    app.policy.grant("sales", "workflow:create_contact:execute")
    item = app.registry.get("acme_contacts")
    app.registry.add("acme_contacts", item.workflow, builtin=True, public=True)
    async with app.serving() as serving, connect(serving) as channel:
        yield channel


def stubs(channel: grpc.aio.Channel) -> tuple[Any, Any]:
    return (
        wgrpc.WorkflowServiceStub(channel),  # type: ignore[no-untyped-call]
        mgrpc.ModelServiceStub(channel),  # type: ignore[no-untyped-call]
    )


async def test_no_credential_is_refused_but_health_is_open(
    secured: grpc.aio.Channel, expect_error: ExpectError
) -> None:
    wf, ms = stubs(secured)
    await expect_error(
        wf.ListWorkflows(wpb.ListWorkflowsRequest()),
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIALS_MISSING",
    )
    await expect_error(
        ms.ListRecords(mpb.ListRecordsRequest(model="Contact")),
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIALS_MISSING",
    )
    health = health_pb2_grpc.HealthStub(secured)
    resp = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_bad_credentials_name_their_reason(
    secured: grpc.aio.Channel, expect_error: ExpectError
) -> None:
    wf, _ = stubs(secured)
    cases = [
        (bearer("not-a-key"), "CREDENTIALS_INVALID"),
        (
            bearer(jwt.encode({"sub": "a", "exp": 9e9}, "x" * 40, algorithm="HS256")),
            "CREDENTIALS_INVALID",
        ),
        (bearer(token("a", ["admin"], exp=-120)), "CREDENTIALS_EXPIRED"),
        ((("x-api-key", "wrong-key-0123456789"),), "CREDENTIALS_INVALID"),
    ]
    for metadata, reason in cases:
        _, _ = await expect_error(
            wf.ListWorkflows(wpb.ListWorkflowsRequest(), metadata=metadata),
            grpc.StatusCode.UNAUTHENTICATED,
            reason,
        )


async def test_a_public_workflow_runs_without_a_credential_but_not_with_a_bad_one(
    secured: grpc.aio.Channel, expect_error: ExpectError
) -> None:
    wf, _ = stubs(secured)
    rec = await wf.ExecuteWorkflow(wpb.ExecuteWorkflowRequest(name="acme_contacts"), timeout=10)
    assert rec.state == wpb.Execution.STATE_SUCCEEDED
    assert rec.owner == "anonymous"
    await expect_error(
        wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="acme_contacts"), metadata=bearer("garbage")
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "CREDENTIALS_INVALID",
    )


async def test_roles_decide_and_the_permission_is_named(
    secured: grpc.aio.Channel, expect_error: ExpectError
) -> None:
    wf, ms = stubs(secured)
    sales = bearer(token("ann", ["sales"]))
    nobody = bearer(token("bob", ["guest"]))
    ok = await wf.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(
            name="create_contact", inputs=inputs(name="Ann", email="ann@example.com")
        ),
        metadata=sales,
        timeout=10,
    )
    assert ok.owner == "jwt:ann"
    meta, _ = await expect_error(
        wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="create_contact", inputs=inputs(name="Bob", email="bob@example.com")
            ),
            metadata=nobody,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    assert meta["permission"] == "workflow:create_contact:execute"
    # the same answer for a workflow that does not exist: nothing said about existence
    meta, _ = await expect_error(
        wf.ExecuteWorkflow(wpb.ExecuteWorkflowRequest(name="no_such_flow"), metadata=nobody),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    assert meta["permission"] == "workflow:no_such_flow:execute"
    meta, _ = await expect_error(
        ms.BulkDeleteRecords(
            mpb.BulkDeleteRecordsRequest(model="Contact", allow_all=True), metadata=sales
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )
    assert meta["permission"] == "model:Contact:bulk"
    count = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"), metadata=ROOT)
    assert count.count == 1  # the refused bulk delete deleted nothing
    listed = await ms.ListRecords(mpb.ListRecordsRequest(model="Contact"), metadata=sales)
    assert [r["name"] for r in listed.records] == ["Ann"]


async def test_listings_show_only_what_the_principal_may_use(
    secured: grpc.aio.Channel,
) -> None:
    wf, ms = stubs(secured)
    sales = bearer(token("ann", ["sales"]))
    names = [
        w.name
        for w in (await wf.ListWorkflows(wpb.ListWorkflowsRequest(), metadata=sales)).workflows
    ]
    assert names == ["acme_contacts", "create_contact"]
    everything = await wf.ListWorkflows(wpb.ListWorkflowsRequest(), metadata=ROOT)
    assert len(everything.workflows) > 2
    models = await ms.ListModels(mpb.ListModelsRequest(), metadata=sales)
    assert [m.name for m in models.models] == ["Contact"]
    guest = await ms.ListModels(mpb.ListModelsRequest(), metadata=bearer(token("g", ["guest"])))
    assert list(guest.models) == []


async def test_executions_belong_to_their_principal(
    secured: grpc.aio.Channel, expect_error: ExpectError
) -> None:
    wf, _ = stubs(secured)
    ann = bearer(token("ann", ["sales"]))
    cat = bearer(token("cat", ["sales"]))
    rec = await wf.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(
            name="create_contact",
            inputs=inputs(name="Ann", email="a@example.com"),
            request_id="k1",
        ),
        metadata=ann,
        timeout=10,
    )
    mine = await wf.GetExecution(wpb.GetExecutionRequest(id=rec.id), metadata=ann)
    assert mine.owner == "jwt:ann"
    await expect_error(
        wf.GetExecution(wpb.GetExecutionRequest(id=rec.id), metadata=cat),
        grpc.StatusCode.NOT_FOUND,
        "EXECUTION_NOT_FOUND",
    )
    await expect_error(
        wf.CancelExecution(wpb.CancelExecutionRequest(id=rec.id), metadata=cat),
        grpc.StatusCode.NOT_FOUND,
        "EXECUTION_NOT_FOUND",
    )
    theirs = await wf.ListExecutions(wpb.ListExecutionsRequest(), metadata=cat)
    assert list(theirs.executions) == []
    ours = await wf.ListExecutions(wpb.ListExecutionsRequest(), metadata=ann)
    assert [e.id for e in ours.executions] == [rec.id]
    admin = await wf.GetExecution(wpb.GetExecutionRequest(id=rec.id), metadata=ROOT)
    assert admin.id == rec.id
    # the same request_id from another principal is its own key: a new execution
    other = await wf.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(
            name="create_contact",
            inputs=inputs(name="Cat", email="c@example.com"),
            request_id="k1",
        ),
        metadata=cat,
        timeout=10,
    )
    assert other.id != rec.id and other.owner == "jwt:cat"


async def test_caller_label_is_ignored_with_auth_on(secured: grpc.aio.Channel) -> None:
    wf, _ = stubs(secured)
    ann = bearer(token("ann", ["sales"]))
    rec = await wf.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(
            name="create_contact", inputs=inputs(name="A", email="a@x.org"), request_id="r"
        ),
        metadata=ann,
        timeout=10,
    )
    # another principal claiming to be ann through the development label gets nothing
    spoof = (*bearer(token("eve", ["sales"])), ("x-nexus-caller", "jwt:ann"))
    again = await wf.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(
            name="create_contact", inputs=inputs(name="A", email="a2@x.org"), request_id="r"
        ),
        metadata=spoof,
        timeout=10,
    )
    assert again.id != rec.id and again.owner == "jwt:eve"


async def test_registered_workflows_belong_to_their_registrant(
    auth_env: None, make_app: Callable[..., Nexus], connect: Connect, expect_error: ExpectError
) -> None:
    app = make_app(enable_auth=True, policy=Policy({"dev": ["workflow:register"]}))
    definition = wpb.WorkflowDefinition()
    node = definition.nodes.add(id="count", type="ContactCountNode")
    node.params.update({})
    async with app.serving() as serving, connect(serving) as channel:
        wf, _ = stubs(channel)
        ann = bearer(token("ann", ["dev"]))
        bob = bearer(token("bob", ["dev"]))
        made = await wf.RegisterWorkflow(
            wpb.RegisterWorkflowRequest(name="counter", definition=definition), metadata=ann
        )
        assert made.owner == "jwt:ann"
        # its registrant may run it without a grant
        await wf.ExecuteWorkflow(wpb.ExecuteWorkflowRequest(name="counter"), metadata=ann)
        await expect_error(
            wf.RegisterWorkflow(
                wpb.RegisterWorkflowRequest(name="counter", definition=definition, replace=True),
                metadata=bob,
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
        await expect_error(
            wf.DeleteWorkflow(wpb.DeleteWorkflowRequest(name="counter"), metadata=bob),
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
        await expect_error(
            wf.RegisterWorkflow(
                wpb.RegisterWorkflowRequest(name="other", definition=definition),
                metadata=bearer(token("g", ["guest"])),
            ),
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
        await wf.DeleteWorkflow(wpb.DeleteWorkflowRequest(name="counter"), metadata=ROOT)
        names = [
            w.name
            for w in (await wf.ListWorkflows(wpb.ListWorkflowsRequest(), metadata=ROOT)).workflows
        ]
        assert "counter" not in names and "other" not in names


async def test_reflection_needs_a_credential_unless_public(
    auth_env: None, make_app: Callable[..., Nexus], connect: Connect
) -> None:
    async def list_services(
        channel: grpc.aio.Channel, metadata: Any = (), *, version: str = "v1alpha"
    ) -> list[str]:
        # v1's messages are v1alpha's under another package: the same bytes
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for resp in call(iter([request]), metadata=metadata):
            return [s.name for s in resp.list_services_response.service]
        return []

    for public in (False, True):
        app = make_app(enable_auth=True, public_discovery=public)
        async with app.serving() as serving, connect(serving) as channel:
            for version in ("v1alpha", "v1"):
                if public:
                    assert "nexus.auth.v1.AuthService" in await list_services(
                        channel, version=version
                    )
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await list_services(channel, version=version)
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "nexus.workflow.v1.WorkflowService" in await list_services(
                        channel, ROOT, version=version
                    )
        await app.db.close()  # type: ignore[union-attr]


async def test_get_principal_tells_who_is_calling(secured: grpc.aio.Channel) -> None:
    stub = agrpc.AuthServiceStub(secured)  # type: ignore[no-untyped-call]
    me = await stub.GetPrincipal(
        apb.GetPrincipalRequest(), metadata=bearer(token("ann", ["sales"], tenant="acme"))
    )
    assert (me.id, list(me.roles), me.tenant, me.authentication, me.auth_enabled) == (
        "jwt:ann",
        ["sales"],
        "acme",
        "jwt",
        True,
    )
    root = await stub.GetPrincipal(apb.GetPrincipalRequest(), metadata=ROOT)
    assert (root.id, list(root.roles), root.authentication) == ("key:root", ["admin"], "api_key")


async def test_auth_off_keeps_the_development_labels(
    make_app: Callable[..., Nexus], connect: Connect
) -> None:
    app = make_app()
    async with app.serving() as serving, connect(serving) as channel:
        stub = agrpc.AuthServiceStub(channel)  # type: ignore[no-untyped-call]
        me = await stub.GetPrincipal(
            apb.GetPrincipalRequest(),
            metadata=(("x-nexus-caller", "dev-1"), ("x-nexus-tenant", "t1")),
        )
        assert (me.id, me.tenant, me.auth_enabled) == ("dev-1", "t1", False)
        anon = await stub.GetPrincipal(apb.GetPrincipalRequest())
        assert anon.id == "anonymous"


async def test_start_fails_closed_without_a_credential_source(
    make_app: Callable[..., Nexus], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("NEXUS_JWT_SECRET", "NEXUS_JWT_PUBLIC_KEY", "NEXUS_JWKS_URL"):
        monkeypatch.delenv(var, raising=False)
    app = make_app(enable_auth=True)
    with pytest.raises(ValueError, match="no credential source"):
        async with app.serving():
            pass


def test_start_without_a_source_exits_with_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("NEXUS_JWT_SECRET", "NEXUS_JWT_PUBLIC_KEY", "NEXUS_JWKS_URL", "NEXUS_ENV"):
        monkeypatch.delenv(var, raising=False)
    app = Nexus(grpc_port=0, api_port=None, mcp_port=None)
    app.enable_auth = True  # the attribute form, as the original's docs show it
    with pytest.raises(SystemExit) as caught:
        app.start()
    assert caught.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "no credential source" in err[0] and "NEXUS_API_KEY_<NAME>" in err[0]


def test_production_turns_auth_on_and_warns_when_disabled(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NEXUS_ENV", "production")
    assert Nexus().auth_enabled() is True
    with caplog.at_level(logging.WARNING, logger="nexus_server"):
        assert Nexus(enable_auth=False).auth_enabled() is False
    assert "NEXUS_ENV=production with enable_auth=False" in caplog.text
    monkeypatch.delenv("NEXUS_ENV")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nexus_server"):
        assert Nexus().auth_enabled() is False
    assert not caplog.text  # loopback, development: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="nexus_server"):
        assert Nexus(host="0.0.0.0").auth_enabled() is False
    assert "without authentication" in caplog.text


async def test_refusals_and_changes_are_audited(
    secured: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    _, ms = stubs(secured)
    with caplog.at_level(logging.INFO, logger="nexus.audit"):
        with pytest.raises(grpc.aio.AioRpcError):
            await ms.BulkDeleteRecords(
                mpb.BulkDeleteRecordsRequest(model="Contact", allow_all=True)
            )
        await ms.CreateRecord(
            mpb.CreateRecordRequest(model="Contact", record=inputs(name="Z", email="z@x.org")),
            metadata=(*ROOT, ("x-nexus-channel", "cli")),
        )
    lines = [r.getMessage() for r in caplog.records if r.name == "nexus.audit"]
    assert any("BulkDeleteRecords" in line and "UNAUTHENTICATED" in line for line in lines)
    assert any(
        "CreateRecord" in line and '"OK"' in line and "key:root" in line and '"cli"' in line
        for line in lines
    ), lines
    assert not any(ROOT_KEY in line for line in lines)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_managed_keys_work_and_revoke_on_every_replica(
    auth_env: None,
    make_app: Callable[..., Nexus],
    connect: Connect,
    expect_error: ExpectError,
    db_url: str,
) -> None:
    """Two servers on one database: a key created on one works on the other, and its
    revocation on the first refuses the very next call on the second."""
    one = make_app(models=False, enable_auth=True)
    two = make_app(models=False, enable_auth=True, url=db_url)
    async with (
        one.serving() as s1,
        two.serving() as s2,
        connect(s1) as c1,
        connect(s2) as c2,
    ):
        keys1 = agrpc.AuthServiceStub(c1)  # type: ignore[no-untyped-call]
        keys2 = agrpc.AuthServiceStub(c2)  # type: ignore[no-untyped-call]
        made = await keys1.CreateApiKey(
            apb.CreateApiKeyRequest(name="ci", roles=["reader"], tenant="acme"), metadata=ROOT
        )
        assert made.key.startswith("nxk_") and made.api_key.creator == "key:root"
        mine = (("x-api-key", made.key),)
        me = await keys2.GetPrincipal(apb.GetPrincipalRequest(), metadata=mine)
        assert (me.id, list(me.roles), me.tenant) == ("key:ci", ["reader"], "acme")
        listed = await keys2.ListApiKeys(apb.ListApiKeysRequest(), metadata=ROOT)
        assert [k.name for k in listed.api_keys] == ["ci"]
        assert made.key not in str(listed)
        await expect_error(
            keys2.CreateApiKey(apb.CreateApiKeyRequest(name="x", roles=["admin"]), metadata=mine),
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_DENIED",
        )
        await keys1.RevokeApiKey(apb.RevokeApiKeyRequest(name="ci"), metadata=ROOT)
        await expect_error(
            keys2.GetPrincipal(apb.GetPrincipalRequest(), metadata=mine),
            grpc.StatusCode.UNAUTHENTICATED,
            "CREDENTIALS_INVALID",
        )
