"""Nodes: typed units of work, and the registry that finds them by type name."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from ._errors import RegistryError
from ._suggest import did_you_mean
from ._types import ANY, check_value, is_supported, type_name

__all__ = [
    "MISSING",
    "Node",
    "NodeConfigError",
    "Output",
    "Param",
    "get_node_class",
    "node_types",
    "register_node",
    "unregister_node",
]


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


#: Marks "no default given" (None is a legitimate default).
MISSING: Any = _Missing()


@dataclass(frozen=True)
class Param:
    """A declared node parameter.

    Args:
        type: the value type (see `workflow._types`); `typing.Any` accepts anything.
        default: the value used when nothing supplies the parameter. Giving one makes
            the parameter optional.
        required: defaults to "no default was given". `required=False` with no default
            means the parameter is None when not supplied.
        description: shown in generated help, schemas and tool descriptions.
    """

    type: Any = ANY
    default: Any = MISSING
    required: bool | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if not is_supported(self.type):
            raise TypeError(f"unsupported parameter type {self.type!r}")
        if self.required is None:
            object.__setattr__(self, "required", self.default is MISSING)
        if not self.required and self.default is MISSING:
            object.__setattr__(self, "default", None)

    @property
    def type_name(self) -> str:
        return type_name(self.type)


@dataclass(frozen=True)
class Output:
    """A declared node output."""

    type: Any = ANY
    description: str = ""

    def __post_init__(self) -> None:
        if not is_supported(self.type):
            raise TypeError(f"unsupported output type {self.type!r}")

    @property
    def type_name(self) -> str:
        return type_name(self.type)


class NodeConfigError(ValueError):
    """A node's static configuration is invalid (raised from a node's constructor)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}" if field else message)


class Node:
    """Base class of every node.

    A subclass declares `parameters` and `outputs` and implements `run(**params)`,
    returning a mapping of output name to value. `run` may be a plain function (it runs
    inline on the event loop, so keep it short) or a coroutine function.

    A node instance is created once per workflow node at build time and shared by every
    execution, so `run` must not keep per-execution state on `self`; per-execution
    facts are available from `workflow.current_execution()`.

    Class attributes:
        parameters: declared parameters, by name.
        outputs: declared outputs, by name.
        open_inputs: accepts undeclared inputs too (typed any).
        open_outputs: may produce undeclared outputs too (typed any).
        exposable: whether the node is safe to accept in a workflow registered over the
            network. Nodes that run code given in their configuration set it to False.
        code_params: the parameters that hold code (PythonCodeNode's `code`), so that a
            server can bound their size before the node parses them.
    """

    type_name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    parameters: ClassVar[Mapping[str, Param]] = {}
    outputs: ClassVar[Mapping[str, Output]] = {}
    open_inputs: ClassVar[bool] = False
    open_outputs: ClassVar[bool] = False
    exposable: ClassVar[bool] = True
    code_params: ClassVar[tuple[str, ...]] = ()
    _is_async: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "type_name" not in cls.__dict__:
            cls.type_name = cls.__name__
        if "description" not in cls.__dict__:
            doc = inspect.getdoc(cls) or ""
            cls.description = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
        cls._is_async = inspect.iscoroutinefunction(cls.run)

    def __init__(self, node_id: str, config: Mapping[str, Any]) -> None:
        self.id = node_id
        self.config = dict(config)

    def input_specs(self) -> Mapping[str, Param]:
        """This instance's parameters. Override when they depend on the configuration."""
        return self.parameters

    def output_specs(self) -> Mapping[str, Output]:
        """This instance's outputs. Override when they depend on the configuration."""
        return self.outputs

    # `*args: Any, **params: Any` lets a subclass declare its parameters as keyword
    # arguments (`def run(self, x: int)`) without type checkers calling it an incompatible
    # override; the runtime only ever passes keywords.
    def run(self, *args: Any, **params: Any) -> Mapping[str, Any] | Awaitable[Mapping[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__}.run is not implemented")

    def check_param(self, name: str, value: Any) -> Any:
        """Check one parameter value against its declared type (used by the builder)."""
        spec = self.input_specs().get(name)
        return value if spec is None else check_value(spec.type, value)


_REGISTRY: dict[str, type[Node]] = {}

N = TypeVar("N", bound=type[Node])


def register_node(cls: N | None = None, *, name: str | None = None) -> Any:
    """Register a node class under its `type_name` (or `name`).

    Usable as `@register_node` or `@register_node(name="Other")`. Registering the same
    class again is a no-op; registering a different class under a taken name raises
    `RegistryError`.
    """

    def deco(c: N) -> N:
        if not (isinstance(c, type) and issubclass(c, Node)):
            raise RegistryError(f"{c!r} is not a Node subclass")
        key = name or c.type_name
        if not key.isidentifier():
            raise RegistryError(f"node type name {key!r} is not an identifier")
        existing = _REGISTRY.get(key)
        if existing is not None and existing is not c:
            raise RegistryError(
                f"node type {key!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}; "
                f"unregister it first or choose another name"
            )
        _REGISTRY[key] = c
        return c

    return deco(cls) if cls is not None else deco


def unregister_node(name: str) -> None:
    """Remove a node type from the registry (no error if absent)."""
    _REGISTRY.pop(name, None)


def get_node_class(name: str) -> type[Node]:
    """The node class registered under `name`; `RegistryError` if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RegistryError(f"unknown node type {name!r}{did_you_mean(name, _REGISTRY)}") from None


def node_types() -> dict[str, type[Node]]:
    """A snapshot of the registry: type name to node class."""
    return dict(_REGISTRY)


@dataclass(frozen=True)
class FunctionSignature:
    """Parameters read off a Python function's signature (used by PythonCodeNode)."""

    params: dict[str, Param] = field(default_factory=dict)

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> FunctionSignature:
        params: dict[str, Param] = {}
        hints: dict[str, Any]
        try:
            hints = inspect.get_annotations(fn, eval_str=True)
        except Exception:
            hints = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            tp = hints.get(p.name, ANY)
            if not is_supported(tp):
                tp = ANY
            default = MISSING if p.default is p.empty else p.default
            params[p.name] = Param(tp, default=default)
        return cls(params)
