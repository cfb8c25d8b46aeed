"""MongoDB-style filters: every operator, validation, and injection attempts."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from dataflow import OPERATORS, DataFlow, ValidationError

Contacts = tuple[DataFlow, type[Any]]

PEOPLE = [
    {"id": "a", "name": "Ada", "email": "ada@x", "company": "ACME", "score": 10},
    {"id": "b", "name": "bob", "email": "bob@y", "company": None, "score": 20},
    {"id": "c", "name": "Cy", "email": "cy@x", "company": "Init", "score": 30},
    {"id": "d", "name": "dee", "email": "dee@z", "company": "ACME", "score": 40},
]

MakeDB = Callable[..., DataFlow]


@pytest.fixture
async def people(contacts: Contacts) -> Contacts:
    db, Contact = contacts
    await db.ops(Contact).bulk_create(PEOPLE)
    return db, Contact


CASES: list[tuple[dict[str, Any], set[str]]] = [
    ({"name": "Ada"}, {"a"}),
    ({"score": {"$eq": 20}}, {"b"}),
    ({"company": {"$ne": "ACME"}}, {"b", "c"}),
    ({"score": {"$gt": 20}}, {"c", "d"}),
    ({"score": {"$gte": 20}}, {"b", "c", "d"}),
    ({"score": {"$lt": 20}}, {"a"}),
    ({"score": {"$lte": 20}}, {"a", "b"}),
    ({"id": {"$in": ["a", "c", "zz"]}}, {"a", "c"}),
    ({"id": {"$nin": ["a", "c"]}}, {"b", "d"}),
    ({"id": {"$in": []}}, set()),
    ({"email": {"$like": "%@x"}}, {"a", "c"}),
    ({"name": {"$like": "ada"}}, set()),  # LIKE is case-sensitive on both databases
    ({"name": {"$ilike": "ADA"}}, {"a"}),
    ({"name": {"$ilike": "%D%"}}, {"a", "d"}),
    ({"company": {"$null": True}}, {"b"}),
    ({"company": {"$null": False}}, {"a", "c", "d"}),
    ({"company": None}, {"b"}),
    ({"$and": [{"company": "ACME"}, {"score": {"$gt": 10}}]}, {"d"}),
    ({"$or": [{"name": "Ada"}, {"score": 30}]}, {"a", "c"}),
    ({"$not": {"company": "ACME"}}, {"c"}),  # SQL: NOT (NULL = 'ACME') is unknown
    ({"score": {"$not": {"$gte": 30}}}, {"a", "b"}),
    ({"score": {"$gt": 10, "$lt": 40}}, {"b", "c"}),
    ({"$and": []}, {"a", "b", "c", "d"}),
    ({"$or": []}, set()),
    ({}, {"a", "b", "c", "d"}),
]


def test_every_operator_is_covered() -> None:
    used = {op for flt, _ in CASES for op in _ops(flt)}
    assert set(OPERATORS) <= used | {"$eq"}


def _ops(value: Any) -> set[str]:
    if isinstance(value, dict):
        return {k for k in value if k.startswith("$")} | {
            o for v in value.values() for o in _ops(v)
        }
    if isinstance(value, list):
        return {o for v in value for o in _ops(v)}
    return set()


@pytest.mark.parametrize(("flt", "expected"), CASES, ids=[str(c[0]) for c in CASES])
async def test_operator(people: Contacts, flt: dict[str, Any], expected: set[str]) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    got = {r["id"] for r in (await ops.list(flt))["records"]}
    assert got == expected
    assert await ops.count(flt) == len(expected)


@pytest.mark.parametrize(
    ("flt", "field", "words"),
    [
        ({"nickname": "x"}, "filter.nickname", "unknown field"),
        ({"score": {"$regex": "x"}}, "filter.score.$regex", "unknown operator"),
        ({"$where": "1=1"}, "filter.$where", "unknown operator"),
        ({"score": "ten"}, "filter.score", "expected int"),
        ({"score": {"$in": [1, "2"]}}, "filter.score.$in[1]", "expected int"),
        ({"score": {"$in": 1}}, "filter.score.$in", "expects a list"),
        ({"score": {"$like": "1%"}}, "filter.score.$like", "only supported on str"),
        ({"name": {"$like": 5}}, "filter.name.$like", "str pattern"),
        ({"name": {"$null": "yes"}}, "filter.name.$null", "true or false"),
        ({"$or": {"name": "x"}}, "filter.$or", "list of filters"),
        ({"name": None, "email": {"$gt": None}}, "filter.email.$gt", "null"),
    ],
)
async def test_bad_filters_name_the_culprit(
    people: Contacts, flt: dict[str, Any], field: str, words: str
) -> None:
    db, Contact = people
    with pytest.raises(ValidationError) as ei:
        await db.ops(Contact).list(flt)
    assert ei.value.field == field
    assert words in ei.value.reason


@pytest.mark.parametrize(
    "value",
    [
        "x' OR '1'='1",
        "'; DROP TABLE contact; --",
        'Ada" OR 1=1 --',
        "%",
    ],
)
async def test_injection_as_values_matches_nothing(people: Contacts, value: str) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    assert (await ops.list({"name": value}))["records"] == []
    assert await ops.count({"$or": [{"email": value}, {"company": {"$in": [value]}}]}) == 0
    assert await ops.count() == 4


@pytest.mark.parametrize(
    "name",
    [
        "name; DROP TABLE contact",
        "name\" = '' OR 1=1 --",
        "1=1",
        "contact.name",
        "__class__",
    ],
)
async def test_injection_as_field_names_is_refused(people: Contacts, name: str) -> None:
    db, Contact = people
    ops = db.ops(Contact)
    with pytest.raises(ValidationError, match="unknown field"):
        await ops.list({name: "x"})
    with pytest.raises(ValidationError):
        await ops.list(order_by=[name])
    with pytest.raises(ValidationError):
        await ops.list(fields=[name])
    with pytest.raises(ValidationError):
        await ops.create(**{"name": "n", "email": "e", name: "x"})
    with pytest.raises(ValidationError):
        await ops.update("a", fields={name: "x"})
    with pytest.raises(ValidationError):
        await ops.upsert(conflict_on=[name], name="n", email="e")
    assert await ops.count() == 4


async def test_typed_comparisons(declare_everything: Any, make_db: MakeDB) -> None:
    db = make_db()
    Thing = declare_everything(db)
    ops = db.ops(Thing)
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    await ops.bulk_create(
        [
            {"amount": Decimal("10.5"), "at": t0, "day": dt.date(2024, 1, 1), "flag": True},
            {"amount": Decimal("2.25"), "at": t0 + dt.timedelta(hours=1), "flag": False},
            {"amount": Decimal("100"), "day": dt.date(2023, 12, 31), "tier": "pro"},
        ]
    )
    assert await ops.count({"amount": {"$gt": Decimal("3")}}) == 2
    assert await ops.count({"amount": {"$gte": "10.50"}}) == 2
    assert await ops.count({"amount": Decimal("10.50")}) == 1
    # the same instant in another zone
    plus1 = dt.timezone(dt.timedelta(hours=1))
    assert await ops.count({"at": {"$gt": dt.datetime(2024, 1, 1, 0, 30, tzinfo=plus1)}}) == 2
    assert await ops.count({"at": "2024-01-01T01:00:00+00:00"}) == 1
    assert await ops.count({"day": {"$lt": dt.date(2024, 1, 1)}}) == 1
    assert await ops.count({"flag": True}) == 1
    assert await ops.count({"tier": "pro"}) == 1
    assert await ops.count({"meta": {"$null": True}}) == 3
    with pytest.raises(ValidationError, match="JSON"):
        await ops.count({"meta": {"a": 1}})
    with pytest.raises(ValidationError, match="not ordered"):
        await ops.count({"flag": {"$gt": False}})
