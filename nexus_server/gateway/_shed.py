"""Load shedding: a cap on the calls a server runs at once.

Past `Limits.max_in_flight` calls in progress (or `Limits.max_executions` workflow
executions, ExecuteWorkflow and StreamExecution), a new call is refused at once with
RESOURCE_EXHAUSTED (`OVERLOADED`) and a `google.rpc.RetryInfo` delay, before anything
else is done for it (no credential check, no decoding): under overload the server keeps
serving the calls it admitted at their usual latency instead of queueing every call and
making each one slow. Health checks are never shed (an orchestrator must see a busy
server as alive).

The counters are plain integers: every call runs on the server's one event loop.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

from .._errors import ApiError, abort

__all__ = ["Shedder"]

#: The delay a refused call is told to wait: long enough for the calls in flight to
#: drain a little, short enough not to idle a server that recovered.
RETRY_AFTER = 1.0


class Shedder:
    """Counts calls in flight and refuses those past the caps.

    Args:
        max_in_flight: calls in progress at once (None: no cap).
        max_executions: executions in progress at once (None: no cap).
    """

    def __init__(self, max_in_flight: int | None, max_executions: int | None = None) -> None:
        self.max_in_flight = max_in_flight
        self.max_executions = max_executions
        self.in_flight = 0
        self.executions = 0
        self.refused = 0
        #: called with `calls` or `executions` for each refusal (the metrics' hook)
        self.on_refused: Callable[[str], None] | None = None

    def _refusal(self, execution: bool) -> ApiError:
        self.refused += 1
        if execution:
            what, cap, key = "executions", self.max_executions, "max_executions"
        else:
            what, cap, key = "calls", self.max_in_flight, "max_in_flight"
        if self.on_refused is not None:
            self.on_refused(what)
        return ApiError(
            "OVERLOADED",
            f"the server is at its limit of {cap} {what} in progress; retry in {RETRY_AFTER:.0f} s",
            metadata={key: str(cap)},
            retry_after=RETRY_AFTER,
        )

    def _enter(self, execution: bool) -> ApiError | None:
        if self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
            return self._refusal(False)
        if execution and self.max_executions is not None:
            if self.executions >= self.max_executions:
                return self._refusal(True)
            self.executions += 1
        self.in_flight += 1
        return None

    def _exit(self, execution: bool) -> None:
        self.in_flight -= 1
        if execution and self.max_executions is not None:
            self.executions -= 1

    def wrap(self, behaviour: Callable[..., Any], *, execution: bool) -> Callable[..., Any]:
        """`behaviour` (a method handler's coroutine or async generator function)
        counted against the caps, refused with OVERLOADED past them."""
        if inspect.isasyncgenfunction(behaviour):

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                refusal = self._enter(execution)
                if refusal is not None:
                    await abort(context, refusal)
                try:
                    async for item in behaviour(request, context):
                        yield item
                finally:
                    self._exit(execution)

            return stream

        async def call(request: Any, context: Any) -> Any:
            refusal = self._enter(execution)
            if refusal is not None:
                await abort(context, refusal)
            try:
                return await behaviour(request, context)
            finally:
                self._exit(execution)

        return call
