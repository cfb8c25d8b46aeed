"""Reading a model class into `ModelInfo`: the metadata every other layer builds on.

`ModelInfo` and `FieldInfo` are the introspection API: the server builds typed protobuf
messages and gRPC services from them, the node generator builds node parameters from
them, and the schema layer builds tables from them. They are frozen and hold only plain
Python types, never SQLAlchemy objects.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from workflow import MISSING
from workflow._types import base_type, check_value, is_nullable

from ._errors import ModelError
from ._sqltypes import SQL_TYPES, sql_type_for

__all__ = ["FieldInfo", "ModelInfo", "field", "parse_model"]

#: Fields DataFlow adds to every model and maintains itself.
MANAGED_FIELDS = ("created_at", "updated_at")
#: Node parameter names that model fields may not use (they would collide).
RESERVED_NAMES = frozenset({"conflict_on", *MANAGED_FIELDS})
#: Text-search configurations a model's search may use (``__search_config__``), the
#: default first. ``"english"`` stems words (PostgreSQL's english configuration, SQLite
#: FTS5's porter tokenizer) and, on PostgreSQL, drops stop words.
SEARCH_CONFIGS = ("simple", "english")


@dataclass(frozen=True)
class _FieldSpec:
    default: Any
    unique: bool
    index: bool
    description: str
    searchable: bool
    tenant: bool


#: The tenant field's name when a model is declared ``tenant_scoped=True`` without one.
TENANT_FIELD = "tenant_id"
#: Why a caller may not set the tenant field (the reason of that ValidationError).
TENANT_REASON = "set by the server from the caller's tenant"


def field(
    default: Any = MISSING,
    *,
    unique: bool = False,
    index: bool = False,
    description: str = "",
    searchable: bool = False,
    tenant: bool = False,
) -> Any:
    """Declare a model field's options where a plain default is not enough.

    ```python
    @db.model
    class User:
        id: str
        email: str = field(unique=True, description="login address")
        team: str | None = field(default=None, index=True)
    ```

    Args:
        default: the field's default (a column default too). Omit for a required field.
        unique: a unique index on this field; makes it usable as an upsert `conflict_on`.
        index: a plain index on this field.
        description: carried into node parameter descriptions and generated schemas.
        searchable: part of the model's full-text search (a ``str`` field only; see
            ``{Model}SearchNode`` and `ModelOps.search`).
        tenant: this field holds the record's tenant and makes the model tenant-scoped
            (as ``@db.model(tenant_scoped=True)`` does): a ``str`` field without a
            default, set by DataFlow from `current_tenant` and never by a caller.
    """
    return _FieldSpec(default, unique, index, description, searchable, tenant)


@dataclass(frozen=True)
class FieldInfo:
    """One field of a model.

    Attributes:
        name: the field (and column) name.
        type: the Python annotation, e.g. ``str``, ``int | None``, ``Decimal``.
        base_type: the annotation without ``| None``.
        nullable: whether None is a valid value.
        default: the default value, or `workflow.MISSING` when the field is required.
            A nullable field without a default defaults to None.
        primary_key: True for ``id`` only.
        unique: the field has a unique index of its own.
        indexed: the field has a plain index of its own.
        managed: True for ``created_at``/``updated_at`` (set by DataFlow, read-only).
        generated: the primary key is generated when omitted (UUID text or autoincrement).
        description: free text.
        searchable: the field is part of the model's full-text search.
        tenant: the field holds the record's tenant (`ModelInfo.tenant_field`): DataFlow
            sets it from the current tenant; a caller can read it, never set it.
    """

    name: str
    type: Any
    base_type: Any
    nullable: bool
    default: Any
    primary_key: bool = False
    unique: bool = False
    indexed: bool = False
    managed: bool = False
    generated: bool = False
    description: str = ""
    searchable: bool = False
    tenant: bool = False

    @property
    def required(self) -> bool:
        """Whether a create must supply this field."""
        return (
            self.default is MISSING and not self.nullable and not self.generated and not self.tenant
        )

    @property
    def sql_type(self) -> str:
        """A short description of the column type used (for docs and error messages)."""
        for matches, _, text in SQL_TYPES:
            if matches(self.base_type):
                return text
        return "?"

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (type given by name)."""
        bt = self.base_type
        out = {
            "name": self.name,
            "type": bt.__name__ if isinstance(bt, type) else repr(bt),
            "enum_values": [m.value for m in bt]
            if isinstance(bt, type) and issubclass(bt, enum.Enum)
            else None,
            "nullable": self.nullable,
            "default": None if self.default is MISSING else _jsonable(self.default),
            "has_default": self.default is not MISSING,
            "primary_key": self.primary_key,
            "unique": self.unique,
            "indexed": self.indexed,
            "managed": self.managed,
            "generated": self.generated,
            "description": self.description,
        }
        if self.searchable:  # only then, so earlier descriptions stay the same
            out["searchable"] = True
        if self.tenant:  # likewise
            out["tenant"] = True
        return out


@dataclass(frozen=True)
class ModelInfo:
    """A declared model.

    Attributes:
        name: the class name (node types are named after it: ``<name>CreateNode``...).
        table: the table name.
        fields: every field in declaration order, ``id`` first and ``created_at``,
            ``updated_at`` last.
        indexes: extra (composite) indexes, each a tuple of field names.
        unique_together: composite unique constraints, each a tuple of field names.
        cls: the declared class.
        description: the class docstring's first paragraph.
        search_config: the text-search configuration of the model's full-text search
            (``__search_config__``: ``"simple"``, the default, or ``"english"``).
        tenant_field: the name of the field holding each record's tenant when the model
            is tenant-scoped (``@db.model(tenant_scoped=True)`` or a field declared with
            ``field(tenant=True)``), else None. Every operation on a tenant-scoped model
            sees only the current tenant's rows (`dataflow.tenant_scope`).
    """

    name: str
    table: str
    fields: tuple[FieldInfo, ...]
    indexes: tuple[tuple[str, ...], ...]
    unique_together: tuple[tuple[str, ...], ...]
    cls: type[Any] = dataclasses.field(compare=False)
    description: str = dataclasses.field(default="", compare=False)
    search_config: str = SEARCH_CONFIGS[0]
    tenant_field: str | None = None

    @property
    def searchable_fields(self) -> tuple[FieldInfo, ...]:
        """The fields of the full-text search, in declaration order (empty: the model
        has no search)."""
        return tuple(f for f in self.fields if f.searchable)

    @property
    def field_map(self) -> Mapping[str, FieldInfo]:
        """Fields by name."""
        return {f.name: f for f in self.fields}

    @property
    def primary_key(self) -> FieldInfo:
        """The ``id`` field."""
        return self.fields[0]

    @property
    def writable_fields(self) -> tuple[FieldInfo, ...]:
        """The fields a caller may set: every field except the managed timestamps and
        the tenant field."""
        return tuple(f for f in self.fields if not f.managed and not f.tenant)

    @property
    def unique_keys(self) -> tuple[tuple[str, ...], ...]:
        """Every field set that identifies a record: ``("id",)``, each unique field,
        each ``__unique__`` group. These are the valid upsert ``conflict_on`` values.
        On a tenant-scoped model each is unique within a tenant (the database's
        constraints include the tenant field, which ``conflict_on`` never names)."""
        keys: list[tuple[str, ...]] = [("id",)]
        keys += [(f.name,) for f in self.fields if f.unique]
        keys += list(self.unique_together)
        return tuple(keys)

    def signature(self) -> tuple[Any, ...]:
        """What makes two declarations the same model (used to accept re-declaration)."""
        return (
            self.table,
            self.fields,
            self.indexes,
            self.unique_together,
            self.search_config,
            self.tenant_field,
        )

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description, as stored by ``enable_model_persistence``."""
        return {
            "name": self.name,
            "table": self.table,
            "description": self.description,
            "fields": [f.describe() for f in self.fields],
            "indexes": [list(i) for i in self.indexes],
            "unique": [list(u) for u in self.unique_together],
            **({"search_config": self.search_config} if self.searchable_fields else {}),
            **({"tenant_field": self.tenant_field} if self.tenant_field else {}),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, dict | list):
        return value
    return str(value)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def parse_model(
    cls: type[Any], localns: Mapping[str, Any] | None = None, *, tenant_scoped: bool = False
) -> ModelInfo:
    """Read a class's annotations into a ModelInfo.

    Args:
        tenant_scoped: the model is tenant-scoped; its tenant field is the one declared
            with ``field(tenant=True)``, else a declared ``tenant_id: str``, else a
            ``tenant_id`` field added after the declared ones. A field declared with
            ``field(tenant=True)`` makes a model tenant-scoped without this.

    Raises:
        ModelError: naming the class and field, for an annotation with no column type,
            a bad default, a missing or badly typed ``id``, or a bad index option.
    """
    cname = cls.__name__
    if not _NAME.match(cname):
        raise ModelError(f"model class name {cname!r} must be a plain identifier")
    try:
        hints = typing.get_type_hints(
            cls, globalns=vars(sys.modules.get(cls.__module__, typing)), localns=dict(localns or {})
        )
    except Exception as exc:
        raise ModelError(f"model {cname}: cannot resolve its annotations: {exc}") from None
    own = [n for n in getattr(cls, "__annotations__", {}) if not n.startswith("__")]
    names = [n for n in hints if n in own or not n.startswith("_")]
    names = [n for n in names if typing.get_origin(hints[n]) is not typing.ClassVar]
    if "id" not in names:
        raise ModelError(f"model {cname}: declare a primary key field 'id: str' or 'id: int'")
    names.remove("id")
    names.insert(0, "id")
    opt_in = _search_opt_in(cls)
    fields: list[FieldInfo] = []
    for name in names:
        fields.append(_parse_field(cname, name, hints[name], cls.__dict__.get(name, MISSING)))
    tenant_field = _tenant_field(cname, fields, tenant_scoped)
    if opt_in:  # after the tenant field is known: it is never searchable
        fields = [
            dataclasses.replace(f, searchable=True)
            if f.base_type is str and not f.primary_key and not f.tenant
            else f
            for f in fields
        ]
    now = dt.datetime
    for m in MANAGED_FIELDS:
        fields.append(FieldInfo(m, now, now, nullable=False, default=MISSING, managed=True))
    field_names = {f.name for f in fields}
    indexes = _groups(cls, "__indexes__", field_names)
    unique_together = _groups(cls, "__unique__", field_names)
    table = getattr(cls, "__tablename__", None) or _snake(cname)
    if not isinstance(table, str) or not _NAME.match(table):
        raise ModelError(f"model {cname}: __tablename__ {table!r} must be a plain identifier")
    doc = (cls.__doc__ or "").strip().split("\n\n", 1)[0].replace("\n", " ")
    config = getattr(cls, "__search_config__", SEARCH_CONFIGS[0])
    if config not in SEARCH_CONFIGS:
        raise ModelError(
            f"model {cname}: __search_config__ {config!r} is not one of "
            f"{', '.join(map(repr, SEARCH_CONFIGS))}"
        )
    return ModelInfo(
        cname, table, tuple(fields), indexes, unique_together, cls, doc, config, tenant_field
    )


def _tenant_field(cname: str, fields: list[FieldInfo], tenant_scoped: bool) -> str | None:
    """The name of the tenant field (marking or adding it in `fields`), or None."""
    if not isinstance(tenant_scoped, bool):
        raise ModelError(f"model {cname}: tenant_scoped must be True or False")
    marked = [f.name for f in fields if f.tenant]
    if len(marked) > 1:
        raise ModelError(
            f"model {cname}: only one field can hold the tenant (marked: {', '.join(marked)})"
        )
    if marked:
        return marked[0]
    if not tenant_scoped:
        return None
    for i, f in enumerate(fields):
        if f.name == TENANT_FIELD:
            _check_tenant_field(cname, f.name, f.type, f.default, f.unique, f.searchable)
            fields[i] = dataclasses.replace(f, tenant=True, indexed=True)
            return f.name
    fields.append(
        FieldInfo(
            TENANT_FIELD,
            str,
            str,
            nullable=False,
            default=MISSING,
            indexed=True,
            description="the tenant the record belongs to (set by the server)",
            tenant=True,
        )
    )
    return TENANT_FIELD


def _check_tenant_field(
    cname: str, name: str, tp: Any, default: Any, unique: bool, searchable: bool
) -> None:
    where = f"model {cname}, field {name!r}"
    if tp is not str:
        raise ModelError(f"{where}: the tenant field must be declared 'str' (not {tp!r})")
    if name == "id":
        raise ModelError(f"{where}: the primary key cannot be the tenant field")
    if default is not MISSING:
        raise ModelError(f"{where}: the tenant field cannot have a default ({TENANT_REASON})")
    if unique or searchable:
        raise ModelError(
            f"{where}: the tenant field cannot be unique or searchable (unique fields are "
            f"unique within a tenant)"
        )


def _search_opt_in(cls: type[Any]) -> bool:
    """``__searchable__ = True``: every ``str`` field (except ``id``) is searchable."""
    value = getattr(cls, "__searchable__", False)
    if not isinstance(value, bool):
        raise ModelError(
            f"model {cls.__name__}: __searchable__ must be True or False (mark single "
            f"fields with field(searchable=True))"
        )
    return value


def _parse_field(cname: str, name: str, tp: Any, raw_default: Any) -> FieldInfo:
    where = f"model {cname}, field {name!r}"
    if not _NAME.match(name):
        raise ModelError(f"{where}: field names must be plain identifiers")
    if name in RESERVED_NAMES or name.startswith("dataflow_search_"):
        raise ModelError(f"{where}: the name is reserved by DataFlow")
    spec = raw_default if isinstance(raw_default, _FieldSpec) else None
    default = spec.default if spec else raw_default
    try:
        bt = base_type(tp)
        nullable = is_nullable(tp)
    except TypeError:
        bt, nullable = None, False
    if typing.get_origin(tp) in (list, dict):
        bt = typing.get_origin(tp)
    if bt is None or sql_type_for(bt) is None:
        raise ModelError(
            f"{where}: type {tp!r} has no column type (supported: str, int, float, bool, "
            f"bytes, Decimal, datetime, date, UUID, Enum with str or int values, dict, list, "
            f"and 'X | None')"
        )
    if nullable and default is MISSING:
        default = None
    if default is not MISSING:
        if isinstance(default, dict | list):
            raise ModelError(f"{where}: a mutable default is shared by every record; omit it")
        try:
            default = check_value(tp, default)
        except TypeError as exc:
            raise ModelError(f"{where}: default {default!r}: {exc}") from None
    primary = name == "id"
    if spec and spec.tenant:
        _check_tenant_field(cname, name, tp, default, spec.unique, spec.searchable)
    if spec and spec.searchable and (bt is not str or primary):
        raise ModelError(f"{where}: only a str field other than id can be searchable (not {tp!r})")
    if primary:
        if bt not in (str, int) or nullable:
            raise ModelError(f"{where}: the primary key must be 'str' or 'int' (not {tp!r})")
        if default is not MISSING:
            raise ModelError(f"{where}: the primary key cannot have a default")
    return FieldInfo(
        name=name,
        type=tp,
        base_type=bt,
        nullable=nullable,
        default=default,
        primary_key=primary,
        unique=bool(spec and spec.unique) and not primary,
        indexed=bool(spec and (spec.index or spec.tenant)) and not primary,
        generated=primary,
        description=spec.description if spec else "",
        searchable=bool(spec and spec.searchable),
        tenant=bool(spec and spec.tenant),
    )


def _groups(cls: type[Any], attr: str, names: set[str]) -> tuple[tuple[str, ...], ...]:
    raw = getattr(cls, attr, ())
    out: list[tuple[str, ...]] = []
    if not isinstance(raw, list | tuple):
        raise ModelError(f"model {cls.__name__}: {attr} must be a list of field tuples")
    for g in raw:
        group = (g,) if isinstance(g, str) else tuple(g)
        if not group:
            raise ModelError(f"model {cls.__name__}: {attr} contains an empty group")
        for n in group:
            if n not in names:
                raise ModelError(f"model {cls.__name__}: {attr} names unknown field {n!r}")
        out.append(group)
    return tuple(out)
