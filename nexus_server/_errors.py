"""The one place where exceptions become gRPC statuses.

`ApiError` is what servicers raise for the caller's mistakes they detect themselves;
`to_api_error` maps every other exception through one ordered table (exception type ->
`ErrorReason`). The gRPC code of each reason is declared once, in
`proto/nexus/common/v1/errors.proto`, and read from the descriptors here, so the table,
the contract and Envoy's HTTP mapping cannot drift apart. Anything not in the table is
INTERNAL with a generic message (the exception is logged, never sent).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import dataflow
import workflow
from nexus_api.nexus.common.v1 import errors_pb2

from ._handlers import map_methods

__all__ = [
    "DOMAIN",
    "FAILURE_REASON",
    "ApiError",
    "StatusError",
    "abort",
    "brief",
    "call_id",
    "code_of",
    "decode_guarded",
    "guard_method",
    "sort_reply_maps",
    "status_of",
    "to_api_error",
]

DOMAIN = "nexus"
_log = logging.getLogger("nexus_server")

#: How many characters of a caller's value an error message or metadata value echoes.
BRIEF = 60

# What one status may weigh. gRPC clients refuse response metadata above 8 KiB (soft) /
# 16 KiB (hard limit), and a status travels twice: `grpc-message` (percent-encoded, up
# to 3 bytes per byte) and `grpc-status-details-bin` (base64 of the whole Status). Kept
# well below, so that no input can turn an error into RESOURCE_EXHAUSTED.
_MAX_MESSAGE_BYTES = 768
_MAX_PART_BYTES = 256  # a violation's field or description, a metadata value
_MAX_DETAILS_BYTES = 3072  # the serialized Status (message, ErrorInfo, BadRequest)


def brief(value: object, limit: int = BRIEF) -> str:
    """`repr(value)`, cut to `limit` characters (with `...`), for echoing a caller's value
    (an id, a name, a field, a request_id) in an error message or metadata: an error
    never grows with the input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clip(text: str, limit: int = 100) -> str:
    """`text` cut to `limit` characters (with `...`): a field path in a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cut(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes (at a character boundary)."""
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return text
    return data[: max_bytes - 3].decode("utf-8", "ignore") + "..."


_CALL_ID: contextvars.ContextVar[str] = contextvars.ContextVar("nexus_call_id")


def call_id() -> str:
    """This call's id: made on first use within the call (each gRPC call runs in its own
    task, so its own context) and the same for the rest of it. Sent with INTERNAL errors
    (`ErrorInfo.metadata["call_id"]`) and logged with them, so that a report leads to
    the server's log line."""
    value = _CALL_ID.get(None)
    if value is None:
        value = os.urandom(8).hex()
        _CALL_ID.set(value)
    return value


def code_of(reason: str) -> grpc.StatusCode:
    """The gRPC code the contract declares for an `ErrorReason` name."""
    value = errors_pb2.ErrorReason.DESCRIPTOR.values_by_name[reason]
    code_number = value.GetOptions().Extensions[errors_pb2.code]
    return _CODES[code_number]


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class ApiError(Exception):
    """An error with its reason, message, field violations and metadata.

    Args:
        reason: an `ErrorReason` name from errors.proto (decides the gRPC code).
        message: the developer-facing message.
        violations: `(field, description)` pairs for `BadRequest.field_violations`.
        metadata: extra `ErrorInfo.metadata` (string values).
        retry_after: seconds after which a retry may succeed: sent as a
            `google.rpc.RetryInfo` detail and as the `retry-after` trailer (whole
            seconds, rounded up), which Envoy passes to REST as `Retry-After`.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        violations: Sequence[tuple[str, str]] = (),
        metadata: Mapping[str, str] | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        self.reason = reason
        self.code = code_of(reason)
        self.message = message
        self.violations = list(violations)
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after
        super().__init__(message)

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata beside the status: `retry-after` when a retry delay is
        known (HTTP's whole seconds, at least 1)."""
        if self.retry_after is None:
            return ()
        return (("retry-after", str(max(1, math.ceil(self.retry_after)))),)

    def to_status(self) -> status_pb2.Status:
        """The `google.rpc.Status` with `ErrorInfo` (and `BadRequest` when fields are bad).

        Bounded whatever the input: the message, each metadata value, violation field and
        description are cut to a few hundred bytes, and violations that would take the
        status over its budget are left out (`ErrorInfo.metadata["violations_omitted"]`
        says how many), so an error always fits gRPC's metadata limits."""
        status = status_pb2.Status(
            code=self.code.value[0], message=_cut(self.message, _MAX_MESSAGE_BYTES)
        )
        metadata = {k: _cut(v, _MAX_PART_BYTES) for k, v in self.metadata.items()}
        bad = error_details_pb2.BadRequest()
        budget = _MAX_DETAILS_BYTES - len(status.message.encode()) - 64
        budget -= sum(len(k) + len(v.encode()) + 4 for k, v in metadata.items())
        omitted = 0
        for f, d in self.violations:
            v = error_details_pb2.BadRequest.FieldViolation(
                field=_cut(f, _MAX_PART_BYTES), description=_cut(d, _MAX_PART_BYTES)
            )
            size = v.ByteSize() + 8
            if size > budget:
                omitted += 1
                continue
            budget -= size
            bad.field_violations.append(v)
        if omitted:
            metadata["violations_omitted"] = str(omitted)
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata)
        packed = any_pb2.Any()
        packed.Pack(info)
        status.details.append(packed)
        if bad.field_violations:
            packed = any_pb2.Any()
            packed.Pack(bad)
            status.details.append(packed)
        if self.retry_after is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(max(0, round(self.retry_after * 1e9)))
            packed = any_pb2.Any()
            packed.Pack(retry)
            status.details.append(packed)
        return status


def _reason_of(status: status_pb2.Status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


class StatusError(Exception):
    """Ends a call with a status made earlier (a finished execution's stored error),
    adding the execution id to its `ErrorInfo.metadata`."""

    def __init__(self, status: status_pb2.Status, *, execution_id: str = "") -> None:
        self.status = status
        if execution_id:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    info.metadata["execution_id"] = execution_id
                    detail.Pack(info)
        super().__init__(status.message)


def _problem_field(p: workflow.Problem) -> str:
    return ".".join(x for x in ("definition", "nodes", p.node, p.field) if x)


def _from_workflow_invalid(exc: workflow.WorkflowValidationError) -> ApiError:
    violations = [(_problem_field(p), p.message) for p in exc.problems]
    return ApiError("WORKFLOW_INVALID", str(exc), violations)


def _from_inputs(exc: workflow.InvalidInputsError) -> ApiError:
    violations = [(f"inputs.{e.input}", e.message) for e in exc.errors]
    return ApiError("INPUTS_INVALID", str(exc), violations)


#: DataFlow's ValidationError fields that are about the query, not a record's values.
_QUERY_PARTS = {
    "filter": "QUERY_INVALID",
    "order_by": "QUERY_INVALID",
    "fields": "QUERY_INVALID",
    "q": "QUERY_INVALID",  # a full-text search query (SearchRecords, Search<Models>)
    "conflict_on": "REQUEST_INVALID",
}


def _from_validation(exc: dataflow.ValidationError) -> ApiError:
    field = exc.field if exc.row is None else f"records[{exc.row}].{exc.field}"
    meta = {"row": str(exc.row)} if exc.row is not None else {}
    # the field may be a caller's key (an unknown field name): echoed in brief
    where = f"row {exc.row}: " if exc.row is not None else ""
    message = f"{where}{_clip(exc.field)}: {exc.reason}" if exc.field else where + exc.reason
    head = exc.field.split(".", 1)[0].split("[", 1)[0]
    if head == "page_token":
        return ApiError("PAGE_TOKEN_INVALID", message, [(field, exc.reason)], meta)
    reason = _QUERY_PARTS.get(head, "RECORD_INVALID")
    return ApiError(reason, message, [(field, exc.reason)], meta)


def _from_node(exc: workflow.NodeExecutionError) -> ApiError:
    meta = {"node_id": exc.node_id, "node_type": exc.node_type}
    if exc.cause is not None:
        inner = _mapped(exc.cause)
        if inner is not None:
            inner.metadata.update(meta)
            # our own error's words, without its class (a class name is for the log)
            inner.message = f"node '{exc.node_id}' ({exc.node_type}) failed: {inner.message}"
            return inner
    return ApiError("NODE_FAILED", str(exc), metadata=meta)


def _from_not_found(exc: dataflow.NotFoundError) -> ApiError:
    # the key is the caller's (a 10,000-character id must stay a small NOT_FOUND)
    key = brief(exc.key)
    return ApiError(
        "RECORD_NOT_FOUND",
        f"{exc.model} {key} not found",
        metadata={"model": exc.model, "record_id": str(exc.key)[:BRIEF]},
    )


def _from_already_exists(exc: dataflow.AlreadyExistsError) -> ApiError:
    meta = {"model": exc.model}
    if exc.fields:
        meta["field"] = ",".join(exc.fields)
    if exc.row is not None:
        meta["row"] = str(exc.row)
    return ApiError("RECORD_ALREADY_EXISTS", str(exc), metadata=meta)


def _from_tenant_required(exc: Any) -> ApiError:
    # a principal without a tenant on a tenant-scoped model: a right it does not have
    return ApiError(
        "PERMISSION_DENIED",
        f"permission denied: {exc}",
        metadata={"permission": "tenant"},
    )


def _from_circuit_open(exc: dataflow.CircuitOpenError) -> ApiError:
    # refused at once by an open circuit breaker: the caller learns when to retry
    return ApiError(
        "DEPENDENCY_UNAVAILABLE",
        str(exc),
        metadata={"dependency": exc.dependency[:BRIEF]},
        retry_after=exc.retry_after,
    )


def _mapped(exc: BaseException) -> ApiError | None:
    if isinstance(exc, ApiError):
        return exc
    for etype, make in _TABLE:
        if isinstance(exc, etype):
            return make(exc)
    return None


# Ordered: the first matching type wins, so subclasses come before their bases.
_TABLE: list[tuple[type[BaseException], Callable[[Any], ApiError]]] = [
    (workflow.WorkflowValidationError, _from_workflow_invalid),
    (workflow.InvalidInputsError, _from_inputs),
    (workflow.NodeExecutionError, _from_node),
    (workflow.ExecutionTimeoutError, lambda e: ApiError("EXECUTION_TIMEOUT", str(e))),
    (workflow.ExecutionCancelledError, lambda e: ApiError("EXECUTION_CANCELLED", str(e))),
    (workflow.RegistryError, lambda e: ApiError("WORKFLOW_INVALID", str(e))),
    (dataflow.TenantRequired, _from_tenant_required),
    (dataflow.ValidationError, _from_validation),
    (dataflow.NotFoundError, _from_not_found),
    (dataflow.AlreadyExistsError, _from_already_exists),
    (dataflow.CircuitOpenError, _from_circuit_open),
    (dataflow.ConflictError, lambda e: ApiError("TRANSACTION_CONFLICT", str(e))),
    (dataflow.MigrationError, lambda e: ApiError("CONSTRAINT_VIOLATION", str(e))),
    (dataflow.DatabaseError, lambda e: ApiError("DATABASE_UNAVAILABLE", str(e))),
    (asyncio.CancelledError, lambda e: ApiError("EXECUTION_CANCELLED", "the call was cancelled")),
]


def to_api_error(exc: BaseException) -> ApiError:
    """Map any exception to an `ApiError`; unknown ones become INTERNAL and are logged."""
    mapped = _mapped(exc)
    if mapped is not None:
        return mapped
    cid = call_id()
    _log.error("unexpected error (call_id %s)", cid, exc_info=exc)
    return ApiError(
        "INTERNAL_ERROR",
        f"internal error (logged on the server with call_id {cid})",
        metadata={"call_id": cid},
    )


def status_of(exc: BaseException) -> status_pb2.Status:
    """The `google.rpc.Status` for any exception (used for stored execution errors)."""
    return to_api_error(exc).to_status()


#: The ErrorInfo reason of the call's failure, once `abort` ended it (the gateway's
#: audit entry reads it after the servicer returns).
FAILURE_REASON: contextvars.ContextVar[str] = contextvars.ContextVar(
    "nexus_failure_reason", default=""
)


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the call with the status of `exc`, details in `grpc-status-details-bin`."""
    extra: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, StatusError):
        status = exc.status
        FAILURE_REASON.set(_reason_of(status))
    else:
        api = to_api_error(exc)
        FAILURE_REASON.set(api.reason)
        status = api.to_status()
        extra = api.trailers()
    rich = rpc_status.to_status(status)
    await context.abort(
        rich.code, rich.details, trailing_metadata=(*rich.trailing_metadata, *extra)
    )
    raise AssertionError("unreachable")  # context.abort raises


# --- requests that are not valid protobuf -------------------------------------------------


class _Malformed:
    """What a guarded deserializer returns for bytes that are not a valid request: the
    guarded behaviour then ends the call with INVALID_ARGUMENT (a deserializer cannot:
    grpc turns its exceptions into UNKNOWN with the exception's class in the message).
    `json`: why the request is not valid JSON of the message, when it came as JSON."""

    __slots__ = ("deep", "json", "message")

    def __init__(self, message: str, deep: bool, json: str | None = None) -> None:
        self.message = message
        self.deep = deep
        self.json = json


#: Whether the call being served came in JSON (the Connect protocol's JSON codec, which
#: Envoy's bridge passes on as the gRPC message): its replies go out as JSON too. Set
#: by the guarded deserializer, read by the serializer, in the call's own task.
_JSON_CODEC: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "nexus_json_codec", default=False
)


def _from_json(deserializer: Callable[[bytes], Any], data: bytes, name: str) -> Any:
    """The request in `data` as proto3 JSON (both field name forms accepted), or a
    `_Malformed` saying why it is not."""
    try:
        request = json_format.Parse(data, deserializer(b""))
    except RecursionError:
        return _Malformed(name, deep=True, json="nested too deeply")
    except (json_format.ParseError, UnicodeDecodeError, ValueError) as exc:
        # protobuf's first line names the field and the reason; it may quote the input
        return _Malformed(name, deep=False, json=_clip(str(exc).split("\n", 1)[0], 200))
    _JSON_CODEC.set(True)
    return request


#: Whether the call being served came through Envoy's REST transcoding (the gateway sets
#: it from the call's channel): its reply is serialized deterministically, so the JSON
#: Envoy prints from it lists a Struct's keys (a workflow's inputs and outputs) sorted.
#: Otherwise they come in the map's wire order, which follows a hash seeded per process:
#: the same within a process, different after each restart.
_SORTED_MAPS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "nexus_sorted_maps", default=False
)


def sort_reply_maps() -> None:
    """Serialize the current call's reply deterministically (its map entries sorted by
    key): for a call transcoded to REST, whose JSON a person reads."""
    _SORTED_MAPS.set(True)


def _codec_serializer(serializer: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """`serializer`; proto3 JSON for a call that came in JSON (`_JSON_CODEC`); map
    entries sorted by key for a call transcoded to REST (`_SORTED_MAPS`)."""

    def serialize(reply: Any) -> bytes:
        if _JSON_CODEC.get() and isinstance(reply, Message):
            return json_format.MessageToJson(reply, indent=None).encode()
        if _SORTED_MAPS.get() and isinstance(reply, Message):
            return reply.SerializeToString(deterministic=True)
        return serializer(reply)

    return serialize


def _message_name(deserializer: Callable[[bytes], Any]) -> str:
    """The full name of the message a deserializer parses (`Foo.FromString`, or a
    function with a `message_name` attribute), else "request message"."""
    name = getattr(deserializer, "message_name", None)
    if name is None:
        desc = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
        name = getattr(desc, "full_name", None)
    return str(name) if name else "request message"


def _guard_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    name = _message_name(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except RecursionError:
            return _Malformed(name, deep=True)
        except (DecodeError, UnicodeDecodeError) as exc:
            # JSON (`{`: a group's start tag, which no message of ours has) is the
            # Connect JSON codec's request
            if data[:1] == b"{":
                return _from_json(deserializer, data, name)
            return _Malformed(name, deep="depth" in str(exc).lower())

    return deserialize


_DEEP = (
    "nested deeper than protobuf's decoder allows (100 message levels; a filter may be "
    f"nested at most {dataflow.MAX_FILTER_DEPTH} levels)"
)
_MALFORMED = "not valid protobuf bytes (bad UTF-8 in a string, truncated, or mis-typed)"


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], bad: _Malformed) -> NoReturn:
    if bad.json is None:
        form, why = "protobuf", _MALFORMED
    else:
        form, why = "JSON", f"not valid proto3 JSON: {bad.json}"
    await abort(
        context,
        ApiError(
            "REQUEST_INVALID",
            f"the request is not a valid {bad.message} (malformed {form})",
            [("request", _DEEP if bad.deep else why)],
            metadata={"message": bad.message},
        ),
    )


async def _checked(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is _Malformed:
            await _refuse(context, request)
        yield request


def _guard_behaviour(behaviour: Callable[..., Any], streaming_request: bool) -> Callable[..., Any]:
    if streaming_request:
        if inspect.isasyncgenfunction(behaviour):

            async def stream_gen(requests: Any, context: Any) -> AsyncIterator[Any]:
                async for item in behaviour(_checked(requests, context), context):
                    yield item

            return stream_gen

        async def stream_call(requests: Any, context: Any) -> Any:
            return await behaviour(_checked(requests, context), context)

        return stream_call
    if inspect.isasyncgenfunction(behaviour):

        async def unary_gen(request: Any, context: Any) -> AsyncIterator[Any]:
            if type(request) is _Malformed:
                await _refuse(context, request)
            async for item in behaviour(request, context):
                yield item

        return unary_gen

    async def unary_call(request: Any, context: Any) -> Any:
        if type(request) is _Malformed:
            await _refuse(context, request)
        return await behaviour(request, context)

    return unary_call


def guard_method(path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` with its request decoding guarded (see `decode_guarded`)."""
    if handler.request_deserializer is None or not hasattr(handler, "_replace"):
        return handler  # raw bytes in: nothing to decode
    kind = ("stream_" if handler.request_streaming else "unary_") + (
        "stream" if handler.response_streaming else "unary"
    )
    changes = {
        "request_deserializer": _guard_deserializer(handler.request_deserializer),
        kind: _guard_behaviour(getattr(handler, kind), handler.request_streaming),
    }
    if handler.response_serializer is not None:
        changes["response_serializer"] = _codec_serializer(handler.response_serializer)
    guarded: grpc.RpcMethodHandler = handler._replace(**changes)
    return guarded


def decode_guarded(handler: grpc.GenericRpcHandler) -> grpc.GenericRpcHandler:
    """`handler` with every method's request decoding guarded: malformed protobuf (bad
    UTF-8 in a string, truncated bytes, nesting over the decoder's limit) is
    INVALID_ARGUMENT/REQUEST_INVALID "the request is not a valid <Message>" (metadata
    `message`), where grpc would answer UNKNOWN naming protobuf's DecodeError class."""
    return map_methods(handler, guard_method)


assert code_pb2.OK == 0  # the numbering grpc.StatusCode and google.rpc.Code share
