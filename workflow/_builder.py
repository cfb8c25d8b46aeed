"""WorkflowBuilder and the immutable, validated Workflow it builds."""

from __future__ import annotations

import copy
import heapq
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ._errors import InputError, InvalidInputsError, Problem, RegistryError, WorkflowValidationError
from ._node import MISSING, Node, NodeConfigError, Param, get_node_class
from ._suggest import did_you_mean
from ._template import Template, is_template
from ._types import (
    ANY,
    base_type,
    check_value,
    compatible,
    is_nullable,
    is_supported,
    name_of_type,
    type_from_name,
    type_name,
)

__all__ = ["Connection", "Workflow", "WorkflowBuilder", "WorkflowInput", "WorkflowOutput"]


@dataclass(frozen=True)
class Connection:
    """`source.output` feeds `target.input`."""

    source: str
    output: str
    target: str
    input: str


@dataclass(frozen=True)
class WorkflowInput:
    """A typed input of a workflow, and the node parameters it feeds."""

    name: str
    type: Any
    required: bool
    default: Any
    description: str
    targets: tuple[tuple[str, str], ...]

    @property
    def type_name(self) -> str:
        return type_name(self.type)


@dataclass(frozen=True)
class WorkflowOutput:
    """A declared output of one of the workflow's nodes."""

    node: str
    name: str
    type: Any
    description: str

    @property
    def type_name(self) -> str:
        return type_name(self.type)


@dataclass(frozen=True)
class _Declared:
    type: Any
    default: Any
    description: str
    required: bool


@dataclass(frozen=True)
class _Use:
    """One placeholder use found at build time."""

    input: str
    node: str
    param: str
    type: Any  # the type the use requires of the input (any when it does not care)
    direct: bool  # the whole parameter value is the placeholder
    embedded: bool  # the placeholder is part of a longer string
    spec: Param | None

    @property
    def optional(self) -> bool:
        """Whether the parameter can fall back to its own default when the input is omitted."""
        return self.direct and self.spec is not None and not self.spec.required


class _Incoming:
    __slots__ = ("check", "input", "output", "source")

    def __init__(self, source: str, output: str, input: str, check: Any) -> None:
        self.source = source
        self.output = output
        self.input = input
        self.check = check  # the target type to check at run time, or None


class _NodePlan:
    """What the runtime needs for one node, computed once at build time."""

    __slots__ = (
        "defaults_for",
        "id",
        "incoming",
        "node",
        "run",
        "static",
        "successors",
        "templates",
        "type_name",
    )

    def __init__(self, node: Node) -> None:
        self.id = node.id
        self.node = node
        self.type_name = node.type_name
        self.run = node.run
        self.static: dict[str, Any] = {}
        self.templates: list[tuple[str, Template]] = []
        # template parameters that fall back to the parameter default when their
        # (optional) input is omitted: param -> (input name, default)
        self.defaults_for: dict[str, tuple[str, Any]] = {}
        self.incoming: list[_Incoming] = []
        self.successors: list[str] = []


class Workflow:
    """A validated, immutable workflow graph. Build one with `WorkflowBuilder.build()`."""

    def __init__(
        self,
        *,
        nodes: dict[str, Node],
        configs: dict[str, dict[str, Any]],
        connections: tuple[Connection, ...],
        inputs: dict[str, WorkflowInput],
        declared: dict[str, _Declared],
        plans: dict[str, _NodePlan],
        order: tuple[str, ...],
        description: str,
        atomic: bool,
    ) -> None:
        self._nodes = MappingProxyType(nodes)
        self._configs = configs
        self.connections = connections
        self.inputs: Mapping[str, WorkflowInput] = MappingProxyType(inputs)
        self._declared = declared
        for p in plans.values():
            p.successors = list(dict.fromkeys(p.successors))
        self._plans = plans
        self.order = order
        self.description = description
        self.atomic = atomic
        self._roots = tuple(nid for nid in order if not any(plans[nid].incoming))
        self._n_deps = {nid: len({i.source for i in p.incoming}) for nid, p in plans.items()}
        # a chain (each node feeds at most the next one) runs node after node, with no
        # dependency counting at run time
        self._chain: tuple[_NodePlan, ...] | None = (
            tuple(plans[nid] for nid in order)
            if len(self._roots) <= 1
            and all(len(plans[nid].successors) <= 1 for nid in order)
            and all(n <= 1 for n in self._n_deps.values())
            else None
        )
        self._required = tuple(n for n, i in inputs.items() if i.required)
        # validate_inputs({}) returns {} at once when nothing is required or defaulted
        self._defaults_or_required = any(
            i.required or i.default is not MISSING for i in inputs.values()
        )
        self.outputs: tuple[WorkflowOutput, ...] = tuple(
            WorkflowOutput(nid, name, out.type, out.description)
            for nid in order
            for name, out in nodes[nid].output_specs().items()
        )

    @property
    def nodes(self) -> Mapping[str, Node]:
        """The workflow's node instances by id."""
        return self._nodes

    def node_type(self, node_id: str) -> str:
        """The registered type name the node was added with."""
        return self._plans[node_id].type_name

    def node_config(self, node_id: str) -> dict[str, Any]:
        """A copy of the parameters the node was added with."""
        return dict(self._configs[node_id])

    @property
    def exposable(self) -> bool:
        """False when any node runs code from its configuration (see `Node.exposable`)."""
        return all(n.exposable for n in self._nodes.values())

    def validate_inputs(self, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check execution inputs; return them coerced, with defaults filled in.

        Raises:
            InvalidInputsError: listing every missing, unknown or wrongly typed input.
        """
        if not parameters and not self._defaults_or_required:
            return {}
        params = parameters or {}
        inputs = self.inputs
        errors: list[InputError] = []
        out: dict[str, Any] = {}
        for name, value in params.items():
            spec = inputs.get(name)
            if spec is None:
                known = ", ".join(sorted(inputs)) or "none"
                hint = did_you_mean(name, inputs)
                errors.append(
                    InputError(name, f"unknown input{hint} (this workflow's inputs: {known})")
                )
                continue
            try:
                out[name] = check_value(spec.type, value)
            except TypeError as exc:
                errors.append(InputError(name, str(exc)))
        for name in self._required:
            if name not in params:
                errors.append(
                    InputError(name, f"required input is missing ({inputs[name].type_name})")
                )
        if errors:
            raise InvalidInputsError(errors)
        for name, spec in inputs.items():
            if name not in out and spec.default is not MISSING:
                out[name] = spec.default
        return out

    def to_definition(self) -> dict[str, Any]:
        """A plain definition (nodes, params, connections, inputs) that
        `WorkflowBuilder.from_definition` rebuilds into an equal workflow.

        Raises:
            TypeError: when a node is configured with a Python function or an input has
                a type that has no name in definitions (such workflows live in code only).
        """
        nodes = []
        for nid in self._configs:
            cfg = self._configs[nid]
            for k, v in cfg.items():
                if callable(v):
                    raise TypeError(
                        f"node '{nid}': parameter '{k}' is a Python callable and cannot be "
                        f"serialised; use a code string instead"
                    )
            # a deep copy: changing the definition must not change this (immutable) workflow
            params = copy.deepcopy(cfg)
            nodes.append({"id": nid, "type": self.node_type(nid), "params": params})
        inputs = []
        for name, d in self._declared.items():
            entry: dict[str, Any] = {
                "name": name,
                "type": name_of_type(d.type),
                "required": d.required,
                "description": d.description,
            }
            if d.default is not MISSING:
                entry["default"] = copy.deepcopy(d.default)
            inputs.append(entry)
        return {
            "description": self.description,
            "atomic": self.atomic,
            "nodes": nodes,
            "connections": [
                {"source": c.source, "output": c.output, "target": c.target, "input": c.input}
                for c in self.connections
            ],
            "inputs": inputs,
        }

    def __repr__(self) -> str:
        return f"<Workflow nodes={list(self._nodes)} inputs={list(self.inputs)}>"


class WorkflowBuilder:
    """Collects nodes, connections and inputs, then `build()`s a validated Workflow.

    Args:
        description: a sentence shown by every channel that lists the workflow.
        atomic: run all database writes of one execution in one transaction, rolled back
            if any node fails (honoured by the DataFlow nodes).
    """

    def __init__(self, description: str = "", *, atomic: bool = False) -> None:
        self.description = description
        self.atomic = atomic
        self._nodes: list[tuple[str, str, dict[str, Any]]] = []
        self._connections: list[Connection] = []
        self._inputs: dict[str, _Declared] = {}
        self._problems: list[Problem] = []

    def add_node(
        self, node_type: str, node_id: str, params: Mapping[str, Any] | None = None
    ) -> WorkflowBuilder:
        """Add a node of a registered type with its static parameters (may use `{{input}}`)."""
        self._nodes.append((node_type, node_id, dict(params or {})))
        return self

    def add_connection(self, source: str, output: str, target: str, input: str) -> WorkflowBuilder:
        """Feed output `output` of node `source` into parameter `input` of node `target`."""
        self._connections.append(Connection(source, output, target, input))
        return self

    def add_input(
        self,
        name: str,
        type: Any = ANY,
        *,
        default: Any = MISSING,
        description: str = "",
        required: bool | None = None,
    ) -> WorkflowBuilder:
        """Declare a workflow input explicitly (its `{{name}}` uses must agree with it)."""
        if isinstance(type, str):
            try:
                type = type_from_name(type)
            except TypeError as exc:
                self._problems.append(Problem("", name, str(exc)))
                type = ANY
        elif not is_supported(type):
            self._problems.append(Problem("", name, f"unsupported input type {type!r}"))
            type = ANY
        req = default is MISSING if required is None else required
        self._inputs[name] = _Declared(type, default, description, req)
        return self

    @classmethod
    def from_definition(cls, definition: Mapping[str, Any]) -> WorkflowBuilder:
        """A builder holding a definition made by `Workflow.to_definition()` (or sent by a
        client). Malformed parts are reported by `build()` with the rest."""
        b = cls(str(definition.get("description", "")), atomic=bool(definition.get("atomic")))
        for i, n in enumerate(_items(definition, "nodes", b._problems)):
            nid, ntype, params = n.get("id"), n.get("type"), n.get("params", {})
            if not isinstance(nid, str) or not isinstance(ntype, str):
                b._problems.append(Problem("", f"nodes[{i}]", "needs string 'id' and 'type'"))
                continue
            if not isinstance(params, Mapping):
                b._problems.append(Problem(nid, "params", "must be an object"))
                continue
            b.add_node(ntype, nid, params)
        for i, c in enumerate(_items(definition, "connections", b._problems)):
            parts = [c.get(k) for k in ("source", "output", "target", "input")]
            if not all(isinstance(p, str) for p in parts):
                msg = "needs string 'source', 'output', 'target' and 'input'"
                b._problems.append(Problem("", f"connections[{i}]", msg))
                continue
            b.add_connection(*parts)
        for i, d in enumerate(_items(definition, "inputs", b._problems)):
            name = d.get("name")
            if not isinstance(name, str):
                b._problems.append(Problem("", f"inputs[{i}]", "needs a string 'name'"))
                continue
            b.add_input(
                name,
                d.get("type", "any"),
                default=d.get("default", MISSING),
                description=str(d.get("description", "")),
                required=d.get("required"),
            )
        return b

    def build(self) -> Workflow:
        """Validate the graph and return an immutable Workflow.

        Raises:
            WorkflowValidationError: listing every problem found, each naming the node
                and the parameter (unknown node type, duplicate id, bad connection,
                cycle, unsupplied required parameter, type mismatch, bad input).
        """
        return _Validator(self).build()


def _items(definition: Mapping[str, Any], key: str, problems: list[Problem]) -> Iterator[Any]:
    value = definition.get(key, [])
    if not isinstance(value, Sequence) or isinstance(value, str):
        problems.append(Problem("", key, "must be a list"))
        return
    for i, item in enumerate(value):
        if isinstance(item, Mapping):
            yield item
        else:
            problems.append(Problem("", f"{key}[{i}]", "must be an object"))


class _Validator:
    """One pass over a builder's contents, collecting every problem before failing."""

    def __init__(self, builder: WorkflowBuilder) -> None:
        self.b = builder
        self.problems: list[Problem] = list(builder._problems)
        # every node id added, valid or not (a connection to one is not "unknown")
        self.ids: set[Any] = {n for _, n, _ in builder._nodes}
        self.nodes: dict[str, Node] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.types: dict[str, str] = {}
        # parameters some connection targets, valid or not: a bad connection is reported
        # once, not again as "required parameter is not supplied"
        self.targeted: set[tuple[str, str]] = set()

    def problem(self, node: str, field: str, message: str) -> None:
        self.problems.append(Problem(node, field, message))

    def build(self) -> Workflow:
        self._make_nodes()
        supplied = self._check_connections()
        plans = {nid: _NodePlan(node) for nid, node in self.nodes.items()}
        for nid, plan in plans.items():
            # the name it is registered under, which may differ from the class's type_name
            plan.type_name = self.types[nid]
        uses = self._check_params(plans, supplied)
        inputs = self._resolve_inputs(uses, plans)
        order = self._order(plans)
        if self.problems:
            raise WorkflowValidationError(self.problems)
        return Workflow(
            nodes=self.nodes,
            configs=self.configs,
            connections=tuple(self.b._connections),
            inputs=inputs,
            declared=dict(self.b._inputs),
            plans=plans,
            order=order,
            description=self.b.description,
            atomic=self.b.atomic,
        )

    def _make_nodes(self) -> None:
        seen: set[str] = set()
        for ntype, nid, params in self.b._nodes:
            if not isinstance(nid, str) or not nid:
                self.problem(str(nid), "", "node id must be a non-empty string")
                continue
            if nid in seen:
                self.problem(nid, "", "duplicate node id")
                continue
            seen.add(nid)
            try:
                cls = get_node_class(ntype)
            except RegistryError as exc:
                self.problem(nid, "", str(exc))
                continue
            try:
                self.nodes[nid] = cls(nid, params)
            except NodeConfigError as exc:
                self.problem(nid, exc.field, exc.message)
                continue
            self.configs[nid] = params
            self.types[nid] = ntype

    def _check_connections(self) -> dict[tuple[str, str], Connection]:
        supplied: dict[tuple[str, str], Connection] = {}
        for c in self.b._connections:
            self.targeted.add((c.target, c.input))
            src, tgt = self.nodes.get(c.source), self.nodes.get(c.target)
            ok = True
            if src is None:
                ok = False
                if c.source not in self.ids:
                    hint = did_you_mean(c.source, self.ids)
                    self.problem(
                        c.source, "", f"connection to {c.target}.{c.input}: unknown node{hint}"
                    )
            if tgt is None:
                ok = False
                if c.target not in self.ids:
                    hint = did_you_mean(c.target, self.ids)
                    self.problem(
                        c.target, "", f"connection from {c.source}.{c.output}: unknown node{hint}"
                    )
            if not ok or src is None or tgt is None:
                continue
            out_spec = src.output_specs().get(c.output)
            if out_spec is None and not src.open_outputs:
                known = ", ".join(src.output_specs()) or "none"
                hint = did_you_mean(c.output, src.output_specs())
                self.problem(c.source, c.output, f"unknown output{hint} (outputs: {known})")
                ok = False
            in_spec = tgt.input_specs().get(c.input)
            if in_spec is None and not tgt.open_inputs:
                known = ", ".join(tgt.input_specs()) or "none"
                hint = did_you_mean(c.input, tgt.input_specs())
                self.problem(c.target, c.input, f"unknown parameter{hint} (parameters: {known})")
                ok = False
            if c.source == c.target:
                self.problem(c.source, c.output, "a node cannot feed itself")
                ok = False
            if not ok:
                continue
            src_type = out_spec.type if out_spec else ANY
            dst_type = in_spec.type if in_spec else ANY
            if not compatible(src_type, dst_type):
                self.problem(
                    c.target,
                    c.input,
                    f"type mismatch: {c.source}.{c.output} is {type_name(src_type)}, "
                    f"parameter is {type_name(dst_type)}",
                )
                continue
            key = (c.target, c.input)
            if key in supplied:
                other = supplied[key]
                self.problem(
                    c.target,
                    c.input,
                    f"fed by two connections ({other.source}.{other.output} and "
                    f"{c.source}.{c.output})",
                )
                continue
            if c.input in self.configs[c.target]:
                self.problem(c.target, c.input, "set in the node's params and by a connection")
                continue
            supplied[key] = c
        return supplied

    def _check_params(
        self, plans: dict[str, _NodePlan], supplied: dict[tuple[str, str], Connection]
    ) -> list[_Use]:
        """Check static params; return every placeholder use."""
        uses: list[_Use] = []
        for nid, node in self.nodes.items():
            specs = node.input_specs()
            plan = plans[nid]
            for pname, value in self.configs[nid].items():
                spec = specs.get(pname)
                if spec is None and not node.open_inputs:
                    known = ", ".join(specs) or "none"
                    hint = did_you_mean(pname, specs)
                    self.problem(nid, pname, f"unknown parameter{hint} (parameters: {known})")
                    continue
                if is_template(value):
                    tmpl = Template(value)
                    plan.templates.append((pname, tmpl))
                    for use in tmpl.uses:
                        direct = use.whole and not use.nested
                        # only a whole, direct placeholder takes the parameter's type; an
                        # embedded one renders any value as text, a nested one is untyped
                        tp = spec.type if direct and spec else ANY
                        uses.append(_Use(use.name, nid, pname, tp, direct, not use.whole, spec))
                    continue
                try:
                    plan.static[pname] = node.check_param(pname, value)
                except TypeError as exc:
                    self.problem(nid, pname, str(exc))
            for pname, spec in specs.items():
                if pname in self.configs[nid] or (nid, pname) in self.targeted:
                    continue
                if spec.required:
                    self.problem(
                        nid, pname, f"required parameter ({spec.type_name}) is not supplied"
                    )
                else:
                    plan.static[pname] = spec.default
        for (tgt, inp), c in supplied.items():
            src_out = self.nodes[c.source].output_specs().get(c.output)
            tgt_in = self.nodes[tgt].input_specs().get(inp)
            # checked at run time only when the build could not prove it: the source is
            # untyped, or may be null where the parameter may not
            needs_check = (
                tgt_in is not None
                and base_type(tgt_in.type) is not ANY
                and (
                    src_out is None
                    or base_type(src_out.type) is ANY
                    or (is_nullable(src_out.type) and not is_nullable(tgt_in.type))
                )
            )
            plans[tgt].incoming.append(
                _Incoming(c.source, c.output, inp, tgt_in.type if needs_check and tgt_in else None)
            )
            plans[c.source].successors.append(tgt)
        return uses

    def _resolve_inputs(
        self, uses: list[_Use], plans: dict[str, _NodePlan]
    ) -> dict[str, WorkflowInput]:
        declared = self.b._inputs
        by_name: dict[str, list[_Use]] = {}
        for use in uses:
            by_name.setdefault(use.input, []).append(use)
        for name in declared:
            if name not in by_name:
                self.problem("", name, "declared input is not used by any node ({{" + name + "}})")
        inputs: dict[str, WorkflowInput] = {}
        for name, places in by_name.items():
            d = declared.get(name)
            typed = [u for u in places if base_type(u.type) is not ANY]
            if d is not None and base_type(d.type) is not ANY:
                tp = d.type
                for u in typed:
                    if not compatible(tp, u.type):
                        self.problem(
                            u.node,
                            u.param,
                            f"input '{name}' is declared {type_name(tp)} but feeds a "
                            f"{type_name(u.type)} parameter",
                        )
            elif typed:
                # an input declared without a type takes the type of the parameters it feeds
                tp = typed[0].type
                for u in typed[1:]:
                    if base_type(u.type) is not base_type(tp):
                        self.problem(
                            u.node,
                            u.param,
                            f"input '{name}' feeds parameters of different types: "
                            f"{typed[0].node}.{typed[0].param} is {type_name(tp)}, "
                            f"this one is {type_name(u.type)}",
                        )
            elif d is None and all(u.embedded for u in places):
                tp = str
            else:
                tp = ANY if d is None else d.type

            if d is not None:
                required, default, description = d.required, d.default, d.description
            else:
                required = not all(u.optional for u in places)
                default = MISSING
                descs = [u.spec.description for u in places if u.spec and u.spec.description]
                description = descs[0] if descs else ""
            if (
                not required
                and default is MISSING
                and not all(u.optional for u in places)
                and (is_nullable(tp) or base_type(tp) is ANY)
            ):
                default = None  # an optional nullable input without a default is null
            if not required and default is MISSING:
                # an optional input without a default: each parameter it feeds falls back
                # to the parameter's own default, which only exists for a direct use of an
                # optional parameter
                for u in places:
                    if u.optional and u.spec is not None:
                        plans[u.node].defaults_for[u.param] = (name, u.spec.default)
                    else:
                        self.problem(
                            u.node,
                            u.param,
                            f"input '{name}' is optional without a default, but this "
                            f"parameter has no default to fall back to; give the input a default",
                        )
            if default is not MISSING:
                try:
                    default = check_value(tp, default)
                except TypeError as exc:
                    self.problem("", name, f"default: {exc}")
            inputs[name] = WorkflowInput(
                name=name,
                type=tp,
                required=required,
                default=default,
                description=description,
                targets=tuple((u.node, u.param) for u in places),
            )
        return inputs

    def _order(self, plans: dict[str, _NodePlan]) -> tuple[str, ...]:
        """Topological order (stable: ties in insertion order); reports cycles."""
        position = {nid: i for i, nid in enumerate(plans)}
        indeg = {nid: len({i.source for i in p.incoming}) for nid, p in plans.items()}
        heap = [(position[n], n) for n, d in indeg.items() if d == 0]
        heapq.heapify(heap)
        order: list[str] = []
        while heap:
            _, nid = heapq.heappop(heap)
            order.append(nid)
            for succ in dict.fromkeys(plans[nid].successors):
                indeg[succ] -= 1
                if indeg[succ] == 0:
                    heapq.heappush(heap, (position[succ], succ))
        if len(order) < len(plans):
            stuck = [n for n in plans if n not in set(order)]
            self.problem("", "", "cycle: these nodes wait on each other: " + ", ".join(stuck))
        return tuple(order)
