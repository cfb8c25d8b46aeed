"""OpenTelemetry traces: one trace per call, with spans for what the call does.

A traced call makes these spans (names in `SPAN_*`), all in the trace the caller started
when it sent a W3C `traceparent` (gRPC metadata; REST through Envoy, which passes the
header on; the CLI and the MCP adapter send theirs), else in a new one:

- the call (`nexus.workflow.v1.WorkflowService/ExecuteWorkflow`, kind SERVER), with the
  channel and the gRPC status code (not the principal: traces leave the server, the
  audit trail says who called);
- the gateway checks under it (`gateway.authenticate`, `gateway.authorize`,
  `gateway.rate_limit`);
- a workflow execution (`workflow.execute <name>`) and each node it runs
  (`workflow.node <id>`);
- each SQL statement (`db <VERB>`), its text with placeholders, never values.

Tracing is on when `Nexus(enable_tracing=True)` or `tracer_provider=...` is given, or
when the environment configures an exporter (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_TRACES_EXPORTER`); the standard `OTEL_*`
variables then choose the exporter, the service name and the sampler (for example
`OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01`). Off, no
wrapper is installed at all: a call costs what it cost before.

The workflow runtime and DataFlow know nothing of OpenTelemetry: they take small hooks
(`AsyncLocalRuntime.node_hook`, `DataFlow.set_statement_hook`) that this module fills.
Node and statement spans are made only under a span that records (a sampled call), so an
unsampled call and the server's own background writes cost one check each.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "SPAN_AUTHENTICATE",
    "SPAN_AUTHORIZE",
    "SPAN_RATE_LIMIT",
    "Tracing",
    "TracingUnavailable",
    "tracing_from_env",
    "tracing_wanted",
]

SPAN_AUTHENTICATE = "gateway.authenticate"
SPAN_AUTHORIZE = "gateway.authorize"
SPAN_RATE_LIMIT = "gateway.rate_limit"
SPAN_EXECUTION = "workflow.execute"
SPAN_NODE = "workflow.node"
SPAN_STATEMENT = "db"

#: The instrumentation scope of every span.
SCOPE = "nexus_server"
#: Longest statement text kept on a span (characters).
MAX_STATEMENT = 2048

_NULL = contextlib.nullcontext()


class TracingUnavailable(ValueError):
    """Tracing was asked for but the OpenTelemetry SDK (or the exporter the environment
    names) is not installed, or the environment names an exporter we do not know."""


def tracing_wanted(enable: bool | None, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether tracing is on: `enable` when it is True or False, else whether the
    environment configures an exporter (and does not disable the SDK)."""
    if enable is not None:
        return enable
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return bool(
        exporter
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def tracing_from_env(environ: Mapping[str, str] = os.environ) -> Tracing:
    """A `Tracing` with an SDK tracer provider configured by the `OTEL_*` variables:
    `OTEL_TRACES_EXPORTER` (`otlp`, the default, `console` or `none`), the OTLP
    exporter's own variables, `OTEL_SERVICE_NAME` (default `nexus`), the sampler.

    Raises:
        TracingUnavailable: the SDK or the OTLP exporter is not installed, or the
            exporter named is unknown.
    """
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise TracingUnavailable(
            "tracing is on (enable_tracing or OTEL_* variables) but the OpenTelemetry SDK "
            "is not installed: pip install opentelemetry-sdk opentelemetry-exporter-otlp"
        ) from None
    service = environ.get("OTEL_SERVICE_NAME") or "nexus"
    provider = SdkProvider(resource=Resource.create({"service.name": service}))
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    for name in filter(None, names):
        if name == "none":
            continue
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(environ)))
        else:
            raise TracingUnavailable(
                f"OTEL_TRACES_EXPORTER={name!r}: not an exporter Nexus knows "
                "(otlp, console or none)"
            )
    return Tracing(provider, owned=True)


def _otlp_exporter(environ: Mapping[str, str]) -> Any:
    """The OTLP exporter `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` names (`http/protobuf` or
    `grpc`); unnamed, whichever of the two is installed, HTTP first (the specification's
    default). It reads its endpoint and headers from the environment."""
    named = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or ""
    ).strip()
    if named and named not in ("grpc", "http/protobuf"):
        raise TracingUnavailable(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={named!r}: not a protocol Nexus exports with "
            "(http/protobuf or grpc)"
        )
    packages = ["grpc"] if named == "grpc" else ["http"] if named else ["http", "grpc"]
    for package in packages:
        try:
            module = importlib.import_module(
                f"opentelemetry.exporter.otlp.proto.{package}.trace_exporter"
            )
        except ImportError:
            continue
        return module.OTLPSpanExporter()
    wanted = " or ".join(f"opentelemetry-exporter-otlp-proto-{p}" for p in packages)
    raise TracingUnavailable(
        f"OTEL_TRACES_EXPORTER=otlp needs the OTLP exporter: pip install {wanted}"
    )


class Tracing:
    """The server's tracer and the hooks that make its spans.

    Args:
        provider: the tracer provider spans go to (an SDK `TracerProvider`, or any
            provider of the OpenTelemetry API).
        owned: this object made the provider, so `shutdown` flushes and closes it.
    """

    def __init__(self, provider: TracerProvider, *, owned: bool = False) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(SCOPE)
        self._owned = owned
        self._trace = trace
        self._context = context
        self._propagator = TraceContextTextMapPropagator()
        self._server = trace.SpanKind.SERVER
        self._error = trace.Status(trace.StatusCode.ERROR)

    def shutdown(self) -> None:
        """Flush and close the provider when this object made it."""
        if self._owned:
            shutdown = getattr(self.provider, "shutdown", None)
            if shutdown is not None:
                shutdown()

    # -- the call span ------------------------------------------------------------------

    def _start_call(self, path: str, context: Any, attributes: dict[str, Any]) -> Span:
        metadata = context.invocation_metadata() or ()
        carrier: dict[str, str] | None = None
        channel = "grpc"
        for key, value in metadata:
            if key in _TRACE_KEYS and isinstance(value, str):
                if carrier is None:
                    carrier = {}
                carrier[key] = value
            elif key == "x-nexus-channel" and value in _CHANNELS:
                channel = value
        parent = self._propagator.extract(carrier) if carrier is not None else None
        span = self.tracer.start_span(path.lstrip("/"), context=parent, kind=self._server)
        if span.is_recording():  # attributes only for spans that are kept
            span.set_attributes(attributes)
            span.set_attribute("nexus.channel", channel)
        return span

    def _end_call(self, span: Span, context: Any, exc: BaseException | None) -> None:
        if not span.is_recording():
            return
        code = context.code()
        if isinstance(code, int) and not isinstance(code, grpc.StatusCode):
            code = next((c for c in grpc.StatusCode if c.value[0] == code), None)
        if code is None:
            code = grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
        if isinstance(exc, _CANCELLED):
            code = grpc.StatusCode.CANCELLED
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code not in _CLIENT_CODES and code != grpc.StatusCode.OK:
            span.set_status(self._error)
        span.end()

    def unary(self, path: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        """`behaviour` (a unary or stream-request handler, already behind the gateway)
        inside the call's span."""
        attributes = _rpc_attributes(path)
        in_context = self._trace.set_span_in_context
        attach, detach = self._context.attach, self._context.detach

        async def call(request: Any, context: Any) -> Any:
            span = self._start_call(path, context, attributes)
            token = attach(in_context(span))
            exc: BaseException | None = None
            try:
                return await behaviour(request, context)
            except BaseException as error:
                exc = error
                raise
            finally:
                detach(token)
                self._end_call(span, context, exc)

        return call

    def streaming(self, path: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        """`behaviour` (an async generator handler) inside the call's span."""
        in_context = self._trace.set_span_in_context
        attach, detach = self._context.attach, self._context.detach
        attributes = _rpc_attributes(path)

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            span = self._start_call(path, context, attributes)
            exc: BaseException | None = None
            ctx = in_context(span)
            items = behaviour(request, context)
            try:
                # attached around each step, not across the yield: the generator may be
                # resumed from another context
                while True:
                    token = attach(ctx)
                    try:
                        item = await items.__anext__()
                    except StopAsyncIteration:
                        return
                    finally:
                        detach(token)
                    yield item
            except BaseException as error:
                exc = error
                raise
            finally:
                # closed here and now (a cancelled or abandoned stream): the wrapped
                # generator's own cleanup (the gateway's audit) runs before the span ends
                try:
                    await items.aclose()
                finally:
                    self._end_call(span, context, exc)

        return stream

    # -- child spans --------------------------------------------------------------------

    def step(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A gateway check's span, under the call's."""
        return self.tracer.start_as_current_span(name, record_exception=False)

    def execution(self, workflow: str, execution_id: str) -> contextlib.AbstractContextManager[Any]:
        """A workflow execution's span (the server's hook around the runtime)."""
        if not self._trace.get_current_span().is_recording():
            return _NULL
        return self.tracer.start_as_current_span(
            f"{SPAN_EXECUTION} {workflow}",
            attributes={"nexus.workflow": workflow, "nexus.execution_id": execution_id},
        )

    def node(self, node_id: str, node_type: str) -> contextlib.AbstractContextManager[Any]:
        """A node's span (`AsyncLocalRuntime.node_hook`)."""
        if not self._trace.get_current_span().is_recording():
            return _NULL
        return self.tracer.start_as_current_span(
            f"{SPAN_NODE} {node_id}",
            attributes={"nexus.node_id": node_id, "nexus.node_type": node_type},
        )

    def statement_hook(
        self, system: str
    ) -> Callable[[str], contextlib.AbstractContextManager[Any]]:
        """DataFlow's statement hook (`DataFlow.set_statement_hook`) for a database of
        `system` (`postgresql`, `sqlite`)."""
        trace = self._trace
        tracer = self.tracer
        error = self._error
        client = trace.SpanKind.CLIENT

        def statement(sql: str) -> contextlib.AbstractContextManager[Any]:
            if not trace.get_current_span().is_recording():
                return _NULL
            return _Statement(tracer, client, error, system, sql)

        return statement


class _Statement:
    """One SQL statement's span (not made current: nothing runs under a statement)."""

    __slots__ = ("_error", "_span")

    def __init__(self, tracer: Tracer, kind: Any, error: Any, system: str, sql: str) -> None:
        verb = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else "SQL"
        self._error = error
        self._span = tracer.start_span(
            f"{SPAN_STATEMENT} {verb}",
            kind=kind,
            attributes={
                "db.system.name": system,
                "db.operation.name": verb,
                "db.query.text": sql[:MAX_STATEMENT],
            },
        )

    def __enter__(self) -> _Statement:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if exc is not None:
            # the kind of error only: a driver's message may quote the values
            self._span.set_attribute("error.type", type(exc).__name__)
            self._span.set_status(self._error)
        self._span.end()


#: Codes that are the caller's doing: the span is not marked an error (the semantic
#: conventions mark only server faults on SERVER spans).
_CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)

#: How a call ends that its caller abandoned: its task is cancelled, or grpc closes its
#: response stream (GeneratorExit at the yield).
_CANCELLED = (asyncio.CancelledError, GeneratorExit)


_TRACE_KEYS = frozenset({"traceparent", "tracestate"})
#: The channels a call may name (`_chain.CHANNELS`; a test keeps the two equal): any
#: other value is `grpc`, so a caller cannot write what it likes into a trace.
_CHANNELS = frozenset({"grpc", "rest", "grpc-web", "connect", "cli", "mcp"})


def _rpc_attributes(path: str) -> dict[str, Any]:
    service, _, method = path.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
