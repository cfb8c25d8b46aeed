"""`GET /health`: the server's health as one JSON document for HTTP probes.

Load balancers, container orchestrators and uptime monitors probe over HTTP and read the
status code; gRPC clients have `grpc.health.v1.Health`. Both report the database's
state the same way: the database watcher of the app sets the gRPC health service's
status, and this servicer reads it (`serving`). The JSON also shows the database's
circuit breaker (`breaker`): while it is open the document is unhealthy at once,
before the watcher's pings notice (a ping that answers closes the breaker).

The document is the original Nexus's shape, `{"status": "healthy"|"unhealthy",
"components": {...}}`, served as a `google.api.HttpBody` that Envoy's transcoder passes
through as the raw body. A successful RPC is always HTTP 200 to the transcoder, so an
unhealthy answer also carries the response header `x-nexus-http-status: 503`, which a
small Lua filter on Envoy's `/health` route turns into the HTTP status (`_envoy.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.api import httpbody_pb2

from nexus_api.nexus.health.v1 import probe_service_pb2, probe_service_pb2_grpc

from ._registry import WorkflowRegistry

__all__ = [
    "HEALTH_SCHEMA",
    "HTTP_STATUS_HEADER",
    "PROBE_SERVICE",
    "ProbeServicer",
    "health_document",
]

PROBE_SERVICE = "nexus.health.v1.ProbeService"
#: Response header carrying the HTTP status Envoy gives a REST response (`_envoy.py`).
HTTP_STATUS_HEADER = "x-nexus-http-status"


_STATUS_SCHEMA: dict[str, Any] = {"type": "string", "enum": ["healthy", "unhealthy"]}
#: The JSON schema of the health document (the OpenAPI document's `GET /health`, for
#: both its 200 and its 503).
HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "components"],
    "properties": {
        "status": _STATUS_SCHEMA,
        "components": {
            "type": "object",
            "description": "each component's state: `database` (the database answers "
            "pings), `workflows` (`registered`: how many), `breaker` (the database's "
            "circuit breaker: `state` closed, open or half_open, its counters, and "
            "`retry_after` seconds while not closed; unhealthy unless closed)",
            "additionalProperties": {
                "type": "object",
                "required": ["status"],
                "properties": {"status": _STATUS_SCHEMA},
            },
        },
    },
}


def health_document(
    *,
    database_ok: bool,
    workflows: int,
    extra: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The health JSON: healthy when every component is. `extra`: more components by
    name (the circuit breaker's), each with its ``status``."""
    components: dict[str, dict[str, Any]] = {
        "database": {"status": "healthy" if database_ok else "unhealthy"},
        "workflows": {"status": "healthy", "registered": workflows},
    }
    for name, component in (extra or {}).items():
        components[name] = dict(component)
    healthy = all(c["status"] == "healthy" for c in components.values())
    return {"status": "healthy" if healthy else "unhealthy", "components": components}


class ProbeServicer(probe_service_pb2_grpc.ProbeServiceServicer):
    """`GetHealth`: the health JSON, with `x-nexus-http-status: 503` when unhealthy.

    Args:
        serving: whether the gRPC health service says SERVING (the database answers).
        registry: the registered workflows (their count is shown).
        components: more components, read at each request (the database's circuit
            breaker: `dataflow.CircuitBreaker.snapshot`).
    """

    def __init__(
        self,
        serving: Callable[[], bool],
        registry: WorkflowRegistry,
        components: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
    ) -> None:
        self._serving = serving
        self._registry = registry
        self._components = components

    async def GetHealth(
        self,
        request: probe_service_pb2.GetHealthRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> httpbody_pb2.HttpBody:
        doc = health_document(
            database_ok=self._serving(),
            workflows=len(self._registry.names()),
            extra=self._components() if self._components is not None else None,
        )
        if doc["status"] != "healthy":
            await context.send_initial_metadata(((HTTP_STATUS_HEADER, "503"),))
        data = json.dumps(doc, separators=(",", ":")).encode()
        return httpbody_pb2.HttpBody(content_type="application/json", data=data)
