"""Record operations shared by the generic ModelService and the typed per-model services:
model lookup, JSON-to-field coercion, idempotent writes and BatchWrite."""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as _dt
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from google.protobuf import message as pb_message

from dataflow import DataFlow, ModelInfo, ModelOps, ValidationError

from ._errors import ApiError, brief, to_api_error
from ._store import Store, body_hash, check_request_id

__all__ = ["MAX_ID_LENGTH", "Records", "record_fields"]

M = TypeVar("M", bound=pb_message.Message)

#: The longest text primary key a create or upsert accepts (ids are made for URLs).
MAX_ID_LENGTH = 256


class Records:
    """Model operations on the integrated DataFlow, with the server's conventions."""

    def __init__(self, db: DataFlow | None, store: Store) -> None:
        self.db = db
        self.store = store

    @property
    def models(self) -> tuple[ModelInfo, ...]:
        return self.db.models if self.db is not None else ()

    def model(self, name: str, where: str = "model") -> ModelInfo:
        """The model named `name`; MODEL_NOT_FOUND naming the request field `where`."""
        for m in self.models:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.models) or "none"
        raise ApiError(
            "MODEL_NOT_FOUND",
            f"model {brief(name)} not found (models: {known[:200]})",
            [(where, "no model has this name")],
            {"model": name[:60]},
        )

    def ops(self, model: ModelInfo) -> ModelOps:
        assert self.db is not None
        return self.db.ops(model.name)

    def coerce(
        self, model: ModelInfo, data: Mapping[str, Any], where: str, *, new: bool = False
    ) -> dict[str, Any]:
        """JSON values as the model's field types where JSON cannot say them: whole
        numbers for int fields (also given as text, as proto3 JSON prints int64), and
        base64 text for bytes. Everything else is checked by DataFlow itself.

        `new`: `data` is a record to create (or upsert), whose text primary key, when
        given, must be 1 to `MAX_ID_LENGTH` characters: an empty id is refused (leave it
        out to have one generated), as is one too long to be a key."""
        out: dict[str, Any] = {}
        fields = model.field_map
        for name, value in data.items():
            f = fields.get(name)
            if f is not None and value is not None:
                value = _coerce(f.base_type, value, f"{where}.{name}")
            out[name] = value
        if new:
            key = model.primary_key.name
            value = out.get(key)
            if isinstance(value, str) and not 0 < len(value) <= MAX_ID_LENGTH:
                path = f"{where}.{key}"
                reason = (
                    "may not be empty (leave it out to have one generated)"
                    if not value
                    else f"at most {MAX_ID_LENGTH} characters, got {len(value)}"
                )
                raise ApiError("RECORD_INVALID", f"{path}: {reason}", [(path, reason)])
        return out

    def coerce_filter(self, model: ModelInfo, flt: Mapping[str, Any]) -> dict[str, Any]:
        """A filter's values as the model's field types, as `coerce` does for a record,
        also inside operators (`{"total": {"$gte": "9223372036854775807"}}`, `$in`
        lists) and `$and` / `$or` / `$not`: an int beyond +-2^53 travels as text (the
        64-bit integer rule of docs/api.md) wherever a filter holds it. A value that is
        not of the field's type is left for DataFlow to refuse, naming its path."""
        return _query(model.field_map, flt)

    async def search(
        self,
        model: ModelInfo,
        q: str,
        flt: Mapping[str, Any] | None,
        limit: int,
        page_token: str,
        fields: Sequence[str],
    ) -> dict[str, Any]:
        """Full-text search of `model` (`ModelOps.search`), for the generic and the typed
        RPCs alike: a bad query is QUERY_INVALID naming the request field ``q``."""
        try:
            return await self.ops(model).search(
                q,
                flt or None,
                limit=limit,
                page_token=page_token or None,
                fields=list(fields) or None,
            )
        except ValidationError as exc:
            if exc.field == "query":
                raise ValidationError("q", exc.reason) from None
            raise

    def check_rows(self, n: int, where: str) -> None:
        """Refuse a bulk request of more than `max_bulk_rows` rows (the DataFlow's cap),
        before any row is converted: the cost of a request stays bounded by the cap."""
        assert self.db is not None
        cap = self.db.max_bulk_rows
        if n > cap:
            reason = f"at most {cap} rows per request, got {n}"
            raise ApiError("REQUEST_INVALID", f"{where}: {reason}", [(where, reason)])

    def id_value(self, model: ModelInfo, text: str) -> Any:
        """A primary key given as text in a URL or request, as the key's type."""
        return _coerce(model.primary_key.base_type, text, "id")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        assert self.db is not None
        async with self.db.transaction():
            yield

    async def idempotent(
        self,
        caller: str,
        request_id: str,
        method: str,
        body: Any,
        response_type: type[M],
        write: Callable[[], Awaitable[M]],
    ) -> M:
        """Run `write` once per (caller, request_id): a retry with the same body gets the
        first response, one with another body fails with REQUEST_ID_CONFLICT. The write
        and the remembered response commit in one transaction."""
        check_request_id(request_id)
        if not request_id:
            return await write()
        hash_ = body_hash(method, body)
        found = await self.store.find_response(caller, request_id)
        if found is not None:
            return _replay(found, method, hash_, request_id, response_type)
        try:
            async with self.transaction():
                response = await write()
                await self.store.save_response(
                    caller, request_id, method, hash_, response.SerializeToString()
                )
        except Exception:
            # a concurrent retry may have committed first: answer as a retry would
            found = await self.store.find_response(caller, request_id)
            if found is not None:
                return _replay(found, method, hash_, request_id, response_type)
            raise
        return response

    async def batch(self, writes: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
        """Run writes in order in one transaction: all of them commit, or none does."""
        results: list[Any] = []
        async with self.transaction():
            for i, write in enumerate(writes):
                try:
                    results.append(await write())
                except Exception as exc:
                    api = to_api_error(exc)
                    api.violations = [(f"writes[{i}].{f}", d) for f, d in api.violations]
                    api.metadata["write_index"] = str(i)
                    api.message = f"writes[{i}]: {api.message}"
                    raise api from exc
        return results


_QUERY_PARTS = ("filter", "order_by", "fields", "page_token")


@contextlib.contextmanager
def record_fields(prefix: str = "", rows: str = "") -> Iterator[None]:
    """Name DataFlow's record validation errors by the request's field paths: a bad
    `email` of `CreateRecord` is `record.email`, row 3 of a bulk call `records[3].email`
    (`rows` is the repeated field), of a typed call `contact.email` or `contacts[3].email`.
    Errors about the query (filter, order_by...) keep their own paths."""
    try:
        yield
    except ValidationError as exc:
        head = exc.field.split(".", 1)[0].split("[", 1)[0]
        if head in _QUERY_PARTS:
            raise
        if head == "conflict_on":  # a request field beside the record, not in it
            parent = prefix.rpartition(".")[0]
            api = to_api_error(exc)
            api.violations = [(f"{parent}.{exc.field}" if parent else exc.field, exc.reason)]
            raise api from exc
        if exc.row is not None and rows:
            path = f"{rows}[{exc.row}].{exc.field}" if exc.field else f"{rows}[{exc.row}]"
        elif exc.row is None and prefix:
            path = f"{prefix}.{exc.field}" if exc.field else prefix
        else:
            raise
        api = to_api_error(exc)
        api.violations = [(path, exc.reason)]
        raise api from exc


def _replay(
    found: tuple[str, str, bytes], method: str, hash_: str, request_id: str, cls: type[M]
) -> M:
    stored_method, stored_hash, payload = found
    if stored_method != method or stored_hash != hash_:
        raise ApiError(
            "REQUEST_ID_CONFLICT",
            f"request_id {brief(request_id)} was already used for a different request",
            [("request_id", "already used with another body or method")],
            {"request_id": request_id[:60]},
        )
    return cls.FromString(payload)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise ApiError(
                    "RECORD_INVALID",
                    f"{where}: expected an integer, got {brief(value)}",
                    [(where, "expected an integer")],
                ) from None
    if tp is bytes and isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(
                "RECORD_INVALID",
                f"{where}: expected base64 text",
                [(where, "expected base64-encoded bytes")],
            ) from None
    if tp is _dt.datetime and isinstance(value, str) and value.endswith("Z"):
        return value[:-1] + "+00:00"
    return value


#: Operators whose value is one value of the field, and those whose value is a list.
_SCALAR_OPS = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})
_LIST_OPS = frozenset({"$in", "$nin"})


def _query(fields: Mapping[str, Any], flt: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flt.items():
        f = fields.get(key)
        if f is not None:
            out[key] = _query_value(f.base_type, value)
        elif key in ("$and", "$or") and isinstance(value, list):
            out[key] = [_query(fields, v) if isinstance(v, Mapping) else v for v in value]
        elif key == "$not" and isinstance(value, Mapping):
            out[key] = _query(fields, value)
        else:
            out[key] = value  # DataFlow names what is wrong with it
    return out


def _query_value(tp: Any, value: Any) -> Any:
    if not (isinstance(value, Mapping) and any(str(k).startswith("$") for k in value)):
        return _lenient(tp, value)  # {"field": value}: $eq
    out: dict[str, Any] = {}
    for op, v in value.items():
        if op in _LIST_OPS and isinstance(v, list):
            out[op] = [_lenient(tp, x) for x in v]
        elif op in _SCALAR_OPS:
            out[op] = _lenient(tp, v)
        else:
            out[op] = v
    return out


def _lenient(tp: Any, value: Any) -> Any:
    """`_coerce` for a filter value, keeping a value it cannot convert as it is."""
    if value is None:
        return None
    try:
        return _coerce(tp, value, "")
    except ApiError:
        return value
