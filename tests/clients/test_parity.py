"""The same workflow call through every channel returns the same outputs.

gRPC (the stubs, proto3 JSON with original field names), REST (the real Envoy in front
of the same server, on both routes of ExecuteWorkflow), the CLI (`--output json`) and
MCP (the tool's structured content).
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
