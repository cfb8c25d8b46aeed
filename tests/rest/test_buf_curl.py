"""A third-party client we did not write, `buf curl` (npm `@bufbuild/buf`), against the
server's gRPC port and Envoy's API port: over gRPC, gRPC-Web and Connect, with the schema
from server reflection, from the exported `.proto` files (`nexus proto export`) and from
the exported descriptor set. Listing, a unary call, a server-streaming call and an error
with its ErrorInfo, each the same on every port and protocol.

When buf is not installed (`npm ci`) the tests are skipped, saying why; under CI=true
they fail instead.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2

from nexus_server import Serving
from nexus_server._cli import _typed
from nexus_server._proto_export import export_protos
from nexus_server._typed import REST_PACKAGE

from .conftest import Running

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"
#: Every buf run is bounded by this many seconds (a stream Envoy holds back would hang).
RUN_TIMEOUT = 60.0
#: buf curl exits with the RPC's code times 8 when the call fails.
NOT_FOUND_EXIT = 5 * 8

#: (port, protocol) pairs: the server itself speaks gRPC only; Envoy all three.
TARGETS = [
    ("server", "grpc"),
    ("envoy", "grpc"),
    ("envoy", "grpcweb"),
    ("envoy", "connect"),
]
#: Where the schema comes from: server reflection or the exported files.
SCHEMAS = ["reflection", "protos", "descriptor-set"]
WORKFLOW = "nexus.workflow.v1.WorkflowService"
CONTACTS = "nexus.models.v1.ContactService"


@pytest.fixture(scope="module")
def buf() -> Path:
    if not BUF.is_file():
        reason = f"buf is not installed at {BUF} (run `npm ci`)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return BUF


@pytest.fixture(scope="module")
def exported(running: Running, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The running app's contracts as `nexus proto export` writes them."""
    out = tmp_path_factory.mktemp("exported")
    files = export_protos(_typed(running.app), out)
    assert out / "nexus.binpb" in files
    assert out / "nexus" / "models" / "v1" / "models.proto" in files
    return out


def _schema_args(schema: str, exported: Path) -> list[str]:
    if schema == "reflection":
        return []
    if schema == "protos":
        # the exported directory as a buf input (its .proto files, compiled by buf)
        return ["--schema", str(exported)]
    return ["--schema", str(exported / "nexus.binpb")]


class Curl:
    """`buf curl` against one port with one protocol and one schema source."""

    def __init__(
        self, buf: Path, serving: Serving, target: tuple[str, str], schema: list[str]
    ) -> None:
        port, self.protocol = target
        address = serving.address if port == "server" else serving.api_address
        self.base = f"http://{address}"
        self.args = [
            str(buf),
            "curl",
            "--protocol",
            self.protocol,
            "--http2-prior-knowledge",
            *schema,
        ]

    def run(self, *args: str, data: Any = None) -> subprocess.CompletedProcess[str]:
        extra = ["-d", json.dumps(data)] if data is not None else []
        return subprocess.run(
            [*self.args, *extra, *args],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=ROOT,
        )

    def call(self, method: str, data: Any) -> subprocess.CompletedProcess[str]:
        return self.run(f"{self.base}/{method}", data=data)


@pytest.fixture(params=TARGETS, ids=lambda t: f"{t[0]}-{t[1]}")
def target(request: pytest.FixtureRequest) -> tuple[str, str]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=SCHEMAS)
def curl(
    request: pytest.FixtureRequest,
    buf: Path,
    serving: Serving,
    target: tuple[str, str],
    exported: Path,
) -> Curl:
    return Curl(buf, serving, target, _schema_args(request.param, exported))


def _documents(text: str) -> Iterator[Any]:
    """The JSON documents buf prints one after another (one per response message)."""
    decoder = json.JSONDecoder()
    at = 0
    text = text.strip()
    while at < len(text):
        doc, end = decoder.raw_decode(text, at)
        yield doc
        at = end
        while at < len(text) and text[at].isspace():
            at += 1


def _served_methods(exported: Path, *, twins: bool = False) -> set[str]:
    """Every method of the app's contracts (from the exported descriptor set); the
    typed services' REST twins only with `twins`: they are Envoy's, in the descriptor
    set but neither in reflection nor in the exported `.proto` files."""
    fds = descriptor_pb2.FileDescriptorSet.FromString((exported / "nexus.binpb").read_bytes())
    return {
        f"{f.package}.{s.name}/{m.name}"
        for f in fds.file
        if twins or f.package != REST_PACKAGE
        for s in f.service
        for m in s.method
    }


@pytest.mark.parametrize("reflect", ["grpc-v1", "grpc-v1alpha"])
def test_reflection_lists_and_describes_every_service(
    buf: Path, serving: Serving, target: tuple[str, str], exported: Path, reflect: str
) -> None:
    # listing methods makes buf fetch the file of every listed service: one that
    # reflection cannot describe fails the whole listing
    c = Curl(buf, serving, target, ["--reflect-protocol", reflect])
    done = c.run("--list-methods", c.base)
    assert done.returncode == 0, done.stderr
    listed = set(done.stdout.split())
    assert listed == _served_methods(exported) | {
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/List",
        "grpc.health.v1.Health/Watch",
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }


def test_the_exported_schema_lists_the_same_methods(buf: Path, exported: Path) -> None:
    for schema in ("protos", "descriptor-set"):
        done = subprocess.run(
            [str(buf), "curl", *_schema_args(schema, exported), "--list-methods"],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        want = _served_methods(exported, twins=schema == "descriptor-set")
        assert set(done.stdout.split()) == want, schema


def test_a_unary_call(curl: Curl, unique: str) -> None:
    email = f"{unique}-{curl.protocol}@example.com"
    done = curl.call(
        f"{CONTACTS}/CreateContact", {"contact": {"name": "Ann", "email": email, "score": 7}}
    )
    assert done.returncode == 0, done.stderr
    created = json.loads(done.stdout)
    assert created["email"] == email
    assert created["score"] == "7"  # proto3 JSON: int64 as a string
    done = curl.call(f"{CONTACTS}/GetContact", {"id": created["id"]})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == created


def test_a_server_streaming_call(curl: Curl, unique: str) -> None:
    done = curl.call(
        f"{WORKFLOW}/StreamExecution",
        {
            "name": "create_contact",
            "inputs": {"name": "Bo", "email": f"{unique}-{curl.protocol}@example.com"},
        },
    )
    assert done.returncode == 0, done.stderr
    events = list(_documents(done.stdout))
    assert len(events) >= 4, events  # started, node started, node completed, completed
    assert "executionStarted" in events[0], events[0]
    assert "executionCompleted" in events[-1], events[-1]
    assert [int(e["sequence"]) for e in events] == list(range(1, len(events) + 1))
    assert len({e["executionId"] for e in events}) == 1
    created = events[-1]["executionCompleted"]["execution"]["outputs"]["create"]
    assert created["name"] == "Bo"


def test_an_error_carries_its_error_info(curl: Curl) -> None:
    done = curl.call(f"{WORKFLOW}/GetWorkflow", {"name": "no_such_workflow"})
    assert done.returncode == NOT_FOUND_EXIT, (done.returncode, done.stderr)
    error = json.loads(done.stderr[done.stderr.index("{") :])
    assert error["code"] == "not_found"
    assert "no_such_workflow" in error["message"]
    # Connect's error JSON names a detail by its message name, as gRPC's do once decoded
    details = {d["type"]: d["value"] for d in error["details"]}
    assert set(details) == {"google.rpc.ErrorInfo", "google.rpc.BadRequest"}, error
    info = error_details_pb2.ErrorInfo.FromString(
        base64.b64decode(details["google.rpc.ErrorInfo"] + "==")
    )
    assert info.reason == "WORKFLOW_NOT_FOUND"
    assert info.domain == "nexus"


@pytest.mark.parametrize("protocol", ["grpcweb", "connect"])
def test_http_1_1_clients_through_envoy(
    buf: Path, serving: Serving, exported: Path, protocol: str, unique: str
) -> None:
    """Browsers' protocols over HTTP/1.1 (no reflection there: its stream needs HTTP/2):
    a unary call, a server stream and an error."""
    args = [str(buf), "curl", "--protocol", protocol, "--schema", str(exported / "nexus.binpb")]
    base = f"http://{serving.api_address}"

    def call(method: str, data: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*args, "-d", json.dumps(data), f"{base}/{method}"],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=ROOT,
        )

    done = call(f"{WORKFLOW}/GetWorkflow", {"name": "create_contact"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["name"] == "create_contact"
    done = call(
        f"{WORKFLOW}/StreamExecution",
        {"name": "create_contact", "inputs": {"name": "Cy", "email": f"{unique}@example.com"}},
    )
    assert done.returncode == 0, done.stderr
    events = list(_documents(done.stdout))
    assert "executionCompleted" in events[-1], events[-1]
    done = call(f"{WORKFLOW}/GetWorkflow", {"name": "no_such_workflow"})
    assert done.returncode == NOT_FOUND_EXIT, done.stderr
    error = json.loads(done.stderr[done.stderr.index("{") :])
    assert "google.rpc.ErrorInfo" in {d["type"] for d in error["details"]}, error
