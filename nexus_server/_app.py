"""The Nexus app: register workflows and models once, serve them over gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from dataflow import CircuitBreaker, DataFlow
from nexus_api import descriptor_set_bytes
from nexus_api.nexus.audit.v1 import audit_service_pb2_grpc as augrpc
from nexus_api.nexus.auth.v1 import auth_service_pb2_grpc as agrpc
from nexus_api.nexus.health.v1 import probe_service_pb2_grpc as pgrpc
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mgrpc
from nexus_api.nexus.openapi.v1 import openapi_service_pb2_grpc as ogrpc
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from workflow import Workflow

from ._bus import bus_for
from ._discovery import discover_workflows
from ._errors import guard_method
from ._executions import Executions
from ._handlers import map_methods
from ._limits import Limits
from ._model_service import ModelServicer, typed_handlers
from ._openapi import OpenApiServicer
from ._probes import COMPONENT_SERVICE_PREFIX, PROBE_SERVICE, HealthComponents, ProbeServicer
from ._queue import ExecutionQueue, QueuedWorkflow, QueueOptions
from ._records import Records
from ._reflection import add_reflection, reflection_files, reflection_pool
from ._registry import WorkflowRegistry
from ._store import Store
from ._typed import TypedModels, public_path
from ._workflow_service import WorkflowServicer
from ._workflow_store import WorkflowStore
from .gateway import Gateway, Policy, ResponseCache, check_cache_ttl, check_read_only
from .gateway._audit import AuditTrail
from .gateway._audit_service import AuditServicer
from .gateway._auth_service import AuthServicer
from .gateway._authn import Authenticator
from .gateway._config import AuthConfig
from .gateway._keys import KeyStore
from .gateway._rate import RateLimit, RateLimiter, RateLimits, parse_backend, parse_rate
from .gateway._shed import Shedder
from .gateway._tracing import Tracing, tracing_from_env, tracing_wanted

if TYPE_CHECKING:
    from ._envoy import EnvoySupervisor
    from .gateway._metrics import Metrics, MetricsServer

__all__ = [
    "AuthNotConfigured",
    "GrpcPortError",
    "MetricsPortError",
    "Nexus",
    "Serving",
    "deferred_start",
]

_log = logging.getLogger("nexus_server")

WORKFLOW_SERVICE = "nexus.workflow.v1.WorkflowService"
MODEL_SERVICE = "nexus.model.v1.ModelService"
OPENAPI_SERVICE = "nexus.openapi.v1.OpenApiService"
AUTH_SERVICE = "nexus.auth.v1.AuthService"
AUDIT_SERVICE = "nexus.audit.v1.AuditService"


class GenericHandlersOnly:
    """Where the generated `add_*Servicer_to_server` functions register services: it
    passes their generic handlers to the server and drops the registered-method copies.

    Why: in grpcio 1.85 the asyncio server keeps one pending accept per registered
    method and waits on all of them (`asyncio.wait`) for every incoming call, so each
    call costs time in proportion to how many methods are registered: with our ~30, about
    40 µs of event-loop time per call, 7-8 % of ExecuteWorkflow's throughput
    (docs/benchmarks.md, "Registered methods"; upstream: grpc/grpc#43461). Generic
    handlers answer the same methods through one accept loop.

    Every method passes through the gateway chain (`gateway.Gateway`: authentication,
    authorization, tenant, audit) and then `guard_method`: a request that is not valid
    protobuf is INVALID_ARGUMENT on every method (generated, typed, health, reflection),
    never grpc's UNKNOWN naming protobuf's DecodeError.
    """

    def __init__(self, server: grpc.aio.Server, gateway: Gateway) -> None:
        self._server = server
        self._gateway = gateway

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([map_methods(h, self._method) for h in handlers])

    def _method(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        # the chain outside the decoding guard: a stranger is refused before anything
        # about its request is said. A REST twin's method passes it as the typed method
        # it stands for: the same rule, metrics, audit entry and trace.
        return self._gateway.method(public_path(path), guard_method(path, handler))

    def add_registered_method_handlers(
        self, service: str, method_handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        """Dropped: the same handlers came through `add_generic_rpc_handlers`."""


@dataclass(frozen=True)
class Serving:
    """A running server: where it listens and what it serves."""

    host: str
    port: int
    services: tuple[str, ...]
    typed: TypedModels
    startup_seconds: float
    #: Envoy's port (REST, gRPC-Web, Connect and gRPC) when `serving(envoy=True)`, else None.
    api_port: int | None = None
    #: The Envoy supervisor when `serving(envoy=True)`, else None.
    envoy: EnvoySupervisor | None = None
    #: The metrics when `enable_monitoring` is on, else None.
    metrics: Metrics | None = None
    #: The port serving `GET /metrics` when monitoring is on with a `metrics_port`.
    metrics_port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def api_address(self) -> str | None:
        """`host:port` of Envoy's listener, or None without Envoy."""
        return None if self.api_port is None else f"{self.host}:{self.api_port}"


class Nexus:
    """Workflows and DataFlow models, served typed over gRPC (every other channel is a
    client of this server).

    Args:
        grpc_port: the gRPC port (0 picks a free one; `Serving.port` tells which).
        api_port: the port Envoy listens on (REST, gRPC-Web, Connect and gRPC) when the app is
            served (`start()`, `nexus serve`, `serving(envoy=True)`); 0 picks a free one;
            None: no Envoy (gRPC only).
        mcp_port: the MCP adapter's streamable HTTP port when the app is served
            (`start()`, `nexus serve`); 0 picks a free one; None: no MCP adapter.
        host: the interface to listen on.
        auto_discovery: at start, import workflow files found under the working
            directory (`workflows/*.py`, `*_workflow.py`, `workflow_*.py`,
            `*.workflow.py`), each once, and register their workflows.
        allow_code_nodes: accept workflows with code-bearing nodes (PythonCodeNode)
            from RegisterWorkflow. Off by default: such nodes run arbitrary code.
        execution_timeout: default per-execution timeout in seconds (None: none).
        grace_period: seconds in-flight calls get to finish at shutdown.
        drain_delay: seconds the server goes on answering at shutdown after its health
            says NOT_SERVING, before it stops taking calls: a load balancer's health
            checks (Envoy's in front of replicas) move new calls to other replicas
            meanwhile (docs/deploy.md). 0: stop at once.
        health_check_interval: seconds between database checks for the health service.
        discovery_root: where auto-discovery looks (default: the working directory).
        cors_origins: browser origins Envoy allows by CORS (exact origins, or `"*"`);
            empty: no CORS headers (same-origin browsers and non-browser clients only).
        limits: bounds on what requests and connections may cost (`Limits`: sizes of
            registered workflows, connection timeouts, health check tolerance).
        enable_durability: executions called with a `request_id` are durable (recorded
            before the reply, answered from the record on retry): True or None. False is
            refused: that guarantee cannot be turned off.
        enable_auth: authenticate every call (API keys, JWT; docs/security.md). None
            (the default): on when `NEXUS_ENV=production`, else off. On without any
            credential source configured, start fails naming the options.
        auth: the credential sources in code (`AuthConfig`), merged with the
            environment's (`NEXUS_API_KEY_<NAME>`, `NEXUS_JWT_SECRET`, ...).
        policy: roles -> permissions (`Policy`); the built-in roles are admin, reader
            and writer. `register(..., roles=[...])` grants a workflow to roles too.
        public_discovery: reflection and the OpenAPI document need no credential (off:
            any valid credential may read them).
        audit_table: keep the audit trail in the app's database (`nexus_audit`, read
            with `nexus audit list`) as well as in the log.
        audit_reads: audit reads too, not only changes and refusals.
        enable_tracing: OpenTelemetry traces of every call (a span per call, gateway
            check, execution, node and SQL statement; `gateway._tracing`). None (the
            default): on when the environment configures an exporter
            (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_TRACES_EXPORTER`), which the `OTEL_*`
            variables then configure; True without them: OTLP to the default endpoint.
        tracer_provider: an OpenTelemetry tracer provider of the app's own to send the
            spans to (turns tracing on; the `OTEL_*` variables are then the provider's
            business).
        rate_limit: calls per principal: an int N (N per minute, the original's
            meaning), a string (`"10/s"`, `"100/minute burst 20"`), or a `RateLimits`
            with per-workflow, per-model-operation and per-role limits; a token bucket
            per principal (docs/operations.md, "Rate limits and load shedding"). None:
            no limit. `register(..., rate_limit=...)` sets a workflow's own.
        rate_limit_backend: where the buckets live: None (this process) or a
            `redis://host:port/db` URL, so that replicas share one limit.
        enable_monitoring: Prometheus metrics (docs/operations.md): every call by
            method, channel and code with its duration, calls in flight, executions and
            nodes, refusals by reason, and DataFlow's pool and queries when it has
            `enable_metrics=True`. Off (None/False): no metric is kept at all.
        metrics_port: with monitoring on, the port serving `GET /metrics` (Prometheus'
            text format) on `host`; 0 picks a free one (`Serving.metrics_port` tells
            which); None: no metrics port (read them through Envoy or `Serving.metrics`).
        expose_metrics: with monitoring on and Envoy served, `GET /metrics` on Envoy's
            public port too (off by default: metrics are not for every client).
        access_log: one JSON line per call on the `nexus.access` logger (written when
            that logger is enabled for INFO, as `nexus serve` does).
        queue: how this server process runs asynchronous executions (`QueueOptions`:
            how many at once, lease and heartbeat seconds, polling; docs/server.md,
            "Asynchronous executions"). None: the defaults.

    The options are checked at construction and again at `start()`/`serving()`, so the
    attribute form (`app.enable_auth = True` before `start()`) is refused the same way.
    """

    def __init__(
        self,
        *,
        grpc_port: int = 50051,
        api_port: int | None = 8000,
        mcp_port: int | None = 3001,
        host: str = "127.0.0.1",
        auto_discovery: bool = False,
        allow_code_nodes: bool = False,
        execution_timeout: float | None = None,
        grace_period: float = 10.0,
        drain_delay: float = 0.0,
        health_check_interval: float = 5.0,
        discovery_root: str | Path | None = None,
        cors_origins: Sequence[str] = (),
        limits: Limits | None = None,
        enable_durability: bool | None = True,
        enable_auth: bool | None = None,
        auth: AuthConfig | None = None,
        policy: Policy | None = None,
        public_discovery: bool = False,
        audit_table: bool = False,
        audit_reads: bool = False,
        enable_monitoring: bool | None = None,
        metrics_port: int | None = 9464,
        expose_metrics: bool = False,
        access_log: bool = True,
        rate_limit: object = None,
        enable_tracing: bool | None = None,
        tracer_provider: Any = None,
        rate_limit_backend: str | None = None,
        queue: QueueOptions | None = None,
    ) -> None:
        self.grpc_port = grpc_port
        self.api_port = api_port
        self.mcp_port = mcp_port
        self.host = host
        self.auto_discovery = auto_discovery
        self.allow_code_nodes = allow_code_nodes
        self.execution_timeout = execution_timeout
        self.grace_period = grace_period
        self.drain_delay = drain_delay
        self.health_check_interval = health_check_interval
        self.discovery_root = Path(discovery_root) if discovery_root else None
        self.cors_origins = tuple(cors_origins)
        self.limits = limits or Limits()
        self.registry = WorkflowRegistry()
        #: the components `GET /health` and gRPC health report; add a check of your own
        #: with `app.health.add(name, check)` (`_probes.HealthComponents`)
        self.health = HealthComponents()
        self._started = False
        self.enable_durability = enable_durability
        self.enable_auth = enable_auth
        self.auth = auth
        self.policy = policy or Policy()
        self.public_discovery = public_discovery
        self.audit_table = audit_table
        self.audit_reads = audit_reads
        self.enable_monitoring = enable_monitoring
        self.metrics_port = metrics_port
        self.expose_metrics = expose_metrics
        self.access_log = access_log
        self.rate_limit = rate_limit
        self.enable_tracing = enable_tracing
        self.tracer_provider = tracer_provider
        self.rate_limit_backend = rate_limit_backend
        self._workflow_rates: dict[str, RateLimit] = {}
        #: the breakers of other dependencies (`add_breaker`), by name
        self._breakers: dict[str, CircuitBreaker] = {}
        self.queue = QueueOptions() if queue is None else queue
        self._queued: dict[str, QueuedWorkflow] = {}
        self.db: DataFlow | None = None
        self._own_db = False
        self._chosen_db = False
        #: a port the server also listens on, shared with the other processes of
        #: `nexus serve --workers N` through SO_REUSEPORT (`_workers.py`); None: none
        self._shared_port: int | None = None
        self.check_options()

    def check_options(self) -> None:
        """Refuse options this build cannot honour (see the class docstring).

        Raises:
            ValueError: `enable_durability=False`, a `rate_limit` or
                `rate_limit_backend` that is not one.
        """
        if self.enable_monitoring not in (None, True, False):
            raise TypeError(
                f"Nexus(enable_monitoring={self.enable_monitoring!r}): expects True or False"
            )
        if self.metrics_port is not None and (
            not isinstance(self.metrics_port, int)
            or isinstance(self.metrics_port, bool)
            or not 0 <= self.metrics_port <= 65535
        ):
            raise ValueError(
                f"Nexus(metrics_port={self.metrics_port!r}): expects a port number "
                "(0..65535; 0 picks a free one) or None"
            )
        if self.expose_metrics and not self.enable_monitoring:
            raise ValueError(
                "Nexus(expose_metrics=True) needs enable_monitoring=True: there are no "
                "metrics to expose"
            )
        if self.expose_metrics and self.metrics_port is None:
            raise ValueError(
                "Nexus(expose_metrics=True) needs a metrics_port (Envoy forwards "
                "GET /metrics to it; 0 picks a free one)"
            )
        if (
            not isinstance(self.drain_delay, int | float)
            or isinstance(self.drain_delay, bool)
            or not 0 <= self.drain_delay <= 3600
        ):
            raise ValueError(
                f"Nexus(drain_delay={self.drain_delay!r}): expects seconds from 0 to 3600"
            )
        if self.enable_durability is False:
            raise ValueError(
                "Nexus(enable_durability=False): cannot be turned off: an execution "
                "called with a request_id is always recorded before its reply, so a "
                "retry gets that reply instead of running it twice; leave it True"
            )
        self.rate_limits()
        parse_backend(self.rate_limit_backend)
        if not isinstance(self.queue, QueueOptions):
            raise TypeError(f"Nexus(queue={self.queue!r}): expects a QueueOptions or None")
        self.queue.check()

    def rate_limits(self) -> RateLimits:
        """The app's rate limits: `rate_limit` with the workflows' own
        (`register(..., rate_limit=...)`).

        Raises:
            ValueError: `rate_limit` is not a rate limit (the message names it).
        """
        limits = RateLimits.of(self.rate_limit)
        return limits.with_workflows(self._workflow_rates) if self._workflow_rates else limits

    def resolve_dataflow(self) -> DataFlow | None:
        """The DataFlow the app serves: the one `integrate_dataflow` chose, or else the
        one whose model nodes the registered workflows use (integrated now, so its
        models get their typed services and executions are recorded in its database).

        Raises:
            ValueError: the workflows use the models of two DataFlow instances and
                neither was chosen with `integrate_dataflow`.
        """
        if self._chosen_db:
            return self.db
        used: dict[int, DataFlow] = {}
        for name in self.registry.names():
            for node in self.registry.get(name).workflow.nodes.values():
                db = DataFlow.owner_of(type(node))
                if db is not None:
                    used.setdefault(id(db), db)
        if len(used) > 1:
            urls = " and ".join(repr(shown_url(db)) for db in used.values())
            raise ValueError(
                f"the registered workflows use the models of two DataFlow instances "
                f"({urls}); choose the one the app serves with app.integrate_dataflow(db)"
            )
        if used:
            self.db = next(iter(used.values()))
            self._own_db = False
        return self.db

    def integrate_dataflow(self, db: DataFlow) -> None:
        """Serve `db`'s models (ModelService and a typed service per model) and keep the
        execution records in its database. One DataFlow per app."""
        if self._chosen_db and self.db is not db:
            raise ValueError("this app already integrates a DataFlow; use one per app")
        self.db, self._chosen_db = db, True

    def add_breaker(self, breaker: CircuitBreaker) -> None:
        """Show `breaker` (one a node uses around another service, `dataflow.
        CircuitBreaker`) as the database's is shown: a `GET /health` component named
        after it (not critical: the server still serves what does not need it) and
        `nexus_circuit_breaker_state{dependency=<name>}` with monitoring on.

        Raises:
            ValueError: its name is taken by another breaker or a built-in component.
        """
        name = breaker.name
        if name in _BUILT_IN_COMPONENTS or name in self._breakers:
            raise ValueError(
                f"add_breaker: the name {name!r} is taken; name the breaker after its "
                "dependency (CircuitBreaker('payments', ...))"
            )
        self._breakers[name] = breaker

    def register(
        self,
        name: str,
        workflow: Workflow,
        *,
        roles: Sequence[str] = (),
        public: bool = False,
        rate_limit: object = None,
        cache_ttl: float | None = None,
        retryable: bool = False,
        max_running: int | None = None,
    ) -> None:
        """Expose `workflow` as `name` on every channel. The name is checked now.

        Args:
            roles: with authentication on, the roles that may run it (granted
                `workflow:<name>:execute`; admins always may).
            public: anyone may run it, with or without a credential.
            rate_limit: the workflow's own limit per principal (any `Nexus(rate_limit)`
                form, e.g. `"10/s"`), instead of the app's, for running it.
            cache_ttl: cache its successful replies for this many seconds, per
                principal, tenant and inputs (a cached reply carries the metadata
                ``x-nexus-cache: hit``). Only for read-only workflows: a workflow with
                a writing node is refused with a ValueError naming the node.
            retryable: an asynchronous execution whose server process is lost is
                run again (with its request_id; `QueueOptions.max_attempts` runs at
                most) instead of failing EXECUTION_LOST: only for a workflow that is
                safe to run twice.
            max_running: its asynchronous executions one server process runs at once
                (None: only `QueueOptions.max_running` bounds them).
        """
        if isinstance(roles, str):
            raise TypeError(f"roles expects a list of role names, got the string {roles!r}")
        rate = None if rate_limit is None else parse_rate(rate_limit, "register(rate_limit)")
        ttl = check_cache_ttl(cache_ttl)
        if ttl is not None and isinstance(workflow, Workflow):  # else add() says what it is
            check_read_only(name, workflow)
        if max_running is not None and (
            not isinstance(max_running, int) or isinstance(max_running, bool) or max_running < 1
        ):
            raise ValueError(f"register(max_running={max_running!r}): expects an int >= 1 or None")
        self.registry.add(name, workflow, builtin=True, public=public, cache_ttl=ttl)
        if retryable or max_running is not None:
            self._queued[name] = QueuedWorkflow(bool(retryable), max_running)
        else:
            self._queued.pop(name, None)
        for role in roles:
            self.policy.grant(role, f"workflow:{name}:execute")
        if rate is not None:
            self._workflow_rates[name] = rate

    def unregister(self, name: str) -> None:
        self.registry.remove(name)
        self._workflow_rates.pop(name, None)
        self._queued.pop(name, None)

    @contextlib.asynccontextmanager
    async def serving(self, *, envoy: bool = False) -> AsyncIterator[Serving]:
        """Start the server, yield where it listens, stop it gracefully on exit.

        Startup waits on nothing but the database: it initialises the DataFlow (one
        connect, migrate and persist), builds the typed services from descriptors in
        memory and binds the port. With `envoy=True` it also starts Envoy on `api_port`
        in front of the server (REST, gRPC-Web, Connect and gRPC; see `_envoy.py`), waits until
        it is ready, restarts it if it dies and stops it first on exit.
        """
        started = time.perf_counter()
        self.check_options()
        tracing = self._tracing()  # a bad OTEL_* setting fails before anything starts
        if self.auto_discovery:
            self._discover()
        self.resolve_dataflow()  # after discovery: discovered workflows count too
        if self.db is None:
            # executions are recorded in the embedded default database
            self.db, self._own_db = DataFlow(), True
        db = self.db
        await db.initialize()
        store = Store(db)
        await store.initialize()
        metrics: Metrics | None = None
        if self.enable_monitoring:
            # imported only when on: prometheus_client costs nothing otherwise
            from .gateway._metrics import Metrics

            metrics = Metrics()
        if metrics is not None:
            if db.metrics is not None:  # DataFlow(enable_metrics=True): pool, statements
                metrics.add_collector(db.metrics)
            breaker = db.breaker
            if breaker is not None:
                metrics.watch_breaker(breaker.name, lambda: breaker.state)
            for other in self._breakers.values():
                metrics.watch_breaker(other.name, lambda b=other: b.state)  # type: ignore[misc]
            query_cache = db.cache
            if query_cache is not None:
                metrics.watch_cache("dataflow", lambda: (query_cache.hits, query_cache.misses))
        responses = ResponseCache()
        if metrics is not None:
            metrics.watch_cache("response", lambda: (responses.hits, responses.misses))
        executions = Executions(store, timeout=self.execution_timeout, metrics=metrics)
        if tracing is not None:
            executions.span = tracing.execution
            executions.runtime.node_hook = tracing.node
            db.set_statement_hook(tracing.statement_hook(db.dialect))
        keys = KeyStore(db)
        await keys.initialize()
        authenticator = await self._authenticator(keys) if self.auth_enabled() else None
        audit = AuditTrail(db, table=self.audit_table)
        await audit.initialize()
        # workflows registered over the network: stored, shared by the replicas
        bus = bus_for(db, parse_backend(self.rate_limit_backend))
        workflow_store = WorkflowStore(
            db, self.registry, bus, allow_code_nodes=self.allow_code_nodes
        )
        await workflow_store.initialize()
        executions.open()
        queue = ExecutionQueue(executions, self.registry, self.queue, self._queued, bus)
        await queue.open()  # settles what stopped processes left, then claims
        if metrics is not None:
            metrics.watch_queue(queue.snapshot)
        records = Records(db, store)
        typed = TypedModels(db.models, _static_files())
        rate_limits = self.rate_limits()
        limiter = (
            None
            if rate_limits.empty
            else RateLimiter(rate_limits, parse_backend(self.rate_limit_backend))
        )
        shedder = (
            Shedder(self.limits.max_in_flight, self.limits.max_executions)
            if self.limits.max_in_flight or self.limits.max_executions
            else None
        )
        if shedder is not None and metrics is not None:
            shedder.on_refused = metrics.shed
        gateway = Gateway(
            authenticator=authenticator,
            policy=self.policy,
            registry=self.registry,
            audit=audit,
            typed_models={typed.service_name(m): m for m in typed.models},
            public_discovery=self.public_discovery,
            audit_reads=self.audit_reads,
            tracing=tracing,
            rate=limiter,
            shed=shedder,
            metrics=metrics,
            access_log=self.access_log,
        )

        shared = self._shared_port
        reuse = 0 if shared is None else 1  # else a busy port fails the start, as it should
        server = grpc.aio.server(
            options=[("grpc.so_reuseport", reuse), *self.limits.grpc_options()]
        )
        handlers = GenericHandlersOnly(server, gateway)
        workflow_servicer = WorkflowServicer(
            self.registry,
            executions,
            allow_code_nodes=self.allow_code_nodes,
            gateway=gateway,
            limits=self.limits,
            responses=responses,
            workflows=workflow_store,
            bus=bus,
        )
        workflow_servicer.queue = queue
        wgrpc.add_WorkflowServiceServicer_to_server(  # type: ignore[no-untyped-call]
            workflow_servicer, handlers
        )
        mgrpc.add_ModelServiceServicer_to_server(  # type: ignore[no-untyped-call]
            ModelServicer(records, typed, gateway), handlers
        )
        handlers.add_generic_rpc_handlers(typed_handlers(records, typed))
        ogrpc.add_OpenApiServiceServicer_to_server(  # type: ignore[no-untyped-call]
            # built on the first GetOpenApi, never in the way of startup
            OpenApiServicer(
                functools.partial(
                    _openapi_document,
                    typed,
                    secured=authenticator is not None,
                    public_discovery=self.public_discovery,
                )
            ),
            handlers,
        )
        agrpc.add_AuthServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AuthServicer(authenticator, keys, auth_enabled=authenticator is not None), handlers
        )
        augrpc.add_AuditServiceServicer_to_server(  # type: ignore[no-untyped-call]
            AuditServicer(audit), handlers
        )
        health_servicer = _Health(self.health)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, handlers)
        self.health.add("database", health_servicer.database_state, critical=True)
        if db.breaker is not None:
            # open: unhealthy at once, before the watcher's pings notice
            self.health.add("breaker", db.breaker.snapshot, critical=True)
        else:
            self.health.remove("breaker")
        cache = db.cache
        if cache is not None:  # shown, not critical: a read it cannot serve goes to the db
            self.health.add("cache", lambda: {"status": "healthy", **cache.stats()})
        else:
            self.health.remove("cache")
        self.health.add(
            "workflows", lambda: {"status": "healthy", "registered": len(self.registry.names())}
        )
        self.health.add("queue", queue.snapshot)  # asynchronous executions, this process
        for other in self._breakers.values():
            self.health.add(other.name, other.snapshot)
        pgrpc.add_ProbeServiceServicer_to_server(  # type: ignore[no-untyped-call]
            ProbeServicer(self.health, health_servicer.serving, lambda: self._started), handlers
        )
        services = (
            WORKFLOW_SERVICE,
            MODEL_SERVICE,
            OPENAPI_SERVICE,
            PROBE_SERVICE,
            AUTH_SERVICE,
            AUDIT_SERVICE,
            *typed.service_names,
        )
        add_reflection((*services, health.SERVICE_NAME), reflection_pool(typed), handlers)
        try:
            port = server.add_insecure_port(f"{self.host}:{self.grpc_port}")
        except RuntimeError:  # grpcio raises it for a port it cannot bind
            port = 0
        if port and shared is not None:
            try:
                port = port if server.add_insecure_port(f"{self.host}:{shared}") else 0
            except RuntimeError:
                port = 0
        if port == 0:
            await queue.stop_claiming()
            await executions.close(0)
            await queue.close()
            await audit.close()
            if limiter is not None:
                await limiter.close()
            if tracing is not None:
                db.set_statement_hook(None)
                tracing.shutdown()
            raise GrpcPortError(
                f"cannot start gRPC on port {self.grpc_port}: {self.host}:{self.grpc_port} "
                "is in use (or not an address of this host)"
            )
        await server.start()
        await _set_health(health_servicer, services, serving=True)
        watcher = asyncio.create_task(self._watch_database(db, health_servicer, services))
        supervisor: EnvoySupervisor | None = None
        metrics_server: MetricsServer | None = None
        try:
            if bus is not None:
                await bus.start()
            workflow_store.start()
            if metrics is not None and self.metrics_port is not None:
                from .gateway._metrics import MetricsServer

                try:
                    metrics_server = MetricsServer(metrics, self.host, self.metrics_port)
                except OSError:
                    raise MetricsPortError(
                        f"cannot serve metrics on port {self.metrics_port}: "
                        f"{self.host}:{self.metrics_port} is in use (or not an address of "
                        "this host); set metrics_port (0 picks a free one, None: none)"
                    ) from None
            if envoy:
                if self.api_port is None:
                    raise ValueError("serving(envoy=True) needs an api_port (it is None)")
                from ._envoy import (
                    EnvoyOptions,
                    EnvoySupervisor,
                    merged_descriptor_set,
                    transcoded_services,
                )

                supervisor = EnvoySupervisor(
                    merged_descriptor_set(typed),
                    EnvoyOptions(
                        grpc_host=_local(self.host),
                        grpc_port=port,
                        api_host=self.host,
                        api_port=self.api_port,
                        cors_origins=self.cors_origins,
                        services=transcoded_services(typed),
                        limits=self.limits,
                        metrics_port=(
                            metrics_server.port
                            if metrics_server is not None and self.expose_metrics
                            else None
                        ),
                    ),
                )
                await supervisor.start()
                self.health.add("envoy", supervisor.health)
            self._started = True
            info = Serving(
                self.host,
                port,
                services,
                typed,
                time.perf_counter() - started,
                api_port=supervisor.api_port if supervisor else None,
                envoy=supervisor,
                metrics=metrics,
                metrics_port=metrics_server.port if metrics_server is not None else None,
            )
            _log.info(
                "gRPC server listening on %s (%.0f ms)", info.address, info.startup_seconds * 1e3
            )
            if info.api_address:
                _log.info(
                    "Envoy (REST, gRPC-Web, Connect and gRPC) listening on %s", info.api_address
                )
            if info.metrics_port is not None:
                _log.info("metrics on http://%s:%d/metrics", self.host, info.metrics_port)
            yield info
        finally:
            self._started = False  # not ready: orchestrators stop sending traffic
            self.health.remove("envoy")
            if supervisor is not None:
                await supervisor.stop()
            if metrics_server is not None:
                await asyncio.to_thread(metrics_server.close)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await _set_health(health_servicer, services, serving=False)
            if self.drain_delay > 0:
                # load balancers' health checks see NOT_SERVING and move new calls to
                # other replicas while this one still answers (docs/deploy.md)
                await asyncio.sleep(self.drain_delay)
            await server.stop(self.grace_period)
            await queue.stop_claiming()
            await workflow_store.close()
            await workflow_servicer.remote.close()
            await executions.close(self.grace_period)  # leases kept meanwhile
            await queue.close()
            if bus is not None:
                await bus.close()
            await audit.close()
            if tracing is not None:
                db.set_statement_hook(None)
                tracing.shutdown()
            if limiter is not None:
                await limiter.close()
            if self._own_db:
                await db.close()
                self.db, self._own_db = None, False

    def auth_enabled(self) -> bool:
        """Whether calls are authenticated: `enable_auth`, or when it is None, whether
        `NEXUS_ENV=production`. Logs a warning for a production app or a non-loopback
        host served without authentication."""
        production = os.environ.get("NEXUS_ENV", "").strip().lower() == "production"
        on = production if self.enable_auth is None else bool(self.enable_auth)
        if not on:
            if production:
                _log.warning(
                    "NEXUS_ENV=production with enable_auth=False: every caller may do "
                    "everything (docs/security.md)"
                )
            elif self.host not in ("127.0.0.1", "localhost", "::1"):
                _log.warning(
                    "serving on %s without authentication: anyone who reaches this "
                    "address may do everything; set enable_auth=True (docs/security.md)",
                    self.host,
                )
        return on

    def _tracing(self) -> Tracing | None:
        """The app's tracing, or None when it is off (see `enable_tracing`)."""
        if self.tracer_provider is not None:
            return Tracing(self.tracer_provider)
        if not tracing_wanted(self.enable_tracing):
            return None
        return tracing_from_env()

    async def _authenticator(self, keys: KeyStore) -> Authenticator:
        """The authenticator of the configured sources (fails closed without one)."""
        explicit = (
            {f.name: getattr(self.auth, f.name) for f in dataclasses.fields(self.auth)}
            if self.auth is not None
            else {}
        )
        config = AuthConfig.from_env(os.environ, **explicit)
        authenticator = Authenticator(config, keys)
        if not await authenticator.has_source():
            raise AuthNotConfigured(
                "enable_auth is on but no credential source is configured: set "
                "NEXUS_API_KEY_<NAME>, NEXUS_JWT_SECRET, NEXUS_JWT_PUBLIC_KEY or "
                "NEXUS_JWKS_URL (or Nexus(auth=AuthConfig(...))), or create a key with "
                "`nexus keys create` (docs/security.md)"
            )
        return authenticator

    def _discover(self) -> None:
        report = discover_workflows(self.discovery_root)
        for path, error in report.errors.items():
            _log.error("auto-discovery: %s failed to import: %s", path, error)
        for name, wf in report.workflows.items():
            if name in self.registry:
                continue  # registered in code already: the app's own registration wins
            try:
                self.registry.add(name, wf, builtin=True)
            except Exception as exc:
                _log.error("auto-discovery: workflow %r not registered: %s", name, exc)

    async def _watch_database(
        self, db: DataFlow, servicer: health.aio.HealthServicer, services: tuple[str, ...]
    ) -> None:
        """Report NOT_SERVING while the database does not answer.

        Only a database that fails `health_check_failures` pings in a row is down. A ping
        that timed out while the event loop itself was late (a heavy workflow holding it
        in slices) says nothing about the database and does not count either way.
        """
        healthy = True
        failures = 0
        limits = self.limits
        while True:
            await asyncio.sleep(self.health_check_interval)
            ok, loop_late = await _ping(db, limits.health_check_timeout)
            if ok:
                failures = 0
            elif loop_late:
                _log.debug("database ping inconclusive: the event loop was busy")
                continue
            else:
                failures += 1
            if ok != healthy and (ok or failures >= limits.health_check_failures):
                healthy = ok
                await _set_health(servicer, services, serving=ok)
                log = _log.info if ok else _log.error
                log("database %s", "reachable again" if ok else "unreachable: NOT_SERVING")

    def start(self) -> None:
        """Serve every configured channel until SIGINT or SIGTERM (blocking), exactly as
        `nexus serve` does (one code path, `_cli.run_app`): gRPC on `grpc_port`, Envoy
        on `api_port`, the MCP adapter on `mcp_port` (a port set to None: that channel
        is off). A clean start failure (a busy port, a missing database) prints one line
        and exits with status 3.

        While `nexus serve` imports the app's file, `start()` only records the request
        and returns: `nexus serve` then serves once, with its own options.
        """
        if _DEFERRED is not None:
            _DEFERRED.append(self)
            return
        from ._cli import run_app

        if not logging.getLogger().handlers:
            from .gateway._access_log import configure_access_log

            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
            configure_access_log()
        code = run_app(self, log_level="info")
        if code:
            raise SystemExit(code)


#: `GET /health` components of the server's own, whose names a breaker may not take.
_BUILT_IN_COMPONENTS = frozenset(
    {"database", "breaker", "cache", "workflows", "queue", "envoy", "mcp", "worker"}
)


class AuthNotConfigured(ValueError):
    """Authentication is on and no credential source is configured."""


class GrpcPortError(OSError):
    """The gRPC port could not be bound (in use, or not an address of this host)."""


class MetricsPortError(GrpcPortError):
    """The metrics port could not be bound (in use, or not an address of this host)."""


#: While `nexus serve` loads an app file, the apps whose `start()` was called (see
#: `deferred_start`); None otherwise.
_DEFERRED: list[Nexus] | None = None


@contextlib.contextmanager
def deferred_start() -> Iterator[list[Nexus]]:
    """Within the block, `Nexus.start()` records its app instead of serving (how
    `nexus serve app.py` loads a file that calls `app.start()` at module level)."""
    global _DEFERRED
    previous, _DEFERRED = _DEFERRED, []
    try:
        yield _DEFERRED
    finally:
        _DEFERRED = previous


#: How often the loop's lateness is sampled during a database ping.
_TICK = 0.05


async def _ping(db: DataFlow, timeout: float) -> tuple[bool, bool]:
    """Ping the database; returns (answered, the loop was late meanwhile).

    A ticker measures how late the event loop wakes it during the ping: when the loop
    fell behind by a quarter of the timeout or more, a timed-out ping may only have
    waited for the loop, not for the database.
    """
    loop = asyncio.get_running_loop()
    worst = 0.0
    due = loop.time() + _TICK

    async def tick() -> None:
        nonlocal worst, due
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            worst = max(worst, loop.time() - due)
            due = loop.time() + _TICK

    ticker = asyncio.create_task(tick())
    try:
        ok = await db.ping(timeout)
    finally:
        ticker.cancel()
    # a tick that came due but has not run yet (the ping's end was handled first in the
    # same late round of the loop) tells how late the loop is right now
    worst = max(worst, loop.time() - due)
    return ok, worst >= timeout / 4


class _Health(health.aio.HealthServicer):  # type: ignore[misc]
    """grpc's health service with `List` (declared by the health proto, which grpcio's
    servicer leaves unimplemented): every service's status at once; and each health
    component as the service `nexus.component.<name>` (`Check` and `List`, read when
    asked)."""

    def __init__(self, components: HealthComponents) -> None:
        super().__init__()
        self._components = components

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        name = request.service
        if name.startswith(COMPONENT_SERVICE_PREFIX):
            state = self._components.state(name[len(COMPONENT_SERVICE_PREFIX) :])
            if state is not None:
                return health_pb2.HealthCheckResponse(status=_component_status(state))
        return await super().Check(request, context)

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        statuses = {
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        }
        for component in self._components.names():
            state = self._components.state(component)
            if state is not None:
                statuses[COMPONENT_SERVICE_PREFIX + component] = health_pb2.HealthCheckResponse(
                    status=_component_status(state)
                )
        return health_pb2.HealthListResponse(statuses=statuses)

    def database_state(self) -> dict[str, Any]:
        """The `database` component: healthy while the watcher finds it answering."""
        return {"status": "healthy" if self.serving() else "unhealthy"}

    def serving(self) -> bool:
        """Whether the server as a whole is SERVING (what `GET /health` reports)."""
        return bool(self._server_status.get("") == health_pb2.HealthCheckResponse.SERVING)


def _component_status(state: Any) -> Any:
    return (
        health_pb2.HealthCheckResponse.SERVING
        if state.get("status") == "healthy"
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )


async def _set_health(
    servicer: health.aio.HealthServicer, services: tuple[str, ...], *, serving: bool
) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    await servicer.set("", status)
    for name in services:
        await servicer.set(name, status)


def _openapi_document(typed: TypedModels, *, secured: bool, public_discovery: bool) -> bytes:
    """The OpenAPI document of what REST reaches (Envoy's module imported only now)."""
    from ._envoy import api_services, merged_descriptor_set
    from ._openapi import openapi_json

    return openapi_json(
        merged_descriptor_set(typed),
        api_services(typed),
        secured=secured,
        public_discovery=public_discovery,
    )


def shown_url(db: DataFlow) -> str:
    """`db`'s URL as a user writes it: without the async driver DataFlow picked
    (`postgresql://...`, not `postgresql+asyncpg://...`), password hidden."""
    from sqlalchemy.engine import make_url

    url = make_url(db.url)
    return url.set(drivername=url.get_backend_name()).render_as_string(hide_password=True)


def _local(host: str) -> str:
    """The address Envoy reaches a server listening on `host` at."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "localhost") else host


def _static_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """Our contracts, plus the health and reflection services' own files, so reflection
    can describe every service it lists."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes())
    files = list(fds.file)
    known = {f.name for f in files}
    files += [f for f in reflection_files() if f.name not in known]
    return files
