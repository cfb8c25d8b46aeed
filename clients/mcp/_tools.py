"""MCP tool definitions built from the server's descriptors (pure functions, no I/O).

- `workflow_tool(workflow)`: `run_<name>`, its typed inputs as a JSON Schema;
- `model_tools(model)`: `<collection>_create|get|list|count|update|upsert|delete`,
  typed from the model's fields, annotated read-only or destructive.

Schemas are small and self-contained (no `$ref`), so common agent clients accept them.
Tool names are snake_case and at most 64 characters.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from .._grpc import to_json, type_spec

__all__ = ["MAX_NAME", "ToolSpec", "model_tools", "tool_name", "workflow_tool"]

MAX_NAME = 64


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
class ToolSpec:
    """One tool: what the MCP client sees, and how the adapter calls gRPC for it."""

    name: str
    description: str
    input_schema: dict[str, Any]
    kind: str  # "workflow" or the model operation: create, get, list, ...
    target: str  # the workflow name or the model name
    output_schema: dict[str, Any] | None = None
    read_only: bool = False
    destructive: bool = False
    idempotent: bool = False
    steps: int = 0  # nodes of a workflow (the progress total)
    collection: str = ""


def _schema_of(type_name: str, *, nullable: bool = False, description: str = "") -> dict[str, Any]:
    schema = dict(type_spec(type_name, nullable=nullable).schema)
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


def workflow_tool(workflow: Any) -> ToolSpec:
    """`run_<name>`: the workflow's typed inputs in, its outputs (node id → outputs) out."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for inp in workflow.inputs:
        schema = _schema_of(inp.type, description=inp.description)
        if inp.HasField("default"):
            schema["default"] = to_json(inp.default)
        if inp.required:
            required.append(inp.name)
        properties[inp.name] = schema
    nodes: dict[str, dict[str, Any]] = {}
    for out in workflow.outputs:
        node = nodes.setdefault(out.node_id, {"type": "object", "properties": {}})
        node["properties"][out.name] = _schema_of(out.type, description=out.description)
    description = workflow.description or f"Run the {workflow.name} workflow."
    description += f" (Nexus workflow `{workflow.name}`; the result is each node's outputs.)"
    return ToolSpec(
        name=tool_name("run", workflow.name),
        description=description,
        input_schema=_object(properties, required),
        kind="workflow",
        target=workflow.name,
        output_schema=_object(nodes, closed=False),
        steps=len(workflow.definition.nodes),
    )


def _field_schema(fld: Any) -> dict[str, Any]:
    schema = _schema_of(fld.type, nullable=fld.nullable, description=fld.description)
    if fld.enum_values:
        schema["enum"] = [to_json(v) for v in fld.enum_values]
    if fld.HasField("default"):
        schema["default"] = to_json(fld.default)
    return schema


def model_tools(model: Any) -> list[ToolSpec]:
    """The tools of one model: create, get, list, count, update, upsert, delete."""
    coll = model.collection
    name = model.name
    writable = [f for f in model.fields if not f.managed]
    pk = next((f for f in model.fields if f.primary_key), None)
    pk_name = pk.name if pk is not None else "id"
    field_names = [f.name for f in model.fields]
    record_props = {f.name: _field_schema(f) for f in writable}
    required = [
        f.name
        for f in writable
        if not (f.nullable or f.HasField("default") or f.generated or f.primary_key)
    ]
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
    record_out = _object({f.name: _field_schema(f) for f in model.fields}, closed=False)
    about = f" ({model.description})" if model.description else ""

    def spec(op: str, text: str, schema: dict[str, Any], **kw: Any) -> ToolSpec:
        return ToolSpec(
            name=tool_name(coll, op),
            description=text,
            input_schema=schema,
            kind=op,
            target=name,
            collection=coll,
            **kw,
        )

    update_props = {k: v for k, v in record_props.items() if k != pk_name}
    return [
        spec(
            "create",
            f"Create a {name} record{about}. Returns the created record.",
            _object(record_props, required),
            output_schema=record_out,
        ),
        spec(
            "get",
            f"Get one {name} by {pk_name}.",
            _object({"id": id_schema, "fields": fields_schema}, ["id"]),
            output_schema=record_out,
            read_only=True,
            idempotent=True,
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
                    "limit": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 1000,
                        "default": 50,
                        "description": "page size",
                    },
                    "page_token": {
                        "type": "string",
                        "description": "next_page_token of the previous page",
                    },
                    "fields": fields_schema,
                }
            ),
            output_schema=_object(
                {"records": {"type": "array"}, "next_page_token": {"type": "string"}},
                closed=False,
            ),
            read_only=True,
            idempotent=True,
        ),
        spec(
            "count",
            f"Count {coll} matching a filter.",
            _object({"filter": filter_schema}),
            output_schema=_object({"count": {"type": "integer"}}, closed=False),
            read_only=True,
            idempotent=True,
        ),
        spec(
            "update",
            f"Update some fields of a {name} (only the fields given change).",
            _object({"id": id_schema, **update_props}, ["id"]),
            output_schema=record_out,
            destructive=True,
            idempotent=True,
        ),
        spec(
            "upsert",
            f"Create a {name}, or update the one with the same unique key.",
            _object(
                {
                    **record_props,
                    "conflict_on": {
                        "type": "array",
                        "items": {"type": "string", "enum": field_names},
                        "description": "unique fields to match on (default: the primary key)",
                    },
                },
                required,
            ),
            destructive=True,
            idempotent=True,
        ),
        spec(
            "delete",
            f"Delete a {name} by {pk_name}.",
            _object({"id": id_schema}, ["id"]),
            destructive=True,
            idempotent=True,
        ),
    ]
