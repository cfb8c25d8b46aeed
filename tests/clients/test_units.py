"""Unit tests of the clients' own logic against a small synchronous test servicer.

pytest-grpc's fixtures (`grpc_add_to_server`, `grpc_servicer`, `grpc_stub_cls`, here
module-scoped) host the servicer on a real sync gRPC server; the plugin cannot host the
grpc.aio server, which the integration tests start themselves.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, struct_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from clients._grpc import (
    EXIT_CONFLICT,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    ApiFailure,
    DynamicMethods,
    normalize,
    server_address,
    type_spec,
)
from clients.cli._app import build_field_params, build_input_params, exit_code_of
from clients.cli._import import RowError, coerce_csv_row
from clients.mcp._server import validate
from clients.mcp._tools import REQUEST_ID_SCHEMA, model_tools, tool_name, workflow_tool
from nexus_api.nexus.model.v1 import model_service_pb2 as m
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg


def _value(v: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    if v is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(v, bool):
        out.bool_value = v
    elif isinstance(v, int | float):
        out.number_value = v
    else:
        out.string_value = v
    return out


def _workflow() -> w.Workflow:
    wf = w.Workflow(name="greet", description="Greets people.")
    wf.inputs.add(name="who", type="str", required=True, description="whom to greet")
    wf.inputs.add(name="times", type="int", default=_value(5), description="how often")
    wf.inputs.add(name="loud_voice", type="bool", default=_value(False))
    wf.inputs.add(name="extra", type="dict", description="anything else")
    wf.inputs.add(name="nick", type="str | None", default=_value(None))
    wf.outputs.add(node_id="say", name="text", type="str")
    wf.outputs.add(node_id="say", name="count", type="int")
    wf.definition.nodes.add(id="say", type="SayNode")
    return wf


def _model() -> m.Model:
    md = m.Model(name="Ticket", collection="tickets", description="A support ticket.")
    md.fields.add(name="id", type="str", primary_key=True, generated=True)
    md.fields.add(name="title", type="str", description="what is wrong")
    md.fields.add(name="priority", type="enum", enum_values=[_value("low"), _value("high")])
    md.fields.add(name="points", type="float", nullable=True, default=_value(None))
    md.fields.add(name="created_at", type="datetime", managed=True)
    return md


def _abort(
    context: grpc.ServicerContext,
    code: int,
    reason: str,
    message: str,
    violations: tuple[tuple[str, str], ...] = (),
    **meta: str,
) -> None:
    details: list[any_pb2.Any] = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="nexus", metadata=meta))
    details.append(info)
    if violations:
        bad = error_details_pb2.BadRequest()
        for f, d in violations:
            bad.field_violations.add(field=f, description=d)
        packed = any_pb2.Any()
        packed.Pack(bad)
        details.append(packed)
    status = status_pb2.Status(code=code, message=message, details=details)
    context.abort_with_status(rpc_status.to_status(status))


class Workflows(wg.WorkflowServiceServicer):
    """A synchronous WorkflowService with one workflow, `greet`."""

    def ListWorkflows(self, request: Any, context: grpc.ServicerContext) -> Any:
        return w.ListWorkflowsResponse(workflows=[_workflow()])

    def GetWorkflow(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.name == "clash":  # inputs named like the command's own flags
            wf = w.Workflow(name="clash")
            wf.inputs.add(name="watch", type="bool")
            wf.inputs.add(name="inputs", type="dict")
            wf.inputs.add(name="who", type="str")
            return wf
        if request.name != "greet":
            _abort(
                context,
                code_pb2.NOT_FOUND,
                "WORKFLOW_NOT_FOUND",
                f"workflow {request.name!r} not found",
                workflow=request.name,
            )
        return _workflow()

    def ExecuteWorkflow(self, request: Any, context: grpc.ServicerContext) -> Any:
        inputs = dict(request.inputs)
        if not isinstance(inputs.get("times", 5.0), float):
            _abort(
                context,
                code_pb2.INVALID_ARGUMENT,
                "INPUTS_INVALID",
                "2 inputs are invalid",
                (("inputs.times", "expected an integer"), ("inputs.who", "missing")),
            )
        if inputs.get("who") == "boom":
            _abort(
                context,
                code_pb2.ABORTED,
                "NODE_FAILED",
                "node 'say' failed: kaput",
                execution_id="e1",
                node_id="say",
            )
        execution = w.Execution(id="e1", workflow="greet", state=w.Execution.STATE_SUCCEEDED)
        execution.outputs.update({"say": {"text": f"hi {inputs.get('who')}", "count": 1}})
        return execution


class Models(mg.ModelServiceServicer):
    def ListModels(self, request: Any, context: grpc.ServicerContext) -> Any:
        return m.ListModelsResponse(models=[_model()])

    def CreateRecord(self, request: Any, context: grpc.ServicerContext) -> Any:
        _abort(
            context, code_pb2.ALREADY_EXISTS, "RECORD_ALREADY_EXISTS", "taken", model=request.model
        )


@pytest.fixture(scope="module")
def grpc_add_to_server() -> Any:
    def add(servicer: Any, server: grpc.Server) -> None:
        wg.add_WorkflowServiceServicer_to_server(servicer.workflows, server)  # type: ignore[no-untyped-call]
        mg.add_ModelServiceServicer_to_server(servicer.models, server)  # type: ignore[no-untyped-call]

    return add


@pytest.fixture(scope="module")
def grpc_servicer() -> Any:
    return SimpleNamespace(workflows=Workflows(), models=Models())


@pytest.fixture(scope="module")
def grpc_stub_cls() -> Any:
    def stubs(channel: grpc.Channel) -> Any:
        return SimpleNamespace(
            workflows=wg.WorkflowServiceStub(channel),  # type: ignore[no-untyped-call]
            models=mg.ModelServiceStub(channel),  # type: ignore[no-untyped-call]
        )

    return stubs


def _failure(fn: Any, request: Any) -> ApiFailure:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=10)
    return ApiFailure.from_rpc_error(info.value)


# ---------------------------------------------------------------------------- flags


def test_flags_from_a_served_workflow(grpc_stub: Any) -> None:
    wf = grpc_stub.workflows.GetWorkflow(w.GetWorkflowRequest(name="greet"), timeout=10)
    specs = {s.key: s for s in build_input_params(wf)}
    assert specs["who"].flags == ["--who"] and specs["who"].python is str
    assert specs["who"].help == "whom to greet (str, required)"
    assert specs["times"].flags == ["--times"] and specs["times"].python is int
    assert specs["times"].help == "how often (int, default: 5)"
    assert specs["loud_voice"].flags == ["--loud-voice/--no-loud-voice"]
    assert specs["loud_voice"].python is bool
    assert specs["extra"].is_json and specs["extra"].python is str
    assert specs["nick"].python is str and "default: null" in specs["nick"].help


def test_flags_from_a_served_model(grpc_stub: Any) -> None:
    (model,) = grpc_stub.models.ListModels(m.ListModelsRequest(), timeout=10).models
    create = {s.key: s for s in build_field_params(model)}
    assert list(create) == ["id", "title", "priority", "points"]  # managed fields left out
    assert "primary key, generated" in create["id"].help
    assert create["title"].help == "what is wrong (str, required)"
    assert "one of low|high" in create["priority"].help
    assert create["points"].python is float
    update = {s.key for s in build_field_params(model, for_update=True)}
    assert update == {"title", "priority", "points"}


def test_inputs_named_like_command_flags_are_left_to_inputs_json(
    grpc_addr: str, grpc_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from clients.cli import main

    assert main(["--server", grpc_addr, "run", "clash", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--who" in out and out.count("--watch") == 1 and out.count("--inputs") == 1


def test_cli_help_and_exit_codes_in_process(
    grpc_addr: str, grpc_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from clients.cli import main

    assert main(["--server", grpc_addr, "run", "greet", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--who", "--times", "--loud-voice", "--extra", "--nick", "--watch"):
        assert flag in out
    assert main(["--server", grpc_addr, "-o", "json", "run", "greet", "--who", "Ann"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"] == {"say": {"text": "hi Ann", "count": 1}}
    assert main(["--server", grpc_addr, "run", "nope"]) == EXIT_NOT_FOUND
    assert "WORKFLOW_NOT_FOUND" in capsys.readouterr().err
    assert main(["--server", grpc_addr, "run", "greet", "--who", "boom"]) == EXIT_FAILED
    assert main(["--server", grpc_addr, "tickets", "create", "--title", "x"]) == EXIT_CONFLICT
    assert main(["--server", grpc_addr, "run", "greet", "--times", "many"]) == 2


# ---------------------------------------------------------------------------- errors


def test_error_details_are_read_and_rendered(grpc_stub: Any) -> None:
    failure = _failure(grpc_stub.workflows.GetWorkflow, w.GetWorkflowRequest(name="nope"))
    assert (failure.code, failure.reason) == ("NOT_FOUND", "WORKFLOW_NOT_FOUND")
    assert failure.metadata == {"workflow": "nope"}
    assert (
        failure.render()
        == "NOT_FOUND (WORKFLOW_NOT_FOUND): workflow 'nope' not found\n  workflow=nope"
    )
    assert exit_code_of(failure) == EXIT_NOT_FOUND

    inputs = struct_pb2.Struct()
    inputs.update({"times": "many"})
    failure = _failure(
        grpc_stub.workflows.ExecuteWorkflow, w.ExecuteWorkflowRequest(name="greet", inputs=inputs)
    )
    assert failure.violations == (
        ("inputs.times", "expected an integer"),
        ("inputs.who", "missing"),
    )
    assert failure.render().splitlines() == [
        "INVALID_ARGUMENT (INPUTS_INVALID): 2 inputs are invalid",
        "  inputs.times: expected an integer",
        "  inputs.who: missing",
    ]
    assert exit_code_of(failure) == EXIT_INVALID
    assert failure.as_dict()["field_violations"][0] == {
        "field": "inputs.times",
        "description": "expected an integer",
    }


def test_exit_codes_by_code_and_reason() -> None:
    assert exit_code_of(ApiFailure("ABORTED", "x", "NODE_FAILED")) == EXIT_FAILED
    assert exit_code_of(ApiFailure("ABORTED", "x", "TRANSACTION_CONFLICT")) == EXIT_CONFLICT
    assert exit_code_of(ApiFailure("ALREADY_EXISTS", "x")) == EXIT_CONFLICT
    assert exit_code_of(ApiFailure("UNAVAILABLE", "x")) == EXIT_UNAVAILABLE
    assert exit_code_of(ApiFailure("INTERNAL", "x", "INTERNAL_ERROR")) == EXIT_FAILED
    assert "is the server running" in ApiFailure("UNAVAILABLE", "refused").render()


def test_unavailable_without_details() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        stub = wg.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        failure = _failure(stub.ListWorkflows, w.ListWorkflowsRequest())
    assert failure.code == "UNAVAILABLE" and failure.reason == ""
    assert exit_code_of(failure) == EXIT_UNAVAILABLE


# ---------------------------------------------------------------------------- schemas


def test_workflow_tool_schema(grpc_stub: Any) -> None:
    wf = grpc_stub.workflows.GetWorkflow(w.GetWorkflowRequest(name="greet"), timeout=10)
    spec = workflow_tool(wf)
    assert spec.name == "run_greet" and spec.steps == 1
    assert spec.input_schema == {
        "type": "object",
        "properties": {
            "who": {"type": "string", "description": "whom to greet"},
            "times": {"type": "integer", "description": "how often", "default": 5},
            "loud_voice": {"type": "boolean", "default": False},
            "extra": {"type": "object", "description": "anything else"},
            "nick": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            "request_id": REQUEST_ID_SCHEMA,  # SayNode may write: a retry key
        },
        "required": ["who"],
        "additionalProperties": False,
    }
    assert spec.output_schema == {
        "type": "object",
        "properties": {
            "say": {
                "type": "object",
                "properties": {
                    "text": {"type": "string"},
                    # an int beyond +-2^53 comes back as its text
                    "count": {
                        "anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^-?[0-9]+$"}]
                    },
                },
            }
        },
    }
    assert validate(spec.input_schema, {"who": "x", "times": 2}) == []
    assert validate(spec.input_schema, {"times": "x", "bogus": 1}) == [
        "(arguments): 'who' is a required property",
        "(arguments): Additional properties are not allowed ('bogus' was unexpected)",
        "times: 'x' is not of type 'integer'",
    ]


def test_model_tool_schemas_and_hints() -> None:
    tools = {t.name: t for t in model_tools(_model())}
    assert list(tools) == [
        f"tickets_{op}" for op in ("create", "get", "list", "count", "update", "upsert", "delete")
    ]
    create = tools["tickets_create"].input_schema
    assert create["required"] == ["title", "priority"]
    assert create["properties"]["priority"] == {"enum": ["low", "high"]}
    assert create["properties"]["points"] == {
        "anyOf": [{"type": "number"}, {"type": "null"}],
        "default": None,
    }
    assert "created_at" not in create["properties"]
    assert "id" not in tools["tickets_update"].input_schema["properties"]["id"].get("enum", [])
    assert tools["tickets_get"].read_only and not tools["tickets_get"].destructive
    assert tools["tickets_delete"].destructive and not tools["tickets_delete"].read_only
    assert tools["tickets_list"].input_schema["properties"]["limit"]["maximum"] == 1000
    assert "$ref" not in json.dumps([t.input_schema for t in tools.values()])


def test_tool_names_are_snake_case_stable_and_bounded() -> None:
    assert tool_name("run", "create_contact") == "run_create_contact"
    assert tool_name("Contact-Notes", "list") == "contact_notes_list"
    long_a = tool_name("run", "a" * 80)
    long_b = tool_name("run", "a" * 81)
    assert len(long_a) == 64 and len(long_b) == 64 and long_a != long_b
    assert long_a == tool_name("run", "a" * 80)


def test_type_table() -> None:
    assert type_spec("int").schema == {"type": "integer"}
    assert type_spec("str | None").schema == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert type_spec("datetime").schema == {"type": "string", "format": "date-time"}
    assert type_spec("list").is_json and type_spec("any").is_json
    # any JSON value, spelled out with one type per branch (portable, never `{}`)
    assert [b["type"] for b in type_spec("any").schema["anyOf"]] == [
        "string",
        "number",
        "boolean",
        "object",
        "array",
        "null",
    ]
    assert type_spec("some_future_type").is_json  # unknown names are JSON, never a crash


def test_json_mapping_and_server_address(monkeypatch: pytest.MonkeyPatch) -> None:
    assert normalize({"a": 0.0, "b": [1.5, 2.0], "c": "3"}) == {"a": 0, "b": [1.5, 2], "c": "3"}
    monkeypatch.delenv("NEXUS_SERVER", raising=False)
    assert server_address() == "127.0.0.1:50051"
    monkeypatch.setenv("NEXUS_SERVER", "h:1")
    assert server_address() == "h:1" and server_address("x:2") == "x:2"


def test_dynamic_call_of_a_static_service(grpc_channel: grpc.Channel) -> None:
    methods = DynamicMethods(grpc_channel)
    (doc,) = methods.call("WorkflowService/GetWorkflow", {"name": "greet"}, timeout=10)
    assert doc["name"] == "greet" and doc["inputs"][0]["name"] == "who"
    found = methods.find("nexus.workflow.v1.WorkflowService.ListWorkflows")
    assert found.path == "/nexus.workflow.v1.WorkflowService/ListWorkflows"
    with pytest.raises(KeyError):
        methods.find("WorkflowService/Nope")


def test_csv_rows_are_typed_by_the_model() -> None:
    types = {"title": ("str", False), "points": ("float", True), "done": ("bool", False)}
    row = coerce_csv_row({"title": "t", "points": "1.5", "done": "yes"}, types, 2)
    assert row == {"title": "t", "points": 1.5, "done": True}
    assert coerce_csv_row({"title": "t", "points": "null", "done": ""}, types, 3) == {
        "title": "t",
        "points": None,
    }
    with pytest.raises(RowError, match="line 4: points"):
        coerce_csv_row({"title": "t", "points": "high"}, types, 4)
    with pytest.raises(RowError, match="unknown column 'owner'"):
        coerce_csv_row({"owner": "x"}, types, 5)
