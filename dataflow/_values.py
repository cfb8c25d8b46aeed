"""The one rule every value meets before DataFlow builds SQL with it.

Records, filters, page tokens, ids and `DataFlow.executemany` rows all pass through
`clean` (or `clean_any` when the field type is not known), so a value either database
would refuse, or store differently from the other, is a `ValidationError` naming the
field on both databases, never a driver error:

- text (anywhere, JSON documents included) may not contain NUL (``"\\x00"``):
  PostgreSQL cannot store it;
- integers are within the signed 64-bit range;
- floats are finite (no NaN, no infinities);
- decimals are finite, with at most `DECIMAL_INTEGER_DIGITS` digits before the point
  and `DECIMAL_FRACTION_DIGITS` after it (PostgreSQL's NUMERIC allows 131,072 and
  16,383; SQLite stores the text);
- datetimes convert to UTC without leaving year 1..9999 (they are returned in UTC);
- JSON documents hold only JSON values (str keys), nested at most `JSON_MAX_DEPTH`
  levels, and their contents meet the rules above.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
from collections.abc import Mapping
from typing import Any

from workflow._types import check_value

__all__ = [
    "DECIMAL_FRACTION_DIGITS",
    "DECIMAL_INTEGER_DIGITS",
    "INT_MAX",
    "INT_MIN",
    "JSON_MAX_DEPTH",
    "NUL_REASON",
    "clean",
    "clean_any",
    "short",
    "storable_reason",
]

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
#: Digits a Decimal may have before its point.
DECIMAL_INTEGER_DIGITS = 1000
#: Digits a Decimal may have after its point.
DECIMAL_FRACTION_DIGITS = 1000
#: Nesting levels of a JSON document (dict/list field or a JSON value inside one).
JSON_MAX_DEPTH = 64

NUL_REASON = "text may not contain NUL (\\x00) characters"
_INT_REASON = "integer is out of the 64-bit range"
_FLOAT_REASON = "NaN and infinities are not stored (use null)"


def short(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to about `limit` characters: what an error message may echo of
    a caller's input (an unbounded echo can overflow the gRPC metadata limit)."""
    try:
        text = repr(value[: limit + 1] if isinstance(value, str | bytes) else value)
    except ValueError:  # an int too long to print
        text = "(too long to show)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decimal(v: decimal.Decimal) -> decimal.Decimal:
    if not v.is_finite():
        raise TypeError("NaN and infinities are not stored (use null)")
    _, digits, exp = v.as_tuple()
    assert isinstance(exp, int)  # finite
    before = len(digits) + exp
    if before > DECIMAL_INTEGER_DIGITS or -exp > DECIMAL_FRACTION_DIGITS:
        raise TypeError(
            f"a decimal may have at most {DECIMAL_INTEGER_DIGITS} digits before the point "
            f"and {DECIMAL_FRACTION_DIGITS} after it"
        )
    return v


def _datetime(v: dt.datetime) -> dt.datetime:
    if v.tzinfo is None:
        return v.replace(tzinfo=dt.UTC)  # naive means UTC
    try:
        return v.astimezone(dt.UTC)
    except OverflowError:
        raise TypeError("is out of range once converted to UTC (years 1 to 9999)") from None


def _json(doc: Any) -> Any:
    """Check a JSON document without recursion (its depth is what is being checked).
    Mappings and lists or tuples of any class are accepted, as `json.dumps` takes them."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if "\x00" in v:
                raise TypeError(f"{NUL_REASON} (in a JSON document)")
        elif isinstance(v, Mapping | list | tuple):
            if depth > JSON_MAX_DEPTH:
                raise TypeError(f"a JSON document may be nested at most {JSON_MAX_DEPTH} levels")
            if isinstance(v, Mapping):
                for k, item in v.items():
                    if not isinstance(k, str):
                        raise TypeError(f"JSON object keys must be text, got {short(k)}")
                    if "\x00" in k:
                        raise TypeError(f"{NUL_REASON} (in a JSON key)")
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in v)
        elif isinstance(v, bool) or v is None:
            pass
        elif isinstance(v, int):
            if not INT_MIN <= v <= INT_MAX:
                raise TypeError(f"{_INT_REASON} (in a JSON document)")
        elif isinstance(v, float):
            if not math.isfinite(v):
                raise TypeError(f"{_FLOAT_REASON} (in a JSON document)")
        else:
            raise TypeError(f"a JSON document cannot hold {type(v).__name__} values")
    return doc


def clean_any(value: Any) -> Any:
    """`value` checked by its own type (see the module docstring); raises `TypeError`
    with the reason. Datetimes come back in UTC."""
    kind = type(value)
    if kind is str:
        if "\x00" in value:
            raise TypeError(NUL_REASON)
    elif kind is int:
        if not INT_MIN <= value <= INT_MAX:
            raise TypeError(_INT_REASON)
    elif kind is float:
        if not math.isfinite(value):
            raise TypeError(_FLOAT_REASON)
    elif isinstance(value, dt.datetime):
        return _datetime(value)
    elif isinstance(value, decimal.Decimal):
        return _decimal(value)
    elif isinstance(value, dict | list):
        return _json(value)
    elif isinstance(value, str) and "\x00" in value:  # a str subclass (str Enum member)
        raise TypeError(NUL_REASON)
    return value


def storable_reason(value: Any) -> str | None:
    """Why DataFlow's value rule refuses `value` (checked by its own type), or None when
    it may be stored: for documents DataFlow does not type itself, such as the server's
    execution records."""
    try:
        clean_any(value)
    except TypeError as exc:
        return str(exc)
    return None


def clean(base_type: Any, value: Any) -> Any:
    """`value` as `base_type` (`workflow.check_value`'s loss-free widenings), then
    checked by `clean_any`; raises `TypeError` with the reason."""
    return clean_any(check_value(base_type, value))
