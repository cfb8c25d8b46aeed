"""Clients of the Nexus gRPC server: Python client, CLI, MCP adapter."""

from __future__ import annotations

__all__: list[str] = []
