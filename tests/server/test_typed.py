"""Typed per-model descriptors: messages, services, routes and record conversion."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.json_format import MessageToDict

from nexus_server._typed import (
    FieldInfo,
    ModelInfo,
    TypedModels,
    collection_id,
    message_to_fields,
    record_to_message,
)


class Tier(enum.Enum):
    FREE = "free"
    PRO = "pro"


CONTACT = ModelInfo(
    "Contact",
    (
        FieldInfo("id", str, primary_key=True),
        FieldInfo("name", str),
        FieldInfo("score", int),
        FieldInfo("ratio", float),
        FieldInfo("active", bool),
        FieldInfo("company", str, nullable=True),
        FieldInfo("balance", decimal.Decimal),
        FieldInfo("born", dt.date),
        FieldInfo("ref", uuid.UUID),
        FieldInfo("tier", Tier),
        FieldInfo("meta", dict),
        FieldInfo("tags", list),
        FieldInfo("avatar", bytes),
        FieldInfo("created_at", dt.datetime, read_only=True),
    ),
)
COMPANY = ModelInfo("Company", (FieldInfo("id", int, primary_key=True), FieldInfo("name", str)))


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


def test_message_fields_have_real_types_and_presence() -> None:
    typed = TypedModels([CONTACT, COMPANY])
    desc = typed.pool.FindMessageTypeByName("nexus.models.v1.Contact")
    f = {fd.name: fd for fd in desc.fields}
    t = descriptor_pb2.FieldDescriptorProto
    assert f["score"].type == t.TYPE_INT64
    assert f["ratio"].type == t.TYPE_DOUBLE
    assert f["active"].type == t.TYPE_BOOL
    assert f["avatar"].type == t.TYPE_BYTES
    assert f["created_at"].message_type.full_name == "google.protobuf.Timestamp"
    assert f["meta"].message_type.full_name == "google.protobuf.Struct"
    assert f["tags"].message_type.full_name == "google.protobuf.ListValue"
    assert f["balance"].type == t.TYPE_STRING
    assert all(fd.has_presence for fd in desc.fields)
    company_id = typed.pool.FindMessageTypeByName("nexus.models.v1.GetCompanyRequest").fields[0]
    assert company_id.type == t.TYPE_INT64


def test_services_and_http_routes() -> None:
    typed = TypedModels([CONTACT, COMPANY])
    assert typed.service_names == [
        "nexus.models.v1.ContactService",
        "nexus.models.v1.CompanyService",
    ]
    svc = typed.pool.FindServiceByName("nexus.models.v1.ContactService")
    routes = {}
    for m in svc.methods:
        opts = descriptor_pb2.MethodOptions()
        opts.ParseFromString(m.GetOptions().SerializeToString())
        rule = opts.Extensions[annotations_pb2.http]
        routes[m.name] = (rule.WhichOneof("pattern"), getattr(rule, rule.WhichOneof("pattern")))
    assert routes == {
        "CreateContact": ("post", "/v1/contacts"),
        "GetContact": ("get", "/v1/contacts/{id}"),
        "UpdateContact": ("patch", "/v1/contacts/{contact.id}"),
        "DeleteContact": ("delete", "/v1/contacts/{id}"),
        "ListContacts": ("get", "/v1/contacts"),
        "CountContacts": ("get", "/v1/contacts:count"),
        "UpsertContact": ("post", "/v1/contacts:upsert"),
        "BulkCreateContacts": ("post", "/v1/contacts:bulkCreate"),
        "BulkUpdateContacts": ("post", "/v1/contacts:bulkUpdate"),
        "BulkDeleteContacts": ("post", "/v1/contacts:bulkDelete"),
        "BulkUpsertContacts": ("post", "/v1/contacts:bulkUpsert"),
    }


def test_record_round_trip() -> None:
    typed = TypedModels([CONTACT])
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
    msg = record_to_message(CONTACT, record, typed.message_class("Contact"))
    doc = MessageToDict(msg, preserving_proto_field_name=True)
    assert doc["score"] == str(2**40)  # proto3 JSON: int64 as a string
    assert doc["balance"] == "10.25"
    assert doc["created_at"] == "2026-01-02T03:04:05.678Z"
    assert "company" not in doc  # null is an unset field
    assert doc["active"] is False  # set to its zero value, still present
    back = message_to_fields(CONTACT, msg)
    assert back["created_at"] == now
    assert back["score"] == 2**40
    assert back["balance"] == "10.25"
    assert back["ref"] == str(ref)
    assert back["tier"] == "pro"
    assert back["meta"] == {"k": "v"}
    assert back["tags"] == ["a", "b"]
    assert "company" not in back


def test_file_set_is_self_contained() -> None:
    typed = TypedModels([CONTACT])
    names = [f.name for f in typed.file_set().file]
    assert names[-1] == "nexus/models/v1/models.proto"
    for needed in ("google/api/annotations.proto", "google/protobuf/timestamp.proto"):
        assert needed in names
        assert names.index(needed) < names.index("nexus/models/v1/models.proto")
