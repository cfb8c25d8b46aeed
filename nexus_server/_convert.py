"""Conversions between our Python objects and the contract's messages."""

from __future__ import annotations

import base64
import datetime as _dt
import math
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.json_format import ParseDict
from google.rpc import status_pb2

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from workflow import MISSING, Workflow

from ._errors import ApiError
from ._jsonable import to_jsonable
from ._store import ExecutionRecord

__all__ = [
    "decode_page_token",
    "encode_page_token",
    "execution_message",
    "from_struct",
    "page_size",
    "to_struct",
    "to_value",
    "workflow_inputs",
    "workflow_message",
]

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50


def _plain(value: struct_pb2.Value, path: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        x = value.number_value
        if not math.isfinite(x):
            # proto3 JSON has no NaN or infinite numbers (MessageToDict refuses them)
            raise ApiError(
                "REQUEST_INVALID",
                f"{path or 'value'}: {x} is not a JSON number",
                [(path, "NaN and infinite numbers are not allowed")],
            )
        # JSON (and so Struct) has one number type; whole numbers become ints so that
        # an int parameter accepts 3 sent as 3.0. Non-integral floats stay floats.
        return int(x) if x.is_integer() and abs(x) < 2**53 else x
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        fields = value.struct_value.fields
        return {k: _plain(fields[k], f"{path}.{k}" if path else k) for k in sorted(fields)}
    if kind == "list_value":
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(value.list_value.values)]
    return None  # null_value (or an unset Value)


def from_struct(struct: struct_pb2.Struct, where: str = "") -> dict[str, Any]:
    """A Struct as a dict, whole numbers as ints. `where` is the request field it came
    from, named by the error when a value is not JSON (NaN, infinity)."""
    # a Struct's map has no order (upb even iterates it in a different order in each
    # process): sorted keys make everything downstream deterministic, violations included
    fields = struct.fields
    return {k: _plain(fields[k], f"{where}.{k}" if where else k) for k in sorted(fields)}


#: The text of an integer, as an int beyond +-2^53 travels in JSON (docs/api.md, "64-bit
#: integers"); longer than any 64-bit integer is left as text, for the input's check to refuse.
_INT_TEXT = re.compile(r"-?[0-9]{1,20}")


def workflow_inputs(wf: Workflow, inputs: struct_pb2.Struct) -> dict[str, Any]:
    """A request's `inputs` as the workflow takes them: `from_struct`, and the text of an
    integer given to an `int` input as that int (a `Struct` number is a double, so an
    int beyond +-2^53 is sent as its digits; the record fields of a model accept the
    same)."""
    doc = from_struct(inputs, "inputs")
    for name, value in doc.items():
        declared = wf.inputs.get(name)
        if (
            declared is not None
            and isinstance(value, str)
            and declared.type_name.removesuffix("| None").strip() == "int"
            and _INT_TEXT.fullmatch(value)
        ):
            doc[name] = int(value)
    return doc


def from_value(value: struct_pb2.Value, where: str = "") -> Any:
    return _plain(value, where)


def to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    fill_struct(s, to_jsonable(value))
    return s


def fill_struct(target: struct_pb2.Struct, doc: Mapping[str, Any]) -> None:
    """Add a JSON document's fields (as `to_jsonable` makes them: str keys; str, bool,
    int, float, None, dict and list values) to `target`. What `Struct.update` does,
    without its type checks: every Execution carries two Structs."""
    fields = target.fields
    for key, value in doc.items():
        # the scalars of a record's fields set here, without a call each
        kind = type(value)
        if kind is str:
            fields[key].string_value = value
        elif kind is int or kind is float:
            fields[key].number_value = value
        elif value is None:
            fields[key].null_value = _NULL
        else:
            _set_value(fields[key], value)


_NULL = struct_pb2.NULL_VALUE


def _set_value(target: struct_pb2.Value, value: Any) -> None:
    kind = type(value)
    if kind is str:
        target.string_value = value
    elif kind is bool:
        target.bool_value = value
    elif kind is int or kind is float:
        target.number_value = value
    elif value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif kind is dict:
        if value:
            fill_struct(target.struct_value, value)
        else:
            target.struct_value.SetInParent()  # an empty dict is still a struct
    elif kind is list:
        if value:
            values = target.list_value.values
            for item in value:
                _set_value(values.add(), item)
        else:
            target.list_value.SetInParent()
    # subclasses (an IntEnum or StrEnum member, a str subclass), which to_jsonable keeps
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, int | float):
        target.number_value = value
    else:
        raise TypeError(f"{kind.__name__} is not a JSON value (to_jsonable it first)")


def to_value(value: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    ParseDict(to_jsonable(value), v)
    return v


_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)


def _set_time(
    target: timestamp_pb2.Timestamp | duration_pb2.Duration, delta: _dt.timedelta
) -> None:
    """Set a Timestamp (from `time - epoch`) or a Duration, exactly, without the
    well-known types' slower conversion helpers (every Execution carries four)."""
    target.seconds = delta.days * 86_400 + delta.seconds
    target.nanos = delta.microseconds * 1000


def workflow_message(
    name: str, wf: Workflow, *, builtin: bool, update_time: _dt.datetime, owner: str = ""
) -> wpb.Workflow:
    """A registered workflow as the contract's `Workflow` resource."""
    msg = wpb.Workflow(
        name=name, description=wf.description, atomic=wf.atomic, builtin=builtin, owner=owner
    )
    msg.update_time.FromDatetime(update_time)
    for inp in wf.inputs.values():
        item = msg.inputs.add(
            name=inp.name, type=inp.type_name, required=inp.required, description=inp.description
        )
        if inp.default is not MISSING:
            item.default.CopyFrom(to_value(inp.default))
        for node_id, param in inp.targets:
            item.targets.add(node_id=node_id, param=param)
    for out in wf.outputs:
        msg.outputs.add(
            node_id=out.node, name=out.name, type=out.type_name, description=out.description
        )
    try:
        definition = wf.to_definition()
    except TypeError:
        return msg  # defined in code with Python callables: no declarative form
    d = msg.definition
    d.description = definition["description"]
    d.atomic = definition["atomic"]
    for n in definition["nodes"]:
        d.nodes.add(id=n["id"], type=n["type"]).params.CopyFrom(to_struct(n["params"]))
    for c in definition["connections"]:
        d.connections.add(**c)
    for i in definition["inputs"]:
        entry = d.inputs.add(
            name=i["name"], type=i["type"], required=i["required"], description=i["description"]
        )
        if "default" in i:
            entry.default.CopyFrom(to_value(i["default"]))
    return msg


def definition_dict(d: wpb.WorkflowDefinition) -> dict[str, Any]:
    """A `WorkflowDefinition` as the plain dict `WorkflowBuilder.from_definition` takes."""
    inputs = []
    for n, i in enumerate(d.inputs):
        item: dict[str, Any] = {
            "name": i.name,
            "type": i.type or "any",
            "description": i.description,
        }
        if i.HasField("required"):
            item["required"] = i.required
        if i.HasField("default"):
            item["default"] = from_value(i.default, f"definition.inputs[{n}].default")
        inputs.append(item)
    return {
        "description": d.description,
        "atomic": d.atomic,
        "nodes": [
            {
                "id": n.id,
                "type": n.type,
                "params": from_struct(n.params, f"definition.nodes[{i}].params"),
            }
            for i, n in enumerate(d.nodes)
        ],
        "connections": [
            {"source": c.source, "output": c.output, "target": c.target, "input": c.input}
            for c in d.connections
        ],
        "inputs": inputs,
    }


def status_message(error: Mapping[str, Any]) -> status_pb2.Status:
    doc = {k: v for k, v in error.items() if k != "reason"}
    status = status_pb2.Status()
    ParseDict(doc, status, ignore_unknown_fields=True)
    return status


def execution_message(rec: ExecutionRecord) -> wpb.Execution:
    """An execution record as the contract's `Execution` resource."""
    msg = wpb.Execution(
        id=rec.id,
        workflow=rec.workflow,
        state=_STATES[rec.state],
        request_id=rec.request_id or "",
        owner=rec.caller,
    )
    # a record's inputs and outputs are JSON documents already (to_jsonable on the way in)
    if rec.inputs:
        fill_struct(msg.inputs, rec.inputs)
    if rec.outputs is not None:
        fill_struct(msg.outputs, rec.outputs)
    if rec.error is not None:
        msg.error.CopyFrom(status_message(rec.error))
    _set_time(msg.create_time, rec.create_time - _EPOCH)
    if rec.start_time is not None:
        _set_time(msg.start_time, rec.start_time - _EPOCH)
        if rec.end_time is not None:
            _set_time(msg.duration, rec.end_time - rec.start_time)
    if rec.end_time is not None:
        _set_time(msg.end_time, rec.end_time - _EPOCH)
    return msg


#: Execution.State by the record's state name.
_STATES: dict[str, Any] = {
    name.removeprefix("STATE_"): value for name, value in wpb.Execution.State.items()
}


def page_size(value: int) -> int:
    if value < 0:
        raise ApiError(
            "REQUEST_INVALID", "page_size must not be negative", [("page_size", "negative")]
        )
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


# marks the tokens this module issues, so that arbitrary base64 is not taken for one
_TOKEN_PREFIX = "nexus-after:"


def encode_page_token(last: str) -> str:
    raw = (_TOKEN_PREFIX + last).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> str:
    if not token:
        return ""
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if not text.startswith(_TOKEN_PREFIX):
            raise ValueError(token)
        return text.removeprefix(_TOKEN_PREFIX)
    except Exception:
        raise ApiError(
            "PAGE_TOKEN_INVALID",
            "page_token is not one this server returned",
            [("page_token", "not a token returned by this list call")],
        ) from None
