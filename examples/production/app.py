# The original Nexus + DataFlow documents' "Production Pattern"
# (/work/shared/reference, document 000, "Production Pattern"), with only import lines
# added above it. Serve it with `nexus serve examples/production/app.py`; it reads
# DATABASE_URL (PostgreSQL or SQLite), API_PORT and MCP_PORT from the environment and,
# as `enable_auth=True` asks, needs a credential: `NEXUS_API_KEY_<NAME>=<key>` gives an
# admin key (docs/security.md). See docs/server.md, "The Production Pattern".
from nexus_server import Nexus
from dataflow import DataFlow

from .workflows import register_workflows

import os

def create_production_app():
    # Fast initialization for production
    app = Nexus(
        api_port=int(os.getenv("API_PORT", "8000")),
        mcp_port=int(os.getenv("MCP_PORT", "3001")),
        auto_discovery=False,
        enable_auth=True,
        enable_monitoring=True
    )

    db = DataFlow(
        database_url=os.getenv("DATABASE_URL"),
        enable_model_persistence=False,  # Skip model registry for fast startup
        auto_migrate=False,
        skip_migration=True,
        enable_metrics=True,
        enable_caching=True,
        connection_pool_size=20
    )

    # Register models
    from .models import Contact, Company  # Import after DataFlow creation

    # Register workflows
    register_workflows(app, db)

    return app

app = create_production_app()
