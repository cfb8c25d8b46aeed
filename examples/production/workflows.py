"""`register_workflows(app, db)`: the production app's models and workflows.

The models become `db`'s (their generated nodes `ContactCreateNode`, `ContactListNode`,
... exist from then on), then each workflow is registered on `app`: a write
(`create_contact`) and two reads, whose replies `cache_ttl` keeps for 30 s per caller.
"""

from __future__ import annotations

from dataflow import DataFlow
from nexus_server import Nexus
from workflow import Workflow, WorkflowBuilder

from .models import Company, Contact


def create_contact_workflow() -> Workflow:
    workflow = WorkflowBuilder()
    workflow.add_node(
        "ContactCreateNode",
        "create",
        {"name": "{{name}}", "email": "{{email}}", "company": "{{company}}"},
    )
    return workflow.build()


def get_contact_workflow() -> Workflow:
    workflow = WorkflowBuilder()
    workflow.add_node("ContactReadNode", "read", {"id": "{{id}}"})
    return workflow.build()


def list_companies_workflow() -> Workflow:
    workflow = WorkflowBuilder()
    workflow.add_node("CompanyListNode", "list", {"limit": 100})
    return workflow.build()


def register_workflows(app: Nexus, db: DataFlow) -> None:
    db.model(Contact)
    db.model(Company)
    app.register("create_contact", create_contact_workflow())
    app.register("get_contact", get_contact_workflow(), cache_ttl=30)
    app.register("list_companies", list_companies_workflow(), cache_ttl=30)
