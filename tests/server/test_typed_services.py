"""The typed per-model services, called with message classes obtained ONLY through
server reflection (ProtoReflectionDescriptorDatabase + DescriptorPool +
message_factory.GetMessageClass): nothing here imports a Contact message."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_server import Serving

ExpectError = Callable[..., Awaitable[tuple[dict[str, str], list[tuple[str, str]]]]]
SERVICE = "nexus.models.v1.ContactService"
Classes = dict[str, tuple[type[message.Message], type[message.Message]]]


def _reflect(address: str, service: str) -> tuple[list[str], Classes]:
    """Every service the server lists, and (request, response) classes of `service`'s
    methods, built from the descriptors reflection sends."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        desc = pool.FindServiceByName(service)
        classes: Classes = {
            m.name: (
                message_factory.GetMessageClass(m.input_type),
                message_factory.GetMessageClass(m.output_type),
            )
            for m in desc.methods
        }
    return services, classes


class Typed:
    """Calls `nexus.models.v1.<Model>Service` methods on an aio channel."""

    def __init__(self, channel: grpc.aio.Channel, service: str, classes: Classes) -> None:
        self.channel = channel
        self.service = service
        self.classes = classes

    def request(self, method: str, /, **fields: Any) -> Any:
        return self.classes[method][0](**fields)

    def message(self, type_name: str, /, **fields: Any) -> Any:
        """A message class other than a request, found through a request's fields."""
        for req, _ in self.classes.values():
            for f in req.DESCRIPTOR.fields:
                desc: Any = f.message_type
                if desc is not None and desc.name == type_name:
                    return message_factory.GetMessageClass(desc)(**fields)
        raise KeyError(type_name)

    async def __call__(self, method: str, request: Any, **kw: Any) -> Any:
        req_cls, resp_cls = self.classes[method]
        call = self.channel.unary_unary(
            f"/{self.service}/{method}",
            request_serializer=req_cls.SerializeToString,
            response_deserializer=resp_cls.FromString,
        )
        kw.setdefault("timeout", 10)
        return await call(request, **kw)


@pytest.fixture
async def reflected(serving: Serving, channel: grpc.aio.Channel) -> tuple[list[str], Typed]:
    # reflection's descriptor database is synchronous: it runs in a thread while this
    # loop serves it
    services, classes = await asyncio.wait_for(
        asyncio.to_thread(_reflect, serving.address, SERVICE), timeout=10
    )
    return services, Typed(channel, SERVICE, classes)


async def test_reflection_lists_every_service(
    reflected: tuple[list[str], Typed], serving: Serving
) -> None:
    services, typed = reflected
    assert set(services) >= {
        "nexus.workflow.v1.WorkflowService",
        "nexus.model.v1.ModelService",
        "nexus.models.v1.ContactService",
        "nexus.models.v1.CompanyService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert set(serving.services) <= set(services)
    assert set(typed.classes) == {
        "CreateContact",
        "GetContact",
        "UpdateContact",
        "DeleteContact",
        "ListContacts",
        "CountContacts",
        "UpsertContact",
        "BulkCreateContacts",
        "BulkUpdateContacts",
        "BulkDeleteContacts",
        "BulkUpsertContacts",
    }
    contact = typed.classes["GetContact"][1].DESCRIPTOR
    assert contact.full_name == "nexus.models.v1.Contact"
    types = {f.name: f.type for f in contact.fields}
    fd = contact.fields_by_name
    assert types["score"] == fd["score"].TYPE_INT64
    assert types["name"] == fd["name"].TYPE_STRING
    timestamp: Any = fd["created_at"].message_type
    assert timestamp.full_name == "google.protobuf.Timestamp"


async def test_typed_crud(reflected: tuple[list[str], Typed], ms: Any) -> None:
    _, typed = reflected
    created = await typed(
        "CreateContact",
        typed.request(
            "CreateContact",
            contact=typed.message("Contact", name="Ada", email="ada@x.io", score=2**40),
        ),
    )
    assert created.id and created.name == "Ada" and created.score == 2**40
    assert not created.HasField("company")  # null is an unset field
    assert created.created_at.seconds > 0

    got = await typed("GetContact", typed.request("GetContact", id=created.id))
    assert got == created
    generic = await ms.GetRecord(mpb.GetRecordRequest(model="Contact", id=created.id))
    assert generic["email"] == "ada@x.io"  # one store behind both services

    mask = typed.message("FieldMask", paths=["score"])
    updated = await typed(
        "UpdateContact",
        typed.request(
            "UpdateContact",
            contact=typed.message("Contact", id=created.id, name="Ignored", score=3),
            update_mask=mask,
        ),
    )
    assert (updated.name, updated.score) == ("Ada", 3)

    upserted = await typed(
        "UpsertContact",
        typed.request(
            "UpsertContact",
            contact=typed.message("Contact", name="Bob", email="bob@x.io"),
            conflict_on=["email"],
        ),
    )
    assert upserted.name == "Bob" and upserted.score == 0

    bulk = await typed(
        "BulkCreateContacts",
        typed.request(
            "BulkCreateContacts",
            contacts=[
                typed.message("Contact", name=f"P{i}", email=f"p{i}@x.io", score=i)
                for i in range(3)
            ],
        ),
    )
    assert bulk.affected == 3

    listed = await typed(
        "ListContacts", typed.request("ListContacts", order_by="-score,name", page_size=2)
    )
    assert [c.name for c in listed.contacts] == ["Ada", "P2"]
    assert listed.next_page_token
    rest = await typed(
        "ListContacts",
        typed.request(
            "ListContacts", order_by="-score,name", page_size=2, page_token=listed.next_page_token
        ),
    )
    assert [c.name for c in rest.contacts] == ["P1", "Bob"]
    flt = typed.message("Struct")
    flt.update({"score": {"$lt": 2}})
    counted = await typed("CountContacts", typed.request("CountContacts", filter=flt))
    assert counted.count == 3  # P0, P1, Bob

    values = typed.message("Contact", company="Acme")  # typed values, a Struct filter
    acme = typed.message("Struct")
    acme.update({"name": {"$like": "P%"}})
    changed = await typed(
        "BulkUpdateContacts", typed.request("BulkUpdateContacts", filter=acme, values=values)
    )
    assert changed.affected == 3
    in_acme = typed.message("Struct")
    in_acme.update({"company": "Acme"})
    counted = await typed("CountContacts", typed.request("CountContacts", filter=in_acme))
    assert counted.count == 3
    removed = await typed("BulkDeleteContacts", typed.request("BulkDeleteContacts", filter=acme))
    assert removed.affected == 3

    await typed("DeleteContact", typed.request("DeleteContact", id=created.id))
    total = await typed("CountContacts", typed.request("CountContacts"))
    assert total.count == 1


async def test_typed_errors(reflected: tuple[list[str], Typed], expect_error: ExpectError) -> None:
    _, typed = reflected
    await expect_error(
        typed("GetContact", typed.request("GetContact", id="missing")),
        grpc.StatusCode.NOT_FOUND,
        "RECORD_NOT_FOUND",
    )
    await expect_error(
        typed(
            "CreateContact",
            typed.request("CreateContact", contact=typed.message("Contact", email="a@x.io")),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RECORD_INVALID",
        fields=["contact.name"],
    )
    await expect_error(
        typed(
            "BulkCreateContacts",
            typed.request(
                "BulkCreateContacts",
                contacts=[
                    typed.message("Contact", name="A", email="a@x.io"),
                    typed.message("Contact", email="b@x.io"),
                ],
            ),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RECORD_INVALID",
        fields=["contacts[1].name"],
    )
    await expect_error(
        typed(
            "UpdateContact",
            typed.request("UpdateContact", contact=typed.message("Contact", name="x")),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_INVALID",
        fields=["contact.id"],
    )
    bad = typed.message("Struct")
    bad.update({"score": {"$regex": "1"}})
    await expect_error(
        typed("ListContacts", typed.request("ListContacts", filter=bad)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "QUERY_INVALID",
        fields=["filter.score.$regex"],
    )
    await expect_error(
        typed("BulkDeleteContacts", typed.request("BulkDeleteContacts")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "QUERY_INVALID",
        fields=["filter"],
    )
    total = await typed("CountContacts", typed.request("CountContacts"))
    assert total.count == 0


async def test_typed_create_request_id(
    reflected: tuple[list[str], Typed], expect_error: ExpectError
) -> None:
    _, typed = reflected
    req = typed.request(
        "CreateContact",
        contact=typed.message("Contact", name="Ada", email="ada@x.io"),
        request_id="typed-1",
    )
    first = await typed("CreateContact", req)
    assert await typed("CreateContact", req) == first
    other = typed.request(
        "CreateContact",
        contact=typed.message("Contact", name="Bob", email="bob@x.io"),
        request_id="typed-1",
    )
    await expect_error(
        typed("CreateContact", other), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_CONFLICT"
    )
    assert (await typed("CountContacts", typed.request("CountContacts"))).count == 1
