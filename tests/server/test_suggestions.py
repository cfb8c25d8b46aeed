""" "Did you mean ...?": unknown node types, outputs, parameters, inputs and workflow
names suggest the closest known name, over gRPC (message, BadRequest and, for workflow
names, ErrorInfo metadata `suggestion`) and in the engine itself."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from mcp import Client

from clients.mcp._server import Adapter
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_server import Serving
from workflow import (
    InvalidInputsError,
    RegistryError,
    WorkflowBuilder,
    WorkflowValidationError,
    closest,
    did_you_mean,
    get_node_class,
)

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
WAIT = 15.0
ROOT = Path(__file__).resolve().parents[2]


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    json_format.ParseDict(values, s)
    return s


def test_closest_picks_the_nearest_name_or_none() -> None:
    known = ["ContactListNode", "ContactCreateNode", "CompanyListNode"]
    assert closest("ContactLstNode", known) == "ContactListNode"
    assert closest("contactlistnode", known) == "ContactListNode"  # case only
    assert closest("Frobnicate", known) is None
    assert closest("x" * 100_000, known) is None
    assert closest("", known) is None
    assert did_you_mean("CompnyListNode", known) == " (did you mean CompanyListNode?)"
    assert did_you_mean("Frobnicate", known) == ""


def test_engine_suggests_node_types_outputs_parameters_and_inputs() -> None:
    b = WorkflowBuilder("typos")
    b.add_node("TestGateNod", "wait", {"gate": "g"})
    b.add_node("TestGateNode", "gate", {"gaet": "g"})
    b.add_node("TestGateNode", "next", {"gate": "h"})
    b.add_connection("gate", "valeu", "next", "value")
    b.add_connection("gate", "value", "next", "vlaue")
    b.add_connection("gat", "value", "next", "gate")
    with pytest.raises(WorkflowValidationError) as caught:
        b.build()
    by_field = {(p.node, p.field): p.message for p in caught.value.problems}
    assert "did you mean TestGateNode?" in by_field[("wait", "")]
    assert "did you mean gate?" in by_field[("gate", "gaet")]
    assert "did you mean value?" in by_field[("gate", "valeu")]
    assert "did you mean value?" in by_field[("next", "vlaue")]
    assert "unknown node (did you mean gate?)" in by_field[("gat", "")]
    with pytest.raises(RegistryError, match=r"did you mean TestBoomNode\?"):
        get_node_class("TestBomNode")

    ok = WorkflowBuilder("one input")
    ok.add_input("value", int, default=0)
    ok.add_node("TestGateNode", "wait", {"gate": "g", "value": "{{value}}"})
    with pytest.raises(InvalidInputsError) as bad:
        ok.build().validate_inputs({"valeu": 1})
    assert [str(e) for e in bad.value.errors] == [
        "valeu: unknown input (did you mean value?) (this workflow's inputs: value)"
    ]


async def test_unknown_workflow_suggests_the_closest_name(
    wf: Any, expect_error: ExpectError
) -> None:
    meta, violations = await expect_error(
        wf.ExecuteWorkflow(wpb.ExecuteWorkflowRequest(name="crate_contact")),
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
        fields=["name"],
    )
    assert meta == {"workflow": "crate_contact", "suggestion": "create_contact"}
    assert "did you mean create_contact?" in violations[0][1]
    try:
        await wf.GetWorkflow(wpb.GetWorkflowRequest(name="acme_contact"), timeout=10)
    except grpc.aio.AioRpcError as err:
        assert err.details() == "workflow 'acme_contact' not found (did you mean acme_contacts?)"
    else:  # pragma: no cover
        raise AssertionError("GetWorkflow of an unknown name succeeded")
    # nothing alike: no suggestion at all
    meta, _ = await expect_error(
        wf.GetWorkflow(wpb.GetWorkflowRequest(name="zzzzzz")),
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
    )
    assert meta == {"workflow": "zzzzzz"}


async def test_registration_and_inputs_suggest_over_grpc(
    wf: Any, expect_error: ExpectError
) -> None:
    d = wpb.WorkflowDefinition()
    d.nodes.add(id="list", type="ContactLstNode")
    d.nodes.add(id="create", type="ContactCreateNode", params=_struct({"name": "n", "emial": "e"}))
    _, violations = await expect_error(
        wf.RegisterWorkflow(wpb.RegisterWorkflowRequest(name="typos", definition=d)),
        INVALID,
        "WORKFLOW_INVALID",
    )
    by_field = dict(violations)
    assert "did you mean ContactListNode?" in by_field["definition.nodes[0]"]
    assert "did you mean email?" in by_field["definition.nodes[1].params.emial"]

    _, violations = await expect_error(
        wf.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(
                name="create_contact", inputs=_struct({"name": "Ann", "emial": "a@b.c"})
            )
        ),
        INVALID,
        "INPUTS_INVALID",
    )
    by_field = dict(violations)
    assert "did you mean email?" in by_field["inputs.emial"]


async def test_mcp_suggests_the_closest_tool_and_shows_the_servers_hint(
    serving: Serving, channel: grpc.aio.Channel
) -> None:
    adapter = Adapter(serving.address, poll_interval=60)
    with anyio.fail_after(WAIT):
        async with Client(adapter.server) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert "run_create_contact" in names
            res = await client.call_tool("run_crate_contact", {"name": "A", "email": "a@b.c"})
            assert res.is_error
            text = res.content[0].text  # type: ignore[union-attr]
            assert text == "unknown tool 'run_crate_contact' (did you mean run_create_contact?)"


async def test_the_cli_shows_the_suggestion(serving: Serving, channel: grpc.aio.Channel) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", "-s", serving.address,
        "run", "crate_contact", "--name", "Ann",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    async with asyncio.timeout(WAIT * 2):
        out, err = await proc.communicate()
    assert proc.returncode == 3, (out, err)  # NOT_FOUND
    text = err.decode()
    assert "workflow 'crate_contact' not found (did you mean create_contact?)" in text
    assert "suggestion=create_contact" in text
