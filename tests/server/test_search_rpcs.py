"""Full-text search over gRPC: the typed `Search<Models>` RPC (message classes from
server reflection only) and the generic `ModelService.SearchRecords`, on SQLite and
PostgreSQL, with their errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message, message_factory, struct_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from dataflow import DataFlow, field
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_server import Nexus, Serving

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True),
]

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
SERVICE = "nexus.models.v1.PersonService"

PEOPLE = [
    {
        "id": "a",
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "bio": "wrote notes",
        "age": 36,
    },
    {"id": "b", "name": "Ada Ada Ada", "email": "b@example.com", "bio": None, "age": 5},
    {"id": "c", "name": "Charles Babbage", "email": "c@example.com", "bio": "engines", "age": 79},
    {"id": "d", "name": "Lovelace Ada Byron", "email": "d@example.com", "bio": "poet", "age": 20},
]


def declare(db: DataFlow) -> None:
    @db.model
    class Person:
        """Someone to find."""

        __searchable__ = True
        id: str
        name: str
        email: str = field(unique=True)
        bio: str | None = None
        age: int = 0

    @db.model
    class Tag:
        """Not searchable."""

        id: str
        label: str = ""


@pytest.fixture
async def serving(db_url: str) -> AsyncIterator[Serving]:
    db = DataFlow(db_url)
    declare(db)
    app = Nexus(grpc_port=0, grace_period=2.0)
    app.integrate_dataflow(db)
    try:
        async with asyncio.timeout(10):
            cm = app.serving()
            info = await cm.__aenter__()
        await db.ops("Person").bulk_create(PEOPLE)
        yield info
        async with asyncio.timeout(10):
            await cm.__aexit__(None, None, None)
    finally:
        await db.close()


def _reflect(address: str) -> dict[str, tuple[type[message.Message], type[message.Message]]]:
    with grpc.insecure_channel(address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        desc = pool.FindServiceByName(SERVICE)
        return {
            m.name: (
                message_factory.GetMessageClass(m.input_type),
                message_factory.GetMessageClass(m.output_type),
            )
            for m in desc.methods
        }


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def test_typed_search(serving: Serving, channel: grpc.aio.Channel) -> None:
    classes = await asyncio.wait_for(asyncio.to_thread(_reflect, serving.address), 10)
    assert "SearchPersons" in classes
    req_cls, resp_cls = classes["SearchPersons"]
    call = channel.unary_unary(
        f"/{SERVICE}/SearchPersons",
        request_serializer=req_cls.SerializeToString,
        response_deserializer=resp_cls.FromString,
    )
    resp: Any = await call(req_cls(q="ada"), timeout=10)
    assert resp.persons[0].id == "b"
    assert sorted(p.id for p in resp.persons) == ["a", "b", "d"]
    assert len(resp.scores) == 3 and list(resp.scores) == sorted(resp.scores, reverse=True)
    assert resp.persons[0].name == "Ada Ada Ada" and resp.persons[0].age == 5
    assert resp.next_page_token == ""

    flt = req_cls(q="ada", filter=_struct({"age": {"$gte": 20}}))
    resp = await call(flt, timeout=10)
    assert sorted(p.id for p in resp.persons) == ["a", "d"]

    resp = await call(req_cls(q='"ada lovelace"', fields=["name"]), timeout=10)
    assert [p.name for p in resp.persons] == ["Ada Lovelace"]
    assert not resp.persons[0].HasField("email")

    # paging: every match once, in order
    seen: list[str] = []
    token = ""
    while True:
        resp = await call(req_cls(q="ada", page_size=1, page_token=token), timeout=10)
        seen += [p.id for p in resp.persons]
        token = resp.next_page_token
        if not token:
            break
    assert len(seen) == 3 and seen[0] == "b" and sorted(seen) == ["a", "b", "d"]

    # the model without searchable fields has no search RPC
    tag = await asyncio.to_thread(_tag_methods, serving.address)
    assert not any(m.startswith("Search") for m in tag)


def _tag_methods(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        return [m.name for m in pool.FindServiceByName("nexus.models.v1.TagService").methods]


async def test_generic_search(ms: Any) -> None:
    resp = await ms.SearchRecords(mpb.SearchRecordsRequest(model="Person", q="ada"), timeout=10)
    assert resp.records[0]["id"] == "b"
    assert len(resp.scores) == len(resp.records) == 3
    resp = await ms.SearchRecords(
        mpb.SearchRecordsRequest(
            model="Person", q="lov* -byron", filter=_struct({"age": {"$lt": 100}})
        ),
        timeout=10,
    )
    assert [r["id"] for r in resp.records] == ["a"]
    first = await ms.SearchRecords(
        mpb.SearchRecordsRequest(model="Person", q="ada", page_size=2), timeout=10
    )
    assert len(first.records) == 2 and first.next_page_token
    rest = await ms.SearchRecords(
        mpb.SearchRecordsRequest(model="Person", q="ada", page_token=first.next_page_token),
        timeout=10,
    )
    ids = [r["id"] for r in (*first.records, *rest.records)]
    assert sorted(ids) == ["a", "b", "d"] and rest.next_page_token == ""


async def test_search_without_a_query_lists(ms: Any) -> None:
    """No `q`: the records matching the filter, score 0, id order, on any model."""
    resp = await ms.SearchRecords(
        mpb.SearchRecordsRequest(model="Person", filter=_struct({"age": {"$lt": 30}})),
        timeout=10,
    )
    assert [r["id"] for r in resp.records] == ["b", "d"]
    assert list(resp.scores) == [0.0, 0.0]
    resp = await ms.SearchRecords(mpb.SearchRecordsRequest(model="Tag"), timeout=10)
    assert list(resp.records) == [] and resp.next_page_token == ""


async def test_search_errors(ms: Any, expect_error: ExpectError) -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    for q in ('"ada', "-ada", "!!!"):
        _, violations = await expect_error(
            ms.SearchRecords(mpb.SearchRecordsRequest(model="Person", q=q)),
            bad,
            "QUERY_INVALID",
            fields=["q"],
        )
    await expect_error(
        ms.SearchRecords(mpb.SearchRecordsRequest(model="Tag", q="x")),
        bad,
        "QUERY_INVALID",
        fields=["q"],
    )
    await expect_error(
        ms.SearchRecords(
            mpb.SearchRecordsRequest(model="Person", q="ada", filter=_struct({"nope": 1}))
        ),
        bad,
        "QUERY_INVALID",
    )
    await expect_error(
        ms.SearchRecords(mpb.SearchRecordsRequest(model="Person", q="ada", fields=["nope"])),
        bad,
        "QUERY_INVALID",
        fields=["fields[0]"],
    )
    first = await ms.SearchRecords(
        mpb.SearchRecordsRequest(model="Person", q="ada", page_size=1), timeout=10
    )
    await expect_error(
        ms.SearchRecords(
            mpb.SearchRecordsRequest(model="Person", q="lovelace", page_token=first.next_page_token)
        ),
        bad,
        "PAGE_TOKEN_INVALID",
        fields=["page_token"],
    )
    await expect_error(
        ms.SearchRecords(mpb.SearchRecordsRequest(model="Nobody", q="x")),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
    )
    # a long query is refused without being echoed
    err_meta, violations = await expect_error(
        ms.SearchRecords(mpb.SearchRecordsRequest(model="Person", q="secretword " * 200)),
        bad,
        "QUERY_INVALID",
        fields=["q"],
    )
    assert all("secretword" not in text for _, text in violations)
    del err_meta
