"""Ordering and opaque keyset page tokens.

A page token records the sort key of the last record returned (plus ``id``, which makes
every key unique), so the next page starts strictly after it. Records inserted or
deleted meanwhile never shift a page, unlike an offset. Tokens are signed (`_tokens`)
and bound to the model, the order and the filter (`token_context`).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import enum
import hashlib
import json
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, false, or_

from workflow._types import check_value

from ._errors import ValidationError
from ._filters import FilterCompiler
from ._model import FieldInfo
from ._values import INT_MAX, INT_MIN

__all__ = [
    "OrderKey",
    "decode_token",
    "encode_token",
    "filter_digest",
    "keyset_after",
    "parse_order",
    "token_context",
]

OrderKey = tuple[FieldInfo, bool]  # (field, descending)


def parse_order(fc: FilterCompiler, order_by: Any) -> list[OrderKey]:
    """``"name"``, ``"-score"`` or a list of them -> sort keys, ``id`` appended last."""
    if order_by is None:
        items: Sequence[Any] = []
    elif isinstance(order_by, str):
        items = [order_by]
    elif isinstance(order_by, list | tuple):
        items = order_by
    else:
        raise ValidationError("order_by", "expects a field name or a list of field names")
    keys: list[OrderKey] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise ValidationError(
                f"order_by[{i}]", "expects a field name such as 'name' or '-name'"
            )
        desc = item.startswith("-")
        name = item[1:] if desc or item.startswith("+") else item
        f = fc.field(name, f"order_by[{i}]")
        if f.base_type in (dict, list):
            raise ValidationError(f"order_by[{i}]", f"cannot sort by JSON field {name!r}")
        if name in seen:
            raise ValidationError(f"order_by[{i}]", f"field {name!r} is listed twice")
        seen.add(name)
        keys.append((f, desc))
    if "id" not in seen:
        keys.append((fc.fields["id"], False))
    return keys


def order_clauses(fc: FilterCompiler, keys: list[OrderKey]) -> list[Any]:
    """ORDER BY terms: NULLs first ascending, last descending, the same on both databases."""
    out = []
    for f, desc in keys:
        col, _ = fc.column(f)
        out.append(col.desc().nulls_last() if desc else col.asc().nulls_first())
    return out


def _signature(keys: list[OrderKey]) -> list[str]:
    return [("-" if d else "") + f.name for f, d in keys]


def _enc(v: Any) -> Any:
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        # a value stored before NaN/Infinity were refused still pages
        return v if math.isfinite(v) else {"f": repr(v)}
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, bytes):
        return {"b": base64.b64encode(v).decode()}
    if isinstance(v, dt.datetime | dt.date | decimal.Decimal | uuid.UUID):
        return str(v) if not isinstance(v, dt.date) else v.isoformat()
    raise TypeError(f"cannot put {type(v).__name__} in a page token")


def token_context(model: str, keys: list[OrderKey], digest: str) -> str:
    """What a page token is bound to: the model, the order and the filter's digest."""
    return f"list\n{model}\n{','.join(_signature(keys))}\n{digest}"


def _canon(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, bytes):
        return {"b": base64.b64encode(v).decode()}
    return f"{type(v).__name__}:{v}"


#: A filter's canonical JSON form (made once: json.dumps with options builds an encoder
#: per call, a third of a digest's time)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_canon)


def filter_digest(flt: Mapping[str, Any] | None) -> str:
    """A digest of a (checked) filter's canonical JSON form: equal filters, equal
    digests, whatever their key order."""
    text = _CANONICAL.encode(flt or {})
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def encode_token(keys: list[OrderKey], record: dict[str, Any]) -> bytes:
    """The payload of the token that resumes after `record` (signed by the caller)."""
    values = [_enc(record[f.name]) for f, _ in keys]
    return json.dumps(values, separators=(",", ":")).encode()


_BAD = "is not a token returned by this listing"


def decode_token(keys: list[OrderKey], payload: bytes) -> list[Any]:
    """The last record's sort key from a verified token payload, checked against the
    field types (the payload is ours: its MAC was checked first)."""
    try:
        values = json.loads(payload)
    except (ValueError, RecursionError):
        raise ValidationError("page_token", _BAD) from None
    if not isinstance(values, list) or len(values) != len(keys):
        raise ValidationError("page_token", _BAD)
    out: list[Any] = []
    for (f, _), v in zip(keys, values, strict=True):
        try:
            if isinstance(v, dict) and f.base_type is bytes:
                out.append(base64.b64decode(v["b"]))
            elif isinstance(v, dict) and f.base_type is float:
                out.append(float(v["f"]))
            else:
                v = None if v is None else check_value(f.base_type, v)
                if type(v) is int and not INT_MIN <= v <= INT_MAX:
                    raise ValueError
                out.append(v)
        except (TypeError, KeyError, ValueError, binascii.Error):
            raise ValidationError("page_token", _BAD) from None
    return out


def keyset_after(
    fc: FilterCompiler,
    keys: list[OrderKey],
    last: list[Any],
    bind: Callable[[int, FieldInfo], Any] | None = None,
) -> ColumnElement[bool]:
    """Records strictly after `last` in the order of `keys`. With `bind`, the operand
    compared with sort key j is ``bind(j, field)`` (a bound parameter, to compile SQL
    once per shape; `last` then only tells which values are None)."""
    clause: ColumnElement[bool] = false()
    # built from the last key outwards: after = gt(k0) or (eq(k0) and after(k1..))
    for j, ((f, desc), v) in reversed(list(enumerate(zip(keys, last, strict=True)))):
        col, conv = fc.column(f)
        raw = fc.table.c[f.name]
        if v is None:
            gt = raw.is_not(None) if not desc else false()
            eq = raw.is_(None)
        else:
            cv = conv(v) if bind is None else bind(j, f)
            gt = col > cv if not desc else or_(col < cv, raw.is_(None))
            eq = col == cv
        clause = or_(gt, and_(eq, clause))
    (f, desc), v = keys[0], last[0]
    if v is not None and not desc:
        # implied by the clause, but a plain range on the first key lets the database
        # start the scan of its index there (an OR hides it)
        col, conv = fc.column(f)
        clause = and_(col >= (conv(v) if bind is None else bind(0, f)), clause)
    return clause
