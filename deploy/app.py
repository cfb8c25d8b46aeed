"""The app the deploy/ layouts serve: the image's /app/app.py.

It is examples/contacts_app.py (copied beside it in the image as contacts_app.py; put
your own app there instead), with what the replicas share taken from the environment:

- `NEXUS_DATABASE_URL`: the one PostgreSQL database every replica serves (read by
  contacts_app.py);
- `NEXUS_REDIS_URL` (optional): the rate limits' buckets in Redis, so N replicas allow
  the limit once, not N times (docs/operations.md, "Rate limits");
- `NEXUS_RATE_LIMIT` (optional, e.g. `600/minute`): the default limit per principal.

`nexus serve /app/app.py --no-envoy ...` serves it (docs/deploy.md).
"""

from __future__ import annotations

import os

from contacts_app import app

__all__ = ["app"]

if os.environ.get("NEXUS_RATE_LIMIT"):
    app.rate_limit = os.environ["NEXUS_RATE_LIMIT"]
if os.environ.get("NEXUS_REDIS_URL"):
    app.rate_limit_backend = os.environ["NEXUS_REDIS_URL"]
