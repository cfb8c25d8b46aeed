"""Full-text search (`ModelOps.search`, ``<Model>SearchNode``) on SQLite and PostgreSQL:
ranking, the query language, filters, paging, index maintenance by the database and the
migration that builds (and backfills) an index for an existing table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from dataflow import (
    DataFlow,
    MigrationError,
    ModelError,
    SchemaMissingError,
    ValidationError,
    field,
)
from dataflow._search import fts5_query, parse_query, tsquery_text
from workflow import AsyncLocalRuntime, WorkflowBuilder

pytestmark = pytest.mark.timeout(60)

MakeDB = Callable[..., DataFlow]


def _declare(db: DataFlow, searchable: bool = True, config: str | None = None) -> type[Any]:
    ns: dict[str, Any] = {"__searchable__": searchable}
    if config is not None:
        ns["__search_config__"] = config

    @db.model
    class Contact:
        __searchable__ = ns["__searchable__"]
        __search_config__ = ns.get("__search_config__", "simple")
        id: str
        name: str
        email: str = field(unique=True)
        company: str | None = None
        score: int = 0

    return Contact


PEOPLE = [
    ("a", "Ada Lovelace", "ada@example.com", "Analytical Engines", 10),
    ("b", "Ada Ada Ada", "triple@example.com", None, 5),
    ("c", "Charles Babbage", "charles@example.com", "Analytical Engines", 7),
    ("d", "Grace Hopper", "grace@navy.mil", "Navy", 9),
    ("e", "Lovelace Ada Byron", "byron@example.com", "Poets", 3),
]


async def _seed(db: DataFlow, model: type[Any]) -> None:
    await db.ops(model).bulk_create(
        [{"id": i, "name": n, "email": e, "company": c, "score": s} for i, n, e, c, s in PEOPLE]
    )


async def _ids(db: DataFlow, model: type[Any], query: str, **kw: Any) -> list[str]:
    res = await db.ops(model).search(query, **kw)
    return [r["id"] for r in res["records"]]


async def test_ranking_and_scores(make_db: MakeDB) -> None:
    db = make_db()
    Contact = _declare(db)
    await db.initialize()
    await _seed(db, Contact)
    res = await db.ops(Contact).search("ada")
    ids = [r["id"] for r in res["records"]]
    # "Ada Ada Ada" says it most: first; every Ada, none of the others
    assert ids[0] == "b"
    assert sorted(ids) == ["a", "b", "e"]
    assert len(res["scores"]) == 3
    assert res["scores"] == sorted(res["scores"], reverse=True)
    assert all(s > 0 for s in res["scores"])
    assert res["next_page_token"] is None


async def test_query_language(make_db: MakeDB) -> None:
    db = make_db()
    Contact = _declare(db)
    await db.initialize()
    await _seed(db, Contact)
    # all words must occur, in any order and any field
    assert sorted(await _ids(db, Contact, "ada lovelace")) == ["a", "e"]
    assert sorted(await _ids(db, Contact, "analytical charles")) == ["c"]
    # a phrase: these words in this order
    assert await _ids(db, Contact, '"ada lovelace"') == ["a"]
    assert await _ids(db, Contact, '"lovelace ada"') == ["e"]
    # exclusion of a word and of a phrase
    assert sorted(await _ids(db, Contact, "ada -lovelace")) == ["b"]
    assert sorted(await _ids(db, Contact, 'ada -"ada lovelace"')) == ["b", "e"]
    # prefix
    assert sorted(await _ids(db, Contact, "lov*")) == ["a", "e"]
    assert await _ids(db, Contact, "hop*") == ["d"]
    # case, punctuation and addresses: split into words the same way on both databases
    assert await _ids(db, Contact, "GRACE") == ["d"]
    assert await _ids(db, Contact, "navy.mil") == ["d"]
    assert await _ids(db, Contact, "grace@navy.mil") == ["d"]
    # engine syntax in the text is only text
    assert await _ids(db, Contact, "ada AND NOT") == []
    assert await _ids(db, Contact, "ada OR grace") == []
    assert await _ids(db, Contact, "ada:* & (grace") == []


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ('"ada', "unclosed quote"),
        ("!!! ...", "no word"),
        ("-ada", "not excluded"),
        ("x" * 1001, "at most 1000"),
        (" ".join(["w"] * 33), "at most 32"),
    ],
)
async def test_bad_query(make_db: MakeDB, query: str, reason: str) -> None:
    db = make_db()
    Contact = _declare(db)
    await db.initialize()
    with pytest.raises(ValidationError) as err:
        await db.ops(Contact).search(query)
    assert err.value.field == "query"
    assert reason in err.value.reason


async def test_filter_limit_fields_and_errors(make_db: MakeDB) -> None:
    db = make_db()
    Contact = _declare(db)
    await db.initialize()
    await _seed(db, Contact)
    ops = db.ops(Contact)
    assert sorted(await _ids(db, Contact, "ada", filter={"score": {"$gte": 5}})) == ["a", "b"]
    assert await _ids(db, Contact, "analytical", filter={"company": {"$ne": "x"}, "score": 7}) == [
        "c"
    ]
    res = await ops.search("ada", fields=["name"], limit=1)
    assert res["records"] == [{"name": "Ada Ada Ada"}]
    for bad in (0, 1001, "3", True):
        with pytest.raises(ValidationError) as err:
            await ops.search("ada", limit=bad)
        assert err.value.field == "limit"
    with pytest.raises(ValidationError) as err:
        await ops.search("ada", filter={"nope": 1})
    assert err.value.field.startswith("filter")
    with pytest.raises(ValidationError) as err:
        await ops.search("ada", fields=["nope"])
    assert err.value.field == "fields[0]"
    with pytest.raises(ValidationError) as err:
        await ops.search(123)  # type: ignore[arg-type]
    assert err.value.field == "query"


async def test_paging(make_db: MakeDB) -> None:
    db = make_db()
    Contact = _declare(db)
    await db.initialize()
    ops = db.ops(Contact)
    # equal scores everywhere: the order falls back on id, and pages never overlap
    await ops.bulk_create(
        [{"id": f"p{i:02d}", "name": "Same Name", "email": f"{i}@x.org"} for i in range(25)]
    )
    await ops.create(id="top", name="Same Same Same Name", email="t@x.org")
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        res = await ops.search("same", limit=7, page_token=token)
        seen += [r["id"] for r in res["records"]]
        pages += 1
        token = res["next_page_token"]
        if token is None:
            break
    assert pages == 4
    assert seen[0] == "top"
    assert seen[1:] == [f"p{i:02d}" for i in range(25)]
    # a token is bound to the model, the query and the filter
    first = await ops.search("same", limit=2)
    tok = first["next_page_token"]
    assert tok
    for kw in ({"query": "name"}, {"query": "same", "filter": {"score": 0}}):
        q = kw.pop("query")
        with pytest.raises(ValidationError) as err:
            await ops.search(q, limit=2, page_token=tok, **kw)
        assert err.value.field == "page_token"
    with pytest.raises(ValidationError) as err:
        await ops.search("same", page_token="forged")
    assert err.value.field == "page_token"


async def test_database_keeps_index_current(make_db: MakeDB) -> None:
    db = make_db()
    Contact = _declare(db)
    await db.initialize()
    ops = db.ops(Contact)
    await ops.create(id="x", name="Alan Turing", email="alan@x.org")
    assert await _ids(db, Contact, "turing") == ["x"]
    await ops.update("x", fields={"name": "Alan Kay"})
    assert await _ids(db, Contact, "turing") == []
    assert await _ids(db, Contact, "kay") == ["x"]
    await ops.upsert(id="x", name="Alan Perlis", email="alan@x.org")
    assert await _ids(db, Contact, "perlis") == ["x"]
    assert await _ids(db, Contact, "kay") == []
    await ops.bulk_update(filter={"id": "x"}, fields={"company": "Yale"})
    assert await _ids(db, Contact, "yale perlis") == ["x"]
    await ops.update("x", fields={"company": None})
    assert await _ids(db, Contact, "yale") == []
    await ops.delete("x")
    assert await _ids(db, Contact, "perlis") == []
    # a write the transaction rolls back leaves the index as it was
    with pytest.raises(RuntimeError):
        async with db.transaction():
            await ops.create(id="y", name="Rolled Back", email="r@x.org")
            raise RuntimeError
    assert await _ids(db, Contact, "rolled") == []


async def test_migration_backfills_existing_table(make_db: MakeDB, url: str) -> None:
    plain = make_db()
    Contact = _declare(plain, searchable=False)
    await plain.initialize()
    await _seed(plain, Contact)
    with pytest.raises(ValidationError) as err:
        await plain.ops(Contact).search("ada")
    assert "no searchable field" in err.value.reason
    # without a query a search is a filtered listing, on any model (the original's
    # ContactSearchNode with filter and limit)
    res = await plain.ops(Contact).search(filter={"score": {"$gte": 9}}, limit=1)
    assert [r["id"] for r in res["records"]] == ["a"] and res["scores"] == [0.0]
    res = await plain.ops(Contact).search(
        "  ", {"score": {"$gte": 9}}, page_token=res["next_page_token"], limit=1
    )
    assert [r["id"] for r in res["records"]] == ["d"] and res["next_page_token"] is None
    await plain.close()

    # skip_migration=True trusts the schema: a search says the index is missing
    trusting = make_db(skip_migration=True, auto_migrate=False)
    _declare(trusting)
    with pytest.raises(SchemaMissingError) as missing:
        await trusting.ops("Contact").search("ada")
    assert "full-text search index of table 'contact' does not exist" in str(missing.value)
    assert "skip_migration=False" in str(missing.value)
    await trusting.close()

    # the same table, now searchable: auto_migrate=False refuses and names the step
    strict = make_db(auto_migrate=False)
    _declare(strict)
    with pytest.raises(MigrationError) as merr:
        await strict.initialize()
    assert "create search index of contact" in str(merr.value)
    await strict.close()

    db = make_db()
    Contact = _declare(db)
    assert "create search index of contact (name, email, company; simple)" in (
        await db.migration_plan()
    )
    await db.initialize()
    assert sorted(await _ids(db, Contact, "ada")) == ["a", "b", "e"]
    assert await db.migration_plan() == []
    await db.close()

    # another configuration: a new index replaces the old one (derived data only)
    english = make_db()
    Contact = _declare(english, config="english")
    plan = await english.migration_plan()
    assert any(s.startswith("drop old search index") for s in plan)
    await english.initialize()
    assert await english.migration_plan() == []
    # stemming: "engine" finds "Engines"
    assert sorted(await _ids(english, Contact, "engine")) == ["a", "c"]
    await english.ops(Contact).create(id="n", name="Ada Again", email="n@x.org")
    assert "n" in await _ids(english, Contact, "ada")
    await english.close()

    # no longer searchable: the index goes, writes still work
    off = make_db()
    Contact = _declare(off, searchable=False)
    await off.initialize()
    assert await off.migration_plan() == []
    await off.ops(Contact).create(id="m", name="Still Writable", email="m@x.org")


async def test_search_node_in_a_workflow(make_db: MakeDB) -> None:
    db = make_db()
    Contact = _declare(db)
    await db.initialize()
    await _seed(db, Contact)
    # the original's usage: filter and limit, no query
    wf0 = WorkflowBuilder()
    wf0.add_node("ContactSearchNode", "search", {"filter": {"company": "Poets"}, "limit": 10})
    out0 = (await AsyncLocalRuntime().execute_workflow_async(wf0.build()))["search"]
    assert [r["id"] for r in out0["records"]] == ["e"]
    node = db.node_types()["ContactSearchNode"]
    assert set(node.parameters) == {"query", "filter", "limit", "page_token", "fields"}
    wf = WorkflowBuilder()
    wf.add_node(
        "ContactSearchNode", "find", {"query": "analytical", "filter": {"score": {"$gt": 8}}}
    )
    result = await AsyncLocalRuntime().execute_workflow_async(wf.build())
    out = result["find"]
    assert [r["id"] for r in out["records"]] == ["a"]
    assert len(out["scores"]) == 1
    assert out["next_page_token"] is None
    del Contact


async def test_declaration_errors(tmp_path: Any) -> None:
    db = DataFlow(f"sqlite:///{tmp_path / 'd.db'}")
    with pytest.raises(ModelError, match="only a str field"):

        @db.model
        class Bad:
            id: str
            n: int = field(default=0, searchable=True)

    with pytest.raises(ModelError, match="__searchable__ must be True or False"):

        @db.model
        class Bad2:
            __searchable__ = ["name"]
            id: str
            name: str

    with pytest.raises(ModelError, match="__search_config__"):

        @db.model
        class Bad3:
            __searchable__ = True
            __search_config__ = "klingon"
            id: str
            name: str

    @db.model
    class Note:
        id: int
        title: str = field(searchable=True)
        body: str = ""
        tag: str | None = None

    info = db.model_info(Note)
    assert [f.name for f in info.searchable_fields] == ["title"]
    assert "NoteSearchNode" in db.node_types()
    assert info.search_config == "simple"
    await db.close()


def test_engine_queries_are_quoted() -> None:
    terms = parse_query('ada "love lace"* -x -"y z" it\'s')
    assert fts5_query(terms) == '("ada" AND "love lace"* AND "it s") NOT "x" NOT "y z"'
    assert tsquery_text(terms) == (
        "'ada' & ('love' <-> 'lace':*) & !('x') & !('y' <-> 'z') & ('it' <-> 's')"
    )
