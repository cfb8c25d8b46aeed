"""`nexus serve` with ExecuteWorkflow's execution replaced by a reference, for the
reference rows under bench/grpc.py's noop figures. A bench tool only, never served.

`BENCH_REFERENCE` in the environment picks the reference:

- `constant`: every call is answered with the reply of the first one (run for real):
  the same server, gateway chain and decoding guard as `nexus serve`, without running
  or recording anything. What it reaches against the bare echo server is the ceiling
  of the noop ratio: gRPC, the gateway and the (de)serializers alone.
- `record`: every call makes the record of a finished execution (a new id, the times,
  the caller, the first call's outputs with their JSON text), queues it for the
  record writer and answers it, as an execution does after its workflow ran: no input
  checks, no workflow run, no events, no bookkeeping of running executions. What it
  reaches is the ceiling of any execution that is recorded in this process; the gap
  between it and `constant` is what recording alone costs.

The gap between these rows and `ExecuteWorkflow noop` is what the rest of running an
execution costs.

Run as `nexus serve`: `BENCH_REFERENCE=record python -m bench._reference_reply serve
APP [options]`.
"""

from __future__ import annotations

import datetime as _dt
import os
import sys
from typing import Any

from nexus_server import _workflow_service
from nexus_server._cli import main
from nexus_server._convert import execution_message, from_struct
from nexus_server._executions import new_execution_id
from nexus_server._jsonable import stored_json
from nexus_server._store import ExecutionRecord
from nexus_server.gateway import caller_id

_execute = _workflow_service.WorkflowServicer.ExecuteWorkflow
_first: Any = None
_outputs: dict[str, Any] = {}


async def _first_reply(self: Any, request: Any, context: Any) -> Any:
    """The reply of the first call, which runs for real; the outputs kept with it."""
    global _first, _outputs
    if _first is None:
        _first = await _execute(self, request, context)
        _outputs = from_struct(_first.outputs)
    return _first


async def _record(self: Any, request: Any, context: Any) -> Any:
    await _first_reply(self, request, context)
    encoded = stored_json(_outputs)  # encoded per call, as an execution's outputs are
    assert encoded is not None
    now = _dt.datetime.now(_dt.UTC)
    rec = ExecutionRecord(
        id=new_execution_id(),
        workflow=request.name,
        state="SUCCEEDED",
        caller=caller_id(),
        request_id=None,
        request_hash=None,
        inputs={},
        outputs=encoded[0],
        error=None,
        create_time=now,
        start_time=now,
        end_time=_dt.datetime.now(_dt.UTC),
        outputs_json=encoded,
    )
    self.executions.writer.put(rec)
    return execution_message(rec)


_REFERENCES = {"constant": _first_reply, "record": _record}

if __name__ == "__main__":
    reference = os.environ.get("BENCH_REFERENCE", "")
    if reference not in _REFERENCES:
        sys.exit(f"BENCH_REFERENCE must be one of {', '.join(_REFERENCES)}, not {reference!r}")
    # before the app starts: the servicer's methods are looked up when it is registered
    _workflow_service.WorkflowServicer.ExecuteWorkflow = _REFERENCES[reference]  # type: ignore[method-assign]
    sys.exit(main())
