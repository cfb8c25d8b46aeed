"""The one ordered table from a model field's Python type to its SQL column type.

The column types are SQLAlchemy `TypeDecorator`s where the two databases differ, so a
value reads back the same on SQLite and PostgreSQL: timestamps are timezone-aware UTC,
decimals are exact, enums come back as members, booleans as `bool`.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import functools
import json
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Double,
    Integer,
    LargeBinary,
    Numeric,
    Text,
    TypeDecorator,
    Uuid,
)
from sqlalchemy.types import TypeEngine

__all__ = [
    "SQL_TYPES",
    "ExactDecimal",
    "JSONValue",
    "StoredEnum",
    "UTCDateTime",
    "dialect_insert",
    "sql_type_for",
]


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timestamp stored in UTC and always read back timezone-aware (UTC).

    A naive datetime given by the caller is taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        value = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        # SQLite has no zone-aware type: store the UTC wall time
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class ExactDecimal(TypeDecorator[decimal.Decimal]):
    """An exact decimal: PostgreSQL ``NUMERIC``; on SQLite the decimal's text (SQLite's
    own NUMERIC would round it through a double)."""

    impl = Numeric(asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(Text())
        return dialect.type_descriptor(Numeric(asdecimal=True))

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        return str(value) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        if value is None or isinstance(value, decimal.Decimal):
            return value
        return decimal.Decimal(str(value))


class StoredEnum(TypeDecorator[enum.Enum]):
    """An Enum stored by value (text for str values, an integer for int values)."""

    impl = Text
    cache_ok = True

    def __init__(self, enum_class: type[enum.Enum]) -> None:
        super().__init__()
        self.enum_class = enum_class
        self.by_int = all(isinstance(m.value, int) for m in enum_class)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        return dialect.type_descriptor(BigInteger() if self.by_int else Text())

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        return value.value if isinstance(value, self.enum_class) else value

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else self.enum_class(value)


class JSONValue(TypeDecorator[Any]):
    """A JSON document: JSONB on PostgreSQL, JSON text on SQLite. None is SQL NULL."""

    impl = JSON(none_as_null=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            # imported here: SQLite-only programs need not load the PostgreSQL dialect
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB(none_as_null=True))
        return dialect.type_descriptor(JSON(none_as_null=True))


def _json() -> TypeEngine[Any]:
    return JSONValue()


def dialect_insert(dialect: str) -> Any:
    """The dialect's INSERT construct (with ``on_conflict_do_update``)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


@functools.cache
def _bigint() -> TypeEngine[Any]:
    # SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid alias). Made once:
    # with_variant copies the type, which cost 0.1 ms a column; type objects are
    # stateless and shared safely between columns.
    return BigInteger().with_variant(Integer(), "sqlite")


def _enum_ok(tp: Any) -> bool:
    if not (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return False
    values = [m.value for m in tp]
    return bool(values) and (
        all(isinstance(v, str) for v in values)
        or all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    )


#: Python type -> SQL column type, in the order they are tried. bool comes before int
#: and datetime before date because each is a subclass of the next.
SQL_TYPES: tuple[tuple[Callable[[Any], bool], Callable[[Any], TypeEngine[Any]], str], ...] = (
    (lambda t: t is bool, lambda t: Boolean(create_constraint=False), "BOOLEAN"),
    (lambda t: t is int, lambda t: _bigint(), "BIGINT"),
    (lambda t: t is float, lambda t: Double(), "DOUBLE PRECISION"),
    (lambda t: t is str, lambda t: Text(), "TEXT"),
    (lambda t: t is bytes, lambda t: LargeBinary(), "BYTEA / BLOB"),
    (lambda t: t is decimal.Decimal, lambda t: ExactDecimal(), "NUMERIC / TEXT"),
    (lambda t: t is dt.datetime, lambda t: UTCDateTime(), "TIMESTAMPTZ / DATETIME (UTC)"),
    (lambda t: t is dt.date, lambda t: Date(), "DATE"),
    (lambda t: t is uuid.UUID, lambda t: Uuid(), "UUID / CHAR(32)"),
    (_enum_ok, lambda t: StoredEnum(t), "TEXT or BIGINT (the member's value)"),
    (lambda t: t is dict, lambda t: _json(), "JSONB / JSON"),
    (lambda t: t is list, lambda t: _json(), "JSONB / JSON"),
)


def sql_type_for(py_type: Any) -> TypeEngine[Any] | None:
    """The column type for a (non-optional) Python type, or None if there is none."""
    for matches, make, _ in SQL_TYPES:
        if matches(py_type):
            return make(py_type)
    return None


def json_dumps(value: Any) -> str:
    """JSON text as stored in JSON columns (used by the COPY fast path)."""
    return json.dumps(value, separators=(",", ":"))
