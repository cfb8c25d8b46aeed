"""The `nexus` command tree, generated from the server's descriptors.

Static commands (`workflows`, `executions`, `models`, `call`) use the generated stubs.
`nexus run NAME` has one typed flag per input of the workflow (from `GetWorkflow`), and
every model has a command group named after its collection (`nexus contacts ...`, from
`ListModels`), so a workflow or model added on the server appears with no client change.
"""

from __future__ import annotations

import contextvars
import copy
import enum
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import grpc
import typer
from typer.core import TyperGroup

from .._grpc import (
    CREDENTIAL,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_USAGE,
    ApiFailure,
    Credential,
    call_metadata,
    exact,
    in_order,
    order_values,
    server_address,
    set_channel,
    struct_of,
    to_json,
    type_spec,
)
from ._credentials import (
    CredentialError,
    Resolved,
    StoredLoginError,
    checked,
    forget,
    looks_like_jwt,
    resolve,
    store,
    with_call_metadata,
)
from ._output import emit, emit_rows, emit_value, err
from ._style import tidy_help

__all__ = ["app", "build_field_params", "build_input_params", "exit_code_of"]

#: Deadline of the calls that only list commands for `--help` and completion.
_DISCOVERY_TIMEOUT = 3.0

#: Reasons of a failed execution: the call failed, the input was fine (exit 1).
_EXECUTION_REASONS = {
    "NODE_FAILED",
    "EXECUTION_TIMEOUT",
    "EXECUTION_CANCELLED",
    "EXECUTION_INTERRUPTED",
    "EXECUTION_LOST",
    "INTERNAL_ERROR",
}


def exit_code_of(failure: ApiFailure) -> int:
    """The exit code of a failed call (see docs/cli.md)."""
    if failure.reason in _EXECUTION_REASONS:
        return EXIT_FAILED
    return failure.exit_code


# ---------------------------------------------------------------------------- state


@dataclass
class State:
    """The root options and the lazily opened channel and stubs."""

    server: str
    output: str = "table"
    timeout: float | None = None
    #: where the credential of this command came from (`--token`, `stored login`, ...)
    credential_source: str = ""
    #: the help listing already said it needs a credential (said once per command)
    told_login: bool = False
    #: why the stored login cannot be used (told when a call would send it)
    credential_problem: str = ""
    _channel: grpc.Channel | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def channel(self) -> grpc.Channel:
        if self.credential_problem and CREDENTIAL.get() is None:
            usage(self.credential_problem)
        if self._channel is None:
            self._channel = with_call_metadata(grpc.insecure_channel(self.server))
        return self._channel

    @property
    def workflows(self) -> Any:
        from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg

        return wg.WorkflowServiceStub(self.channel)  # type: ignore[no-untyped-call]

    @property
    def models(self) -> Any:
        from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg

        return mg.ModelServiceStub(self.channel)  # type: ignore[no-untyped-call]

    @property
    def auth(self) -> Any:
        from nexus_api.nexus.auth.v1 import auth_service_pb2_grpc as ag

        return ag.AuthServiceStub(self.channel)  # type: ignore[no-untyped-call]

    @property
    def audit(self) -> Any:
        from nexus_api.nexus.audit.v1 import audit_service_pb2_grpc as dg

        return dg.AuditServiceStub(self.channel)  # type: ignore[no-untyped-call]

    def rpc(self, fn: Callable[..., Any], request: Any, *, timeout: float | None = None) -> Any:
        """Call a unary RPC; a failure becomes `ApiFailure`."""
        try:
            return fn(request, timeout=timeout or self.timeout, metadata=call_metadata())
        except grpc.RpcError as exc:
            raise ApiFailure.from_rpc_error(exc) from None

    def model_list(self, timeout: float | None = None) -> list[Any]:
        """Every model the server serves (cached for this command)."""
        if "models" not in self._cache:
            from nexus_api.nexus.model.v1 import model_service_pb2 as m

            models: list[Any] = []
            token = ""
            while True:
                resp = self.rpc(
                    self.models.ListModels,
                    m.ListModelsRequest(page_size=1000, page_token=token),
                    timeout=timeout,
                )
                models += list(resp.models)
                token = resp.next_page_token
                if not token:
                    break
            self._cache["models"] = models
        result: list[Any] = self._cache["models"]
        return result


#: Where this command's credential came from, for the messages of a refused call (read
#: after click's context is gone, when a failure reaches `main`).
_SOURCE: contextvars.ContextVar[str] = contextvars.ContextVar("nexus_cli_source", default="")


def _root_ctx(ctx: Any) -> Any:
    while ctx.parent is not None:
        ctx = ctx.parent
    return ctx


def state_of(ctx: Any) -> State:
    """The `State` of this invocation, made from the root options on first use.

    Dynamic commands are resolved before the root callback runs, so this reads the
    parsed root parameters directly.
    """
    root = _root_ctx(ctx)
    st = root.meta.get("nexus.state")
    if st is None:
        params = root.params
        server = server_address(params.get("server"))
        problem = ""
        try:
            resolved = resolve(server, params.get("token"), params.get("api_key"))
        except StoredLoginError as exc:
            # told when a call needs it: `login` and `logout` still work, to mend it
            resolved, problem = Resolved(None), str(exc)
        except CredentialError as exc:
            usage(str(exc))
        # set once: every call of this command sends it (`call_metadata()`)
        CREDENTIAL.set(resolved.credential)
        _SOURCE.set(resolved.source)
        st = State(
            server,
            _output_name(params.get("output")),
            params.get("timeout"),
            resolved.source,
            credential_problem=problem,
        )
        root.meta["nexus.state"] = st
    assert isinstance(st, State)
    return st


def _output_name(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value or "table")


def fail(failure: ApiFailure) -> NoReturn:
    err(render_failure(failure))
    raise SystemExit(exit_code_of(failure))


def render_failure(failure: ApiFailure) -> str:
    """`error: CODE (REASON): message`, and for a refused credential how to give one."""
    text = f"error: {failure.render()}"
    hint = _credential_hint(failure.code)
    return f"{text}\n  {hint}" if hint else text


def _credential_hint(code: str) -> str:
    """What to do about UNAUTHENTICATED / PERMISSION_DENIED, naming where the credential
    came from (never the credential)."""
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return ""
    source = _SOURCE.get()
    if code == "PERMISSION_DENIED":
        return "the credential is valid but lacks this right; nexus whoami shows its roles"
    if CREDENTIAL.get() is None:
        return f"no credential was sent: {_LOGIN_HOWTO}"
    where = f" (from {source})" if source else ""
    return f"the credential{where} was refused: {_LOGIN_HOWTO}"


_LOGIN_HOWTO = "run nexus login, or give --token/--api-key (or set NEXUS_TOKEN/NEXUS_API_KEY)"


def _tell_login(ctx: Any, failure: ApiFailure) -> None:
    """While listing commands for help: one line on stderr when the server wants a
    credential (the static commands are still listed)."""
    if failure.code != "UNAUTHENTICATED":
        return
    st = state_of(ctx)
    if st.told_login:
        return
    st.told_login = True
    reason = f" ({failure.reason})" if failure.reason else ""
    what = "no credential was sent" if CREDENTIAL.get() is None else "the credential was refused"
    err(
        f"note: {st.server} lists its workflows and models only to a known caller and "
        f"{what}{reason}: {_LOGIN_HOWTO}"
    )


def usage(message: str, code: int = EXIT_USAGE) -> NoReturn:
    err(f"error: {message}")
    raise SystemExit(code)


def read_json_arg(text: str, what: str) -> Any:
    """JSON from an argument: inline text, `@path` for a file or `-` for stdin."""
    try:
        if text == "-":
            text = sys.stdin.read()
        elif text.startswith("@"):
            text = Path(text[1:]).read_text(encoding="utf-8")
        return json.loads(text)
    except OSError as exc:
        usage(f"{what}: cannot read {text[1:]!r}: {exc.strerror}")
    except json.JSONDecodeError as exc:
        usage(f"{what}: not valid JSON: {exc}")


def _json_object(text: str | None, what: str) -> dict[str, Any]:
    if text is None:
        return {}
    value = read_json_arg(text, what)
    if not isinstance(value, dict):
        usage(f"{what}: expected a JSON object")
    return value


# ---------------------------------------------------------------------------- params

_KW = inspect.Parameter.KEYWORD_ONLY
_CTX = inspect.Parameter("nexus_ctx", _KW, annotation=typer.Context)


def _flag_names(name: str) -> list[str]:
    dashed = "--" + name.replace("_", "-")
    return [dashed] if dashed == f"--{name}" else [dashed, f"--{name}"]


def _option(
    pname: str,
    flags: list[str],
    python: Any,
    help_text: str,
    *,
    metavar: str | None = None,
    parser: Callable[[Any], Any] | None = None,
) -> inspect.Parameter:
    """A keyword parameter typer turns into an option (absent means None: not sent)."""
    info = typer.Option(*flags, help=help_text, metavar=metavar, show_default=False, parser=parser)
    return inspect.Parameter(pname, _KW, default=None, annotation=Annotated[python | None, info])


class _Null:
    """The value of a nullable flag given as `null`: sent as JSON null."""

    def __repr__(self) -> str:
        return "null"


#: `--company null` on a nullable field or input.
NULL = _Null()

#: The text that stands for the literal four letters `null` on a nullable flag.
LITERAL_NULL = "\\null"


def nullable_parser(python: type) -> Callable[[Any], Any]:
    """The parser of a nullable flag: `null` is JSON null (`NULL`), `\\null` the text
    "null", anything else is read as `python` (`int`, `float` or `str`)."""

    def parse(text: Any) -> Any:
        if not isinstance(text, str):  # already parsed
            return text
        if text == "null":
            return NULL
        value = "null" if text == LITERAL_NULL else text
        return python(value)

    parse.__name__ = f"{python.__name__}|null"
    return parse


@dataclass(frozen=True)
class FlagSpec:
    """One generated option: the value's key, its flags, type and help (for tests too)."""

    key: str
    flags: list[str]
    python: type
    help: str
    is_json: bool
    nullable: bool = False

    def parameter(self) -> inspect.Parameter:
        if self.is_json:
            return _option(self.pname, self.flags, self.python, self.help, metavar="JSON")
        if self.nullable and self.python is not bool:
            parse = nullable_parser(self.python)
            meta = f"<{parse.__name__}>"
            return _option(self.pname, self.flags, Any, self.help, metavar=meta, parser=parse)
        return _option(self.pname, self.flags, self.python, self.help)

    @property
    def pname(self) -> str:
        """The Python parameter name typer passes the value as."""
        return "in_" + re.sub(r"\W", "_", self.key)


def _flag(name: str, type_name: str, *, nullable: bool, help_text: str) -> FlagSpec:
    spec = type_spec(type_name, nullable=nullable)
    flags = _flag_names(name)
    if spec.python is bool:
        flags = [f"{flags[0]}/--no-{name.replace('_', '-')}"]
    return FlagSpec(name, flags, spec.python, help_text, spec.is_json, spec.nullable)


def _default_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def build_input_params(workflow: Any) -> list[FlagSpec]:
    """One typed option per workflow input, with its type, default and description."""
    out: list[FlagSpec] = []
    for inp in workflow.inputs:
        parts = [inp.description] if inp.description else []
        note = inp.type
        if inp.required:
            note += ", required"
        elif inp.HasField("default"):
            note += f", default: {_default_text(to_json(inp.default))}"
        parts.append(f"({note})")
        out.append(_flag(inp.name, inp.type, nullable=False, help_text=" ".join(parts)))
    return out


def _writable(fld: Any) -> bool:
    return not fld.managed


def build_field_params(model: Any, *, for_update: bool = False) -> list[FlagSpec]:
    """One typed option per writable model field (managed timestamps are left out)."""
    out: list[FlagSpec] = []
    for fld in model.fields:
        if not _writable(fld) or (for_update and fld.primary_key):
            continue
        bits = [fld.description] if fld.description else []
        notes = [fld.type + (" | None" if fld.nullable else "")]
        if fld.primary_key:
            notes.append("primary key" + (", generated" if fld.generated else ""))
        if fld.unique:
            notes.append("unique")
        choices = [str(to_json(v)) for v in fld.enum_values]
        if choices:
            notes.append("one of " + "|".join(choices))
        required = not (fld.nullable or fld.HasField("default") or fld.generated)
        if required and not for_update:
            notes.append("required")
        elif fld.HasField("default") and not for_update:
            notes.append(f"default: {_default_text(to_json(fld.default))}")
        bits.append(f"({', '.join(notes)})")
        out.append(_flag(fld.name, fld.type, nullable=fld.nullable, help_text=" ".join(bits)))
    return out


def _collect(params: dict[str, Any], specs: Iterable[FlagSpec]) -> dict[str, Any]:
    """The flags the user gave, converted (JSON types parsed)."""
    values: dict[str, Any] = {}
    for spec in specs:
        value = params.get(spec.pname)
        if value is None:
            continue
        if value is NULL:
            value = None
        elif spec.is_json:
            value = read_json_arg(value, spec.flags[0])
        values[spec.key] = value
    return values


def _make_command(
    name: str,
    help_text: str,
    params: list[inspect.Parameter],
    fn: Callable[..., None],
) -> Any:
    """A typer command named `name` whose options are `params` (made at run time)."""

    def callback(**kwargs: Any) -> None:
        fn(**kwargs)

    callback.__signature__ = inspect.Signature([_CTX, *params])  # type: ignore[attr-defined]
    sub = typer.Typer(add_completion=False)
    sub.command(name, help=help_text)(callback)
    return typer.main.get_command(sub)


# ---------------------------------------------------------------------------- groups


class NexusGroup(TyperGroup):
    """The root: the static commands, plus one group per model collection."""

    def list_commands(self, ctx: Any) -> list[str]:
        names = list(super().list_commands(ctx))
        try:
            names += sorted(m.collection for m in state_of(ctx).model_list(_DISCOVERY_TIMEOUT))
        except ApiFailure as exc:  # help still works without a server, or a credential
            _tell_login(ctx, exc)
        return names

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None or cmd_name.startswith("-"):
            return cmd
        try:
            models = state_of(ctx).model_list()
        except ApiFailure as exc:
            if ctx.resilient_parsing:
                return None
            fail(exc)
        for model in models:
            if model.collection == cmd_name:
                return finish(_model_group(model), _root_ctx(ctx).command)
        return None


class RunGroup(TyperGroup):
    """`nexus run NAME`: one command per workflow, typed from its inputs."""

    def list_commands(self, ctx: Any) -> list[str]:
        try:
            return [w["name"] for w in _all_workflows(state_of(ctx))]
        except ApiFailure as exc:
            _tell_login(ctx, exc)
            return []

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

        if cmd_name.startswith("-"):
            return None
        st = state_of(ctx)
        try:
            wf = st.rpc(st.workflows.GetWorkflow, w.GetWorkflowRequest(name=cmd_name))
        except ApiFailure as exc:
            if ctx.resilient_parsing:
                return None
            fail(exc)
        return finish(_workflow_command(wf), _root_ctx(ctx).command)


def _all_workflows(st: State) -> list[dict[str, Any]]:
    from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

    out: list[dict[str, Any]] = []
    token = ""
    while True:
        resp = st.rpc(
            st.workflows.ListWorkflows, w.ListWorkflowsRequest(page_size=1000, page_token=token)
        )
        out += to_json(resp).get("workflows", [])
        token = resp.next_page_token
        if not token:
            return out


# ---------------------------------------------------------------------------- executions


_LABEL = {
    "execution_started": "started",
    "node_started": "started",
    "node_completed": "completed",
    "node_failed": "FAILED",
    "execution_completed": "completed",
    "execution_failed": "FAILED",
    "execution_cancelled": "CANCELLED",
}


def follow(stream: Iterable[Any], st: State) -> dict[str, Any]:
    """Print each event of an execution stream on stderr; return the final execution.

    Exits with the execution's error when it failed or was cancelled.
    """
    final: dict[str, Any] | None = None
    kind = ""
    try:
        for event in stream:
            kind = event.WhichOneof("event") or ""
            doc = to_json(event)
            body = doc.get(kind, {})
            seq = doc.get("sequence", "")
            if kind == "execution_started":
                err(f"[{seq}] execution {doc.get('execution_id')} started")
            elif kind.startswith("node_"):
                took = f" in {body['duration']}" if "duration" in body else ""
                node = f"node {body.get('node_id')} ({body.get('node_type')})"
                err(f"[{seq}] {node} {_LABEL[kind]}{took}")
                if kind == "node_failed":
                    err(f"    {body.get('error', {}).get('message', '')}")
            elif kind in _LABEL:
                final = body.get("execution", {})
                err(f"[{seq}] execution {_LABEL[kind]}")
    except grpc.RpcError as exc:
        raise ApiFailure.from_rpc_error(exc) from None
    if final is None:
        raise ApiFailure("UNAVAILABLE", "the stream ended before the execution finished")
    if kind != "execution_completed":
        error = final.get("error", {})
        cancelled = kind == "execution_cancelled"
        failure = ApiFailure(
            "CANCELLED" if cancelled else "ABORTED",
            error.get("message", "the execution did not succeed"),
            "EXECUTION_CANCELLED" if cancelled else "NODE_FAILED",
            {"execution_id": final.get("id", "")},
        )
        _emit_execution(final, st)
        fail(failure)
    return final


def _emit_execution(doc: dict[str, Any], st: State) -> None:
    """An execution: the document, or for people its summary then each node's outputs
    (records as tables, their fields in the model's order)."""
    if "outputs" in doc:
        doc["outputs"] = order_values(doc["outputs"], record_orders(st))
    if st.output != "table":
        emit(doc, st.output)
        return
    keys = ("id", "workflow", "state", "duration", "error")
    emit({k: doc[k] for k in keys if k in doc}, st.output)
    for node, outputs in doc.get("outputs", {}).items():
        emit_value(f"outputs.{node}", outputs)


def record_orders(st: State) -> list[list[str]]:
    """The field names of every model, in declaration order (none without a server)."""
    try:
        return [[f.name for f in m.fields] for m in st.model_list()]
    except ApiFailure:
        return []


#: Flags of the generated commands themselves; an input or field of the same name is
#: given through `--inputs` / `--json` instead.
_RUN_FLAGS = {"--inputs", "--watch", "--async", "--request-id", "--output", "--help"}
_RECORD_FLAGS = {"--json", "--request-id", "--conflict-on", "--output", "--help"}


def _without(specs: list[FlagSpec], reserved: set[str]) -> list[FlagSpec]:
    return [s for s in specs if not reserved.intersection(f.split("/")[0] for f in s.flags)]


def _workflow_command(wf: Any) -> Any:
    specs = _without(build_input_params(wf), _RUN_FLAGS)

    def run(**params: Any) -> None:
        from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

        st = state_of(params["nexus_ctx"])
        inputs = _json_object(params.get("nexus_inputs"), "--inputs")
        inputs.update(_collect(params, specs))
        request_id = params.get("nexus_request_id") or ""
        if params.get("nexus_async"):
            if params.get("nexus_watch"):
                usage(
                    "--async and --watch cannot be combined: follow it with "
                    "`nexus executions watch ID`"
                )
            start = w.StartExecutionRequest(
                name=wf.name, inputs=struct_of(inputs), request_id=request_id
            )
            _emit_execution(to_json(st.rpc(st.workflows.StartExecution, start)), st)
            return
        if params.get("nexus_watch"):
            req = w.StreamExecutionRequest(
                name=wf.name, inputs=struct_of(inputs), request_id=request_id
            )
            stream = st.workflows.StreamExecution(req, timeout=st.timeout, metadata=call_metadata())
            _emit_execution(follow(stream, st), st)
            return
        req2 = w.ExecuteWorkflowRequest(
            name=wf.name, inputs=struct_of(inputs), request_id=request_id
        )
        _emit_execution(to_json(st.rpc(st.workflows.ExecuteWorkflow, req2)), st)

    extra = [
        _option(
            "nexus_inputs",
            ["--inputs"],
            str,
            "inputs as a JSON object (inline, @file.json or - for stdin); flags win",
            metavar="JSON|@FILE|-",
        ),
        inspect.Parameter(
            "nexus_watch",
            _KW,
            default=False,
            annotation=Annotated[
                bool, typer.Option("--watch", help="show node-by-node progress while it runs")
            ],
        ),
        inspect.Parameter(
            "nexus_async",
            _KW,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--async",
                    help="queue it and print the execution at once (state QUEUED); a "
                    "server process runs it: see `nexus executions get ID`",
                ),
            ],
        ),
        _option(
            "nexus_request_id",
            ["--request-id"],
            str,
            "idempotency key: a retry returns the first execution",
        ),
    ]
    help_text = wf.description or f"Run {wf.name}."
    return _make_command(wf.name, help_text, [*(s.parameter() for s in specs), *extra], run)


# ---------------------------------------------------------------------------- models


def _model_group(model: Any) -> Any:
    """`nexus <collection> create|get|update|delete|list|count|upsert|import`, and `search`
    for a model with searchable fields."""
    from nexus_api.nexus.model.v1 import model_service_pb2 as m

    create_specs = _without(build_field_params(model), _RECORD_FLAGS)
    update_specs = _without(build_field_params(model, for_update=True), _RECORD_FLAGS)
    pk = next((f.name for f in model.fields if f.primary_key), "id")
    name = model.name
    names = [f.name for f in model.fields]

    def record_from(params: dict[str, Any], specs: list[FlagSpec]) -> dict[str, Any]:
        record = _json_object(params.get("nexus_json"), "--json")
        record.update(_collect(params, specs))
        return record

    json_opt = _option(
        "nexus_json", ["--json"], str, "the record as a JSON object", metavar="JSON|@FILE|-"
    )
    rid_opt = _option("nexus_request_id", ["--request-id"], str, "idempotency key")
    id_arg = inspect.Parameter(
        "nexus_id", _KW, annotation=Annotated[str, typer.Argument(metavar="ID", help=pk)]
    )
    fields_opt = _option("nexus_fields", ["--fields"], str, "comma-separated fields to return")
    filter_opt = _option(
        "nexus_filter",
        ["--filter"],
        str,
        'a filter, e.g. \'{"score": {"$gt": 3}}\' (or @file.json)',
        metavar="JSON",
    )

    def create(**p: Any) -> None:
        st = state_of(p["nexus_ctx"])
        req = m.CreateRecordRequest(
            model=name,
            record=struct_of(record_from(p, create_specs)),
            request_id=p.get("nexus_request_id") or "",
        )
        emit(in_order(to_json(st.rpc(st.models.CreateRecord, req)), names), st.output)

    def get(**p: Any) -> None:
        st = state_of(p["nexus_ctx"])
        req = m.GetRecordRequest(model=name, id=p["nexus_id"], fields=_split(p["nexus_fields"]))
        emit(in_order(to_json(st.rpc(st.models.GetRecord, req)), names), st.output)

    def update(**p: Any) -> None:
        st = state_of(p["nexus_ctx"])
        record = record_from(p, update_specs)
        if not record:
            usage("nothing to update: give at least one field flag or --json")
        req = m.UpdateRecordRequest(
            model=name,
            id=p["nexus_id"],
            record=struct_of(record),
            request_id=p.get("nexus_request_id") or "",
        )
        req.update_mask.paths.extend(record)
        emit(in_order(to_json(st.rpc(st.models.UpdateRecord, req)), names), st.output)

    def delete(**p: Any) -> None:
        st = state_of(p["nexus_ctx"])
        req = m.DeleteRecordRequest(
            model=name, id=p["nexus_id"], request_id=p.get("nexus_request_id") or ""
        )
        st.rpc(st.models.DeleteRecord, req)
        if st.output == "table":
            err(f"deleted {name} {p['nexus_id']}")
        else:
            emit({}, st.output)

    def list_(**p: Any) -> None:
        st = state_of(p["nexus_ctx"])
        fields = _split(p["nexus_fields"])
        req = m.ListRecordsRequest(
            model=name,
            order_by=p["nexus_order_by"] or "",
            page_size=p["nexus_limit"],
            page_token=p["nexus_page_token"] or "",
            fields=fields,
        )
        if p["nexus_filter"]:
            req.filter.update(exact(_json_object(p["nexus_filter"], "--filter")))
        doc = to_json(st.rpc(st.models.ListRecords, req))
        doc["records"] = [in_order(r, names) for r in doc.get("records", [])]
        emit_rows(doc, doc["records"], fields or None, st.output, keep=[pk])

    def count(**p: Any) -> None:
        st = state_of(p["nexus_ctx"])
        req = m.CountRecordsRequest(model=name)
        if p["nexus_filter"]:
            req.filter.update(exact(_json_object(p["nexus_filter"], "--filter")))
        doc = to_json(st.rpc(st.models.CountRecords, req))
        if st.output == "table":
            print(int(doc.get("count", 0)))
        else:
            emit(doc, st.output)

    def search(**p: Any) -> None:
        st = state_of(p["nexus_ctx"])
        fields = _split(p["nexus_fields"])
        req = m.SearchRecordsRequest(
            model=name,
            q=p["nexus_query"],
            page_size=p["nexus_limit"],
            page_token=p["nexus_page_token"] or "",
            fields=fields,
        )
        if p["nexus_filter"]:
            req.filter.update(exact(_json_object(p["nexus_filter"], "--filter")))
        doc = to_json(st.rpc(st.models.SearchRecords, req))
        doc["records"] = [in_order(r, names) for r in doc.get("records", [])]
        # the relevance as a first column (its own name, unless a field has it)
        rel = "relevance" if "relevance" not in {f.name for f in model.fields} else "_relevance"
        rows = [
            {rel: f"{score:.4g}", **rec}
            for rec, score in zip(doc["records"], doc.get("scores", []), strict=False)
        ]
        emit_rows(doc, rows, [rel, *fields] if fields else None, st.output, keep=[pk])

    def upsert(**p: Any) -> None:
        st = state_of(p["nexus_ctx"])
        req = m.UpsertRecordRequest(
            model=name,
            record=struct_of(record_from(p, create_specs)),
            conflict_on=_split(p["nexus_conflict_on"]),
            request_id=p.get("nexus_request_id") or "",
        )
        doc = to_json(st.rpc(st.models.UpsertRecord, req))
        doc["record"] = in_order(doc.get("record"), names)
        if st.output != "table":
            emit(doc, st.output)
            return
        emit(doc["record"], st.output)
        print("created" if doc.get("created") else "updated (it existed)")

    def import_(**p: Any) -> None:
        from ._import import ImportOptions, import_records

        st = state_of(p["nexus_ctx"])
        opts = ImportOptions(
            batch_size=p["nexus_batch_size"],
            fmt=p["nexus_format"],
            on_conflict=p["nexus_on_conflict"] or "fail",
            conflict_on=_split(p["nexus_conflict_on"]),
        )
        import_records(st, model, Path(p["nexus_path"]), opts)

    group = typer.Typer(
        name=model.collection,
        help=model.description or f"The {name} model.",
        no_args_is_help=True,
        add_completion=False,
    )

    def add(cmd_name: str, help_text: str, params: list[inspect.Parameter], fn: Any) -> None:
        def callback(**kwargs: Any) -> None:
            fn(**kwargs)

        callback.__signature__ = inspect.Signature([_CTX, *params])  # type: ignore[attr-defined]
        group.command(cmd_name, help=help_text)(callback)

    def int_opt(pname: str, flag: str, default: int, lo: int, hi: int, text: str) -> Any:
        info = typer.Option(flag, min=lo, max=hi, help=text)
        return inspect.Parameter(pname, _KW, default=default, annotation=Annotated[int, info])

    add(
        "create",
        f"Create a {name}.",
        [*(s.parameter() for s in create_specs), json_opt, rid_opt],
        create,
    )
    add("get", f"Get a {name} by {pk}.", [id_arg, fields_opt], get)
    add(
        "update",
        f"Update the given fields of a {name}.",
        [id_arg, *(s.parameter() for s in update_specs), json_opt, rid_opt],
        update,
    )
    add("delete", f"Delete a {name}.", [id_arg, rid_opt], delete)
    add(
        "list",
        f"List {model.collection}.",
        [
            filter_opt,
            _option("nexus_order_by", ["--order-by"], str, "fields, - for descending: -created_at"),
            int_opt("nexus_limit", "--limit", 50, 0, 1000, "page size"),
            _option("nexus_page_token", ["--page-token"], str, "next_page_token of the last page"),
            fields_opt,
        ],
        list_,
    )
    add("count", f"Count {model.collection}.", [filter_opt], count)
    if any(f.searchable for f in model.fields):
        query_arg = inspect.Parameter(
            "nexus_query",
            _KW,
            annotation=Annotated[
                str,
                typer.Argument(
                    metavar="QUERY",
                    help='words (all must occur), "a phrase", -word to exclude, prefix*',
                ),
            ],
        )
        add(
            "search",
            f"Full-text search of {model.collection}, most relevant first.",
            [
                query_arg,
                filter_opt,
                int_opt("nexus_limit", "--limit", 50, 0, 1000, "page size"),
                _option(
                    "nexus_page_token", ["--page-token"], str, "next_page_token of the last page"
                ),
                fields_opt,
            ],
            search,
        )
    add(
        "upsert",
        f"Create a {name}, or update the one with the same unique key.",
        [
            *(s.parameter() for s in create_specs),
            _option("nexus_conflict_on", ["--conflict-on"], str, "unique fields to match on"),
            json_opt,
            rid_opt,
        ],
        upsert,
    )
    add(
        "import",
        f"Bulk-create {model.collection} from a CSV, JSON lines or JSON file, in batches "
        "(the format is read from the content).",
        [
            inspect.Parameter(
                "nexus_path",
                _KW,
                annotation=Annotated[
                    Path, typer.Argument(exists=True, dir_okay=False, metavar="FILE")
                ],
            ),
            int_opt("nexus_batch_size", "--batch-size", 100, 1, 1000, "records per call"),
            _option(
                "nexus_format",
                ["--format"],
                str,
                "csv, jsonl or json (default: read from the content)",
                metavar="csv|jsonl|json",
            ),
            _option(
                "nexus_on_conflict",
                ["--on-conflict"],
                str,
                "a taken unique value: fail (stop, naming the line and value), skip the "
                "record, or upsert it (update the record it matches) (default: fail)",
                metavar="fail|skip|upsert",
            ),
            _option(
                "nexus_conflict_on",
                ["--conflict-on"],
                str,
                f"with --on-conflict upsert: the fields that identify a record (default: {pk})",
            ),
        ],
        import_,
    )
    return typer.main.get_command(group)


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


# ---------------------------------------------------------------------------- static


app = typer.Typer(
    cls=NexusGroup,
    name="nexus",
    help="The Nexus command line: workflows, executions and models of a Nexus gRPC server.",
    epilog="Server commands: nexus serve APP, nexus proto export APP, nexus envoy-config APP, "
    "nexus openapi APP (each has --help).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
workflows_app = typer.Typer(help="Workflows the server serves.", no_args_is_help=True)
executions_app = typer.Typer(help="Executions of workflows.", no_args_is_help=True)
models_app = typer.Typer(help="Models the server serves.", no_args_is_help=True)
run_app = typer.Typer(
    cls=RunGroup,
    help="Run a workflow: nexus run NAME --input VALUE ... (nexus run NAME --help lists them).",
    no_args_is_help=True,
)
app.add_typer(workflows_app, name="workflows")
app.add_typer(executions_app, name="executions")
app.add_typer(models_app, name="models")
app.add_typer(run_app, name="run")


class OutputFormat(enum.StrEnum):
    """`--output`: how results are printed."""

    table = "table"
    json = "json"
    yaml = "yaml"


@app.callback()
def _root(
    ctx: typer.Context,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            "-s",
            envvar="NEXUS_SERVER",
            show_envvar=True,
            # eager: read before `--help`, which lists the commands of this server
            is_eager=True,
            help="the gRPC server, HOST:PORT (default: 127.0.0.1:50051)",
        ),
    ] = None,
    output: Annotated[
        OutputFormat,
        typer.Option(
            "--output",
            "-o",
            help="table for people; json is the REST document; yaml (also after the command)",
        ),
    ] = OutputFormat.table,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="deadline of each call, seconds")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            metavar="TOKEN",
            show_default=False,
            # eager, as --server: `--help` lists what this credential may use
            is_eager=True,
            help="a JWT to send (default: $NEXUS_TOKEN, else the stored login)",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            metavar="KEY",
            show_default=False,
            is_eager=True,
            help="an API key to send (default: $NEXUS_API_KEY, else the stored login)",
        ),
    ] = None,
) -> None:
    state_of(ctx)


IdArg = Annotated[str, typer.Argument(metavar="ID", help="the execution's id")]


@workflows_app.command("list")
def workflows_list(ctx: typer.Context) -> None:
    """List the workflows."""
    st = state_of(ctx)
    rows = _all_workflows(st)
    table = [
        {
            "name": r["name"],
            "inputs": ", ".join(i["name"] for i in r.get("inputs", [])),
            "description": r.get("description", ""),
        }
        for r in rows
    ]
    emit_rows({"workflows": rows}, table, None, st.output)


@workflows_app.command("get")
def workflows_get(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="the workflow's name")]
) -> None:
    """Show a workflow: its typed inputs, outputs and definition."""
    from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

    st = state_of(ctx)
    doc = to_json(st.rpc(st.workflows.GetWorkflow, w.GetWorkflowRequest(name=name)))
    if st.output != "table":
        emit(doc, st.output)
        return
    emit({k: doc.get(k) for k in ("name", "description", "builtin", "atomic")}, st.output)
    inputs = [
        {
            "input": i["name"],
            "type": i["type"],
            "required": i.get("required", False),
            "default": i.get("default"),
            "description": i.get("description", ""),
        }
        for i in doc.get("inputs", [])
    ]
    emit_rows(doc, inputs, ["input", "type", "required", "default", "description"], st.output)
    outputs = [
        {
            "node": o["node_id"],
            "output": o["name"],
            "type": o["type"],
            "description": o.get("description", ""),
        }
        for o in doc.get("outputs", [])
    ]
    emit_rows(doc, outputs, ["node", "output", "type", "description"], st.output)
    definition = doc.get("definition")
    if not definition:
        print("definition: none (registered in code with values JSON cannot hold)")
        return
    nodes = [
        {"node": n["id"], "type": n["type"], "params": n.get("params", {})}
        for n in definition.get("nodes", [])
    ]
    emit_rows(doc, nodes, ["node", "type", "params"], st.output)
    links = [
        {
            "from": f"{c['source']}.{c['output']}",
            "to": f"{c['target']}.{c['input']}",
        }
        for c in definition.get("connections", [])
    ]
    if links:
        emit_rows(doc, links, ["from", "to"], st.output)


@executions_app.command("get")
def executions_get(ctx: typer.Context, execution_id: IdArg) -> None:
    """Show an execution."""
    from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

    st = state_of(ctx)
    doc = to_json(st.rpc(st.workflows.GetExecution, w.GetExecutionRequest(id=execution_id)))
    _emit_execution(doc, st)


@executions_app.command("list")
def executions_list(
    ctx: typer.Context,
    workflow: Annotated[str | None, typer.Option(help="only executions of this workflow")] = None,
    state: Annotated[
        str | None,
        typer.Option(
            help="only in this state: queued, pending, running, succeeded, failed, cancelled, "
            "interrupted"
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=0, max=1000, help="page size")] = 50,
    page_token: Annotated[
        str | None, typer.Option(help="the next_page_token of the previous page")
    ] = None,
) -> None:
    """List executions, newest first."""
    from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

    st = state_of(ctx)
    req = w.ListExecutionsRequest(
        workflow=workflow or "", page_size=limit, page_token=page_token or ""
    )
    if state:
        name = state.upper()
        name = name if name.startswith("STATE_") else f"STATE_{name}"
        try:
            req.state = w.Execution.State.Value(name)  # type: ignore[assignment]
        except ValueError:
            usage(f"--state: unknown state {state!r}")
    doc = to_json(st.rpc(st.workflows.ListExecutions, req))
    rows = [
        {
            "id": e.get("id"),
            "workflow": e.get("workflow"),
            "state": e.get("state"),
            "create_time": e.get("create_time"),
            "duration": e.get("duration"),
        }
        for e in doc.get("executions", [])
    ]
    emit_rows(doc, rows, None, st.output)


@executions_app.command("cancel")
def executions_cancel(ctx: typer.Context, execution_id: IdArg) -> None:
    """Cancel a running execution (returns it once it stopped)."""
    from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

    st = state_of(ctx)
    doc = to_json(st.rpc(st.workflows.CancelExecution, w.CancelExecutionRequest(id=execution_id)))
    _emit_execution(doc, st)


@executions_app.command("watch")
def executions_watch(ctx: typer.Context, execution_id: IdArg) -> None:
    """Follow an execution node by node until it ends (Ctrl-C does not cancel it)."""
    from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w

    st = state_of(ctx)
    stream = st.workflows.WatchExecution(
        w.WatchExecutionRequest(id=execution_id), timeout=st.timeout, metadata=call_metadata()
    )
    _emit_execution(follow(stream, st), st)


@models_app.command("list")
def models_list(ctx: typer.Context) -> None:
    """List the models, their collections (command names) and typed services."""
    st = state_of(ctx)
    models = [to_json(x) for x in st.model_list()]
    rows = [
        {
            "name": x["name"],
            "collection": x.get("collection"),
            "service": x.get("service"),
            "fields": ", ".join(f["name"] for f in x.get("fields", [])),
        }
        for x in models
    ]
    emit_rows({"models": models}, rows, None, st.output)


@models_app.command("get")
def models_get(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="the model, e.g. Contact")]
) -> None:
    """Show a model and its fields."""
    from nexus_api.nexus.model.v1 import model_service_pb2 as mm

    st = state_of(ctx)
    doc = to_json(st.rpc(st.models.GetModel, mm.GetModelRequest(name=name)))
    if st.output != "table":
        emit(doc, st.output)
        return
    emit({k: doc.get(k) for k in ("name", "collection", "service", "description")}, st.output)
    emit_rows(doc, doc.get("fields", []), None, st.output)


@app.command("call")
def call(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Argument(
            metavar="SERVICE/METHOD",
            help="e.g. WorkflowService/ListWorkflows or ContactService/ListContacts",
        ),
    ],
    body: Annotated[
        str, typer.Option("--json", "-d", metavar="JSON|@FILE|-", help="the request, proto3 JSON")
    ] = "{}",
) -> None:
    """Call any RPC with a JSON request (static services through the stubs, the typed
    per-model services through server reflection)."""
    from google.protobuf.json_format import ParseError

    from .._grpc import DynamicMethods

    st = state_of(ctx)
    request = _json_object(body, "--json")
    methods = DynamicMethods(st.channel)
    try:
        for doc in methods.call(target, request, timeout=st.timeout, metadata=call_metadata()):
            if st.output == "json":
                print(json.dumps(doc, ensure_ascii=False), flush=True)
            else:
                emit(doc, st.output)
    except grpc.RpcError as exc:
        fail(ApiFailure.from_rpc_error(exc))
    except KeyError as exc:
        usage(str(exc.args[0]) if exc.args else str(exc))
    except ParseError as exc:
        usage(f"--json: {exc}", EXIT_INVALID)


# ---------------------------------------------------------------------------- access


keys_app = typer.Typer(
    help="API keys the server manages (needs the admin role).", no_args_is_help=True
)
audit_app = typer.Typer(
    help="The server's audit trail (needs the admin role).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")

_STDIN_HELP = "- reads it from stdin"


def _read_secret(value: str, flag: str) -> str:
    """The value of a credential flag, `-` meaning the first line of stdin (so it stays
    out of the shell's history and the process list)."""
    if value == "-":
        value = sys.stdin.readline()
    try:
        return checked(value, flag)
    except CredentialError as exc:
        usage(str(exc))


def _prompt_credential() -> Credential:
    """The credential typed at a hidden prompt, or the first line of stdin when it is not
    a terminal; a JWT is told from an API key by its shape."""
    if sys.stdin.isatty():
        value = typer.prompt("Token or API key", hide_input=True, err=True)
    else:
        value = sys.stdin.readline()
    if not value.strip():
        usage("no credential given: pass --token or --api-key, or type it at the prompt")
    try:
        value = checked(value, "the credential")
    except CredentialError as exc:
        usage(str(exc))
    return Credential("token" if looks_like_jwt(value) else "api_key", value)


def _principal_row(principal: Any, st: State) -> dict[str, Any]:
    return {
        "server": st.server,
        "principal": principal.id,
        "roles": ", ".join(principal.roles),
        "tenant": principal.tenant or "(none)",
        "authentication": principal.authentication,
    }


@app.command("login")
def login(
    ctx: typer.Context,
    token: Annotated[
        str | None,
        typer.Option("--token", metavar="TOKEN", help=f"the JWT to store; {_STDIN_HELP}"),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", metavar="KEY", help=f"the API key to store; {_STDIN_HELP}"),
    ] = None,
) -> None:
    """Check a credential with the server and store it for this server.

    Without --token or --api-key it is asked for (hidden), or read from stdin when that
    is not a terminal. A credential the server refuses is not stored.
    """
    from nexus_api.nexus.auth.v1 import auth_service_pb2 as a

    st = state_of(ctx)
    root = _root_ctx(ctx).params
    if token is None and api_key is None:
        token, api_key = root.get("token"), root.get("api_key")
    if token is not None and api_key is not None:
        usage("give --token or --api-key, not both")
    if token is not None:
        cred = Credential("token", _read_secret(token, "--token"))
    elif api_key is not None:
        cred = Credential("api_key", _read_secret(api_key, "--api-key"))
    else:
        cred = _prompt_credential()
    previous = CREDENTIAL.set(cred)
    try:
        principal = st.rpc(st.auth.GetPrincipal, a.GetPrincipalRequest())
    except ApiFailure as exc:
        err(f"error: {exc.render()}")
        err(f"  the credential was not stored; nothing changed for {st.server}")
        raise SystemExit(exit_code_of(exc)) from None
    finally:
        CREDENTIAL.reset(previous)
    try:
        path = store(st.server, cred, principal.id)
    except CredentialError as exc:
        usage(str(exc), EXIT_FAILED)
    if st.output == "table":
        emit(_principal_row(principal, st), st.output)
    else:
        emit(to_json(principal), st.output)
    err(f"logged in to {st.server}; stored in {path}")
    if not principal.auth_enabled:
        err(
            f"note: {st.server} does not authenticate callers (authentication is off): "
            "the credential was not checked"
        )


@app.command("logout")
def logout(ctx: typer.Context) -> None:
    """Remove the login stored for this server."""
    st = state_of(ctx)
    try:
        removed = forget(st.server)
    except CredentialError as exc:
        usage(str(exc), EXIT_FAILED)
    err(f"logged out of {st.server}" if removed else f"no login stored for {st.server}")


@app.command("whoami")
def whoami(ctx: typer.Context) -> None:
    """Show who the server thinks you are: principal, roles, tenant."""
    from nexus_api.nexus.auth.v1 import auth_service_pb2 as a

    st = state_of(ctx)
    principal = st.rpc(st.auth.GetPrincipal, a.GetPrincipalRequest())
    if st.output != "table":
        emit(to_json(principal), st.output)
        return
    row = _principal_row(principal, st)
    row["auth_enabled"] = principal.auth_enabled
    row["credential"] = st.credential_source or "(none)"
    emit(row, st.output)


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_expires(text: str, now: datetime | None = None) -> datetime:
    """`--expires`: a duration from now (`30d`, `12h`, `90m`, `2w`) or an ISO 8601 time
    (`2027-01-01T00:00:00Z`; UTC when it names no offset); always in the future.

    Raises:
        ValueError: neither form, or not in the future (the message says which).
    """
    now = now or datetime.now(UTC)
    match = _DURATION.match(text.strip())
    if match:
        amount = int(match.group(1))
        if amount <= 0:
            raise ValueError("a duration must be more than 0")
        when = now + timedelta(**{_UNIT[match.group(2)]: amount})
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(
                "expected a duration (30d, 12h, 90m, 2w) or a time (2027-01-01T00:00:00Z)"
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    if when <= now:
        raise ValueError("the time is not in the future")
    return when


def _short_time(text: str) -> str:
    """A proto3 JSON timestamp to the second, for tables (`-o json` keeps it whole)."""
    return re.sub(r"\.\d+Z$", "Z", text)


def _short_method(text: str) -> str:
    """`/nexus.workflow.v1.WorkflowService/GetWorkflow` as `WorkflowService/GetWorkflow`."""
    service, _, method = text.strip("/").rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}/{method}" if service else text


def _key_row(key: dict[str, Any], now: datetime) -> dict[str, Any]:
    expires = key.get("expire_time")
    if key.get("revoke_time"):
        state = "revoked"
    elif expires and datetime.fromisoformat(expires) <= now:
        state = "expired"
    else:
        state = "active"
    return {
        "name": key.get("name"),
        "state": state,
        "roles": ", ".join(key.get("roles", [])),
        "tenant": key.get("tenant", ""),
        "prefix": key.get("prefix", ""),
        "created": _short_time(key.get("create_time", "")),
        "expires": _short_time(expires) if expires else "never",
        "creator": key.get("creator", ""),
    }


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="the key's name, lower snake case")],
    role: Annotated[
        list[str],
        typer.Option(
            "--role",
            metavar="ROLE",
            help="a role the key grants (repeat for more)",
            show_default=False,
        ),
    ],
    tenant: Annotated[
        str | None, typer.Option(help="the tenant of its calls (default: none)")
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(
            help="when it stops working: 30d, 12h, 90m, 2w, or 2027-01-01T00:00:00Z "
            "(default: never)"
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the CreateApiKeyResponse as JSON (-o json)")
    ] = False,
) -> None:
    """Create an API key and print it, once: the server keeps only a salted hash."""
    from nexus_api.nexus.auth.v1 import auth_service_pb2 as a

    st = state_of(ctx)
    req = a.CreateApiKeyRequest(name=name, roles=role, tenant=tenant or "")
    if expires is not None:
        try:
            req.expire_time.FromDatetime(parse_expires(expires))
        except ValueError as exc:
            usage(f"--expires: {exc}")
    resp = st.rpc(st.auth.CreateApiKey, req)
    output = "json" if as_json else st.output
    if output != "table":
        emit(to_json(resp), output)
    else:
        print(resp.key, flush=True)
        row = _key_row(to_json(resp.api_key), datetime.now(UTC))
        err(
            f"created API key {row['name']} (roles: {row['roles']}; "
            f"tenant: {row['tenant'] or '(none)'}; expires: {row['expires']})"
        )
    err("store this key now: it is shown only once (the server keeps only a salted hash)")


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    show_all: Annotated[bool, typer.Option("--all", help="include revoked keys")] = False,
) -> None:
    """List the server's API keys, newest first (never the keys themselves)."""
    from nexus_api.nexus.auth.v1 import auth_service_pb2 as a

    st = state_of(ctx)
    keys: list[dict[str, Any]] = []
    token = ""
    while True:
        req = a.ListApiKeysRequest(page_size=1000, page_token=token, show_revoked=show_all)
        resp = st.rpc(st.auth.ListApiKeys, req)
        keys += to_json(resp).get("api_keys", [])
        token = resp.next_page_token
        if not token:
            break
    now = datetime.now(UTC)
    emit_rows({"api_keys": keys}, [_key_row(k, now) for k in keys], None, st.output)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="the key's name")],
) -> None:
    """Revoke an API key: the next call with it is refused, on every server."""
    from nexus_api.nexus.auth.v1 import auth_service_pb2 as a

    st = state_of(ctx)
    doc = to_json(st.rpc(st.auth.RevokeApiKey, a.RevokeApiKeyRequest(name=name)))
    if st.output != "table":
        emit(doc, st.output)
        return
    emit(_key_row(doc, datetime.now(UTC)), st.output)
    err(f"revoked API key {name}: calls with it are refused from now on")


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    principal: Annotated[
        str | None, typer.Option(help="only the calls of this principal (key:ci, jwt:ada)")
    ] = None,
    failed: Annotated[bool, typer.Option("--failed", help="only refused or failed calls")] = False,
    limit: Annotated[int, typer.Option(min=0, max=1000, help="page size")] = 50,
    page_token: Annotated[
        str | None, typer.Option(help="the next_page_token of the previous page")
    ] = None,
) -> None:
    """List audit events, newest first: who called what, through which channel, and the
    outcome."""
    from nexus_api.nexus.audit.v1 import audit_service_pb2 as d

    st = state_of(ctx)
    req = d.ListAuditEventsRequest(
        page_size=limit,
        page_token=page_token or "",
        principal=principal or "",
        failed_only=failed,
    )
    doc = to_json(st.rpc(st.audit.ListAuditEvents, req))
    rows = [
        {
            "time": _short_time(e.get("time", "")),
            "principal": e.get("principal", ""),
            "channel": e.get("channel", ""),
            "method": _short_method(e.get("method", "")),
            "resource": e.get("resource", ""),
            "code": e.get("code", ""),
            "reason": e.get("reason", ""),
        }
        for e in doc.get("events", [])
    ]
    columns = ["time", "principal", "channel", "method", "resource", "code", "reason"]
    emit_rows(doc, rows, columns, st.output)


def _set_late_output(ctx: Any, _param: Any, value: Any) -> None:
    if value is not None:
        state_of(ctx).output = _output_name(value)


def finish(command: Any, root: Any) -> Any:
    """`command` (and its subcommands) as the CLI shows it: `--output`/`-o` accepted after
    the command too (`nexus contacts list -o json`), no type after a flag in its help."""
    if hasattr(command, "commands"):  # a group
        for sub in command.commands.values():
            finish(sub, root)
    elif not any(p.name == "output" for p in command.params):
        template = next(p for p in root.params if p.name == "output")
        late = copy.copy(template)
        late.default = None
        late.expose_value = False
        late.callback = _set_late_output
        command.params.append(late)
    return tidy_help(command)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (see docs/cli.md for the table)."""
    set_channel("cli")
    command = typer.main.get_command(app)
    finish(command, command)
    try:
        command.main(args=argv, prog_name="nexus", standalone_mode=False)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.Abort:
        err("aborted")
        return 130
    except typer.TyperException as exc:
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            err(f"error: {exc.format_message()}")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        err("interrupted")
        return 130
    except ApiFailure as exc:
        err(render_failure(exc))
        return exit_code_of(exc)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0
