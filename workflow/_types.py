"""The value types a node parameter, a node output or a workflow input can have.

One small table decides how a Python annotation is checked at run time and how two
ends of a connection are compared at build time. Later layers (protobuf, JSON Schema,
CLI flags) map the same types, so the set is closed: `check` raises on anything else.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import types
import typing
import uuid
from typing import Any

__all__ = [
    "ANY",
    "base_type",
    "check_value",
    "compatible",
    "is_nullable",
    "is_supported",
    "name_of_type",
    "type_from_name",
    "type_name",
]

#: The "anything" type: parameters and outputs whose shape the node does not declare.
ANY: Any = typing.Any

_SCALARS: tuple[type, ...] = (
    str,
    int,
    float,
    bool,
    bytes,
    dict,
    list,
    decimal.Decimal,
    _dt.datetime,
    _dt.date,
    uuid.UUID,
)


def is_nullable(tp: Any) -> bool:
    """Whether `tp` is `X | None` (or `Optional[X]`)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return type(None) in typing.get_args(tp)
    return False


def base_type(tp: Any) -> Any:
    """`X` for `X | None`, `list` for `list[int]`, the type itself otherwise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union type {tp!r}: only 'X | None' is allowed")
        return base_type(args[0])
    if origin in (list, dict):
        return origin
    return tp


def is_supported(tp: Any) -> bool:
    """Whether `tp` is one of the types this module can check."""
    try:
        b = base_type(tp)
    except TypeError:
        return False
    return b is ANY or b in _SCALARS or (isinstance(b, type) and issubclass(b, enum.Enum))


def type_name(tp: Any) -> str:
    """A short human name for a type: 'int', 'str | None', 'any'."""
    b = base_type(tp)
    name = "any" if b is ANY else getattr(b, "__name__", repr(b))
    return f"{name} | None" if is_nullable(tp) else name


def check_value(tp: Any, value: Any) -> Any:
    """Return `value` as type `tp`, or raise `TypeError` saying why it is not one.

    Only loss-free widenings are made: an int is accepted for a float or a Decimal, a
    str for a UUID or an Enum (by value). Everything else must already be of the type;
    in particular a bool is not an int and a numeric string is not a number.
    """
    if value is None:
        if is_nullable(tp) or base_type(tp) is ANY:
            return None
        raise TypeError(f"expected {type_name(tp)}, got null")
    b = base_type(tp)
    if b is ANY:
        return value
    if b is bool:
        if isinstance(value, bool):
            return value
    elif b is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif b is float:
        if isinstance(value, float):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise TypeError("integer is too large for a float") from None
    elif b is decimal.Decimal:
        if isinstance(value, decimal.Decimal):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return decimal.Decimal(value)
        if isinstance(value, str):
            try:
                return decimal.Decimal(value)
            except decimal.InvalidOperation:
                raise TypeError(f"expected a decimal, got {_describe(value)}") from None
    elif b is _dt.datetime:
        if isinstance(value, _dt.datetime):
            return value
        if isinstance(value, str):
            try:
                return _dt.datetime.fromisoformat(value)
            except ValueError:
                raise TypeError(f"expected an ISO 8601 datetime, got {_describe(value)}") from None
    elif b is _dt.date:
        if isinstance(value, _dt.date) and not isinstance(value, _dt.datetime):
            return value
        if isinstance(value, str):
            try:
                return _dt.date.fromisoformat(value)
            except ValueError:
                raise TypeError(f"expected an ISO 8601 date, got {_describe(value)}") from None
    elif b is uuid.UUID:
        if isinstance(value, uuid.UUID):
            return value
        if isinstance(value, str):
            try:
                return uuid.UUID(value)
            except ValueError:
                raise TypeError(f"expected a UUID, got {_describe(value)}") from None
    elif isinstance(b, type) and issubclass(b, enum.Enum):
        if isinstance(value, b):
            return value
        try:
            return b(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in b)
            raise TypeError(f"expected one of {allowed}, got {_describe(value)}") from None
    elif isinstance(value, b):
        return value
    raise TypeError(f"expected {type_name(tp)}, got {_describe(value)}")


def _describe(value: Any) -> str:
    """The type and a cut-down repr of a caller's value, for messages (never unbounded)."""
    try:
        text = repr(value[:41] if isinstance(value, str | bytes) else value)
    except ValueError:  # an int too long to print
        text = "(too long to show)"
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def compatible(source: Any, target: Any) -> bool:
    """Whether a value of type `source` may feed a parameter of type `target`."""
    s, t = base_type(source), base_type(target)
    if s is ANY or t is ANY:
        return True
    if s is t:
        return True
    return (t is float and s is int) or (t is decimal.Decimal and s is int)


#: Names used in serialised workflow definitions, and the types they stand for.
TYPES_BY_NAME: dict[str, Any] = {
    "any": ANY,
    "str": str,
    "int": int,
    "float": float,
    "bool": bool,
    "bytes": bytes,
    "dict": dict,
    "list": list,
    "decimal": decimal.Decimal,
    "datetime": _dt.datetime,
    "date": _dt.date,
    "uuid": uuid.UUID,
}
_NAMES_BY_TYPE = {v: k for k, v in TYPES_BY_NAME.items()}


def type_from_name(name: str) -> Any:
    """The type a definition names: 'int', 'str', 'int | None', ... (`TypeError` if unknown)."""
    text = name.strip()
    nullable = text.endswith("| None")
    if nullable:
        text = text[: -len("| None")].strip()
    try:
        tp = TYPES_BY_NAME[text]
    except KeyError:
        known = ", ".join(TYPES_BY_NAME)
        raise TypeError(f"unknown type name {name!r} (known: {known})") from None
    return tp | None if nullable and tp is not ANY else tp


def name_of_type(tp: Any) -> str:
    """The definition name of a type (the inverse of `type_from_name`)."""
    b = base_type(tp)
    try:
        name = _NAMES_BY_TYPE[b]
    except (KeyError, TypeError):
        raise TypeError(f"type {tp!r} has no name usable in a definition") from None
    return f"{name} | None" if is_nullable(tp) else name
