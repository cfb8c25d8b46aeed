"""The access log: one JSON line per call, on the `nexus.access` logger.

Each line holds `time` (UTC, RFC 3339 with milliseconds), `principal`, `channel`,
`method`, `code` (the gRPC status name), `duration_ms`, `request_id` and `trace_id`
(empty when the call has none). Envoy writes its access log in the same format, with the
HTTP status and path besides (`_envoy.ACCESS_LOG_FORMAT`), so one parser reads both.

The request id is the request's `request_id` field when it has one (the idempotency key
a client retries with), else the `x-request-id` header (Envoy sets one on every REST
call, so Envoy's line and the server's share it). The trace id is the current
OpenTelemetry span's when tracing is on, else the one of a W3C `traceparent` header.

A line is built only when the logger is enabled for INFO (`nexus serve` enables it; an
embedding program chooses with `logging`): otherwise the log costs one level check.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["ACCESS_LOG", "access_line", "configure_access_log", "log_call", "trace_id_of"]

ACCESS_LOG = logging.getLogger("nexus.access")

#: Longest request id or principal written (longer ones are cut).
_MAX_FIELD = 256


def configure_access_log(stream: Any = None) -> None:
    """Write the access log as bare JSON lines on `stream` (default: stderr), not through
    the root logger's format (which would prefix each line): what `nexus serve` and
    `Nexus.start()` do. A logger an embedding program configured itself (it has a
    handler) is left as it is."""
    if ACCESS_LOG.handlers:
        return
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ACCESS_LOG.addHandler(handler)
    ACCESS_LOG.propagate = False


def trace_id_of(metadata: Sequence[tuple[str, Any]]) -> str:
    """The call's trace id: the current OpenTelemetry span's, else the one of its
    `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), else empty."""
    otel = sys.modules.get("opentelemetry.trace")  # only when tracing loaded it
    if otel is not None:
        ctx = otel.get_current_span().get_span_context()
        if ctx.is_valid:
            return f"{ctx.trace_id:032x}"
    for key, value in metadata:
        if key == "traceparent" and isinstance(value, str):
            parts = value.split("-")
            if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
                try:
                    int(parts[1], 16)
                except ValueError:
                    return ""
                return parts[1].lower()
            return ""
    return ""


def _request_id(request: Any, metadata: Sequence[tuple[str, Any]]) -> str:
    value = getattr(request, "request_id", "")
    if isinstance(value, str) and value:
        return value[:_MAX_FIELD]
    for key, header in metadata:
        if key == "x-request-id" and isinstance(header, str):
            return header[:_MAX_FIELD]
    return ""


def access_line(
    *,
    method: str,
    channel: str,
    principal: str,
    code: str,
    seconds: float,
    request: Any,
    metadata: Sequence[tuple[str, Any]],
) -> str:
    """The JSON line of one call (see the module docstring for its fields)."""
    now = _dt.datetime.now(_dt.UTC)
    return json.dumps(
        {
            "time": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "principal": principal[:_MAX_FIELD],
            "channel": channel,
            "method": method,
            "code": code,
            "duration_ms": round(seconds * 1e3, 3),
            "request_id": _request_id(request, metadata),
            "trace_id": trace_id_of(metadata),
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


def log_call(
    *,
    method: str,
    channel: str,
    principal: str,
    code: str,
    seconds: float,
    request: Any,
    context: Any,
) -> None:
    """Write the access line of a call that ended, if the log is enabled."""
    if not ACCESS_LOG.isEnabledFor(logging.INFO):
        return
    metadata = context.invocation_metadata() or ()
    ACCESS_LOG.info(
        "%s",
        access_line(
            method=method,
            channel=channel,
            principal=principal,
            code=code,
            seconds=seconds,
            request=request,
            metadata=metadata,
        ),
    )
