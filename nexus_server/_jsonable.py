"""One conversion from Python values to JSON-compatible ones, used for every document the
server returns (Struct fields, stored execution results), so all channels print the same."""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import enum
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = ["to_jsonable"]

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
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return value.astimezone(_dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value)
    raise TypeError(f"value of type {type(value).__name__} cannot be returned as JSON")
