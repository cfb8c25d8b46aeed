"""Typed per-model protobuf messages and services, built as descriptors at run time.

For a model `Contact` this makes a `Contact` message with real field types and a
`ContactService` (Create/Get/Update/Delete/List/Count/Upsert, the bulk RPCs, and
`SearchContacts` when the model has searchable fields) with `google.api.http` routes
under `/v1/contacts`. Nothing is written by hand per model: the
file descriptor is made from the model's fields when the server starts, added to the
server's descriptor pool (so reflection, Envoy and other languages see the same types)
and exported by `nexus proto export`.

Every scalar model field is a proto3 `optional` field, so a request says which fields it
sets (Create leaves the rest to the model defaults) and a null column is an unset field.

REST reaches each typed service through its twin, `nexus.models.v1.rest.<Model>Service`
(`build_rest_file`): the same methods, requests and HTTP bindings, but a method that
answers records answers their JSON as a `google.api.HttpBody` (`record_json`), with every
field of each record printed and a null one as `null`, which Envoy's transcoder cannot
print for a field with presence. gRPC, gRPC-Web and Connect call the typed service
itself; the twin is in the descriptor set Envoy reads, not in reflection.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import enum
import json
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from google.api import annotations_pb2, http_pb2, httpbody_pb2
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    empty_pb2,
    field_mask_pb2,
    message,
    message_factory,
    struct_pb2,
    timestamp_pb2,
)
from google.protobuf.json_format import ParseDict

from dataflow import FieldInfo, ModelInfo

from ._convert import from_struct, from_value
from ._errors import ApiError
from ._jsonable import to_jsonable
from ._model_docs import describe_models_file

__all__ = [
    "PACKAGE",
    "REST_PACKAGE",
    "TypedModels",
    "build_models_file",
    "build_rest_file",
    "collection_id",
    "double_json",
    "json_body",
    "public_path",
    "record_json",
    "rest_body",
]

PACKAGE = "nexus.models.v1"
FILE_NAME = "nexus/models/v1/models.proto"
#: The package of the typed services' REST twins (`build_rest_file`).
REST_PACKAGE = f"{PACKAGE}.rest"
REST_FILE_NAME = "nexus/models/v1/rest/rest.proto"
_HTTP_BODY = ".google.api.HttpBody"
#: Replies without records: the twin answers them as the typed method does.
_NO_RECORDS = frozenset(
    {".google.protobuf.Empty", f".{PACKAGE}.CountResult", f".{PACKAGE}.BulkWriteResult"}
)

_FDP = descriptor_pb2.FieldDescriptorProto
_T = _FDP.Type

# Python type -> (proto scalar type, message type name or "")
_SCALAR: dict[Any, tuple[int, str]] = {
    str: (_T.TYPE_STRING, ""),
    int: (_T.TYPE_INT64, ""),
    float: (_T.TYPE_DOUBLE, ""),
    bool: (_T.TYPE_BOOL, ""),
    bytes: (_T.TYPE_BYTES, ""),
    decimal.Decimal: (_T.TYPE_STRING, ""),  # exact: decimals travel as text
    _dt.date: (_T.TYPE_STRING, ""),  # ISO 8601 date
    uuid.UUID: (_T.TYPE_STRING, ""),
    _dt.datetime: (_T.TYPE_MESSAGE, ".google.protobuf.Timestamp"),
    dict: (_T.TYPE_MESSAGE, ".google.protobuf.Struct"),
    list: (_T.TYPE_MESSAGE, ".google.protobuf.ListValue"),
}
_ANY_VALUE = (_T.TYPE_MESSAGE, ".google.protobuf.Value")
_STRUCT = (_T.TYPE_MESSAGE, ".google.protobuf.Struct")

_DEPENDENCIES = (
    annotations_pb2,
    empty_pb2,
    field_mask_pb2,
    struct_pb2,
    timestamp_pb2,
)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def collection_id(model_name: str) -> str:
    """The REST collection of a model: `Contact` -> `contacts`, `Company` -> `companies`,
    `OrderLine` -> `order_lines`."""
    s = _snake(model_name)
    if re.search(r"[^aeiou]y$", s):
        return s[:-1] + "ies"
    if re.search(r"(s|x|z|ch|sh)$", s):
        return s + "es"
    return s + "s"


def _plural_camel(model_name: str) -> str:
    return "".join(p.capitalize() for p in collection_id(model_name).split("_"))


def _proto_type(tp: Any) -> tuple[int, str]:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return (_T.TYPE_STRING, "")
    return _SCALAR.get(tp, _ANY_VALUE)


def _rule(
    verb: str, path: str, body: str = "", extra: http_pb2.HttpRule | None = None
) -> http_pb2.HttpRule:
    rule = http_pb2.HttpRule(body=body)
    setattr(rule, verb, path)
    if extra is not None:
        rule.additional_bindings.append(extra)
    return rule


class _FileBuilder:
    def __init__(self) -> None:
        self.fdp = descriptor_pb2.FileDescriptorProto(
            name=FILE_NAME, package=PACKAGE, syntax="proto3"
        )
        self.fdp.dependency.extend(m.DESCRIPTOR.name for m in _DEPENDENCIES)
        self.fdp.options.go_package = "nexus/models/v1;modelsv1"

    def message(self, name: str) -> descriptor_pb2.DescriptorProto:
        msg = self.fdp.message_type.add(name=name)
        return msg

    @staticmethod
    def field(
        msg: descriptor_pb2.DescriptorProto,
        name: str,
        ftype: tuple[int, str],
        *,
        repeated: bool = False,
        optional: bool = False,
    ) -> None:
        number = len(msg.field) + 1
        f = msg.field.add(name=name, number=number, type=ftype[0])  # type: ignore[arg-type,unused-ignore]
        if ftype[1]:
            f.type_name = ftype[1]
        if repeated:
            f.label = _FDP.LABEL_REPEATED
        else:
            f.label = _FDP.LABEL_OPTIONAL
            if optional and ftype[0] != _T.TYPE_MESSAGE:
                f.proto3_optional = True
                f.oneof_index = len(msg.oneof_decl)
                msg.oneof_decl.add(name=f"_{name}")
        f.json_name = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)

    def method(
        self,
        service: descriptor_pb2.ServiceDescriptorProto,
        name: str,
        req: str,
        resp: str,
        rule: http_pb2.HttpRule,
    ) -> None:
        m = service.method.add(name=name, input_type=req, output_type=resp)
        m.options.Extensions[annotations_pb2.http].CopyFrom(rule)


def build_models_file(models: Sequence[ModelInfo]) -> descriptor_pb2.FileDescriptorProto:
    """The `nexus/models/v1/models.proto` file for these models."""
    b = _FileBuilder()
    p = f".{PACKAGE}."
    s = _T.TYPE_STRING
    # shared messages
    bulk = b.message("BulkWriteResult")
    b.field(bulk, "affected", (_T.TYPE_INT64, ""))
    count = b.message("CountResult")
    b.field(count, "count", (_T.TYPE_INT64, ""))
    for model in models:
        name, plural, coll = model.name, _plural_camel(model.name), collection_id(model.name)
        idf = model.primary_key
        id_type = _proto_type(idf.base_type)
        rec = b.message(name)
        for f in model.fields:
            b.field(rec, f.name, _proto_type(f.base_type), optional=True)
        m = b.message(f"Create{name}Request")
        b.field(m, _snake(name), (_T.TYPE_MESSAGE, p + name))
        b.field(m, "request_id", (s, ""))
        m = b.message(f"Get{name}Request")
        b.field(m, "id", id_type)
        m = b.message(f"Update{name}Request")
        b.field(m, _snake(name), (_T.TYPE_MESSAGE, p + name))
        b.field(m, "update_mask", (_T.TYPE_MESSAGE, ".google.protobuf.FieldMask"))
        b.field(m, "request_id", (s, ""))
        m = b.message(f"Delete{name}Request")
        b.field(m, "id", id_type)
        b.field(m, "request_id", (s, ""))  # field 2, added later: numbers only grow
        m = b.message(f"List{plural}Request")
        b.field(m, "filter", _STRUCT)
        b.field(m, "order_by", (s, ""))
        b.field(m, "page_size", (_T.TYPE_INT32, ""))
        b.field(m, "page_token", (s, ""))
        b.field(m, "fields", (s, ""), repeated=True)
        m = b.message(f"List{plural}Response")
        b.field(m, coll, (_T.TYPE_MESSAGE, p + name), repeated=True)
        b.field(m, "next_page_token", (s, ""))
        m = b.message(f"Count{plural}Request")
        b.field(m, "filter", _STRUCT)
        searchable = bool(model.searchable_fields)
        if searchable:
            m = b.message(f"Search{plural}Request")
            b.field(m, "q", (s, ""))
            b.field(m, "filter", _STRUCT)
            b.field(m, "page_size", (_T.TYPE_INT32, ""))
            b.field(m, "page_token", (s, ""))
            b.field(m, "fields", (s, ""), repeated=True)
            m = b.message(f"Search{plural}Response")
            b.field(m, coll, (_T.TYPE_MESSAGE, p + name), repeated=True)
            b.field(m, "scores", (_T.TYPE_DOUBLE, ""), repeated=True)
            b.field(m, "next_page_token", (s, ""))
        m = b.message(f"Upsert{name}Request")
        b.field(m, _snake(name), (_T.TYPE_MESSAGE, p + name))
        b.field(m, "conflict_on", (s, ""), repeated=True)
        b.field(m, "request_id", (s, ""))
        m = b.message(f"BulkCreate{plural}Request")
        b.field(m, coll, (_T.TYPE_MESSAGE, p + name), repeated=True)
        b.field(m, "request_id", (s, ""))
        m = b.message(f"BulkUpdate{plural}Request")
        b.field(m, "filter", _STRUCT)
        b.field(m, "values", (_T.TYPE_MESSAGE, p + name))
        b.field(m, "allow_all", (_T.TYPE_BOOL, ""))
        b.field(m, "request_id", (s, ""))
        m = b.message(f"BulkDelete{plural}Request")
        b.field(m, "filter", _STRUCT)
        b.field(m, "allow_all", (_T.TYPE_BOOL, ""))
        b.field(m, "request_id", (s, ""))
        m = b.message(f"BulkUpsert{plural}Request")
        b.field(m, coll, (_T.TYPE_MESSAGE, p + name), repeated=True)
        b.field(m, "conflict_on", (s, ""), repeated=True)
        b.field(m, "request_id", (s, ""))

        svc = b.fdp.service.add(name=f"{name}Service")
        base = f"/v1/{coll}"
        snake = _snake(name)
        rec_t = p + name
        b.method(svc, f"Create{name}", f"{p}Create{name}Request", rec_t, _rule("post", base, snake))
        b.method(svc, f"Get{name}", f"{p}Get{name}Request", rec_t, _rule("get", base + "/{id}"))
        b.method(
            svc,
            f"Update{name}",
            f"{p}Update{name}Request",
            rec_t,
            _rule("patch", base + "/{" + snake + "." + idf.name + "}", snake),
        )
        b.method(
            svc,
            f"Delete{name}",
            f"{p}Delete{name}Request",
            ".google.protobuf.Empty",
            _rule("delete", base + "/{id}"),
        )
        b.method(
            svc, f"List{plural}", f"{p}List{plural}Request", f"{p}List{plural}Response",
            _rule("get", base, extra=_rule("post", base + ":search", "*")),
        )  # fmt: skip
        b.method(
            svc, f"Count{plural}", f"{p}Count{plural}Request", f"{p}CountResult",
            _rule("get", base + ":count", extra=_rule("post", base + ":count", "*")),
        )  # fmt: skip
        b.method(
            svc, f"Upsert{name}", f"{p}Upsert{name}Request", rec_t,
            _rule("post", base + ":upsert", "*"),
        )  # fmt: skip
        if searchable:
            b.method(
                svc, f"Search{plural}", f"{p}Search{plural}Request",
                f"{p}Search{plural}Response",
                _rule("get", base + ":search", extra=_rule("post", base + ":fullTextSearch", "*")),
            )  # fmt: skip
        for verb in ("Create", "Update", "Delete", "Upsert"):
            b.method(
                svc,
                f"Bulk{verb}{plural}",
                f"{p}Bulk{verb}{plural}Request",
                f"{p}BulkWriteResult",
                _rule("post", f"{base}:bulk{verb}", "*"),
            )
    names = [m.name for m in models]
    describe_models_file(
        b.fdp, models, {n: _plural_camel(n) for n in names}, {n: collection_id(n) for n in names}
    )
    return b.fdp


def build_rest_file(
    models_file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    """The REST twins of the typed services of `models_file`: `<REST_PACKAGE>.<Model>Service`
    with every method of `<PACKAGE>.<Model>Service`, the same request and HTTP binding,
    and `google.api.HttpBody` as the reply of each method that answers records (Envoy's
    transcoder passes its JSON through as the response body)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name=REST_FILE_NAME, package=REST_PACKAGE, syntax="proto3"
    )
    fdp.dependency.extend(
        [
            FILE_NAME,
            annotations_pb2.DESCRIPTOR.name,
            httpbody_pb2.DESCRIPTOR.name,
            empty_pb2.DESCRIPTOR.name,
        ]
    )
    fdp.options.go_package = "nexus/models/v1/rest;restv1"
    for svc in models_file.service:
        twin = fdp.service.add()
        twin.CopyFrom(svc)
        for m in twin.method:
            if m.output_type not in _NO_RECORDS:
                m.output_type = _HTTP_BODY
    return fdp


def public_path(path: str) -> str:
    """The typed method a REST twin's method path stands for
    (`/nexus.models.v1.rest.ContactService/GetContact` ->
    `/nexus.models.v1.ContactService/GetContact`); any other path as it is."""
    if path.startswith(f"/{REST_PACKAGE}."):
        return f"/{PACKAGE}." + path.removeprefix(f"/{REST_PACKAGE}.")
    return path


class TypedModels:
    """The typed messages and services of a set of models, in a descriptor pool that also
    holds every file they depend on (and any `extra_files`, e.g. the static services, so
    one pool serves reflection for the whole server)."""

    def __init__(
        self,
        models: Sequence[ModelInfo],
        extra_files: Iterable[descriptor_pb2.FileDescriptorProto] = (),
    ) -> None:
        self.models = {m.name: m for m in models}
        self.file = build_models_file(models)
        self.pool = descriptor_pool.DescriptorPool()
        added: set[str] = set()
        for fdp in [*_dependency_files(), *extra_files]:
            if fdp.name not in added:
                self.pool.Add(fdp)
                added.add(fdp.name)
        self.pool.Add(self.file)
        self.file_descriptor = self.pool.FindFileByName(FILE_NAME)
        #: REST's twins of the typed services (in Envoy's descriptor set, not the pool)
        self.rest_file = build_rest_file(self.file)

    def service_name(self, model: str) -> str:
        return f"{PACKAGE}.{model}Service"

    def rest_service_name(self, model: str) -> str:
        return f"{REST_PACKAGE}.{model}Service"

    @property
    def service_names(self) -> list[str]:
        return [self.service_name(m) for m in self.models]

    @property
    def rest_service_names(self) -> list[str]:
        return [self.rest_service_name(m) for m in self.models]

    def message_class(self, name: str) -> type[message.Message]:
        """The generated class of a message of this file, by short name."""
        desc = self.pool.FindMessageTypeByName(f"{PACKAGE}.{name}")
        cls: type[message.Message] = message_factory.GetMessageClass(desc)
        return cls

    def file_set(self) -> descriptor_pb2.FileDescriptorSet:
        """The models file and everything it imports, dependencies first."""
        out = descriptor_pb2.FileDescriptorSet()
        seen: set[str] = set()

        def add(fd: Any) -> None:
            if fd.name in seen:
                return
            for dep in fd.dependencies:
                add(dep)
            seen.add(fd.name)
            fdp = descriptor_pb2.FileDescriptorProto()
            fd.CopyToProto(fdp)
            out.file.append(fdp)

        add(self.file_descriptor)
        # the pool keeps no source info: the models file's comments come from its source
        out.file[-1].source_code_info.CopyFrom(self.file.source_code_info)
        return out


def _dependency_files() -> list[descriptor_pb2.FileDescriptorProto]:
    out: list[descriptor_pb2.FileDescriptorProto] = []
    seen: set[str] = set()

    def add(fd: Any) -> None:
        if fd.name in seen:
            return
        for dep in fd.dependencies:
            add(dep)
        seen.add(fd.name)
        fdp = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(fdp)
        out.append(fdp)

    for mod in _DEPENDENCIES:
        add(mod.DESCRIPTOR)
    return out


# --- record <-> message conversion -------------------------------------------------------


def record_to_message(
    model: ModelInfo, record: Mapping[str, Any], cls: type[message.Message]
) -> message.Message:
    """A DataFlow record (dict of Python values) as the model's typed message."""
    msg = cls()
    for f in model.fields:
        if f.name not in record:
            continue
        value = record[f.name]
        if value is None:
            continue
        _set_field(msg, f, value)
    return msg


def json_body(doc: Any) -> httpbody_pb2.HttpBody:
    """`doc` as a REST body (JSON, compact, as Envoy prints)."""
    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return httpbody_pb2.HttpBody(content_type="application/json", data=data.encode())


def record_json(model: ModelInfo) -> Callable[[Mapping[str, Any], Sequence[str]], dict[str, Any]]:
    """A printer of `model`'s records (as DataFlow returns them) straight to the proto3
    JSON of the record as a typed message (`record_to_message`), as Envoy's transcoder
    would print it (field names as declared, int64 as text, an integral `Struct` number
    without `.0`), but with every field, a null one as `null` (docs/api.md, "One JSON
    document"), and without making the message. The printer's second argument is a
    `fields` projection (empty: every field)."""
    fields = [(f.name, _JSON_OF.get(f.base_type) or _json_of(f.base_type)) for f in model.fields]

    def print_record(record: Mapping[str, Any], only: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, conv in fields:
            if name in record:
                value = record[name]
                out[name] = None if value is None else conv(value)
            elif not only or name in only:
                out[name] = None
        return out

    return print_record


def double_json(value: Any) -> Any:
    """A double as proto3 JSON prints it (NaN and the infinities as text), integral ones
    without `.0`, as Envoy prints them."""
    x = float(value)
    if not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


def _timestamp_json(value: _dt.datetime) -> str:
    """A datetime as proto3 JSON prints a Timestamp: UTC, 0, 3 or 6 fraction digits."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.UTC)
    elif value.tzinfo is not _dt.UTC:
        value = value.astimezone(_dt.UTC)
    text = value.replace(tzinfo=None, microsecond=0).isoformat()
    us = value.microsecond
    if us == 0:
        return text + "Z"
    if us % 1000 == 0:
        return f"{text}.{us // 1000:03d}Z"
    return f"{text}.{us:06d}Z"


def _same(value: Any) -> Any:
    return value


def _any_json(value: Any) -> Any:
    return _ints(to_jsonable(value))


_JSON_OF: dict[Any, Callable[[Any], Any]] = {
    str: _same,
    bool: _same,
    int: str,  # int64: text
    float: double_json,
    bytes: lambda v: base64.b64encode(v).decode(),
    decimal.Decimal: str,
    uuid.UUID: str,
    _dt.date: str,  # ISO 8601 (also the text a typed message holds)
    _dt.datetime: _timestamp_json,
}


def _json_of(tp: Any) -> Callable[[Any], Any]:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return lambda v: str(v.value) if isinstance(v, enum.Enum) else str(v)
    return _any_json  # dict, list: a Struct or a ListValue


def rest_body(model: ModelInfo, reply: message.Message) -> httpbody_pb2.HttpBody:
    """The REST body of a write's reply (one record of `model`, as a typed message: the
    write's own, or the one an idempotent replay stored): the record's fields read back
    (`message_to_fields`) and printed as the reads print records (`record_json`)."""
    return json_body(record_json(model)(message_to_fields(model, reply), ()))


def _ints(value: Any) -> Any:
    """`value` with integral floats (a `Struct` number is a double) as ints, as Envoy
    prints them."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def _set_field(msg: Any, f: FieldInfo, value: Any) -> None:
    tp = f.base_type
    if tp is _dt.datetime:
        ts = getattr(msg, f.name)
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        ts.FromDatetime(value)
    # JSON values go through to_jsonable, as in every Struct the server returns: a NaN or
    # infinite number stored before such values were refused is the string "NaN",
    # "Infinity" or "-Infinity" (proto3 JSON, hence REST, cannot print them as numbers)
    # (set in its parent first: an empty dict or list is `{}` or `[]`, not a null)
    elif tp is dict:
        getattr(msg, f.name).SetInParent()
        getattr(msg, f.name).update(to_jsonable(value))
    elif tp is list:
        getattr(msg, f.name).SetInParent()
        getattr(msg, f.name).extend(to_jsonable(value))
    elif _proto_type(tp) == _ANY_VALUE:
        getattr(msg, f.name).CopyFrom(ParseDict(to_jsonable(value), struct_pb2.Value()))
    elif isinstance(value, enum.Enum):
        setattr(msg, f.name, str(value.value))
    elif tp in (decimal.Decimal, uuid.UUID, _dt.date):
        setattr(msg, f.name, value.isoformat() if tp is _dt.date else str(value))
    else:
        setattr(msg, f.name, value)


def message_to_fields(model: ModelInfo, msg: message.Message, where: str = "") -> dict[str, Any]:
    """The fields a request message sets, as Python values for DataFlow (which then
    validates them against the model: a decimal or a date in text is checked there).

    `where` is the request field holding the message (`contact`, `contacts[3]`): a value
    no Python type can hold (a Timestamp outside 0001-01-01..9999-12-31 or with nanos
    outside 0..999,999,999; NaN in a Struct) is RECORD_INVALID/REQUEST_INVALID naming
    `<where>.<field>`."""
    out: dict[str, Any] = {}
    by_name = model.field_map
    for fd, value in msg.ListFields():
        f = by_name.get(fd.name)
        if f is None:
            continue
        path = f"{where}.{f.name}" if where else f.name
        if f.base_type is _dt.datetime:
            out[f.name] = _timestamp(value, path)
        elif fd.message_type is None:
            out[f.name] = value
        # (the typed pool has its own Struct classes: compare by name, not by class)
        elif fd.message_type.full_name == "google.protobuf.Struct":
            out[f.name] = from_struct(value, path)
        elif fd.message_type.full_name == "google.protobuf.ListValue":
            out[f.name] = [from_value(v, f"{path}[{i}]") for i, v in enumerate(value.values)]
        else:
            out[f.name] = from_value(value, path)
    return out


def _timestamp(value: timestamp_pb2.Timestamp, path: str) -> _dt.datetime:
    """A Timestamp as an aware UTC datetime, or RECORD_INVALID naming `path`."""
    try:
        return value.ToDatetime(tzinfo=_dt.UTC)
    except (ValueError, OverflowError):
        raise ApiError(
            "RECORD_INVALID",
            f"{path}: not a valid timestamp (seconds {value.seconds}, nanos {value.nanos})",
            [
                (
                    path,
                    "a timestamp must lie in 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z "
                    "with nanos in 0..999999999",
                )
            ],
        ) from None
