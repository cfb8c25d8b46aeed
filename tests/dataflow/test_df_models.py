"""Model declaration, the type table, introspection and node generation (no database I/O)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest

from dataflow import (
    NODE_KINDS,
    DatabaseError,
    DataFlow,
    DataFlowError,
    FieldInfo,
    ModelError,
    ValidationError,
    field,
)
from workflow import MISSING, RegistryError, WorkflowBuilder, get_node_class, node_types

UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"


async def test_declaring_models_does_no_io(declare_contact: Any) -> None:
    db = DataFlow(UNREACHABLE)
    try:
        declare_contact(db)
        assert "ContactCreateNode" in node_types()
    finally:
        await db.close()


async def test_every_node_type_is_registered_and_close_unregisters_them(
    declare_contact: Any,
) -> None:
    db = DataFlow(UNREACHABLE)
    declare_contact(db)
    names = [f"Contact{k}" for k in NODE_KINDS]
    assert len(names) == 12
    assert set(db.node_types("Contact")) == set(names)
    for n in names:
        assert get_node_class(n) is db.node_types()[n]
    await db.close()
    for n in names:
        with pytest.raises(RegistryError):
            get_node_class(n)
    # so a new instance may declare the same model again
    db2 = DataFlow(UNREACHABLE)
    declare_contact(db2)
    await db2.close()


async def test_second_open_instance_cannot_take_the_node_names(declare_contact: Any) -> None:
    db = DataFlow(UNREACHABLE)
    db2 = DataFlow(UNREACHABLE)
    try:
        declare_contact(db)
        with pytest.raises(ModelError, match="already registered"):
            declare_contact(db2)
    finally:
        await db.close()
        await db2.close()


async def test_node_parameters_carry_the_model_types(declare_contact: Any) -> None:
    db = DataFlow(UNREACHABLE)
    try:
        declare_contact(db)
        create = get_node_class("ContactCreateNode")
        assert create.parameters["email"].type is str
        assert create.parameters["email"].required
        assert create.parameters["score"].type is int
        assert create.parameters["score"].default == 0
        assert create.parameters["company"].type == (str | None)
        assert not create.parameters["id"].required
        assert create.outputs["created_at"].type is dt.datetime
        # a whole-value placeholder takes the parameter's type
        wf = WorkflowBuilder()
        wf.add_node("ContactCreateNode", "c", {"name": "{{name}}", "email": "{{email}}"})
        wf.add_node("ContactReadNode", "r", {})
        wf.add_connection("c", "id", "r", "id")
        w = wf.build()
        assert w.inputs["email"].type is str
        assert w.inputs["email"].required
        # a str where the int score goes is refused at build time
        bad = WorkflowBuilder()
        bad.add_node("ContactCreateNode", "c", {"name": "n", "email": "e", "score": "abc"})
        with pytest.raises(Exception, match="score"):
            bad.build()
    finally:
        await db.close()


async def test_introspection_api() -> None:
    db = DataFlow(UNREACHABLE)
    try:

        @db.model
        class Product:
            """Things we sell."""

            id: int
            sku: str = field(unique=True, description="stock keeping unit")
            price: Decimal = Decimal("9.99")
            note: str | None = None
            category: str = field(default="misc", index=True)
            __indexes__ = [("category", "price")]
            __unique__ = [("sku", "category")]

        (info,) = db.models
        assert info is db.model_info(Product) is db.model_info("Product")
        assert info.name == "Product" and info.table == "product"
        assert info.description == "Things we sell."
        names = [f.name for f in info.fields]
        assert names == ["id", "sku", "price", "note", "category", "created_at", "updated_at"]
        f: dict[str, FieldInfo] = dict(info.field_map)
        assert f["id"].primary_key and f["id"].generated and f["id"].base_type is int
        assert f["sku"].unique and f["sku"].required and f["sku"].description
        assert f["price"].default == Decimal("9.99") and not f["price"].required
        assert f["note"].nullable and f["note"].default is None and f["note"].base_type is str
        assert f["category"].indexed
        assert f["created_at"].managed and f["created_at"].default is MISSING
        assert info.unique_keys == (("id",), ("sku",), ("sku", "category"))
        desc = db.describe()[0]
        assert desc["fields"][2] == {
            "name": "price",
            "type": "Decimal",
            "enum_values": None,
            "nullable": False,
            "default": "9.99",
            "has_default": True,
            "primary_key": False,
            "unique": False,
            "indexed": False,
            "managed": False,
            "generated": False,
            "description": "",
        }
    finally:
        await db.close()


async def test_unknown_annotation_names_class_field_and_type() -> None:
    db = DataFlow(UNREACHABLE)
    try:
        with pytest.raises(ModelError) as ei:

            @db.model
            class Weird:
                id: str
                shape: complex

        msg = str(ei.value)
        assert "Weird" in msg and "'shape'" in msg and "complex" in msg
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("annotations", "match"),
    [
        ({"name": str}, "primary key"),
        ({"id": float}, "primary key must be"),
        ({"id": str, "created_at": str}, "reserved"),
        ({"id": str, "n": int | str}, "no column type"),
    ],
)
async def test_bad_models_are_refused(annotations: dict[str, Any], match: str) -> None:
    db = DataFlow(UNREACHABLE)
    try:
        cls = type("Bad", (), {"__annotations__": annotations})
        with pytest.raises(ModelError, match=match):
            db.model(cls)
    finally:
        await db.close()


async def test_bad_default_is_refused() -> None:
    db = DataFlow(UNREACHABLE)
    try:
        with pytest.raises(ModelError, match="'score'"):

            @db.model
            class Bad:
                id: str
                score: int = "high"  # type: ignore[assignment]

    finally:
        await db.close()


async def test_redeclaring_same_fields_is_a_noop_and_different_fields_an_error(
    declare_contact: Any,
) -> None:
    db = DataFlow(UNREACHABLE)
    try:
        declare_contact(db)
        before = db.node_types()
        declare_contact(db)
        assert db.node_types() == before
        assert len(db.models) == 1
        with pytest.raises(ModelError, match="different fields"):

            @db.model
            class Contact:
                id: str
                name: str

    finally:
        await db.close()


def test_unsupported_url() -> None:
    with pytest.raises(ValidationError, match="database_url"):
        DataFlow("mysql://x@y/z")


async def test_url_mapping() -> None:
    db = DataFlow("postgresql://postgres:secret@127.0.0.1:5432/test")
    try:
        assert db.dialect == "postgresql"
        assert "asyncpg" in db.url and "secret" not in db.url
    finally:
        await db.close()
    db = DataFlow("sqlite:///:memory:")
    try:
        assert db.dialect == "sqlite" and "aiosqlite" in db.url
    finally:
        await db.close()


async def test_in_memory_sqlite_keeps_data_across_operations(declare_contact: Any) -> None:
    async with DataFlow("sqlite:///:memory:") as db:
        Contact = declare_contact(db)
        ops = db.ops(Contact)
        await ops.create(id="m1", name="Ada", email="a@x")
        await ops.bulk_create([{"name": "B", "email": "b@x"}])
        async with db.transaction():
            await ops.update("m1", fields={"score": 2})
        assert (await ops.read("m1"))["score"] == 2
        assert await ops.count() == 2


async def test_unreachable_database_is_a_dataflow_error(declare_contact: Any) -> None:
    db = DataFlow(UNREACHABLE)
    try:
        Contact = declare_contact(db)
        with pytest.raises(DatabaseError) as ei:
            await db.ops(Contact).count()
        assert "the database is unreachable" in str(ei.value)
        assert "Error" not in str(ei.value) and "127.0.0.1" not in str(ei.value)
    finally:
        await db.close()


async def test_closed_instance_refuses_work(declare_contact: Any) -> None:
    db = DataFlow("sqlite:///:memory:")
    Contact = declare_contact(db)
    await db.initialize()
    await db.close()
    with pytest.raises(DataFlowError, match="closed"):
        await db.ops(Contact).count()
