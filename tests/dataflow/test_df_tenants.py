"""Tenant-scoped models: every operation sees and writes only the current tenant's rows.

Two tenants, "acme" and "globex", on SQLite and PostgreSQL: each test checks that what
one tenant does is invisible to, and untouchable by, the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from dataflow import (
    AlreadyExistsError,
    DataFlow,
    MigrationError,
    ModelError,
    NotFoundError,
    TenantRequired,
    ValidationError,
    current_tenant,
    field,
    tenant_scope,
)
from workflow import AsyncLocalRuntime, NodeExecutionError, WorkflowBuilder

MakeDB = Callable[..., DataFlow]

A, B = "acme", "globex"
NO_TENANT = r"^model Note is tenant-scoped: this call has no tenant$"


def _declare(db: DataFlow) -> tuple[type[Any], type[Any], type[Any]]:
    @db.model(tenant_scoped=True)
    class Note:
        id: str
        title: str
        email: str = field(unique=True)
        score: int = 0
        body: str = field(default="", searchable=True)

    @db.model
    class Seq:
        id: int
        tenant_id: str = field(tenant=True)
        name: str = ""
        code: str = ""
        __unique__ = [("name", "code")]

    @db.model
    class Plain:
        id: int
        name: str

    return Note, Seq, Plain


@pytest.fixture
async def models(make_db: MakeDB) -> tuple[DataFlow, type[Any], type[Any], type[Any]]:
    db = make_db()
    note, seq, plain = _declare(db)
    await db.initialize()
    return db, note, seq, plain


Models = tuple[DataFlow, type[Any], type[Any], type[Any]]


# -- declaring --------------------------------------------------------------------------


async def test_declaring_a_tenant_scoped_model() -> None:
    db = DataFlow("sqlite:///:memory:")
    try:
        note, seq, plain = _declare(db)
        info = db.model_info(note)
        assert info.tenant_field == "tenant_id"
        tf = info.field_map["tenant_id"]
        assert tf.tenant and tf.indexed and not tf.nullable and tf.base_type is str
        assert not tf.required and not tf.primary_key and info.primary_key.name == "id"
        assert "tenant_id" not in {f.name for f in info.writable_fields}
        # added after the declared fields, before the managed timestamps
        assert [f.name for f in info.fields][-3:] == ["tenant_id", "created_at", "updated_at"]
        described = info.describe()
        assert described["tenant_field"] == "tenant_id"
        assert {"name": "tenant_id", "tenant": True}.items() <= next(
            f for f in described["fields"] if f["name"] == "tenant_id"
        ).items()
        # declared with field(tenant=True): the field where the class put it
        seq_info = db.model_info(seq)
        assert seq_info.tenant_field == "tenant_id"
        assert [f.name for f in seq_info.fields][:2] == ["id", "tenant_id"]

        # a model that is not tenant-scoped says so, and its description is as before
        @db.model(tenant_scoped=True)
        class Everything:
            id: str
            tenant_id: str
            text: str = ""
            __searchable__ = True

        everything = db.model_info(Everything)
        assert [f.name for f in everything.searchable_fields] == ["text"]
        assert everything.tenant_field == "tenant_id"
        plain_info = db.model_info(plain)
        assert plain_info.tenant_field is None
        assert "tenant_field" not in plain_info.describe()
        assert all("tenant" not in f for f in plain_info.describe()["fields"])
        # the tenant is part of the signature: the same class unscoped is another model
        with pytest.raises(ModelError, match="tenant"):

            @db.model
            class Note:  # a redeclaration, on purpose
                id: str
                title: str
                email: str = field(unique=True)
                score: int = 0
                body: str = field(default="", searchable=True)

        # the same declaration again is accepted
        _ = note

        @db.model(tenant_scoped=True)
        class Note:  # type: ignore[no-redef]
            id: str
            title: str
            email: str = field(unique=True)
            score: int = 0
            body: str = field(default="", searchable=True)
    finally:
        await db.close()


class IntTenant:
    id: str
    tenant_id: int = field(tenant=True)


class NullableTenant:
    id: str
    tenant_id: str | None = field(tenant=True)


class DefaultTenant:
    id: str
    tenant_id: str = field(default="x", tenant=True)


class UniqueTenant:
    id: str
    tenant_id: str = field(unique=True, tenant=True)


class TwoTenants:
    id: str
    t1: str = field(tenant=True)
    t2: str = field(tenant=True)


class PlainTenantWithDefault:
    id: str
    tenant_id: str = "x"


@pytest.mark.parametrize(
    ("cls", "scoped", "match"),
    [
        (IntTenant, False, "must be declared 'str'"),
        (NullableTenant, False, "must be declared 'str'"),
        (DefaultTenant, False, "cannot have a default"),
        (UniqueTenant, False, "cannot be unique"),
        (TwoTenants, False, "only one field"),
        (PlainTenantWithDefault, True, "cannot have a default"),
    ],
)
async def test_bad_tenant_declarations(cls: type[Any], scoped: bool, match: str) -> None:
    db = DataFlow("sqlite:///:memory:")
    try:
        with pytest.raises(ModelError, match=match):
            db.model(tenant_scoped=scoped)(cls)
        assert not db.models
    finally:
        await db.close()


# -- the current tenant -----------------------------------------------------------------


async def test_tenant_scope_nests_restores_and_reaches_tasks() -> None:
    assert current_tenant() is None
    with tenant_scope(A) as t:
        assert t == A and current_tenant() == A
        with tenant_scope(B):
            assert current_tenant() == B
            with tenant_scope(None):
                assert current_tenant() is None
            assert current_tenant() == B
        assert current_tenant() == A
        with pytest.raises(RuntimeError), tenant_scope(B):
            raise RuntimeError("boom")
        assert current_tenant() == A  # restored when the block raised

        async def seen() -> str | None:
            return current_tenant()

        assert await asyncio.create_task(seen()) == A
    assert current_tenant() is None
    assert await asyncio.create_task(seen()) is None
    for bad in ("", "x" * 257, "a\x00b", 5):
        with pytest.raises(ValidationError) as ei:
            tenant_scope(bad)  # type: ignore[arg-type]
        assert ei.value.field == "tenant"


# -- operations -------------------------------------------------------------------------


async def test_single_record_operations_see_one_tenant(models: Models) -> None:
    db, Note, _, _ = models
    ops = db.ops(Note)
    with tenant_scope(A):
        a = await ops.create(title="a", email="a@x", body="apples and pears")
        assert a["tenant_id"] == A
        assert (await ops.read(a["id"]))["title"] == "a"
    with tenant_scope(B):
        b = await ops.create(title="b", email="b@x", body="bananas")
        with pytest.raises(NotFoundError):
            await ops.read(a["id"])
        with pytest.raises(NotFoundError):
            await ops.update(a["id"], fields={"title": "stolen"})
        with pytest.raises(NotFoundError):
            await ops.update(filter={"email": "a@x"}, fields={"title": "stolen"})
        with pytest.raises(NotFoundError):
            await ops.delete(a["id"])
        assert await ops.count() == 1
        assert await ops.count({"email": "a@x"}) == 0
        # a filter naming the tenant is ANDed with the current one: harmless
        assert await ops.count({"tenant_id": A}) == 0
        listed = await ops.list({"tenant_id": A})
        assert listed["records"] == []
        assert [r["id"] for r in (await ops.list())["records"]] == [b["id"]]
        found = await ops.search("apples")
        assert found["records"] == []
        assert [r["id"] for r in (await ops.search())["records"]] == [b["id"]]
        # one record by filter: the other tenant's never makes it ambiguous
        only = await ops.update(filter={}, fields={"score": 2}, all=True)
        assert only["id"] == b["id"]
    with tenant_scope(A):
        got = await ops.read(a["id"])
        assert (got["title"], got["score"], got["tenant_id"]) == ("a", 0, A)
        assert [r["id"] for r in (await ops.search("apples"))["records"]] == [a["id"]]
        upd = await ops.update(a["id"], fields={"score": 5})
        assert (upd["score"], upd["tenant_id"]) == (5, A)
        assert await ops.delete(a["id"]) == 1
        assert await ops.count() == 0
    with tenant_scope(B):
        assert await ops.count() == 1


async def test_the_same_operations_inside_a_transaction(models: Models) -> None:
    """The SQLAlchemy path (no fast path inside a transaction) filters the same way, and
    tenant_scope works inside transaction() blocks."""
    db, Note, Seq, _ = models
    ops, seq = db.ops(Note), db.ops(Seq)
    with tenant_scope(A):
        a = await ops.create(title="a", email="a@x")
    async with db.transaction():
        with tenant_scope(B):
            with pytest.raises(NotFoundError):
                await ops.read(a["id"])
            with pytest.raises(NotFoundError):
                await ops.update(a["id"], fields={"title": "stolen"})
            with pytest.raises(NotFoundError):
                await ops.delete(a["id"])
            b = await ops.create(title="b", email="a@x")  # same email, other tenant
            assert b["tenant_id"] == B
            s1 = await seq.create(name="one")
            s2 = await seq.create(name="two")
            assert s2["id"] == s1["id"] + 1
        with tenant_scope(A):
            assert (await ops.read(a["id"]))["title"] == "a"
            assert await ops.count() == 1
    with pytest.raises(RuntimeError):
        async with db.transaction():
            with tenant_scope(A):
                await ops.create(title="gone", email="gone@x")
                raise RuntimeError("roll back")
    with tenant_scope(A):
        assert await ops.count() == 1
    with tenant_scope(B):
        assert await ops.count() == 1 and await seq.count() == 2


async def test_bulk_operations_touch_one_tenant(models: Models) -> None:
    db, Note, _, _ = models
    ops = db.ops(Note)
    with tenant_scope(A):
        assert await ops.bulk_create([{"title": f"a{i}", "email": f"{i}@x"} for i in range(3)])
        a_ids = [r["id"] for r in (await ops.list())["records"]]
    with tenant_scope(B):
        assert await ops.bulk_create([{"title": f"b{i}", "email": f"{i}@x"} for i in range(2)])
        assert await ops.bulk_update(filter={}, fields={"score": 1}, all=True) == 2
        with pytest.raises(NotFoundError):
            await ops.bulk_update([{"id": a_ids[0], "score": 9}])
        assert await ops.bulk_delete(ids=a_ids) == 0
        assert await ops.bulk_delete({"email": "0@x"}) == 1
        assert (
            await ops.bulk_upsert(
                [{"email": "1@x", "title": "b1!"}, {"email": "9@x", "title": "b9"}],
                conflict_on=["email"],
            )
            == 2
        )
        titles = sorted(r["title"] for r in (await ops.list())["records"])
        assert titles == ["b1!", "b9"]
        assert await ops.bulk_delete(all=True) == 2
        assert await ops.count() == 0
    with tenant_scope(A):
        records = (await ops.list(order_by="email"))["records"]
        assert [(r["title"], r["score"]) for r in records] == [("a0", 0), ("a1", 0), ("a2", 0)]
        assert {r["tenant_id"] for r in records} == {A}


async def test_upsert_and_unique_keys_are_per_tenant(models: Models) -> None:
    db, Note, Seq, _ = models
    ops, seq = db.ops(Note), db.ops(Seq)
    with tenant_scope(A):
        a = await ops.upsert(conflict_on=["email"], title="a", email="same@x")
        with pytest.raises(AlreadyExistsError):
            await ops.create(title="again", email="same@x")
        await seq.create(name="n", code="c")
        with pytest.raises(AlreadyExistsError):
            await seq.create(name="n", code="c")
    with tenant_scope(B):
        b = await ops.upsert(conflict_on=["email"], title="b", email="same@x")
        assert b["id"] != a["id"] and b["tenant_id"] == B
        again = await ops.upsert(conflict_on=["email"], title="b2", email="same@x")
        assert again["id"] == b["id"] and again["title"] == "b2"
        await seq.create(name="n", code="c")  # the __unique__ group is per tenant too
        assert (
            await seq.bulk_upsert(
                [{"name": "n", "code": "c", "id": 500}], conflict_on=["name", "code"]
            )
            == 1
        )
    with tenant_scope(A):
        assert (await ops.read(a["id"]))["title"] == "a"
        assert await ops.count() == 1
        assert [r["id"] for r in (await seq.list())["records"]] != [500]


async def test_explicit_ids_collide_only_within_a_tenant(models: Models) -> None:
    """A caller never learns another tenant's row exists: the same explicit id is free
    in every tenant, and generated ids keep working on both databases."""
    db, Note, Seq, _ = models
    ops, seq = db.ops(Note), db.ops(Seq)
    with tenant_scope(A):
        await ops.create(id="k", title="a", email="a@x")
        await seq.create(id=5, name="a5")
        with pytest.raises(AlreadyExistsError):
            await ops.create(id="k", title="dup", email="dup@x")
    with tenant_scope(B):
        b = await ops.create(id="k", title="b", email="b@x")
        assert (b["id"], b["tenant_id"]) == ("k", B)
        assert (await ops.upsert(id="k", title="b!", email="b@x"))["title"] == "b!"
        assert (await seq.create(id=5, name="b5"))["id"] == 5
        gen = await seq.create(name="generated")
        assert gen["id"] > 5
        assert await seq.bulk_create([{"name": "g1"}, {"name": "g2"}]) == 2
        up = await seq.upsert(conflict_on=["name", "code"], name="g3")
        ids = sorted(r["id"] for r in (await seq.list())["records"])
        assert len(set(ids)) == 5 and up["id"] in ids and ids[0] == 5
        assert await seq.bulk_upsert([{"name": "u1"}, {"name": "u2"}], ["name", "code"]) == 2
        ids = sorted(r["id"] for r in (await seq.list())["records"])
        assert len(set(ids)) == 7
        assert await seq.bulk_upsert([{"id": 5, "name": "b5!"}]) == 1
        assert (await seq.read(5))["name"] == "b5!"
        assert (await ops.read("k"))["title"] == "b!"
    with tenant_scope(A):
        assert (await ops.read("k"))["title"] == "a"
        assert (await seq.read(5))["name"] == "a5"
        assert await seq.count() == 1


async def test_a_caller_cannot_set_the_tenant(models: Models) -> None:
    db, Note, Seq, _ = models
    ops, seq = db.ops(Note), db.ops(Seq)
    with tenant_scope(A):
        n = await ops.create(title="a", email="a@x")
        attempts: list[Callable[[], Awaitable[Any]]] = [
            lambda: ops.create(title="x", email="x@x", tenant_id=B),
            lambda: ops.update(n["id"], fields={"tenant_id": B}),
            lambda: ops.update(filter={"email": "a@x"}, fields={"tenant_id": B}),
            lambda: ops.upsert(title="x", email="a@x", tenant_id=B, conflict_on=["email"]),
            lambda: ops.bulk_create([{"title": "x", "email": "y@x", "tenant_id": B}]),
            lambda: ops.bulk_update([{"id": n["id"], "tenant_id": B}]),
            lambda: ops.bulk_update(filter={}, fields={"tenant_id": B}, all=True),
            lambda: ops.bulk_upsert([{"title": "x", "email": "a@x", "tenant_id": B}], ["email"]),
            lambda: seq.create(name="x", tenant_id=A),  # even naming one's own tenant
        ]
        for attempt in attempts:
            with pytest.raises(ValidationError) as ei:
                await attempt()
            assert ei.value.field == "tenant_id"
            assert ei.value.reason == "set by the server from the caller's tenant"
        assert [r["tenant_id"] for r in (await ops.list())["records"]] == [A]
    with tenant_scope(B):
        assert await ops.count() == 0


async def test_no_tenant_no_call(models: Models) -> None:
    db, Note, _, Plain = models
    ops = db.ops(Note)
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: ops.create(title="a", email="a@x"),
        lambda: ops.read("k"),
        lambda: ops.update("k", fields={"title": "t"}),
        lambda: ops.update(filter={"email": "a@x"}, fields={"title": "t"}),
        lambda: ops.delete("k"),
        lambda: ops.upsert(title="a", email="a@x"),
        lambda: ops.list(),
        lambda: ops.count(),
        lambda: ops.search("word"),
        lambda: ops.bulk_create([]),
        lambda: ops.bulk_create([{"title": "a", "email": "a@x"}]),
        lambda: ops.bulk_update(filter={}, fields={"score": 1}, all=True),
        lambda: ops.bulk_delete(ids=[]),
        lambda: ops.bulk_delete(all=True),
        lambda: ops.bulk_upsert([{"title": "a", "email": "a@x"}]),
    ]
    for call in calls:
        with pytest.raises(TenantRequired, match=NO_TENANT):
            await call()
    async with db.transaction():
        with pytest.raises(TenantRequired):
            await ops.read("k")
    with tenant_scope(A), tenant_scope(None), pytest.raises(TenantRequired):
        await ops.count()
    # models that are not tenant-scoped ignore the tenant entirely
    plain = db.ops(Plain)
    p = await plain.create(name="p")
    assert "tenant_id" not in p
    with tenant_scope(A):
        assert (await plain.read(p["id"]))["name"] == "p"
        await plain.create(name="q")
    with tenant_scope(B):
        assert await plain.count() == 2
    assert await plain.count() == 2


async def test_page_tokens_stay_in_their_tenant(models: Models) -> None:
    db, Note, _, _ = models
    ops = db.ops(Note)
    with tenant_scope(A):
        await ops.bulk_create(
            [{"title": f"a{i}", "email": f"{i}@x", "body": "word"} for i in range(3)]
        )
        token = (await ops.list(limit=1, order_by="email"))["next_page_token"]
        search_token = (await ops.search("word", limit=1))["next_page_token"]
        assert token and search_token
        assert len((await ops.list(limit=5, order_by="email", page_token=token))["records"]) == 2
    with tenant_scope(B):
        await ops.create(title="b", email="9@x", body="word")
        with pytest.raises(ValidationError) as ei:
            await ops.list(limit=1, order_by="email", page_token=token)
        assert ei.value.field == "page_token"
        with pytest.raises(ValidationError):
            await ops.search("word", limit=1, page_token=search_token)


async def test_workflows_run_in_the_scope_they_are_started_in(models: Models) -> None:
    db, Note, _, _ = models

    def build(atomic: bool) -> Any:
        wf = WorkflowBuilder(atomic=atomic)
        wf.add_node("NoteCreateNode", "c", {"title": "{{title}}", "email": "{{email}}"})
        wf.add_node("NoteReadNode", "r", {})
        wf.add_connection("c", "id", "r", "id")
        return wf.build()

    runtime = AsyncLocalRuntime()
    with tenant_scope(A):
        out = await runtime.execute_workflow_async(build(False), {"title": "a", "email": "a@x"})
        assert out["c"]["tenant_id"] == A and out["r"]["title"] == "a"
        out = await runtime.execute_workflow_async(build(True), {"title": "a2", "email": "b@x"})
        assert out["c"]["tenant_id"] == A
    with tenant_scope(B):
        out = await runtime.execute_workflow_async(build(True), {"title": "b", "email": "a@x"})
        assert out["c"]["tenant_id"] == B
        wf = WorkflowBuilder()
        wf.add_node("NoteListNode", "l", {})
        wf.add_node("NoteBulkDeleteNode", "d", {"all": True})
        listed = await runtime.execute_workflow_async(wf.build())
        assert [r["title"] for r in listed["l"]["records"]] in (["b"], [])
        assert listed["d"] == {"deleted": 1}
    with tenant_scope(A):
        assert await db.ops(Note).count() == 2
    wf = WorkflowBuilder()
    wf.add_node("NoteCountNode", "n", {})
    with pytest.raises(NodeExecutionError) as ei:
        await runtime.execute_workflow_async(wf.build())
    assert isinstance(ei.value.cause, TenantRequired)


async def test_a_table_without_tenants_is_not_made_tenant_scoped(make_db: MakeDB) -> None:
    first = make_db()

    @first.model
    class Memo:
        id: str
        text: str

    await first.initialize()
    await first.ops(Memo).create(text="before tenants")
    await first.close()
    second = make_db()

    @second.model(tenant_scoped=True)
    class Memo:  # type: ignore[no-redef]
        id: str
        text: str

    with pytest.raises(MigrationError, match=r"memo\.tenant_id: the model is tenant-scoped"):
        await second.initialize()
    assert "tenant" in "\n".join(await second.migration_plan())
    await second.close()
    # a tenant column is not enough: keys unique across tenants would leak
    third = make_db()

    @third.model
    class Card:
        id: int
        tenant_id: str

    await third.ops(Card).create(tenant_id=A)
    await third.close()
    fourth = make_db()

    @fourth.model(tenant_scoped=True)
    class Card:  # type: ignore[no-redef]
        id: int
        tenant_id: str

    with pytest.raises(MigrationError, match=r"primary key must be \(tenant_id, id\)"):
        await fourth.initialize()


async def test_a_tenant_scoped_table_opens_again_unchanged(make_db: MakeDB) -> None:
    first = make_db()
    note, _, _ = _declare(first)
    await first.initialize()
    with tenant_scope(A):
        await first.ops(note).create(title="a", email="a@x")
    await first.close()
    second = make_db(auto_migrate=False)  # any difference would be an error
    note, seq, _ = _declare(second)
    assert await second.migration_plan() == []
    await second.initialize()
    with tenant_scope(A):
        assert await second.ops(note).count() == 1
        assert (await second.ops(seq).create(name="n"))["id"] == 1
