"""The Nexus gRPC server (filled in by the server issue)."""

from __future__ import annotations

__all__: list[str] = []
