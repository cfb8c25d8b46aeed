"""Per-workflow response caching (`app.register(..., cache_ttl=...)`): refused for
workflows that write, keyed by principal, tenant and inputs, said in the response
metadata (`x-nexus-cache`), and as a header on REST through the real Envoy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format, struct_pb2

from dataflow import DataFlow, field
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus, Serving
from workflow import Node, Output, WorkflowBuilder, register_node, unregister_node

pytestmark = pytest.mark.timeout(60)
WAIT = 15.0


class CacheTestWriterNode(Node):
    """A node of the test's own that says it writes."""

    __test__ = False
    type_name = "CacheTestWriterNode"
    writes = True
    outputs = {"ok": Output(bool)}

    def run(self) -> dict[str, Any]:
        return {"ok": True}


def _read_workflow() -> Any:
    wf = WorkflowBuilder("Read one contact.")
    wf.add_node("ContactReadNode", "read", {"id": "{{id}}"})
    return wf.build()


def _acme(app: Nexus, ttl: float = 30) -> None:
    wf = WorkflowBuilder("Contacts of a company.")
    wf.add_input("company", str)
    wf.add_node("ContactListNode", "list", {"filter": {"company": "{{company}}"}})
    wf.add_node("ContactCountNode", "count", {"filter": {"company": "{{company}}"}})
    app.register("company_contacts", wf.build(), cache_ttl=ttl)


def _inputs(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


async def _execute(
    stub: Any, name: str, /, caller: str = "alice", tenant: str = "", **inputs: Any
) -> tuple[wpb.Execution, str | None]:
    """Execute; return the reply and its `x-nexus-cache` metadata (None: none)."""
    md = [("x-nexus-caller", caller)]
    if tenant:
        md.append(("x-nexus-tenant", tenant))
    call = stub.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(name=name, inputs=_inputs(**inputs)), metadata=md, timeout=WAIT
    )
    reply = await call
    initial = await call.initial_metadata()
    return reply, dict(initial).get("x-nexus-cache")


@contextlib.asynccontextmanager
async def _served(app: Nexus, envoy: bool = False) -> AsyncIterator[Serving]:
    async with asyncio.timeout(WAIT):
        cm = app.serving(envoy=envoy)
        info = await cm.__aenter__()
    try:
        yield info
    finally:
        async with asyncio.timeout(WAIT):
            await cm.__aexit__(None, None, None)


# -- registration ------------------------------------------------------------------------


@pytest.fixture
def _writer_node() -> Any:
    register_node(CacheTestWriterNode)
    yield
    unregister_node("CacheTestWriterNode")


@pytest.mark.usefixtures("_writer_node")
async def test_workflows_that_write_are_refused_naming_the_node(
    make_app: Callable[..., Nexus],
) -> None:
    app = make_app(workflows=False)
    create = WorkflowBuilder()
    create.add_node("ContactReadNode", "first", {"id": "x"})
    create.add_node("ContactBulkDeleteNode", "wipe", {"all": True})
    with pytest.raises(ValueError, match=r"node 'wipe' \(ContactBulkDeleteNode\) writes"):
        app.register("wipe", create.build(), cache_ttl=30)
    code = WorkflowBuilder()
    code.add_node("PythonCodeNode", "py", {"code": "result = 1"})
    with pytest.raises(ValueError, match=r"node 'py' \(PythonCodeNode\) runs code"):
        app.register("code", code.build(), cache_ttl=30)
    mine = WorkflowBuilder()
    mine.add_node("CacheTestWriterNode", "w", {})
    with pytest.raises(ValueError, match=r"node 'w' .* writes = True"):
        app.register("mine", mine.build(), cache_ttl=30)
    bad: Any
    for bad in (0, -1, True, "30", 10**6):
        with pytest.raises(ValueError, match="cache_ttl"):
            app.register("read", _read_workflow(), cache_ttl=bad)
    assert "wipe" not in app.registry and "read" not in app.registry
    app.register("read", _read_workflow(), cache_ttl=30)  # read-only: accepted
    app.register("read_again", _read_workflow())  # no cache_ttl: anything goes


# -- on gRPC -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_cached_replies_are_keyed_by_principal_tenant_and_inputs(
    make_app: Callable[..., Nexus],
) -> None:
    app = make_app()
    _acme(app)
    async with _served(app) as serving, grpc.aio.insecure_channel(serving.address) as ch:
        stub = wgrpc.WorkflowServiceStub(ch)  # type: ignore[no-untyped-call]
        await _execute(stub, "create_contact", name="Ada", email="ada@x", company="Acme")
        first, how = await _execute(stub, "company_contacts", company="Acme")
        assert how == "miss"
        again, how = await _execute(stub, "company_contacts", company="Acme")
        assert how == "hit"
        assert again == first  # the same reply, the same execution: the body is unchanged
        outputs = json_format.MessageToDict(again.outputs)
        assert outputs["count"]["count"] == 1
        # other inputs, another principal, another tenant: each its own entry
        assert (await _execute(stub, "company_contacts", company="Other"))[1] == "miss"
        bob, how = await _execute(stub, "company_contacts", caller="bob", company="Acme")
        assert how == "miss" and bob.id != first.id
        assert (await _execute(stub, "company_contacts", tenant="t2", company="Acme"))[1] == "miss"
        # a workflow without cache_ttl says nothing
        _, how = await _execute(stub, "acme_contacts")
        assert how is None
        # a request_id bypasses the cache (the idempotency key has its own rules)
        md = [("x-nexus-caller", "alice")]
        req = wpb.ExecuteWorkflowRequest(
            name="company_contacts", inputs=_inputs(company="Acme"), request_id="r-1"
        )
        call = stub.ExecuteWorkflow(req, metadata=md, timeout=WAIT)
        assert (await call).id != first.id
        assert "x-nexus-cache" not in dict(await call.initial_metadata())


async def test_failures_are_not_cached_and_the_ttl_ends_an_entry(
    make_app: Callable[..., Nexus],
) -> None:
    app = make_app(workflows=False)
    app.register("read", _read_workflow(), cache_ttl=0.2)
    async with _served(app) as serving, grpc.aio.insecure_channel(serving.address) as ch:
        stub = wgrpc.WorkflowServiceStub(ch)  # type: ignore[no-untyped-call]
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _execute(stub, "read", id="nobody")
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        db: DataFlow = app.db  # type: ignore[assignment]
        made = await db.ops("Contact").create(name="Ada", email="ada@x")
        one, how = await _execute(stub, "read", id=made["id"])
        assert how == "miss"
        two, how = await _execute(stub, "read", id=made["id"])
        assert how == "hit" and two.id == one.id
        await asyncio.sleep(0.3)  # the TTL itself is what is tested
        three, how = await _execute(stub, "read", id=made["id"])
        assert how == "miss" and three.id != one.id


# -- on REST, through the real Envoy -----------------------------------------------------


async def test_rest_through_envoy_gets_the_cache_header(
    make_app: Callable[..., Nexus], envoy_path: Path
) -> None:
    app = make_app(api_port=0)
    _acme(app)
    async with _served(app, envoy=True) as serving:
        base = f"http://{serving.api_address}"
        async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
            headers = {"x-nexus-caller": "alice"}
            made = await client.post(
                "/workflows/create_contact/execute",
                json={"inputs": {"name": "Ada", "email": "ada@x", "company": "Acme"}},
                headers=headers,
            )
            assert made.status_code == 200, made.text
            assert "x-nexus-cache" not in made.headers
            url = "/v1/workflows/company_contacts:execute"
            body = {"inputs": {"company": "Acme"}}
            first = await client.post(url, json=body, headers=headers)
            assert first.status_code == 200, first.text
            assert first.headers["x-nexus-cache"] == "miss"
            second = await client.post(url, json=body, headers=headers)
            assert second.status_code == 200
            assert second.headers["x-nexus-cache"] == "hit"
            assert second.json() == first.json()
            other = await client.post(url, json=body, headers={"x-nexus-caller": "bob"})
            assert other.headers["x-nexus-cache"] == "miss"
            assert other.json()["id"] != first.json()["id"]


# -- DataFlow's query cache behind the server: keyed by the calling principal ------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
async def test_the_server_keys_dataflows_cache_by_principal(db_url: str) -> None:
    db = DataFlow(db_url, enable_caching=True)

    @db.model
    class Gadget:
        id: str
        name: str = field(unique=True)

    app = Nexus(grpc_port=0, grace_period=2.0)
    app.integrate_dataflow(db)
    try:
        async with _served(app) as serving, grpc.aio.insecure_channel(serving.address) as ch:
            stub = mgrpc.ModelServiceStub(ch)  # type: ignore[no-untyped-call]
            made = await db.ops(Gadget).create(name="g")
            cache = db.cache
            assert cache is not None

            async def get(caller: str) -> Any:
                req = mpb.GetRecordRequest(model="Gadget", id=made["id"])
                md = [("x-nexus-caller", caller)]
                return await stub.GetRecord(req, metadata=md, timeout=WAIT)

            hits, misses = cache.hits, cache.misses
            assert (await get("alice"))["name"] == "g"
            assert (await get("alice"))["name"] == "g"
            assert (cache.hits - hits, cache.misses - misses) == (1, 1)
            assert (await get("bob"))["name"] == "g"  # another principal: its own entry
            assert (cache.hits - hits, cache.misses - misses) == (1, 2)
            # a write through the server ends the entries: the next read is current
            upd = mpb.UpdateRecordRequest(model="Gadget", id=made["id"])
            upd.record.update({"name": "h"})
            await stub.UpdateRecord(upd, metadata=[("x-nexus-caller", "bob")], timeout=WAIT)
            assert (await get("alice"))["name"] == "h"
    finally:
        await db.close()
