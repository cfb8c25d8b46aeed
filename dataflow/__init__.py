"""DataFlow: annotated classes become tables and generated CRUD workflow nodes.

```python
from dataflow import DataFlow, field

db = DataFlow("sqlite:///app.db")

@db.model
class Contact:
    id: str
    name: str
    email: str = field(unique=True)
    company: str | None = None
    score: int = 0

await db.initialize()
contact = await db.ops(Contact).create(name="Ada", email="ada@example.com")
```

Each model gets the workflow node types ``<Model>CreateNode``, ``ReadNode``,
``UpdateNode``, ``DeleteNode``, ``ListNode``, ``CountNode``, ``UpsertNode``,
``BulkCreateNode``, ``BulkUpdateNode``, ``BulkDeleteNode``, ``BulkUpsertNode`` and
``SearchNode``: full-text search ranked by relevance (`ModelOps.search`) over the
searchable fields (``field(searchable=True)``, or ``__searchable__ = True`` for every
``str`` field); without a query, the records matching a filter.

Introspection (used to build typed protobuf messages and services): `DataFlow.models`
gives every `ModelInfo`; `ModelInfo.fields` gives each `FieldInfo` (name, type,
nullable, default, primary_key, unique, ...); `DataFlow.node_types()` the node classes.

Tenants: ``@db.model(tenant_scoped=True)`` (or a field declared ``field(tenant=True)``)
makes every operation of a model see and write only the current tenant's records, set
with ``with tenant_scope("acme"): ...`` (`current_tenant()` reads it); without one, the
operations raise `TenantRequired`. `ModelInfo.tenant_field` names the tenant field.

Circuit breaker: after 5 failures in a row to reach the database (`BreakerOptions`),
operations fail at once with `CircuitOpenError` (which says when to retry) until a trial
call succeeds; `DataFlow.breaker` reads its state. A node guards any other dependency
with a `CircuitBreaker` of its own (``async with breaker.attempt(): ...``).
"""

from __future__ import annotations

from ._breaker import BreakerOptions, CircuitBreaker, CircuitOpenError, is_unreachable
from ._cache import cache_scope, current_cache_scope
from ._dataflow import DataFlow
from ._errors import (
    AlreadyExistsError,
    ConflictError,
    DatabaseError,
    DataFlowError,
    MigrationError,
    ModelError,
    NotFoundError,
    SchemaMissingError,
    TenantRequired,
    UniqueViolation,
    ValidationError,
)
from ._filters import MAX_FILTER_DEPTH, OPERATORS
from ._model import MANAGED_FIELDS, TENANT_FIELD, FieldInfo, ModelInfo, field
from ._nodes import NODE_KINDS, SEARCH_KIND
from ._ops import ModelOps
from ._schema import REGISTRY_TABLE
from ._sqltypes import SQL_TYPES, dialect_insert
from ._tenant import current_tenant, tenant_scope
from ._values import JSON_MAX_DEPTH, storable_reason

__all__ = [
    "JSON_MAX_DEPTH",
    "MANAGED_FIELDS",
    "MAX_FILTER_DEPTH",
    "NODE_KINDS",
    "OPERATORS",
    "REGISTRY_TABLE",
    "SEARCH_KIND",
    "SQL_TYPES",
    "TENANT_FIELD",
    "AlreadyExistsError",
    "BreakerOptions",
    "CircuitBreaker",
    "CircuitOpenError",
    "ConflictError",
    "DataFlow",
    "DataFlowError",
    "DatabaseError",
    "FieldInfo",
    "MigrationError",
    "ModelError",
    "ModelInfo",
    "ModelOps",
    "NotFoundError",
    "SchemaMissingError",
    "TenantRequired",
    "UniqueViolation",
    "ValidationError",
    "cache_scope",
    "current_cache_scope",
    "current_tenant",
    "dialect_insert",
    "field",
    "is_unreachable",
    "storable_reason",
    "tenant_scope",
]
