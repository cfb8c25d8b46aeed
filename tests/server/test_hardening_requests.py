"""Hardening of request handling (issue 14): malformed protobuf on every kind of method,
errors that never grow with the input, id and request_id limits, bulk row caps checked
before any row is converted, and typed Delete<Model> with a request_id.

Each refusal asserts the gRPC code, the ErrorInfo reason and the field violation. These
checks happen before the database is asked (except the typed delete's idempotency and
the id limits, which run on SQLite and PostgreSQL).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_server import Serving
from nexus_server._errors import ApiError, brief, to_api_error

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0
BAD_UTF8 = b"\x0a\x02\xff\xfe"  # field 1 (a string in each request below): invalid UTF-8
TRUNCATED = b"\x0a\x10ab"  # field 1 says 16 bytes follow; 2 do


def _raw(channel: grpc.aio.Channel, path: str) -> Any:
    return channel.unary_unary(path, request_serializer=None, response_deserializer=None)


def _nested_filter(depth: int) -> bytes:
    """ListRecordsRequest bytes whose `filter` (field 2) nests `depth` Structs, written by
    hand: protobuf's own encoder would refuse to build it."""
    inner = b""
    for _ in range(depth):
        value = b"\x2a" + _varint(len(inner)) + inner  # Value.struct_value (field 5)
        entry = b"\x0a\x01a\x12" + _varint(len(value)) + value  # map entry "a" -> value
        inner = b"\x0a" + _varint(len(entry)) + entry  # Struct.fields (field 1)
    model = b"\x0a\x07Contact"
    return model + b"\x12" + _varint(len(inner)) + inner


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _status(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, list[Any]]:
    status = rpc_status.from_call(err)
    assert status is not None, err
    info = error_details_pb2.ErrorInfo()
    violations: list[Any] = []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            d.Unpack(info)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            d.Unpack(bad)
            violations.extend(bad.field_violations)
    return info, violations


async def _malformed(call: Any, message: str) -> None:
    """`call` must fail INVALID_ARGUMENT/REQUEST_INVALID "the request is not a valid <message>"."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(WAIT):
            await call
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert err.details().startswith(f"the request is not a valid {message}"), err.details()
    assert "DecodeError" not in err.details() and "class" not in err.details()
    info, _ = _status(err)
    assert (info.reason, info.domain) == ("REQUEST_INVALID", "nexus")
    assert info.metadata["message"] == message


# --- malformed protobuf -------------------------------------------------------------------

UNARY_METHODS = [
    ("/nexus.model.v1.ModelService/GetRecord", "nexus.model.v1.GetRecordRequest"),
    ("/nexus.model.v1.ModelService/CreateRecord", "nexus.model.v1.CreateRecordRequest"),
    ("/nexus.workflow.v1.WorkflowService/GetWorkflow", "nexus.workflow.v1.GetWorkflowRequest"),
    ("/nexus.models.v1.ContactService/GetContact", "nexus.models.v1.GetContactRequest"),
    ("/nexus.models.v1.ContactService/CreateContact", "nexus.models.v1.CreateContactRequest"),
    ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
]


@pytest.mark.parametrize(("path", "message"), UNARY_METHODS)
@pytest.mark.parametrize("payload", [BAD_UTF8, TRUNCATED], ids=["bad-utf8", "truncated"])
async def test_malformed_protobuf_is_invalid_argument(
    channel: grpc.aio.Channel, path: str, message: str, payload: bytes
) -> None:
    await _malformed(_raw(channel, path)(payload, timeout=WAIT), message)


async def test_nesting_over_the_decoders_limit_is_invalid_argument(
    channel: grpc.aio.Channel,
) -> None:
    call = _raw(channel, "/nexus.model.v1.ModelService/ListRecords")
    await _malformed(call(_nested_filter(120), timeout=WAIT), "nexus.model.v1.ListRecordsRequest")


async def test_malformed_protobuf_on_streaming_methods(channel: grpc.aio.Channel) -> None:
    # server streaming (health Watch) and bidirectional streaming (reflection)
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch", request_serializer=None, response_deserializer=None
    )

    async def first(call: Any) -> None:
        async for _ in call:
            break

    await _malformed(first(watch(BAD_UTF8, timeout=WAIT)), "grpc.health.v1.HealthCheckRequest")
    reflect = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=None,
        response_deserializer=None,
    )
    await _malformed(
        first(reflect(iter([TRUNCATED]), timeout=WAIT)),
        "grpc.reflection.v1alpha.ServerReflectionRequest",
    )


async def test_valid_requests_still_work_after_malformed_ones(
    channel: grpc.aio.Channel, ms: Any
) -> None:
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await _raw(channel, "/nexus.model.v1.ModelService/GetRecord")(BAD_UTF8, timeout=WAIT)
    resp = await ms.ListRecords(mpb.ListRecordsRequest(model="Contact"), timeout=WAIT)
    assert list(resp.records) == []


# --- errors never grow with the input -----------------------------------------------------

LONG = "x" * 10_000


def _small(err: grpc.aio.AioRpcError) -> None:
    assert len(err.details()) < 300, len(err.details())
    info, violations = _status(err)
    assert all(len(v) <= 256 for v in info.metadata.values())
    assert all(len(v.field) <= 256 and len(v.description) <= 256 for v in violations)


async def test_a_huge_id_is_a_small_not_found(channel: grpc.aio.Channel, ms: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ms.GetRecord(mpb.GetRecordRequest(model="Contact", id=LONG), timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    info, _ = _status(caught.value)
    assert info.reason == "RECORD_NOT_FOUND"
    assert info.metadata["model"] == "Contact"
    assert info.metadata["record_id"] == LONG[:60]
    _small(caught.value)

    typed = _raw(channel, "/nexus.models.v1.ContactService/GetContact")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await typed(b"\x0a\x90\x4e" + LONG.encode(), timeout=WAIT)  # id (field 1), 10,000 bytes
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    _small(caught.value)


async def test_a_huge_model_name_is_a_small_not_found(ms: Any, expect_error: Any) -> None:
    meta, _ = await expect_error(
        ms.GetRecord(mpb.GetRecordRequest(model=LONG, id="1")),
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
        fields=["model"],
    )
    assert meta["model"] == LONG[:60]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ms.GetRecord(mpb.GetRecordRequest(model=LONG, id="1"), timeout=WAIT)
    _small(caught.value)


async def test_huge_field_names_and_many_violations_stay_bounded(ms: Any) -> None:
    record = struct_pb2.Struct()
    record.update({"name": "a", "email": "a@x.io", LONG: 1})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ms.CreateRecord(mpb.CreateRecordRequest(model="Contact", record=record), timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    _small(caught.value)

    # 2,000 unknown update_mask paths: one violation each would be ~300 KB of trailers
    req = mpb.UpdateRecordRequest(model="Contact", id="nope")
    req.record.update({"name": "b"})
    req.update_mask.paths.extend(f"{'p' * 100}{i}" for i in range(2000))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ms.UpdateRecord(req, timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    info, violations = _status(caught.value)
    assert info.reason == "REQUEST_INVALID"
    assert violations and violations[0].field == "update_mask.paths[0]"
    assert int(info.metadata["violations_omitted"]) == 2000 - len(violations)
    _small(caught.value)


def test_brief_cuts_echoed_values() -> None:
    assert brief("abc") == "'abc'"
    assert brief(LONG) == "'" + "x" * 56 + "..."
    assert len(brief(LONG, 20)) == 20


def test_unexpected_errors_carry_a_call_id_that_the_log_has_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="nexus_server"):
        api = to_api_error(RuntimeError("secret detail /etc/passwd"))
    assert (api.reason, api.code) == ("INTERNAL_ERROR", grpc.StatusCode.INTERNAL)
    cid = api.metadata["call_id"]
    assert len(cid) == 16 and cid in api.message
    assert "secret" not in api.message
    assert any(cid in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_status_fits_grpc_metadata_whatever_the_message() -> None:
    api = ApiError("REQUEST_INVALID", "é" * 100_000, [("f" * 5000, "d" * 5000)] * 500)
    status = api.to_status()
    assert len(status.message.encode()) <= 768
    assert status.ByteSize() <= 4096


# --- ids and request_ids ------------------------------------------------------------------

pg = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


def _contact(**extra: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"name": "Ada", "email": f"{extra.get('id', 'x')[:20]}@x.io", **extra})
    return s


async def test_an_empty_id_is_refused_on_every_create_path(
    channel: grpc.aio.Channel, serving: Serving, ms: Any, expect_error: Any
) -> None:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(
        ms.CreateRecord(mpb.CreateRecordRequest(model="Contact", record=_contact(id=""))),
        bad,
        "RECORD_INVALID",
        fields=["record.id"],
    )
    await expect_error(
        ms.UpsertRecord(mpb.UpsertRecordRequest(model="Contact", record=_contact(id=""))),
        bad,
        "RECORD_INVALID",
        fields=["record.id"],
    )
    await expect_error(
        ms.BulkCreateRecords(
            mpb.BulkCreateRecordsRequest(
                model="Contact", records=[_contact(id="ok1"), _contact(id="")]
            )
        ),
        bad,
        "RECORD_INVALID",
        fields=["records[1].id"],
    )
    batch = mpb.BatchWriteRequest()
    batch.writes.add().create.CopyFrom(mpb.Write.Create(model="Contact", record=_contact(id="")))
    await expect_error(
        ms.BatchWrite(batch), bad, "RECORD_INVALID", fields=["writes[0].create.record.id"]
    )
    typed = serving.typed
    req = typed.message_class("CreateContactRequest")()
    req.contact.id, req.contact.name, req.contact.email = "", "Ada", "ada@x.io"  # type: ignore[attr-defined]
    call = channel.unary_unary(
        "/nexus.models.v1.ContactService/CreateContact",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=None,
    )
    await expect_error(call(req), bad, "RECORD_INVALID", fields=["contact.id"])
    bulk = typed.message_class("BulkCreateContactsRequest")()
    bulk.contacts.add(id="", name="Ada", email="a@x.io")  # type: ignore[attr-defined]
    call = channel.unary_unary(
        "/nexus.models.v1.ContactService/BulkCreateContacts",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=None,
    )
    await expect_error(call(bulk), bad, "RECORD_INVALID", fields=["contacts[0].id"])
    count = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"), timeout=WAIT)
    assert count.count == 0


@pg
async def test_id_length_limit_is_exact(ms: Any, expect_error: Any) -> None:
    ok = "i" * 256
    rec = await ms.CreateRecord(
        mpb.CreateRecordRequest(model="Contact", record=_contact(id=ok)), timeout=WAIT
    )
    assert rec["id"] == ok
    got = await ms.GetRecord(mpb.GetRecordRequest(model="Contact", id=ok), timeout=WAIT)
    assert got["id"] == ok
    _, violations = await expect_error(
        ms.CreateRecord(mpb.CreateRecordRequest(model="Contact", record=_contact(id=ok + "i"))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "RECORD_INVALID",
        fields=["record.id"],
    )
    assert "at most 256" in violations[0][1]


async def test_request_id_length_limit(ms: Any, expect_error: Any) -> None:
    req = mpb.DeleteRecordRequest(model="Contact", id="a", request_id="r" * 129)
    await expect_error(
        ms.DeleteRecord(req),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_INVALID",
        fields=["request_id"],
    )


@pg
async def test_typed_delete_is_idempotent_with_a_request_id(
    channel: grpc.aio.Channel, serving: Serving, ms: Any, expect_error: Any
) -> None:
    for i in (1, 2):
        await ms.CreateRecord(
            mpb.CreateRecordRequest(model="Contact", record=_contact(id=f"c{i}")), timeout=WAIT
        )
    cls = serving.typed.message_class("DeleteContactRequest")
    assert [f.name for f in cls.DESCRIPTOR.fields] == ["id", "request_id"]
    delete = channel.unary_unary(
        "/nexus.models.v1.ContactService/DeleteContact",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=empty_pb2.Empty.FromString,
    )
    first = await delete(cls(id="c1", request_id="del-1"), timeout=WAIT)
    again = await delete(cls(id="c1", request_id="del-1"), timeout=WAIT)  # the first result
    assert first == again == empty_pb2.Empty()
    meta, _ = await expect_error(
        delete(cls(id="c2", request_id="del-1")),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_CONFLICT",
        fields=["request_id"],
    )
    assert meta["request_id"] == "del-1"
    await ms.GetRecord(mpb.GetRecordRequest(model="Contact", id="c2"), timeout=WAIT)  # kept
    await expect_error(
        delete(cls(id="c1")), grpc.StatusCode.NOT_FOUND, "RECORD_NOT_FOUND"
    )  # without a key, a second delete is a plain NOT_FOUND


# --- bulk row caps ------------------------------------------------------------------------


async def test_bulk_row_cap_is_checked_before_conversion(
    channel: grpc.aio.Channel, serving: Serving, app: Any, ms: Any, expect_error: Any
) -> None:
    cap = app.db.max_bulk_rows
    too_many = mpb.BulkCreateRecordsRequest(model="Contact")
    for i in range(cap + 1):
        # rows DataFlow would refuse (no email): the cap answers before any is looked at
        too_many.records.add().update({"name": f"n{i}"})
    _, violations = await expect_error(
        ms.BulkCreateRecords(too_many),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_INVALID",
        fields=["records"],
    )
    assert f"at most {cap} rows per request, got {cap + 1}" in violations[0][1]
    upsert = mpb.BulkUpsertRecordsRequest(model="Contact", records=too_many.records)
    await expect_error(
        ms.BulkUpsertRecords(upsert),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_INVALID",
        fields=["records"],
    )
    bulk = serving.typed.message_class("BulkCreateContactsRequest")()
    for i in range(cap + 1):
        bulk.contacts.add(name=f"n{i}")  # type: ignore[attr-defined]
    call = channel.unary_unary(
        "/nexus.models.v1.ContactService/BulkCreateContacts",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=None,
    )
    await expect_error(
        call(bulk), grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID", fields=["contacts"]
    )
    batch = mpb.BatchWriteRequest()
    for i in range(cap + 1):
        batch.writes.add().delete.CopyFrom(mpb.Write.Delete(model="Contact", id=str(i)))
    await expect_error(
        ms.BatchWrite(batch), grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID", fields=["writes"]
    )
    count = await ms.CountRecords(mpb.CountRecordsRequest(model="Contact"), timeout=WAIT)
    assert count.count == 0


async def test_bulk_row_cap_follows_the_dataflow(
    serving: Serving, app: Any, ms: Any, expect_error: Any
) -> None:
    app.db.max_bulk_rows = 3
    rows = [_contact(id=f"r{i}") for i in range(3)]
    done = await ms.BulkCreateRecords(
        mpb.BulkCreateRecordsRequest(model="Contact", records=rows), timeout=WAIT
    )
    assert done.created_count == 3
    await expect_error(
        ms.BulkCreateRecords(
            mpb.BulkCreateRecordsRequest(model="Contact", records=[*rows, _contact(id="r4")])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_INVALID",
        fields=["records"],
    )


async def test_a_handler_of_another_kind_is_guarded_too() -> None:
    """A generic handler that is not grpc's dictionary handler is wrapped (the fallback
    of `map_methods`): its methods refuse malformed requests the same way."""
    from grpc_health.v1 import health_pb2

    from nexus_server._app import GenericHandlersOnly
    from nexus_server._registry import WorkflowRegistry
    from nexus_server.gateway import Gateway, Policy
    from nexus_server.gateway._audit import AuditTrail

    async def check(request: Any, context: Any) -> Any:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    method = grpc.unary_unary_rpc_method_handler(
        check,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )

    class Custom(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: Any) -> Any:
            return method if details.method == "/custom.Health/Check" else None

    gateway = Gateway(
        authenticator=None,
        policy=Policy(),
        registry=WorkflowRegistry(),
        audit=AuditTrail(None, table=False),
        typed_models={},
    )
    server = grpc.aio.server()
    GenericHandlersOnly(server, gateway).add_generic_rpc_handlers([Custom()])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = _raw(channel, "/custom.Health/Check")
            ok = await call(
                health_pb2.HealthCheckRequest(service="x").SerializeToString(), timeout=WAIT
            )
            assert health_pb2.HealthCheckResponse.FromString(ok).status == 1
            await _malformed(call(BAD_UTF8, timeout=WAIT), "grpc.health.v1.HealthCheckRequest")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _raw(channel, "/custom.Health/Nope")(b"", timeout=WAIT)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
