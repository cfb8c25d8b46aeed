"""`nexus serve` with ExecuteWorkflow's execution replaced by a constant reply.

The reference row of bench/grpc.py's noop figures: the same server, gateway chain and
decoding guard as `nexus serve`, but ExecuteWorkflow answers every call with the reply of
its first one (run for real) instead of running the workflow and recording it. What it
reaches against the bare echo server is the ceiling of the noop ratio: gRPC, the
gateway and the (de)serializers alone; the gap between it and `ExecuteWorkflow noop`
is what running and recording an execution costs. A bench tool only, never served.

Run as `nexus serve`: `python -m bench._constant_reply serve APP [options]`.
"""

from __future__ import annotations

import sys
from typing import Any

from nexus_server import _workflow_service
from nexus_server._cli import main

_execute = _workflow_service.WorkflowServicer.ExecuteWorkflow
_reply: Any = None


async def _constant(self: Any, request: Any, context: Any) -> Any:
    global _reply
    if _reply is None:
        _reply = await _execute(self, request, context)
    return _reply


# before the app starts: the servicer's methods are looked up when it is registered
_workflow_service.WorkflowServicer.ExecuteWorkflow = _constant  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
