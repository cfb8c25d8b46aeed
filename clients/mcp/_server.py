"""The MCP adapter: workflows and models of a Nexus gRPC server as typed MCP tools.

A low-level `mcp.server.Server` whose tool list is read from the gRPC server at start and
re-read every `poll_interval` seconds (there is no server push API): when workflows or
models change, clients get `notifications/tools/list_changed` (on the 2026-07-28 wire,
through their `subscriptions/listen` stream). Every tool call is a gRPC call; a failed
call is a tool result with `isError` and the status and field violations in its text.

A gRPC server that cannot be reached (or fails to list its workflows and models) is
logged at WARNING when it happens and when it is over, and every tool call meanwhile
answers `isError` with "the Nexus server at HOST:PORT is unreachable", never "unknown
tool". Nothing a client sends ends as a protocol error: arguments the input schema
refuses, or that protobuf cannot carry, are `isError` results naming the argument.

Every gRPC call carries the caller's credential and nothing else (the adapter holds no
rights of its own): over HTTP the `Authorization: Bearer` or `X-API-Key` of the HTTP
request that carried the MCP message (the SDK hands it to each handler as
`ctx.request`; the session itself runs in another task, so a context variable set by
the HTTP layer would not reach it), over stdio (and in process) the adapter's
`credential`, from `NEXUS_TOKEN`/`NEXUS_API_KEY`. The tool list is per caller too: each
`tools/list` reads `ListWorkflows`/`ListModels` with the caller's credential, so it
shows only what that principal may use; the catalogs kept to find a called tool are
keyed by a digest of the credential, never shared between two credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import mcp_types as types
from google.protobuf.message import DecodeError
from mcp.server import Server
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.subscriptions import ResourcesListChanged, ToolsListChanged
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from .._grpc import (
    CREDENTIAL,
    TRACE_CONTEXT,
    ApiFailure,
    Credential,
    call_metadata,
    exact,
    in_order,
    order_values,
    server_address,
    struct_of,
    to_json,
    trace_context_of,
)
from ._auth import CredentialError, credential_of
from ._tools import REQUEST_ID, ToolSpec, model_tools, workflow_tool

__all__ = ["Adapter"]

log = logging.getLogger("nexus.mcp")

_MIME = "application/json"
_MAX_SESSIONS = 256
#: Callers (credentials) whose tool catalog is kept to find the tools they call.
_MAX_CATALOGS = 256
#: Codes of a call refused for its caller's credential, not for the server's state.
_REFUSED = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})
#: Longest text of an exception quoted in a tool result.
_MAX_QUOTE = 200
#: Argument problems named in one result (the rest are counted).
_MAX_PROBLEMS = 10


def _text_result(doc: Any, *, error: bool = False, structured: bool = True) -> types.CallToolResult:
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content=doc if structured and isinstance(doc, dict) and not error else None,
        is_error=error,
    )


def _error_result(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


@dataclass
class _Catalog:
    """The tools one caller may use, as its last `ListWorkflows`/`ListModels` read."""

    tools: dict[str, ToolSpec] = field(default_factory=dict)
    workflows: dict[str, Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    #: each model's field names in declaration order: results print a record's fields
    #: in that order every time (a `Struct` comes back from gRPC in no particular
    #: order), as the CLI does
    field_orders: dict[str, list[str]] = field(default_factory=dict)
    signature: tuple[Any, ...] = ()


def _caller_key(credential: Credential | None) -> str:
    """The key of a caller's catalog: a digest, so no credential is kept in memory."""
    if credential is None:
        return ""
    return hashlib.sha256(f"{credential.kind}\0{credential.value}".encode()).hexdigest()


class Adapter:
    """Holds the gRPC channel, the callers' tool catalogs and the MCP server.

    Args:
        server: the gRPC server, `HOST:PORT` (default: `$NEXUS_SERVER`, else local).
        poll_interval: seconds between checks for changed workflows and models.
        credential: the credential of the calls of a client that brings none of its
            own (stdio, in process); never used for an HTTP request.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        poll_interval: float = 5.0,
        credential: Credential | None = None,
    ) -> None:
        self.address = server_address(server)
        self.poll_interval = poll_interval
        self.credential = credential
        self._catalogs: OrderedDict[str, _Catalog] = OrderedDict()
        #: The lists as the poller last saw them (change notifications compare them).
        self._watched: tuple[Any, ...] = ()
        #: Whether the server authenticates callers (None: not known yet).
        self.auth_enabled: bool | None = None
        self._channel: grpc.aio.Channel | None = None
        self._sessions: dict[int, Any] = {}
        #: Why the gRPC server cannot be used right now (a tool result's text), or None.
        self.failure: str | None = None
        self.bus = InMemorySubscriptionBus()
        self.server: Server[Any] = Server(
            "nexus-mcp",
            version="0.1.0",
            instructions=(
                "Tools of a Nexus server: run_<workflow> runs a workflow; "
                "<collection>_<op> reads and writes model records."
            ),
            lifespan=self._lifespan,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_read_resource=self._read_resource,
            on_subscriptions_listen=ListenHandler(self.bus),
        )
        self.server.middleware.append(self._as_caller)

    # ------------------------------------------------------------------ callers

    async def _as_caller(
        self, ctx: ServerRequestContext[Any], call_next: CallNext
    ) -> HandlerResult:
        """Run the handler of one MCP message with its caller's credential in `CREDENTIAL`
        (which `call_metadata()` puts on every gRPC call)."""
        credential = self.credential
        headers = getattr(ctx.request, "headers", None)
        if headers is not None:  # HTTP: the caller's own, never the adapter's
            try:
                credential = credential_of(headers)
            except CredentialError:  # refused by the resource server before
                credential = None
        token = CREDENTIAL.set(credential)
        traced = TRACE_CONTEXT.set(_trace_context(ctx, headers))
        try:
            return await call_next(ctx)
        finally:
            TRACE_CONTEXT.reset(traced)
            CREDENTIAL.reset(token)

    def _catalog(self) -> _Catalog:
        """The catalog of the current caller (`CREDENTIAL`)."""
        key = _caller_key(CREDENTIAL.get())
        catalog = self._catalogs.get(key)
        if catalog is None:
            catalog = self._catalogs[key] = _Catalog()
            while len(self._catalogs) > _MAX_CATALOGS:
                self._catalogs.popitem(last=False)
        else:
            self._catalogs.move_to_end(key)
        return catalog

    @property
    def tools(self) -> dict[str, ToolSpec]:
        """The current caller's tools, by name."""
        return self._catalog().tools

    @property
    def workflows(self) -> dict[str, Any]:
        """The current caller's workflows (`Workflow` messages), by name."""
        return self._catalog().workflows

    @property
    def models(self) -> dict[str, Any]:
        """The current caller's models (`Model` messages), by name."""
        return self._catalog().models

    async def principal(self) -> Any:
        """Who the current caller is (`AuthService.GetPrincipal` with its credential).

        Raises:
            grpc.RpcError: UNAUTHENTICATED for a missing or bad credential when the
                server's authentication is on; UNAVAILABLE; UNIMPLEMENTED (an older
                server).
        """
        from nexus_api.nexus.auth.v1 import auth_service_pb2 as a
        from nexus_api.nexus.auth.v1 import auth_service_pb2_grpc as ag

        stub = ag.AuthServiceStub(self.channel)  # type: ignore[no-untyped-call]
        try:
            principal = await stub.GetPrincipal(
                a.GetPrincipalRequest(), metadata=call_metadata(), timeout=10
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self.auth_enabled = True
            raise
        self.auth_enabled = bool(principal.auth_enabled)
        return principal

    # ------------------------------------------------------------------ plumbing

    def init_options(self) -> Any:
        return self.server.create_initialization_options(
            NotificationOptions(tools_changed=True, resources_changed=True)
        )

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        return self._channel

    def _wf(self) -> Any:
        from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg

        return wg.WorkflowServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def _ms(self) -> Any:
        from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg

        return mg.ModelServiceStub(self.channel)  # type: ignore[no-untyped-call]

    @contextlib.asynccontextmanager
    async def _lifespan(self, _server: Any) -> AsyncIterator[dict[str, Any]]:
        await self._watch()
        poller = asyncio.create_task(self._poll())
        try:
            yield {}
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            if self._channel is not None:
                await self._channel.close()
                self._channel = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            if await self._watch():
                await self._announce()

    async def _watch(self) -> bool:
        """Re-read the lists as the adapter's own caller (its `credential`: stdio's; none
        over HTTP); returns whether they changed since the last look.

        With the server's authentication on and no credential of its own, the adapter
        sees nothing, so it does not ask (each refusal would be audited): clients of the
        HTTP transport see changes on their next `tools/list`, which always reads afresh.
        """
        if self.credential is None and self.auth_enabled:
            return False
        token = CREDENTIAL.set(self.credential)
        try:
            refused = await self._try_refresh()
            signature = self._catalog().signature
        finally:
            CREDENTIAL.reset(token)
        if refused is not None:
            if refused.code == "UNAUTHENTICATED":
                self.auth_enabled = True
            return False
        changed = bool(self._watched) and signature != self._watched
        self._watched = signature
        return changed

    async def _try_refresh(self) -> ApiFailure | None:
        """`refresh()` for the current caller. A server that cannot be reached or fails
        is recorded and logged (`failure`) instead of raised; a refusal of the caller's
        credential (UNAUTHENTICATED, PERMISSION_DENIED) is that caller's own answer,
        returned and not recorded (another caller may be served)."""
        try:
            await self.refresh()
        except grpc.RpcError as exc:
            failure = ApiFailure.from_rpc_error(exc)
            if failure.code in _REFUSED:
                return failure
            self._failed(failure, "listing workflows and models")
            return None
        if self.failure is not None:
            log.warning("the Nexus server at %s answers again", self.address)
            self.failure = None
        return None

    def _failed(self, failure: ApiFailure, doing: str) -> str:
        """Record that the server cannot be reached or failed while `doing`; logs each
        new state once (not every poll) and returns the text for a tool result."""
        if _unreachable(failure):
            text = f"UNAVAILABLE: the Nexus server at {self.address} is unreachable"
        else:
            text = f"the Nexus server at {self.address} failed {doing}:\n{failure.render()}"
        if text != self.failure:
            log.warning("%s (%s: %s)", text.splitlines()[0], failure.code, failure.message)
        self.failure = text
        return text

    def _remember(self, ctx: ServerRequestContext[Any]) -> None:
        """Keep a session of each pre-2026 connection, to send it change notifications.

        Sessions are per request; the connection behind one is what lasts. On the
        2026-07-28 protocol change notifications go through `subscriptions/listen`.

        The request context of a low-level handler does not expose the connection (mcp
        2.3: `ServerRequestContext` has no `connection`; `Context.connection` exists, but
        the runner builds no `Context` for low-level handlers). What it does expose is
        the connection's `initialize` params (`session.client_params`, public, set once
        per connection by the handshake), so their identity keys the connection. The
        session kept here holds them alive, so a kept key is never reused.
        """
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return
        params = ctx.session.client_params
        key = id(params) if params is not None else id(ctx.session)
        self._sessions.pop(key, None)
        self._sessions[key] = ctx.session
        while len(self._sessions) > _MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))

    async def _announce(self) -> None:
        """Tell every client that the tools (and resources) changed."""
        await self.bus.publish(ToolsListChanged())
        await self.bus.publish(ResourcesListChanged())
        for key, session in list(self._sessions.items()):
            try:
                await session.send_tool_list_changed()
                await session.send_resource_list_changed()
            except Exception:  # a closed connection: forget it
                self._sessions.pop(key, None)

    async def refresh(self) -> bool:
        """Re-read the workflows and models the current caller may use; returns whether
        its tool list changed (False the first time)."""
        from nexus_api.nexus.model.v1 import model_service_pb2 as m
        from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

        workflows: list[Any] = []
        token = ""
        while True:
            resp = await self._wf().ListWorkflows(
                w.ListWorkflowsRequest(page_size=1000, page_token=token),
                timeout=10,
                metadata=call_metadata(),
            )
            workflows += resp.workflows
            token = resp.next_page_token
            if not token:
                break
        models: list[Any] = []
        token = ""
        while True:
            mresp = await self._ms().ListModels(
                m.ListModelsRequest(page_size=1000, page_token=token),
                timeout=10,
                metadata=call_metadata(),
            )
            models += mresp.models
            token = mresp.next_page_token
            if not token:
                break
        signature = (
            tuple(sorted(wf.SerializeToString(deterministic=True) for wf in workflows)),
            tuple(sorted(md.SerializeToString(deterministic=True) for md in models)),
        )
        catalog = self._catalog()
        if signature == catalog.signature:
            return False
        tools: dict[str, ToolSpec] = {}
        model_names = {md.name for md in models}
        for wf in workflows:
            spec = workflow_tool(wf, model_names)
            tools[spec.name] = spec
        for md in models:
            for spec in model_tools(md):
                tools.setdefault(spec.name, spec)
        catalog.tools = tools
        catalog.workflows = {wf.name: wf for wf in workflows}
        catalog.models = {md.name: md for md in models}
        catalog.field_orders = {md.name: [f.name for f in md.fields] for md in models}
        changed = bool(catalog.signature)
        catalog.signature = signature
        return changed

    # ------------------------------------------------------------------ handlers

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        self._remember(ctx)
        await self._refresh_or_raise()
        return types.ListToolsResult(tools=[self._tool(s) for s in self.tools.values()])

    async def _refresh_or_raise(self) -> None:
        """Read the caller's lists afresh (a list request shows what the principal may
        use now); a refused credential is the request's error."""
        from mcp.shared.exceptions import MCPError

        refused = await self._try_refresh()
        if refused is not None:
            raise MCPError(types.INVALID_REQUEST, refused.render())

    @staticmethod
    def _tool(spec: ToolSpec) -> types.Tool:
        # every hint explicit: MCP's defaults (destructive, not idempotent) are for tools
        # nothing is known about, and ours are known
        hints = types.ToolAnnotations(
            read_only_hint=spec.read_only,
            destructive_hint=spec.destructive,
            idempotent_hint=spec.idempotent,
            open_world_hint=False,
        )
        return types.Tool(
            name=spec.name,
            description=spec.description,
            input_schema=spec.input_schema,
            output_schema=spec.output_schema,
            annotations=hints,
        )

    async def _list_resources(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        self._remember(ctx)
        await self._refresh_or_raise()
        resources = [
            types.Resource(
                uri=f"nexus://models/{name}",
                name=f"model {name}",
                description=f"schema of the {name} model ({md.collection})",
                mime_type=_MIME,
            )
            for name, md in self.models.items()
        ]
        resources += [
            types.Resource(
                uri=f"nexus://workflows/{name}",
                name=f"workflow {name}",
                description=wf.description or f"definition of the {name} workflow",
                mime_type=_MIME,
            )
            for name, wf in self.workflows.items()
        ]
        return types.ListResourcesResult(resources=resources)

    async def _read_resource(
        self, ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        from mcp.shared.exceptions import MCPError

        from nexus_api.nexus.model.v1 import model_service_pb2 as m
        from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

        uri = str(params.uri)
        kind, _, name = uri.removeprefix("nexus://").partition("/")
        try:
            if kind == "models":
                doc = to_json(
                    await self._ms().GetModel(
                        m.GetModelRequest(name=name), timeout=10, metadata=call_metadata()
                    )
                )
            elif kind == "workflows":
                doc = to_json(
                    await self._wf().GetWorkflow(
                        w.GetWorkflowRequest(name=name), timeout=10, metadata=call_metadata()
                    )
                )
            else:
                raise MCPError(types.INVALID_PARAMS, f"unknown resource {uri}")
        except grpc.RpcError as exc:
            raise MCPError(types.INVALID_PARAMS, ApiFailure.from_rpc_error(exc).render()) from None
        return types.ReadResourceResult(
            contents=[
                types.TextResourceContents(
                    uri=uri, mime_type=_MIME, text=json.dumps(doc, indent=2, ensure_ascii=False)
                )
            ]
        )

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        self._remember(ctx)
        spec = self.tools.get(params.name)
        if spec is None:
            refused = await self._try_refresh()
            if refused is not None:
                return _error_result(refused.render())
            spec = self.tools.get(params.name)
        if spec is None:
            if self.failure is not None:
                return _error_result(self.failure)
            best = difflib.get_close_matches(params.name[:200], list(self.tools), n=1)
            hint = f" (did you mean {best[0]}?)" if best else ""
            return _error_result(f"unknown tool {_quote(repr(params.name))}{hint}")
        args = dict(params.arguments or {})
        problems = validate(spec.input_schema, args) or unsendable(args)
        if problems:
            lines = "\n".join(f"  {_quote(p)}" for p in problems[:_MAX_PROBLEMS])
            more = len(problems) - _MAX_PROBLEMS
            return _error_result(
                "invalid arguments:\n" + lines + (f"\n  ... and {more} more" if more > 0 else "")
            )
        try:
            if spec.kind == "workflow":
                result = await self._run_workflow(ctx, spec, args)
            else:
                result = await self._model_op(spec, args)
        except grpc.RpcError as exc:
            failure = ApiFailure.from_rpc_error(exc)
            if _unreachable(failure):
                return _error_result(self._failed(failure, f"calling {spec.name}"))
            return _error_result(failure.render())
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            # a value the schema allows but a protobuf message cannot hold (the checks of
            # `unsendable` cover the known ones; this keeps it a tool result regardless)
            return _error_result(f"invalid arguments:\n  {_quote(str(exc))}")
        except DecodeError:
            return _error_result(
                "invalid arguments:\n  nested deeper than a protobuf message can carry "
                "(100 levels; a filter may nest at most 16)"
            )
        except Exception:
            log.exception("tool %s failed in the adapter", spec.name)
            return _error_result(f"INTERNAL: the adapter failed to call {spec.name} (see its log)")
        if self.failure is not None:
            self.failure = None
            log.warning("the Nexus server at %s answers again", self.address)
        return result

    async def _run_workflow(
        self, ctx: ServerRequestContext[Any], spec: ToolSpec, args: dict[str, Any]
    ) -> types.CallToolResult:
        from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

        inputs = dict(args)
        request_id = inputs.pop(REQUEST_ID, "") if spec.request_id else ""
        request = w.StreamExecutionRequest(
            name=spec.target, inputs=struct_of(inputs), request_id=request_id
        )
        call = self._wf().StreamExecution(request, metadata=call_metadata(request_id))
        execution_id = ""
        progress = _Progress(ctx, spec.steps)
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                execution_id = event.execution_id or execution_id
                if kind == "node_started":
                    await progress.step(f"node {event.node_started.node_id} started")
                elif kind in ("node_completed", "node_failed"):
                    node = getattr(event, kind).node_id
                    verb = "completed" if kind == "node_completed" else "failed"
                    await progress.step(f"node {node} {verb}")
                elif kind in ("execution_completed", "execution_failed", "execution_cancelled"):
                    execution = getattr(event, kind).execution
                    orders = list(self._catalog().field_orders.values())
                    return _finished(kind, execution, orders)
        except asyncio.CancelledError:
            # the MCP request was cancelled: stop the execution as well
            call.cancel()
            if execution_id:
                await asyncio.shield(self._cancel(execution_id))
            raise
        return _error_result("UNAVAILABLE: the execution stream ended without a result")

    async def _cancel(self, execution_id: str) -> None:
        from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

        with contextlib.suppress(grpc.RpcError, asyncio.TimeoutError):
            await self._wf().CancelExecution(
                w.CancelExecutionRequest(id=execution_id), timeout=10, metadata=call_metadata()
            )

    async def _model_op(self, spec: ToolSpec, args: dict[str, Any]) -> types.CallToolResult:
        from nexus_api.nexus.model.v1 import model_service_pb2 as m

        ms = self._ms()
        name = spec.target
        op = spec.kind
        args = dict(args)
        key = args.pop(REQUEST_ID, "") if spec.request_id else ""
        meta = call_metadata(key)

        names = self._catalog().field_orders.get(name, [])

        def answer(reply: Any, at: str = "") -> types.CallToolResult:
            """The reply's document, its record (the document itself, or the one `at`
            that key; "records": a page of them) in the model's field order."""
            doc = to_json(reply)
            if at == "records":
                doc[at] = [in_order(r, names) for r in doc[at]]
            elif at:
                doc[at] = in_order(doc[at], names)
            else:
                doc = in_order(doc, names)
            return _text_result(doc)

        if op == "create":
            rec = await ms.CreateRecord(
                m.CreateRecordRequest(model=name, record=struct_of(args), request_id=key),
                metadata=meta,
            )
            return answer(rec)
        if op == "get":
            req = m.GetRecordRequest(model=name, id=args["id"], fields=args.get("fields", []))
            return answer(await ms.GetRecord(req, metadata=meta))
        if op == "list":
            lreq = m.ListRecordsRequest(
                model=name,
                order_by=args.get("order_by", ""),
                page_size=int(args.get("limit", 50)),
                page_token=args.get("page_token", ""),
                fields=args.get("fields", []),
            )
            if args.get("filter"):
                lreq.filter.update(exact(args["filter"]))
            return answer(await ms.ListRecords(lreq, metadata=meta), "records")
        if op == "count":
            creq = m.CountRecordsRequest(model=name)
            if args.get("filter"):
                creq.filter.update(exact(args["filter"]))
            # the response's proto3 JSON, as REST prints it: `{"count": "4"}` (int64)
            return _text_result(to_json(await ms.CountRecords(creq, metadata=meta)))
        if op == "search":
            qreq = m.SearchRecordsRequest(
                model=name,
                q=args.get("query", ""),
                page_size=int(args.get("limit", 50)),
                page_token=args.get("page_token", ""),
                fields=args.get("fields", []),
            )
            if args.get("filter"):
                qreq.filter.update(exact(args["filter"]))
            return answer(await ms.SearchRecords(qreq, metadata=meta), "records")
        if op == "update":
            record = {k: v for k, v in args.items() if k != "id"}
            ureq = m.UpdateRecordRequest(
                model=name, id=args["id"], record=struct_of(record), request_id=key
            )
            ureq.update_mask.paths.extend(record)
            return answer(await ms.UpdateRecord(ureq, metadata=meta))
        if op == "upsert":
            record = {k: v for k, v in args.items() if k != "conflict_on"}
            sreq = m.UpsertRecordRequest(
                model=name,
                record=struct_of(record),
                conflict_on=args.get("conflict_on", []),
                request_id=key,
            )
            return answer(await ms.UpsertRecord(sreq, metadata=meta), "record")
        if op == "delete":
            await ms.DeleteRecord(
                m.DeleteRecordRequest(model=name, id=args["id"], request_id=key), metadata=meta
            )
            return _text_result({"deleted": args["id"]})
        return _error_result(f"unsupported operation {op!r}")


class _Progress:
    """The progress notifications of one workflow call, strictly increasing (MCP requires
    it): each node counts half a step when it starts and the other half when it ends, so
    `progress` is the number of nodes done (plus 0.5 for each running one) of `total`,
    the workflow's nodes, however many run at once."""

    def __init__(self, ctx: ServerRequestContext[Any], steps: int) -> None:
        self._ctx = ctx
        self._total = float(steps) if steps else None
        self._events = 0

    async def step(self, message: str) -> None:
        self._events += 1
        with contextlib.suppress(Exception):  # progress is best effort, never fails the call
            await self._ctx.session.report_progress(self._events / 2, self._total, message)


def _unreachable(failure: ApiFailure) -> bool:
    """Whether a failed call means the server could not be reached at all (gRPC's own
    UNAVAILABLE, without our ErrorInfo: a DATABASE_UNAVAILABLE is the server answering)."""
    return (failure.code == "UNAVAILABLE" and not failure.reason) or (
        failure.code == "DEADLINE_EXCEEDED" and not failure.reason
    )


def _quote(text: str) -> str:
    """`text` cut to a bounded length, for a tool result quoting a client's input."""
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 1] + "…"


def unsendable(args: dict[str, Any]) -> list[str]:
    """The arguments valid JSON that a protobuf `Struct` cannot carry, as `path: message`
    lines: an integer beyond a double's range, text that is not UTF-8 (a lone surrogate
    escape such as `\\ud800`), in a value or a key, at any depth."""
    out: list[str] = []
    stack: list[tuple[str, Any]] = [(k, v) for k, v in reversed(args.items())]
    while stack and len(out) < 20:
        path, value = stack.pop()
        if not _utf8(path):
            out.append(f"{_quote(repr(path))}: a name that is not valid UTF-8 text")
        elif isinstance(value, int) and not isinstance(value, bool) and not _double(value):
            out.append(f"{_quote(path)}: an integer beyond the range of a JSON number")
        elif isinstance(value, str) and not _utf8(value):
            out.append(f"{_quote(path)}: text that is not valid UTF-8 (a lone surrogate)")
        elif isinstance(value, dict):
            stack += [(f"{path}.{k}", v) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value)))]
    return out


def _double(value: int) -> bool:
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _finished(kind: str, execution: Any, orders: list[list[str]]) -> types.CallToolResult:
    """A workflow tool's result: the execution's outputs (records in their model's
    field order, any other object sorted), or its error."""
    doc = to_json(execution)
    if kind == "execution_completed":
        outputs = order_values(doc.get("outputs", {}), orders)
        result = _text_result(outputs)
        result.content.insert(
            0,
            types.TextContent(
                type="text", text=f"execution {doc.get('id')} {doc.get('state')}; outputs:"
            ),
        )
        return result
    error = doc.get("error", {})
    code = grpc.StatusCode.UNKNOWN.name
    for status in grpc.StatusCode:
        if status.value[0] == error.get("code"):
            code = status.name
    lines = [f"{code}: {error.get('message', 'the execution did not succeed')}"]
    for detail in error.get("details", []):
        if detail.get("reason"):
            lines[0] = f"{code} ({detail['reason']}): {lines[0].split(': ', 1)[1]}"
        lines += [
            f"  {v.get('field')}: {v.get('description')}"
            for v in detail.get("field_violations", [])
        ]
    lines.append(f"  execution_id={doc.get('id')} state={doc.get('state')}")
    return _error_result("\n".join(lines))


def validate(schema: dict[str, Any], args: dict[str, Any]) -> list[str]:
    """Every way `args` breaks `schema`, as `path: message` lines (empty when valid)."""
    import jsonschema  # type: ignore[import-untyped]

    validator = jsonschema.Draft202012Validator(schema)
    out = []
    for error in sorted(validator.iter_errors(args), key=lambda e: list(e.path)):
        path = ".".join(str(p) for p in error.path) or "(arguments)"
        out.append(f"{path}: {error.message}")
    return out


def _trace_context(ctx: Any, headers: Any) -> tuple[tuple[str, str], ...]:
    """The W3C trace context of one MCP request: the HTTP request's `traceparent` /
    `tracestate` headers, else the same keys in the request's `_meta` (how a stdio
    client passes it), else none (the server starts a trace of its own)."""
    if headers is not None:
        found = trace_context_of(headers.get("traceparent"), headers.get("tracestate"))
        if found:
            return found
    meta = getattr(ctx, "meta", None)
    if isinstance(meta, dict):
        return trace_context_of(meta.get("traceparent"), meta.get("tracestate"))
    return ()
