"""One conversion from Python values to JSON-compatible ones, used for every document the
server returns (Struct fields, stored execution results), so all channels print the same."""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import enum
import json
import uuid
from collections.abc import Mapping
from typing import Any

from dataflow import JSON_MAX_DEPTH

__all__ = ["stored_json", "to_jsonable"]

_EXACT = 2**53


#: The text of the floats JSON has no number for (proto3 JSON's own spelling).
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def to_jsonable(value: Any) -> Any:
    """`value` with datetimes as RFC 3339 text (UTC), dates as ISO dates, decimals and UUIDs
    as text (exact), ints beyond +-2^53 as text (exact), bytes as base64, enums as their
    value, tuples as lists, and NaN / infinite floats as the strings "NaN", "Infinity",
    "-Infinity" (a JSON number cannot be one: proto3 JSON refuses to print a Struct
    holding one, which would break every REST, CLI and MCP read of the record)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is float:
        return value if value - value == 0.0 else _NON_FINITE[repr(value)]
    if kind is int and -_EXACT <= value <= _EXACT:
        return value
    if kind is dict:
        return {k if type(k) is str else str(k): to_jsonable(v) for k, v in value.items()}
    if kind is list:
        return [to_jsonable(v) for v in value]
    if kind is _dt.datetime:  # before the Mapping check below (an ABC: slow)
        return _datetime(value)
    if isinstance(value, float):  # a subclass
        return to_jsonable(float(value))
    if isinstance(value, bool | str):  # subclasses
        return value
    if isinstance(value, int):
        # a JSON number is a double: an int it cannot hold exactly travels as text, as
        # proto3 JSON prints int64 (and as the server accepts it back)
        return value if abs(value) <= _EXACT else str(value)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, _dt.datetime):
        return _datetime(value)
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    raise TypeError(f"value of type {type(value).__name__} cannot be returned as JSON")


def _datetime(value: _dt.datetime) -> str:
    tz = value.tzinfo
    if tz is not _dt.UTC:  # a database's datetimes are in UTC already: no conversion
        value = value.replace(tzinfo=_dt.UTC) if tz is None else value.astimezone(_dt.UTC)
    return value.isoformat().replace("+00:00", "Z")


class _TooDeep(Exception):
    pass


def _walk(value: Any, depth: int) -> Any:
    """`to_jsonable(value)`, raising `_TooDeep` for a container nested deeper than
    `JSON_MAX_DEPTH` (`value` itself at `depth`)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int and -_EXACT <= value <= _EXACT:
        return value
    if kind is float and value - value == 0.0:  # finite
        return value
    if kind is dict:
        if depth > JSON_MAX_DEPTH:
            raise _TooDeep
        depth += 1
        doc = {}
        for k, v in value.items():
            if type(k) is not str:
                k = str(k)
            # a record's fields (text, numbers, null, UTC datetimes) without a call each
            kind = type(v)
            if kind is str or v is None or kind is bool or (kind is int and -_EXACT <= v <= _EXACT):
                doc[k] = v
            elif kind is _dt.datetime and v.tzinfo is _dt.UTC:
                doc[k] = v.isoformat().replace("+00:00", "Z")
            else:
                doc[k] = _walk(v, depth)
        return doc
    if kind is list:
        if depth > JSON_MAX_DEPTH:
            raise _TooDeep
        depth += 1
        return [_walk(v, depth) for v in value]
    if kind is _dt.datetime:
        return _datetime(value)
    done = to_jsonable(value)
    kind = type(done)
    # a container made by to_jsonable (a Mapping, a tuple, an Enum's value) is JSON
    # already: walked again for its depth only
    return _walk(done, depth) if kind is dict or kind is list else done


#: A NUL in any text or key of a document: how json.dumps writes it (a false positive,
#: the text `\u0000` itself, only sends the caller to the exact check).
_NUL = "\\u0000"


def stored_json(value: Mapping[str, Any]) -> tuple[dict[str, Any], str] | None:
    """`to_jsonable(value)` and its text as `json.dumps` writes it, in one walk, when the
    database may store the document as it is (DataFlow's value rule: no NUL in any text
    or key, nested at most `JSON_MAX_DEPTH` levels; its ints and floats are made
    storable by `to_jsonable`). None when it may not be, or may not be converted: the
    caller then takes the exact (slower) path, `to_jsonable` and `storable_reason`,
    which says why.

    Used for an execution's outputs: the text is what the record stores, so they are
    converted and encoded once, and checked without a second walk."""
    if type(value) is not dict:
        return None
    try:
        doc: dict[str, Any] = _walk(value, 1)
    except (_TooDeep, TypeError, RecursionError):
        return None
    text = json.dumps(doc)
    if _NUL in text:
        return None
    return doc, text
