"""The same calls over gRPC (straight to the server) and over REST (through Envoy) give
the same JSON documents: proto3 JSON, field names as declared, primitives printed (and,
on the typed routes, a record's null fields as null)."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
from google.protobuf import json_format, message
from google.rpc import error_details_pb2  # noqa: F401 (registers the detail types)
from grpc_status import rpc_status

from nexus_api.nexus.model.v1 import model_service_pb2 as m
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg
from nexus_server import Serving


def _doc(msg: message.Message) -> dict[str, Any]:
    return json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _grpc_error(call: Any) -> dict[str, Any]:
    try:
        call()
    except grpc.RpcError as exc:
        status = rpc_status.from_call(exc)
        assert status is not None
        return _doc(status)
    raise AssertionError("the call succeeded")


def test_workflow_calls_match(
    client: httpx.Client, grpc_channel: grpc.Channel, unique: str
) -> None:
    stub = wg.WorkflowServiceStub(grpc_channel)  # type: ignore[no-untyped-call]
    rest = client.get("/v1/workflows/create_contact").json()
    assert rest == _doc(stub.GetWorkflow(w.GetWorkflowRequest(name="create_contact")))
    rest = client.get("/v1/workflows", params={"page_size": 2}).json()
    assert rest == _doc(stub.ListWorkflows(w.ListWorkflowsRequest(page_size=2)))

    executed = client.post(
        "/workflows/create_contact/execute",
        json={"inputs": {"name": "P", "email": f"p.{unique}@x.org"}},
    ).json()
    got = stub.GetExecution(w.GetExecutionRequest(id=executed["id"]))
    assert executed == _doc(got)
    assert client.get(f"/v1/executions/{executed['id']}").json() == _doc(got)


def test_errors_match(client: httpx.Client, grpc_channel: grpc.Channel) -> None:
    stub = wg.WorkflowServiceStub(grpc_channel)  # type: ignore[no-untyped-call]
    rest = client.get("/v1/workflows/nope").json()
    assert rest == _grpc_error(lambda: stub.GetWorkflow(w.GetWorkflowRequest(name="nope")))
    rest = client.post("/workflows/create_contact/execute", json={"inputs": {"x": 1}}).json()
    req = w.ExecuteWorkflowRequest(name="create_contact")
    req.inputs.update({"x": 1})
    assert rest == _grpc_error(lambda: stub.ExecuteWorkflow(req))


def test_record_calls_match(
    client: httpx.Client, grpc_channel: grpc.Channel, serving: Serving, unique: str
) -> None:
    created = client.post(
        "/v1/contacts", json={"name": "Q", "email": f"q.{unique}@x.org", "score": 4}
    ).json()
    # the typed service, called with the server's own runtime descriptors
    typed = serving.typed
    get = grpc_channel.unary_unary(
        "/nexus.models.v1.ContactService/GetContact",
        request_serializer=lambda r: r.SerializeToString(),
        response_deserializer=typed.message_class("Contact").FromString,
    )
    request = typed.message_class("GetContactRequest")(id=created["id"])
    # REST prints every field of the record, the null company as null; proto3 JSON
    # leaves an unset field out
    assert created["company"] is None
    assert {k: v for k, v in created.items() if v is not None} == _doc(get(request))

    stub = mg.ModelServiceStub(grpc_channel)  # type: ignore[no-untyped-call]
    generic = stub.GetRecord(m.GetRecordRequest(model="Contact", id=created["id"]))
    assert client.get(f"/v1/models/Contact/records/{created['id']}").json() == _doc(generic)
    listed = stub.ListRecords(m.ListRecordsRequest(model="Contact", page_size=3))
    rest = client.get("/v1/models/Contact/records", params={"page_size": 3}).json()
    assert rest == _doc(listed)
    assert client.get("/v1/models/Contact").json() == _doc(
        stub.GetModel(m.GetModelRequest(name="Contact"))
    )
