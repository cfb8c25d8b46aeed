"""The Nexus gRPC server: workflows and DataFlow models served typed.

```python
from nexus_server import Nexus

app = Nexus(grpc_port=50051, api_port=8000, mcp_port=3001)
app.register("create_contact", workflow)   # the DataFlow its nodes use is served
app.start()       # gRPC, Envoy (REST) and MCP, as `nexus serve`; or: app.serving()
```

Identity and access (`enable_auth=True`, `AuthConfig`, `Policy`): docs/security.md.
"""

from __future__ import annotations

from ._app import AuthNotConfigured, Nexus, Serving
from ._errors import ApiError
from ._limits import Limits
from ._queue import QueueOptions
from ._typed import TypedModels, collection_id
from .gateway import Policy
from .gateway._config import ApiKeySpec, AuthConfig
from .gateway._rate import RateLimit, RateLimits

__all__ = [
    "ApiError",
    "ApiKeySpec",
    "AuthConfig",
    "AuthNotConfigured",
    "Limits",
    "Nexus",
    "Policy",
    "QueueOptions",
    "RateLimit",
    "RateLimits",
    "Serving",
    "TypedModels",
    "collection_id",
]
