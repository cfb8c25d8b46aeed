"""The example app: contacts and companies, served on every channel.

Based on the original Nexus + DataFlow docs: two models, a workflow that creates a
contact and one that lists them by a part of their name; contacts' names and companies
are full-text searchable (`nexus contacts search "ada"`, `GET /v1/contacts:search?q=ada`).
`make run` serves it on the embedded SQLite default (`nexus.db` in the working directory):

    nexus serve examples/contacts_app.py

Then, for instance, with grpcurl (reflection is on):

    grpcurl -plaintext \\
        -d '{"name": "create_contact", "inputs": {"name": "Ada", "email": "ada@x.org"}}' \\
        127.0.0.1:50051 nexus.workflow.v1.WorkflowService/ExecuteWorkflow
"""

from __future__ import annotations

import os

from dataflow import DataFlow, field
from nexus_server import Nexus
from workflow import WorkflowBuilder

app = Nexus(
    grpc_port=int(os.environ.get("NEXUS_GRPC_PORT", "50051")),
    api_port=8000,
    mcp_port=3001,
    auto_discovery=False,
)
db = DataFlow(os.environ.get("NEXUS_DATABASE_URL"), enable_model_persistence=True)


@db.model
class Company:
    """A company contacts work for."""

    id: str
    name: str = field(unique=True)
    industry: str | None = None
    employees: int = 0


@db.model
class Contact:
    """A person to keep in touch with."""

    id: str
    name: str = field(searchable=True)
    email: str = field(unique=True, description="where to write to")
    company: str | None = field(default=None, searchable=True)
    score: int = 0


app.integrate_dataflow(db)

create_contact = WorkflowBuilder("Create a contact.")
create_contact.add_input("name", str, description="the contact's full name")
create_contact.add_input("email", str, description="the contact's email address")
create_contact.add_input("company", str | None, default=None, description="their company")
create_contact.add_node(
    "ContactCreateNode",
    "create",
    {"name": "{{name}}", "email": "{{email}}", "company": "{{company}}"},
)
app.register("create_contact", create_contact.build())

search_contacts = WorkflowBuilder("Find contacts whose name contains a text.")
search_contacts.add_input("query", str, description="text the name contains (any case)")
search_contacts.add_input("min_score", int, default=0, description="lowest score to list")
search_contacts.add_input("limit", int, default=20, description="at most this many contacts")
search_contacts.add_node(
    "ContactListNode",
    "search",
    {
        "filter": {"name": {"$ilike": "%{{query}}%"}, "score": {"$gte": "{{min_score}}"}},
        "order_by": ["-score", "name"],
        "limit": "{{limit}}",
    },
)
app.register("search_contacts", search_contacts.build())

if __name__ == "__main__":
    app.start()
