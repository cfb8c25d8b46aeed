"""Server reflection, as `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

grpcio-reflection ships only v1alpha (its servicer and its `.proto`). The v1 protocol is
the same protocol under another package name: the same messages, field for field, so its
requests and responses are the same bytes on the wire. v1 is served here by the one
v1alpha servicer registered under v1's method path too, answering from the same pool.

Reflection can only describe what its pool holds, so the pool gets the files of every
service the server lists: the health service's, the v1alpha reflection file and a v1 file
made from it (the package renamed), besides our contracts (`reflection_files`).

The files come back with their comments: the pool (upb) keeps no source info, so
`reflection_pool` wraps it in a `SourceInfoPool`, whose files copy with the
`source_code_info` of their source (the static contracts' descriptor set, and the typed
models file with its model docstrings and field descriptions): a reflection client
(grpcurl `describe`, buf curl, Postman) shows the same documentation as the exported
`.proto` files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from nexus_api import descriptor_set_bytes

if TYPE_CHECKING:
    from ._typed import TypedModels

__all__ = [
    "REFLECTION_SERVICES",
    "REFLECTION_V1",
    "REFLECTION_V1ALPHA",
    "HandlerSink",
    "SourceInfoPool",
    "add_reflection",
    "reflection_files",
    "reflection_pool",
]

REFLECTION_V1ALPHA = reflection.SERVICE_NAME
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
#: Both reflection services, newest first (what clients such as `buf curl` try in turn).
REFLECTION_SERVICES = (REFLECTION_V1, REFLECTION_V1ALPHA)

_V1ALPHA_PACKAGE = "grpc.reflection.v1alpha"
_V1_PACKAGE = "grpc.reflection.v1"
_V1_FILE = "grpc/reflection/v1/reflection.proto"
_V1ALPHA_FILE = "grpc/reflection/v1alpha/reflection.proto"
_HEALTH_FILE = "grpc/health/v1/health.proto"
_METHOD = "ServerReflectionInfo"


class HandlerSink(Protocol):
    """Where handlers are added (a `grpc.aio.Server`, or the app's wrapper of one)."""

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None: ...


def _file_of(file: descriptor.FileDescriptor) -> FileDescriptorProto:
    proto = FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


def _v1_file() -> FileDescriptorProto:
    """v1's reflection file: v1alpha's with the package (and every reference to its
    types) renamed, and v1's language options instead of the deprecated package's."""
    proto = _file_of(reflection_pb2.DESCRIPTOR)
    old, new = f".{_V1ALPHA_PACKAGE}.", f".{_V1_PACKAGE}."
    proto.name = _V1_FILE
    proto.package = _V1_PACKAGE
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(old):
                f.type_name = new + f.type_name.removeprefix(old)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type.removeprefix(old)
            method.output_type = new + method.output_type.removeprefix(old)
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    return proto


def _renamed(proto: FileDescriptorProto, name: str) -> FileDescriptorProto:
    proto.name = name
    return proto


def reflection_files() -> list[FileDescriptorProto]:
    """The files of the services the server lists besides its own contracts: health,
    reflection v1alpha and reflection v1, under the names they have in grpc's own
    repository (`grpc/health/v1/health.proto`, what clients ask `file_by_filename`
    for) rather than the Python packages' (`grpc_health/v1/health.proto`)."""
    return [
        _renamed(_file_of(health_pb2.DESCRIPTOR), _HEALTH_FILE),
        _renamed(_file_of(reflection_pb2.DESCRIPTOR), _V1ALPHA_FILE),
        _v1_file(),
    ]


def add_reflection(
    services: Sequence[str],
    pool: descriptor_pool.DescriptorPool | SourceInfoPool,
    server: HandlerSink,
) -> None:
    """Serve reflection v1 and v1alpha on `server` (anything with
    `add_generic_rpc_handlers`), listing `services` and both reflection services,
    describing them from `pool` (which must hold `reflection_files()`)."""
    servicer = reflection.aio.ReflectionServicer((*services, *REFLECTION_SERVICES), pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            _METHOD: grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                # the same messages as v1alpha's, so the same bytes
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))


class _File:
    """A FileDescriptor whose `CopyToProto` adds the file's source info."""

    def __init__(
        self, fd: descriptor.FileDescriptor, info: dict[str, descriptor_pb2.SourceCodeInfo]
    ) -> None:
        self._fd = fd
        self._info = info
        self.name = fd.name

    @property
    def dependencies(self) -> list[_File]:
        return [_File(dep, self._info) for dep in self._fd.dependencies]

    def CopyToProto(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self._fd.CopyToProto(proto)
        info = self._info.get(self.name)
        if info is not None:
            proto.source_code_info.CopyFrom(info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fd, name)


class SourceInfoPool:
    """`pool`, for the reflection servicer, with the source info of `files` (by name)."""

    def __init__(
        self,
        pool: descriptor_pool.DescriptorPool,
        files: Iterable[descriptor_pb2.FileDescriptorProto],
    ) -> None:
        self._pool = pool
        self._info = {f.name: f.source_code_info for f in files if f.source_code_info.location}

    def FindFileByName(self, name: str) -> _File:
        return _File(self._pool.FindFileByName(name), self._info)

    def FindFileContainingSymbol(self, symbol: str) -> _File:
        return _File(self._pool.FindFileContainingSymbol(symbol), self._info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def reflection_pool(typed: TypedModels) -> SourceInfoPool:
    """The server's pool (`typed.pool`) with the comments of our contracts and models."""
    static = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes())
    return SourceInfoPool(typed.pool, [*static.file, typed.file])
