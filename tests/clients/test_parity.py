"""One call, every channel, one JSON document (docs/api.md, "One JSON document").

gRPC (the stubs, proto3 JSON with original field names), REST (the real Envoy in front
of the same server), the CLI (`--output json`, a subprocess) and MCP (the tool's
structured content, over stdio): workflows (both routes of ExecuteWorkflow), the generic
record routes (get, list with a filter, count, search, bulk create) and the typed ones
(`ContactService`: get, list, count, search, bulk create; the CLI reaches them with
`nexus call`). Every field of a record is printed, a null one as `null`, in a record
`Struct` and in a typed record alike (REST's typed routes answer the server's own JSON
for that); a 64-bit integer field of a message is text, an int in a `Struct` a number up
to +-2^53: the same on every channel.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict
from mcp import Client, StdioServerParameters

from clients._grpc import DynamicMethods, to_json
from nexus_api.nexus.model.v1 import model_service_pb2 as m
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg

WAIT = 20.0
ROOT = Path(__file__).resolve().parents[2]


def _grpc_execute(address: str, name: str, inputs: dict[str, Any]) -> Any:
    request = w.ExecuteWorkflowRequest(name=name, inputs=struct_pb2.Struct())
    request.inputs.update(inputs)
    with grpc.insecure_channel(address) as channel:
        stub = wg.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        execution = stub.ExecuteWorkflow(request, timeout=WAIT)
    return MessageToDict(execution, preserving_proto_field_name=True)


def _rest_execute(base_url: str, path: str, inputs: dict[str, Any]) -> Any:
    with httpx.Client(base_url=base_url, timeout=WAIT) as client:
        response = client.post(path, json={"inputs": inputs})
    assert response.status_code == 200, response.text
    return response.json()


async def test_same_outputs_over_grpc_rest_cli_and_mcp(
    server: Any, rest_url: str, cli: Any, unique: Any
) -> None:
    name = unique("Parity")
    for i in range(2):
        inputs = {"name": f"{name} {i}", "email": unique("parity") + "@x.org"}
        await anyio.to_thread.run_sync(_grpc_execute, server.address, "create_contact", inputs)
    query = {"query": name.lower(), "limit": 5}

    # gRPC
    via_grpc = await anyio.to_thread.run_sync(
        _grpc_execute, server.address, "search_contacts", query
    )
    outputs = via_grpc["outputs"]
    assert len(outputs["search"]["records"]) == 2

    # CLI
    result = await anyio.to_thread.run_sync(
        lambda: cli("-o", "json", "run", "search_contacts", "--inputs", json.dumps(query))
    )
    assert result.code == 0, result.err
    assert result.json()["outputs"] == outputs
    assert result.json()["inputs"] == via_grpc["inputs"]

    # MCP
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_SERVER=server.address, PYTHONPATH=str(ROOT))
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "clients.mcp"], env=env, cwd=str(ROOT)
    )
    async with Client(params, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            tool = await client.call_tool("run_search_contacts", query)
    assert not tool.is_error, tool.content
    assert tool.structured_content == outputs

    # REST (Envoy): the AIP route and the original one (an additional binding)
    for path in ("/v1/workflows/search_contacts:execute", "/workflows/search_contacts/execute"):
        body = await anyio.to_thread.run_sync(_rest_execute, rest_url, path, query)
        assert body["outputs"] == outputs, path
        assert body["inputs"] == via_grpc["inputs"], path
        assert body["workflow"] == via_grpc["workflow"], path


def test_cli_json_is_the_grpc_document(server: Any, cli: Any, unique: Any) -> None:
    """`--output json` prints exactly the proto3 JSON document of the response, default
    values included as REST prints them (tests/clients/test_cli_first_hour.py compares it
    with the REST body itself)."""
    r = cli("-o", "json", "workflows", "get", "search_contacts")
    assert r.code == 0, r.err
    with grpc.insecure_channel(server.address) as channel:
        stub = wg.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        wf = stub.GetWorkflow(w.GetWorkflowRequest(name="search_contacts"), timeout=WAIT)
    assert r.json() == MessageToDict(
        wf, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


async def _mcp(address: str, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """The structured results of `calls`, made in one MCP session over stdio."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_SERVER=address, PYTHONPATH=str(ROOT))
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "clients.mcp"], env=env, cwd=str(ROOT)
    )
    out = []
    async with Client(params, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT * 2):
            for name, args in calls:
                result = await client.call_tool(name, args)
                assert not result.is_error, (name, result.content)
                out.append(result.structured_content)
    return out


def _rest(method: str, base_url: str, path: str, body: Any = None) -> Any:
    with httpx.Client(base_url=base_url, timeout=WAIT) as client:
        response = client.request(method, path, json=body)
    assert response.status_code == 200, (path, response.text)
    return response.json()


def test_record_routes_are_one_document_on_every_channel(
    server: Any, rest_url: str, cli: Any, unique: Any
) -> None:
    """The generic record routes: a record is a `Struct`, nulls printed as `null`."""
    company = unique("Parity Co")
    key = unique("bulk-key")
    people = [
        {"name": f"Ada {company}", "email": unique("ada") + "@x.org", "company": company},
        {"name": f"Bob {company}", "email": unique("bob") + "@x.org", "company": company},
    ]
    bulk = m.BulkCreateRecordsRequest(model="Contact", request_id=key)
    for person in people:
        bulk.records.add().update(person)
    with grpc.insecure_channel(server.address) as channel:
        stub = mg.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        # bulk create: the same request_id on every channel returns the first result
        created = to_json(stub.BulkCreateRecords(bulk, timeout=WAIT))
        assert created == {"created_count": "2"}  # int64: text
        alone = to_json(
            stub.CreateRecord(
                m.CreateRecordRequest(
                    model="Contact",
                    record=_struct({"name": "Nul", "email": unique("n") + "@x.org"}),
                ),
                timeout=WAIT,
            )
        )
        flt = {"company": company}
        listed = to_json(
            stub.ListRecords(
                m.ListRecordsRequest(model="Contact", filter=_struct(flt), order_by="name"),
                timeout=WAIT,
            )
        )
        ada = listed["records"][0]
        got = to_json(
            stub.GetRecord(m.GetRecordRequest(model="Contact", id=ada["id"]), timeout=WAIT)
        )
        counted = to_json(
            stub.CountRecords(
                m.CountRecordsRequest(model="Contact", filter=_struct(flt)), timeout=WAIT
            )
        )
        searched = to_json(
            stub.SearchRecords(
                m.SearchRecordsRequest(model="Contact", q="ada", filter=_struct(flt)), timeout=WAIT
            )
        )
    assert alone["company"] is None  # a null is printed, as null
    assert got == ada and got["score"] == 0  # an int in a Struct: a number (exact)
    assert [r["name"] for r in listed["records"]] == [p["name"] for p in people]
    assert counted == {"count": "2"}
    assert [r["id"] for r in searched["records"]] == [ada["id"]]

    # REST through Envoy
    bulk_body = {"records": people, "request_id": key}
    assert _rest("POST", rest_url, "/v1/models/Contact/records:bulkCreate", bulk_body) == created
    assert _rest("GET", rest_url, f"/v1/models/Contact/records/{alone['id']}") == alone
    assert _rest("GET", rest_url, f"/v1/models/Contact/records/{ada['id']}") == got
    body = {"filter": flt, "order_by": "name"}
    assert _rest("POST", rest_url, "/v1/models/Contact/records:search", body) == listed
    assert _rest("POST", rest_url, "/v1/models/Contact/records:count", {"filter": flt}) == counted
    body = {"q": "ada", "filter": flt}
    assert _rest("POST", rest_url, "/v1/models/Contact/records:fullTextSearch", body) == searched

    # the CLI
    def on_cli(*args: str) -> Any:
        result = cli("-o", "json", *args)
        assert result.code == 0, (args, result.err)
        return result.json()

    request = {"model": "Contact", "records": people, "request_id": key}
    assert (
        on_cli("call", "ModelService/BulkCreateRecords", "--json", json.dumps(request)) == created
    )
    assert on_cli("contacts", "get", alone["id"]) == alone
    assert on_cli("contacts", "get", ada["id"]) == got
    assert on_cli("contacts", "list", "--filter", json.dumps(flt), "--order-by", "name") == listed
    assert on_cli("contacts", "count", "--filter", json.dumps(flt)) == counted
    assert on_cli("contacts", "search", "ada", "--filter", json.dumps(flt)) == searched

    # MCP
    via_mcp = anyio.run(
        _mcp,
        server.address,
        [
            ("contacts_get", {"id": alone["id"]}),
            ("contacts_get", {"id": ada["id"]}),
            ("contacts_list", {"filter": flt, "order_by": "name"}),
            ("contacts_count", {"filter": flt}),
            ("contacts_search", {"query": "ada", "filter": flt}),
        ],
    )
    assert via_mcp == [alone, got, listed, counted, searched]


def test_typed_routes_are_one_document_on_every_channel(
    server: Any, rest_url: str, cli: Any, unique: Any
) -> None:
    """The typed routes (`ContactService`): proto3 JSON of the typed messages, int64
    fields as text, every field of a record printed and a null one `null` (only the
    projected ones with `fields`), alike over gRPC, REST and `nexus call`."""
    company = unique("Typed Co")
    key, create_key = unique("typed-bulk"), unique("typed-create")
    people = [
        {"name": f"Cy {company}", "email": unique("cy") + "@x.org", "company": company},
        {"name": f"Di {company}", "email": unique("di") + "@x.org", "company": company},
    ]
    lone = {"name": f"Ed {company}", "email": unique("ed") + "@x.org"}
    flt = {"name": {"$like": f"% {company}"}}
    calls: list[tuple[str, str, str, dict[str, Any]]] = [
        # (RPC, HTTP method, path, the request as JSON: the REST body or query)
        (
            "BulkCreateContacts",
            "POST",
            "/v1/contacts:bulkCreate",
            {"contacts": people, "request_id": key},
        ),
        ("CreateContact", "POST", "/v1/contacts", {"contact": lone, "request_id": create_key}),
        ("ListContacts", "POST", "/v1/contacts:search", {"filter": flt, "order_by": "name"}),
        ("CountContacts", "POST", "/v1/contacts:count", {"filter": flt}),
        ("SearchContacts", "POST", "/v1/contacts:fullTextSearch", {"q": "cy", "filter": flt}),
        (
            "ListContacts",
            "POST",
            "/v1/contacts:search",
            {"filter": flt, "order_by": "name", "fields": ["name", "company"]},
        ),
    ]
    with grpc.insecure_channel(server.address) as channel:
        methods = DynamicMethods(channel)
        via_grpc = [
            next(iter(methods.call(f"ContactService/{rpc}", req, timeout=WAIT)))
            for rpc, _, _, req in calls
        ]
        listed = via_grpc[2]
        ed = next(c for c in listed["contacts"] if c["name"] == lone["name"])
        got = next(iter(methods.call("ContactService/GetContact", {"id": ed["id"]}, timeout=WAIT)))
    assert via_grpc[0] == {"affected": "2"}  # int64: text
    assert via_grpc[3] == {"count": "3"}
    assert [c["name"] for c in listed["contacts"]] == [p["name"] for p in people] + [lone["name"]]
    assert got["company"] is None and got["score"] == "0"  # null: null; int64: text
    assert list(got) == [
        "id", "name", "email", "company", "score", "created_at", "updated_at"
    ]  # fmt: skip
    assert got == ed == via_grpc[1]
    assert via_grpc[5]["contacts"] == [
        {"name": p["name"], "company": p.get("company")} for p in [*people, lone]
    ]  # a projection: those fields only, Ed's null company as null

    for (rpc, verb, path, req), want in zip(calls, via_grpc, strict=True):
        body = dict(req)
        if rpc == "CreateContact":
            body = {**lone}  # the body is the contact; request_id in the query
            path = f"{path}?request_id={create_key}"
        assert _rest(verb, rest_url, path, body) == want, rpc
        result = cli("-o", "json", "call", f"ContactService/{rpc}", "--json", json.dumps(req))
        assert result.code == 0, (rpc, result.err)
        assert result.json() == want, rpc
    assert _rest("GET", rest_url, f"/v1/contacts/{ed['id']}") == got
    result = cli(
        "-o", "json", "call", "ContactService/GetContact", "--json", json.dumps({"id": ed["id"]})
    )
    assert result.code == 0, result.err
    assert result.json() == got


def _struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(doc)
    return s
