"""ModelService over a real server: models, record CRUD, queries, bulk writes, BatchWrite
(all or nothing), injection attempts and request_id idempotency. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from nexus_api.nexus.model.v1 import model_service_pb2 as mpb

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS


def struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def plain(record: struct_pb2.Struct) -> dict[str, Any]:
    return {k: record[k] for k in record}


async def create(ms: Any, model: str = "Contact", **values: Any) -> dict[str, Any]:
    rec = await ms.CreateRecord(mpb.CreateRecordRequest(model=model, record=struct(**values)))
    return plain(rec)


async def count(ms: Any, model: str = "Contact", **flt: Any) -> int:
    resp = await ms.CountRecords(mpb.CountRecordsRequest(model=model, filter=struct(**flt)))
    return int(resp.count)


async def seed(ms: Any) -> list[dict[str, Any]]:
    people = [("Ann", "Acme", 5), ("Bob", "Acme", 3), ("Cid", None, 9), ("Dee", "Init", 3)]
    return [
        await create(ms, name=n, email=f"{n.lower()}@x.io", company=c, score=s)
        for n, c, s in people
    ]


async def test_list_and_get_models(ms: Any, expect_error: ExpectError) -> None:
    resp = await ms.ListModels(mpb.ListModelsRequest())
    assert [m.name for m in resp.models] == ["Company", "Contact"]
    first = await ms.ListModels(mpb.ListModelsRequest(page_size=1))
    second = await ms.ListModels(
        mpb.ListModelsRequest(page_size=1, page_token=first.next_page_token)
    )
    assert [m.name for m in (*first.models, *second.models)] == ["Company", "Contact"]
    assert second.next_page_token == ""
    await expect_error(
        ms.ListModels(mpb.ListModelsRequest(page_token="bogus")),
        INVALID,
        "PAGE_TOKEN_INVALID",
        fields=["page_token"],
    )

    m = await ms.GetModel(mpb.GetModelRequest(name="Contact"))
    assert m.description == "A person to keep in touch with."
    assert (m.collection, m.service, m.message_type, m.table) == (
        "contacts",
        "nexus.models.v1.ContactService",
        "nexus.models.v1.Contact",
        "contact",
    )
    fields = {f.name: f for f in m.fields}
    assert list(fields) == [
        "id",
        "name",
        "email",
        "company",
        "score",
        "phone_number",
        "created_at",
        "updated_at",
    ]
    assert {n: f.type for n, f in fields.items()} == {
        "id": "str",
        "name": "str",
        "email": "str",
        "company": "str",
        "score": "int",
        "phone_number": "str",
        "created_at": "datetime",
        "updated_at": "datetime",
    }
    assert fields["id"].primary_key and fields["id"].generated and not fields["id"].managed
    assert fields["email"].unique and fields["email"].description == "where to write to"
    assert fields["company"].nullable and fields["company"].default.WhichOneof("kind") == (
        "null_value"
    )
    assert fields["score"].default.number_value == 0 and not fields["score"].nullable
    assert not fields["name"].HasField("default")
    assert fields["created_at"].managed and not fields["created_at"].generated

    await expect_error(
        ms.GetModel(mpb.GetModelRequest(name="Nope")), NOT_FOUND, "MODEL_NOT_FOUND", fields=["name"]
    )


async def test_create_get_update_delete(ms: Any, expect_error: ExpectError) -> None:
    ada = await create(ms, name="Ada", email="ada@x.io", score=7)
    assert ada["name"] == "Ada" and ada["score"] == 7 and ada["company"] is None
    assert isinstance(ada["id"], str) and ada["id"]
    assert ada["created_at"].endswith("Z")

    got = await ms.GetRecord(mpb.GetRecordRequest(model="Contact", id=ada["id"]))
    assert plain(got) == ada
    only = await ms.GetRecord(
        mpb.GetRecordRequest(model="Contact", id=ada["id"], fields=["name", "score"])
    )
    assert plain(only) == {"name": "Ada", "score": 7}

    updated = await ms.UpdateRecord(
        mpb.UpdateRecordRequest(
            model="Contact",
            id=ada["id"],
            record=struct(name="Ignored", score=8),
            update_mask=field_mask_pb2.FieldMask(paths=["score"]),
        )
    )
    assert (updated["name"], updated["score"]) == ("Ada", 8)
    no_mask = await ms.UpdateRecord(
        mpb.UpdateRecordRequest(
            model="Contact", id=ada["id"], record=struct(company="Acme", phone_number="1")
        )
    )
    assert (no_mask["company"], no_mask["phone_number"], no_mask["score"]) == ("Acme", "1", 8)
    camel = await ms.UpdateRecord(
        mpb.UpdateRecordRequest(
            model="Contact",
            id=ada["id"],
            record=struct(phone_number="2"),
            update_mask=field_mask_pb2.FieldMask(paths=["phoneNumber"]),
        )
    )
    assert camel["phone_number"] == "2"
    cleared = await ms.UpdateRecord(  # a masked field absent from the record is cleared
        mpb.UpdateRecordRequest(
            model="Contact",
            id=ada["id"],
            record=struct(),
            update_mask=field_mask_pb2.FieldMask(paths=["company"]),
        )
    )
    assert cleared["company"] is None and cleared["phone_number"] == "2"
    assert cleared["updated_at"] >= ada["updated_at"]

    await ms.DeleteRecord(mpb.DeleteRecordRequest(model="Contact", id=ada["id"]))
    for call in (
        ms.GetRecord(mpb.GetRecordRequest(model="Contact", id=ada["id"])),
        ms.DeleteRecord(mpb.DeleteRecordRequest(model="Contact", id=ada["id"])),
        ms.UpdateRecord(
            mpb.UpdateRecordRequest(model="Contact", id=ada["id"], record=struct(score=1))
        ),
    ):
        await expect_error(call, NOT_FOUND, "RECORD_NOT_FOUND")
    assert await count(ms) == 0


async def test_record_errors_name_the_field(ms: Any, expect_error: ExpectError) -> None:
    await create(ms, name="Ada", email="ada@x.io")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"email": "b@x.io"}, "record.name"),  # required field missing
        ({"name": 5, "email": "b@x.io"}, "record.name"),  # wrong type
        ({"name": "B", "email": "b@x.io", "score": "many"}, "record.score"),
        ({"name": "B", "email": "b@x.io", "score": 1.5}, "record.score"),
        ({"name": "B", "email": "b@x.io", "bogus": 1}, "record.bogus"),
        ({"name": None, "email": "b@x.io"}, "record.name"),  # null for a non-null field
    ]
    for values, field in cases:
        await expect_error(
            ms.CreateRecord(mpb.CreateRecordRequest(model="Contact", record=struct(**values))),
            INVALID,
            "RECORD_INVALID",
            fields=[field],
        )
    await expect_error(
        ms.CreateRecord(
            mpb.CreateRecordRequest(model="Contact", record=struct(name="A2", email="ada@x.io"))
        ),
        EXISTS,
        "RECORD_ALREADY_EXISTS",
    )
    meta, _ = await expect_error(
        ms.CreateRecord(mpb.CreateRecordRequest(model="Nope", record=struct(name="x"))),
        NOT_FOUND,
        "MODEL_NOT_FOUND",
        fields=["model"],
    )
    assert meta["model"] == "Nope"
    ada = (await ms.ListRecords(mpb.ListRecordsRequest(model="Contact"))).records[0]
    await expect_error(
        ms.UpdateRecord(
            mpb.UpdateRecordRequest(model="Contact", id=ada["id"], record=struct(score="x"))
        ),
        INVALID,
        "RECORD_INVALID",
        fields=["record.score"],
    )
    await expect_error(
        ms.UpdateRecord(
            mpb.UpdateRecordRequest(
                model="Contact",
                id=ada["id"],
                record=struct(score=1),
                update_mask=field_mask_pb2.FieldMask(paths=["score", "nope"]),
            )
        ),
        INVALID,
        "REQUEST_INVALID",
        fields=["update_mask.paths[1]"],
    )
    await expect_error(
        ms.GetRecord(mpb.GetRecordRequest(model="Contact", id=ada["id"], fields=["nope"])),
        INVALID,
        "QUERY_INVALID",
        fields=["fields[0]"],
    )
    assert await count(ms) == 1
    assert (await ms.GetRecord(mpb.GetRecordRequest(model="Contact", id=ada["id"])))["score"] == 0


async def test_list_records_filter_order_pages_fields(ms: Any, expect_error: ExpectError) -> None:
    people = await seed(ms)
    by_name = {p["name"]: p for p in people}

    def names(resp: Any) -> list[str]:
        return [r["name"] for r in resp.records]

    acme = await ms.ListRecords(
        mpb.ListRecordsRequest(model="Contact", filter=struct(company="Acme"), order_by="name")
    )
    assert names(acme) == ["Ann", "Bob"]
    ranked = await ms.ListRecords(mpb.ListRecordsRequest(model="Contact", order_by="-score,name"))
    assert names(ranked) == ["Cid", "Ann", "Bob", "Dee"]
    combined = await ms.ListRecords(
        mpb.ListRecordsRequest(
            model="Contact",
            filter=struct(
                **{
                    "$or": [{"score": {"$gte": 5}}, {"company": {"$null": True}}],
                    "name": {"$ne": "Cid"},
                }
            ),
        )
    )
    assert names(combined) == ["Ann"]
    in_list = await ms.ListRecords(
        mpb.ListRecordsRequest(
            model="Contact", filter=struct(name={"$in": ["Bob", "Dee"]}), order_by="name"
        )
    )
    assert names(in_list) == ["Bob", "Dee"]

    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = await ms.ListRecords(
            mpb.ListRecordsRequest(
                model="Contact", order_by="score,name", page_size=1, page_token=token
            )
        )
        seen += names(page)
        token = page.next_page_token
        if not token:
            break
    assert seen == ["Bob", "Dee", "Ann", "Cid"]

    projected = await ms.ListRecords(
        mpb.ListRecordsRequest(model="Contact", order_by="name", fields=["name", "score"])
    )
    assert plain(projected.records[0]) == {"name": "Ann", "score": 5}
    assert all(set(r.keys()) <= {"id", "name", "score"} for r in projected.records)

    assert await count(ms) == 4
    assert await count(ms, score=3) == 2
    assert await count(ms, score={"$gt": 3}) == 2
    assert by_name["Cid"]["company"] is None

    first = await ms.ListRecords(mpb.ListRecordsRequest(model="Contact", page_size=2))
    await expect_error(
        ms.ListRecords(
            mpb.ListRecordsRequest(model="Contact", page_size=2, page_token="not-a-token")
        ),
        INVALID,
        "PAGE_TOKEN_INVALID",
        fields=["page_token"],
    )
    await expect_error(  # a token is only valid with the request that issued it
        ms.ListRecords(
            mpb.ListRecordsRequest(
                model="Contact",
                page_size=2,
                order_by="-name",
                page_token=first.next_page_token,
            )
        ),
        INVALID,
        "PAGE_TOKEN_INVALID",
    )


BAD_FILTERS: list[tuple[dict[str, Any], str]] = [
    ({"score": {"$regex": ".*"}}, "filter.score.$regex"),
    ({"nope": 1}, "filter.nope"),
    ({"name; DROP TABLE contact; --": "x"}, "filter.name; DROP TABLE contact; --"),
    ({"name) OR 1=1 --": "x"}, "filter.name) OR 1=1 --"),
    ({"score": {"$gt": "3; DELETE FROM contact"}}, "filter.score.$gt"),
]


async def test_bad_filters_are_query_errors(ms: Any, expect_error: ExpectError) -> None:
    await seed(ms)
    for flt, field in BAD_FILTERS:
        for call in (
            ms.ListRecords(mpb.ListRecordsRequest(model="Contact", filter=struct(**flt))),
            ms.CountRecords(mpb.CountRecordsRequest(model="Contact", filter=struct(**flt))),
            ms.BulkDeleteRecords(
                mpb.BulkDeleteRecordsRequest(model="Contact", filter=struct(**flt))
            ),
        ):
            await expect_error(call, INVALID, "QUERY_INVALID", fields=[field])
    assert await count(ms) == 4


async def test_order_by_and_fields_errors(ms: Any, expect_error: ExpectError) -> None:
    _, violations = await expect_error(
        ms.ListRecords(mpb.ListRecordsRequest(model="Contact", order_by="name; DROP TABLE x")),
        INVALID,
        "QUERY_INVALID",
    )
    assert violations[0][0].startswith("order_by")
    await expect_error(
        ms.ListRecords(mpb.ListRecordsRequest(model="Contact", fields=["name", "password"])),
        INVALID,
        "QUERY_INVALID",
        fields=["fields[1]"],
    )


async def test_injection_attempts_as_values_are_just_values(ms: Any) -> None:
    await seed(ms)
    evil = "Robert'); DROP TABLE contact; --"
    stored = await create(ms, name=evil, email="bobby@x.io", company="' OR '1'='1")
    got = await ms.GetRecord(mpb.GetRecordRequest(model="Contact", id=stored["id"]))
    assert got["name"] == evil
    assert await count(ms, company="' OR '1'='1") == 1
    assert await count(ms, name="x' OR '1'='1") == 0
    assert await count(ms, name={"$like": "%' OR 1=1 --%"}) == 0
    assert await count(ms) == 5  # every row still there, the table intact


async def test_record_id_injection_is_not_found(ms: Any, expect_error: ExpectError) -> None:
    await seed(ms)
    for bad_id in ("' OR '1'='1", "1; DROP TABLE contact"):
        await expect_error(
            ms.GetRecord(mpb.GetRecordRequest(model="Contact", id=bad_id)),
            NOT_FOUND,
            "RECORD_NOT_FOUND",
        )
        await expect_error(
            ms.DeleteRecord(mpb.DeleteRecordRequest(model="Contact", id=bad_id)),
            NOT_FOUND,
            "RECORD_NOT_FOUND",
        )
    assert await count(ms) == 4


async def test_upsert_reports_created(ms: Any, expect_error: ExpectError) -> None:
    first = await ms.UpsertRecord(
        mpb.UpsertRecordRequest(
            model="Contact", record=struct(name="Ada", email="ada@x.io", score=1)
        )
    )
    assert first.created and first.record["score"] == 1
    again = await ms.UpsertRecord(
        mpb.UpsertRecordRequest(
            model="Contact",
            record=struct(name="Ada L.", email="ada@x.io", score=2),
            conflict_on=["email"],
        )
    )
    assert not again.created
    assert again.record["id"] == first.record["id"]
    assert (again.record["name"], again.record["score"]) == ("Ada L.", 2)
    by_id = await ms.UpsertRecord(
        mpb.UpsertRecordRequest(
            model="Contact", record=struct(id=first.record["id"], name="Ada", email="ada@x.io")
        )
    )
    assert not by_id.created and by_id.record["name"] == "Ada"
    # a field left out keeps its value (score 2), never reset to its default (0)
    assert by_id.record["score"] == 2
    assert await count(ms) == 1
    await expect_error(
        ms.UpsertRecord(
            mpb.UpsertRecordRequest(
                model="Contact", record=struct(name=3, email="z@x.io"), conflict_on=["email"]
            )
        ),
        INVALID,
        "RECORD_INVALID",
        fields=["record.name"],
    )
    await expect_error(  # silently ignoring the mask would overwrite fields meant to stay
        ms.UpsertRecord(
            mpb.UpsertRecordRequest(
                model="Contact",
                record=struct(name="Ada", email="ada@x.io"),
                conflict_on=["email"],
                update_mask=field_mask_pb2.FieldMask(paths=["name"]),
            )
        ),
        INVALID,
        "REQUEST_INVALID",
        fields=["update_mask"],
    )


async def test_bulk_create_counts_and_a_bad_row_writes_nothing(
    ms: Any, expect_error: ExpectError
) -> None:
    rows = [struct(name=f"P{i}", email=f"p{i}@x.io", score=i) for i in range(3)]
    resp = await ms.BulkCreateRecords(mpb.BulkCreateRecordsRequest(model="Contact", records=rows))
    assert resp.created_count == 3

    good = struct(name="Q0", email="q0@x.io")
    bad_rows: list[tuple[struct_pb2.Struct, str]] = [
        (struct(name=5, email="q1@x.io"), "records[1].name"),  # DataFlow rejects it
        (struct(name="Q1", email="q1@x.io", score="x"), "records[1].score"),  # the server does
        (struct(email="q2@x.io"), "records[1].name"),  # required, missing
    ]
    for row, field in bad_rows:
        await expect_error(
            ms.BulkCreateRecords(
                mpb.BulkCreateRecordsRequest(model="Contact", records=[good, row])
            ),
            INVALID,
            "RECORD_INVALID",
            fields=[field],
        )
    await expect_error(  # a duplicate in the batch: nothing written either
        ms.BulkCreateRecords(
            mpb.BulkCreateRecordsRequest(
                model="Contact",
                records=[struct(name="Q0", email="q0@x.io"), struct(name="Q1", email="p0@x.io")],
            )
        ),
        EXISTS,
        "RECORD_ALREADY_EXISTS",
    )
    assert await count(ms) == 3
    assert await count(ms, name="Q0") == 0


async def test_bulk_update_delete_upsert(ms: Any, expect_error: ExpectError) -> None:
    await seed(ms)
    upd = await ms.BulkUpdateRecords(
        mpb.BulkUpdateRecordsRequest(
            model="Contact", filter=struct(company="Acme"), values=struct(score=10)
        )
    )
    assert upd.updated_count == 2
    assert await count(ms, score=10) == 2
    await expect_error(
        ms.BulkUpdateRecords(mpb.BulkUpdateRecordsRequest(model="Contact", values=struct(score=0))),
        INVALID,
        "QUERY_INVALID",
        fields=["filter"],
    )
    await expect_error(
        ms.BulkUpdateRecords(
            mpb.BulkUpdateRecordsRequest(
                model="Contact", filter=struct(company="Acme"), values=struct(score="high")
            )
        ),
        INVALID,
        "RECORD_INVALID",
        fields=["values.score"],
    )
    everyone = await ms.BulkUpdateRecords(
        mpb.BulkUpdateRecordsRequest(model="Contact", values=struct(score=1), allow_all=True)
    )
    assert everyone.updated_count == 4 and await count(ms, score=1) == 4

    await expect_error(
        ms.BulkDeleteRecords(mpb.BulkDeleteRecordsRequest(model="Contact")),
        INVALID,
        "QUERY_INVALID",
        fields=["filter"],
    )
    deleted = await ms.BulkDeleteRecords(
        mpb.BulkDeleteRecordsRequest(model="Contact", filter=struct(company="Acme"))
    )
    assert deleted.deleted_count == 2 and await count(ms) == 2

    ups = await ms.BulkUpsertRecords(
        mpb.BulkUpsertRecordsRequest(
            model="Contact",
            records=[
                struct(name="Cid2", email="cid@x.io", score=4),
                struct(name="Eve", email="eve@x.io", score=4),
            ],
            conflict_on=["email"],
        )
    )
    assert ups.upserted_count == 2
    assert await count(ms) == 3 and await count(ms, score=4) == 2
    await expect_error(
        ms.BulkUpsertRecords(
            mpb.BulkUpsertRecordsRequest(
                model="Contact",
                records=[struct(name="Fay", email="fay@x.io"), struct(name=1, email="g@x.io")],
                conflict_on=["email"],
            )
        ),
        INVALID,
        "RECORD_INVALID",
        fields=["records[1].name"],
    )
    assert await count(ms) == 3
    deleted_all = await ms.BulkDeleteRecords(
        mpb.BulkDeleteRecordsRequest(model="Contact", allow_all=True)
    )
    assert deleted_all.deleted_count == 3 and await count(ms) == 0


def write_create(model: str, **values: Any) -> mpb.Write:
    return mpb.Write(create=mpb.Write.Create(model=model, record=struct(**values)))


async def test_batch_write_across_models(ms: Any) -> None:
    ann = await create(ms, name="Ann", email="ann@x.io")
    resp = await ms.BatchWrite(
        mpb.BatchWriteRequest(
            writes=[
                write_create("Company", name="Acme", employees=3),
                write_create("Contact", name="Bob", email="bob@x.io", company="Acme"),
                mpb.Write(
                    update=mpb.Write.Update(
                        model="Contact", id=ann["id"], record=struct(company="Acme")
                    )
                ),
                mpb.Write(
                    upsert=mpb.Write.Upsert(
                        model="Company", record=struct(name="Init"), conflict_on=["name"]
                    )
                ),
            ]
        )
    )
    assert len(resp.results) == 4
    assert resp.results[0].created and resp.results[0].record["name"] == "Acme"
    assert resp.results[2].record["company"] == "Acme"
    assert resp.results[3].created
    assert await count(ms, company="Acme") == 2
    assert await count(ms, "Company") == 2

    gone = await ms.BatchWrite(
        mpb.BatchWriteRequest(
            writes=[mpb.Write(delete=mpb.Write.Delete(model="Contact", id=ann["id"]))]
        )
    )
    assert not gone.results[0].HasField("record")
    assert await count(ms) == 1


async def test_batch_write_is_all_or_nothing(ms: Any, expect_error: ExpectError) -> None:
    await create(ms, name="Ann", email="ann@x.io")
    # the third write fails in the database: the first two are rolled back
    meta, _ = await expect_error(
        ms.BatchWrite(
            mpb.BatchWriteRequest(
                writes=[
                    write_create("Company", name="Acme"),
                    write_create("Contact", name="Bob", email="bob@x.io"),
                    write_create("Contact", name="Ann 2", email="ann@x.io"),
                ]
            )
        ),
        EXISTS,
        "RECORD_ALREADY_EXISTS",
    )
    assert meta["write_index"] == "2"
    assert await count(ms, "Company") == 0 and await count(ms) == 1

    meta, _ = await expect_error(  # a value DataFlow rejects, in the second write
        ms.BatchWrite(
            mpb.BatchWriteRequest(
                writes=[
                    write_create("Company", name="Acme"),
                    write_create("Contact", name=5, email="c@x.io"),
                ]
            )
        ),
        INVALID,
        "RECORD_INVALID",
        fields=["writes[1].create.record.name"],
    )
    assert meta["write_index"] == "1"
    await expect_error(  # a value the server rejects before anything runs
        ms.BatchWrite(
            mpb.BatchWriteRequest(
                writes=[
                    write_create("Company", name="Acme"),
                    write_create("Contact", name="C", email="c@x.io", score="many"),
                ]
            )
        ),
        INVALID,
        "RECORD_INVALID",
        fields=["writes[1].create.record.score"],
    )
    meta, _ = await expect_error(
        ms.BatchWrite(
            mpb.BatchWriteRequest(
                writes=[
                    write_create("Company", name="Acme"),
                    mpb.Write(delete=mpb.Write.Delete(model="Contact", id="missing")),
                ]
            )
        ),
        NOT_FOUND,
        "RECORD_NOT_FOUND",
    )
    assert meta["write_index"] == "1"
    await expect_error(
        ms.BatchWrite(mpb.BatchWriteRequest(writes=[write_create("Nope", name="x")])),
        NOT_FOUND,
        "MODEL_NOT_FOUND",
        fields=["writes[0].create.model"],
    )
    await expect_error(
        ms.BatchWrite(mpb.BatchWriteRequest(writes=[mpb.Write()])),
        INVALID,
        "REQUEST_INVALID",
        fields=["writes[0]"],
    )
    await expect_error(
        ms.BatchWrite(mpb.BatchWriteRequest()), INVALID, "REQUEST_INVALID", fields=["writes"]
    )
    assert await count(ms, "Company") == 0 and await count(ms) == 1


async def test_create_record_request_id(ms: Any, expect_error: ExpectError) -> None:
    req = mpb.CreateRecordRequest(
        model="Contact", record=struct(name="Ada", email="ada@x.io"), request_id="create-1"
    )
    first = await ms.CreateRecord(req)
    again = await ms.CreateRecord(req)
    assert plain(again) == plain(first)
    assert await count(ms) == 1
    other = mpb.CreateRecordRequest(
        model="Contact", record=struct(name="Bob", email="bob@x.io"), request_id="create-1"
    )
    await expect_error(ms.CreateRecord(other), EXISTS, "REQUEST_ID_CONFLICT", fields=["request_id"])
    # keyed by caller: another caller's identical key is another request
    bob = await ms.CreateRecord(other, metadata=(("x-nexus-caller", "bob"),))
    assert bob["name"] == "Bob"
    assert await count(ms) == 2
    await expect_error(
        ms.CreateRecord(
            mpb.CreateRecordRequest(
                model="Contact", record=struct(name="C", email="c@x.io"), request_id="r" * 129
            )
        ),
        INVALID,
        "REQUEST_INVALID",
        fields=["request_id"],
    )
    # a failed write does not burn the key: the retry after fixing the input works
    bad = mpb.CreateRecordRequest(
        model="Contact", record=struct(name="Ann", email="ada@x.io"), request_id="create-2"
    )
    await expect_error(ms.CreateRecord(bad), EXISTS, "RECORD_ALREADY_EXISTS")
    assert await count(ms) == 2


@pytest.mark.parametrize("flt", [{"$and": []}, {"$and": [{}]}, {"$or": [{}]}])
async def test_a_filter_that_matches_everything_still_needs_allow_all(
    ms: Any, flt: dict[str, Any]
) -> None:
    await seed(ms)
    try:
        await ms.BulkDeleteRecords(
            mpb.BulkDeleteRecordsRequest(model="Contact", filter=struct(**flt)), timeout=10
        )
    except grpc.aio.AioRpcError as err:
        assert err.code() == INVALID
    assert await count(ms) == 4


async def test_request_field_errors(ms: Any, expect_error: ExpectError) -> None:
    ada = await create(ms, name="Ada", email="ada@x.io")
    nan = float("nan")
    await expect_error(  # NaN is no JSON number: the caller's mistake, named
        ms.CreateRecord(
            mpb.CreateRecordRequest(model="Contact", record=struct(name="B", email="b", score=nan))
        ),
        INVALID,
        "REQUEST_INVALID",
        fields=["record.score"],
    )
    await expect_error(
        ms.ListRecords(
            mpb.ListRecordsRequest(model="Contact", filter=struct(score={"$in": [1, float("inf")]}))
        ),
        INVALID,
        "REQUEST_INVALID",
        fields=["filter.score.$in[1]"],
    )
    await expect_error(
        ms.UpdateRecord(mpb.UpdateRecordRequest(model="Contact", id=ada["id"], record=struct())),
        INVALID,
        "REQUEST_INVALID",
        fields=["record"],
    )
    await expect_error(
        ms.UpsertRecord(
            mpb.UpsertRecordRequest(
                model="Contact", record=struct(name="A", email="a@x.io"), conflict_on=["name"]
            )
        ),
        INVALID,
        "REQUEST_INVALID",
        fields=["conflict_on"],
    )
    meta, _ = await expect_error(
        ms.BatchWrite(
            mpb.BatchWriteRequest(
                writes=[
                    write_create("Company", name="Acme"),
                    mpb.Write(
                        upsert=mpb.Write.Upsert(
                            model="Contact", record=struct(name="A", email="a"), conflict_on=["x"]
                        )
                    ),
                ]
            )
        ),
        INVALID,
        "REQUEST_INVALID",
        fields=["writes[1].upsert.conflict_on"],
    )
    assert meta["write_index"] == "1"
    await expect_error(
        ms.BatchWrite(
            mpb.BatchWriteRequest(
                writes=[
                    mpb.Write(
                        update=mpb.Write.Update(
                            model="Contact",
                            id=ada["id"],
                            record=struct(score=1),
                            update_mask=field_mask_pb2.FieldMask(paths=["score", "nope"]),
                        )
                    )
                ]
            )
        ),
        INVALID,
        "REQUEST_INVALID",
        fields=["writes[0].update.update_mask.paths[1]"],
    )
    assert await count(ms) == 1 and await count(ms, "Company") == 0


async def test_concurrent_retries_write_once(ms: Any) -> None:
    req = mpb.CreateRecordRequest(
        model="Contact", record=struct(name="Ada", email="ada@x.io"), request_id="burst"
    )

    async def one() -> dict[str, Any]:
        return plain(await ms.CreateRecord(req, timeout=10))

    async with asyncio.timeout(20):
        results = await asyncio.gather(*(one() for _ in range(10)))
    assert all(r == results[0] for r in results)
    assert await count(ms) == 1
