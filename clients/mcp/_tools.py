"""MCP tool definitions built from the server's descriptors (pure functions, no I/O).

- `workflow_tool(workflow, models)`: `run_<name>`, its typed inputs as a JSON Schema,
  annotated from the node types of its definition (`workflow_hints`);
- `model_tools(model)`: `<collection>_create|get|list|count|update|upsert|delete`
  (and `<collection>_search` for a model with searchable fields), typed from the
  model's fields, annotated read-only or destructive.

Schemas are small and self-contained (no `$ref`), so common agent clients accept them.
An input schema says what the server accepts; an output schema accepts everything the
server returns for the type (null where the field is nullable, an int beyond +-2^53 as
its text, a float that is not finite as "NaN"/"Infinity"/"-Infinity"), so a client that
validates structured content never reports a successful call as an error.
Tool names are snake_case and at most 64 characters.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from .._grpc import to_json, type_spec

__all__ = [
    "MAX_NAME",
    "REQUEST_ID",
    "REQUEST_ID_SCHEMA",
    "Hints",
    "ToolSpec",
    "model_tools",
    "tool_name",
    "workflow_hints",
    "workflow_tool",
]

MAX_NAME = 64

#: The optional idempotency key of every writing tool (the gRPC `request_id`).
REQUEST_ID = "request_id"
REQUEST_ID_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": 128,
    "description": (
        "idempotency key (a UUID is a good choice): a retry with the same key and the "
        "same arguments returns the first result instead of writing again"
    ),
}


def tool_name(*parts: str) -> str:
    """A stable snake_case tool name of at most 64 characters.

    Anything but letters, digits and `_` becomes `_`; a name that is too long keeps its
    start and ends with a short hash of the whole, so it stays unique and stable.
    """
    raw = "_".join(parts)
    name = re.sub(r"[^a-z0-9_]+", "_", raw.lower()).strip("_") or "tool"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9]}_{digest}"


@dataclass(frozen=True)
class Hints:
    """What a tool does to the data, as MCP tool annotations say it.

    The default is the conservative answer for a tool nothing is known about: it may
    change or delete anything, and running it twice may do so twice.
    """

    read_only: bool = False
    destructive: bool = True
    idempotent: bool = False


_READ = Hints(read_only=True, destructive=False, idempotent=True)
_CREATE = Hints(read_only=False, destructive=False, idempotent=False)
_CHANGE = Hints(read_only=False, destructive=True, idempotent=True)


@dataclass(frozen=True)
class ToolSpec:
    """One tool: what the MCP client sees, and how the adapter calls gRPC for it."""

    name: str
    description: str
    input_schema: dict[str, Any]
    kind: str  # "workflow" or the model operation: create, get, list, ...
    target: str  # the workflow name or the model name
    output_schema: dict[str, Any] | None = None
    read_only: bool = False
    destructive: bool = True
    idempotent: bool = False
    steps: int = 0  # nodes of a workflow (the progress total)
    collection: str = ""
    #: whether the tool takes the optional `request_id` (passed to the gRPC request)
    request_id: bool = False


#: The paging arguments of the list and search tools.
_PAGING: dict[str, Any] = {
    "limit": {
        "type": "integer",
        "minimum": 1,
        "maximum": 1000,
        "default": 50,
        "description": "page size",
    },
    "page_token": {"type": "string", "description": "next_page_token of the previous page"},
}


#: What the server prints for an int: a number, or beyond +-2^53 (and in an int64
#: message field such as `count`) its decimal text (docs/api.md, "64-bit integers").
_INT_TEXT: dict[str, Any] = {"type": "string", "pattern": r"^-?[0-9]+$"}
#: A float a record holds that JSON has no number for.
_NON_FINITE: dict[str, Any] = {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}


def _lenient(schema: dict[str, Any]) -> dict[str, Any]:
    """An output schema accepting every value the server returns for `schema`'s type.

    An int beyond +-2^53 is printed as its text and a decimal as `str(Decimal)` (`1E+2`
    as well as `100`); a record that holds a float that is not finite is read back as
    `"NaN"`, `"Infinity"` or `"-Infinity"`. Alternatives are `anyOf` branches of one
    `type` each (the portable form, see `type_spec`).
    """
    if "anyOf" in schema:
        branches: list[dict[str, Any]] = []
        for branch in map(_lenient, schema["anyOf"]):
            branches += branch["anyOf"] if list(branch) == ["anyOf"] else [branch]
        if {"type": "string"} in branches:  # any text already: no narrower text branch
            branches = [b for b in branches if b not in (_INT_TEXT, _NON_FINITE)]
        return {**schema, "anyOf": branches}
    kind = schema.get("type")
    if kind == "integer":
        return {"anyOf": [schema, _INT_TEXT]}
    if kind == "number":
        return {"anyOf": [schema, _NON_FINITE]}
    if "pattern" in schema:  # decimal: any text str(Decimal) gives
        return {k: v for k, v in schema.items() if k != "pattern"}
    return dict(schema)


def _schema_of(
    type_name: str, *, nullable: bool = False, description: str = "", output: bool = False
) -> dict[str, Any]:
    schema = dict(type_spec(type_name, nullable=nullable).schema)
    if output:
        schema = _lenient(schema)
    if description:
        schema["description"] = description
    return schema


def _object(
    properties: dict[str, Any], required: list[str] | None = None, *, closed: bool = True
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    if closed:
        schema["additionalProperties"] = False
    return schema


#: DataFlow's generated node kinds (`<Model><Kind>`), by what they do to the data.
_NODE_HINTS: dict[str, Hints] = {
    "ReadNode": _READ,
    "ListNode": _READ,
    "CountNode": _READ,
    "SearchNode": _READ,
    "CreateNode": _CREATE,
    "BulkCreateNode": _CREATE,
    "UpdateNode": _CHANGE,
    "DeleteNode": _CHANGE,
    "UpsertNode": _CHANGE,
    "BulkUpdateNode": _CHANGE,
    "BulkDeleteNode": _CHANGE,
    "BulkUpsertNode": _CHANGE,
}


def _node_hints(type_name: str, models: Collection[str]) -> Hints:
    """What a node type does: a DataFlow node of a model the server lists is known by its
    kind; any other type (PythonCodeNode, a custom node, a node named like a DataFlow one
    for a model that does not exist) may do anything."""
    for kind, hints in _NODE_HINTS.items():
        if type_name.endswith(kind) and type_name[: -len(kind)] in models:
            return hints
    return Hints()


def workflow_hints(workflow: Any, models: Collection[str]) -> Hints:
    """The annotations of `run_<workflow>`, derived from the node types of its definition.

    - read-only when every node only reads (`<Model>ReadNode`, `ListNode`, `CountNode`,
      `SearchNode`);
    - destructive when any node updates, upserts or deletes, or is of a type whose
      effect is unknown (a workflow without a declarative definition is unknown too);
    - idempotent when read-only, or when every writing node updates, upserts or deletes
      with values that come from the call's inputs only: a create adds a record each
      time, and a node fed by another node (delete the first listed record) may act on
      another record each time.
    """
    definition = workflow.definition if workflow.HasField("definition") else None
    if definition is None or not definition.nodes:
        return Hints()
    fed = {c.target for c in definition.connections}
    kinds = [(n.id, _node_hints(n.type, models)) for n in definition.nodes]
    read_only = all(h.read_only for _, h in kinds)
    return Hints(
        read_only=read_only,
        destructive=any(h.destructive for _, h in kinds),
        idempotent=read_only
        or all(h.read_only or (h.destructive and h.idempotent and i not in fed) for i, h in kinds),
    )


def workflow_tool(workflow: Any, models: Collection[str] = ()) -> ToolSpec:
    """`run_<name>`: the workflow's typed inputs in, its outputs (node id → outputs) out.

    `models` are the model names the server lists, to know DataFlow nodes by their type.
    A workflow that may write takes the optional `request_id`, unless one of its inputs
    is itself called `request_id`.
    """
    properties: dict[str, Any] = {}
    required: list[str] = []
    for inp in workflow.inputs:
        schema = _schema_of(inp.type, description=inp.description)
        if inp.HasField("default"):
            schema["default"] = to_json(inp.default)
        if inp.required:
            required.append(inp.name)
        properties[inp.name] = schema
    hints = workflow_hints(workflow, models)
    takes_key = not hints.read_only and REQUEST_ID not in properties
    if takes_key:
        properties[REQUEST_ID] = REQUEST_ID_SCHEMA
    nodes: dict[str, dict[str, Any]] = {}
    for out in workflow.outputs:
        node = nodes.setdefault(out.node_id, {"type": "object", "properties": {}})
        node["properties"][out.name] = _schema_of(
            out.type, description=out.description, output=True
        )
    description = workflow.description or f"Run the {workflow.name} workflow."
    description += f" (Nexus workflow `{workflow.name}`; the result is each node's outputs.)"
    return ToolSpec(
        name=tool_name("run", workflow.name),
        description=description,
        input_schema=_object(properties, required),
        kind="workflow",
        target=workflow.name,
        output_schema=_object(nodes, closed=False),
        read_only=hints.read_only,
        destructive=hints.destructive,
        idempotent=hints.idempotent,
        steps=len(workflow.definition.nodes),
        request_id=takes_key,
    )


def _field_schema(fld: Any, *, output: bool = False, default: bool = True) -> dict[str, Any]:
    """A model field's schema. `output`: lenient, for the records the server returns;
    `default`: advertise the model's default (create only: anywhere else a client that
    fills defaults in would overwrite stored values)."""
    if fld.enum_values:
        # the values say it all (str or int values: a `type` would contradict one of them)
        values = [to_json(v) for v in fld.enum_values]
        schema: dict[str, Any] = {"enum": [*values, None] if fld.nullable else values}
        if fld.description:
            schema["description"] = fld.description
    else:
        schema = _schema_of(
            fld.type, nullable=fld.nullable, description=fld.description, output=output
        )
    if default and fld.HasField("default"):
        schema["default"] = to_json(fld.default)
    return schema


def model_tools(model: Any) -> list[ToolSpec]:
    """The tools of one model: create, get, list, count, (search,) update, upsert, delete.

    Create, update, upsert and delete take the optional `request_id` (the gRPC
    idempotency key), unless the model has a field of that name. Update and upsert
    schemas advertise no defaults: a client filling them in would overwrite the stored
    values of the fields it meant to leave alone.
    """
    coll = model.collection
    name = model.name
    writable = [f for f in model.fields if not f.managed]
    pk = next((f for f in model.fields if f.primary_key), None)
    pk_name = pk.name if pk is not None else "id"
    field_names = [f.name for f in model.fields]
    record_props = {f.name: _field_schema(f) for f in writable}
    plain_props = {f.name: _field_schema(f, default=False) for f in writable}
    required = [
        f.name
        for f in writable
        if not (f.nullable or f.HasField("default") or f.generated or f.primary_key)
    ]
    takes_key = REQUEST_ID not in field_names
    key = {REQUEST_ID: REQUEST_ID_SCHEMA} if takes_key else {}
    id_schema = {"type": "string", "description": f"the {name}'s {pk_name}"}
    fields_schema = {
        "type": "array",
        "items": {"type": "string", "enum": field_names},
        "description": "only these fields (default: all)",
    }
    filter_schema = {
        "type": "object",
        "description": (
            'MongoDB-style filter, e.g. {"score": {"$gt": 3}}; operators $eq $ne $gt $gte '
            "$lt $lte $in $nin $like $ilike $null, combined with $and $or $not"
        ),
    }
    record_out = _object(
        {f.name: _field_schema(f, output=True, default=False) for f in model.fields},
        closed=False,
    )
    about = f" ({model.description})" if model.description else ""

    def spec(op: str, text: str, schema: dict[str, Any], hints: Hints, **kw: Any) -> ToolSpec:
        return ToolSpec(
            name=tool_name(coll, op),
            description=text,
            input_schema=schema,
            kind=op,
            target=name,
            collection=coll,
            read_only=hints.read_only,
            destructive=hints.destructive,
            idempotent=hints.idempotent,
            **kw,
        )

    update_props = {k: v for k, v in plain_props.items() if k != pk_name}
    search: list[ToolSpec] = []
    if any(f.searchable for f in model.fields):
        search_fields = ", ".join(f.name for f in model.fields if f.searchable)
        search.append(
            spec(
                "search",
                f"Full-text search of {coll} ({search_fields}), most relevant first, with an "
                "optional filter; each record's relevance is in `scores` (same order).",
                _object(
                    {
                        "query": {
                            "type": "string",
                            "minLength": 1,
                            "description": (
                                'words (all must occur), "a phrase", -word to exclude, '
                                "prefix* for words starting so"
                            ),
                        },
                        "filter": filter_schema,
                        **_PAGING,
                        "fields": fields_schema,
                    },
                    ["query"],
                ),
                _READ,
                output_schema=_object(
                    {
                        "records": {"type": "array", "items": record_out},
                        "scores": {"type": "array", "items": _lenient({"type": "number"})},
                        "next_page_token": {"type": "string"},
                    },
                    closed=False,
                ),
            )
        )
    return [
        spec(
            "create",
            f"Create a {name} record{about}. Returns the created record.",
            _object({**record_props, **key}, required),
            _CREATE,
            output_schema=record_out,
            request_id=takes_key,
        ),
        spec(
            "get",
            f"Get one {name} by {pk_name}.",
            _object({"id": id_schema, "fields": fields_schema}, ["id"]),
            _READ,
            output_schema=record_out,
        ),
        spec(
            "list",
            f"List {coll}, filtered and ordered, one page at a time.",
            _object(
                {
                    "filter": filter_schema,
                    "order_by": {
                        "type": "string",
                        "description": "comma-separated fields, - for descending: -created_at",
                    },
                    **_PAGING,
                    "fields": fields_schema,
                }
            ),
            _READ,
            output_schema=_object(
                {
                    "records": {"type": "array", "items": record_out},
                    "next_page_token": {"type": "string"},
                },
                closed=False,
            ),
        ),
        spec(
            "count",
            f"Count {coll} matching a filter.",
            _object({"filter": filter_schema}),
            _READ,
            # CountRecordsResponse.count is an int64: proto3 JSON prints it as text
            output_schema=_object({"count": _INT_TEXT}, closed=False),
        ),
        *search,
        spec(
            "update",
            f"Update some fields of a {name} (only the fields given change).",
            _object({"id": id_schema, **update_props, **key}, ["id"]),
            _CHANGE,
            output_schema=record_out,
            request_id=takes_key,
        ),
        spec(
            "upsert",
            f"Create a {name}, or update the one with the same unique key (fields left "
            "out keep their stored values; a new record gets the model's defaults).",
            _object(
                {
                    **plain_props,
                    "conflict_on": {
                        "type": "array",
                        "items": {"type": "string", "enum": field_names},
                        "description": "unique fields to match on (default: the primary key)",
                    },
                    **key,
                },
                required,
            ),
            _CHANGE,
            output_schema=_object(
                {"record": record_out, "created": {"type": "boolean"}}, closed=False
            ),
            request_id=takes_key,
        ),
        spec(
            "delete",
            f"Delete a {name} by {pk_name}.",
            _object({"id": id_schema, **key}, ["id"]),
            _CHANGE,
            output_schema=_object({"deleted": {"type": "string"}}, closed=False),
            request_id=takes_key,
        ),
    ]
