"""HTTP probes: `GET /health` (components), `GET /readyz` and `GET /livez`.

Load balancers, container orchestrators and uptime monitors probe over HTTP and read the
status code; gRPC clients have `grpc.health.v1.Health`. Both report the same state: the
database watcher of the app sets the gRPC health service's status, and this servicer
reads it (`serving`), so the two can never disagree.

`GET /health` is the original Nexus's shape, `{"status": "healthy"|"unhealthy",
"components": {...}}`: one entry per `HealthComponents` check (the database, the
registered workflows, the database's circuit breaker, Envoy, the MCP adapter, and
whatever else registers one: a cache). The server is unhealthy when a *critical*
component is (the database; the breaker, which while open makes the document unhealthy
at once, before the watcher's pings notice); a channel process that is down (its
supervisor restarts it) is an unhealthy component of a healthy server. gRPC clients
read each component as the health service `nexus.component.<name>` (`Check`, `List`).

`GET /readyz` (readiness: send traffic?) is ready once the server has started and while
its database answers, and not ready while it stops; `GET /livez` (liveness: restart
it?) answers as long as the process does, whatever its database does, so an
orchestrator never restarts a server for an outage elsewhere.

The documents are served as `google.api.HttpBody`, which Envoy's transcoder passes
through as the raw body. A successful RPC is always HTTP 200 to the transcoder, so an
unhealthy or unready answer also carries the response header `x-nexus-http-status:
503`, which a small Lua filter on Envoy's probe routes turns into the HTTP status
(`_envoy.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.api import httpbody_pb2

from nexus_api.nexus.health.v1 import probe_service_pb2, probe_service_pb2_grpc

__all__ = [
    "COMPONENT_SERVICE_PREFIX",
    "HEALTH_SCHEMA",
    "HTTP_STATUS_HEADER",
    "PROBE_PATHS",
    "PROBE_SERVICE",
    "READINESS_SCHEMA",
    "ComponentCheck",
    "HealthComponents",
    "ProbeServicer",
]

_log = logging.getLogger("nexus_server")

PROBE_SERVICE = "nexus.health.v1.ProbeService"
#: Response header carrying the HTTP status Envoy gives a REST response (`_envoy.py`).
HTTP_STATUS_HEADER = "x-nexus-http-status"
#: The gRPC health service name of a component: `nexus.component.database`, ...
COMPONENT_SERVICE_PREFIX = "nexus.component."
#: The REST paths of the probes whose HTTP status the server sets, by RPC (`_envoy.py`).
PROBE_PATHS = {"GetHealth": "/health", "GetReadiness": "/readyz"}


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
            "pings), `workflows` (`registered`: how many), `queue` (asynchronous "
            "executions this process runs, claimed and settled), `breaker` (the database's "
            "circuit breaker: `state` closed, open or half_open, its counters, and "
            "`retry_after` seconds while not closed; unhealthy unless closed), `envoy` "
            "and `mcp` (the channel process runs; `restarts`: how often it was "
            "restarted), and any other the app registers (a cache)",
            "additionalProperties": {
                "type": "object",
                "required": ["status"],
                "properties": {"status": _STATUS_SCHEMA},
            },
        },
    },
}


#: The JSON schema of the readiness document (`GET /readyz`, its 200 and its 503).
READINESS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["status", "checks"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not_ready"]},
        "checks": {
            "type": "object",
            "description": "`started`: the server has started and is not stopping; "
            "`database`: the database answers",
            "additionalProperties": {"type": "boolean"},
        },
    },
}


#: A component's check: returns its state, `{"status": "healthy"|"unhealthy", ...}`
#: (other keys are shown as they are: counts, a state name; never addresses or
#: credentials, the document is open to everyone).
ComponentCheck = Callable[[], Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class _Component:
    check: ComponentCheck
    critical: bool


class HealthComponents:
    """The components the health document and the component health services report.

    The app registers the database, the workflows, Envoy and the MCP adapter; anything
    else with a state worth probing (a cache, a circuit breaker) adds its own check with
    `add`. Checks run on each probe, so they must be cheap and must not block (read a
    state kept elsewhere; never do I/O).
    """

    def __init__(self) -> None:
        self._components: dict[str, _Component] = {}

    def add(self, name: str, check: ComponentCheck, *, critical: bool = False) -> None:
        """Report `check` as component `name` (replacing one of that name).
        `critical`: the server is unhealthy while this component is."""
        self._components[name] = _Component(check, critical)

    def remove(self, name: str) -> None:
        """Stop reporting `name` (no error if it is not reported)."""
        self._components.pop(name, None)

    def names(self) -> list[str]:
        return list(self._components)

    def state(self, name: str) -> dict[str, Any] | None:
        """Component `name`'s state, or None if there is no such component. A check
        that raises reports the component unhealthy (naming the kind of error only)."""
        component = self._components.get(name)
        if component is None:
            return None
        try:
            state = dict(component.check())
        except Exception as exc:
            _log.warning("health check of %s failed: %s", name, exc)
            return {"status": "unhealthy", "error": type(exc).__name__}
        if state.get("status") not in ("healthy", "unhealthy"):
            state["status"] = "unhealthy"
        return state

    def document(self) -> dict[str, Any]:
        """The health JSON: unhealthy when a critical component is."""
        components = {}
        healthy = True
        for name, component in list(self._components.items()):
            state = self.state(name)
            if state is None:
                continue
            components[name] = state
            if component.critical and state["status"] != "healthy":
                healthy = False
        return {"status": "healthy" if healthy else "unhealthy", "components": components}


class ProbeServicer(probe_service_pb2_grpc.ProbeServiceServicer):
    """`GetHealth`, `GetReadiness`, `GetLiveness`: JSON documents, with
    `x-nexus-http-status: 503` when unhealthy or not ready.

    Args:
        components: what the health document reports.
        serving: whether the gRPC health service says SERVING (the database answers).
        started: whether the server has started and is not stopping.
    """

    def __init__(
        self,
        components: HealthComponents,
        serving: Callable[[], bool],
        started: Callable[[], bool],
    ) -> None:
        self._components = components
        self._serving = serving
        self._started = started

    async def GetHealth(
        self,
        request: probe_service_pb2.GetHealthRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> httpbody_pb2.HttpBody:
        doc = self._components.document()
        return await _answer(doc, doc["status"] == "healthy", context)

    async def GetReadiness(
        self,
        request: probe_service_pb2.GetReadinessRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> httpbody_pb2.HttpBody:
        checks = {"started": self._started(), "database": self._serving()}
        ready = all(checks.values())
        doc = {"status": "ready" if ready else "not_ready", "checks": checks}
        return await _answer(doc, ready, context)

    async def GetLiveness(
        self,
        request: probe_service_pb2.GetLivenessRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> httpbody_pb2.HttpBody:
        return await _answer({"status": "alive"}, True, context)


async def _answer(
    doc: Mapping[str, Any], ok: bool, context: grpc.aio.ServicerContext[Any, Any]
) -> httpbody_pb2.HttpBody:
    if not ok:
        await context.send_initial_metadata(((HTTP_STATUS_HEADER, "503"),))
    data = json.dumps(doc, separators=(",", ":")).encode()
    return httpbody_pb2.HttpBody(content_type="application/json", data=data)
