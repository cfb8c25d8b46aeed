"""Tables built from models, and the additive-only migration planner.

The planner reads the live schema with SQLAlchemy's inspector, computes every
difference first and applies nothing when any difference is destructive, so a refused
migration leaves the database untouched.
"""

from __future__ import annotations

import decimal
import enum
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Index,
    MetaData,
    Table,
    Text,
    inspect,
    literal,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.schema import CreateIndex, CreateTable, DDLElement
from sqlalchemy.sql.compiler import DDLCompiler
from sqlalchemy.types import TypeEngine

from workflow import MISSING

from ._errors import MigrationError
from ._model import FieldInfo, ModelInfo
from ._search import COLUMN_PREFIX, SearchSpec, search_spec
from ._sqltypes import UTCDateTime, sql_type_for

__all__ = [
    "META",
    "META_TABLE",
    "REGISTRY_TABLE",
    "MigrationPlan",
    "build_table",
    "plan_migration",
]


def _server_default(f: FieldInfo) -> Any:
    d = f.default
    if d is MISSING or d is None:
        return None
    if isinstance(d, enum.Enum):
        d = d.value
    if isinstance(d, bool):
        return literal(d).compile(compile_kwargs={"literal_binds": True}).string
    if isinstance(d, int | float | decimal.Decimal):
        return str(d)
    if isinstance(d, str):
        return d
    return None


def build_table(model: ModelInfo, metadata: MetaData) -> Table:
    """The SQLAlchemy table of a model: one column per field, unique fields as unique
    indexes (they work for ON CONFLICT on both databases and can be added to an existing
    SQLite table, unlike constraints)."""
    cols: list[Column[Any]] = []
    for f in model.fields:
        sa_type = sql_type_for(f.base_type)
        assert sa_type is not None  # parse_model checked it
        sd = _server_default(f)
        cols.append(
            Column(
                f.name,
                sa_type,
                primary_key=f.primary_key,
                nullable=f.nullable,
                autoincrement=f.primary_key and f.base_type is int,
                server_default=sd,
            )
        )
    table = Table(model.table, metadata, *cols)
    for f in model.fields:
        if f.unique:
            Index(f"ux_{model.table}_{f.name}", table.c[f.name], unique=True)
        elif f.indexed:
            Index(f"ix_{model.table}_{f.name}", table.c[f.name])
    for group in model.unique_together:
        Index(f"ux_{model.table}_{'_'.join(group)}", *(table.c[n] for n in group), unique=True)
    for group in model.indexes:
        Index(f"ix_{model.table}_{'_'.join(group)}", *(table.c[n] for n in group))
    spec = search_spec(model)
    if spec is not None:
        table.info["search"] = spec
    return table


#: The table ``enable_model_persistence`` writes model schemas to.
REGISTRY_TABLE = "dataflow_model_registry"


#: DataFlow's own settings table (key/value text), holding the page-token secret.
META_TABLE = "dataflow_meta"
#: Its one table object, in a MetaData of its own (never part of the models' schema).
META = Table(
    META_TABLE,
    MetaData(),
    Column("key", Text, primary_key=True),
    Column("value", Text, nullable=False),
)


def registry_table(metadata: MetaData) -> Table:
    """The model registry table (one row per model, keyed by model name)."""
    return Table(
        REGISTRY_TABLE,
        metadata,
        Column("name", Text, primary_key=True),
        Column("table_name", Text, nullable=False),
        Column("schema_json", Text, nullable=False),
        Column("checksum", Text, nullable=False),
        Column("updated_at", UTCDateTime(), nullable=False),
    )


class AddColumn(DDLElement):
    """``ALTER TABLE ... ADD COLUMN ...``, compiled by the dialect (quoting, types)."""

    def __init__(self, table: Table, column: Column[Any]) -> None:
        self.table = table
        self.column = column


@compiles(AddColumn)
def _compile_add_column(element: AddColumn, compiler: DDLCompiler, **kw: Any) -> str:
    table = compiler.preparer.format_table(element.table)
    spec = compiler.get_column_specification(element.column)
    return f"ALTER TABLE {table} ADD COLUMN {spec}"


@dataclass
class MigrationPlan:
    """What `auto_migrate` will do: additive steps, or the destructive differences that
    make it refuse."""

    create_tables: list[Table] = field(default_factory=list)
    add_columns: list[tuple[Table, Column[Any]]] = field(default_factory=list)
    create_indexes: list[Index] = field(default_factory=list)
    #: search indexes to build (and backfill), and stale ones to drop (`_search`)
    create_search: list[SearchSpec] = field(default_factory=list)
    drop_search: list[tuple[str, str]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.create_tables
            or self.add_columns
            or self.create_indexes
            or self.create_search
            or self.drop_search
        )

    def describe(self) -> list[str]:
        """The additive steps, one line each."""
        out = [f"create table {t.name}" for t in self.create_tables]
        out += [f"add column {t.name}.{c.name}" for t, c in self.add_columns]
        out += [f"create index {i.name}" for i in self.create_indexes]
        out += [s.describe() for s in self.create_search]
        out += [f"drop old search index {name} of {table}" for table, name in self.drop_search]
        return out


def _type_text(tp: TypeEngine[Any], conn: Connection) -> str:
    text = tp.compile(dialect=conn.dialect).upper().replace(" ", "")
    return _ALIASES.get(text, text)


_ALIASES = {
    "TIMESTAMPWITHTIMEZONE": "TIMESTAMPTZ",
    "FLOAT": "DOUBLEPRECISION",
    "FLOAT(53)": "DOUBLEPRECISION",
    "DOUBLE": "DOUBLEPRECISION",
    "INT8": "BIGINT",
    "INTEGER": "INTEGER",
}


def plan_migration(conn: Connection, tables: list[Table]) -> MigrationPlan:
    """Compare `tables` with the live schema (synchronous: run it with `run_sync`)."""
    insp = inspect(conn)
    existing = set(insp.get_table_names())
    plan = MigrationPlan()
    for table in tables:
        spec: SearchSpec | None = table.info.get("search")
        if table.name not in existing:
            plan.create_tables.append(table)
            if spec is not None:
                plan.create_search.append(spec)
            continue
        live = {c["name"]: c for c in insp.get_columns(table.name)}
        _plan_search(conn, table.name, spec, live, existing, plan)
        live = {n: c for n, c in live.items() if not n.startswith(COLUMN_PREFIX)}
        for col in table.columns:
            got = live.get(col.name)
            if got is None:
                if not col.nullable and col.server_default is None:
                    plan.refused.append(
                        f"{table.name}.{col.name}: new column is required and has no default, "
                        f"so it cannot be added to an existing table (give it a default or "
                        f"make it optional)"
                    )
                else:
                    plan.add_columns.append((table, col))
                continue
            want_t = _type_text(col.type, conn)
            have_t = _type_text(got["type"], conn)
            if want_t != have_t:
                plan.refused.append(
                    f"{table.name}.{col.name}: type changed (database {have_t}, model {want_t})"
                )
            if not col.primary_key and bool(got.get("nullable")) != bool(col.nullable):
                have = "NULL" if got.get("nullable") else "NOT NULL"
                want = "NULL" if col.nullable else "NOT NULL"
                plan.refused.append(
                    f"{table.name}.{col.name}: nullability changed (database {have}, model {want})"
                )
        for name in live:
            if name not in table.columns:
                plan.refused.append(
                    f"{table.name}.{name}: column exists in the database but not in the model "
                    f"(dropping it would lose data)"
                )
        if table.indexes:  # reflecting indexes is slow; only when the model has some
            live_idx = {i["name"] for i in insp.get_indexes(table.name)}
            for idx in table.indexes:
                if idx.name not in live_idx:
                    plan.create_indexes.append(idx)
    return plan


def apply_migration(conn: Connection, plan: MigrationPlan) -> None:
    """Apply an additive plan (refuses with MigrationError if anything is destructive)."""
    if plan.refused:
        raise MigrationError(plan.refused)
    for table in plan.create_tables:
        conn.execute(CreateTable(table))
        for idx in table.indexes:
            conn.execute(CreateIndex(idx))
    for table, col in plan.add_columns:
        conn.execute(AddColumn(table, col))
    for idx in plan.create_indexes:
        conn.execute(CreateIndex(idx))
    for table_name, name in plan.drop_search:
        for sql in _drop_search_sql(conn, table_name, name):
            conn.exec_driver_sql(sql)
    for spec in plan.create_search:
        for sql in search_ddl(conn, spec):
            conn.exec_driver_sql(sql)


# -- full-text search objects (see _search) ------------------------------------------

_TRIGGERS = ("ai", "ad", "au")


def _plan_search(
    conn: Connection,
    table: str,
    spec: SearchSpec | None,
    live: dict[str, Any],
    existing: set[str],
    plan: MigrationPlan,
) -> None:
    """The search steps of an existing table: build the model's index when missing,
    drop indexes of an earlier declaration (other fields or configuration)."""
    if conn.dialect.name == "postgresql":
        have = [n for n in live if n.startswith(COLUMN_PREFIX)]
        want = spec.column if spec else None
        plan.drop_search += [(table, n) for n in have if n != want]
        if spec is not None and want not in have:
            plan.create_search.append(spec)
        return
    stale = re.compile(rf"^{re.escape(table)}_fts_[0-9a-f]{{8}}$")
    have = [n for n in existing if stale.match(n)]
    want = spec.fts_table if spec else None
    plan.drop_search += [(table, n) for n in have if n != want]
    if spec is not None and want not in have:
        plan.create_search.append(spec)


#: A token put between fields and deleted from the vector again: it leaves a gap in the
#: positions, so a phrase never matches across two fields (as on SQLite, where each
#: field is a column of its own).
_FIELD_GAP = "90000000000000000009"


def _expression(conn: Connection, spec: SearchSpec) -> str:
    """PostgreSQL: the tsvector of a record, its text split like FTS5's tokenizer (on
    anything but letters and digits) so both databases find the same words."""
    q = conn.dialect.identifier_preparer.quote
    text = f" || ' {_FIELD_GAP} ' || ".join(f"coalesce({q(n)}, '')" for n in spec.fields)
    return (
        f"ts_delete(to_tsvector('{spec.config}'::regconfig, "
        f"regexp_replace({text}, '[^[:alnum:]]+', ' ', 'g')), '{_FIELD_GAP}'::text)"
    )


def search_ddl(conn: Connection, spec: SearchSpec) -> list[str]:
    """The statements that create a search index and fill it from the existing rows."""
    q = conn.dialect.identifier_preparer.quote
    t = q(spec.table)
    if conn.dialect.name == "postgresql":
        # a stored generated column: PostgreSQL computes it for the existing rows now
        # and for every write later; ranking reads it instead of re-parsing the text
        return [
            f"ALTER TABLE {t} ADD COLUMN {q(spec.column)} tsvector "
            f"GENERATED ALWAYS AS ({_expression(conn, spec)}) STORED",
            f"CREATE INDEX {q(spec.index)} ON {t} USING GIN ({q(spec.column)})",
        ]
    fts = q(spec.fts_table)
    cols = ", ".join(q(n) for n in spec.fields)
    new = ", ".join(f"new.{q(n)}" for n in spec.fields)
    old = ", ".join(f"old.{q(n)}" for n in spec.fields)
    tokenizer = "unicode61 remove_diacritics 0"
    if spec.config == "english":
        tokenizer = "porter " + tokenizer
    insert_new = f"INSERT INTO {fts}(rowid, {cols}) VALUES (new.rowid, {new});"
    delete_old = f"INSERT INTO {fts}({fts}, rowid, {cols}) VALUES ('delete', old.rowid, {old});"
    trig = [q(f"{spec.fts_table}_{s}") for s in _TRIGGERS]
    return [
        f"CREATE VIRTUAL TABLE {fts} USING fts5({cols}, content='{spec.table}', "
        f"content_rowid='rowid', tokenize='{tokenizer}')",
        f"CREATE TRIGGER {trig[0]} AFTER INSERT ON {t} BEGIN {insert_new} END",
        f"CREATE TRIGGER {trig[1]} AFTER DELETE ON {t} BEGIN {delete_old} END",
        f"CREATE TRIGGER {trig[2]} AFTER UPDATE OF {cols} ON {t} BEGIN {delete_old} "
        f"{insert_new} END",
        f"INSERT INTO {fts}({fts}) VALUES ('rebuild')",
    ]


def _drop_search_sql(conn: Connection, table: str, name: str) -> list[str]:
    q = conn.dialect.identifier_preparer.quote
    if conn.dialect.name == "postgresql":
        return [f"ALTER TABLE {q(table)} DROP COLUMN {q(name)}"]
    return [f"DROP TRIGGER IF EXISTS {q(f'{name}_{s}')}" for s in _TRIGGERS] + [
        f"DROP TABLE {q(name)}"
    ]
