"""Server reflection, v1 and v1alpha, on the server's port and through Envoy: every
service it lists resolves (health and reflection included), and a reflection stream
the client keeps open is answered message by message (Envoy buffers none of it)."""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

from nexus_server import Serving

from .conftest import WAIT

ROOT = Path(__file__).resolve().parents[2]
GRPC_JS_CLIENT = Path(__file__).with_name("grpc_js_reflection.js")
NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")

V1ALPHA_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1ALPHA_FILE = "grpc/reflection/v1alpha/reflection.proto"


@pytest.fixture(params=["server", "envoy"])
def channel(
    request: pytest.FixtureRequest, grpc_channel: grpc.Channel, envoy_channel: grpc.Channel
) -> grpc.Channel:
    return grpc_channel if request.param == "server" else envoy_channel


class Reflection:
    """One reflection protocol's request/response classes and its method on a channel."""

    def __init__(self, channel: grpc.Channel, method: str, request: Any, response: Any) -> None:
        self.request = request
        self._call: Callable[..., Iterator[Any]] = channel.stream_stream(
            method,
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )

    def ask(self, **fields: Any) -> Any:
        responses = list(self._call(iter([self.request(**fields)]), timeout=WAIT))
        assert len(responses) == 1
        return responses[0]

    def stream(self, requests: Iterator[Any]) -> Iterator[Any]:
        return self._call(requests, timeout=WAIT)


def _v1alpha(channel: grpc.Channel) -> Reflection:
    return Reflection(
        channel, V1ALPHA_METHOD, v1alpha.ServerReflectionRequest, v1alpha.ServerReflectionResponse
    )


def _v1(channel: grpc.Channel) -> Reflection:
    """v1 with classes made from the v1 file the server itself describes (fetched over
    v1alpha): nothing here assumes the two protocols' messages are alike."""
    answer = _v1alpha(channel).ask(file_by_filename=V1_FILE)
    assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
    pool = descriptor_pool.DescriptorPool()
    for raw in answer.file_descriptor_response.file_descriptor_proto:
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
    request = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")
    )
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")
    )
    return Reflection(channel, V1_METHOD, request, response)


@pytest.fixture(params=["v1", "v1alpha"])
def reflection(request: pytest.FixtureRequest, channel: grpc.Channel) -> Reflection:
    return _v1(channel) if request.param == "v1" else _v1alpha(channel)


def _files(answer: Any) -> list[descriptor_pb2.FileDescriptorProto]:
    assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]


def test_every_listed_service_resolves(reflection: Reflection) -> None:
    listed = [s.name for s in reflection.ask(list_services="").list_services_response.service]
    assert {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "nexus.workflow.v1.WorkflowService",
        "nexus.models.v1.ContactService",
    } <= set(listed)
    for service in listed:
        # the service's file, then every file it imports, by name: all in one pool
        pool = descriptor_pool.DescriptorPool()
        pending = _files(reflection.ask(file_containing_symbol=service))
        added: set[str] = set()
        while pending:
            f = pending.pop(0)
            if f.name in added:
                continue
            missing = [d for d in f.dependency if d not in added]
            if missing:
                for dep in missing:
                    pending = _files(reflection.ask(file_by_filename=dep)) + pending
                pending.append(f)
                continue
            pool.Add(f)
            added.add(f.name)
            assert len(added) < 100, "reflection keeps sending new files"
        assert pool.FindServiceByName(service).methods, service


@pytest.mark.parametrize(
    ("filename", "symbol"),
    [
        ("grpc/health/v1/health.proto", "grpc.health.v1.Health"),
        (V1_FILE, "grpc.reflection.v1.ServerReflection"),
        (V1ALPHA_FILE, "grpc.reflection.v1alpha.ServerReflection"),
    ],
)
def test_the_standard_services_files_by_name(
    reflection: Reflection, filename: str, symbol: str
) -> None:
    (f,) = _files(reflection.ask(file_by_filename=filename))
    assert f.name == filename
    assert symbol.rsplit(".", 1)[1] in {s.name for s in f.service}
    assert f.package == symbol.rsplit(".", 1)[0]


def test_an_unknown_symbol_is_not_found(reflection: Reflection) -> None:
    answer = reflection.ask(file_containing_symbol="no.such.Service")
    assert answer.WhichOneof("message_response") == "error_response"
    assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_a_stream_kept_open_is_answered_message_by_message(reflection: Reflection) -> None:
    """A client that keeps its reflection stream open (buf curl, grpc-go, grpcurl) gets
    each answer before it sends the next question: through Envoy too, which used to hold
    the request back waiting for a whole body (a DEADLINE_EXCEEDED after the deadline,
    here WAIT seconds, instead of answers)."""
    questions: queue.Queue[Any] = queue.Queue()
    answers = reflection.stream(iter(questions.get, None))
    try:
        questions.put(reflection.request(list_services=""))
        first = next(answers)
        assert first.WhichOneof("message_response") == "list_services_response"
        questions.put(reflection.request(file_containing_symbol="grpc.health.v1.Health"))
        second = next(answers)
        assert second.original_request.file_containing_symbol == "grpc.health.v1.Health"
        assert "grpc/health/v1/health.proto" in {f.name for f in _files(second)}
    finally:
        questions.put(None)
    assert list(answers) == []


@pytest.fixture(scope="module")
def node() -> str:
    """`node` with grpc-js and proto-loader, or skip (fail under CI=true) saying why."""
    found = shutil.which("node")
    missing = None
    if found is None:
        missing = "`node` is not on PATH (install Node.js 20)"
    else:
        absent = [p for p in NODE_PACKAGES if not (ROOT / "node_modules" / p).is_dir()]
        if absent:
            missing = f"{', '.join(absent)} not installed in {ROOT / 'node_modules'} (run `npm ci`)"
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    assert found is not None
    return found


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
@pytest.mark.parametrize("port", ["server", "envoy"])
def test_a_grpc_js_reflection_client(
    node: str,
    serving: Serving,
    grpc_channel: grpc.Channel,
    tmp_path: Path,
    port: str,
    version: str,
) -> None:
    """grpc-js, knowing only the reflection service's file (from the server itself),
    asks for every listed service's file over one stream kept open."""
    filename = V1_FILE if version == "v1" else V1ALPHA_FILE
    schema = descriptor_pb2.FileDescriptorSet(
        file=_files(_v1alpha(grpc_channel).ask(file_by_filename=filename))
    )
    (tmp_path / "reflection.binpb").write_bytes(schema.SerializeToString())
    address = serving.address if port == "server" else serving.api_address
    assert address is not None
    done = subprocess.run(
        [node, str(GRPC_JS_CLIENT), str(tmp_path / "reflection.binpb"), address, version],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,  # node_modules
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["errors"] == {}
    expected = {
        s.name for s in _v1alpha(grpc_channel).ask(list_services="").list_services_response.service
    }
    assert set(out["services"]) == expected
    for service in out["services"]:
        package, name = service.rsplit(".", 1)
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(b))
            for b in out["files"][service]
        ]
        assert any(f.package == package and name in {s.name for s in f.service} for f in files), (
            service
        )
