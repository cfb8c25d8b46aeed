"""The OpenAPI 3.1 document: made from the descriptors, served through Envoy at
`GET /openapi.json`, written by `nexus openapi`, and a schemathesis run against it
through Envoy finding no server error."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from nexus_server import Serving
from nexus_server._envoy import api_services, merged_descriptor_set
from nexus_server._openapi import openapi_document

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def doc(base_url: str) -> dict[str, Any]:
    resp = httpx.get(f"{base_url}/openapi.json", timeout=15)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    data: dict[str, Any] = resp.json()
    return data


def _schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = doc["components"]["schemas"][name]
    return schema


def test_served_document_is_the_generated_one(doc: dict[str, Any], serving: Serving) -> None:
    expected = openapi_document(merged_descriptor_set(serving.typed), api_services(serving.typed))
    assert doc == expected
    assert doc["openapi"] == "3.1.0"


def test_paths_come_from_the_annotations(doc: dict[str, Any]) -> None:
    paths = doc["paths"]
    assert "post" in paths["/workflows/{name}/execute"]  # an additional binding
    assert "post" in paths["/v1/workflows/{name}:execute"]
    assert set(paths["/v1/models/{model}/records"]) == {"get", "post"}
    assert "post" in paths["/v1/models/{model}/records:search"]
    assert set(paths["/v1/contacts/{id}"]) == {"get", "patch", "delete"}
    assert "get" in paths["/openapi.json"]
    op_ids = [op["operationId"] for item in paths.values() for op in item.values()]
    assert len(op_ids) == len(set(op_ids))
    execute = paths["/workflows/{name}/execute"]["post"]
    assert execute["parameters"][0]["name"] == "name"
    assert execute["parameters"][0]["in"] == "path"
    body = execute["requestBody"]["content"]["application/json"]["schema"]
    assert "name" not in body["properties"]  # bound from the path
    assert "inputs" in body["properties"]
    # GET routes take the other request fields as query parameters
    listing = paths["/v1/executions"]["get"]
    query = {p["name"]: p["schema"] for p in listing["parameters"] if p["in"] == "query"}
    assert query["state"]["$ref"] == "#/components/schemas/nexus.workflow.v1.Execution.State"
    assert query["page_size"]["type"] == "integer"
    stream = paths["/v1/workflows/{name}:stream"]["post"]["responses"]["200"]
    assert list(stream["content"]) == ["text/event-stream"]


def test_schemas_follow_the_proto3_json_mapping(doc: dict[str, Any]) -> None:
    contact = _schema(doc, "nexus.models.v1.Contact")["properties"]
    # a record prints every field, a null one as null
    assert contact["score"]["type"] == ["string", "null"]
    assert contact["score"]["format"] == "int64"
    assert contact["email"]["type"] == ["string", "null"]
    assert contact["created_at"]["format"] == "date-time"  # Timestamp
    assert contact["created_at"]["type"] == ["string", "null"]
    execution = _schema(doc, "nexus.workflow.v1.Execution")["properties"]
    assert execution["inputs"]["type"] == "object"  # Struct
    assert execution["duration"]["type"] == "string"  # Duration, e.g. "1.5s"
    assert execution["state"]["$ref"].endswith("Execution.State")
    patch = doc["paths"]["/v1/contacts/{id}"]["patch"]
    mask = next(p for p in patch["parameters"] if p["name"] == "update_mask")
    assert mask["in"] == "query"
    assert mask["schema"]["type"] == "string"  # FieldMask: "name,email"
    states = _schema(doc, "nexus.workflow.v1.Execution.State")
    assert "STATE_SUCCEEDED" in states["enum"]
    status = _schema(doc, "google.rpc.Status")["properties"]
    assert set(status) == {"code", "message", "details"}
    assert "google.rpc.ErrorInfo" in doc["components"]["schemas"]
    errors = doc["paths"]["/v1/contacts/{id}"]["get"]["responses"]
    assert errors["404"] == {"$ref": "#/components/responses/Error404"}
    # every $ref resolves
    text = json.dumps(doc)
    for ref in set(re.findall(r'"\$ref": "#/components/(\w+)/([^"]+)"', text)):
        assert ref[1] in doc["components"][ref[0]], ref


def test_nexus_openapi_writes_the_document(tmp_path: Path) -> None:
    out = tmp_path / "openapi.json"
    subprocess.run(
        [sys.executable, "-m", "nexus_server", "openapi", "examples/contacts_app.py",
         "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert "/v1/contacts/{id}" in doc["paths"]
    assert "nexus.models.v1.Company" in doc["components"]["schemas"]


#: Registers the `no_leak_in_error_body` check: error messages follow the same rules
#: as on gRPC and MCP (tests/fuzz/_rules.py). Without the hooks `st` refuses the
#: unknown check name, so the run cannot pass without it.
HOOKS = ROOT / "tests" / "fuzz" / "schemathesis_hooks.py"


@pytest.mark.timeout(240)
def test_schemathesis_finds_no_server_error(base_url: str, tmp_path: Path) -> None:
    """No 5xx for any generated request, and no error message that leaks a traceback,
    a driver or class name, SQL, a path or an address, or echoes unbounded input."""
    st = Path(sys.executable).parent / "st"
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)}
    proc = subprocess.run(
        [
            str(st), "run", f"{base_url}/openapi.json", "--url", base_url,
            "--checks", "not_a_server_error,no_leak_in_error_body",
            "--phases", "coverage,fuzzing",
            "--max-examples", "2",
            "--generation-deterministic",
            "--max-time", "45",
            # one worker: schemathesis' workers are threads, and on CPython before
            # 3.11.8 two threads building hypothesis strategies at once (each
            # `ast.parse`s lambdas to describe them) can make one fail with
            # "SystemError: AST constructor recursion depth mismatch" (CPython
            # gh-106905: the depth counter is shared by the whole interpreter)
            "--workers", "1",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=200, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
