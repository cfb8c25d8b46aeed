"""The Nexus gRPC server: workflows and DataFlow models served typed.

```python
from nexus_server import Nexus

app = Nexus(grpc_port=50051, api_port=8000, mcp_port=3001)
app.register("create_contact", workflow)   # the DataFlow its nodes use is served
app.start()       # gRPC, Envoy (REST) and MCP, as `nexus serve`; or: app.serving()
```
"""

from __future__ import annotations

from ._app import Nexus, Serving, UnavailableOption
from ._errors import ApiError
from ._limits import Limits
from ._typed import TypedModels, collection_id

__all__ = [
    "ApiError",
    "Limits",
    "Nexus",
    "Serving",
    "TypedModels",
    "UnavailableOption",
    "collection_id",
]
