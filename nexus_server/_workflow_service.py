"""WorkflowService: registration, execution, streaming and execution records."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, empty_pb2, timestamp_pb2

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from workflow import (
    Event,
    EventKind,
    InvalidInputsError,
    Problem,
    Workflow,
    WorkflowBuilder,
    WorkflowValidationError,
    node_types,
)

from ._bus import Bus
from ._convert import (
    decode_page_token,
    definition_dict,
    encode_page_token,
    execution_message,
    page_size,
    status_message,
    to_struct,
    workflow_inputs,
    workflow_message,
)
from ._errors import ApiError, StatusError, abort, brief, to_api_error
from ._executions import Executions, RunningExecution
from ._limits import Limits
from ._queue import ExecutionQueue, check_mode
from ._registry import Registered, WorkflowRegistry, check_name, shown
from ._remote import RemoteExecutions
from ._store import RUNNING_STATES
from ._workflow_store import WorkflowStore
from .gateway import (
    CACHE_HEADER,
    CURRENT_PRINCIPAL,
    Gateway,
    Principal,
    ResponseCache,
    caller_id,
)

__all__ = ["WorkflowServicer"]

# grpc ships no type information: its servicer context is Any to the type checker
Context: TypeAlias = Any


class WorkflowServicer(wgrpc.WorkflowServiceServicer):
    """Implements nexus.workflow.v1.WorkflowService over the registry and executions."""

    def __init__(
        self,
        registry: WorkflowRegistry,
        executions: Executions,
        *,
        allow_code_nodes: bool,
        gateway: Gateway,
        limits: Limits | None = None,
        responses: ResponseCache | None = None,
        workflows: WorkflowStore | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.registry = registry
        #: where workflows registered over the network are stored (None: memory only)
        self.workflows = workflows
        #: watch and cancel of executions other replicas run (`_remote`)
        self.remote = RemoteExecutions(executions, bus, _event_message)
        #: replies of workflows registered with cache_ttl (gateway._response_cache)
        self.responses = responses if responses is not None else ResponseCache()
        self.executions = executions
        self.allow_code_nodes = allow_code_nodes
        self.gateway = gateway
        self.limits = limits or Limits()
        #: asynchronous executions (`_queue.py`); set by the app when it serves
        self.queue: ExecutionQueue | None = None

    async def ListWorkflows(
        self, request: wpb.ListWorkflowsRequest, context: Context
    ) -> wpb.ListWorkflowsResponse:
        try:
            size = page_size(request.page_size)
            after = decode_page_token(request.page_token)
            me = principal()
            names = [
                n for n in self.registry.names() if n > after and self.gateway.may_execute(me, n)
            ]
            resp = wpb.ListWorkflowsResponse()
            budget = self.limits.max_list_bytes
            for name in names[:size]:
                item = self.registry.get(name)
                msg = _message(name, item)
                # a page ends early rather than outgrow the budget (every page holds one
                # workflow at least, so a listing always makes progress)
                cost = msg.ByteSize() + 8  # the field's tag and length
                if resp.workflows and cost > budget:
                    break
                budget -= cost
                resp.workflows.append(msg)
            if len(resp.workflows) < len(names):
                resp.next_page_token = encode_page_token(resp.workflows[-1].name)
            return resp
        except Exception as exc:
            await abort(context, exc)

    async def GetWorkflow(self, request: wpb.GetWorkflowRequest, context: Context) -> wpb.Workflow:
        try:
            return _message(request.name, self.registry.get(request.name))
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
            # every check that costs next to nothing comes before any parsing: a refused
            # definition never reaches the parser, however large it is
            _check_definition_size(request.definition, self.limits)
            _check_node_types(request.definition, self.limits, self.allow_code_nodes)
            self.registry.check_room(request.name, self.limits.max_workflows)
            wf = await self._build(request.definition)
            if not wf.exposable and not self.allow_code_nodes:
                # a node class whose instances decide for themselves (see Node.exposable)
                code_nodes = [n.id for n in wf.nodes.values() if not n.exposable]
                index = {n.id: i for i, n in enumerate(request.definition.nodes)}
                raise _code_nodes_disabled(
                    [(index[n], n) for n in code_nodes],
                )
            if request.name in self.registry:
                existing = self.registry.get(request.name)
                _check_owner(existing, request.name, "replace")
                if not request.replace and _same_definition(existing.workflow, wf):
                    # the same definition again: a retry, answered with what is registered
                    return _message(request.name, existing)
            if request.validate_only:
                if request.name in self.registry and not request.replace:
                    self.registry.add(request.name, wf, builtin=False, replace=False)
                now = _dt.datetime.now(_dt.UTC)
                return workflow_message(
                    request.name, wf, builtin=False, update_time=now, owner=caller_id()
                )
            if self.workflows is not None:
                item = await self.workflows.put(
                    request.name,
                    wf,
                    caller_id(),
                    replace=request.replace,
                    limit=self.limits.max_workflows,
                    check_owner=lambda owner: _check_owner_id(owner, request.name, "replace"),
                )
                return _message(request.name, item)
            item = self.registry.add(
                request.name,
                wf,
                builtin=False,
                replace=request.replace,
                limit=self.limits.max_workflows,
                owner=caller_id(),
            )
            return _message(request.name, item)
        except Exception as exc:
            await abort(context, exc)

    async def _build(self, definition: wpb.WorkflowDefinition) -> Workflow:
        """Validate `definition` in a worker thread, within `registration_timeout`.

        Converting, parsing and compiling a definition's code is CPU work in proportion
        to its size: on the event loop it would hold up every other call meanwhile.
        """
        loop = asyncio.get_running_loop()
        timeout = self.limits.registration_timeout
        try:
            async with asyncio.timeout(timeout):
                return await loop.run_in_executor(_VALIDATION, _build_definition, definition)
        except TimeoutError:
            raise ApiError(
                "WORKFLOW_INVALID",
                f"the definition took longer than {timeout:g} s to validate "
                "(Limits.registration_timeout); make it smaller",
                [("definition", "too costly to validate")],
                {"limit": "registration_timeout"},
            ) from None

    async def DeleteWorkflow(
        self, request: wpb.DeleteWorkflowRequest, context: Context
    ) -> empty_pb2.Empty:
        try:
            if self.workflows is not None and request.name not in self.registry:
                check_name(request.name)  # may be stored by a replica this one has not heard
            else:
                _check_owner(self.registry.get(request.name), request.name, "delete")
            if self.workflows is not None:
                await self.workflows.delete(
                    request.name, lambda owner: _check_owner_id(owner, request.name, "delete")
                )
            else:
                self.registry.remove(request.name)
            return empty_pb2.Empty()
        except Exception as exc:
            await abort(context, exc)

    async def StartExecution(
        self, request: wpb.StartExecutionRequest, context: Context
    ) -> wpb.Execution:
        try:
            return await self._enqueue(request.name, request.inputs, request.request_id)
        except Exception as exc:
            await abort(context, _no_inputs_hint(exc, request.inputs))

    async def _enqueue(self, name: str, inputs: Any, request_id: str) -> wpb.Execution:
        """Queue an asynchronous execution and return it (state QUEUED)."""
        item = self.registry.get(name)
        if self.queue is None:
            raise ApiError("SERVER_UNAVAILABLE", "asynchronous executions are not served yet")
        rec = await self.queue.enqueue(
            name,
            item.workflow,
            workflow_inputs(item.workflow, inputs),
            caller=caller_id(),
            request_id=request_id,
        )
        return execution_message(rec)

    async def ExecuteWorkflow(
        self, request: wpb.ExecuteWorkflowRequest, context: Context
    ) -> wpb.Execution:
        try:
            if request.mode and check_mode(request.mode):
                return await self._enqueue(request.name, request.inputs, request.request_id)
            item = self.registry.get(request.name)
            key: tuple[Any, ...] | None = None
            if item.cache_ttl is not None and not request.request_id:
                me = principal()
                key = self.responses.key(
                    request.name,
                    item.update_time,
                    me.id,
                    me.tenant,
                    request.inputs.SerializeToString(deterministic=True),
                )
                cached = self.responses.get(key)
                if cached is not None:
                    await context.send_initial_metadata(((CACHE_HEADER, "hit"),))
                    return wpb.Execution.FromString(cached)
            rec = await self.executions.execute(
                request.name,
                item.workflow,
                workflow_inputs(item.workflow, request.inputs),
                caller=caller_id(),
                request_id=request.request_id,
            )
            if rec.state != "SUCCEEDED" and rec.error:
                # the call fails with the execution's error; the record keeps the details
                raise StatusError(status_message(rec.error), execution_id=rec.id)
            reply = execution_message(rec)
            if key is not None and item.cache_ttl is not None and rec.state == "SUCCEEDED":
                self.responses.put(key, reply.SerializeToString(), item.cache_ttl)
                await context.send_initial_metadata(((CACHE_HEADER, "miss"),))
            return reply
        except Exception as exc:
            await abort(context, _no_inputs_hint(exc, request.inputs))

    async def StreamExecution(
        self, request: wpb.StreamExecutionRequest, context: Context
    ) -> AsyncIterator[wpb.ExecutionEvent]:
        try:
            item = self.registry.get(request.name)
            run, rec, owner = await self.executions.start(
                request.name,
                item.workflow,
                workflow_inputs(item.workflow, request.inputs),
                caller=caller_id(),
                request_id=request.request_id,
            )
        except Exception as exc:
            await abort(context, _no_inputs_hint(exc, request.inputs))
        try:
            async for ev in self._events(run, rec, context):
                yield ev
        except BaseException:
            if owner and run is not None and run.task is not None and not run.task.done():
                run.task.cancel()  # the client went away: stop its execution
            raise

    async def WatchExecution(
        self, request: wpb.WatchExecutionRequest, context: Context
    ) -> AsyncIterator[wpb.ExecutionEvent]:
        try:
            rec = await self.executions.get(request.id, _owner_filter())
            if rec.state == "QUEUED" and self.queue is not None:
                rec = await self.queue.left_queue(rec)  # then followed where it runs
        except Exception as exc:
            await abort(context, exc)
        async for ev in self._events(self.executions.running.get(rec.id), rec, context):
            yield ev

    async def _events(
        self, run: RunningExecution | None, rec: Any, context: Context
    ) -> AsyncIterator[wpb.ExecutionEvent]:
        if run is None and rec.state in RUNNING_STATES:  # run by another replica
            try:
                async for message, seq, final in self.remote.watch(rec):
                    if final is not None:
                        yield _final_event(final, seq)
                    elif message is not None:
                        yield message
            except Exception as exc:  # its record could not be read (the database)
                await abort(context, exc)
            return
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
            rec = await self.executions.get(request.id, _owner_filter())
            if request.workflow and rec.workflow != request.workflow:
                # the status route names the workflow: another's execution is not there
                raise ApiError(
                    "EXECUTION_NOT_FOUND",
                    f"execution {brief(request.id)} of workflow {brief(request.workflow)} "
                    "not found",
                    [("id", "no execution of this workflow has this id")],
                )
            return execution_message(rec)
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
            if "\x00" in request.workflow or len(request.workflow) > 128:
                raise ApiError(
                    "REQUEST_INVALID",
                    "workflow is not a workflow name",
                    [("workflow", "contains NUL or is longer than 128 characters")],
                )
            await self.executions.drain()  # list what has been recorded
            records, token = await self.executions.store.list_executions(
                request.workflow or None,
                state or None,
                page_size(request.page_size),
                request.page_token,
                _owner_filter(),
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
            owner = _owner_filter()
            elsewhere = self.remote.bus is not None or self.queue is not None
            if elsewhere and request.id not in self.executions.running:
                rec = await self.executions.get(request.id, owner)
                if rec.state == "QUEUED" and self.queue is not None:
                    # not claimed yet: cancelled in the queue
                    cancelled = await self.queue.cancel_queued(rec.id)
                    if cancelled is not None:
                        return execution_message(cancelled)
                elif rec.state == "RUNNING" and self.remote.bus is not None:
                    # run by another replica
                    return execution_message(await self.remote.cancel(rec))
            return execution_message(await self.executions.cancel(request.id, owner))
        except Exception as exc:
            await abort(context, exc)


def principal() -> Principal:
    """The principal of the call being served (set by the gateway chain)."""
    found = CURRENT_PRINCIPAL.get()
    if found is None:
        raise RuntimeError("no principal: the call did not pass the gateway chain")
    return found


def _owner_filter() -> str | None:
    """Whose executions the caller sees: its own, or (an admin) everyone's (None)."""
    me = principal()
    return None if me.is_admin else me.id


def _check_owner(item: Registered, name: str, verb: str) -> None:
    """Only a workflow's registrant, or an admin, may replace or delete it (`verb`), and
    nobody one the app's code defines."""
    if item.builtin:
        raise ApiError(
            "WORKFLOW_NOT_DELETABLE",
            f"workflow {brief(name)} is defined by the app's code and cannot be {verb}d over "
            "the network",
        )
    _check_owner_id(item.owner, name, verb)


def _check_owner_id(owner: str, name: str, verb: str) -> None:
    """`_check_owner` for a workflow registered by `owner`."""
    me = principal()
    if not me.is_admin and owner != me.id:
        raise ApiError(
            "PERMISSION_DENIED",
            f"permission denied: only the principal that registered workflow {brief(name)} "
            f"or an admin may {verb} it",
            metadata={"permission": "admin"},
        )


def _message(name: str, item: Registered) -> wpb.Workflow:
    return workflow_message(
        name, item.workflow, builtin=item.builtin, update_time=item.update_time, owner=item.owner
    )


#: Where definitions are validated: two threads, so that one slow registration does not
#: queue every other one behind it, and no more, so that a burst of them cannot take
#: the CPU from the calls the event loop serves.
_VALIDATION = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nexus-validate")

#: Problems and field violations a refused definition reports at most (an error travels
#: in the call's trailers, which gRPC bounds to a few KiB), and characters of each.
_MAX_PROBLEMS = 20
_MESSAGE_PROBLEMS = 5
_MAX_PROBLEM_CHARS = 200


def _cut(text: str, limit: int = _MAX_PROBLEM_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _build_definition(d: wpb.WorkflowDefinition) -> Workflow:
    """The workflow `d` describes (runs in a worker thread: see `_build`)."""
    try:
        return WorkflowBuilder.from_definition(definition_dict(d)).build()
    except WorkflowValidationError as exc:
        problems = exc.problems[:_MAX_PROBLEMS]
        # the message names the first few (an error's message is kept under 768 bytes);
        # the field violations carry up to _MAX_PROBLEMS
        shown = problems[:_MESSAGE_PROBLEMS]
        lines = [f"  - {_cut(str(p), 110)}" for p in shown]
        if len(exc.problems) > len(shown):
            lines.append(f"  ... and {len(exc.problems) - len(shown)} more")
        raise ApiError(
            "WORKFLOW_INVALID",
            f"workflow is invalid ({len(exc.problems)} problem(s)):\n" + "\n".join(lines),
            [(_cut(_problem_path(p, d)), _cut(p.message)) for p in problems],
        ) from exc


def _too_large(field: str, what: str, size: int, limit: int, name: str) -> ApiError:
    return ApiError(
        "REQUEST_INVALID",
        f"{what} is {size:,}; this server accepts at most {limit:,} (Limits.{name})",
        [(field, f"more than {limit:,}")],
        {"limit": name, "max": str(limit)},
    )


def _check_definition_size(d: wpb.WorkflowDefinition, limits: Limits) -> None:
    """Refuse a definition above the size limits (no parsing: counts only)."""
    checks = (
        ("definition", "the definition's size in bytes", d.ByteSize(), "max_definition_bytes"),
        ("definition.nodes", "the number of nodes", len(d.nodes), "max_workflow_nodes"),
        (
            "definition.connections",
            "the number of connections",
            len(d.connections),
            "max_workflow_connections",
        ),
    )
    for field, what, value, name in checks:
        limit: int = getattr(limits, name)
        if value > limit:
            raise _too_large(field, what, value, limit, name)


def _check_node_types(d: wpb.WorkflowDefinition, limits: Limits, allow_code: bool) -> None:
    """Refuse code-bearing nodes by their TYPE (before any code is parsed) when code is
    not allowed, and code longer than `max_code_chars` when it is. Unknown types are
    left to the full validation, which reports them with the rest."""
    types = node_types()
    refused: list[tuple[int, str]] = []
    for i, n in enumerate(d.nodes):
        cls = types.get(n.type)
        if cls is None:
            continue
        if not cls.exposable and not allow_code:
            refused.append((i, n.id))
            continue
        for param in cls.code_params:
            value = n.params.fields.get(param)
            if value is None or value.WhichOneof("kind") != "string_value":
                continue
            chars = len(value.string_value)
            if chars > limits.max_code_chars:
                raise _too_large(
                    f"definition.nodes[{i}].params.{param}",
                    f"the code of node {shown(n.id)} in characters",
                    chars,
                    limits.max_code_chars,
                    "max_code_chars",
                )
    if refused:
        raise _code_nodes_disabled(refused)


def _code_nodes_disabled(nodes: list[tuple[int, str]]) -> ApiError:
    """CODE_NODES_DISABLED for `(index, node id)` pairs (the first few are named)."""
    named = ", ".join(shown(nid) for _, nid in nodes[:5])
    more = f" and {len(nodes) - 5} more" if len(nodes) > 5 else ""
    return ApiError(
        "CODE_NODES_DISABLED",
        "this server does not accept code-bearing nodes in workflows registered "
        f"over the network (nodes: {named}{more}); start it with "
        "allow_code_nodes=True to allow them",
        [(f"definition.nodes[{i}].type", "runs code") for i, _ in nodes[:_MAX_PROBLEMS]],
    )


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


#: Appended to INPUTS_INVALID when a call sent no inputs at all: the usual cause is
#: inputs sent beside `inputs` instead of inside it (a REST body without the wrapper,
#: whose unknown top-level fields the transcoder drops).
NO_INPUTS_HINT = (
    'no inputs were sent: they go inside the request\'s "inputs" field, as in '
    '{"inputs": {"name": "John Doe"}}'
)


def _no_inputs_hint(exc: Exception, inputs: Any) -> Exception:
    """`exc` with `NO_INPUTS_HINT` added when it is INPUTS_INVALID and `inputs` is empty."""
    if len(inputs.fields):
        return exc
    if isinstance(exc, InvalidInputsError):
        error = to_api_error(exc)
    elif isinstance(exc, ApiError) and exc.reason == "INPUTS_INVALID":
        error = exc
    else:
        return exc
    return ApiError(
        error.reason,
        f"{error.message} ({NO_INPUTS_HINT})",
        [*error.violations, ("inputs", NO_INPUTS_HINT)],
        error.metadata,
    )
