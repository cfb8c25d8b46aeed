"""The app of the access matrix: one tenant-scoped model, one workflow, two roles, and
the audit trail stored in the app's database.

- `Note` (tenant-scoped): `title`, and `batch`, the matrix cell that wrote it, so the
  checker counts each cell's rows on its own;
- `add_note(title, batch)`: creates a Note in the caller's tenant (one node);
- roles: `matrix` holds every permission the four operations need (execute `add_note`,
  read and bulk-delete Notes, and the single delete the MCP channel has instead of a
  bulk one; register workflows); `outsider` holds permissions none of them needs
  (writing Notes, running another workflow), so its principal is valid, sees the model,
  and is refused each operation.

Loaded by path from `conftest.py` (test folders are not packages).
"""

from __future__ import annotations

from dataflow import DataFlow
from nexus_server import Nexus, Policy
from workflow import WorkflowBuilder

__all__ = [
    "EXECUTE_PERMISSION",
    "MODEL",
    "OPERATION_PERMISSIONS",
    "OUTSIDER",
    "ROLE",
    "WORKFLOW",
    "build_app",
]

MODEL = "Note"
WORKFLOW = "add_note"
#: The role the "valid with the role" credentials hold.
ROLE = "matrix"
#: The role the "valid without the role" credentials hold.
OUTSIDER = "outsider"

EXECUTE_PERMISSION = f"workflow:{WORKFLOW}:execute"
#: The permission each operation of the matrix needs (what a refusal names).
OPERATION_PERMISSIONS = {
    "execute": EXECUTE_PERMISSION,
    "read": f"model:{MODEL}:read",
    "bulk_delete": f"model:{MODEL}:bulk",
    "delete": f"model:{MODEL}:delete",
    "register": "workflow:register",
}


def build_app(db_url: str) -> Nexus:
    """The matrix app on `db_url`, gRPC and Envoy on ports the OS picks, auth on."""
    policy = Policy(
        {
            ROLE: [
                EXECUTE_PERMISSION,
                "workflow:register",
                f"model:{MODEL}:read",
                f"model:{MODEL}:write",
                f"model:{MODEL}:delete",
                f"model:{MODEL}:bulk",
            ],
            OUTSIDER: [f"model:{MODEL}:write", "workflow:unrelated:execute"],
        }
    )
    app = Nexus(
        grpc_port=0,
        api_port=0,
        mcp_port=None,
        grace_period=1.0,
        enable_auth=True,
        policy=policy,
        audit_table=True,
    )
    db = DataFlow(db_url)

    @db.model(tenant_scoped=True)
    class Note:
        """A note of one tenant."""

        id: str
        title: str
        batch: str

    app.integrate_dataflow(db)
    add = WorkflowBuilder("Add a note.")
    add.add_input("title", str, description="the note's title")
    add.add_input("batch", str, description="the matrix cell writing it")
    add.add_node("NoteCreateNode", "create", {"title": "{{title}}", "batch": "{{batch}}"})
    app.register(WORKFLOW, add.build())
    return app
