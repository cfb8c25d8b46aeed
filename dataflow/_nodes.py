"""Generated workflow nodes: twelve per model, thin wrappers over `ModelOps`.

Their parameters carry the model's field types, so a workflow placeholder feeding
``ContactCreateNode.email`` is typed ``str`` at registration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from workflow import MISSING, Node, Output, Param

from ._model import FieldInfo, ModelInfo
from ._ops import ModelOps

__all__ = ["NODE_KINDS", "SEARCH_KIND", "make_nodes"]

#: The operations generated for every model, in order: node type = model name + kind.
NODE_KINDS = (
    "CreateNode",
    "ReadNode",
    "UpdateNode",
    "DeleteNode",
    "ListNode",
    "CountNode",
    "UpsertNode",
    "BulkCreateNode",
    "BulkUpdateNode",
    "BulkDeleteNode",
    "BulkUpsertNode",
    "SearchNode",
)


def _field_param(f: FieldInfo) -> Param:
    if f.primary_key:
        return Param(f.type | None, default=None, description="generated when omitted")
    if f.default is not None and f.default is not MISSING:
        return Param(f.type, default=f.default, description=f.description)
    if f.nullable:
        return Param(f.type, default=None, description=f.description)
    return Param(f.type, description=f.description)


def _upsert_param(f: FieldInfo) -> Param:
    """An UpsertNode parameter. A field that is optional on insert is optional here with
    no default of its own: a node receives every parameter, and a default passed along
    would overwrite the stored value of an existing record. Left out (or null), the
    field keeps its stored value; a new record gets the model's default."""
    if f.primary_key or (f.default is MISSING and not f.nullable):
        return _field_param(f)
    note = "left out or null: an existing record keeps its value"
    if f.default is not MISSING and f.default is not None:
        note += f"; a new one gets {f.default!r}"
    description = f"{f.description} ({note})" if f.description else note
    return Param(f.type | None, default=None, description=description)


# parameters every model's nodes share (Param is immutable)
_FILTER = Param(dict | None, default=None, description="MongoDB-style filter")
_ALL = Param(bool, default=False, description="allow an empty filter (every record)")
_CONFLICT = Param(list | None, default=None, description="the unique key to match on (default: id)")
_LIST_PARAMS = {
    "filter": _FILTER,
    "order_by": Param(list | None, default=None, description="field names, '-name' descending"),
    "limit": Param(int | None, default=None, description="page size"),
    "offset": Param(int | None, default=None),
    "page_token": Param(str | None, default=None, description="from next_page_token"),
    "fields": Param(list | None, default=None, description="projection"),
}
_COUNT_OUT = {"count": Output(int)}
#: Full-text search (``<Model>SearchNode``): every model has the node; a query needs
#: searchable fields, a filter alone works on any model.
SEARCH_KIND = "SearchNode"
_SEARCH_PARAMS = {
    "query": Param(
        str | None,
        default=None,
        description='words (all must occur), "a phrase", -word to exclude, word* for a '
        "prefix; none: every record matching the filter",
    ),
    "filter": _FILTER,
    "limit": Param(int | None, default=None, description="page size (default 20, at most 1000)"),
    "page_token": Param(str | None, default=None, description="from next_page_token"),
    "fields": Param(list | None, default=None, description="projection"),
}


def make_nodes(model: ModelInfo, get_ops: Callable[[], ModelOps]) -> dict[str, type[Node]]:
    """The node classes of `model`, by type name. `get_ops` returns the model's ops (looked
    up at run time so nodes follow the DataFlow's current engine)."""
    name = model.name
    idp = model.primary_key
    record = {f.name: Output(f.type, f.description) for f in model.fields}
    create_params = {f.name: _field_param(f) for f in model.writable_fields}
    flt = _FILTER
    everything = _ALL

    async def create(self: Node, **p: Any) -> Mapping[str, Any]:
        return await get_ops().create(**p)

    async def read(self: Node, id: Any) -> Mapping[str, Any]:
        return await get_ops().read(id)

    async def update_(self: Node, id: Any, filter: Any, fields: Any, all: bool) -> Any:
        return await get_ops().update(id, filter=filter, fields=fields, all=all)

    async def delete(self: Node, id: Any) -> Mapping[str, Any]:
        return {"deleted": await get_ops().delete(id)}

    async def list_(self: Node, **p: Any) -> Mapping[str, Any]:
        return await get_ops().list(p.pop("filter"), **p)

    async def count(self: Node, filter: Any) -> Mapping[str, Any]:
        return {"count": await get_ops().count(filter)}

    async def upsert(self: Node, conflict_on: Any, **p: Any) -> Mapping[str, Any]:
        # a null is "not given" (see _upsert_param): only given fields change
        return await get_ops().upsert(conflict_on, **{k: v for k, v in p.items() if v is not None})

    async def bulk_create(self: Node, data: Any) -> Mapping[str, Any]:
        return {"created": await get_ops().bulk_create(data)}

    async def bulk_update(self: Node, data: Any, filter: Any, fields: Any, all: bool) -> Any:
        return {"updated": await get_ops().bulk_update(data, filter=filter, fields=fields, all=all)}

    async def bulk_delete(self: Node, filter: Any, ids: Any, all: bool) -> Mapping[str, Any]:
        return {"deleted": await get_ops().bulk_delete(filter, ids=ids, all=all)}

    async def bulk_upsert(self: Node, data: Any, conflict_on: Any) -> Mapping[str, Any]:
        return {"upserted": await get_ops().bulk_upsert(data, conflict_on)}

    async def search(self: Node, query: Any, filter: Any, **p: Any) -> Mapping[str, Any]:
        return await get_ops().search(query, filter, **p)

    conflict = _CONFLICT
    specs: dict[str, tuple[str, Any, dict[str, Param], dict[str, Output]]] = {
        "CreateNode": (f"Create a {name} record.", create, create_params, record),
        "ReadNode": (
            f"Read a {name} record by id.",
            read,
            {"id": Param(idp.type, description=f"the {name}'s id")},
            record,
        ),
        "UpdateNode": (
            f"Update one {name} record, by id or by a filter matching exactly one.",
            update_,
            {
                "id": Param(idp.type | None, default=None),
                "filter": flt,
                "fields": Param(dict, description="field values to set"),
                "all": everything,
            },
            record,
        ),
        "DeleteNode": (
            f"Delete a {name} record by id.",
            delete,
            {"id": Param(idp.type)},
            {"deleted": Output(int, "records deleted (1)")},
        ),
        "ListNode": (
            f"List {name} records: filter, sort, paginate, project.",
            list_,
            _LIST_PARAMS,
            {
                "records": Output(list, f"the {name} records"),
                "next_page_token": Output(str | None, "token of the next page, if any"),
            },
        ),
        "CountNode": (
            f"Count {name} records matching a filter.",
            count,
            {"filter": flt},
            _COUNT_OUT,
        ),
        "UpsertNode": (
            f"Insert a {name} record or update the one with the same unique key.",
            upsert,
            {
                **{f.name: _upsert_param(f) for f in model.writable_fields},
                "conflict_on": conflict,
            },
            record,
        ),
        "BulkCreateNode": (
            f"Create many {name} records in one transaction.",
            bulk_create,
            {"data": Param(list, description="records (objects of field values)")},
            {"created": Output(int)},
        ),
        "BulkUpdateNode": (
            f"Update many {name} records in one transaction (by id rows or by filter).",
            bulk_update,
            {
                "data": Param(list | None, default=None, description="records with id"),
                "filter": flt,
                "fields": Param(dict | None, default=None, description="values to set"),
                "all": everything,
            },
            {"updated": Output(int)},
        ),
        "BulkDeleteNode": (
            f"Delete many {name} records in one transaction (by filter or ids).",
            bulk_delete,
            {
                "filter": flt,
                "ids": Param(list | None, default=None),
                "all": everything,
            },
            {"deleted": Output(int)},
        ),
        "BulkUpsertNode": (
            f"Insert or update many {name} records in one transaction.",
            bulk_upsert,
            {"data": Param(list), "conflict_on": conflict},
            {"upserted": Output(int)},
        ),
    }
    specs[SEARCH_KIND] = (
        f"Full-text search of {name} records, most relevant first, with a filter.",
        search,
        _SEARCH_PARAMS,
        {
            "records": Output(list, f"the {name} records, most relevant first"),
            "scores": Output(list, "each record's relevance (higher: more relevant)"),
            "next_page_token": Output(str | None, "token of the next page, if any"),
        },
    )
    out: dict[str, type[Node]] = {}
    for kind in NODE_KINDS:
        doc, run, params, outputs = specs[kind]
        type_name = f"{name}{kind}"
        cls = type(
            type_name,
            (Node,),
            {
                "__doc__": doc,
                "__module__": __name__,
                "__qualname__": type_name,
                "type_name": type_name,
                "description": doc,
                "parameters": params,
                "outputs": outputs,
                "run": run,
                "dataflow_model": model.name,
            },
        )
        out[type_name] = cls
    return out
