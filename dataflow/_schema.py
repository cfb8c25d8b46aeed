"""Tables built from models, and the additive-only migration planner.

The planner reads the live schema with SQLAlchemy's inspector, computes every
difference first and applies nothing when any difference is destructive, so a refused
migration leaves the database untouched.
"""

from __future__ import annotations

import decimal
import enum
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
    refused: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.create_tables or self.add_columns or self.create_indexes)

    def describe(self) -> list[str]:
        """The additive steps, one line each."""
        out = [f"create table {t.name}" for t in self.create_tables]
        out += [f"add column {t.name}.{c.name}" for t, c in self.add_columns]
        out += [f"create index {i.name}" for i in self.create_indexes]
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
        if table.name not in existing:
            plan.create_tables.append(table)
            continue
        live = {c["name"]: c for c in insp.get_columns(table.name)}
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
