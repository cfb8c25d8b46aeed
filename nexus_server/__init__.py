"""The Nexus gRPC server: workflows and DataFlow models served typed.

```python
from nexus_server import Nexus

app = Nexus(grpc_port=50051)
app.integrate_dataflow(db)
app.register("create_contact", workflow)
app.start()                    # or: async with app.serving() as info: ...
```
"""

from __future__ import annotations

from ._app import Nexus, Serving
from ._errors import ApiError
from ._limits import Limits
from ._typed import TypedModels, collection_id

__all__ = ["ApiError", "Limits", "Nexus", "Serving", "TypedModels", "collection_id"]
