"""The server keeps the `x-nexus-request-id` header honest (gateway/_request_id.py): an
Envoy in front of replicas retries a write that carries it, so a header that does not
repeat the request's own `request_id` is refused before anything runs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from dataflow import DataFlow
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus
from workflow import WorkflowBuilder

HEADER = "x-nexus-request-id"


@pytest.fixture
async def address(tmp_path: Path) -> AsyncIterator[str]:
    app = Nexus(grpc_port=0, api_port=None, mcp_port=None, enable_auth=False)
    db = DataFlow(f"sqlite:///{tmp_path / 'app.db'}")

    @db.model
    class Note:
        id: str
        text: str

    app.integrate_dataflow(db)
    wf = WorkflowBuilder("Write a note.")
    wf.add_input("text", str)
    wf.add_node("NoteCreateNode", "create", {"text": "{{text}}"})
    app.register("write_note", wf.build())
    try:
        async with app.serving() as info:
            yield info.address
    finally:
        await db.close()  # its models' node types are released with it


def _violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


def _execute(request_id: str) -> wpb.ExecuteWorkflowRequest:
    inputs = struct_pb2.Struct()
    inputs.update({"text": "hello"})
    return wpb.ExecuteWorkflowRequest(name="write_note", inputs=inputs, request_id=request_id)


async def test_a_header_must_repeat_the_request_id(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        workflows = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        models = mgrpc.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        refused = [
            # another key, or none in the body
            (workflows.ExecuteWorkflow, _execute("a"), "b", "must repeat"),
            (workflows.ExecuteWorkflow, _execute(""), "a", "must repeat"),
            # a request that takes no request_id at all
            (workflows.GetExecution, wpb.GetExecutionRequest(id="x"), "a", "takes none"),
        ]
        for method, request, header, words in refused:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await method(request, metadata=((HEADER, header),), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in (err.value.details() or "") and HEADER in (err.value.details() or "")
            assert _violations(err.value) == ["request_id"]
        # nothing ran: no note was written
        count = await models.CountRecords(mpb.CountRecordsRequest(model="Note"), timeout=10)
        assert count.count == 0

        # the header repeating the key: accepted, and idempotent as ever
        first = await workflows.ExecuteWorkflow(_execute("k"), metadata=((HEADER, "k"),))
        again = await workflows.ExecuteWorkflow(_execute("k"), metadata=((HEADER, "k"),))
        assert first.id == again.id and first.state == wpb.Execution.STATE_SUCCEEDED
        # without the header, nothing changes
        plain = await workflows.ExecuteWorkflow(_execute("other"))
        assert plain.state == wpb.Execution.STATE_SUCCEEDED
        count = await models.CountRecords(mpb.CountRecordsRequest(model="Note"), timeout=10)
        assert count.count == 2
