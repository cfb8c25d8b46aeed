"""AuditService: reading the audit trail over gRPC (and REST, `GET /v1/auditEvents`).

Who may call it is the gateway's concern (the `admin` permission); this servicer only
reads the table.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, TypeAlias

from nexus_api.nexus.audit.v1 import audit_service_pb2 as apb
from nexus_api.nexus.audit.v1 import audit_service_pb2_grpc as agrpc

from .._convert import page_size
from .._errors import ApiError, abort
from ._audit import MAX_PRINCIPAL, AuditRecord, AuditTrail

__all__ = ["AuditServicer"]

# grpc ships no type information: its servicer context is Any to the type checker
Context: TypeAlias = Any

#: Seconds a listing waits for queued entries to be stored before it reads the table
#: (the database may be down: the listing then answers with what is stored, or fails).
FLUSH_WAIT = 2.0

# No ErrorReason says "a feature of the server is switched off"; of the reasons whose
# code is FAILED_PRECONDITION, this one ("the database refuses the operation") is the
# nearest. One name, so that a dedicated reason replaces it in one place.
_TABLE_OFF = "AUDIT_TABLE_DISABLED"


def _event_message(record: AuditRecord) -> apb.AuditEvent:
    """The AuditEvent of a stored entry."""
    e = record.entry
    msg = apb.AuditEvent(
        id=record.id,
        principal=e.principal,
        tenant=e.tenant or "",
        channel=e.channel,
        method=e.method,
        resource=e.resource,
        request_id=e.request_id,
        code=e.code,
        reason=e.reason,
    )
    msg.time.FromDatetime(e.time)
    return msg


class AuditServicer(agrpc.AuditServiceServicer):
    """Implements nexus.audit.v1.AuditService over an `AuditTrail`."""

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    async def ListAuditEvents(
        self, request: apb.ListAuditEventsRequest, context: Context
    ) -> apb.ListAuditEventsResponse:
        try:
            size = page_size(request.page_size)
            if not self.trail.table:
                raise ApiError(
                    _TABLE_OFF,
                    "the audit table is not enabled on this server (audit entries are "
                    "only logged); start it with Nexus(audit_table=True) to list them",
                )
            principal = request.principal
            if len(principal) > MAX_PRINCIPAL or "\x00" in principal:
                raise ApiError(
                    "REQUEST_INVALID",
                    "principal is not a principal id",
                    [("principal", f"contains NUL or is longer than {MAX_PRINCIPAL} characters")],
                )
            # list what has been recorded up to this call, as far as the database lets
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.trail.flush(), FLUSH_WAIT)
            records, token = await self.trail.list(
                size,
                request.page_token,
                principal=principal,
                failed_only=request.failed_only,
            )
            return apb.ListAuditEventsResponse(
                events=[_event_message(r) for r in records], next_page_token=token
            )
        except Exception as exc:
            await abort(context, exc)
