"""DataFlow: annotated classes become tables and generated CRUD workflow nodes."""

from __future__ import annotations

__all__: list[str] = []
