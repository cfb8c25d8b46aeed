"""Per-workflow response caching: `app.register(name, wf, cache_ttl=30)`.

A read-only workflow's successful `ExecuteWorkflow` reply is kept for `cache_ttl`
seconds, keyed by the workflow (as registered: registering it again starts afresh), the
calling principal, its tenant and the inputs. The same call within the TTL gets the
same reply (the same execution, not a new one) with the response metadata
``x-nexus-cache: hit`` (a REST client gets it as a header through Envoy); a reply that
ran the workflow says ``miss``. The body never changes.

Only workflows that cannot write are accepted: a DataFlow write node (Create, Update,
Delete, Upsert, Bulk*) or a node that runs code given in its configuration (the
PythonCodeNode) is refused at registration, naming the node; so is a node class of
your own that declares ``writes = True``. The cache sits in the servicer, behind the
gateway chain: every call is authenticated, authorised and rate limited as usual
before a cached reply is looked at.

Staleness is bounded by the TTL: a write through DataFlow does not end a cached reply
(DataFlow's own query cache, `enable_caching`, is the one that is always current).
The cache lives in the server process, bounded in entries (least recently used out
first). Calls with a `request_id` bypass it: the idempotency key has its own rules.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from workflow import Workflow

__all__ = [
    "CACHE_HEADER",
    "MAX_CACHE_TTL",
    "ResponseCache",
    "check_cache_ttl",
    "check_read_only",
]

#: The response metadata (REST: the header) that says whether a reply came from cache.
CACHE_HEADER = "x-nexus-cache"
#: The longest `cache_ttl` accepted, in seconds (a day).
MAX_CACHE_TTL = 86400.0
#: Replies kept per server process by default.
DEFAULT_MAX_ENTRIES = 10_000

#: DataFlow's generated node kinds that write (node type = model name + kind).
_WRITE_KINDS = (
    "CreateNode",
    "UpdateNode",
    "DeleteNode",
    "UpsertNode",
    "BulkCreateNode",
    "BulkUpdateNode",
    "BulkDeleteNode",
    "BulkUpsertNode",
)


def check_cache_ttl(cache_ttl: object) -> float | None:
    """`cache_ttl` as seconds (None: no caching), or ValueError naming it."""
    if cache_ttl is None:
        return None
    if (
        isinstance(cache_ttl, bool)
        or not isinstance(cache_ttl, int | float)
        or not 0 < cache_ttl <= MAX_CACHE_TTL
    ):
        raise ValueError(
            f"cache_ttl: expects seconds, more than 0 and at most {MAX_CACHE_TTL:g} "
            f"(or None), got {cache_ttl!r}"
        )
    return float(cache_ttl)


def check_read_only(name: str, wf: Workflow) -> None:
    """Refuse (ValueError naming the node) a workflow one of whose nodes may write."""
    for node_id, node in wf.nodes.items():
        cls = type(node)
        type_name = wf.node_type(node_id)
        why = ""
        if getattr(cls, "dataflow_model", None) is not None and type_name.endswith(_WRITE_KINDS):
            why = "writes to the database"
        elif not cls.exposable or cls.code_params:
            why = "runs code, which may write"
        elif getattr(cls, "writes", False):
            why = "declares writes = True"
        if why:
            raise ValueError(
                f"workflow {name!r}: cache_ttl needs a read-only workflow, and node "
                f"{node_id!r} ({type_name}) {why}; register it without cache_ttl"
            )


class ResponseCache:
    """Replies of read-only workflows, by (workflow, principal, tenant, inputs), each
    kept for its workflow's TTL; at most `max_entries`, least recently used out first.
    Counts its hits and misses (metrics read them)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[Any, ...], tuple[float, bytes]] = OrderedDict()

    @staticmethod
    def key(
        workflow: str,
        version: object,
        principal: str,
        tenant: str | None,
        inputs: bytes,
    ) -> tuple[Any, ...]:
        """The key of one call: `version` tells registrations of one name apart;
        `inputs` is the request's inputs serialized deterministically."""
        return (workflow, version, principal, tenant, inputs)

    def get(self, key: tuple[Any, ...]) -> bytes | None:
        """The cached reply (serialized), or None; counts a hit or a miss."""
        found = self._entries.get(key)
        if found is not None:
            if found[0] > time.monotonic():
                self._entries.move_to_end(key)
                self.hits += 1
                return found[1]
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: tuple[Any, ...], reply: bytes, ttl: float) -> None:
        entries = self._entries
        entries[key] = (time.monotonic() + ttl, reply)
        entries.move_to_end(key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
