"""The fast path: single-record statements sent straight to the driver.

A single Create, Read, Update or Delete outside a shared transaction is one statement
that needs none of SQLAlchemy's machinery at run time. This module prepares its SQL once
per model (identifiers quoted by the dialect, values always bound) and converts values
to and from the driver's formats, exactly as the SQLAlchemy column types do, so records
written either way read the same either way.

List, Count, Search and the bulk update and delete by filter (`Queries`) take the same path:
their SQL is compiled by SQLAlchemy once per query shape (the filter's structure, fields
and operators, the order, whether a page token, a limit and an offset are given, the
fields an update sets; never the values) and kept in a bounded LRU cache
(`SHAPE_CACHE_SIZE` shapes a model); each call checks its filter, looks its shape up and
sends the values to the driver as bound parameters. Inside a transaction, and for every
other operation, DataFlow goes through SQLAlchemy.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Dialect,
    Table,
    and_,
    bindparam,
    delete,
    func,
    select,
    update,
)

from ._filters import FilterCompiler, Shape
from ._model import FieldInfo, ModelInfo
from ._pagination import OrderKey, keyset_after, order_clauses

__all__ = ["SHAPE_CACHE_SIZE", "Codec", "Prepared", "Queries", "driver_value"]

#: Compiled query shapes kept per model; the least recently used is dropped first. A
#: shape costs one SQLAlchemy compile (about a millisecond) when it comes back.
SHAPE_CACHE_SIZE = 256

Conv = Callable[[Any], Any] | None


def _sqlite_dt_in(v: dt.datetime) -> str:
    # SQLAlchemy's SQLite DATETIME storage format, "YYYY-MM-DD HH:MM:SS.ffffff", in UTC
    # (a naive datetime is taken as UTC)
    if v.tzinfo is None or v.tzinfo is dt.UTC:
        return v.isoformat(" ", "microseconds")[:26]
    # "+00:00" cut off (isoformat always writes four-digit years: the offset is at 26)
    return v.astimezone(dt.UTC).isoformat(" ", "microseconds")[:26]


def _sqlite_dt_out(v: str) -> dt.datetime:
    try:  # several times quicker than replace(tzinfo=...)
        return dt.datetime.fromisoformat(v + "+00:00")
    except ValueError:  # text with an offset of its own (not written by DataFlow)
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
        # the columns whose driver values need converting, with their (not null-safe)
        # conversions
        self._convs = [
            (n, c) for n in self.names for c in (_result(fields[n], self.sqlite),) if c is not None
        ]
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
        """A driver row of all columns as a record."""
        out = dict(zip(self.names, row, strict=True))
        for n, c in self._convs:
            v = out[n]
            if v is not None:
                out[n] = c(v)
        return out


# where a bound value comes from (`Prepared.plan`)
_VALUE, _KEY, _TENANT, _LIMIT, _OFFSET, _SET, _EXTRA = range(7)


class Prepared:
    """The driver SQL of one query shape, and where each of its arguments comes from:
    ``(source, index, conversion)`` per placeholder, in order."""

    __slots__ = ("plan", "skip_here", "sql")

    def __init__(self, sql: str, plan: list[tuple[int, int, Conv]]) -> None:
        self.sql = sql
        self.plan = plan
        #: SQLite: calls left to send straight to the driver's thread (see
        #: `DataFlow._fast_fetchall_now`)
        self.skip_here = 0

    def args(
        self,
        values: Sequence[Any],
        key_values: Sequence[Any] = (),
        tenant: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        sets: Sequence[Any] = (),
        extra: Sequence[Any] = (),
    ) -> list[Any]:
        """The driver arguments: the filter's `values` (`FilterCompiler.shape`), the
        page token's sort key values (by key index), the tenant, limit and offset, an
        update's new values (in the order of its field names), and a search's query
        text, last score and last id."""
        sources = (values, key_values, (tenant,), (limit,), (offset,), sets, extra)
        out = []
        for source, i, conv in self.plan:
            v = sources[source][i]
            out.append(v if conv is None else conv(v))
        return out


class Queries:
    """List and Count statements of one model, compiled once per query shape."""

    def __init__(
        self,
        fc: FilterCompiler,
        codec: Codec,
        dialect: Dialect,
        tenant_field: str | None,
        size: int = SHAPE_CACHE_SIZE,
    ) -> None:
        self._fc = fc
        self._codec = codec
        self._dialect = dialect
        self._tcol = None if tenant_field is None else fc.table.c[tenant_field]
        self._size = size
        self._cache: OrderedDict[Hashable, Prepared] = OrderedDict()
        #: Statements compiled (cache misses), for tests and curiosity.
        self.compiled = 0

    def __len__(self) -> int:
        return len(self._cache)

    def list_sql(
        self,
        shape: Shape,
        keys: list[OrderKey],
        after: tuple[bool, ...] | None,
        limit: bool,
        offset: bool,
    ) -> Prepared:
        """A listing: the records matching `shape`, in the order of `keys`; `after`
        (one flag per key: its value is None) when it resumes after a page token's
        record; with placeholders for the limit and the offset when given."""
        order = tuple((f.name, desc) for f, desc in keys)
        key = ("list", shape, order, after, limit, offset)
        prep = self._get(key)
        if prep is None:
            prep = self._put(key, self._compile_list(shape, keys, after, limit, offset))
        return prep

    def count_sql(self, shape: Shape) -> Prepared:
        """How many records match `shape`."""
        table = self._fc.table
        return self._by_filter(
            "count", shape, lambda where: select(func.count()).select_from(table).where(where)
        )

    def _by_filter(self, kind: str, shape: Shape, build: Callable[[Any], Any]) -> Prepared:
        """`build(where)` for the records matching `shape`, built and compiled once per
        shape (`build` runs only then)."""
        key = (kind, shape)
        prep = self._get(key)
        if prep is None:
            plan: dict[str, tuple[int, int, Conv]] = {}
            prep = self._put(key, self._compile(build(self._where(shape, plan)), plan))
        return prep

    def update_sql(self, shape: Shape, names: tuple[str, ...]) -> Prepared:
        """UPDATE of the fields `names` of the records matching `shape` (a bulk update
        by filter)."""
        key = ("update", shape, names)
        prep = self._get(key)
        if prep is None:
            plan: dict[str, tuple[int, int, Conv]] = {}
            where = self._where(shape, plan)
            sets: dict[str, Any] = {}
            for j, n in enumerate(names):
                plan[f"s{j}"] = (_SET, j, self._codec.binds[n])
                sets[n] = bindparam(f"s{j}", None, required=False)
            stmt = update(self._fc.table).where(where).values(sets)
            prep = self._put(key, self._compile(stmt, plan))
        return prep

    def search_sql(
        self,
        shape: Shape,
        query: bool,
        after: bool,
        build: Callable[[ColumnElement[bool], Any, tuple[Any, Any] | None], Any],
    ) -> Prepared:
        """A full-text search: `build(where, query, after)` makes its statement from the
        filter's WHERE clause and the operands of the query text (when `query`) and of
        the last record's score and id (when `after`), the page's limit appended."""
        key = ("search", shape, query, after)
        prep = self._get(key)
        if prep is None:
            plan: dict[str, tuple[int, int, Conv]] = {}
            where = self._where(shape, plan)
            q: Any = None
            if query:
                plan["x0"] = (_EXTRA, 0, None)
                q = bindparam("x0", None, required=False)
            last: tuple[Any, Any] | None = None
            if after:
                plan["x1"] = (_EXTRA, 1, None)
                plan["x2"] = (_EXTRA, 2, self._codec.binds["id"])
                last = (
                    bindparam("x1", None, required=False),
                    bindparam("x2", None, required=False),
                )
            prep = self._compile(build(where, q, last), plan)
            prep.plan.append((_LIMIT, 0, None))
            prep.sql += f" LIMIT {self._placeholder(prep)}"
            self._put(key, prep)
        return prep

    def delete_sql(self, shape: Shape) -> Prepared:
        """DELETE of the records matching `shape` (a bulk delete by filter)."""
        table = self._fc.table
        return self._by_filter("delete", shape, lambda where: delete(table).where(where))

    def _get(self, key: Hashable) -> Prepared | None:
        prep = self._cache.get(key)
        if prep is not None:
            self._cache.move_to_end(key)
        return prep

    def _put(self, key: Hashable, prep: Prepared) -> Prepared:
        self.compiled += 1
        self._cache[key] = prep
        if len(self._cache) > self._size:
            self._cache.popitem(last=False)
        return prep

    def _conv(self, f: FieldInfo) -> Conv:
        # a value compared as REAL (FilterCompiler.casts) is already a float
        return None if self._fc.casts(f) else self._codec.binds[f.name]

    def _where(self, shape: Shape, plan: dict[str, tuple[int, int, Conv]]) -> ColumnElement[bool]:
        n = 0

        def bind(f: FieldInfo) -> Any:
            nonlocal n
            name = f"v{n}"
            plan[name] = (_VALUE, n, self._conv(f))
            n += 1
            return bindparam(name, None, required=False)

        where = self._fc.expr(shape, bind)
        if self._tcol is not None:
            plan["tenant"] = (_TENANT, 0, None)
            where = and_(where, self._tcol == bindparam("tenant", None, required=False))
        return where

    def _compile_list(
        self,
        shape: Shape,
        keys: list[OrderKey],
        after: tuple[bool, ...] | None,
        limit: bool,
        offset: bool,
    ) -> Prepared:
        fc = self._fc
        plan: dict[str, tuple[int, int, Conv]] = {}
        where = self._where(shape, plan)
        if after is not None:

            def bind_key(j: int, f: FieldInfo) -> Any:
                plan[f"k{j}"] = (_KEY, j, self._conv(f))
                return bindparam(f"k{j}", None, required=False)

            pattern = [None if is_null else True for is_null in after]
            where = and_(where, keyset_after(fc, keys, pattern, bind_key))
        stmt = select(fc.table).where(where).order_by(*order_clauses(fc, keys))
        prep = self._compile(stmt, plan)
        sqlite = self._codec.sqlite
        # LIMIT and OFFSET after the compiled text: placeholders, so one shape serves
        # every page size
        if limit:
            prep.plan.append((_LIMIT, 0, None))
            prep.sql += f" LIMIT {self._placeholder(prep)}"
        elif offset and sqlite:
            prep.sql += " LIMIT -1"  # SQLite takes OFFSET only after a LIMIT
        if offset:
            prep.plan.append((_OFFSET, 0, None))
            prep.sql += f" OFFSET {self._placeholder(prep)}"
        return prep

    def _placeholder(self, prep: Prepared) -> str:
        # PostgreSQL numbers placeholders; a name bound twice is one number, so the
        # plan (one entry a number) is as long as the numbers used
        return "?" if self._codec.sqlite else f"${len(prep.plan)}"

    def _compile(self, stmt: Any, plan: dict[str, tuple[int, int, Conv]]) -> Prepared:
        compiled = stmt.compile(dialect=self._dialect, compile_kwargs={"render_postcompile": True})
        names = compiled.positiontup or []
        return Prepared(compiled.string, [plan[n] for n in names])
