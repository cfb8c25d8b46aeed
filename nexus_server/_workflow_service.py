"""WorkflowService: registration, execution, streaming and execution records."""

from __future__ import annotations

import contextlib
import datetime as _dt
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, empty_pb2, timestamp_pb2

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from workflow import (
    Event,
    EventKind,
    Problem,
    Workflow,
    WorkflowBuilder,
    WorkflowValidationError,
)

from ._convert import (
    decode_page_token,
    definition_dict,
    encode_page_token,
    execution_message,
    from_struct,
    page_size,
    status_message,
    to_struct,
    workflow_message,
)
from ._errors import ApiError, StatusError, abort, to_api_error
from ._executions import Executions, RunningExecution
from ._registry import WorkflowRegistry, check_name
from ._store import MAX_CALLER

__all__ = ["WorkflowServicer", "caller_of"]

# grpc ships no type information: its servicer context is Any to the type checker
Context: TypeAlias = Any


def caller_of(context: Context) -> str:
    """Who is calling, for idempotency keys. Until authentication exists this is the
    `x-nexus-caller` metadata value, or "anonymous"."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-nexus-caller" and isinstance(value, str) and value:
            if len(value) > MAX_CALLER:
                raise ApiError(
                    "REQUEST_INVALID",
                    f"x-nexus-caller is {len(value)} characters long; at most {MAX_CALLER}",
                    [("x-nexus-caller", f"longer than {MAX_CALLER} characters")],
                )
            return value
    return "anonymous"


class WorkflowServicer(wgrpc.WorkflowServiceServicer):
    """Implements nexus.workflow.v1.WorkflowService over the registry and executions."""

    def __init__(
        self, registry: WorkflowRegistry, executions: Executions, *, allow_code_nodes: bool
    ) -> None:
        self.registry = registry
        self.executions = executions
        self.allow_code_nodes = allow_code_nodes

    async def ListWorkflows(
        self, request: wpb.ListWorkflowsRequest, context: Context
    ) -> wpb.ListWorkflowsResponse:
        try:
            size = page_size(request.page_size)
            after = decode_page_token(request.page_token)
            names = [n for n in self.registry.names() if n > after]
            page = names[:size]
            resp = wpb.ListWorkflowsResponse()
            for name in page:
                item = self.registry.get(name)
                resp.workflows.append(
                    workflow_message(
                        name, item.workflow, builtin=item.builtin, update_time=item.update_time
                    )
                )
            if len(names) > size:
                resp.next_page_token = encode_page_token(page[-1])
            return resp
        except Exception as exc:
            await abort(context, exc)

    async def GetWorkflow(self, request: wpb.GetWorkflowRequest, context: Context) -> wpb.Workflow:
        try:
            item = self.registry.get(request.name)
            return workflow_message(
                request.name, item.workflow, builtin=item.builtin, update_time=item.update_time
            )
        except Exception as exc:
            await abort(context, exc)

    async def RegisterWorkflow(
        self, request: wpb.RegisterWorkflowRequest, context: Context
    ) -> wpb.Workflow:
        try:
            check_name(request.name)
            if not request.HasField("definition"):
                raise ApiError(
                    "REQUEST_INVALID",
                    "definition is required",
                    [("definition", "required")],
                )
            try:
                wf = WorkflowBuilder.from_definition(definition_dict(request.definition)).build()
            except WorkflowValidationError as exc:
                raise ApiError(
                    "WORKFLOW_INVALID",
                    str(exc),
                    [(_problem_path(p, request.definition), p.message) for p in exc.problems],
                ) from exc
            if not wf.exposable and not self.allow_code_nodes:
                code_nodes = [n.id for n in wf.nodes.values() if not n.exposable]
                index = {n.id: i for i, n in enumerate(request.definition.nodes)}
                raise ApiError(
                    "CODE_NODES_DISABLED",
                    "this server does not accept code-bearing nodes in workflows registered "
                    f"over the network (nodes: {', '.join(code_nodes)}); start it with "
                    "allow_code_nodes=True to allow them",
                    [(f"definition.nodes[{index[n]}].type", "runs code") for n in code_nodes],
                )
            if request.name in self.registry:
                existing = self.registry.get(request.name)
                if existing.builtin:
                    raise ApiError(
                        "WORKFLOW_NOT_DELETABLE",
                        f"workflow {request.name!r} is defined by the app's code and cannot "
                        "be replaced over the network",
                    )
                if not request.replace and _same_definition(existing.workflow, wf):
                    # the same definition again: a retry, answered with what is registered
                    return workflow_message(
                        request.name,
                        existing.workflow,
                        builtin=False,
                        update_time=existing.update_time,
                    )
            if request.validate_only:
                if request.name in self.registry and not request.replace:
                    self.registry.add(request.name, wf, builtin=False, replace=False)
                now = _dt.datetime.now(_dt.UTC)
                return workflow_message(request.name, wf, builtin=False, update_time=now)
            item = self.registry.add(request.name, wf, builtin=False, replace=request.replace)
            return workflow_message(request.name, wf, builtin=False, update_time=item.update_time)
        except Exception as exc:
            await abort(context, exc)

    async def DeleteWorkflow(
        self, request: wpb.DeleteWorkflowRequest, context: Context
    ) -> empty_pb2.Empty:
        try:
            item = self.registry.get(request.name)
            if item.builtin:
                raise ApiError(
                    "WORKFLOW_NOT_DELETABLE",
                    f"workflow {request.name!r} is defined by the app's code and cannot be "
                    "deleted over the network",
                )
            self.registry.remove(request.name)
            return empty_pb2.Empty()
        except Exception as exc:
            await abort(context, exc)

    async def ExecuteWorkflow(
        self, request: wpb.ExecuteWorkflowRequest, context: Context
    ) -> wpb.Execution:
        try:
            item = self.registry.get(request.name)
            rec = await self.executions.execute(
                request.name,
                item.workflow,
                from_struct(request.inputs, "inputs"),
                caller=caller_of(context),
                request_id=request.request_id,
            )
            if rec.state != "SUCCEEDED" and rec.error:
                # the call fails with the execution's error; the record keeps the details
                raise StatusError(status_message(rec.error), execution_id=rec.id)
            return execution_message(rec)
        except Exception as exc:
            await abort(context, exc)

    async def StreamExecution(
        self, request: wpb.StreamExecutionRequest, context: Context
    ) -> AsyncIterator[wpb.ExecutionEvent]:
        try:
            item = self.registry.get(request.name)
            run, rec, owner = await self.executions.start(
                request.name,
                item.workflow,
                from_struct(request.inputs, "inputs"),
                caller=caller_of(context),
                request_id=request.request_id,
            )
        except Exception as exc:
            await abort(context, exc)
        try:
            async for ev in self._events(run, rec):
                yield ev
        except BaseException:
            if owner and run is not None and run.task is not None and not run.task.done():
                run.task.cancel()  # the client went away: stop its execution
            raise

    async def WatchExecution(
        self, request: wpb.WatchExecutionRequest, context: Context
    ) -> AsyncIterator[wpb.ExecutionEvent]:
        try:
            rec = await self.executions.get(request.id)
        except Exception as exc:
            await abort(context, exc)
        async for ev in self._events(self.executions.running.get(rec.id), rec):
            yield ev

    async def _events(
        self, run: RunningExecution | None, rec: Any
    ) -> AsyncIterator[wpb.ExecutionEvent]:
        if run is None:  # finished already: only the final event
            yield _final_event(rec, 1)
            return
        async for seq, event in run.watch():
            if event.kind.terminal:
                await run.wait()
                yield _final_event(run.record, seq)
                return
            yield _event_message(event, seq, rec)

    async def GetExecution(
        self, request: wpb.GetExecutionRequest, context: Context
    ) -> wpb.Execution:
        try:
            return execution_message(await self.executions.get(request.id))
        except Exception as exc:
            await abort(context, exc)

    async def ListExecutions(
        self, request: wpb.ListExecutionsRequest, context: Context
    ) -> wpb.ListExecutionsResponse:
        try:
            state = ""
            if request.state:
                if request.state not in wpb.Execution.State.values():
                    raise ApiError(
                        "REQUEST_INVALID",
                        f"state {request.state} is not an Execution.State",
                        [("state", "unknown value")],
                    )
                state = wpb.Execution.State.Name(request.state).removeprefix("STATE_")
            await self.executions.writer.drain()  # list what has been recorded
            records, token = await self.executions.store.list_executions(
                request.workflow or None,
                state or None,
                page_size(request.page_size),
                request.page_token,
            )
            return wpb.ListExecutionsResponse(
                executions=[execution_message(r) for r in records], next_page_token=token
            )
        except Exception as exc:
            await abort(context, exc)

    async def CancelExecution(
        self, request: wpb.CancelExecutionRequest, context: Context
    ) -> wpb.Execution:
        try:
            return execution_message(await self.executions.cancel(request.id))
        except Exception as exc:
            await abort(context, exc)


def _same_definition(a: Workflow, b: Workflow) -> bool:
    try:
        return a.to_definition() == b.to_definition()
    except TypeError:  # one of them holds Python callables: not comparable, not the same
        return False


def _problem_path(p: Problem, d: wpb.WorkflowDefinition) -> str:
    """The request field a build problem is about, as the contract spells field paths
    (`definition.nodes[2].params.email`, `definition.connections[0]`, ...)."""
    nodes = {n.id: i for i, n in enumerate(d.nodes)}
    if p.node in nodes:
        where = f"definition.nodes[{nodes[p.node]}]"
        if not p.field:
            return where
        return f"{where}.params" if p.field == "params" else f"{where}.params.{p.field}"
    if p.node:  # a connection names a node that does not exist
        for i, c in enumerate(d.connections):
            if p.node in (c.source, c.target):
                return f"definition.connections[{i}]"
        return "definition.nodes"
    if p.field.split("[")[0] in ("nodes", "connections", "inputs"):
        return f"definition.{p.field}"  # a malformed entry of the definition itself
    inputs = [i for i, x in enumerate(d.inputs) if x.name == p.field]
    if inputs:
        return f"definition.inputs[{inputs[0]}]"
    return "definition"


def _final_event(rec: Any, seq: int) -> wpb.ExecutionEvent:
    msg = wpb.ExecutionEvent(execution_id=rec.id, sequence=seq)
    msg.time.FromDatetime(rec.end_time or _dt.datetime.now(_dt.UTC))
    field = {
        "SUCCEEDED": "execution_completed",
        "CANCELLED": "execution_cancelled",
    }.get(rec.state, "execution_failed")
    getattr(msg, field).execution.CopyFrom(execution_message(rec))
    return msg


def _duration(seconds: float | None) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromTimedelta(_dt.timedelta(seconds=seconds or 0.0))
    return d


def _event_message(event: Event, seq: int, rec: Any) -> wpb.ExecutionEvent:
    msg = wpb.ExecutionEvent(execution_id=event.execution_id, sequence=seq)
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(_dt.datetime.fromtimestamp(event.timestamp, _dt.UTC))
    msg.time.CopyFrom(ts)
    kind = event.kind
    if kind is EventKind.EXECUTION_STARTED:
        msg.execution_started.workflow = rec.workflow
        msg.execution_started.inputs.CopyFrom(to_struct(rec.inputs))
    elif kind is EventKind.NODE_STARTED:
        msg.node_started.node_id = event.node_id or ""
        msg.node_started.node_type = event.node_type or ""
    elif kind is EventKind.NODE_COMPLETED:
        nc = msg.node_completed
        nc.node_id, nc.node_type = event.node_id or "", event.node_type or ""
        nc.duration.CopyFrom(_duration(event.duration))
        # outputs that are not JSON still complete the node; the final event says why
        with contextlib.suppress(TypeError):
            nc.outputs.CopyFrom(to_struct(event.outputs or {}))
    elif kind is EventKind.NODE_FAILED:
        nf = msg.node_failed
        nf.node_id, nf.node_type = event.node_id or "", event.node_type or ""
        nf.duration.CopyFrom(_duration(event.duration))
        if event.error is not None:
            nf.error.CopyFrom(to_api_error(event.error).to_status())
    return msg
