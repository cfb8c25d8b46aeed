"""The fast path: single-record statements sent straight to the driver.

A single Create, Read, Update or Delete outside a shared transaction is one statement
that needs none of SQLAlchemy's machinery at run time. This module prepares its SQL once
per model (identifiers quoted by the dialect, values always bound) and converts values
to and from the driver's formats, exactly as the SQLAlchemy column types do, so records
written either way read the same either way. Inside a transaction, and for every other
operation, DataFlow goes through SQLAlchemy.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Dialect, Table

from ._model import FieldInfo, ModelInfo

__all__ = ["Codec", "driver_value"]

Conv = Callable[[Any], Any] | None


def _sqlite_dt_in(v: dt.datetime) -> str:
    # SQLAlchemy's SQLite DATETIME storage format, "YYYY-MM-DD HH:MM:SS.ffffff", in UTC
    # (a naive datetime is taken as UTC)
    if v.tzinfo is None or v.tzinfo is dt.UTC:
        return v.isoformat(" ", "microseconds")[:26]
    # "+00:00" cut off (isoformat always writes four-digit years: the offset is at 26)
    return v.astimezone(dt.UTC).isoformat(" ", "microseconds")[:26]


def _sqlite_dt_out(v: str) -> dt.datetime:
    return dt.datetime.fromisoformat(v).replace(tzinfo=dt.UTC)


def _pg_dt_in(v: dt.datetime) -> dt.datetime:
    return v.replace(tzinfo=dt.UTC) if v.tzinfo is None else v.astimezone(dt.UTC)


def _pg_dt_out(v: dt.datetime) -> dt.datetime:
    # asyncpg already returns UTC; astimezone only for an unusual session time zone
    return v if v.tzinfo is dt.UTC else v.astimezone(dt.UTC)


_ENCODER = json.JSONEncoder()
# json.dumps with its defaults builds a C encoder on every call; this one is built once.
# Without a circular-reference check: a circular document is retried with the standard
# encoder, which reports it as json.dumps does.
_c_encode: Callable[[Any, int], list[str]] | None = (
    json.encoder.c_make_encoder(  # type: ignore[attr-defined]
        None,
        _ENCODER.default,
        json.encoder.encode_basestring_ascii,
        None,
        _ENCODER.key_separator,
        _ENCODER.item_separator,
        False,
        False,
        True,
    )
    if json.encoder.c_make_encoder is not None  # type: ignore[attr-defined]
    else None
)


def _json_in(value: Any) -> str:
    """`value` as json.dumps writes it with its defaults."""
    if _c_encode is None:
        return _ENCODER.encode(value)
    try:
        return "".join(_c_encode(value, 0))
    except RecursionError:
        return _ENCODER.encode(value)


def _json_out(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str | bytes) else v


def driver_value(value: Any, sqlite: bool) -> Any:
    """`value` in the driver's format where a column type converts it (datetimes, JSON
    documents); anything else unchanged."""
    kind = type(value)
    if kind is str or value is None:  # the common case first
        return value
    if kind is dict or kind is list:
        return _json_in(value)
    if isinstance(value, dt.datetime):
        return _sqlite_dt_in(value) if sqlite else _pg_dt_in(value)
    if isinstance(value, dict | list):
        return _json_in(value)
    return value


def _null_safe(fn: Conv) -> Conv:
    if fn is None:
        return None
    f = fn

    def conv(v: Any) -> Any:
        return None if v is None else f(v)

    return conv


def _bind(f: FieldInfo, sqlite: bool) -> Conv:
    bt = f.base_type
    if bt is dt.datetime:
        return _sqlite_dt_in if sqlite else _pg_dt_in
    if bt in (dict, list):
        return _json_in
    if isinstance(bt, type) and issubclass(bt, enum.Enum):
        return lambda v: v.value
    if sqlite:
        if bt is decimal.Decimal:
            return str
        if bt is uuid.UUID:
            return lambda v: v.hex
        if bt is dt.date:
            return lambda v: v.isoformat()
    return None


def _result(f: FieldInfo, sqlite: bool) -> Conv:
    bt = f.base_type
    if bt is dt.datetime:
        return _sqlite_dt_out if sqlite else _pg_dt_out
    if bt in (dict, list):
        return _json_out
    if isinstance(bt, type) and issubclass(bt, enum.Enum):
        return bt
    if sqlite:
        if bt is decimal.Decimal:
            return lambda v: decimal.Decimal(str(v))
        if bt is uuid.UUID:
            return lambda v: uuid.UUID(hex=v)
        if bt is dt.date:
            return dt.date.fromisoformat
        if bt is bool:
            return bool
    elif bt is decimal.Decimal:
        return lambda v: v if isinstance(v, decimal.Decimal) else decimal.Decimal(str(v))
    return None


class Codec:
    """SQL text and value conversions of one model for the fast path."""

    def __init__(self, model: ModelInfo, table: Table, dialect: Dialect) -> None:
        self.sqlite = dialect.name == "sqlite"
        q = dialect.identifier_preparer.quote
        self._q = q
        self.table = q(table.name)
        self.names = [f.name for f in model.fields]
        self.all_cols = ", ".join(q(n) for n in self.names)
        fields = model.field_map
        self.binds: dict[str, Conv] = {
            n: _null_safe(_bind(fields[n], self.sqlite)) for n in self.names
        }
        convs = [(n, _null_safe(_result(fields[n], self.sqlite))) for n in self.names]
        self._plain = all(c is None for _, c in convs)
        self._convs = convs
        # a tenant-scoped model: every statement by id also matches the tenant, bound
        # after the other arguments
        tf = model.tenant_field
        self._tenant = f" AND {q(tf)} = " if tf is not None else ""
        self.read_sql = (
            f"SELECT {self.all_cols} FROM {self.table} WHERE {q('id')} = {self.p(1)}"
            + self._and_tenant(2)
        )
        self.delete_sql = (
            f"DELETE FROM {self.table} WHERE {q('id')} = {self.p(1)}" + self._and_tenant(2)
        )
        # SQLite, a tenant-scoped model with int ids: no rowid alias generates them
        # (the primary key is (tenant, id)), so an insert without an id takes the
        # largest id plus one, as SQLite's rowid does (and PostgreSQL's sequence, which
        # DataFlow moves past explicit ids)
        self.gen_id = (
            f"(SELECT coalesce(max({q('id')}), 0) + 1 FROM {self.table})"
            if tf is not None and self.sqlite and fields["id"].base_type is int
            else None
        )
        self._insert: dict[tuple[str, ...], str] = {}
        self._update: dict[tuple[str, ...], str] = {}

    def p(self, i: int) -> str:
        """The i-th (1-based) placeholder."""
        return "?" if self.sqlite else f"${i}"

    def _and_tenant(self, i: int) -> str:
        """`` AND tenant = <i-th placeholder>`` for a tenant-scoped model, else ""."""
        return f"{self._tenant}{self.p(i)}" if self._tenant else ""

    def _insert_head(self, names: tuple[str, ...]) -> str:
        cols = ", ".join(self._q(n) for n in names)
        ps = ", ".join(self.p(i + 1) for i in range(len(names)))
        if self.gen_id is not None and "id" not in names:
            cols = f"{self._q('id')}, {cols}"
            ps = f"{self.gen_id}, {ps}"
        return f"INSERT INTO {self.table} ({cols}) VALUES ({ps})"

    def args(self, values: Mapping[str, Any], names: Sequence[str]) -> list[Any]:
        binds = self.binds
        out = []
        for n in names:
            v = values[n]
            b = binds[n]
            out.append(v if b is None else b(v))
        return out

    def insert_sql(self, names: tuple[str, ...]) -> str:
        sql = self._insert.get(names)
        if sql is None:
            sql = f"{self._insert_head(names)} RETURNING {self.all_cols}"
            self._insert[names] = sql
        return sql

    def insert_many_sql(self, names: tuple[str, ...]) -> str:
        """INSERT without RETURNING, for executemany."""
        return self._insert_head(names)

    def many_args(self, rows: Sequence[Mapping[str, Any]], names: tuple[str, ...]) -> list[Any]:
        """Driver arguments for many new records. All rows of one bulk write share their
        timestamps, so those are converted once."""
        if not rows:
            return []
        first = rows[0]
        shared = {"created_at", "updated_at"}
        const: dict[str, Any] = {}
        for n in shared.intersection(names):
            b = self.binds[n]
            const[n] = first[n] if b is None else b(first[n])
        convs = [(n, self.binds[n]) for n in names]
        if not const and all(c is None for _, c in convs):
            return [[r[n] for n in names] for r in rows]
        out = []
        for r in rows:
            out.append(
                [
                    const[n] if n in const else (v if c is None else c(v))
                    for n, c in convs
                    for v in (r[n],)
                ]
            )
        return out

    def update_sql(self, names: tuple[str, ...]) -> str:
        """UPDATE of `names` by id (arguments: the values, the id, and for a
        tenant-scoped model the tenant)."""
        sql = self._update.get(names)
        if sql is None:
            sets = ", ".join(f"{self._q(n)} = {self.p(i + 1)}" for i, n in enumerate(names))
            n = len(names)
            where = f"{self._q('id')} = {self.p(n + 1)}{self._and_tenant(n + 2)}"
            sql = f"UPDATE {self.table} SET {sets} WHERE {where} RETURNING {self.all_cols}"
            self._update[names] = sql
        return sql

    def record(self, row: Sequence[Any]) -> dict[str, Any]:
        if self._plain:
            return dict(zip(self.names, row, strict=True))
        return {n: v if c is None else c(v) for (n, c), v in zip(self._convs, row, strict=True)}
