"""The app the fault tests serve with `nexus serve` as a real subprocess.

- `Entry` (`name`, `email`): email is deliberately NOT unique, so a request that runs
  twice shows up as two rows with its email instead of hiding behind a constraint.
- `create_entry(name, email)`: one EntryCreateNode, the write load of the crash and
  outage tests.
- `Item` (`s`, optional): tiny rows for the bulk-size resource test (`{}` and
  `{"s": null}` are both valid rows).
- `FileGateNode(gate)`: waits (bounded, 60 s) until the file `gate` exists, so a test
  holds an execution running on one replica while other replicas watch or cancel it
  (a node type only: the cluster test registers its workflow over the network).

Configured by the environment: `NEXUS_DATABASE_URL` (the database),
`NEXUS_FAULTS_HEALTH_INTERVAL` (seconds between database health checks, default 0.25,
so an outage shows in health quickly) and `NEXUS_FAULTS_ALLOW_CODE` (`1`: accept
PythonCodeNode over the network, so a huge code node reaches the size checks instead of
the code-node refusal).
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
from typing import Any

from dataflow import DataFlow, field
from nexus_server import Nexus
from workflow import Node, Output, Param, WorkflowBuilder, register_node

app = Nexus(
    grpc_port=0,
    health_check_interval=float(os.environ.get("NEXUS_FAULTS_HEALTH_INTERVAL", "0.25")),
    allow_code_nodes=os.environ.get("NEXUS_FAULTS_ALLOW_CODE") == "1",
    grace_period=1.0,
)
db = DataFlow(os.environ["NEXUS_DATABASE_URL"])


@db.model
class Entry:
    """One write of the load; a duplicate run leaves two rows with its email."""

    id: str
    name: str
    email: str = field(index=True)


@db.model
class Item:
    """A tiny row for bulk requests."""

    id: str
    s: str | None = None


app.integrate_dataflow(db)

create_entry = WorkflowBuilder("Create an entry.")
create_entry.add_input("name", str)
create_entry.add_input("email", str)
create_entry.add_node("EntryCreateNode", "create", {"name": "{{name}}", "email": "{{email}}"})
app.register("create_entry", create_entry.build())


@register_node
class FileGateNode(Node):
    """Waits until the file `gate` exists (at most 60 s)."""

    type_name = "FileGateNode"
    parameters = {"gate": Param(str)}
    outputs = {"opened": Output(bool)}

    async def run(self, gate: str) -> dict[str, Any]:
        path, end = pathlib.Path(gate), time.monotonic() + 60
        # the test (another process) creates the file: nothing to await but the disk
        while not await asyncio.to_thread(path.exists):
            if time.monotonic() >= end:
                break
            await asyncio.sleep(0.05)
        return {"opened": await asyncio.to_thread(path.exists)}
