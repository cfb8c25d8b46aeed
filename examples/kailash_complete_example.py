# The original Nexus + DataFlow documents' "Complete Working Example"
# (/work/shared/reference, "Complete Working Example"), ported by changing only its
# import lines. Run it with `python examples/kailash_complete_example.py` or
# `nexus serve examples/kailash_complete_example.py`; see docs/server.md,
# "The original's Complete Working Example".
from nexus_server import Nexus
from dataflow import DataFlow
from workflow import WorkflowBuilder

# Fast initialization
app = Nexus(
    api_port=8000,
    mcp_port=3001,
    auto_discovery=False  # CRITICAL
)

db = DataFlow(
    database_url="postgresql://localhost:5432/mydb",
    enable_model_persistence=False,  # CRITICAL: Skip model registry for fast startup
    auto_migrate=False,
    skip_migration=True,
    enable_metrics=True,  # Keep monitoring
    enable_caching=True,  # Keep caching
    connection_pool_size=20  # Keep pooling
)

# Define models (instant!)
@db.model
class Contact:
    id: str
    name: str
    email: str
    company: str

@db.model
class Company:
    id: str
    name: str
    industry: str

# Create workflow using DataFlow nodes
def create_contact_workflow():
    workflow = WorkflowBuilder()

    # Use DataFlow's auto-generated nodes
    workflow.add_node("ContactCreateNode", "create", {
        "name": "{{name}}",
        "email": "{{email}}",
        "company": "{{company}}"
    })

    return workflow.build()

# Register workflow
app.register("create_contact", create_contact_workflow())

# Start (fast!)
app.start()
