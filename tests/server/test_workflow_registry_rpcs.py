"""WorkflowService over a real server: ListWorkflows, GetWorkflow, RegisterWorkflow,
DeleteWorkflow (success and every error path), on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import Nexus
from nexus_server._registry import WorkflowRegistry

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
BUILTIN = ["acme_contacts", "boom", "create_and_read", "create_contact", "gated", "read_contact"]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def params(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def greeting_definition(prefix: str = "Dear") -> wpb.WorkflowDefinition:
    """Creates a contact named `<prefix> <name>` (an embedded placeholder)."""
    d = wpb.WorkflowDefinition(description="Create a greeted contact.")
    d.nodes.add(
        id="create", type="ContactCreateNode", params=params(name=prefix + " {{name}}")
    ).params.update({"email": "{{email}}"})
    d.inputs.add(name="email", type="str", description="their email")
    return d


async def test_list_workflows_pages_of_one(wf: Any) -> None:
    names: list[str] = []
    token = ""
    for _ in range(len(BUILTIN) + 1):
        resp = await wf.ListWorkflows(wpb.ListWorkflowsRequest(page_size=1, page_token=token))
        assert len(resp.workflows) == 1
        names.append(resp.workflows[0].name)
        token = resp.next_page_token
        if not token:
            break
    assert names == BUILTIN
    everything = await wf.ListWorkflows(wpb.ListWorkflowsRequest())
    assert [w.name for w in everything.workflows] == BUILTIN
    assert everything.next_page_token == ""
    assert all(w.builtin for w in everything.workflows)


async def test_list_workflows_rejects_bad_token_and_size(
    wf: Any, expect_error: ExpectError
) -> None:
    await expect_error(
        wf.ListWorkflows(wpb.ListWorkflowsRequest(page_token="%%% not a token %%%")),
        INVALID,
        "PAGE_TOKEN_INVALID",
        fields=["page_token"],
    )
    await expect_error(
        wf.ListWorkflows(wpb.ListWorkflowsRequest(page_token="YWJj")),  # base64 of "abc"
        INVALID,
        "PAGE_TOKEN_INVALID",
        fields=["page_token"],
    )
    await expect_error(
        wf.ListWorkflows(wpb.ListWorkflowsRequest(page_size=-1)),
        INVALID,
        "REQUEST_INVALID",
        fields=["page_size"],
    )


async def test_get_workflow_has_typed_inputs_and_outputs(wf: Any) -> None:
    w = await wf.GetWorkflow(wpb.GetWorkflowRequest(name="create_contact"))
    assert w.name == "create_contact"
    assert w.description == "Create a contact."
    assert w.builtin
    inputs = {i.name: i for i in w.inputs}
    assert {n: (i.type, i.required) for n, i in inputs.items()} == {
        "name": ("str", True),
        "email": ("str", True),
        "company": ("str | None", False),
        "score": ("int", False),
    }
    assert inputs["name"].description == "the contact's full name"
    assert inputs["score"].default.number_value == 0
    assert inputs["company"].default.WhichOneof("kind") == "null_value"
    assert [(t.node_id, t.param) for t in inputs["email"].targets] == [("create", "email")]
    outputs = {(o.node_id, o.name): o.type for o in w.outputs}
    assert outputs[("create", "email")] == "str"
    assert outputs[("create", "score")] == "int"
    assert outputs[("create", "company")] == "str | None"
    assert [n.type for n in w.definition.nodes] == ["ContactCreateNode"]
    assert w.update_time.seconds > 0

    gated = await wf.GetWorkflow(wpb.GetWorkflowRequest(name="gated"))
    assert {i.name: i.type for i in gated.inputs} == {"gate": "str", "value": "int"}
    assert [(o.node_id, o.name, o.type) for o in gated.outputs] == [("wait", "value", "int")]


async def test_get_workflow_not_found(wf: Any, expect_error: ExpectError) -> None:
    meta, _ = await expect_error(
        wf.GetWorkflow(wpb.GetWorkflowRequest(name="nope")),
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
        fields=["name"],
    )
    assert meta["workflow"] == "nope"


async def test_register_then_execute_a_declarative_workflow(wf: Any) -> None:
    w = await wf.RegisterWorkflow(
        wpb.RegisterWorkflowRequest(name="greet", definition=greeting_definition())
    )
    assert w.name == "greet" and not w.builtin
    assert {i.name: (i.type, i.required) for i in w.inputs} == {
        "email": ("str", True),
        "name": ("str", True),  # embedded in a longer string: text
    }
    assert (await wf.GetWorkflow(wpb.GetWorkflowRequest(name="greet"))).definition == w.definition
    listed = await wf.ListWorkflows(wpb.ListWorkflowsRequest())
    assert "greet" in [x.name for x in listed.workflows]

    ex = await wf.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(name="greet", inputs=params(name="Ada", email="ada@x.io")),
        timeout=10,
    )
    assert ex.state == wpb.Execution.STATE_SUCCEEDED
    assert ex.outputs["create"]["name"] == "Dear Ada"
    assert ex.outputs["create"]["email"] == "ada@x.io"


async def test_register_is_idempotent_by_content_and_replace_needs_the_flag(
    wf: Any, expect_error: ExpectError
) -> None:
    req = wpb.RegisterWorkflowRequest(name="greet", definition=greeting_definition())
    first = await wf.RegisterWorkflow(req)
    again = await wf.RegisterWorkflow(req)  # the same definition: a safe retry
    assert again.definition == first.definition

    other = wpb.RegisterWorkflowRequest(name="greet", definition=greeting_definition("Hi"))
    await expect_error(
        wf.RegisterWorkflow(other),
        grpc.StatusCode.ALREADY_EXISTS,
        "WORKFLOW_ALREADY_EXISTS",
        fields=["name"],
    )
    still = await wf.GetWorkflow(wpb.GetWorkflowRequest(name="greet"))
    assert still.definition == first.definition

    other.replace = True
    replaced = await wf.RegisterWorkflow(other)
    ex = await wf.ExecuteWorkflow(
        wpb.ExecuteWorkflowRequest(name="greet", inputs=params(name="Bo", email="bo@x.io")),
        timeout=10,
    )
    assert ex.outputs["create"]["name"] == "Hi Bo"
    assert replaced.update_time.ToDatetime() >= first.update_time.ToDatetime()


async def test_validate_only_registers_nothing(wf: Any, expect_error: ExpectError) -> None:
    w = await wf.RegisterWorkflow(
        wpb.RegisterWorkflowRequest(
            name="greet", definition=greeting_definition(), validate_only=True
        )
    )
    assert sorted(i.name for i in w.inputs) == ["email", "name"]
    await expect_error(
        wf.GetWorkflow(wpb.GetWorkflowRequest(name="greet")),
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
    )


async def test_invalid_definition_lists_every_problem(wf: Any, expect_error: ExpectError) -> None:
    d = wpb.WorkflowDefinition()
    d.nodes.add(id="create", type="ContactCreateNode", params=params(name="{{name}}", colour=1))
    d.nodes.add(id="ghost", type="NoSuchNode")
    d.connections.add(source="create", output="nope", target="missing", input="x")
    d.inputs.add(name="unused", type="str")
    _, violations = await expect_error(
        wf.RegisterWorkflow(wpb.RegisterWorkflowRequest(name="broken", definition=d)),
        INVALID,
        "WORKFLOW_INVALID",
    )
    fields = sorted(f for f, _ in violations)
    assert fields == sorted(
        [
            "definition.nodes[0].params.colour",  # unknown parameter
            "definition.nodes[0].params.email",  # required parameter not supplied
            "definition.nodes[1]",  # unknown node type
            "definition.connections[0]",  # connection to an unknown node
            "definition.inputs[0]",  # declared input used by no node
        ]
    ), violations
    by_field = dict(violations)
    assert "NoSuchNode" in by_field["definition.nodes[1]"]
    assert "unknown parameter" in by_field["definition.nodes[0].params.colour"]
    await expect_error(
        wf.GetWorkflow(wpb.GetWorkflowRequest(name="broken")),
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
    )


async def test_cycle_and_missing_definition(wf: Any, expect_error: ExpectError) -> None:
    d = wpb.WorkflowDefinition()
    d.nodes.add(id="a", type="ContactReadNode")
    d.nodes.add(id="b", type="ContactReadNode")
    d.connections.add(source="a", output="id", target="b", input="id")
    d.connections.add(source="b", output="id", target="a", input="id")
    _, violations = await expect_error(
        wf.RegisterWorkflow(wpb.RegisterWorkflowRequest(name="loop", definition=d)),
        INVALID,
        "WORKFLOW_INVALID",
    )
    assert len(violations) == 1 and "cycle" in violations[0][1]
    await expect_error(
        wf.RegisterWorkflow(wpb.RegisterWorkflowRequest(name="empty")),
        INVALID,
        "REQUEST_INVALID",
        fields=["definition"],
    )


def code_definition() -> wpb.WorkflowDefinition:
    d = wpb.WorkflowDefinition()
    d.nodes.add(
        id="run", type="PythonCodeNode", params=params(code="result = {'n': n * 2}", n="{{n}}")
    )
    return d


async def test_code_nodes_are_refused_by_default(wf: Any, expect_error: ExpectError) -> None:
    req = wpb.RegisterWorkflowRequest(name="evil", definition=code_definition())
    await expect_error(
        wf.RegisterWorkflow(req),
        grpc.StatusCode.PERMISSION_DENIED,
        "CODE_NODES_DISABLED",
        fields=["definition.nodes[0].type"],
    )
    req.validate_only = True  # not even a dry run tells a different story
    await expect_error(
        wf.RegisterWorkflow(req), grpc.StatusCode.PERMISSION_DENIED, "CODE_NODES_DISABLED"
    )
    await expect_error(
        wf.GetWorkflow(wpb.GetWorkflowRequest(name="evil")),
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
    )


async def test_code_nodes_allowed_when_the_server_says_so(
    make_app: Callable[..., Nexus],
    connect: Any,
) -> None:
    app = make_app(allow_code_nodes=True, workflows=False)
    async with app.serving() as s, connect(s) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        await stub.RegisterWorkflow(
            wpb.RegisterWorkflowRequest(name="double", definition=code_definition())
        )
        ex = await stub.ExecuteWorkflow(
            wpb.ExecuteWorkflowRequest(name="double", inputs=params(n=21)), timeout=10
        )
        assert ex.outputs["run"]["n"] == 42


BAD_NAMES = ["", "1abc", "_x", "has space", "dash-ed", "Upper", "semi;colon", "../etc", "a" * 61]


async def test_workflow_names_that_could_never_be_called(
    wf: Any, expect_error: ExpectError
) -> None:
    for name in BAD_NAMES:
        await expect_error(
            wf.RegisterWorkflow(
                wpb.RegisterWorkflowRequest(name=name, definition=greeting_definition())
            ),
            INVALID,
            "WORKFLOW_NAME_INVALID",
            fields=["name"],
        )
    listed = await wf.ListWorkflows(wpb.ListWorkflowsRequest())
    assert [w.name for w in listed.workflows] == BUILTIN


async def test_longest_valid_name(wf: Any) -> None:
    name = "a" + "b_9" * 19 + "z" * 2  # 60 characters
    assert len(name) == 60
    w = await wf.RegisterWorkflow(
        wpb.RegisterWorkflowRequest(name=name, definition=greeting_definition())
    )
    assert w.name == name


async def test_delete_workflow(wf: Any, expect_error: ExpectError) -> None:
    await wf.RegisterWorkflow(
        wpb.RegisterWorkflowRequest(name="greet", definition=greeting_definition())
    )
    await wf.DeleteWorkflow(wpb.DeleteWorkflowRequest(name="greet"))
    await expect_error(
        wf.GetWorkflow(wpb.GetWorkflowRequest(name="greet")),
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
    )
    await expect_error(
        wf.DeleteWorkflow(wpb.DeleteWorkflowRequest(name="greet")),
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
        fields=["name"],
    )
    await expect_error(
        wf.ExecuteWorkflow(wpb.ExecuteWorkflowRequest(name="greet", inputs=params())),
        grpc.StatusCode.NOT_FOUND,
        "WORKFLOW_NOT_FOUND",
    )


async def test_builtin_workflows_are_neither_deleted_nor_replaced(
    wf: Any, expect_error: ExpectError
) -> None:
    await expect_error(
        wf.DeleteWorkflow(wpb.DeleteWorkflowRequest(name="create_contact")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WORKFLOW_NOT_DELETABLE",
    )
    await expect_error(
        wf.RegisterWorkflow(
            wpb.RegisterWorkflowRequest(
                name="create_contact", definition=greeting_definition(), replace=True
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "WORKFLOW_NOT_DELETABLE",
    )
    w = await wf.GetWorkflow(wpb.GetWorkflowRequest(name="create_contact"))
    assert w.builtin and [i.name for i in w.inputs][:2] == ["name", "email"]


async def test_an_unexpected_failure_is_internal_and_says_nothing(
    wf: Any,
    expect_error: ExpectError,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(self: WorkflowRegistry) -> list[str]:
        raise RuntimeError("secret detail: /srv/credentials.txt")

    monkeypatch.setattr(WorkflowRegistry, "names", broken)
    caplog.set_level(logging.ERROR, logger="nexus_server")
    try:
        await wf.ListWorkflows(wpb.ListWorkflowsRequest(), timeout=10)
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (err.details() or "")
        assert "secret" not in str(err.trailing_metadata())
        assert "Traceback" not in str(err.trailing_metadata())
    else:
        raise AssertionError("ListWorkflows did not fail")
    await expect_error(
        wf.ListWorkflows(wpb.ListWorkflowsRequest(), timeout=10),
        grpc.StatusCode.INTERNAL,
        "INTERNAL_ERROR",
    )
    logged = [r for r in caplog.records if r.exc_info and "secret detail" in str(r.exc_info[1])]
    assert logged  # the details are in the server's log, not in the answer
