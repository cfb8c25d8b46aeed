"""The OpenAPI 3.1 document of the REST API, made from the same descriptors Envoy reads.

Paths come from the `google.api.http` annotations (with `additional_bindings`), schemas
from the messages (the typed per-model messages included), following the proto3 JSON
mapping the transcoder uses: field names as declared, int64 as a string, enums by name,
well-known types by their JSON form (Struct is an object, Timestamp an RFC 3339 string,
FieldMask a comma-separated string, ...). Every error response is the JSON
`google.rpc.Status` (`#/components/schemas/Status`).

`OpenApiServicer` serves the document over gRPC as a `google.api.HttpBody`, which Envoy
passes through as the raw body of `GET /openapi.json`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from google.api import annotations_pb2, httpbody_pb2
from google.protobuf import descriptor_pb2

from nexus_api.nexus.openapi.v1 import openapi_service_pb2, openapi_service_pb2_grpc

from ._probes import HEALTH_SCHEMA, PROBE_SERVICE, READINESS_SCHEMA
from ._typed import PACKAGE as MODELS_PACKAGE

__all__ = ["OpenApiServicer", "openapi_document", "openapi_json"]

_F = descriptor_pb2.FieldDescriptorProto
_VERBS = ("get", "put", "post", "delete", "patch")

_SCALARS: dict[int, dict[str, Any]] = {
    _F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _F.TYPE_FLOAT: {"type": "number", "format": "float"},
    _F.TYPE_INT64: {"type": "string", "format": "int64", "pattern": r"^-?[0-9]+$"},
    _F.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": r"^[0-9]+$"},
    _F.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": r"^-?[0-9]+$"},
    _F.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": r"^[0-9]+$"},
    _F.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": r"^-?[0-9]+$"},
    _F.TYPE_INT32: {"type": "integer", "format": "int32"},
    _F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    _F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    _F.TYPE_UINT32: {"type": "integer", "format": "int64", "minimum": 0},
    _F.TYPE_FIXED32: {"type": "integer", "format": "int64", "minimum": 0},
    _F.TYPE_BOOL: {"type": "boolean"},
    _F.TYPE_STRING: {"type": "string"},
    _F.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}

#: Well-known types by their proto3 JSON form (None: no constraint, any JSON value).
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "seconds with up to 9 fractional digits, ending in `s` (`1.5s`)",
    },
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "comma-separated field paths (`name,email`)",
    },
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
    "google.protobuf.DoubleValue": {"type": ["number", "null"]},
    "google.protobuf.FloatValue": {"type": ["number", "null"]},
    "google.protobuf.Int64Value": {"type": ["string", "null"], "format": "int64"},
    "google.protobuf.UInt64Value": {"type": ["string", "null"], "format": "uint64"},
    "google.protobuf.Int32Value": {"type": ["integer", "null"], "format": "int32"},
    "google.protobuf.UInt32Value": {"type": ["integer", "null"], "minimum": 0},
    "google.protobuf.BoolValue": {"type": ["boolean", "null"]},
    "google.protobuf.StringValue": {"type": ["string", "null"]},
    "google.protobuf.BytesValue": {"type": ["string", "null"], "contentEncoding": "base64"},
}

#: The RPC behind `GET /health`, whose 503 carries the health document.
_HEALTH_RPC = f"{PROBE_SERVICE}.GetHealth"
#: The RPC behind `GET /readyz`, whose 503 carries the readiness document.
_READINESS_RPC = f"{PROBE_SERVICE}.GetReadiness"

_ERROR_CODES = {
    "400": "The request is invalid (INVALID_ARGUMENT, FAILED_PRECONDITION).",
    "404": "Not found (an unknown route, workflow, execution, model or record).",
    "409": "Conflict (ALREADY_EXISTS, ABORTED).",
    "500": "Internal error.",
    "503": "Unavailable.",
}


class _Index:
    """Every message, enum and service of a descriptor set, by full name, with the
    comments of the files that carry source info."""

    def __init__(self, files: Sequence[descriptor_pb2.FileDescriptorProto]) -> None:
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
        self.comments: dict[str, str] = {}
        for f in files:
            self._file(f)

    def _file(self, f: descriptor_pb2.FileDescriptorProto) -> None:
        locs = {tuple(loc.path): loc.leading_comments for loc in f.source_code_info.location}
        pkg = f.package

        def doc(name: str, path: tuple[int, ...]) -> None:
            text = locs.get(path, "").strip()
            if text:
                self.comments[name] = re.sub(r"\s*\n\s*", " ", text)

        def message(prefix: str, m: descriptor_pb2.DescriptorProto, path: tuple[int, ...]) -> None:
            name = f"{prefix}.{m.name}" if prefix else m.name
            self.messages[name] = m
            doc(name, path)
            for i, fld in enumerate(m.field):
                doc(f"{name}.{fld.name}", (*path, 2, i))
            for i, nested in enumerate(m.nested_type):
                message(name, nested, (*path, 3, i))
            for i, e in enumerate(m.enum_type):
                self.enums[f"{name}.{e.name}"] = e
                doc(f"{name}.{e.name}", (*path, 4, i))

        for i, m in enumerate(f.message_type):
            message(pkg, m, (4, i))
        for i, e in enumerate(f.enum_type):
            self.enums[f"{pkg}.{e.name}"] = e
            doc(f"{pkg}.{e.name}", (5, i))
        for i, s in enumerate(f.service):
            self.services[f"{pkg}.{s.name}"] = s
            doc(f"{pkg}.{s.name}", (6, i))
            for j, meth in enumerate(s.method):
                doc(f"{pkg}.{s.name}.{meth.name}", (6, i, 2, j))


class _Builder:
    def __init__(self, index: _Index) -> None:
        self.index = index
        self.schemas: dict[str, dict[str, Any]] = {}

    def ref(self, full_name: str) -> dict[str, Any]:
        """A schema for a message or enum type, adding its component once."""
        if full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[full_name])
        if full_name not in self.schemas:
            self.schemas[full_name] = {}  # placeholder: recursion stops here
            if full_name in self.index.enums:
                self.schemas[full_name] = self._enum(full_name)
            else:
                self.schemas[full_name] = self._message(full_name)
        return {"$ref": f"#/components/schemas/{full_name}"}

    def _enum(self, name: str) -> dict[str, Any]:
        e = self.index.enums[name]
        schema: dict[str, Any] = {"type": "string", "enum": [v.name for v in e.value]}
        if name in self.index.comments:
            schema["description"] = self.index.comments[name]
        return schema

    def is_map(self, fld: descriptor_pb2.FieldDescriptorProto) -> bool:
        if fld.type != _F.TYPE_MESSAGE or fld.label != _F.LABEL_REPEATED:
            return False
        entry = self.index.messages.get(fld.type_name.lstrip("."))
        return bool(entry and entry.options.map_entry)

    def field(self, owner: str, fld: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if self.is_map(fld):
            entry = self.index.messages[fld.type_name.lstrip(".")]
            schema: dict[str, Any] = {
                "type": "object",
                "additionalProperties": self._single(entry.field[1]),
            }
        elif fld.label == _F.LABEL_REPEATED:
            schema = {"type": "array", "items": self._single(fld)}
        else:
            schema = self._single(fld)
            # a record prints every field, a null one as `null`
            if self._is_record(owner) and isinstance(schema.get("type"), str):
                schema["type"] = [schema["type"], "null"]
        text = self.index.comments.get(f"{owner}.{fld.name}")
        if text:
            # OpenAPI 3.1 (JSON Schema 2020-12) allows keywords beside `$ref`
            schema["description"] = text
        return schema

    def _is_record(self, owner: str) -> bool:
        """Whether message `owner` is a typed record: a message of the models package
        whose every field has presence."""
        if not owner.startswith(f"{MODELS_PACKAGE}."):
            return False
        return all(
            f.proto3_optional or (f.type == _F.TYPE_MESSAGE and f.label != _F.LABEL_REPEATED)
            for f in self.index.messages[owner].field
        )

    def _single(self, fld: descriptor_pb2.FieldDescriptorProto) -> dict[str, Any]:
        if fld.type in (_F.TYPE_MESSAGE, _F.TYPE_ENUM):
            return self.ref(fld.type_name.lstrip("."))
        return dict(_SCALARS[fld.type])

    def _message(self, name: str) -> dict[str, Any]:
        m = self.index.messages[name]
        props = {fld.name: self.field(name, fld) for fld in m.field}
        schema: dict[str, Any] = {"type": "object", "properties": props}
        if name in self.index.comments:
            schema["description"] = self.index.comments[name]
        return schema


def _fields_by_path(
    b: _Builder, message: str, prefix: str = "", depth: int = 0
) -> Iterable[tuple[str, descriptor_pb2.FieldDescriptorProto, str]]:
    """Query-parameter candidates: scalar/enum leaves reachable through non-repeated
    message fields (as the transcoder binds `a.b=1`)."""
    m = b.index.messages.get(message)
    if m is None or depth > 3:
        return
    for fld in m.field:
        path = f"{prefix}{fld.name}"
        if fld.type == _F.TYPE_MESSAGE:
            type_name = fld.type_name.lstrip(".")
            if fld.label != _F.LABEL_REPEATED and type_name in (
                "google.protobuf.FieldMask",
                "google.protobuf.Timestamp",
                "google.protobuf.Duration",
            ):
                yield path, fld, message
            elif fld.label != _F.LABEL_REPEATED and type_name not in _WELL_KNOWN:
                yield from _fields_by_path(b, type_name, path + ".", depth + 1)
        else:
            yield path, fld, message


def _path_params(template: str) -> tuple[str, list[str]]:
    """OpenAPI path and its parameter names for an http rule template.

    `/v1/models/{model}/records/{id}` stays as it is; `{name=workflows/*}` becomes
    `{name}`; the custom verb `:execute` stays literal."""
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1).split("=", 1)[0]
        names.append(name)
        # OpenAPI tools read `{a.b}` as an attribute lookup: name the parameter `a_b`
        return "{" + name.replace(".", "_") + "}"

    return re.sub(r"\{([^}]+)\}", sub, template), names


def _operation(
    b: _Builder,
    service: str,
    method: descriptor_pb2.MethodDescriptorProto,
    verb: str,
    template: str,
    body: str,
    response_body: str,
    binding: int,
) -> tuple[str, dict[str, Any]]:
    path, params = _path_params(template)
    req_name = method.input_type.lstrip(".")
    resp_name = method.output_type.lstrip(".")
    short = service.rsplit(".", 1)[1]
    op_id = f"{short}_{method.name}" + (f"_{binding}" if binding else "")
    op: dict[str, Any] = {"operationId": op_id, "tags": [short]}
    text = b.index.comments.get(f"{service}.{method.name}")
    op["summary"] = _summary(text) if text else f"{short}.{method.name}"
    op["description"] = text or f"The RPC `{service}.{method.name}`."
    parameters: list[dict[str, Any]] = []
    for name in params:
        top = name.split(".", 1)[0]
        fld = next(f for f in b.index.messages[req_name].field if f.name == top)
        schema = b.field(req_name, fld) if "." not in name else {"type": "string"}
        param: dict[str, Any] = {
            "name": name.replace(".", "_"),
            "in": "path",
            "required": True,
            "schema": schema,
        }
        if "." in name:
            param["description"] = f"the request field `{name}`"
        parameters.append(param)
    if body != "*":
        bound = {p.split(".", 1)[0] for p in params} | ({body} if body else set())
        for qpath, fld, owner in _fields_by_path(b, req_name):
            if qpath.split(".", 1)[0] in bound:
                continue
            schema = b.field(owner, fld)
            parameters.append({"name": qpath, "in": "query", "required": False, "schema": schema})
    if parameters:
        op["parameters"] = parameters
    if body:
        if body == "*":
            bound = set(params)
            if bound:
                # path parameters are not part of the body
                req = b.index.messages[req_name]
                props = {f.name: b.field(req_name, f) for f in req.field if f.name not in bound}
                schema = {"type": "object", "properties": props}
                if req_name in b.index.comments:
                    schema["description"] = b.index.comments[req_name]
            else:
                schema = b.ref(req_name)
        else:
            fld = next(f for f in b.index.messages[req_name].field if f.name == body)
            schema = b.field(req_name, fld)
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    ok: dict[str, Any]
    unhealthy: dict[str, Any] | None = None
    if f"{service}.{method.name}" == _HEALTH_RPC:
        # the health document, also the body of its 503 (not a google.rpc.Status)
        content = {"application/json": {"schema": HEALTH_SCHEMA}}
        ok = {"description": "Healthy.", "content": content}
        unhealthy = {"description": "Unhealthy: the same document.", "content": content}
    elif f"{service}.{method.name}" == _READINESS_RPC:
        content = {"application/json": {"schema": READINESS_SCHEMA}}
        ok = {"description": "Ready.", "content": content}
        unhealthy = {"description": "Not ready: the same document.", "content": content}
    elif resp_name == "google.api.HttpBody":
        ok = {"description": "The document.", "content": {"application/json": {"schema": {}}}}
    else:
        if response_body:
            fld = next(f for f in b.index.messages[resp_name].field if f.name == response_body)
            resp_schema = b.field(resp_name, fld)
        else:
            resp_schema = b.ref(resp_name)
        if method.server_streaming:
            ok = {
                "description": "Server-Sent Events: one `data:` line per message (JSON).",
                "content": {"text/event-stream": {"schema": resp_schema}},
            }
        else:
            ok = {"description": "OK", "content": {"application/json": {"schema": resp_schema}}}
    responses: dict[str, Any] = {"200": ok}
    for code, desc in _ERROR_CODES.items():
        responses[code] = {"$ref": f"#/components/responses/Error{code}"}
        del desc
    if unhealthy is not None:
        responses["503"] = unhealthy
    responses["default"] = {"$ref": "#/components/responses/Error"}
    op["responses"] = responses
    return path, {verb: op}


def _summary(text: str) -> str:
    """An operation's summary: the first sentence of its comment."""
    return re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")


def _canonical(path: str, op: dict[str, Any], shapes: dict[str, str]) -> str:
    """One path per shape: OpenAPI forbids `/a/{id}` beside `/a/{contact_id}`, so an
    operation whose template only differs in parameter names joins the first path,
    its path parameters renamed in order."""
    shape = re.sub(r"\{[^}]+\}", "{}", path)
    first = shapes.setdefault(shape, path)
    if first == path:
        return path
    names = re.findall(r"\{([^}]+)\}", first)
    (operation,) = op.values()
    in_path = [p for p in operation.get("parameters", []) if p["in"] == "path"]
    for param, name in zip(in_path, names, strict=True):
        param["name"] = name
    return first


def openapi_document(
    files: Sequence[descriptor_pb2.FileDescriptorProto] | bytes,
    services: Sequence[str],
    *,
    title: str = "Nexus",
    version: str = "v1",
    secured: bool = False,
    public_discovery: bool = False,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for `services` of a descriptor set (its bytes, or files).

    `secured` (the server authenticates calls) declares the security schemes (an API key
    in `X-API-Key`, a bearer API key or JWT) and requires one of them on every operation
    but the probes (and `GET /openapi.json` with `public_discovery`); without it the
    document says that no operation needs a credential (`security: []`)."""
    if isinstance(files, bytes):
        files = list(descriptor_pb2.FileDescriptorSet.FromString(files).file)
    index = _Index(files)
    b = _Builder(index)
    status_ref = b.ref("google.rpc.Status")
    _typed_details(b)
    paths: dict[str, dict[str, Any]] = {}
    shapes: dict[str, str] = {}
    tags = []
    for service in services:
        svc = index.services[service]
        short = service.rsplit(".", 1)[1]
        about = index.comments.get(service, f"The gRPC service `{service}`.")
        tags.append({"name": short, "description": about})
        for method in svc.method:
            rule = method.options.Extensions[annotations_pb2.http]
            rules = [rule, *rule.additional_bindings]
            for i, r in enumerate(rules):
                for verb in _VERBS:
                    template = getattr(r, verb)
                    if template:
                        path, op = _operation(
                            b, service, method, verb, template, r.body, r.response_body, i
                        )
                        path = _canonical(path, op, shapes)
                        paths.setdefault(path, {}).update(op)
    error_content = {"application/json": {"schema": status_ref}}
    responses: dict[str, Any] = {
        f"Error{code}": {"description": desc, "content": error_content}
        for code, desc in _ERROR_CODES.items()
    }
    responses["Error"] = {
        "description": "An error: a JSON google.rpc.Status with ErrorInfo (and BadRequest "
        "for bad fields) in `details`.",
        "content": error_content,
    }
    if secured:
        for probe in ("/health", "/readyz", "/livez"):
            for op in paths.get(probe, {}).values():
                op["security"] = []  # the probes stay open
        if public_discovery:
            for op in paths.get("/openapi.json", {}).values():
                op["security"] = []
    components: dict[str, Any] = {
        "schemas": dict(sorted(b.schemas.items())),
        "responses": responses,
    }
    if secured:
        components["securitySchemes"] = _SECURITY_SCHEMES
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "REST through Envoy's gRPC-JSON transcoder: proto3 JSON, field "
            "names as declared (lowerCamelCase accepted on input), int64 as strings.",
            # the license of the Nexus contracts the document is made from
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        # relative: the Envoy that served this document (GET /openapi.json)
        "servers": [{"url": "/", "description": "The Envoy that serves this document."}],
        # with authentication off, no operation needs a credential
        "security": [{"apiKey": []}, {"bearer": []}] if secured else [],
        "tags": tags,
        "paths": dict(sorted(paths.items())),
        "components": components,
    }
    return doc


#: The error details the server sends in `google.rpc.Status.details` (`_errors.py`).
ERROR_DETAILS = ("google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.RetryInfo")


def _typed_details(b: _Builder) -> None:
    """`Status.details` as what it holds: a `oneOf` the error details, told apart by
    their `@type` (proto3 JSON prints a `google.protobuf.Any` as the message's fields
    plus `@type`), instead of a generic `{"@type"}` object."""
    mapping: dict[str, str] = {}
    for name in ERROR_DETAILS:
        if name not in b.index.messages:
            continue
        ref = b.ref(name)["$ref"]
        url = f"type.googleapis.com/{name}"
        schema = b.schemas[name]
        schema["properties"] = {
            "@type": {"type": "string", "const": url, "description": "the detail's type"},
            **schema["properties"],
        }
        schema["required"] = ["@type"]
        mapping[url] = ref
    status = b.schemas["google.rpc.Status"]
    details = status["properties"]["details"]
    details["items"] = {
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "@type", "mapping": mapping},
    }
    details["description"] = (
        "The error details: an ErrorInfo (`reason`, `domain` nexus, `metadata`) on every "
        "error, a BadRequest (`field_violations`) for bad fields, a RetryInfo "
        "(`retry_delay`) when a retry later may succeed."
    )


#: How a caller proves who it is (docs/security.md).
_SECURITY_SCHEMES = {
    "apiKey": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key (`nexus keys create`, or NEXUS_API_KEY_<NAME>).",
    },
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "A JWT from the configured issuer, or an API key.",
    },
}


def openapi_json(
    files: Sequence[descriptor_pb2.FileDescriptorProto] | bytes,
    services: Sequence[str],
    *,
    secured: bool = False,
    public_discovery: bool = False,
) -> bytes:
    """The document as UTF-8 JSON."""
    doc = openapi_document(files, services, secured=secured, public_discovery=public_discovery)
    return json.dumps(doc, indent=2, sort_keys=False).encode() + b"\n"


class OpenApiServicer(openapi_service_pb2_grpc.OpenApiServiceServicer):
    """`GetOpenApi`: the document as a `google.api.HttpBody` (`application/json`)."""

    def __init__(self, document: Callable[[], bytes]) -> None:
        self._document = document
        self._body: httpbody_pb2.HttpBody | None = None
        self._building = asyncio.Lock()

    async def GetOpenApi(
        self,
        request: openapi_service_pb2.GetOpenApiRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> httpbody_pb2.HttpBody:
        async with self._building:
            if self._body is None:
                # built on the first request, in a thread: neither startup nor the calls
                # served meanwhile wait for it
                data = await asyncio.to_thread(self._document)
                self._body = httpbody_pb2.HttpBody(content_type="application/json", data=data)
        return self._body
