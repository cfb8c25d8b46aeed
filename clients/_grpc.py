"""The shared Python client of the Nexus gRPC server, used by the CLI and the MCP adapter.

Only the generated stubs (`nexus_api`) and server reflection are used, never the server
package: whatever the server validates or refuses, its clients see the same way.

- `server_address()`: `--server`, else `NEXUS_SERVER`, else `127.0.0.1:50051`.
- `to_json()`: the proto3 JSON document REST returns (original field names).
- `ApiFailure`: a failed call's `google.rpc.Status` (code, reason, violations), rendered
  for people, with the CLI exit code of its class.
- `TypeSpec` / `type_spec()`: the one table from a Nexus type name (`int`, `str | None`)
  to a Python type for flags and a JSON Schema for tools.
- `DynamicMethods`: any RPC by `Service/Method` with JSON in and out, from the stubs'
  descriptors for the static services and from server reflection for the typed ones.
"""

from __future__ import annotations

import contextvars
import json
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message, message_factory, struct_pb2
from google.protobuf.json_format import MessageToDict, ParseDict

# registers google.rpc.ErrorInfo/BadRequest, so an `Execution.error` prints its details
from google.rpc import error_details_pb2

__all__ = [
    "CREDENTIAL",
    "DEFAULT_SERVER",
    "EXIT_CONFLICT",
    "EXIT_FAILED",
    "EXIT_INVALID",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_PERMISSION",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "REQUEST_ID_HEADER",
    "TRACE_CONTEXT",
    "ApiFailure",
    "Credential",
    "DynamicMethods",
    "TypeSpec",
    "call_metadata",
    "credential_from_env",
    "exact",
    "in_order",
    "normalize",
    "order_values",
    "server_address",
    "set_channel",
    "struct_of",
    "to_json",
    "trace_context_of",
    "trace_metadata",
    "type_spec",
]

DEFAULT_SERVER = "127.0.0.1:50051"
#: The header carrying a write's `request_id` too (see `call_metadata`).
REQUEST_ID_HEADER = "x-nexus-request-id"

#: The package of the typed per-model messages and services (records print every field).
MODELS_PACKAGE = "nexus.models.v1"

#: Exit codes of the CLI, one per class of failure (documented in docs/cli.md).
EXIT_OK = 0
EXIT_FAILED = 1  # the call failed for another reason (a node failed, an internal error)
EXIT_USAGE = 2  # bad command line (click's own code for usage errors)
EXIT_NOT_FOUND = 3  # NOT_FOUND
EXIT_INVALID = 4  # INVALID_ARGUMENT, or a bad row in an import file
EXIT_CONFLICT = 5  # ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED
EXIT_UNAVAILABLE = 6  # the server cannot be reached (UNAVAILABLE, a connect deadline)
EXIT_PERMISSION = 7  # PERMISSION_DENIED, UNAUTHENTICATED

_EXIT_BY_CODE: dict[str, int] = {
    "NOT_FOUND": EXIT_NOT_FOUND,
    "INVALID_ARGUMENT": EXIT_INVALID,
    "OUT_OF_RANGE": EXIT_INVALID,
    "ALREADY_EXISTS": EXIT_CONFLICT,
    "FAILED_PRECONDITION": EXIT_CONFLICT,
    "ABORTED": EXIT_CONFLICT,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "PERMISSION_DENIED": EXIT_PERMISSION,
    "UNAUTHENTICATED": EXIT_PERMISSION,
}


def server_address(explicit: str | None = None) -> str:
    """The gRPC server to talk to: `explicit`, else `$NEXUS_SERVER`, else the default."""
    return explicit or os.environ.get("NEXUS_SERVER") or DEFAULT_SERVER


@dataclass(frozen=True)
class Credential:
    """What a client sends to prove who it is: a JWT (`token`) or an API key."""

    kind: str  # "token" or "api_key"
    value: str

    def metadata(self) -> tuple[str, str]:
        if self.kind == "token":
            return ("authorization", f"Bearer {self.value}")
        return ("x-api-key", self.value)


#: The credential of the calls made in this context (the CLI sets it once; the MCP
#: adapter sets it per HTTP request, from the caller's own headers).
CREDENTIAL: contextvars.ContextVar[Credential | None] = contextvars.ContextVar(
    "nexus_credential", default=None
)

#: The channel this process is (`cli`, `mcp`), sent as `x-nexus-channel` for the audit
#: trail; set once by the channel's entry point. Plain gRPC clients send none (`grpc`).
_CHANNEL: list[str] = []


def set_channel(name: str) -> None:
    """Name the channel this process's calls come through (`x-nexus-channel`)."""
    _CHANNEL[:] = [name]


def credential_from_env() -> Credential | None:
    """The credential `$NEXUS_TOKEN` (a JWT) or `$NEXUS_API_KEY` gives, if either is set.

    Raises:
        ValueError: both are set (which one was meant cannot be told).
    """
    token = os.environ.get("NEXUS_TOKEN")
    key = os.environ.get("NEXUS_API_KEY")
    if token and key:
        raise ValueError("both NEXUS_TOKEN and NEXUS_API_KEY are set; set one of them")
    if token:
        return Credential("token", token)
    if key:
        return Credential("api_key", key)
    return None


#: The W3C trace context (`traceparent`, and `tracestate` when given) of the calls made
#: in this context: the MCP adapter sets it per request, from the caller's HTTP headers
#: or the request's `_meta`, so the server's spans join the agent's trace.
TRACE_CONTEXT: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "nexus_trace_context", default=()
)

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")
_MAX_TRACESTATE = 512


def trace_context_of(traceparent: object, tracestate: object = None) -> tuple[tuple[str, str], ...]:
    """The metadata carrying a W3C trace context, or `()` when `traceparent` is not a
    valid one (it is then dropped: a bad header never fails a call)."""
    if not isinstance(traceparent, str) or not _TRACEPARENT.match(traceparent.strip()):
        return ()
    meta = [("traceparent", traceparent.strip())]
    if isinstance(tracestate, str) and tracestate and len(tracestate) <= _MAX_TRACESTATE:
        meta.append(("tracestate", tracestate))
    return tuple(meta)


def trace_metadata() -> tuple[tuple[str, str], ...]:
    """The trace context a call carries: the one this context was given
    (`TRACE_CONTEXT`), else the active OpenTelemetry span's when the process traces
    (the API is optional), else `$TRACEPARENT` (and `$TRACESTATE`), as a CI job or a
    shell script that started a trace sets them."""
    given = TRACE_CONTEXT.get()
    if given:
        return given
    active = _active_trace()
    if active:
        return active
    return trace_context_of(os.environ.get("TRACEPARENT"), os.environ.get("TRACESTATE"))


def _active_trace() -> tuple[tuple[str, str], ...]:
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return ()
    if not trace.get_current_span().get_span_context().is_valid:
        return ()
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return trace_context_of(carrier.get("traceparent"), carrier.get("tracestate"))


def call_metadata(request_id: str = "") -> tuple[tuple[str, str], ...]:
    """The metadata of every call: the credential of this context, the channel, the
    trace context (`trace_metadata`), and the development label `x-nexus-caller` from
    `$NEXUS_CALLER` (used only when the server's authentication is off).

    A write with an idempotency key (`request_id`) sends it also as the header
    `REQUEST_ID_HEADER`: an Envoy in front of several replicas cannot read the body,
    and retries a write on another replica only when this header says it is safe to
    (docs/deploy.md)."""
    meta: list[tuple[str, str]] = list(trace_metadata())
    if request_id:
        meta.append((REQUEST_ID_HEADER, request_id))
    cred = CREDENTIAL.get()
    if cred is not None:
        meta.append(cred.metadata())
    if _CHANNEL:
        meta.append(("x-nexus-channel", _CHANNEL[0]))
    caller = os.environ.get("NEXUS_CALLER")
    if caller:
        meta.append(("x-nexus-caller", caller))
    return tuple(meta)


def normalize(value: Any) -> Any:
    """`value` with integral floats as ints, as Envoy prints a `Struct` number.

    A `google.protobuf.Value` number is a double, so `MessageToDict` gives `0.0` where
    the REST body reads `0`; both are the same JSON number, this makes them the same text.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize(v) for v in value]
    return value


def to_json(msg: message.Message, only: Sequence[str] = ()) -> Any:
    """The proto3 JSON document of `msg`: what REST returns for the same call.

    Fields without presence that hold their default value (`false`, `0`, `""`, `[]`)
    are printed too, as Envoy's transcoder prints them (`always_print_primitive_fields`):
    the CLI's `-o json` and the MCP adapter's results are exactly the REST body. Every
    field of a typed record (a message of `nexus.models.v1`) is printed, a null one as
    `null`, as the server prints it for REST; `only`: the fields a `fields` projection
    asked for, the others left out.

    A `google.protobuf.Value` number that is not finite (a record stored before such
    values were refused) has no proto3 JSON form; it is printed as a double field is,
    `"NaN"`, `"Infinity"` or `"-Infinity"`, instead of failing the whole document.
    """
    try:
        doc = MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except (ValueError, json_format.Error):  # json_format wraps it in a nested message
        copy = type(msg)()
        copy.CopyFrom(msg)
        _finite(copy)
        doc = MessageToDict(
            copy, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    return _with_nulls(msg, normalize(doc), frozenset(only))


def _with_nulls(msg: message.Message, doc: Any, only: frozenset[str]) -> Any:
    """`doc` with each unset field that has presence of a typed record as None (in field
    order), in `msg` and in the repeated typed messages it holds; anything else as it
    is."""
    desc = msg.DESCRIPTOR
    if desc.file.package != MODELS_PACKAGE:
        return doc
    out: dict[str, Any] = {}
    for f in desc.fields:
        if f.name in doc:
            value = doc[f.name]
            if f.is_repeated and f.message_type is not None:
                value = [
                    _with_nulls(sub, d, only)
                    for sub, d in zip(getattr(msg, f.name), value, strict=True)
                ]
            out[f.name] = value
        elif f.has_presence and (not only or f.name in only):
            out[f.name] = None
    return out


def _finite(msg: message.Message) -> None:
    """Replace every non-finite `Value` number inside `msg` by its proto3 JSON text."""
    if isinstance(msg, struct_pb2.Value):
        x = msg.number_value
        if msg.WhichOneof("kind") == "number_value" and not math.isfinite(x):
            msg.string_value = "NaN" if math.isnan(x) else f"{'-' if x < 0 else ''}Infinity"
            return
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is not None:
                for item in value.values():
                    _finite(item)
        elif fd.is_repeated:
            for item in value:
                _finite(item)
        else:
            _finite(value)


#: The largest magnitude a JSON number (a double) holds exactly for every integer.
EXACT_INT = 2**53


def exact(value: Any) -> Any:
    """`value` with every int beyond +-2^53 as its decimal text (bools and the rest as they
    are): the 64-bit integer rule of docs/api.md, which the server applies to what it
    sends. A `Struct` number is a double, so 2^63-1 sent as a number would arrive as
    2^63; as text it arrives exact, and the server reads digits as an int where an int
    is expected."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -EXACT_INT <= value <= EXACT_INT else str(value)
    if isinstance(value, dict):
        return {k: exact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [exact(v) for v in value]
    return value


def struct_of(data: Mapping[str, Any]) -> struct_pb2.Struct:
    """A `google.protobuf.Struct` holding `data`, its large ints as text (`exact`)."""
    s = struct_pb2.Struct()
    s.update(exact(dict(data)))
    return s


# ---------------------------------------------------------------------------- errors


@dataclass(eq=False)
class ApiFailure(Exception):
    """A failed call: its gRPC status and the `google.rpc` details the server sent."""

    code: str
    message: str
    reason: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: Sequence[tuple[str, str]] = ()
    #: Seconds after which a retry may succeed (`google.rpc.RetryInfo`), else None.
    retry_after: float | None = None

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> ApiFailure:
        """Read the status, `ErrorInfo` and `BadRequest` of a failed sync or aio call."""
        from google.rpc import status_pb2

        code_obj = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        code = code_obj.name if code_obj is not None else "UNKNOWN"
        text = (err.details() if hasattr(err, "details") else None) or ""
        reason = ""
        meta: dict[str, str] = {}
        violations: list[tuple[str, str]] = []
        retry: float | None = None
        trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
        for key, value in trailing or ():
            if key != "grpc-status-details-bin":
                continue
            status = status_pb2.Status.FromString(value)
            text = status.message or text
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = info.reason
                    meta = dict(info.metadata)
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations += [(v.field, v.description) for v in bad.field_violations]
                elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info_retry = error_details_pb2.RetryInfo()
                    detail.Unpack(info_retry)
                    retry = info_retry.retry_delay.ToNanoseconds() / 1e9
        return cls(code, text, reason, meta, tuple(violations), retry)

    @property
    def exit_code(self) -> int:
        """The CLI exit code of this class of failure."""
        return _EXIT_BY_CODE.get(self.code, EXIT_FAILED)

    def render(self) -> str:
        """Text for people: `CODE (REASON): message`, then one line per field violation."""
        head = f"{self.code} ({self.reason})" if self.reason else self.code
        lines = [f"{head}: {self.message}" if self.message else head]
        lines += [f"  {f or '(request)'}: {d}" for f, d in self.violations]
        if self.metadata:
            lines.append("  " + ", ".join(f"{k}={v}" for k, v in sorted(self.metadata.items())))
        if self.code == "UNAVAILABLE" and not self.reason:
            lines.append("  is the server running? (--server HOST:PORT or NEXUS_SERVER)")
        if self.retry_after is not None:
            lines.append(f"  retry in {_delay(self.retry_after)}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """The failure as a JSON object (for `--output json` and MCP results)."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.reason:
            out["reason"] = self.reason
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        if self.violations:
            out["field_violations"] = [{"field": f, "description": d} for f, d in self.violations]
        if self.retry_after is not None:
            out["retry_after_seconds"] = round(self.retry_after, 3)
        return out

    def __str__(self) -> str:
        return self.render()


def _delay(seconds: float) -> str:
    """A retry delay for people: `0.4 s`, `12 s`."""
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


# ---------------------------------------------------------------------------- types


@dataclass(frozen=True)
class TypeSpec:
    """What a Nexus type name means to a client."""

    name: str
    python: type  # the flag's type (dict/list/any are given as JSON text)
    schema: dict[str, Any]  # JSON Schema, small and self-contained
    nullable: bool = False
    is_json: bool = False  # the flag value is JSON text


_JSON_TYPES = ("string", "number", "boolean", "object", "array", "null")

_BASE: dict[str, tuple[type, dict[str, Any], bool]] = {
    "str": (str, {"type": "string"}, False),
    "int": (int, {"type": "integer"}, False),
    "float": (float, {"type": "number"}, False),
    "bool": (bool, {"type": "boolean"}, False),
    "bytes": (str, {"type": "string", "contentEncoding": "base64"}, False),
    "decimal": (str, {"type": "string", "pattern": r"^-?\d+(\.\d+)?$"}, False),
    "datetime": (str, {"type": "string", "format": "date-time"}, False),
    "date": (str, {"type": "string", "format": "date"}, False),
    "uuid": (str, {"type": "string", "format": "uuid"}, False),
    "enum": (str, {"type": "string"}, False),
    "dict": (str, {"type": "object"}, True),
    "list": (str, {"type": "array"}, True),
    # any JSON value, spelled with types (an empty schema says nothing to a client)
    "any": (str, {"anyOf": [{"type": t} for t in _JSON_TYPES]}, True),
}


def type_spec(type_name: str, *, nullable: bool = False) -> TypeSpec:
    """The `TypeSpec` of a Nexus type name (`int`, `str | None`, ...).

    An unknown name is treated as `any` (JSON), so a newer server never breaks a client.
    """
    name = type_name.strip()
    if name.endswith("| None"):
        name = name[: -len("| None")].strip()
        nullable = True
    python, schema, is_json = _BASE.get(name, _BASE["any"])
    schema = dict(schema)
    if nullable and "type" in schema:
        # `anyOf` of single types, not `"type": [..., "null"]`: the form every client
        # that maps schemas onto a one-type dialect accepts (the MCP Inspector's
        # --strict flags the array form as unportable)
        schema = {"anyOf": [schema, {"type": "null"}]}
    return TypeSpec(type_name, python, schema, nullable, is_json)


# ---------------------------------------------------------------------------- any RPC


_STATIC_SERVICES = {
    "WorkflowService": "nexus.workflow.v1.WorkflowService",
    "ModelService": "nexus.model.v1.ModelService",
    "OpenApiService": "nexus.openapi.v1.OpenApiService",
}


@dataclass(frozen=True)
class Method:
    """One RPC found by name: its path and message classes."""

    path: str  # /package.Service/Method
    request: type[message.Message]
    response: type[message.Message]
    server_streaming: bool
    client_streaming: bool


class DynamicMethods:
    """Finds any RPC by `Service/Method` and calls it with JSON.

    The static services resolve from the descriptors the generated stubs register (no
    round trip); anything else (the typed per-model services) through server reflection.
    A short service name (`ContactService`) is looked up among the services reflection
    lists.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self._reflection_pool: descriptor_pool.DescriptorPool | None = None

    def _reflection(self) -> descriptor_pool.DescriptorPool:
        if self._reflection_pool is None:
            from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
                ProtoReflectionDescriptorDatabase,
            )

            self._db = ProtoReflectionDescriptorDatabase(self._channel)
            self._reflection_pool = descriptor_pool.DescriptorPool(self._db)
        return self._reflection_pool

    def services(self) -> list[str]:
        """Every service the server lists through reflection."""
        self._reflection()
        return sorted(self._db.get_services())

    def find(self, target: str) -> Method:
        """The method `Service/Method` (`package.Service/Method`, or the short name)."""
        import nexus_api.nexus.model.v1.model_service_pb2
        import nexus_api.nexus.openapi.v1.openapi_service_pb2
        import nexus_api.nexus.workflow.v1.workflow_service_pb2  # noqa: F401

        text = target.strip("/")
        if "/" in text:
            service_name, _, method_name = text.rpartition("/")
        else:
            service_name, _, method_name = text.rpartition(".")
        if not service_name or not method_name:
            raise KeyError(f"{target!r} is not Service/Method")
        service_name = _STATIC_SERVICES.get(service_name, service_name)
        candidates = [service_name]
        default = descriptor_pool.Default()
        for pool in (default, None):
            names = candidates
            if pool is None:
                pool = self._reflection()
                if "." not in service_name:
                    names = [s for s in self.services() if s.rsplit(".", 1)[-1] == service_name]
            for name in names:
                try:
                    svc = pool.FindServiceByName(name)
                except KeyError:
                    continue
                m = svc.methods_by_name.get(method_name)
                if m is None:
                    raise KeyError(f"{name} has no method {method_name!r}")
                return Method(
                    f"/{svc.full_name}/{m.name}",
                    message_factory.GetMessageClass(m.input_type),
                    message_factory.GetMessageClass(m.output_type),
                    m.server_streaming,
                    m.client_streaming,
                )
        raise KeyError(f"the server has no service {service_name!r}")

    def call(
        self,
        target: str,
        body: Mapping[str, Any],
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Iterator[Any]:
        """Call `target` with the JSON `body`; yields each response as proto3 JSON, default
        values included (the REST body of the same call). Ints beyond +-2^53 in `body` are
        sent exact (`exact`), also inside a `Struct` such as a filter."""
        method = self.find(target)
        if method.client_streaming:
            raise KeyError(f"{target}: client-streaming RPCs are not supported")
        # an int beyond +-2^53 as its text: exact in an int64 field and in a Struct alike
        request = ParseDict(exact(dict(body)), method.request())
        kwargs: dict[str, Any] = {
            "request_serializer": method.request.SerializeToString,
            "response_deserializer": method.response.FromString,
        }
        # a typed request's `fields` (List, Search) is a projection: only those print
        desc = request.DESCRIPTOR
        typed = desc.file.package == MODELS_PACKAGE and "fields" in desc.fields_by_name
        only = list(request.fields) if typed else []  # type: ignore[attr-defined]
        if method.server_streaming:
            stream = self._channel.unary_stream(method.path, **kwargs)
            for item in stream(request, timeout=timeout, metadata=tuple(metadata)):
                yield to_json(item, only)
        else:
            unary = self._channel.unary_unary(method.path, **kwargs)
            yield to_json(unary(request, timeout=timeout, metadata=tuple(metadata)), only)


def dumps(value: Any) -> str:
    """Pretty JSON text (the CLI's `--output json`)."""
    return json.dumps(value, indent=2, ensure_ascii=False)


# ---- the order of a record's fields -----------------------------------------------------


def in_order(record: Any, names: Sequence[str]) -> Any:
    """A record with its fields in `names` order (the model's declaration order), any
    other keys after them, sorted: the same order every time."""
    if not isinstance(record, dict):
        return record
    rank = {n: i for i, n in enumerate(names)}
    return dict(sorted(record.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))


def order_values(value: Any, orders: Sequence[Sequence[str]]) -> Any:
    """`value` with every object's keys in a fixed order: an object whose keys are all
    fields of a model in that model's declaration order, any other object sorted (a
    `Struct` comes back from gRPC in no particular order)."""
    if isinstance(value, list):
        return [order_values(v, orders) for v in value]
    if not isinstance(value, dict):
        return value
    keys = set(value)
    fits = [o for o in orders if keys <= set(o)]
    names = min(fits, key=len) if fits else sorted(keys)
    return {k: order_values(v, orders) for k, v in in_order(value, names).items()}
