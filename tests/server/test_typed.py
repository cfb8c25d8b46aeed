"""Typed per-model descriptors: messages, services, routes and record conversion."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import enum
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.json_format import MessageToDict

from dataflow import DataFlow, ModelInfo
from nexus_server._typed import (
    TypedModels,
    collection_id,
    message_to_fields,
    record_to_message,
)


class Tier(enum.Enum):
    FREE = "free"
    PRO = "pro"


@pytest.fixture(scope="module")
def models() -> Iterator[tuple[ModelInfo, ModelInfo]]:
    db = DataFlow("sqlite:///:memory:")

    @db.model
    class TContact:
        id: str
        name: str
        score: int
        ratio: float
        active: bool
        company: str | None
        balance: decimal.Decimal
        born: dt.date
        ref: uuid.UUID
        tier: Tier
        meta: dict[str, Any]
        tags: list[str]
        avatar: bytes

    @db.model
    class TCompany:
        id: int
        name: str

    yield db.model_info("TContact"), db.model_info("TCompany")
    asyncio.run(db.close())


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("Contact", "contacts"),
        ("Company", "companies"),
        ("Address", "addresses"),
        ("OrderLine", "order_lines"),
        ("HTTPLog", "http_logs"),
        ("Key", "keys"),
    ],
)
def test_collection_ids(model: str, expected: str) -> None:
    assert collection_id(model) == expected


def test_message_fields_have_real_types_and_presence(
    models: tuple[ModelInfo, ModelInfo],
) -> None:
    typed = TypedModels(models)
    desc = typed.pool.FindMessageTypeByName("nexus.models.v1.TContact")
    f = {fd.name: fd for fd in desc.fields}
    t = descriptor_pb2.FieldDescriptorProto
    assert f["score"].type == t.TYPE_INT64
    assert f["ratio"].type == t.TYPE_DOUBLE
    assert f["active"].type == t.TYPE_BOOL
    assert f["avatar"].type == t.TYPE_BYTES
    message_types = {n: fd.message_type.full_name for n, fd in f.items() if fd.message_type}
    assert message_types["created_at"] == "google.protobuf.Timestamp"
    assert message_types["meta"] == "google.protobuf.Struct"
    assert message_types["tags"] == "google.protobuf.ListValue"
    assert f["balance"].type == t.TYPE_STRING
    assert all(fd.has_presence for fd in desc.fields)
    company_id = typed.pool.FindMessageTypeByName("nexus.models.v1.GetTCompanyRequest").fields[0]
    assert company_id.type == t.TYPE_INT64


def test_services_and_http_routes(models: tuple[ModelInfo, ModelInfo]) -> None:
    typed = TypedModels(models)
    assert typed.service_names == [
        "nexus.models.v1.TContactService",
        "nexus.models.v1.TCompanyService",
    ]
    svc = typed.pool.FindServiceByName("nexus.models.v1.TContactService")
    routes = {}
    for m in svc.methods:
        opts = descriptor_pb2.MethodOptions()
        opts.ParseFromString(m.GetOptions().SerializeToString())
        rule = opts.Extensions[annotations_pb2.http]
        pattern = rule.WhichOneof("pattern")
        extra = [getattr(b, b.WhichOneof("pattern")) for b in rule.additional_bindings]
        routes[m.name] = (pattern, getattr(rule, pattern), *extra)
    assert routes == {
        "CreateTContact": ("post", "/v1/t_contacts"),
        "GetTContact": ("get", "/v1/t_contacts/{id}"),
        "UpdateTContact": ("patch", "/v1/t_contacts/{t_contact.id}"),
        "DeleteTContact": ("delete", "/v1/t_contacts/{id}"),
        "ListTContacts": ("get", "/v1/t_contacts", "/v1/t_contacts:search"),
        "CountTContacts": ("get", "/v1/t_contacts:count", "/v1/t_contacts:count"),
        "UpsertTContact": ("post", "/v1/t_contacts:upsert"),
        "BulkCreateTContacts": ("post", "/v1/t_contacts:bulkCreate"),
        "BulkUpdateTContacts": ("post", "/v1/t_contacts:bulkUpdate"),
        "BulkDeleteTContacts": ("post", "/v1/t_contacts:bulkDelete"),
        "BulkUpsertTContacts": ("post", "/v1/t_contacts:bulkUpsert"),
    }


def test_record_round_trip(models: tuple[ModelInfo, ModelInfo]) -> None:
    contact = models[0]
    typed = TypedModels([contact])
    now = dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=dt.UTC)
    ref = uuid.uuid4()
    record = {
        "id": "c1",
        "name": "Ada",
        "score": 2**40,
        "ratio": 0.5,
        "active": False,
        "company": None,
        "balance": decimal.Decimal("10.25"),
        "born": dt.date(1815, 12, 10),
        "ref": ref,
        "tier": Tier.PRO,
        "meta": {"k": "v"},
        "tags": ["a", "b"],
        "avatar": b"\x00\x01",
        "created_at": now,
    }
    msg = record_to_message(contact, record, typed.message_class("TContact"))
    doc = MessageToDict(msg, preserving_proto_field_name=True)
    assert doc["score"] == str(2**40)  # proto3 JSON: int64 as a string
    assert doc["balance"] == "10.25"
    assert doc["created_at"] == "2026-01-02T03:04:05.678Z"
    assert "company" not in doc  # null is an unset field
    assert doc["active"] is False  # set to its zero value, still present
    back = message_to_fields(contact, msg)
    assert back["created_at"] == now
    assert back["score"] == 2**40
    assert back["balance"] == "10.25"
    assert back["ref"] == str(ref)
    assert back["tier"] == "pro"
    assert back["meta"] == {"k": "v"}
    assert back["tags"] == ["a", "b"]
    assert "company" not in back


def test_file_set_is_self_contained(models: tuple[ModelInfo, ModelInfo]) -> None:
    typed = TypedModels(models[:1])
    names = [f.name for f in typed.file_set().file]
    assert names[-1] == "nexus/models/v1/models.proto"
    for needed in ("google/api/annotations.proto", "google/protobuf/timestamp.proto"):
        assert needed in names
        assert names.index(needed) < names.index("nexus/models/v1/models.proto")
