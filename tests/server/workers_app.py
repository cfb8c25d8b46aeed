"""The app `tests/server/test_workers.py` serves with `nexus serve --workers 2`.

Its database is `NEXUS_DATABASE_URL` (a SQLite file or a PostgreSQL database of the
test's own; pools of 5 connections), with DataFlow's metrics; Envoy and the metrics port
on free ports (`GET /metrics` through Envoy too), no MCP adapter. Workflows:

- `note(text)`: creates a `Note` (a write, for concurrent writes from both workers);
- `hold(gate)`: one `GateFileNode`, which writes `<gate>.started` (its pid) in the
  folder `WORKERS_TEST_GATES` and waits until the test creates `<gate>.go` there
  (at most a minute), so that a call is surely in flight when the test stops the server.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from dataflow import DataFlow
from nexus_server import Nexus
from workflow import Node, Output, Param, WorkflowBuilder, register_node

#: Seconds a held call waits for its gate at most.
GATE_TIMEOUT = 60.0

app = Nexus(
    grpc_port=0,
    api_port=0,
    mcp_port=None,
    enable_monitoring=True,
    metrics_port=0,
    expose_metrics=True,
    grace_period=30.0,
)
db = DataFlow(os.environ["NEXUS_DATABASE_URL"], enable_metrics=True, connection_pool_size=5)


@db.model
class Note:
    """A note: what the concurrent writes write."""

    id: str
    text: str


app.integrate_dataflow(db)


@register_node
class GateFileNode(Node):
    """Says it started (a file), then waits until the test opens its gate (a file)."""

    type_name = "GateFileNode"
    parameters = {"gate": Param(str)}
    outputs = {"pid": Output(int)}

    async def run(self, gate: str) -> dict[str, Any]:
        folder = Path(os.environ["WORKERS_TEST_GATES"])
        (folder / f"{gate}.started").write_text(str(os.getpid()))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GATE_TIMEOUT
        while not (folder / f"{gate}.go").exists():
            if loop.time() > deadline:
                raise TimeoutError(f"gate {gate} was not opened")
            await asyncio.sleep(0.02)
        return {"pid": os.getpid()}


note = WorkflowBuilder("Create a note.")
note.add_input("text", str)
note.add_node("NoteCreateNode", "create", {"text": "{{text}}"})
app.register("note", note.build())

hold = WorkflowBuilder("Wait until the test opens a gate.")
hold.add_input("gate", str)
hold.add_node("GateFileNode", "hold", {"gate": "{{gate}}"})
app.register("hold", hold.build())
