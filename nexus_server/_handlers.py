"""Rewriting the method handlers of a generic RPC handler, once per method.

The server registers every service as generic handlers (see `GenericHandlersOnly`);
the request decoding guard and the gateway chain each turn a method handler into
another one. `map_methods` applies such a function to every method of a handler: a
service made by `grpc.method_handlers_generic_handler` is rebuilt with its methods
mapped (no per-call cost beyond the new handlers); any other handler is wrapped, each
method mapped on its first call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["MethodMap", "map_methods"]

#: (full method path `/pkg.Service/Method`, its handler) -> the handler to serve instead.
MethodMap = Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]


def map_methods(handler: grpc.GenericRpcHandler, fn: MethodMap) -> grpc.GenericRpcHandler:
    """`handler` with every method handler replaced by `fn(path, method_handler)`."""
    methods = getattr(handler, "_method_handlers", None)
    name = getattr(handler, "service_name", None)
    if isinstance(methods, dict) and callable(name):
        service = name()
        prefix = f"/{service}/"
        return grpc.method_handlers_generic_handler(
            service,
            {
                path.removeprefix(prefix): fn(path, h)
                for path, h in methods.items()
                if path.startswith(prefix)
            },
        )
    return _Mapped(handler, fn)


class _Mapped(grpc.GenericRpcHandler):  # type: ignore[misc]
    """A generic handler whose methods are mapped on first use of each."""

    def __init__(self, inner: grpc.GenericRpcHandler, fn: MethodMap) -> None:
        self._inner = inner
        self._fn = fn
        self._methods: dict[str, grpc.RpcMethodHandler] = {}

    def service_name(self) -> str | None:
        name = getattr(self._inner, "service_name", None)
        return name() if callable(name) else None

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method: str = handler_call_details.method
        try:
            return self._methods[method]
        except KeyError:
            pass
        found = self._inner.service(handler_call_details)
        if found is None:
            return None  # not remembered: callers choose unknown method names
        mapped = self._fn(method, found)
        self._methods[method] = mapped
        return mapped
