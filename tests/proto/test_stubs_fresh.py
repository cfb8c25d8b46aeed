"""The generated stubs match proto/, and the contracts follow DESIGN.md's rules.

The rules are read from the compiled descriptors (not from the .proto text): every RPC
has a `google.api.http` binding whose path variables and body are request fields, list
RPCs paginate, retried writes take a `request_id`, every error reason has its code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, descriptor_pb2

import nexus_api
from nexus_api.nexus.audit.v1 import audit_service_pb2
from nexus_api.nexus.auth.v1 import auth_service_pb2
from nexus_api.nexus.common.v1 import errors_pb2
from nexus_api.nexus.health.v1 import probe_service_pb2
from nexus_api.nexus.model.v1 import model_service_pb2
from nexus_api.nexus.openapi.v1 import openapi_service_pb2
from nexus_api.nexus.workflow.v1 import workflow_service_pb2

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "nexus_api"
REGENERATE = ".venv/bin/python scripts/gen_protos.py  (or: make protos)"
HAND_WRITTEN = {"README.md"}

SERVICES = [
    workflow_service_pb2.DESCRIPTOR.services_by_name["WorkflowService"],
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"],
    openapi_service_pb2.DESCRIPTOR.services_by_name["OpenApiService"],
    probe_service_pb2.DESCRIPTOR.services_by_name["ProbeService"],
]
METHODS = [m for s in SERVICES for m in s.methods]

#: Writes that users retry: they must take an idempotency key.
RETRIED_WRITES = {
    "nexus.workflow.v1.WorkflowService": {"ExecuteWorkflow", "StreamExecution"},
    "nexus.model.v1.ModelService": {
        "CreateRecord",
        "UpdateRecord",
        "DeleteRecord",
        "UpsertRecord",
        "BulkCreateRecords",
        "BulkUpdateRecords",
        "BulkDeleteRecords",
        "BulkUpsertRecords",
        "BatchWrite",
    },
}


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name not in HAND_WRITTEN
    }


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh, committed = _files(tmp_path / "nexus_api"), _files(PACKAGE)
    problems = [
        f"{'stale' if n in committed else 'missing'}: nexus_api/{n}"
        for n in sorted(fresh)
        if committed.get(n) != fresh[n]
    ]
    problems += [f"left over: nexus_api/{n}" for n in sorted(set(committed) - set(fresh))]
    assert not problems, (
        "nexus_api/ does not match proto/:\n  "
        + "\n  ".join(problems)
        + f"\nregenerate with: {REGENERATE}"
    )


def _http_rule(method: descriptor.MethodDescriptor) -> http_pb2.HttpRule:
    options = method.GetOptions()
    assert options.HasExtension(annotations_pb2.http), (
        f"{method.full_name} has no google.api.http annotation"
    )
    return options.Extensions[annotations_pb2.http]


def _bindings(rule: http_pb2.HttpRule) -> list[tuple[str, str, str]]:
    """(verb, path, body) of a rule and of its additional bindings."""
    out = []
    for r in [rule, *rule.additional_bindings]:
        verb = r.WhichOneof("pattern")
        assert verb and verb != "custom", f"binding without a standard verb: {r}"
        out.append((verb, getattr(r, verb), r.body))
    return out


def _path_variables(path: str) -> list[str]:
    names = []
    for segment in path.split("/"):
        if segment.startswith("{"):
            names.append(segment[1:].split("}")[0].split("=")[0])
    return names


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
def test_every_rpc_has_a_valid_http_binding(method: descriptor.MethodDescriptor) -> None:
    request = method.input_type
    for verb, path, body in _bindings(_http_rule(method)):
        assert path.startswith("/"), f"{method.full_name}: path {path!r}"
        for name in _path_variables(path):
            assert name in request.fields_by_name, (
                f"{method.full_name}: {verb} {path} binds {{{name}}}, not a field of "
                f"{request.full_name}"
            )
        if verb in ("get", "delete"):
            assert not body, f"{method.full_name}: {verb} {path} has a body"
        elif body not in ("", "*"):
            assert body in request.fields_by_name, f"{method.full_name}: body {body!r}"


def test_the_original_execute_route_is_kept() -> None:
    method = SERVICES[0].methods_by_name["ExecuteWorkflow"]
    assert ("post", "/workflows/{name}/execute", "*") in _bindings(_http_rule(method))


def test_http_routes_are_unique() -> None:
    seen: dict[tuple[str, str], str] = {}
    for method in METHODS:
        for verb, path, _ in _bindings(_http_rule(method)):
            key = (verb, path)
            assert key not in seen, f"{verb} {path}: {seen[key]} and {method.full_name}"
            seen[key] = method.full_name


def _field(message: descriptor.Descriptor, name: str, kind: int) -> bool:
    f = message.fields_by_name.get(name)
    return f is not None and f.type == kind and not f.message_type


@pytest.mark.parametrize(
    "method", [m for m in METHODS if m.name.startswith("List")], ids=lambda m: m.full_name
)
def test_list_rpcs_paginate(method: descriptor.MethodDescriptor) -> None:
    fd = descriptor.FieldDescriptor
    assert _field(method.input_type, "page_size", fd.TYPE_INT32), method.full_name
    assert _field(method.input_type, "page_token", fd.TYPE_STRING), method.full_name
    assert _field(method.output_type, "next_page_token", fd.TYPE_STRING), method.full_name


def test_retried_writes_take_a_request_id() -> None:
    for service in SERVICES:
        for name in RETRIED_WRITES.get(service.full_name, ()):
            request = service.methods_by_name[name].input_type
            assert _field(request, "request_id", descriptor.FieldDescriptor.TYPE_STRING), name


def test_every_error_reason_has_its_grpc_code() -> None:
    values = errors_pb2.ErrorReason.DESCRIPTOR.values
    assert len(values) > 1
    for value in values:
        assert value.name.isupper() and " " not in value.name
        options = value.GetOptions()
        assert options.HasExtension(errors_pb2.code), f"{value.name} has no (code) option"


def test_descriptor_set_is_complete() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(nexus_api.descriptor_set_bytes())
    files = {f.name: f for f in fds.file}
    ours = [n for n in files if n.startswith("nexus/")]
    assert sorted(ours) == sorted(
        m.DESCRIPTOR.name
        for m in (
            audit_service_pb2,
            auth_service_pb2,
            errors_pb2,
            model_service_pb2,
            openapi_service_pb2,
            probe_service_pb2,
            workflow_service_pb2,
        )
    )
    for needed in (
        "google/api/annotations.proto",
        "google/api/httpbody.proto",
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",  # for Envoy to print error details as JSON
        "google/protobuf/struct.proto",
    ):
        assert needed in files, f"{needed} missing from the descriptor set"
    for name in ours:
        locations = files[name].source_code_info.location
        assert any(loc.leading_comments.strip() for loc in locations), f"{name}: no comments"
