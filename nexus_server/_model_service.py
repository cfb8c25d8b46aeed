"""ModelService (generic, any model by name) and the typed per-model services.

Both call the same `Records` operations; they differ only in how records travel:
`google.protobuf.Struct` for the generic service, the model's own message for the typed
one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import empty_pb2, message

from dataflow import ModelInfo, ModelOps
from nexus_api.nexus.model.v1 import model_service_pb2 as mpb
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc

from ._convert import from_struct, page_size, to_struct, to_value
from ._errors import ApiError, abort, brief
from ._records import Records, record_fields
from ._typed import (
    PACKAGE,
    TypedModels,
    collection_id,
    double_json,
    json_body,
    message_to_fields,
    record_json,
    record_to_message,
    rest_body,
)
from .gateway import CURRENT_PRINCIPAL, Gateway, caller_id

__all__ = ["ModelServicer", "typed_handlers"]

# grpc ships no type information: its servicer context is Any to the type checker
Context: TypeAlias = Any


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", "any").lower() if tp is not Any else "any"


def model_message(model: ModelInfo, typed: TypedModels | None) -> mpb.Model:
    msg = mpb.Model(
        name=model.name,
        description=model.description,
        collection=collection_id(model.name),
        table=model.table,
    )
    for group in model.unique_together:
        msg.unique_together.add(fields=list(group))
    if typed is not None:
        msg.service = typed.service_name(model.name)
        msg.message_type = f"nexus.models.v1.{model.name}"
    for f in model.fields:
        d = f.describe()
        item = msg.fields.add(
            name=f.name,
            type=str(d["type"]).lower(),
            nullable=f.nullable,
            primary_key=f.primary_key,
            unique=f.unique,
            generated=f.generated,
            description=f.description,
            indexed=f.indexed,
            managed=f.managed,
            searchable=f.searchable,
        )
        if d.get("has_default"):
            item.default.CopyFrom(to_value(d["default"]))
        if d.get("enum_values"):
            item.enum_values.extend(to_value(v) for v in d["enum_values"])
    return msg


def _order_by(text: str) -> list[str] | None:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return parts or None


def _mask(paths: Any) -> list[str] | None:
    return list(paths) or None


def _snake_path(path: str) -> str:
    # proto3 JSON writes FieldMask paths in lowerCamelCase; the contract accepts both
    return re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), path)


def _only(
    model: ModelInfo, fields: Mapping[str, Any], mask: list[str] | None, where: str
) -> dict[str, Any]:
    """The fields an update changes: those the mask names (a named field absent from
    the record is cleared), or every field present when there is no mask."""
    if mask is None:
        return dict(fields)
    known = model.field_map
    paths = [p if p in known else _snake_path(p) for p in mask]
    unknown = [(i, m) for i, (m, p) in enumerate(zip(mask, paths, strict=True)) if p not in known]
    parent = where.rpartition(".")[0]  # the message holding the record and its mask
    mask_field = f"{parent}.update_mask" if parent else "update_mask"
    if unknown:
        raise ApiError(
            "REQUEST_INVALID",
            f"update_mask names no field of {model.name}: "
            + ", ".join(brief(m, 40) for _, m in unknown[:3])
            + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""),
            [
                (f"{mask_field}.paths[{i}]", f"{brief(m)} is not a field of {model.name}")
                for i, m in unknown
            ],
        )
    return {p: fields.get(p) for p in paths}


def _require_changes(changes: Mapping[str, Any], where: str) -> None:
    if not changes:
        raise ApiError(
            "REQUEST_INVALID",
            f"{where}: nothing to update (give field values, or name them in update_mask)",
            [(where, "no field to update")],
        )


def _check_fields(model: ModelInfo, names: Any) -> list[str] | None:
    """A `fields` projection, each name checked (QUERY_INVALID names the bad one)."""
    names = list(names)
    bad = [(i, n) for i, n in enumerate(names) if n not in model.field_map]
    if bad:
        raise ApiError(
            "QUERY_INVALID",
            f"fields: {brief(', '.join(repr(n) for _, n in bad), 200)} not fields of {model.name}",
            [(f"fields[{i}]", f"unknown field {brief(n)}") for i, n in bad],
        )
    return names or None


class ModelServicer(mgrpc.ModelServiceServicer):
    """Implements nexus.model.v1.ModelService: any model, records as Structs."""

    def __init__(self, records: Records, typed: TypedModels | None, gateway: Gateway) -> None:
        self.records = records
        self.typed = typed
        self.gateway = gateway

    async def ListModels(
        self, request: mpb.ListModelsRequest, context: Context
    ) -> mpb.ListModelsResponse:
        try:
            size = page_size(request.page_size)
            token = request.page_token
            valid = token.isdigit() and token.isascii() and len(token) <= 9
            start = int(token) if valid else 0
            if token and not valid:
                raise ApiError(
                    "PAGE_TOKEN_INVALID",
                    "page_token is not one this server returned",
                    [("page_token", "invalid")],
                )
            me = CURRENT_PRINCIPAL.get()
            models = [
                m
                for m in self.records.models
                if me is not None and self.gateway.may_use_model(me, m.name)
            ]
            page = models[start : start + size]
            resp = mpb.ListModelsResponse(models=[model_message(m, self.typed) for m in page])
            if start + size < len(models):
                resp.next_page_token = str(start + size)
            return resp
        except Exception as exc:
            await abort(context, exc)

    async def GetModel(self, request: mpb.GetModelRequest, context: Context) -> mpb.Model:
        try:
            return model_message(self.records.model(request.name, "name"), self.typed)
        except Exception as exc:
            await abort(context, exc)

    async def CreateRecord(self, request: mpb.CreateRecordRequest, context: Context) -> Any:
        try:
            model = self.records.model(request.model)
            data = self.records.coerce(
                model, from_struct(request.record, "record"), "record", new=True
            )

            async def write() -> Any:
                with record_fields("record"):
                    return to_struct(await self.records.ops(model).create(**data))

            return await self.records.idempotent(
                caller_id(), request.request_id, "CreateRecord",
                [request.model, data], type(to_struct({})), write,
            )  # fmt: skip
        except Exception as exc:
            await abort(context, exc)

    async def GetRecord(self, request: mpb.GetRecordRequest, context: Context) -> Any:
        try:
            model = self.records.model(request.model)
            fields = _check_fields(model, request.fields)
            record = await self.records.ops(model).read(self.records.id_value(model, request.id))
            if fields:
                record = {k: v for k, v in record.items() if k in set(fields)}
            return to_struct(record)
        except Exception as exc:
            await abort(context, exc)

    async def UpdateRecord(self, request: mpb.UpdateRecordRequest, context: Context) -> Any:
        try:
            model = self.records.model(request.model)
            data = self.records.coerce(model, from_struct(request.record, "record"), "record")
            mask = _mask(request.update_mask.paths) if request.HasField("update_mask") else None
            changes = _only(model, data, mask, "record")
            changes.pop(model.primary_key.name, None)
            _require_changes(changes, "record")
            key = self.records.id_value(model, request.id)

            async def write() -> Any:
                with record_fields("record"):
                    rec = await self.records.ops(model).update(key, fields=changes)
                return to_struct(rec)

            return await self.records.idempotent(
                caller_id(), request.request_id, "UpdateRecord",
                [request.model, request.id, changes], type(to_struct({})), write,
            )  # fmt: skip
        except Exception as exc:
            await abort(context, exc)

    async def DeleteRecord(
        self, request: mpb.DeleteRecordRequest, context: Context
    ) -> empty_pb2.Empty:
        try:
            model = self.records.model(request.model)
            key = self.records.id_value(model, request.id)

            async def write() -> empty_pb2.Empty:
                await self.records.ops(model).delete(key)
                return empty_pb2.Empty()

            return await self.records.idempotent(
                caller_id(), request.request_id, "DeleteRecord",
                [request.model, request.id], empty_pb2.Empty, write,
            )  # fmt: skip
        except Exception as exc:
            await abort(context, exc)

    async def ListRecords(
        self, request: mpb.ListRecordsRequest, context: Context
    ) -> mpb.ListRecordsResponse:
        try:
            model = self.records.model(request.model)
            flt = self.records.coerce_filter(model, from_struct(request.filter, "filter"))
            result = await self.records.ops(model).list(
                flt or None,
                order_by=_order_by(request.order_by),
                limit=page_size(request.page_size),
                page_token=request.page_token or None,
                fields=list(request.fields) or None,
            )
            return mpb.ListRecordsResponse(
                records=[to_struct(r) for r in result["records"]],
                next_page_token=result.get("next_page_token") or "",
            )
        except Exception as exc:
            await abort(context, exc)

    async def SearchRecords(
        self, request: mpb.SearchRecordsRequest, context: Context
    ) -> mpb.SearchRecordsResponse:
        try:
            model = self.records.model(request.model)
            flt = self.records.coerce_filter(model, from_struct(request.filter, "filter"))
            result = await self.records.search(
                model,
                request.q,
                flt,
                page_size(request.page_size),
                request.page_token,
                request.fields,
            )
            return mpb.SearchRecordsResponse(
                records=[to_struct(r) for r in result["records"]],
                scores=result["scores"],
                next_page_token=result["next_page_token"] or "",
            )
        except Exception as exc:
            await abort(context, exc)

    async def CountRecords(
        self, request: mpb.CountRecordsRequest, context: Context
    ) -> mpb.CountRecordsResponse:
        try:
            model = self.records.model(request.model)
            flt = self.records.coerce_filter(model, from_struct(request.filter, "filter"))
            return mpb.CountRecordsResponse(count=await self.records.ops(model).count(flt or None))
        except Exception as exc:
            await abort(context, exc)

    async def UpsertRecord(
        self, request: mpb.UpsertRecordRequest, context: Context
    ) -> mpb.UpsertRecordResponse:
        try:
            model = self.records.model(request.model)
            data = self.records.coerce(
                model, from_struct(request.record, "record"), "record", new=True
            )
            conflict_on = list(request.conflict_on) or None
            if request.HasField("update_mask") and request.update_mask.paths:
                # an upsert changes exactly the fields sent (the record's other fields keep
                # their values): a mask could only contradict the record
                raise ApiError(
                    "REQUEST_INVALID",
                    "UpsertRecord takes no update_mask: on a conflict it changes exactly the "
                    "fields of `record`, so send only the fields to write",
                    [("update_mask", "not used by UpsertRecord; send only the fields to write")],
                )

            async def write() -> mpb.UpsertRecordResponse:
                with record_fields("record"):
                    rec = await self.records.ops(model).upsert(conflict_on, **data)
                created = rec.get("created_at") == rec.get("updated_at")
                return mpb.UpsertRecordResponse(record=to_struct(rec), created=created)

            return await self.records.idempotent(
                caller_id(), request.request_id, "UpsertRecord",
                [request.model, data, conflict_on], mpb.UpsertRecordResponse, write,
            )  # fmt: skip
        except Exception as exc:
            await abort(context, exc)

    def _rows(self, model: ModelInfo, structs: Any) -> list[dict[str, Any]]:
        self.records.check_rows(len(structs), "records")
        return [
            self.records.coerce(model, from_struct(s, f"records[{i}]"), f"records[{i}]", new=True)
            for i, s in enumerate(structs)
        ]

    async def BulkCreateRecords(
        self, request: mpb.BulkCreateRecordsRequest, context: Context
    ) -> mpb.BulkCreateRecordsResponse:
        try:
            model = self.records.model(request.model)
            rows = self._rows(model, request.records)

            async def write() -> mpb.BulkCreateRecordsResponse:
                with record_fields(rows="records"):
                    n = await self.records.ops(model).bulk_create(rows)
                return mpb.BulkCreateRecordsResponse(created_count=n)

            return await self.records.idempotent(
                caller_id(), request.request_id, "BulkCreateRecords",
                [request.model, rows], mpb.BulkCreateRecordsResponse, write,
            )  # fmt: skip
        except Exception as exc:
            await abort(context, exc)

    async def BulkUpdateRecords(
        self, request: mpb.BulkUpdateRecordsRequest, context: Context
    ) -> mpb.BulkUpdateRecordsResponse:
        try:
            model = self.records.model(request.model)
            flt = self.records.coerce_filter(model, from_struct(request.filter, "filter"))
            values = self.records.coerce(model, from_struct(request.values, "values"), "values")

            async def write() -> mpb.BulkUpdateRecordsResponse:
                with record_fields("values"):
                    n = await self.records.ops(model).bulk_update(
                        filter=flt, fields=values, all=request.allow_all
                    )
                return mpb.BulkUpdateRecordsResponse(updated_count=n)

            return await self.records.idempotent(
                caller_id(), request.request_id, "BulkUpdateRecords",
                [request.model, flt, values, request.allow_all],
                mpb.BulkUpdateRecordsResponse, write,
            )  # fmt: skip
        except Exception as exc:
            await abort(context, exc)

    async def BulkDeleteRecords(
        self, request: mpb.BulkDeleteRecordsRequest, context: Context
    ) -> mpb.BulkDeleteRecordsResponse:
        try:
            model = self.records.model(request.model)
            flt = self.records.coerce_filter(model, from_struct(request.filter, "filter"))

            async def write() -> mpb.BulkDeleteRecordsResponse:
                n = await self.records.ops(model).bulk_delete(flt, all=request.allow_all)
                return mpb.BulkDeleteRecordsResponse(deleted_count=n)

            return await self.records.idempotent(
                caller_id(), request.request_id, "BulkDeleteRecords",
                [request.model, flt, request.allow_all], mpb.BulkDeleteRecordsResponse, write,
            )  # fmt: skip
        except Exception as exc:
            await abort(context, exc)

    async def BulkUpsertRecords(
        self, request: mpb.BulkUpsertRecordsRequest, context: Context
    ) -> mpb.BulkUpsertRecordsResponse:
        try:
            model = self.records.model(request.model)
            rows = self._rows(model, request.records)
            conflict_on = list(request.conflict_on) or None

            async def write() -> mpb.BulkUpsertRecordsResponse:
                with record_fields(rows="records"):
                    n = await self.records.ops(model).bulk_upsert(rows, conflict_on)
                return mpb.BulkUpsertRecordsResponse(upserted_count=n)

            return await self.records.idempotent(
                caller_id(), request.request_id, "BulkUpsertRecords",
                [request.model, rows, conflict_on], mpb.BulkUpsertRecordsResponse, write,
            )  # fmt: skip
        except Exception as exc:
            await abort(context, exc)

    async def BatchWrite(
        self, request: mpb.BatchWriteRequest, context: Context
    ) -> mpb.BatchWriteResponse:
        try:
            self.records.check_rows(len(request.writes), "writes")
            writes = [self._batch_write(w, i) for i, w in enumerate(request.writes)]
            if not writes:
                raise ApiError("REQUEST_INVALID", "writes is empty", [("writes", "empty")])

            async def write() -> mpb.BatchWriteResponse:
                results = await self.records.batch(writes)
                return mpb.BatchWriteResponse(results=results)

            body = [w.SerializeToString(deterministic=True).hex() for w in request.writes]
            return await self.records.idempotent(
                caller_id(), request.request_id, "BatchWrite", body,
                mpb.BatchWriteResponse, write,
            )  # fmt: skip
        except Exception as exc:
            await abort(context, exc)

    def _batch_write(self, w: mpb.Write, i: int) -> Callable[[], Awaitable[mpb.WriteResult]]:
        kind = w.WhichOneof("operation")
        if kind is None:
            raise ApiError(
                "REQUEST_INVALID",
                f"writes[{i}] names no operation",
                [(f"writes[{i}]", "set one of create, update, upsert, delete")],
            )
        op = getattr(w, kind)
        model = self.records.model(op.model, f"writes[{i}].{kind}.model")
        ops = self.records.ops(model)
        where = f"writes[{i}].{kind}.record"
        if kind == "create":
            data = self.records.coerce(model, from_struct(op.record, where), where, new=True)

            async def create() -> mpb.WriteResult:
                with record_fields("create.record"):
                    rec = await ops.create(**data)
                return mpb.WriteResult(record=to_struct(rec), created=True)

            return create
        if kind == "update":
            fields = self.records.coerce(model, from_struct(op.record, where), where)
            mask = _mask(op.update_mask.paths) if op.HasField("update_mask") else None
            changes = _only(model, fields, mask, where)
            changes.pop(model.primary_key.name, None)
            _require_changes(changes, where)
            key = self.records.id_value(model, op.id)

            async def update() -> mpb.WriteResult:
                with record_fields("update.record"):
                    rec = await ops.update(key, fields=changes)
                return mpb.WriteResult(record=to_struct(rec))

            return update
        if kind == "upsert":
            data = self.records.coerce(model, from_struct(op.record, where), where, new=True)
            conflict_on = list(op.conflict_on) or None

            async def upsert() -> mpb.WriteResult:
                with record_fields("upsert.record"):
                    rec = await ops.upsert(conflict_on, **data)
                created = rec.get("created_at") == rec.get("updated_at")
                return mpb.WriteResult(record=to_struct(rec), created=created)

            return upsert
        key = self.records.id_value(model, op.id)

        async def delete() -> mpb.WriteResult:
            await ops.delete(key)
            return mpb.WriteResult()

        return delete


def typed_handlers(records: Records, typed: TypedModels) -> list[grpc.GenericRpcHandler]:
    """Generic RPC handlers serving each model's typed service and its REST twin."""
    handlers: list[grpc.GenericRpcHandler] = []
    for model in records.models:
        handlers.extend(_TypedService(records, typed, model).handlers())
    return handlers


class _TypedService:
    """One model's typed service: message <-> dict around the shared record operations."""

    def __init__(self, records: Records, typed: TypedModels, model: ModelInfo) -> None:
        self.records = records
        self.typed = typed
        self.model = model
        self.info = typed.models[model.name]
        self.snake = _snake_field(typed, model.name)

    @functools.cached_property
    def cls(self) -> type[message.Message]:
        """The model's message class (made on first use)."""
        return self.typed.message_class(self.model.name)

    @functools.cached_property
    def json(self) -> Callable[[Mapping[str, Any], Sequence[str]], dict[str, Any]]:
        """The printer of the model's records as REST JSON (`_typed.record_json`)."""
        return record_json(self.info)

    @functools.cached_property
    def ops(self) -> ModelOps:
        """The model's operations, built on the first call (startup does not wait)."""
        return self.records.ops(self.model)

    def _msg(self, record: Mapping[str, Any]) -> message.Message:
        return record_to_message(self.info, record, self.cls)

    def _fields(self, msg: message.Message, where: str, *, new: bool = False) -> dict[str, Any]:
        fields = message_to_fields(self.info, msg, where)
        return self.records.coerce(self.model, fields, where, new=new)

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """The typed service, and its REST twin (`_typed.build_rest_file`): the same
        methods, those answering records answering their JSON."""
        name, plural = self.model.name, _plural(self.typed, self.model.name)
        coll = collection_id(name)
        t = self.typed
        pk = self.model.primary_key.name

        async def create(req: Any, context: Context) -> Any:
            data = self._fields(getattr(req, self.snake), self.snake, new=True)
            return await self.records.idempotent(
                caller_id(), req.request_id, f"Create{name}", data, self.cls,
                lambda: _wrap(self._msg, self.ops.create(**data), self.snake),
            )  # fmt: skip

        async def get(req: Any, context: Any) -> Any:
            return self._msg(await self.ops.read(req.id))

        async def get_json(req: Any, context: Any) -> Any:
            return json_body(self.json(await self.ops.read(req.id), ()))

        async def update(req: Any, context: Context) -> Any:
            rec = getattr(req, self.snake)
            data = self._fields(rec, self.snake)
            key = data.pop(pk, None)
            if key is None:
                raise ApiError(
                    "REQUEST_INVALID",
                    f"{self.snake}.{pk} is required",
                    [(f"{self.snake}.{pk}", "required")],
                )
            mask = _mask(req.update_mask.paths) if req.HasField("update_mask") else None
            changes = _only(self.model, data, mask, self.snake)
            changes.pop(pk, None)
            _require_changes(changes, self.snake)
            return await self.records.idempotent(
                caller_id(), req.request_id, f"Update{name}", [key, changes], self.cls,
                lambda: _wrap(self._msg, self.ops.update(key, fields=changes), self.snake),
            )  # fmt: skip

        async def delete(req: Any, context: Context) -> Any:
            async def write() -> empty_pb2.Empty:
                await self.ops.delete(req.id)
                return empty_pb2.Empty()

            return await self.records.idempotent(
                caller_id(), req.request_id, f"Delete{name}", [req.id], empty_pb2.Empty,
                write,
            )  # fmt: skip

        async def listed(req: Any) -> dict[str, Any]:
            flt = self.records.coerce_filter(self.model, from_struct(req.filter, "filter"))
            result: dict[str, Any] = await self.ops.list(
                flt or None,
                order_by=_order_by(req.order_by),
                limit=page_size(req.page_size),
                page_token=req.page_token or None,
                fields=list(req.fields) or None,
            )
            return result

        async def list_(req: Any, context: Any) -> Any:
            result = await listed(req)
            resp = t.message_class(f"List{plural}Response")()
            getattr(resp, coll).extend(self._msg(r) for r in result["records"])
            resp.next_page_token = result.get("next_page_token") or ""  # type: ignore[attr-defined]
            return resp

        def page_json(result: Mapping[str, Any], only: Sequence[str]) -> dict[str, Any]:
            """A page's records as REST JSON, under the collection's name."""
            return {coll: [self.json(r, only) for r in result["records"]]}

        async def list_json(req: Any, context: Any) -> Any:
            result = await listed(req)
            page = page_json(result, req.fields)
            return json_body({**page, "next_page_token": result.get("next_page_token") or ""})

        async def found(req: Any) -> dict[str, Any]:
            flt = self.records.coerce_filter(self.model, from_struct(req.filter, "filter"))
            return await self.records.search(
                self.model, req.q, flt, page_size(req.page_size), req.page_token, req.fields
            )

        async def search(req: Any, context: Any) -> Any:
            result = await found(req)
            resp = t.message_class(f"Search{plural}Response")()
            getattr(resp, coll).extend(self._msg(r) for r in result["records"])
            resp.scores.extend(result["scores"])  # type: ignore[attr-defined]
            resp.next_page_token = result["next_page_token"] or ""  # type: ignore[attr-defined]
            return resp

        async def search_json(req: Any, context: Any) -> Any:
            result = await found(req)
            return json_body(
                {
                    **page_json(result, req.fields),
                    "scores": [double_json(x) for x in result["scores"]],
                    "next_page_token": result["next_page_token"] or "",
                }
            )

        async def count(req: Any, context: Any) -> Any:
            flt = self.records.coerce_filter(self.model, from_struct(req.filter, "filter"))
            return t.message_class("CountResult")(count=await self.ops.count(flt or None))

        async def upsert(req: Any, context: Context) -> Any:
            data = self._fields(getattr(req, self.snake), self.snake, new=True)
            conflict_on = list(req.conflict_on) or None
            return await self.records.idempotent(
                caller_id(), req.request_id, f"Upsert{name}", [data, conflict_on],
                self.cls,
                lambda: _wrap(self._msg, self.ops.upsert(conflict_on, **data), self.snake),
            )  # fmt: skip

        result_cls = t.message_class("BulkWriteResult")

        def rows(req: Any) -> list[dict[str, Any]]:
            items = getattr(req, coll)
            self.records.check_rows(len(items), coll)  # before any row is converted
            return [self._fields(r, f"{coll}[{i}]", new=True) for i, r in enumerate(items)]

        async def bulk_create(req: Any, context: Context) -> Any:
            data = rows(req)
            return await self.records.idempotent(
                caller_id(), req.request_id, f"BulkCreate{plural}", data, result_cls,
                lambda: _wrap(
                    lambda n: result_cls(affected=n), self.ops.bulk_create(data), rows=coll
                ),
            )  # fmt: skip

        async def bulk_update(req: Any, context: Context) -> Any:
            flt = self.records.coerce_filter(self.model, from_struct(req.filter, "filter"))
            values = self._fields(req.values, "values")
            return await self.records.idempotent(
                caller_id(), req.request_id, f"BulkUpdate{plural}",
                [flt, values, req.allow_all], result_cls,
                lambda: _wrap(
                    lambda n: result_cls(affected=n),
                    self.ops.bulk_update(filter=flt, fields=values, all=req.allow_all),
                    "values",
                ),
            )  # fmt: skip

        async def bulk_delete(req: Any, context: Context) -> Any:
            flt = self.records.coerce_filter(self.model, from_struct(req.filter, "filter"))
            return await self.records.idempotent(
                caller_id(), req.request_id, f"BulkDelete{plural}",
                [flt, req.allow_all], result_cls,
                lambda: _wrap(
                    lambda n: result_cls(affected=n), self.ops.bulk_delete(flt, all=req.allow_all)
                ),
            )  # fmt: skip

        async def bulk_upsert(req: Any, context: Context) -> Any:
            data = rows(req)
            conflict_on = list(req.conflict_on) or None
            return await self.records.idempotent(
                caller_id(), req.request_id, f"BulkUpsert{plural}", [data, conflict_on],
                result_cls,
                lambda: _wrap(
                    lambda n: result_cls(affected=n),
                    self.ops.bulk_upsert(data, conflict_on),
                    rows=coll,
                ),
            )  # fmt: skip

        table: dict[str, tuple[Callable[..., Awaitable[Any]], str]] = {
            f"Create{name}": (create, f"Create{name}Request"),
            f"Get{name}": (get, f"Get{name}Request"),
            f"Update{name}": (update, f"Update{name}Request"),
            f"Delete{name}": (delete, f"Delete{name}Request"),
            f"List{plural}": (list_, f"List{plural}Request"),
            f"Count{plural}": (count, f"Count{plural}Request"),
            f"Upsert{name}": (upsert, f"Upsert{name}Request"),
            f"BulkCreate{plural}": (bulk_create, f"BulkCreate{plural}Request"),
            f"BulkUpdate{plural}": (bulk_update, f"BulkUpdate{plural}Request"),
            f"BulkDelete{plural}": (bulk_delete, f"BulkDelete{plural}Request"),
            f"BulkUpsert{plural}": (bulk_upsert, f"BulkUpsert{plural}Request"),
        }
        if self.model.searchable_fields:
            table[f"Search{plural}"] = (search, f"Search{plural}Request")
        # the REST twin: reads print the records straight to JSON, writes (whose reply
        # may be an idempotent replay's message) print their reply message
        twin = next(s for s in t.rest_file.service if s.name == f"{name}Service")
        as_json = {m.name for m in twin.method if m.output_type == ".google.api.HttpBody"}
        printed: dict[str, Callable[..., Awaitable[Any]]] = {
            f"Get{name}": get_json,
            f"List{plural}": list_json,
            f"Search{plural}": search_json,
        }
        rest_table = {
            method: (printed.get(method) or _as_json(self.info, fn), req_name)
            if method in as_json
            else (fn, req_name)
            for method, (fn, req_name) in table.items()
        }
        return [
            grpc.method_handlers_generic_handler(
                service,
                {
                    method: grpc.unary_unary_rpc_method_handler(
                        _guarded(fn),
                        request_deserializer=_parser(t, req_name),
                        response_serializer=lambda m: m.SerializeToString(),
                    )
                    for method, (fn, req_name) in methods.items()
                },
            )
            for service, methods in (
                (t.service_name(name), table),
                (t.rest_service_name(name), rest_table),
            )
        ]


def _as_json(
    model: ModelInfo, fn: Callable[[Any, Context], Awaitable[Any]]
) -> Callable[[Any, Context], Awaitable[Any]]:
    """`fn` answering its reply's REST body (`_typed.rest_body`)."""

    async def call(request: Any, context: Context) -> Any:
        return rest_body(model, await fn(request, context))

    return call


def _parser(typed: TypedModels, name: str) -> Callable[[bytes], Any]:
    """Parses request `name`; its message class is made on the first request (making
    the classes of every model's RPCs at startup took most of the startup time)."""
    parse: Callable[[bytes], Any] | None = None

    def deserialize(data: bytes) -> Any:
        nonlocal parse
        if parse is None:
            parse = typed.message_class(name).FromString
        return parse(data)

    deserialize.message_name = f"{PACKAGE}.{name}"  # type: ignore[attr-defined]
    return deserialize


async def _wrap(
    convert: Callable[[Any], Any], result: Awaitable[Any], prefix: str = "", rows: str = ""
) -> Any:
    with record_fields(prefix, rows):
        value = await result
    return convert(value)


def _guarded(fn: Callable[[Any, Context], Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: Context) -> Any:
        try:
            return await fn(request, context)
        except Exception as exc:
            await abort(context, exc)

    return call


def _snake_field(typed: TypedModels, name: str) -> str:
    desc = typed.pool.FindMessageTypeByName(f"nexus.models.v1.Create{name}Request")
    return str(desc.fields[0].name)


def _plural(typed: TypedModels, name: str) -> str:
    svc = typed.pool.FindServiceByName(typed.service_name(name))
    for m in svc.methods:
        if m.name.startswith("List"):
            return str(m.name.removeprefix("List"))
    raise AssertionError("typed service without a List method")
