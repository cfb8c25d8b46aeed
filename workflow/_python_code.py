"""PythonCodeNode: run a code string or a Python function as a node.

This is a trusted-code feature: the code runs in-process with the server's rights.
The node is marked `exposable = False` so that a server refuses it in workflows
registered over the network unless its operator allows code explicitly.
"""

from __future__ import annotations

import ast
import builtins
import inspect
from collections.abc import Callable, Mapping
from types import CodeType
from typing import Any

from ._node import FunctionSignature, Node, NodeConfigError, Output, Param, register_node
from ._template import is_template
from ._types import ANY

__all__ = ["PythonCodeNode"]

_BUILTINS = frozenset(dir(builtins))


def _free_names(tree: ast.AST) -> list[str]:
    """Names the code reads but never binds: the variables it expects as inputs."""
    loaded: dict[str, None] = {}
    bound: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name):
            if isinstance(n.ctx, ast.Load):
                loaded.setdefault(n.id, None)
            else:
                bound.add(n.id)
        elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(n.name)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
        elif isinstance(n, ast.alias):
            bound.add((n.asname or n.name).split(".")[0])
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
        elif isinstance(n, ast.Global | ast.Nonlocal):
            bound.update(n.names)
    return [name for name in loaded if name not in bound and name not in _BUILTINS]


@register_node
class PythonCodeNode(Node):
    """Runs Python code: a `code` string (inputs are variables, `result` is the output) or a
    `function` (inputs are its arguments, its return value is the output).

    When `result` (or the return value) is a dict, each key is an output; otherwise the
    single output is `result`. The variables the code reads without assigning are its
    required inputs, found when the workflow is built.
    """

    parameters = {
        "code": Param(str, required=False, description="Python statements setting `result`"),
        "function": Param(ANY, required=False, description="a Python function to call instead"),
    }
    outputs = {"result": Output(ANY, description="the value of `result`")}
    open_outputs = True
    exposable = False
    code_params = ("code",)

    def __init__(self, node_id: str, config: Mapping[str, Any]) -> None:
        super().__init__(node_id, config)
        code = config.get("code")
        fn = config.get("function")
        self._code: CodeType | None = None
        self._fn: Callable[..., Any] | None = None
        self._params: dict[str, Param]
        if (code is None) == (fn is None):
            raise NodeConfigError("code", "give exactly one of 'code' (a string) or 'function'")
        if fn is not None:
            if not callable(fn):
                raise NodeConfigError("function", f"expected a callable, got {type(fn).__name__}")
            self._fn = fn
            self._fn_async = inspect.iscoroutinefunction(fn)
            # the function itself is configuration: the runtime passes it back to run()
            self._params = {"function": self.parameters["function"]}
            for name, spec in FunctionSignature.of(fn).params.items():
                if name in self._params:
                    raise NodeConfigError("function", f"argument name {name!r} is reserved")
                self._params[name] = spec
            return
        if not isinstance(code, str):
            raise NodeConfigError("code", f"expected str, got {type(code).__name__}")
        if is_template(code):
            # the code is compiled once at build time, so a placeholder in it would never
            # be filled in
            raise NodeConfigError(
                "code",
                "placeholders are not allowed in code; pass the input as a variable "
                'instead, e.g. {"name": "{{name}}"}',
            )
        try:
            tree = ast.parse(code, filename=f"<node {node_id}>", mode="exec")
            self._code = compile(tree, f"<node {node_id}>", "exec")
        except SyntaxError as exc:
            raise NodeConfigError("code", f"syntax error at line {exc.lineno}: {exc.msg}") from None
        except ValueError:  # Python 3.11 says so for a NUL character
            raise NodeConfigError("code", "code must not contain NUL characters") from None
        except (RecursionError, MemoryError):
            # the parser's and the compiler's own depth limits: an expression nested too
            # deeply (a long chain of unary operators, say) is refused, never a crash
            raise NodeConfigError(
                "code", "code is nested too deeply to compile; split the expression"
            ) from None
        self._params = {"code": self.parameters["code"]}
        for name in _free_names(tree):
            self._params[name] = Param(ANY, description="variable read by the code")
        for name in config:
            if name not in self._params:
                self._params[name] = Param(ANY, required=False, description="code variable")

    def input_specs(self) -> Mapping[str, Param]:
        return self._params

    async def run(self, **params: Any) -> Mapping[str, Any]:
        if self._fn is not None:
            params.pop("function", None)
            value = self._fn(**params)
            if self._fn_async:
                value = await value
        else:
            params.pop("code", None)
            namespace: dict[str, Any] = params
            assert self._code is not None
            exec(self._code, namespace)  # trusted code: see the module docstring
            if "result" not in namespace:
                raise ValueError("the code did not set `result`")
            value = namespace["result"]
        if isinstance(value, dict):
            return value
        return {"result": value}
