"""Server reflection with the comments: `source_code_info` in the files it returns.

The reflection servicer (grpcio-reflection) answers from a descriptor pool, copying each
file with `FileDescriptor.CopyToProto`; the pool (upb) keeps no source info, so the files
would come back without a comment. `SourceInfoPool` is the pool as the servicer sees it:
the same lookups, and files that copy with the `source_code_info` of their source (the
static contracts' descriptor set, and the typed models file with its model docstrings
and field descriptions, `_model_docs.py`). A reflection client (grpcurl `describe`,
buf curl, Postman) then shows the same documentation as the exported `.proto` files.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from google.protobuf import descriptor, descriptor_pb2, descriptor_pool

from nexus_api import descriptor_set_bytes

if TYPE_CHECKING:
    from ._typed import TypedModels

__all__ = ["SourceInfoPool", "reflection_pool"]


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
