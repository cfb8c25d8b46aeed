"""The twelve operations of a model, callable directly (``db.ops(Contact)``) and wrapped
by the generated workflow nodes.

Every value is checked against the model before a statement is sent; statements are
built once per model and executed with bound parameters.
"""

from __future__ import annotations

import builtins
import datetime as dt
import enum
import functools
import json
import math
import operator
import os
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from sqlalchemy import (
    Float,
    Table,
    and_,
    bindparam,
    column,
    delete,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    table,
    true,
    update,
)
from sqlalchemy.engine import Row

from workflow import MISSING

from ._errors import (
    ConflictError,
    DatabaseError,
    NotFoundError,
    SchemaMissingError,
    TenantRequired,
    ValidationError,
)
from ._fastpath import Codec, Queries
from ._filters import FilterCompiler, Shape
from ._model import TENANT_REASON, FieldInfo, ModelInfo
from ._pagination import (
    OrderKey,
    decode_token,
    encode_token,
    filter_digest,
    keyset_after,
    order_clauses,
    parse_order,
    token_context,
)
from ._search import SearchSpec, fts5_query, parse_query, tsquery_text
from ._sqltypes import dialect_insert, json_dumps
from ._tenant import current_tenant
from ._values import INT_MAX, INT_MIN, clean, short

if TYPE_CHECKING:
    from ._dataflow import DataFlow

__all__ = ["ModelOps"]

_INT_MIN, _INT_MAX = INT_MIN, INT_MAX
#: The largest explicit int id a create accepts: generation continues above the largest
#: id on both databases, so an id near the top of the 64-bit range would exhaust it.
MAX_EXPLICIT_ID = 2**63 - 2**20
#: Rows a bulk write sends to the database at a time (one statement or COPY each, all in
#: the request's one transaction): memory follows a batch, not the request, and other
#: tasks run between batches.
BULK_BATCH_ROWS = 1000
#: A search's page size when no limit is given, and the largest limit accepted.
SEARCH_DEFAULT_LIMIT = 20
SEARCH_MAX_LIMIT = 1000


_P = ParamSpec("_P")
_R = TypeVar("_R")

#: The write operations: with a query cache, each ends its table's cached reads.
WRITE_OPS = (
    "create",
    "update",
    "delete",
    "upsert",
    "bulk_create",
    "bulk_update",
    "bulk_delete",
    "bulk_upsert",
)


def _invalidating(ops: ModelOps, fn: Callable[_P, Awaitable[_R]]) -> Callable[_P, Awaitable[_R]]:
    """The write operation `fn` (bound to `ops`), ending the model's cached reads once it
    completed (at the commit of the shared transaction when it joined one). A write that
    failed inside a shared transaction counts too: the caller may catch the error and
    commit what it did."""
    db = ops._db
    model = ops.model

    @functools.wraps(fn)
    async def write(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            result = await fn(*args, **kwargs)
        except BaseException:
            tx = db._tx.get()
            if tx is not None:
                tx.written.add(model.table)
            raise
        await db._written(model)
        return result

    return write


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _check(f: FieldInfo, value: Any, row: int | None) -> Any:
    """`value` as field `f`'s type, or ValidationError naming the field (and row)."""
    if value is None:
        if f.nullable:
            return None
        raise ValidationError(f.name, f"expected {f.base_type.__name__}, got null", row=row)
    try:
        # the one rule for values (dataflow._values): a datetime comes back in UTC
        return clean(f.base_type, value)
    except TypeError as exc:
        raise ValidationError(f.name, str(exc), row=row) from None


def _name(name: Any) -> str:
    """A caller's field name as an error may name it (cut when long)."""
    return name if isinstance(name, str) and len(name) <= 60 else short(name)


def _uuid_text() -> str:
    """A random (version 4) UUID as text, several times cheaper than str(uuid4())."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_EXACT = (str, int, float, bool, bytes)


def _enum_value(v: Any) -> Any:
    return None if v is None else v.value


def _json_text(v: Any) -> Any:
    return None if v is None else json_dumps(v)


def _copy_converter(f: FieldInfo) -> Any:
    """How a checked value is handed to asyncpg's COPY (None: as it is)."""
    bt = f.base_type
    if bt in (dict, list):
        return _json_text
    if isinstance(bt, type) and issubclass(bt, enum.Enum):
        return _enum_value
    return None


class ModelOps:
    """Operations on one model's table. Get one with `DataFlow.ops(Model)`.

    All methods are coroutines. Outside `DataFlow.transaction()` (and outside an atomic
    workflow) each call is its own transaction; inside, it joins the shared one.

    On a tenant-scoped model (`ModelInfo.tenant_field`) every method works on the
    current tenant's records only (`dataflow.tenant_scope`): another tenant's records
    behave as if they did not exist, every record written gets the current tenant, and
    a caller naming the tenant field in a write gets a ValidationError. Without a
    current tenant every method raises `TenantRequired`.
    """

    def __init__(self, db: DataFlow, model: ModelInfo, table: Table) -> None:
        self._db = db
        self.model = model
        self.table = table
        self._fc = FilterCompiler(model, table, db.dialect)
        self._writable = {f.name: f for f in model.writable_fields}
        self._n_writable = len(self._writable)
        # fields whose values need no conversion when of exactly this type
        self._fast_types: dict[str, Any] = {
            f.name: f.base_type for f in model.writable_fields if f.base_type in _EXACT
        }
        self._settable = {n: f for n, f in self._writable.items() if not f.primary_key}
        self._pk = model.primary_key
        self._str_id = self._pk.base_type is str
        c = table.c
        self._tf = model.tenant_field
        self._tcol: Any = None if self._tf is None else c[self._tf]
        by_key = c.id == bindparam("pk")
        if self._tcol is not None:
            by_key = and_(by_key, self._tcol == bindparam("tenant"))
        self._insert = insert(table).returning(*c)
        self._insert_many = insert(table)
        # SQLite, tenant-scoped with int ids: the id of an insert without one (see
        # Codec.gen_id: the primary key is (tenant, id), so no rowid alias makes it)
        self._gen_id: Any = None
        if self._tf is not None and not self._str_id and db.dialect == "sqlite":
            self._gen_id = select(func.coalesce(func.max(c.id), 0) + 1).scalar_subquery()
            self._insert_gen = insert(table).values(id=self._gen_id).returning(*c)
            self._insert_many_gen = insert(table).values(id=self._gen_id)
        self._read = select(table).where(by_key)
        self._delete = delete(table).where(by_key)
        self._count_all = select(func.count()).select_from(table)
        self._dialect_insert = dialect_insert(db.dialect)
        self._codec = Codec(model, table, db.engine.dialect)
        # List, Count, Search and writes by filter on the fast path: SQL compiled once
        # per query shape
        self._queries = Queries(self._fc, self._codec, db.engine.dialect, self._tf)
        # PostgreSQL's sequence ignores explicit ids; SQLite continues after the largest.
        # Move the sequence past explicit ids so both generate the same next id.
        self._bump: Any = None
        if db.dialect == "postgresql" and not self._str_id:
            seq = func.pg_get_serial_sequence(literal(f'"{table.name}"'), literal("id"))
            self._bump = select(func.setval(seq, select(func.max(c.id)).scalar_subquery()))
        if db._cache is not None:
            # each write ends the cached reads; without a cache the writes cost nothing more
            for name in WRITE_OPS:
                setattr(self, name, _invalidating(self, getattr(self, name)))

    # -- tenants -------------------------------------------------------------------

    def _tenant(self) -> str:
        """The current tenant (a tenant-scoped model only), or TenantRequired."""
        tenant = current_tenant()
        if tenant is None:
            raise TenantRequired(self.model.name)
        return tenant

    def _scoped(self, where: Any) -> Any:
        """`where`, and on a tenant-scoped model: of the current tenant."""
        if self._tcol is None:
            return where
        return and_(where, self._tcol == self._tenant())

    def _by_key(self, key: Any) -> dict[str, Any]:
        """The parameters of `_read` and `_delete`."""
        if self._tf is None:
            return {"pk": key}
        return {"pk": key, "tenant": self._tenant()}

    def _digest(self, flt: Mapping[str, Any] | None) -> str:
        """What a page token is bound to besides the model and order: the filter, and
        the tenant (a token never resumes a listing in another tenant)."""
        digest = filter_digest(flt)
        if self._tf is None:
            return digest
        return f"{digest}\ntenant {self._tenant()}"

    # -- validation ----------------------------------------------------------------

    def _record(self, row: Row[Any]) -> dict[str, Any]:
        return dict(row._mapping)

    def _key(self, value: Any, field: str = "id") -> Any:
        tp = type(value)
        if tp is self._pk.base_type and (
            (tp is str and "\x00" not in value) or (tp is int and _INT_MIN <= value <= _INT_MAX)
        ):
            return value
        if value is None:
            raise ValidationError(field, "an id is required")
        try:
            return _check(self._pk, value, None)
        except ValidationError as exc:
            raise ValidationError(field, exc.reason) from None

    def _values(
        self, data: Mapping[str, Any], row: int | None = None, now: dt.datetime | None = None
    ) -> dict[str, Any]:
        """A complete new record from caller data: checked, defaults applied, id made.

        The common case (a value already of the field's exact type) is checked inline:
        this runs once per row of a bulk write. A tenant-scoped model's record gets the
        current tenant.
        """
        tenant = None if self._tf is None else self._tenant()
        out: dict[str, Any] = {}
        fast = self._fast_types
        value: Any
        for name, value in data.items():
            exact = fast.get(name)
            if exact is not None and type(value) is exact:
                if exact is str:
                    if "\x00" not in value:
                        out[name] = value
                        continue
                elif exact is int:
                    if _INT_MIN <= value <= _INT_MAX:
                        out[name] = value
                        continue
                elif exact is float:
                    if math.isfinite(value):
                        out[name] = value
                        continue
                else:
                    out[name] = value
                    continue
            f = self._writable.get(name)
            if f is None:
                raise ValidationError(_name(name), self._unknown(name), row=row)
            if value is None and f.primary_key:
                continue
            out[name] = _check(f, value, row)
        if not self._str_id:
            key = out.get("id")
            if key is not None and not 1 <= key <= MAX_EXPLICIT_ID:
                raise ValidationError(
                    "id", f"an explicit id must be between 1 and {MAX_EXPLICIT_ID}", row=row
                )
        if len(out) < self._n_writable:
            for name, f in self._writable.items():
                if name in out:
                    continue
                if f.primary_key:
                    if self._str_id:
                        out[name] = _uuid_text()
                elif f.default is not MISSING:
                    out[name] = f.default
                else:
                    raise ValidationError(name, "required field is missing", row=row)
        if now is None:
            now = _now()
        out["created_at"] = now
        out["updated_at"] = now
        tf = self._tf
        if tf is not None and tenant is not None:
            out[tf] = tenant
        return out

    def _changes(self, fields: Any, row: int | None = None) -> dict[str, Any]:
        if not isinstance(fields, Mapping) or not fields:
            raise ValidationError("fields", "expects a non-empty object of field values", row=row)
        out: dict[str, Any] = {}
        for name, value in fields.items():
            f = self._settable.get(name)
            if f is None:
                reason = (
                    "the primary key cannot be changed" if name == "id" else self._unknown(name)
                )
                raise ValidationError(_name(name), reason, row=row)
            out[name] = _check(f, value, row)
        out["updated_at"] = _now()
        return out

    def _unknown(self, name: Any) -> str:
        if name == self._tf:
            return TENANT_REASON
        if name in ("created_at", "updated_at"):
            return "is managed by DataFlow and cannot be set"
        return f"unknown field of {self.model.name} (fields: {', '.join(self._writable)})"

    def _where(self, flt: Any, all: bool, what: str) -> Any:
        """The WHERE clause of a write by filter (`_write_shape`)."""
        shape, values = self._write_shape(flt, all, what)
        it = iter(values)
        return self._scoped(self._fc.expr(shape, lambda _f: next(it)))

    def _write_shape(self, flt: Any, all: bool, what: str) -> tuple[Shape, builtins.list[Any]]:
        """The shape and values of a write's filter. A filter that matches every record
        by its shape (`FilterCompiler.compile_folded`), not only an empty one, needs
        ``all=True``."""
        if flt is not None and not isinstance(flt, Mapping):
            raise ValidationError("filter", "expects an object")
        shape, values, truth = self._fc.shape(flt)
        if truth is True and not all:
            raise ValidationError(
                "filter",
                f"the filter matches every {self.model.name} by its shape (an empty filter, "
                f"an empty $and...); it would {what} them all: pass all=True to mean that",
            )
        return shape, values

    def _conflict_cols(self, conflict_on: Any) -> tuple[str, ...]:
        """The columns of the unique index `conflict_on` names (a tenant-scoped model's
        lead with the tenant field, as its indexes do)."""
        key = self._conflict_key(conflict_on)
        if self._tf is None:
            return key
        return (self._tf, *(n for n in key if n != self._tf))

    def _conflict_key(self, conflict_on: Any) -> tuple[str, ...]:
        if conflict_on is None:
            return ("id",)
        if isinstance(conflict_on, str):
            conflict_on = [conflict_on]
        if not isinstance(conflict_on, list | tuple) or not conflict_on:
            raise ValidationError("conflict_on", "expects a list of field names")
        want = set(conflict_on)
        for key in self.model.unique_keys:
            if set(key) == want and len(key) == len(conflict_on):
                return key
        keys = "; ".join(", ".join(k) for k in self.model.unique_keys)
        raise ValidationError(
            "conflict_on",
            f"{list(conflict_on)} is not a unique key of {self.model.name} (unique keys: {keys})",
        )

    # -- single-record operations --------------------------------------------------

    async def create(self, **fields: Any) -> dict[str, Any]:
        """Insert one record; return it as stored (with its id and timestamps).

        Raises:
            ValidationError: unknown field, missing required field or wrongly typed value.
            AlreadyExistsError: the id or a unique field is taken.
        """
        values = self._values(fields)
        bump = self._bump is not None and "id" in values
        db = self._db
        if not bump and db._fast_ok():
            names = tuple(values)
            codec = self._codec
            sql = codec.insert_sql(names)
            raw = await db._fast_fetch(self.model, sql, codec.args(values, names), True)
            assert raw is not None
            return codec.record(raw)
        stmt = self._insert if self._gen_id is None or "id" in values else self._insert_gen
        async with db._session(self.model, write=bump) as (conn, _):
            row = (await conn.execute(stmt, values)).one()
            if bump:
                await conn.execute(self._bump)
        return self._record(row)

    async def read(self, id: Any) -> dict[str, Any]:
        """The record with this id.

        Raises:
            NotFoundError: there is none.
        """
        cache = self._db._caching()
        if cache is None:
            return await self._read_now(id)
        key = self._key(id)
        result: dict[str, Any] = await cache.fetch(
            self.model, "read", (key,), self._cache_tenant(), lambda: self._read_now(key)
        )
        return result

    def _cache_tenant(self) -> str | None:
        """The tenant a cached read is keyed by (a tenant-scoped model without one: the
        operation's TenantRequired, before the cache is looked at)."""
        return self._tenant() if self._tf is not None else current_tenant()

    async def _read_now(self, id: Any) -> dict[str, Any]:
        key = self._key(id)
        db = self._db
        if db._fast_ok():
            codec = self._codec
            args = [key] if self._tf is None else [key, self._tenant()]
            raw = await db._fast_fetch(self.model, codec.read_sql, args, False)
            if raw is None:
                raise NotFoundError(self.model.name, key)
            return codec.record(raw)
        params = self._by_key(key)
        async with db._session(self.model) as (conn, _):
            row = (await conn.execute(self._read, params)).first()
        if row is None:
            raise NotFoundError(self.model.name, key)
        return self._record(row)

    async def update(
        self,
        id: Any = None,
        *,
        filter: Mapping[str, Any] | None = None,
        fields: Mapping[str, Any],
        all: bool = False,
    ) -> dict[str, Any]:
        """Change `fields` of one record, addressed by `id` or by a `filter` that must
        match exactly one record; return the updated record.

        Raises:
            NotFoundError: no record matches.
            ConflictError: the filter matches more than one record (nothing is changed;
                use `bulk_update` to change many).
            ValidationError: bad field or value, both or neither of id and filter, or an
                empty filter without ``all=True``.
        """
        if self._tf is not None:
            self._tenant()  # before anything else: no tenant, no call
        changes = self._changes(fields)
        c = self.table.c
        if id is not None and filter is not None:
            raise ValidationError("filter", "give either id or filter, not both")
        if id is None:
            if filter is None:
                raise ValidationError("id", "give the id (or a filter) of the record to update")
            where = self._where(filter, all, "update")
            async with self._db._session(self.model, write=True) as (conn, _):
                ids = (await conn.execute(select(c.id).where(where).limit(2))).scalars().all()
                if not ids:
                    raise NotFoundError(self.model.name, dict(filter))
                if len(ids) > 1:
                    raise ConflictError(
                        f"{self.model.name}: the filter matches more than one record; "
                        f"update by id or use bulk_update"
                    )
                stmt = update(self.table).where(c.id == ids[0], where).values(changes)
                row = (await conn.execute(stmt.returning(*c))).first()
                if row is None:
                    raise NotFoundError(self.model.name, dict(filter))
            return self._record(row)
        key = self._key(id)
        db = self._db
        if db._fast_ok():
            codec = self._codec
            names = tuple(changes)
            args = codec.args(changes, names)
            args.append(key)
            if self._tf is not None:
                args.append(self._tenant())
            raw = await db._fast_fetch(self.model, codec.update_sql(names), args, True)
            if raw is None:
                raise NotFoundError(self.model.name, key)
            return codec.record(raw)
        stmt = update(self.table).where(self._scoped(c.id == key)).values(changes).returning(*c)
        async with self._db._session(self.model) as (conn, _):
            row = (await conn.execute(stmt)).first()
        if row is None:
            raise NotFoundError(self.model.name, key)
        return self._record(row)

    async def delete(self, id: Any) -> int:
        """Delete the record with this id; return 1.

        Raises:
            NotFoundError: there is none.
        """
        key = self._key(id)
        db = self._db
        if db._fast_ok():
            args = [key] if self._tf is None else [key, self._tenant()]
            n = await db._fast_execute(self.model, self._codec.delete_sql, args)
            if n == 0:
                raise NotFoundError(self.model.name, key)
            return n
        params = self._by_key(key)
        async with db._session(self.model) as (conn, _):
            n = (await conn.execute(self._delete, params)).rowcount
        if n == 0:
            raise NotFoundError(self.model.name, key)
        return int(n)

    async def upsert(
        self, conflict_on: Sequence[str] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Insert the record, or update the existing one with the same `conflict_on` key
        (default ``["id"]``), in one ``INSERT ... ON CONFLICT DO UPDATE`` statement.

        A new record gets defaults for the fields not given; an existing one changes only
        in the fields given (and ``updated_at``): a field left out keeps its value, it is
        never reset to its default. Returns the record as stored.
        """
        if self._tf is not None:
            self._tenant()  # before anything else: no tenant, no call
        key = self._conflict_cols(conflict_on)
        values = self._values(fields)
        stmt = self._upsert_stmt(key, list(values), fields).returning(*self.table.c)
        bump = self._bump is not None and "id" in values
        async with self._db._session(self.model, write=bump) as (conn, _):
            row = (await conn.execute(stmt, values)).one()
            if bump:
                await conn.execute(self._bump)
        return self._record(row)

    def _upsert_stmt(
        self, key: tuple[str, ...], names: builtins.list[str], given: Collection[str]
    ) -> Any:
        """INSERT of the columns `names`; on a conflict on `key`, SET the `given` fields
        (never the key, ``id`` or ``created_at``) and ``updated_at``."""
        ins = self._dialect_insert(self.table)
        if self._gen_id is not None and "id" not in names:
            ins = ins.values(id=self._gen_id)
        skip = {*key, "id", "created_at"}
        sets = {
            n: ins.excluded[n] for n in names if n not in skip and (n in given or n == "updated_at")
        }
        return ins.on_conflict_do_update(index_elements=list(key), set_=sets)

    # -- queries ---------------------------------------------------------------------

    async def list(
        self,
        filter: Mapping[str, Any] | None = None,
        *,
        order_by: str | Sequence[str] | None = None,
        limit: int | None = None,
        offset: int | None = None,
        page_token: str | None = None,
        fields: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Records matching `filter`, sorted by `order_by` (``"-field"`` for descending;
        ``id`` is always the last sort key).

        With `limit`, ``next_page_token`` is set when more records follow; pass it back
        as `page_token` (with the same filter and order_by) for the next page.
        `fields` projects the records to those fields.

        Returns:
            ``{"records": [...], "next_page_token": str | None}``
        """
        cache = self._db._caching()
        if cache is None:
            return await self._list_now(filter, order_by, limit, offset, page_token, fields)
        args = (filter, order_by, limit, offset, page_token, fields)
        result: dict[str, Any] = await cache.fetch(
            self.model, "list", args, self._cache_tenant(), lambda: self._list_now(*args)
        )
        return result

    async def _list_now(
        self,
        filter: Mapping[str, Any] | None,
        order_by: str | Sequence[str] | None,
        limit: int | None,
        offset: int | None,
        page_token: str | None,
        fields: Sequence[str] | None,
    ) -> dict[str, Any]:
        """`list` on the database: on the fast path (`Queries`) outside a shared
        transaction, else through SQLAlchemy in it."""
        tenant = None if self._tf is None else self._tenant()  # no tenant, no call
        fc = self._fc
        keys = parse_order(fc, order_by)
        shape, values, _ = fc.shape(filter)
        db = self._db
        proj: builtins.list[str] | None = None
        if fields is not None:
            if not isinstance(fields, list | tuple):
                raise ValidationError("fields", "expects a list of field names")
            proj = [fc.field(n, f"fields[{i}]").name for i, n in enumerate(fields)]
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise ValidationError("limit", "expects a positive integer")
        if offset is not None and (not isinstance(offset, int) or offset < 0):
            raise ValidationError("offset", "expects a non-negative integer")
        last: builtins.list[Any] | None = None
        if page_token:
            if offset:
                raise ValidationError("offset", "cannot be combined with page_token")
            context = token_context(self.model.name, keys, self._digest(filter))
            payload = await db.verify_token(page_token, context)
            last = decode_token(keys, payload)
        page = None if limit is None else limit + 1
        if db._fast_ok():
            after = None if last is None else tuple(v is None for v in last)
            key_values: builtins.list[Any] = []
            if last is not None:
                key_values = [
                    None if v is None else fc.column(f)[1](v)
                    for (f, _), v in zip(keys, last, strict=True)
                ]
            prep = self._queries.list_sql(shape, keys, after, page is not None, bool(offset))
            args = prep.args(values, key_values, tenant, page, offset)
            rows = await db._fast_fetchall(self.model, prep, args)
            more = limit is not None and len(rows) > limit
            record = self._codec.record
            records = [record(r) for r in (rows[:limit] if more else rows)]
        else:
            it = iter(values)
            where = self._scoped(fc.expr(shape, lambda _f: next(it)))
            stmt = select(self.table).where(where)
            if last is not None:
                stmt = stmt.where(keyset_after(fc, keys, last))
            stmt = stmt.order_by(*order_clauses(fc, keys))
            if page is not None:
                stmt = stmt.limit(page)
            if offset:
                stmt = stmt.offset(offset)
            async with db._session(self.model) as (conn, _):
                rows = (await conn.execute(stmt)).all()
            more = limit is not None and len(rows) > limit
            records = [self._record(r) for r in (rows[:limit] if more else rows)]
        token = None
        if more:  # a token binds the model, the order and the filter (token_context)
            context = token_context(self.model.name, keys, self._digest(filter))
            token = await db.sign_token(encode_token(keys, records[-1]), context)
        if proj is not None:
            records = [{n: r[n] for n in proj} for r in records]
        return {"records": records, "next_page_token": token}

    async def search(
        self,
        query: str | None = None,
        filter: Mapping[str, Any] | None = None,
        *,
        limit: int | None = None,
        page_token: str | None = None,
        fields: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Full-text search (see `_search_now`), through the query cache when on."""
        cache = self._db._caching()
        if cache is None:
            return await self._search_now(query, filter, limit, page_token, fields)
        args = (query, filter, limit, page_token, fields)
        result: dict[str, Any] = await cache.fetch(
            self.model, "search", args, self._cache_tenant(), lambda: self._search_now(*args)
        )
        return result

    async def _search_now(
        self,
        query: str | None,
        filter: Mapping[str, Any] | None,
        limit: int | None,
        page_token: str | None,
        fields: Sequence[str] | None,
    ) -> dict[str, Any]:
        """Full-text search: the records matching `query` (and `filter`), most relevant
        first (``ts_rank`` on PostgreSQL, ``bm25`` on SQLite; ties by ``id``).

        The query language (parsed here, never passed to the engine as written): words
        (all must occur), ``"a phrase"``, ``-word`` or ``-"a phrase"`` to exclude,
        ``word*`` for words starting so. Without a query (None or blank) every record
        matching `filter` is a result, all with score 0, in ``id`` order: that works on
        any model; a query needs searchable fields. `limit` is the page size (default
        `SEARCH_DEFAULT_LIMIT`, at most `SEARCH_MAX_LIMIT`); pass ``next_page_token``
        back as `page_token`, with the same query and filter, for the next page.

        Returns:
            ``{"records": [...], "scores": [float, ...], "next_page_token": str | None}``:
            ``scores[i]`` is the relevance of ``records[i]`` (higher is more relevant;
            comparable within one database, not between PostgreSQL and SQLite).

        Raises:
            ValidationError: a query for a model without searchable fields, or a bad
                query, filter, limit, token or field name.
            SchemaMissingError: the search index does not exist (``skip_migration``).
        """
        if self._tf is not None:
            self._tenant()  # before anything else: no tenant, no call
        spec: SearchSpec | None = self.table.info.get("search")
        terms = None
        if query is not None and (not isinstance(query, str) or query.strip()):
            if spec is None:
                raise ValidationError(
                    "query",
                    f"{self.model.name} has no searchable field (declare "
                    f"field(searchable=True) or __searchable__ = True); without a query "
                    f"a search lists the records matching the filter",
                )
            terms = parse_query(query)
        fc = self._fc
        shape, values, _ = fc.shape(filter)
        tenant = None if self._tf is None else self._tenant()
        proj: builtins.list[str] | None = None
        if fields is not None:
            if not isinstance(fields, list | tuple):
                raise ValidationError("fields", "expects a list of field names")
            proj = [fc.field(n, f"fields[{i}]").name for i, n in enumerate(fields)]
        if limit is None:
            limit = SEARCH_DEFAULT_LIMIT
        if type(limit) is not int or not 1 <= limit <= SEARCH_MAX_LIMIT:
            raise ValidationError("limit", f"expects an integer from 1 to {SEARCH_MAX_LIMIT}")
        db = self._db
        context = "search\n" + "\n".join(
            [
                self.model.name,
                repr([(x.tokens, x.negated, x.prefix) for x in terms or ()]),
                self._digest(filter),
            ]
        )
        keys: builtins.list[OrderKey] = [(self._pk, False)]
        after: tuple[float, Any] | None = None
        if page_token:
            payload = await db.verify_token(page_token, context)
            after = _search_position(payload, keys)
        match_text: str | None = None
        if terms is not None and spec is not None:
            pg = db.dialect == "postgresql"
            match_text = tsquery_text(terms) if pg else fts5_query(terms)
        try:
            if db._fast_ok():
                prep = self._queries.search_sql(
                    shape,
                    match_text is not None,
                    after is not None,
                    lambda where, q, a: self._search_stmt(
                        spec if q is not None else None, where, q, a
                    ),
                )
                extra: builtins.list[Any] = [match_text]
                if after is not None:
                    extra += [after[0], after[1]]
                args = prep.args(values, (), tenant, limit + 1, extra=extra)
                raw_rows = await db._fast_fetchall(self.model, prep, args)
                record = self._codec.record
                rows = [(record(r[:-1]), r[-1]) for r in raw_rows]
            else:
                it = iter(values)
                where = self._scoped(fc.expr(shape, lambda _f: next(it)))
                q: Any = None if match_text is None else bindparam("search_q", match_text)
                stmt = self._search_stmt(spec if q is not None else None, where, q, after)
                async with db._session(self.model) as (conn, _):
                    result = (await conn.execute(stmt.limit(limit + 1))).all()
                rows = []
                for r in result:
                    m = dict(r._mapping)
                    rows.append((m, m.pop("_score")))
        except DatabaseError as exc:
            # the index is missing (skip_migration=True): say so, not "table missing"
            if spec is None:
                raise
            cause = exc.__cause__
            text = str(getattr(cause, "orig", cause) or "")  # the driver's words, no SQL
            if f"no such table: {spec.fts_table}" in text or (
                spec.column in text and "does not exist" in text
            ):
                raise SchemaMissingError(self.table.name, self.model.name, search=True) from exc
            raise
        records = [m for m, _ in rows]
        scores = [float(x) for _, x in rows]
        token = None
        if len(records) > limit:
            records, scores = records[:limit], scores[:limit]
            payload = json_dumps([scores[-1], records[-1]["id"]]).encode()
            token = await db.sign_token(payload, context)
        if proj is not None:
            records = [{n: r[n] for n in proj} for r in records]
        return {"records": records, "scores": scores, "next_page_token": token}

    def _search_stmt(
        self, spec: SearchSpec | None, where: Any, q: Any, after: tuple[Any, Any] | None
    ) -> Any:
        """The search statement, without its limit: the records matching `where` and,
        with a `spec`, the query operand `q`, most relevant first (ties by id); `after`:
        the (score, id) operands of the record the page starts after."""
        db = self._db
        t = self.table
        quote = db.engine.dialect.identifier_preparer.quote
        match: Any = true()
        score: Any = literal_column("0.0", Float)  # no query: all equally relevant
        source: Any = t
        if spec is None:
            pass
        elif db.dialect == "postgresql":
            vector: Any = literal_column(f"{quote(t.name)}.{quote(spec.column)}")
            tsq = func.to_tsquery(literal_column(f"'{spec.config}'::regconfig"), q)
            match = vector.op("@@")(tsq)
            score = func.ts_rank(vector, tsq, type_=Float)
        else:
            fts: Any = literal_column(quote(spec.fts_table))
            match = fts.op("MATCH")(q)
            score = -func.bm25(fts, type_=Float)
            fts_table = table(spec.fts_table, column("rowid"))
            rowid: Any = literal_column(f"{quote(t.name)}.rowid")
            source = t.join(fts_table, fts_table.c.rowid == rowid)
        inner = select(t, score.label("_score")).select_from(source).where(match, where).subquery()
        stmt = select(inner)
        s_col, id_col = inner.c._score, inner.c.id
        if after is not None:
            last_score, last_id = after
            stmt = stmt.where(or_(s_col < last_score, and_(s_col == last_score, id_col > last_id)))
        return stmt.order_by(s_col.desc(), id_col.asc())

    async def count(self, filter: Mapping[str, Any] | None = None) -> int:
        """How many records match `filter`."""
        cache = self._db._caching()
        if cache is None:
            return await self._count_now(filter)
        result: int = await cache.fetch(
            self.model, "count", (filter,), self._cache_tenant(), lambda: self._count_now(filter)
        )
        return result

    async def _count_now(self, filter: Mapping[str, Any] | None) -> int:
        tenant = None if self._tf is None else self._tenant()  # no tenant, no call
        db = self._db
        if db._fast_ok():
            shape, values, _ = self._fc.shape(filter)
            prep = self._queries.count_sql(shape)
            rows = await db._fast_fetchall(self.model, prep, prep.args(values, (), tenant))
            return int(rows[0][0])
        if self._tf is not None:  # the tenant is always a condition
            stmt = self._count_all.where(self._scoped(self._fc.compile(filter)))
        elif not filter:
            stmt = self._count_all
        else:
            stmt = self._count_all.where(self._fc.compile(filter))
        async with db._session(self.model) as (conn, _):
            return int((await conn.execute(stmt)).scalar_one())

    # -- bulk operations -------------------------------------------------------------

    def _cap(self, n: int, field: str = "records") -> None:
        """Refuse a bulk request of more than `DataFlow.max_bulk_rows` rows (checked
        before any row is looked at)."""
        cap = self._db.max_bulk_rows
        if n > cap:
            raise ValidationError(field, f"at most {cap} rows per request, got {n}")

    def _rows(self, data: Any) -> builtins.list[Mapping[str, Any]]:
        if not isinstance(data, list | tuple):
            raise ValidationError("data", "expects a list of records")
        self._cap(len(data))
        for i, r in enumerate(data):
            if type(r) is not dict and not isinstance(r, Mapping):
                raise ValidationError("data", "each record must be an object", row=i)
        return list(data)

    def _new_rows(self, data: Any) -> builtins.list[dict[str, Any]]:
        now = _now()
        values = self._values
        rows = [values(r, i, now) for i, r in enumerate(self._rows(data))]
        if rows and not self._str_id:
            with_id = "id" in rows[0]
            for i, r in enumerate(rows):
                if ("id" in r) != with_id:
                    raise ValidationError(
                        "id", "give an id on every record or on none of them", row=i
                    )
        return rows

    async def bulk_create(self, data: Sequence[Mapping[str, Any]]) -> int:
        """Insert every record of `data` in one transaction; return how many.

        Every record is validated before anything is written: one bad record writes
        nothing, and the error names its row index and field. On PostgreSQL the rows are
        sent with COPY.
        """
        if self._tf is not None:
            self._tenant()  # before anything else: no tenant, no call
        rows = self._new_rows(data)
        if not rows:
            return 0
        db = self._db
        if db.dialect == "sqlite" and self._bump is None and db._fast_ok():
            names = tuple(rows[0])
            codec = self._codec
            sql = codec.insert_many_sql(names)
            await db._fast_executemany(
                self.model, sql, (codec.many_args(b, names) for b in _batches(rows))
            )
            return len(rows)
        async with db._session(self.model, write=True) as (conn, _):
            if db.dialect == "postgresql":
                await self._copy(conn, rows)
            else:
                gen = self._gen_id is not None and "id" not in rows[0]
                stmt = self._insert_many_gen if gen else self._insert_many
                for batch in _batches(rows):
                    await conn.execute(stmt, batch)
            if self._bump is not None and "id" in rows[0]:
                await conn.execute(self._bump)
        return len(rows)

    async def _copy(self, conn: Any, rows: builtins.list[dict[str, Any]]) -> None:
        """COPY the rows, a batch at a time (driver records are made per batch)."""
        names = list(rows[0])
        procs = [_copy_converter(self.model.field_map[n]) for n in names]
        # make the driver open its transaction now, so COPY is part of it
        await conn.exec_driver_sql("SELECT 1")
        raw = await conn.get_raw_connection()
        driver: Any = raw.driver_connection
        plain = all(p is None for p in procs)
        get = operator.itemgetter(*names)
        pairs = list(zip(names, procs, strict=True))
        for batch in _batches(rows):
            if plain:
                records = [get(r) for r in batch] if len(names) > 1 else [(get(r),) for r in batch]
            else:
                records = [tuple([r[n] if p is None else p(r[n]) for n, p in pairs]) for r in batch]
            await driver.copy_records_to_table(self.table.name, records=records, columns=names)

    async def bulk_update(
        self,
        data: Sequence[Mapping[str, Any]] | None = None,
        *,
        filter: Mapping[str, Any] | None = None,
        fields: Mapping[str, Any] | None = None,
        all: bool = False,
    ) -> int:
        """Update many records in one transaction; return how many changed.

        Either `data`, a list of records each with its ``id`` and the fields to change
        (a missing id fails the whole batch with NotFoundError naming the row), or a
        `filter` and the `fields` to set on every match (an empty filter needs
        ``all=True``).
        """
        if self._tf is not None:
            self._tenant()  # before anything else: no tenant, no call
        c = self.table.c
        if data is not None:
            if filter is not None or fields is not None:
                raise ValidationError("data", "give either data or filter and fields, not both")
            items = []
            for i, r in enumerate(self._rows(data)):
                if "id" not in r:
                    raise ValidationError("id", "each record needs the id to update", row=i)
                rest = {k: v for k, v in r.items() if k != "id"}
                items.append((self._key(r["id"]), self._changes(rest, i)))
            n = 0
            async with self._db._session(self.model, write=True) as (conn, _):
                for i, (key, ch) in enumerate(items):
                    by_id = self._scoped(c.id == key)
                    res = await conn.execute(update(self.table).where(by_id).values(ch))
                    if res.rowcount == 0:
                        raise NotFoundError(self.model.name, f"{key!r} (row {i})")
                    n += res.rowcount
            return n
        if fields is None:
            raise ValidationError("fields", "give the fields to set (or data)")
        changes = self._changes(fields)
        shape, values = self._write_shape(filter, all, "update")
        db = self._db
        if db._fast_ok():
            names = tuple(changes)
            prep = self._queries.update_sql(shape, names)
            tenant = None if self._tf is None else self._tenant()
            args = prep.args(values, (), tenant, sets=[changes[n] for n in names])
            return await db._fast_execute(self.model, prep.sql, args, here=False)
        it = iter(values)
        where = self._scoped(self._fc.expr(shape, lambda _f: next(it)))
        async with db._session(self.model, write=True) as (conn, _):
            res = await conn.execute(update(self.table).where(where).values(changes))
        return int(res.rowcount)

    async def bulk_delete(
        self,
        filter: Mapping[str, Any] | None = None,
        *,
        ids: Sequence[Any] | None = None,
        all: bool = False,
    ) -> int:
        """Delete the records matching `filter` (an empty filter needs ``all=True``), or
        those whose id is in `ids`; return how many were deleted."""
        if self._tf is not None:
            self._tenant()  # before anything else: no tenant, no call
        if ids is not None:
            if filter is not None:
                raise ValidationError("ids", "give either ids or a filter, not both")
            if not isinstance(ids, list | tuple):
                raise ValidationError("ids", "expects a list of ids")
            self._cap(len(ids), "ids")
            keys = [self._key(v, f"ids[{i}]") for i, v in enumerate(ids)]
            if not keys:
                return 0
            n = 0
            async with self._db._session(self.model, write=True) as (conn, _):
                for batch in _batches(keys):
                    in_batch = self._scoped(self.table.c.id.in_(batch))
                    res = await conn.execute(delete(self.table).where(in_batch))
                    n += int(res.rowcount)
            return n
        shape, values = self._write_shape(filter, all, "delete")
        db = self._db
        if db._fast_ok():
            prep = self._queries.delete_sql(shape)
            tenant = None if self._tf is None else self._tenant()
            args = prep.args(values, (), tenant)
            return await db._fast_execute(self.model, prep.sql, args, here=False)
        it = iter(values)
        stmt = delete(self.table).where(self._scoped(self._fc.expr(shape, lambda _f: next(it))))
        async with db._session(self.model, write=True) as (conn, _):
            res = await conn.execute(stmt)
        return int(res.rowcount)

    async def bulk_upsert(
        self, data: Sequence[Mapping[str, Any]], conflict_on: Sequence[str] | None = None
    ) -> int:
        """Insert or update every record of `data` on its `conflict_on` key, with native
        ``INSERT ... ON CONFLICT DO UPDATE``, in one transaction; return how many. As in
        `upsert`, an existing record changes only in the fields its entry gives."""
        if self._tf is not None:
            self._tenant()  # before anything else: no tenant, no call
        key = self._conflict_cols(conflict_on)
        rows = self._new_rows(data)
        if not rows:
            return 0
        seen: dict[tuple[Any, ...], int] = {}
        for i, r in enumerate(rows):
            if all(k in r for k in key):
                k = tuple(r[n] for n in key)
                if k in seen:
                    raise ValidationError(
                        ", ".join(key), f"same key as row {seen[k]} in this batch", row=i
                    )
                seen[k] = i
        names = list(rows[0])  # every row has the same columns (defaults filled in)
        async with self._db._session(self.model, write=True) as (conn, _):
            for start in range(0, len(rows), BULK_BATCH_ROWS):
                # one statement per set of given fields: each entry updates only what it
                # gives
                groups: dict[frozenset[str], builtins.list[dict[str, Any]]] = {}
                for given, r in zip(
                    data[start : start + BULK_BATCH_ROWS],
                    rows[start : start + BULK_BATCH_ROWS],
                    strict=True,
                ):
                    groups.setdefault(frozenset(given), []).append(r)
                for given_fields, group in groups.items():
                    await conn.execute(self._upsert_stmt(key, names, given_fields), group)
            if self._bump is not None and "id" in rows[0]:
                await conn.execute(self._bump)
        return len(rows)


def _search_position(payload: bytes, keys: builtins.list[OrderKey]) -> tuple[float, Any]:
    """The (score, id) of the last record of a page, from a verified search token."""
    try:
        value = json.loads(payload)
        score, key = value
        if type(score) not in (int, float):
            raise ValueError
        (last_id,) = decode_token(keys, json.dumps([key]).encode())
    except (ValueError, TypeError):
        raise ValidationError("page_token", "is not a token returned by this search") from None
    return float(score), last_id


def _batches(rows: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """`rows` in slices of `BULK_BATCH_ROWS`."""
    for start in range(0, len(rows), BULK_BATCH_ROWS):
        yield rows[start : start + BULK_BATCH_ROWS]
