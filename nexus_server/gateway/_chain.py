"""The gateway chain: what every call passes before its servicer runs.

For each call, in order:

1. **Authenticate.** With authentication on, the credential in the metadata (an API key
   or a JWT, see `_authn`) gives the principal; a missing, malformed, expired or badly
   signed one is UNAUTHENTICATED (`CREDENTIALS_MISSING`, `CREDENTIALS_INVALID`,
   `CREDENTIALS_EXPIRED`), except on the methods open to everyone (health, public
   workflows, and discovery when it is public). With authentication off the principal is
   the development label `x-nexus-caller` (else `anonymous`), in the tenant
   `x-nexus-tenant`, holding every right.
2. **Authorize.** The method's rule (the `_rules` table below) names the permission the
   call needs, from its request (the workflow, the model and the operation class);
   without it the call is PERMISSION_DENIED naming the permission, whether or not the
   resource exists.
2b. **Rate limit.** With rate limits configured (`_rate`), the call takes a token of
   its principal's bucket or is RESOURCE_EXHAUSTED (`RATE_LIMITED`, with RetryInfo).
   Before all of it, with `Limits.max_in_flight`/`max_executions` set, a call past
   the cap is refused at once (`_shed`: `OVERLOADED`); health is never limited.
3. **Scope.** The principal (`CURRENT_PRINCIPAL`) and its tenant (DataFlow's
   `tenant_scope`) are set for the servicer and everything it awaits, workflow nodes
   included; the principal's id is also DataFlow's `cache_scope`, so that its query
   cache never serves one principal an entry another one filled.
4. **Audit.** Every refusal and every call that changes something (and every read when
   `audit_reads` is on) is recorded once it ends (`_audit`).
5. **Observe.** With monitoring on, every call is counted once when it ends (method,
   channel, code, duration; calls in flight; refusals by reason: `_metrics`), and with
   the access log on, it gets one JSON line (`_access_log`). Off, each costs one `if`.

The chain wraps the method handlers themselves (`Gateway.method`, applied by the app to
every service it registers), not a grpc interceptor: one function call per RPC, and the
decoded request is at hand for the permission check.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf import message

from dataflow import cache_scope, tenant_scope

from .._errors import FAILURE_REASON, ApiError, abort, sort_reply_maps, to_api_error
from .._store import MAX_CALLER
from ._access_log import log_call
from ._audit import AuditEntry
from ._jwt import JwksUnavailable
from ._policy import Policy
from ._principal import ADMIN, CURRENT_PRINCIPAL, AuthError, Principal
from ._request_id import check_request_id_header
from ._tracing import SPAN_AUTHENTICATE, SPAN_AUTHORIZE, SPAN_RATE_LIMIT

if TYPE_CHECKING:
    from .._registry import WorkflowRegistry
    from ._metrics import MethodMetrics, Metrics
    from ._rate import RateLimiter
    from ._shed import Shedder
    from ._tracing import Tracing

__all__ = ["CHANNELS", "Gateway", "caller_id"]

_log = logging.getLogger("nexus_server")

#: The channels a call can name in `x-nexus-channel` (Envoy sets it for REST and
#: gRPC-Web, the CLI and the MCP adapter for theirs); anything else counts as `grpc`.
CHANNELS = frozenset({"grpc", "rest", "grpc-web", "connect", "cli", "mcp"})

#: Longest `x-nexus-tenant` development label.
MAX_TENANT = 128

_NO_SPAN = contextlib.nullcontext()

_ANONYMOUS = Principal("anonymous", frozenset(), None, "none")


class Authenticates(Protocol):
    """What the chain needs of the authenticator (`_authn.Authenticator`)."""

    async def authenticate(
        self, metadata: Sequence[tuple[str, str | bytes]]
    ) -> Principal | None: ...


class Records(Protocol):
    """What the chain needs of the audit trail (`_audit.AuditTrail`)."""

    @property
    def active(self) -> bool:
        """Whether a recorded entry goes anywhere (else the chain builds none)."""
        ...

    def record(self, entry: AuditEntry) -> None: ...


# --- the rules: which methods need what -------------------------------------------------

OPEN = "open"  # no credential needed (health)
DISCOVERY = "discovery"  # reflection, OpenAPI: open when discovery is public
AUTHENTICATED = "authenticated"  # any valid credential; the servicer filters what it shows
PERMISSION = "permission"  # the permissions the request names
WORKFLOW = "workflow"  # a workflow's execute permission, its owner, or a public workflow

#: request -> [(permission, resource)]
Needs = Callable[[Any], list[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class Rule:
    """What one method needs. `change`: the call changes something (always audited)."""

    access: str
    needs: Needs | None = None
    change: bool = False


def _fixed(permission: str, resource: Callable[[Any], str] = lambda r: "") -> Needs:
    return lambda request: [(permission, resource(request))]


def _model(op: str) -> Needs:
    return lambda r: [(f"model:{r.model}:{op}", f"model:{r.model}")]


def _typed(model: str, op: str) -> Needs:
    need = [(f"model:{model}:{op}", f"model:{model}")]
    return lambda r: need


def _batch(request: Any) -> list[tuple[str, str]]:
    models = {getattr(w, w.WhichOneof("operation") or "create").model for w in request.writes}
    return [(f"model:{m}:bulk", f"model:{m}") for m in sorted(models)] or [("model:*:bulk", "")]


def _workflow(r: Any) -> str:
    return f"workflow:{r.name}"


def _execution(r: Any) -> str:
    return f"execution:{r.id}"


def _key(r: Any) -> str:
    return f"api_key:{r.name}"


_W = "/nexus.workflow.v1.WorkflowService/"
_M = "/nexus.model.v1.ModelService/"
_STATIC_RULES: Mapping[str, Rule] = {
    _W + "ListWorkflows": Rule(AUTHENTICATED),
    _W + "GetWorkflow": Rule(WORKFLOW),
    _W + "RegisterWorkflow": Rule(PERMISSION, _fixed("workflow:register", _workflow), True),
    _W + "DeleteWorkflow": Rule(PERMISSION, _fixed("workflow:register", _workflow), True),
    _W + "ExecuteWorkflow": Rule(WORKFLOW, change=True),
    _W + "StreamExecution": Rule(WORKFLOW, change=True),
    _W + "StartExecution": Rule(WORKFLOW, change=True),
    _W + "WatchExecution": Rule(AUTHENTICATED),
    _W + "GetExecution": Rule(AUTHENTICATED),
    _W + "ListExecutions": Rule(AUTHENTICATED),
    _W + "CancelExecution": Rule(AUTHENTICATED, change=True),
    _M + "ListModels": Rule(AUTHENTICATED),
    _M + "GetModel": Rule(PERMISSION, lambda r: [(f"model:{r.name}:read", f"model:{r.name}")]),
    _M + "GetRecord": Rule(PERMISSION, _model("read")),
    _M + "ListRecords": Rule(PERMISSION, _model("read")),
    _M + "CountRecords": Rule(PERMISSION, _model("read")),
    _M + "SearchRecords": Rule(PERMISSION, _model("read")),
    _M + "CreateRecord": Rule(PERMISSION, _model("write"), True),
    _M + "UpdateRecord": Rule(PERMISSION, _model("write"), True),
    _M + "UpsertRecord": Rule(PERMISSION, _model("write"), True),
    _M + "DeleteRecord": Rule(PERMISSION, _model("delete"), True),
    _M + "BulkCreateRecords": Rule(PERMISSION, _model("bulk"), True),
    _M + "BulkUpdateRecords": Rule(PERMISSION, _model("bulk"), True),
    _M + "BulkDeleteRecords": Rule(PERMISSION, _model("bulk"), True),
    _M + "BulkUpsertRecords": Rule(PERMISSION, _model("bulk"), True),
    _M + "BatchWrite": Rule(PERMISSION, _batch, True),
    "/nexus.auth.v1.AuthService/GetPrincipal": Rule(AUTHENTICATED),
    "/nexus.auth.v1.AuthService/CreateApiKey": Rule(PERMISSION, _fixed(ADMIN, _key), True),
    "/nexus.auth.v1.AuthService/ListApiKeys": Rule(PERMISSION, _fixed(ADMIN)),
    "/nexus.auth.v1.AuthService/RevokeApiKey": Rule(PERMISSION, _fixed(ADMIN, _key), True),
    "/nexus.audit.v1.AuditService/ListAuditEvents": Rule(PERMISSION, _fixed(ADMIN)),
    "/nexus.openapi.v1.OpenApiService/GetOpenApi": Rule(DISCOVERY),
    "/nexus.health.v1.ProbeService/GetHealth": Rule(OPEN),
    "/nexus.health.v1.ProbeService/GetReadiness": Rule(OPEN),
    "/nexus.health.v1.ProbeService/GetLiveness": Rule(OPEN),
    "/grpc.health.v1.Health/Check": Rule(OPEN),
    "/grpc.health.v1.Health/Watch": Rule(OPEN),
    "/grpc.health.v1.Health/List": Rule(OPEN),
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": Rule(DISCOVERY),
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": Rule(DISCOVERY),
}

#: Methods no table names: only `*` holders (fail closed).
_UNKNOWN = Rule(PERMISSION, _fixed("*"))

#: A typed per-model method's operation class, by the first word of its name.
_TYPED_OPS = (
    ("Bulk", "bulk", True),
    ("Create", "write", True),
    ("Update", "write", True),
    ("Upsert", "write", True),
    ("Delete", "delete", True),
    ("Get", "read", False),
    ("List", "read", False),
    ("Count", "read", False),
    ("Search", "read", False),
)


def typed_rule(model: str, method: str) -> Rule:
    """The rule of a typed per-model method (`CreateContact`, `ListContacts`, ...)."""
    for prefix, op, change in _TYPED_OPS:
        if method.startswith(prefix):
            return Rule(PERMISSION, _typed(model, op), change)
    return _UNKNOWN


# --- observing calls -------------------------------------------------------------------


class _Watch:
    """What is observed of one method's calls: its metric children (monitoring on) and
    its access log lines (access log on)."""

    __slots__ = ("log", "method", "method_metrics", "metrics")

    def __init__(self, method: str, metrics: Metrics | None, log: bool) -> None:
        self.method = method
        self.metrics = metrics
        self.method_metrics: MethodMetrics | None = (
            metrics.for_method(method) if metrics is not None else None
        )
        self.log = log

    def start(self) -> float:
        if self.method_metrics is not None:
            self.method_metrics.in_flight.inc()
        return time.perf_counter()

    def end(
        self,
        started: float,
        channel: str,
        principal: str,
        code: str,
        request: Any,
        context: Any,
    ) -> None:
        seconds = time.perf_counter() - started
        if self.method_metrics is not None:
            self.method_metrics.in_flight.dec()
            self.method_metrics.ended(channel, code, seconds)
        if self.log:
            log_call(
                method=self.method,
                channel=channel,
                principal=principal,
                code=code,
                seconds=seconds,
                request=request,
                context=context,
            )

    def refused(self, api: ApiError, channel: str) -> None:
        """Count a refusal of the chain: a rate limit's, or an authentication or
        authorization failure by its reason."""
        if self.metrics is None:
            return
        if api.reason == "RATE_LIMITED":
            scope = api.metadata.get("scope", "")
            self.metrics.rate_limited(self.method, channel, scope.split(":", 1)[0] or "default")
        else:
            self.metrics.auth_failure(api.reason, channel)


def _code_of(context: Any, failure: BaseException | None) -> str:
    """The status name a call ended with (what the client sees)."""
    code = context.code()
    if code is None or code == 0 or code == grpc.StatusCode.OK:
        if failure is None:
            return "OK"
        return "CANCELLED" if isinstance(failure, asyncio.CancelledError) else "UNKNOWN"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    try:
        return str(_CODE_NAMES[int(code)])
    except (KeyError, TypeError, ValueError):
        return "UNKNOWN"


_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


# --- the chain ---------------------------------------------------------------------------


def caller_id() -> str:
    """The id of the principal of the call being served (the idempotency scope, the
    owner of executions and registered workflows)."""
    principal = CURRENT_PRINCIPAL.get()
    return principal.id if principal is not None else _ANONYMOUS.id


class Gateway:
    """The chain every method handler of the server is wrapped in (see the module
    docstring).

    Args:
        authenticator: verifies credentials; None when authentication is off.
        policy: roles -> permissions.
        registry: the workflows (who owns one, which are public).
        audit: where audit entries go.
        typed_models: full service name -> model name, of the typed per-model services.
        public_discovery: reflection and the OpenAPI document need no credential.
        audit_reads: audit reads too, not only changes and refusals.
        tracing: makes a span per call, and one per check under it (`_tracing`); None:
            tracing is off and no wrapper is added.
        rate: the rate limiter (`_rate.RateLimiter`); None: no rate limits.
        shed: the in-flight caps (`_shed.Shedder`); None: no caps.
        metrics: where calls are counted (monitoring on), or None.
        access_log: write one `nexus.access` line per call.
    """

    def __init__(
        self,
        *,
        authenticator: Authenticates | None,
        policy: Policy,
        registry: WorkflowRegistry,
        audit: Records,
        typed_models: Mapping[str, str],
        public_discovery: bool = False,
        audit_reads: bool = False,
        tracing: Tracing | None = None,
        rate: RateLimiter | None = None,
        shed: Shedder | None = None,
        metrics: Metrics | None = None,
        access_log: bool = False,
    ) -> None:
        self.authenticator = authenticator
        self.policy = policy
        self.registry = registry
        self.audit = audit
        self.typed_models = dict(typed_models)
        self.public_discovery = public_discovery
        self.audit_reads = audit_reads
        self.tracing = tracing
        self.rate = rate
        self.shed = shed
        self.metrics = metrics
        self.access_log = access_log
        self._dev: dict[tuple[str, str | None], Principal] = {}

    @property
    def auth_enabled(self) -> bool:
        return self.authenticator is not None

    # -- what a principal may see (the servicers filter their listings with these) --

    def may_execute(self, principal: Principal, workflow: str) -> bool:
        """Whether `principal` may run (and see) `workflow`."""
        if self.policy.allows(principal.roles, f"workflow:{workflow}:execute"):
            return True
        if workflow not in self.registry:
            return False
        item = self.registry.get(workflow)
        return item.public or (bool(item.owner) and item.owner == principal.id)

    def may_use_model(self, principal: Principal, model: str) -> bool:
        """Whether `principal` holds any permission on `model`."""
        return any(
            self.policy.allows(principal.roles, f"model:{model}:{op}")
            for op in ("read", "write", "delete", "bulk")
        )

    # -- wrapping -----------------------------------------------------------------------

    def rule(self, path: str) -> Rule:
        found = _STATIC_RULES.get(path)
        if found is not None:
            return found
        service, _, method = path.lstrip("/").partition("/")
        model = self.typed_models.get(service)
        return typed_rule(model, method) if model is not None else _UNKNOWN

    def method(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler` behind the chain (a `_handlers.MethodMap`)."""
        if not hasattr(handler, "_replace"):
            return handler
        rule = self.rule(path)
        watch = (
            _Watch(path, self.metrics, self.access_log)
            if self.metrics is not None or self.access_log
            else None
        )
        if handler.request_streaming:
            kind = "stream_stream" if handler.response_streaming else "stream_unary"
            wrapped = self._streaming_requests(path, rule, getattr(handler, kind), watch)
        elif handler.response_streaming and _is_async_gen(handler.unary_stream):
            kind = "unary_stream"
            wrapped = self._unary_stream(path, rule, handler.unary_stream, watch)
        elif handler.response_streaming:  # a coroutine writing with context.write
            kind = "unary_stream"
            wrapped = self._unary_unary(path, rule, handler.unary_stream, watch)
        else:
            kind = "unary_unary"
            wrapped = self._unary_unary(path, rule, handler.unary_unary, watch)
        if self.shed is not None and rule.access != OPEN and not handler.request_streaming:
            wrapped = self.shed.wrap(wrapped, execution=rule.access == WORKFLOW and rule.change)
        if self.tracing is not None:
            wrapped = (
                self.tracing.streaming(path, wrapped)
                if _is_async_gen(wrapped)
                else self.tracing.unary(path, wrapped)
            )
        replaced: grpc.RpcMethodHandler = handler._replace(**{kind: wrapped})
        return replaced

    def _unary_unary(self, path: str, rule: Rule, behaviour: Any, watch: _Watch | None) -> Any:
        audited = rule.change or self.audit_reads

        async def call(request: Any, context: Any) -> Any:
            started = watch.start() if watch is not None else 0.0
            principal, channel = await self._admit(path, rule, request, context, watch, started)
            token = CURRENT_PRINCIPAL.set(principal)
            failure: BaseException | None = None
            try:
                with tenant_scope(principal.tenant), cache_scope(principal.id):
                    return await behaviour(request, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                CURRENT_PRINCIPAL.reset(token)
                if audited:
                    self._record(path, rule, request, principal, channel, context)
                if watch is not None:
                    code = _code_of(context, failure)
                    watch.end(started, channel, principal.id, code, request, context)

        return call

    def _unary_stream(self, path: str, rule: Rule, behaviour: Any, watch: _Watch | None) -> Any:
        audited = rule.change or self.audit_reads

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            started = watch.start() if watch is not None else 0.0
            principal, channel = await self._admit(path, rule, request, context, watch, started)
            token = CURRENT_PRINCIPAL.set(principal)
            scopes = (tenant_scope(principal.tenant), cache_scope(principal.id))
            for scope in scopes:
                scope.__enter__()
            failure: BaseException | None = None
            try:
                async for item in behaviour(request, context):
                    yield item
            except BaseException as exc:
                failure = exc
                raise
            finally:
                # grpc may close the stream from another task (the client went away):
                # its context holds none of these, and there is nothing to restore
                for scope in reversed(scopes):
                    with contextlib.suppress(ValueError):
                        scope.__exit__(None, None, None)
                with contextlib.suppress(ValueError):
                    CURRENT_PRINCIPAL.reset(token)
                if audited:
                    self._record(path, rule, request, principal, channel, context)
                if watch is not None:
                    code = _code_of(context, failure)
                    watch.end(started, channel, principal.id, code, request, context)

        return stream

    def _streaming_requests(
        self, path: str, rule: Rule, behaviour: Any, watch: _Watch | None
    ) -> Any:
        """Methods that take a stream of requests (reflection): admitted on the
        credential alone, before the first request is read."""
        if _is_async_gen(behaviour):

            async def stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                started = watch.start() if watch is not None else 0.0
                principal, channel = await self._admit(path, rule, None, context, watch, started)
                token = CURRENT_PRINCIPAL.set(principal)
                failure: BaseException | None = None
                try:
                    async for item in behaviour(requests, context):
                        yield item
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    with contextlib.suppress(ValueError):
                        CURRENT_PRINCIPAL.reset(token)
                    if watch is not None:
                        code = _code_of(context, failure)
                        watch.end(started, channel, principal.id, code, None, context)

            return stream

        async def call(requests: Any, context: Any) -> Any:
            started = watch.start() if watch is not None else 0.0
            principal, channel = await self._admit(path, rule, None, context, watch, started)
            token = CURRENT_PRINCIPAL.set(principal)
            failure: BaseException | None = None
            try:
                return await behaviour(requests, context)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                CURRENT_PRINCIPAL.reset(token)
                if watch is not None:
                    code = _code_of(context, failure)
                    watch.end(started, channel, principal.id, code, None, context)

        return call

    # -- the checks ---------------------------------------------------------------------

    async def _admit(
        self,
        path: str,
        rule: Rule,
        request: Any,
        context: Any,
        watch: _Watch | None = None,
        started: float = 0.0,
    ) -> tuple[Principal, str]:
        """The call's principal and channel, once the call may go on; ends the call
        (UNAUTHENTICATED, PERMISSION_DENIED, or INVALID_ARGUMENT for a bad development
        label) otherwise, audited (and observed, with `watch`). A REST call's reply is
        marked for sorted map entries (`sort_reply_maps`)."""
        metadata = context.invocation_metadata() or ()
        channel = "grpc"
        for key, value in metadata:
            if key == "x-nexus-channel":
                channel = value if value in CHANNELS else "grpc"
                break
        if channel == "rest":
            sort_reply_maps()
        principal: Principal | None = None
        try:
            check_request_id_header(metadata, request)
            if self.authenticator is None:
                principal = self._development(metadata)
            else:
                try:
                    with self._step(SPAN_AUTHENTICATE):
                        principal = await self.authenticator.authenticate(metadata)
                except AuthError as exc:
                    raise ApiError(exc.reason, exc.message) from None
                except JwksUnavailable:
                    raise ApiError(
                        "AUTH_PROVIDER_UNAVAILABLE",
                        "the identity provider's signing keys cannot be fetched right now; "
                        "retry later",
                    ) from None
                if principal is None:
                    if self._needs_credential(rule, request):
                        raise ApiError(
                            "CREDENTIALS_MISSING",
                            "this call needs a credential: send an API key (x-api-key, or "
                            "authorization: Bearer <key>) or a token (authorization: Bearer "
                            "<jwt>)",
                        )
                    principal = _ANONYMOUS
                with self._step(SPAN_AUTHORIZE):
                    self._authorize(rule, request, principal)
            if self.rate is not None and rule.access not in (OPEN, DISCOVERY):
                with self._step(SPAN_RATE_LIMIT):
                    await self._limit(rule, request, principal)
        except Exception as exc:  # a refusal, or the key store's database is down
            api = to_api_error(exc)
            reason = api.reason
            self._refused(path, rule, request, principal, channel, reason)
            if watch is not None:
                watch.refused(api, channel)
                code = api.code.name
                who = principal.id if principal is not None else ""
                watch.end(started, channel, who, code, request, context)
            await abort(context, exc)
        except BaseException:  # cancelled while authenticating (the client went away)
            if watch is not None:
                who = principal.id if principal is not None else ""
                watch.end(started, channel, who, "CANCELLED", request, context)
            raise
        return principal, channel

    def _step(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A check's span when tracing is on (a shared no-op otherwise)."""
        return _NO_SPAN if self.tracing is None else self.tracing.step(name)

    async def _limit(self, rule: Rule, request: Any, principal: Principal) -> None:
        """Take a token of the call's bucket (`_rate`), or raise RATE_LIMITED."""
        assert self.rate is not None
        workflow: str | None = None
        models: list[str] = []
        if isinstance(request, message.Message):
            if rule.access == WORKFLOW and rule.change:
                workflow = request.name  # type: ignore[attr-defined]
            elif rule.needs is not None and self.rate.limits.models:
                with contextlib.suppress(Exception):  # the servicer refuses a bad one
                    models = [p for p, _ in rule.needs(request) if p.startswith("model:")]
        await self.rate.admit(principal, workflow, models)

    def _needs_credential(self, rule: Rule, request: Any) -> bool:
        if rule.access == OPEN:
            return False
        if rule.access == DISCOVERY:
            return not self.public_discovery
        if rule.access == WORKFLOW and isinstance(request, message.Message):
            name = request.name  # type: ignore[attr-defined]
            return not (name in self.registry and self.registry.get(name).public)
        return True

    def _authorize(self, rule: Rule, request: Any, principal: Principal) -> None:
        if rule.access == WORKFLOW:
            if not isinstance(request, message.Message):
                return  # not a valid request: the decoding guard refuses it
            name: str = request.name  # type: ignore[attr-defined]
            if not self.may_execute(principal, name):
                _denied(f"workflow:{name}:execute")
        elif rule.access == PERMISSION and rule.needs is not None:
            if request is not None and not isinstance(request, message.Message):
                return
            for permission, _ in rule.needs(request):
                if not self.policy.allows(principal.roles, permission):
                    _denied(permission)

    def _development(self, metadata: Iterable[tuple[str, Any]]) -> Principal:
        """The principal of a call when authentication is off: the `x-nexus-caller`
        label (else `anonymous`) in the `x-nexus-tenant` tenant, with every right."""
        caller, tenant = "anonymous", None
        for key, value in metadata:
            if key == "x-nexus-caller" and isinstance(value, str) and value:
                caller = _label(key, value, MAX_CALLER)
            elif key == "x-nexus-tenant" and isinstance(value, str) and value:
                tenant = _label(key, value, MAX_TENANT)
        found = self._dev.get((caller, tenant))
        if found is None:
            found = Principal(caller, frozenset({ADMIN}), tenant, "none")
            if len(self._dev) < 10_000:
                self._dev[(caller, tenant)] = found
        return found

    # -- the audit trail ----------------------------------------------------------------

    def _refused(
        self,
        path: str,
        rule: Rule,
        request: Any,
        principal: Principal | None,
        channel: str,
        reason: str,
    ) -> None:
        if not self.audit.active:
            return
        code = _CODE_OF_REFUSAL.get(reason, "INVALID_ARGUMENT")
        self.audit.record(_entry(path, rule, request, principal, channel, code, reason))

    def _record(
        self,
        path: str,
        rule: Rule,
        request: Any,
        principal: Principal,
        channel: str,
        context: Any,
    ) -> None:
        if not self.audit.active:
            return
        code = context.code()
        if code is None or code == grpc.StatusCode.OK or code == 0:
            name, reason = "OK", ""
        else:
            name = code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name
            reason = FAILURE_REASON.get()
        self.audit.record(_entry(path, rule, request, principal, channel, name, reason))


_CODE_OF_REFUSAL = {
    "CREDENTIALS_MISSING": "UNAUTHENTICATED",
    "CREDENTIALS_INVALID": "UNAUTHENTICATED",
    "CREDENTIALS_EXPIRED": "UNAUTHENTICATED",
    "PERMISSION_DENIED": "PERMISSION_DENIED",
    "AUTH_PROVIDER_UNAVAILABLE": "UNAVAILABLE",
    "DATABASE_UNAVAILABLE": "UNAVAILABLE",
    "DEPENDENCY_UNAVAILABLE": "UNAVAILABLE",
    "RATE_LIMITED": "RESOURCE_EXHAUSTED",
}


def _entry(
    path: str,
    rule: Rule,
    request: Any,
    principal: Principal | None,
    channel: str,
    code: str,
    reason: str,
) -> AuditEntry:
    return AuditEntry(
        time=_dt.datetime.now(_dt.UTC),
        principal=principal.id if principal is not None else "",
        tenant=principal.tenant if principal is not None else None,
        channel=channel,
        method=path,
        resource=_resource(path, rule, request),
        request_id=str(getattr(request, "request_id", "") or ""),
        code=code,
        reason=reason,
    )


def _resource(path: str, rule: Rule, request: Any) -> str:
    """What the call touched, for the audit trail (bounded: names are cut)."""
    if not isinstance(request, message.Message):
        return ""
    if rule.access == WORKFLOW:
        return f"workflow:{getattr(request, 'name', '')}"[:200]
    if rule.needs is not None:
        try:
            resources = [r for _, r in rule.needs(request) if r]
        except Exception:  # a request the servicer will refuse: nothing to name
            return ""
        return ",".join(resources)[:200]
    if path.endswith("Execution") and hasattr(request, "id"):
        return _execution(request)[:200]
    return ""


def _denied(permission: str) -> None:
    raise ApiError(
        "PERMISSION_DENIED",
        f"permission denied: the caller's roles do not grant {permission[:200]}",
        metadata={"permission": permission[:200]},
    )


def _label(key: str, value: str, limit: int) -> str:
    if len(value) > limit or "\x00" in value:
        raise ApiError(
            "REQUEST_INVALID",
            f"{key} is not a label: longer than {limit} characters or contains NUL",
            [(key, f"longer than {limit} characters or contains NUL")],
        )
    return value


def _is_async_gen(fn: Any) -> bool:
    return inspect.isasyncgenfunction(fn)
