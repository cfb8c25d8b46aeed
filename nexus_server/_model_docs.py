"""The comments of the typed per-model file: model docstrings and field descriptions.

`build_models_file` (`_typed.py`) makes the messages and services of the models; this
module writes their documentation into the file's `source_code_info`, where protoc puts
the comments of a `.proto` source. So one text reaches every reader of the descriptors:
the exported `models.proto` (as `//` comments), the OpenAPI document (summaries and
descriptions) and server reflection.

The texts: a model's docstring (its first paragraph, `ModelInfo.description`) on its
message and service, a field's `field(description=...)` on its message field, and fixed
texts saying what each generated RPC and request field does.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from google.protobuf import descriptor_pb2

from dataflow import FieldInfo, ModelInfo

__all__ = ["describe_models_file"]

# FileDescriptorProto / DescriptorProto / ServiceDescriptorProto field numbers (the
# source_code_info path elements, descriptor.proto)
_MESSAGE, _FIELD, _SERVICE, _METHOD = 4, 2, 6, 2
#: Comment lines wrap at this width (the exported .proto stays readable).
_WIDTH = 76

#: Request and response fields that mean the same in every model's messages.
_COMMON_FIELDS = {
    "request_id": "Idempotency key: a retry with the same key and body returns the first "
    "result; the same key with another body fails with REQUEST_ID_CONFLICT.",
    "filter": 'Which records: a JSON filter (`{"score": {"$gte": 3}}`, docs/dataflow.md); '
    "empty matches every record.",
    "order_by": "Sort order: comma-separated fields, `-` for descending (`-score,name`).",
    "page_size": "At most this many records (0: the server's default page size).",
    "page_token": "The `next_page_token` of the previous page (empty: the first page).",
    "next_page_token": "Token of the next page; empty on the last page.",
    "fields": "Only these fields in each record (default: every field).",
    "update_mask": "The fields to update (default: every field set in the record).",
    "conflict_on": "Unique fields identifying the existing record (default: the primary key).",
    "allow_all": "Must be true for an empty filter, which matches every record.",
    "q": 'The full-text query: words (all must occur), "a phrase", -word to exclude, '
    "word* for a prefix.",
    "scores": "The relevance of each record, in the same order.",
    "values": "The field values to set on every matching record.",
    "affected": "How many records the call created, updated or deleted.",
    "count": "How many records match the filter.",
}

#: The generated RPCs: (name template, comment template). `{m}` is the model, `{p}` its
#: plural, `{c}` its collection.
_METHODS = (
    ("Create{m}", "Creates a {m} and returns it as stored (generated keys and defaults "
     "filled in).\nErrors: RECORD_INVALID, RECORD_ALREADY_EXISTS, CONSTRAINT_VIOLATION, "
     "REQUEST_ID_CONFLICT."),
    ("Get{m}", "Returns one {m} by primary key.\nErrors: RECORD_NOT_FOUND."),
    ("Update{m}", "Updates the fields of a {m} named by `update_mask` and returns it as "
     "stored.\nErrors: RECORD_NOT_FOUND, RECORD_INVALID, RECORD_ALREADY_EXISTS, "
     "CONSTRAINT_VIOLATION, REQUEST_ID_CONFLICT."),
    ("Delete{m}", "Deletes a {m} by primary key.\nErrors: RECORD_NOT_FOUND, "
     "CONSTRAINT_VIOLATION."),
    ("List{p}", "Lists {c} matching a filter, in a stable order, a page at a time.\n"
     "Errors: QUERY_INVALID, PAGE_TOKEN_INVALID."),
    ("Count{p}", "Counts the {c} matching a filter.\nErrors: QUERY_INVALID."),
    ("Upsert{m}", "Inserts a {m}, or updates the one with the same values in the "
     "`conflict_on` fields.\nErrors: RECORD_INVALID, RECORD_ALREADY_EXISTS, "
     "CONSTRAINT_VIOLATION, REQUEST_ID_CONFLICT."),
    ("Search{p}", "Full-text search of the {c}: the records matching `q` (and the filter), "
     "most relevant first, each with its score.\nErrors: QUERY_INVALID, PAGE_TOKEN_INVALID."),
    ("BulkCreate{p}", "Creates many {c} in one transaction: all or none.\nErrors: as "
     "Create{m}; BadRequest fields are `{c}[i].field`."),
    ("BulkUpdate{p}", "Sets the same field values on every {m} matching a filter, in one "
     "transaction.\nErrors: QUERY_INVALID, RECORD_INVALID, REQUEST_INVALID (an empty filter "
     "without allow_all), CONSTRAINT_VIOLATION, REQUEST_ID_CONFLICT."),
    ("BulkDelete{p}", "Deletes every {m} matching a filter, in one transaction.\nErrors: "
     "QUERY_INVALID, REQUEST_INVALID (an empty filter without allow_all), "
     "CONSTRAINT_VIOLATION, REQUEST_ID_CONFLICT."),
    ("BulkUpsert{p}", "Upserts many {c} in one transaction: all or none.\nErrors: as "
     "Upsert{m}; BadRequest fields are `{c}[i].field`."),
)  # fmt: skip

_SHARED_MESSAGES = {
    "BulkWriteResult": "The result of a bulk write.",
    "CountResult": "The result of a count.",
}


def _field_text(f: FieldInfo) -> str:
    parts = [f.description.strip().rstrip(".")] if f.description.strip() else []
    if f.primary_key:
        parts.append(
            "The primary key" + (", generated when a create omits it" if f.generated else "")
        )
    if f.managed or f.tenant:
        parts.append("Set by the server, read-only")
    if f.unique:
        parts.append("Unique")
    if f.nullable:
        parts.append("May be null (unset)")
    return ". ".join(p[:1].upper() + p[1:] for p in parts) + "." if parts else ""


class _Comments:
    def __init__(self, info: descriptor_pb2.SourceCodeInfo) -> None:
        self.info = info

    def add(self, path: tuple[int, ...], text: str) -> None:
        if not text:
            return
        loc = self.info.location.add()
        loc.path.extend(path)
        # (a location has a span; these were made, not parsed: the span is empty)
        loc.span.extend((0, 0, 0))
        # protoc's form: each line after `//`, with its leading space, newline-terminated
        lines = [w for line in text.splitlines() for w in textwrap.wrap(line, _WIDTH)]
        loc.leading_comments = "".join(f" {line}\n" for line in lines)


def describe_models_file(
    fdp: descriptor_pb2.FileDescriptorProto,
    models: Sequence[ModelInfo],
    plural: dict[str, str],
    collection: dict[str, str],
) -> None:
    """Write the comments of the models file `fdp` into its `source_code_info`.

    `plural` and `collection` give each model's plural (`Contacts`) and collection
    (`contacts`), as `_typed` names its messages and routes."""
    c = _Comments(fdp.source_code_info)
    del fdp.source_code_info.location[:]
    by_message: dict[str, tuple[ModelInfo | None, str]] = {}
    for model in models:
        m, p = model.name, plural[model.name]
        subject = f"`{m}`"
        for template, _ in _METHODS:
            rpc = template.format(m=m, p=p)
            by_message[f"{rpc}Request"] = (model, f"The request of {subject} {rpc}.")
        by_message[f"List{p}Response"] = (model, f"A page of {collection[m]}.")
        by_message[f"Search{p}Response"] = (model, f"A page of search results: {collection[m]}.")
    models_by_name = {model.name: model for model in models}
    for i, msg in enumerate(fdp.message_type):
        path = (_MESSAGE, i)
        if msg.name in models_by_name:
            model = models_by_name[msg.name]
            about = model.description.strip() or f"A {model.name} record."
            c.add(path, f"{about}\nA record of the DataFlow model `{model.name}`; an unset "
                  "field is a null column (on create: the model's default).")  # fmt: skip
            fields = model.field_map
            for j, fld in enumerate(msg.field):
                if fld.name in fields:
                    c.add((*path, _FIELD, j), _field_text(fields[fld.name]))
            continue
        # (a message this module does not know yet goes without a comment)
        owner, text = by_message.get(msg.name, (None, _SHARED_MESSAGES.get(msg.name, "")))
        c.add(path, text)
        for j, fld in enumerate(msg.field):
            c.add((*path, _FIELD, j), _request_field_text(fld.name, owner, collection))
    for i, svc in enumerate(fdp.service):
        served = models_by_name.get(svc.name.removesuffix("Service"))
        if served is None:
            continue
        model = served
        about = model.description.strip().rstrip(".")
        head = f"The {model.name} records" + (f" ({about})" if about else "")
        c.add((_SERVICE, i), f"{head}: typed create, read, update, delete, list, count "
              f"and bulk writes at /v1/{collection[model.name]}.")  # fmt: skip
        texts = {
            t.format(m=model.name, p=plural[model.name]): d.format(
                m=model.name, p=plural[model.name], c=collection[model.name]
            )
            for t, d in _METHODS
        }
        for j, method in enumerate(svc.method):
            c.add((_SERVICE, i, _METHOD, j), texts.get(method.name, ""))


def _request_field_text(name: str, owner: ModelInfo | None, collection: dict[str, str]) -> str:
    if name in _COMMON_FIELDS:
        return _COMMON_FIELDS[name]
    if owner is None:
        return ""
    if name == "id":
        return f"The primary key (`{owner.primary_key.name}`) of the {owner.name}."
    if name == collection[owner.name]:
        return f"The {owner.name} records."
    return f"The {owner.name} record."
