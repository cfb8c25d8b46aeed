"""The MCP adapter: workflows and models of a Nexus gRPC server as typed MCP tools.

A low-level `mcp.server.Server` whose tool list is read from the gRPC server at start and
re-read every `poll_interval` seconds (there is no server push API): when workflows or
models change, clients get `notifications/tools/list_changed` (on the 2026-07-28 wire,
through their `subscriptions/listen` stream). Every tool call is a gRPC call; a failed
call is a tool result with `isError` and the status and field violations in its text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.subscriptions import ResourcesListChanged, ToolsListChanged
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from .._grpc import ApiFailure, caller_metadata, server_address, struct_of, to_json
from ._tools import ToolSpec, model_tools, workflow_tool

__all__ = ["Adapter"]

log = logging.getLogger("nexus.mcp")

_MIME = "application/json"
_MAX_SESSIONS = 256


def _text_result(doc: Any, *, error: bool = False, structured: bool = True) -> types.CallToolResult:
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=text)],
        structured_content=doc if structured and isinstance(doc, dict) and not error else None,
        is_error=error,
    )


def _error_result(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


class Adapter:
    """Holds the gRPC channel, the current tool catalog and the MCP server."""

    def __init__(self, server: str | None = None, *, poll_interval: float = 5.0) -> None:
        self.address = server_address(server)
        self.poll_interval = poll_interval
        self.tools: dict[str, ToolSpec] = {}
        self.workflows: dict[str, Any] = {}
        self.models: dict[str, Any] = {}
        self._signature: tuple[Any, ...] = ()
        self._channel: grpc.aio.Channel | None = None
        self._sessions: dict[int, Any] = {}
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
        with contextlib.suppress(ApiFailure, grpc.RpcError):
            await self.refresh()
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
            try:
                if await self.refresh():
                    await self._announce()
            except (ApiFailure, grpc.RpcError) as exc:
                log.debug("refresh failed: %s", exc)

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
        """Re-read workflows and models; returns whether the tool list changed."""
        from nexus_api.nexus.model.v1 import model_service_pb2 as m
        from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

        workflows: list[Any] = []
        token = ""
        while True:
            resp = await self._wf().ListWorkflows(
                w.ListWorkflowsRequest(page_size=1000, page_token=token), timeout=10
            )
            workflows += resp.workflows
            token = resp.next_page_token
            if not token:
                break
        models: list[Any] = []
        token = ""
        while True:
            mresp = await self._ms().ListModels(
                m.ListModelsRequest(page_size=1000, page_token=token), timeout=10
            )
            models += mresp.models
            token = mresp.next_page_token
            if not token:
                break
        signature = (
            tuple(sorted(wf.SerializeToString(deterministic=True) for wf in workflows)),
            tuple(sorted(md.SerializeToString(deterministic=True) for md in models)),
        )
        if signature == self._signature:
            return False
        tools: dict[str, ToolSpec] = {}
        for wf in workflows:
            spec = workflow_tool(wf)
            tools[spec.name] = spec
        for md in models:
            for spec in model_tools(md):
                tools.setdefault(spec.name, spec)
        self.tools = tools
        self.workflows = {wf.name: wf for wf in workflows}
        self.models = {md.name: md for md in models}
        changed = bool(self._signature)
        self._signature = signature
        return changed

    # ------------------------------------------------------------------ handlers

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        self._remember(ctx)
        if not self.tools:
            with contextlib.suppress(ApiFailure, grpc.RpcError):
                await self.refresh()
        return types.ListToolsResult(tools=[self._tool(s) for s in self.tools.values()])

    @staticmethod
    def _tool(spec: ToolSpec) -> types.Tool:
        hints = types.ToolAnnotations(
            read_only_hint=spec.read_only,
            destructive_hint=spec.destructive if not spec.read_only else None,
            idempotent_hint=spec.idempotent or None,
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
        if not self._signature:
            with contextlib.suppress(ApiFailure, grpc.RpcError):
                await self.refresh()
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
                doc = to_json(await self._ms().GetModel(m.GetModelRequest(name=name), timeout=10))
            elif kind == "workflows":
                doc = to_json(
                    await self._wf().GetWorkflow(w.GetWorkflowRequest(name=name), timeout=10)
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
            with contextlib.suppress(ApiFailure, grpc.RpcError):
                await self.refresh()
            spec = self.tools.get(params.name)
        if spec is None:
            return _error_result(f"unknown tool {params.name!r}")
        args = dict(params.arguments or {})
        problems = validate(spec.input_schema, args)
        if problems:
            return _error_result("invalid arguments:\n" + "\n".join(f"  {p}" for p in problems))
        try:
            if spec.kind == "workflow":
                return await self._run_workflow(ctx, spec, args)
            return await self._model_op(spec, args)
        except grpc.RpcError as exc:
            failure = ApiFailure.from_rpc_error(exc)
            return _error_result(failure.render())

    async def _run_workflow(
        self, ctx: ServerRequestContext[Any], spec: ToolSpec, args: dict[str, Any]
    ) -> types.CallToolResult:
        from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

        request = w.StreamExecutionRequest(name=spec.target, inputs=struct_of(args))
        call = self._wf().StreamExecution(request, metadata=caller_metadata())
        execution_id = ""
        done = 0
        total = float(spec.steps) if spec.steps else None
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                execution_id = event.execution_id or execution_id
                if kind == "node_started":
                    await _progress(ctx, done, total, f"node {event.node_started.node_id} started")
                elif kind in ("node_completed", "node_failed"):
                    done += 1
                    node = getattr(event, kind).node_id
                    verb = "completed" if kind == "node_completed" else "failed"
                    await _progress(ctx, done, total, f"node {node} {verb}")
                elif kind in ("execution_completed", "execution_failed", "execution_cancelled"):
                    execution = getattr(event, kind).execution
                    return _finished(kind, execution)
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
                w.CancelExecutionRequest(id=execution_id), timeout=10, metadata=caller_metadata()
            )

    async def _model_op(self, spec: ToolSpec, args: dict[str, Any]) -> types.CallToolResult:
        from nexus_api.nexus.model.v1 import model_service_pb2 as m

        ms = self._ms()
        meta = caller_metadata()
        name = spec.target
        op = spec.kind
        if op == "create":
            rec = await ms.CreateRecord(
                m.CreateRecordRequest(model=name, record=struct_of(args)), metadata=meta
            )
            return _text_result(to_json(rec))
        if op == "get":
            req = m.GetRecordRequest(model=name, id=args["id"], fields=args.get("fields", []))
            return _text_result(to_json(await ms.GetRecord(req, metadata=meta)))
        if op == "list":
            lreq = m.ListRecordsRequest(
                model=name,
                order_by=args.get("order_by", ""),
                page_size=int(args.get("limit", 50)),
                page_token=args.get("page_token", ""),
                fields=args.get("fields", []),
            )
            if args.get("filter"):
                lreq.filter.update(args["filter"])
            doc = to_json(await ms.ListRecords(lreq, metadata=meta))
            doc.setdefault("records", [])
            return _text_result(doc)
        if op == "count":
            creq = m.CountRecordsRequest(model=name)
            if args.get("filter"):
                creq.filter.update(args["filter"])
            resp = await ms.CountRecords(creq, metadata=meta)
            return _text_result({"count": int(resp.count)})
        if op == "update":
            record = {k: v for k, v in args.items() if k != "id"}
            ureq = m.UpdateRecordRequest(model=name, id=args["id"], record=struct_of(record))
            ureq.update_mask.paths.extend(record)
            return _text_result(to_json(await ms.UpdateRecord(ureq, metadata=meta)))
        if op == "upsert":
            record = {k: v for k, v in args.items() if k != "conflict_on"}
            sreq = m.UpsertRecordRequest(
                model=name, record=struct_of(record), conflict_on=args.get("conflict_on", [])
            )
            resp2 = await ms.UpsertRecord(sreq, metadata=meta)
            return _text_result({"record": to_json(resp2.record), "created": bool(resp2.created)})
        if op == "delete":
            await ms.DeleteRecord(m.DeleteRecordRequest(model=name, id=args["id"]), metadata=meta)
            return _text_result({"deleted": args["id"]})
        return _error_result(f"unsupported operation {op!r}")


async def _progress(
    ctx: ServerRequestContext[Any], done: int, total: float | None, message: str
) -> None:
    with contextlib.suppress(Exception):  # progress is best effort, never fails the call
        await ctx.session.report_progress(float(done), total, message)


def _finished(kind: str, execution: Any) -> types.CallToolResult:
    doc = to_json(execution)
    if kind == "execution_completed":
        outputs = doc.get("outputs", {})
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
