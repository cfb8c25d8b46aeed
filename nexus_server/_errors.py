"""The one place where exceptions become gRPC statuses.

`ApiError` is what servicers raise for the caller's mistakes they detect themselves;
`to_api_error` maps every other exception through one ordered table (exception type ->
`ErrorReason`). The gRPC code of each reason is declared once, in
`proto/nexus/common/v1/errors.proto`, and read from the descriptors here, so the table,
the contract and Envoy's HTTP mapping cannot drift apart. Anything not in the table is
INTERNAL with a generic message (the exception is logged, never sent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import dataflow
import workflow
from nexus_api.nexus.common.v1 import errors_pb2

__all__ = [
    "DOMAIN",
    "ApiError",
    "StatusError",
    "abort",
    "code_of",
    "status_of",
    "to_api_error",
]

DOMAIN = "nexus"
_log = logging.getLogger("nexus_server")


def code_of(reason: str) -> grpc.StatusCode:
    """The gRPC code the contract declares for an `ErrorReason` name."""
    value = errors_pb2.ErrorReason.DESCRIPTOR.values_by_name[reason]
    code_number = value.GetOptions().Extensions[errors_pb2.code]
    return _CODES[code_number]


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class ApiError(Exception):
    """An error with its reason, message, field violations and metadata.

    Args:
        reason: an `ErrorReason` name from errors.proto (decides the gRPC code).
        message: the developer-facing message.
        violations: `(field, description)` pairs for `BadRequest.field_violations`.
        metadata: extra `ErrorInfo.metadata` (string values).
    """

    def __init__(
        self,
        reason: str,
        message: str,
        violations: Sequence[tuple[str, str]] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self.reason = reason
        self.code = code_of(reason)
        self.message = message
        self.violations = list(violations)
        self.metadata = dict(metadata or {})
        super().__init__(message)

    def to_status(self) -> status_pb2.Status:
        """The `google.rpc.Status` with `ErrorInfo` (and `BadRequest` when fields are bad)."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=DOMAIN, metadata=self.metadata
        )
        packed = any_pb2.Any()
        packed.Pack(info)
        status.details.append(packed)
        if self.violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.violations
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad)
            status.details.append(packed)
        return status


class StatusError(Exception):
    """Ends a call with a status made earlier (a finished execution's stored error),
    adding the execution id to its `ErrorInfo.metadata`."""

    def __init__(self, status: status_pb2.Status, *, execution_id: str = "") -> None:
        self.status = status
        if execution_id:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    info.metadata["execution_id"] = execution_id
                    detail.Pack(info)
        super().__init__(status.message)


def _problem_field(p: workflow.Problem) -> str:
    return ".".join(x for x in ("definition", "nodes", p.node, p.field) if x)


def _from_workflow_invalid(exc: workflow.WorkflowValidationError) -> ApiError:
    violations = [(_problem_field(p), p.message) for p in exc.problems]
    return ApiError("WORKFLOW_INVALID", str(exc), violations)


def _from_inputs(exc: workflow.InvalidInputsError) -> ApiError:
    violations = [(f"inputs.{e.input}", e.message) for e in exc.errors]
    return ApiError("INPUTS_INVALID", str(exc), violations)


#: DataFlow's ValidationError fields that are about the query, not a record's values.
_QUERY_PARTS = {
    "filter": "QUERY_INVALID",
    "order_by": "QUERY_INVALID",
    "fields": "QUERY_INVALID",
    "conflict_on": "REQUEST_INVALID",
}


def _from_validation(exc: dataflow.ValidationError) -> ApiError:
    field = exc.field if exc.row is None else f"records[{exc.row}].{exc.field}"
    meta = {"row": str(exc.row)} if exc.row is not None else {}
    head = exc.field.split(".", 1)[0].split("[", 1)[0]
    if head == "page_token":
        return ApiError("PAGE_TOKEN_INVALID", str(exc), [(field, exc.reason)], meta)
    reason = _QUERY_PARTS.get(head, "RECORD_INVALID")
    return ApiError(reason, str(exc), [(field, exc.reason)], meta)


def _from_node(exc: workflow.NodeExecutionError) -> ApiError:
    meta = {"node_id": exc.node_id, "node_type": exc.node_type}
    if exc.cause is not None:
        inner = _mapped(exc.cause)
        if inner is not None:
            inner.metadata.update(meta)
            inner.message = str(exc)
            return inner
    return ApiError("NODE_FAILED", str(exc), metadata=meta)


def _mapped(exc: BaseException) -> ApiError | None:
    if isinstance(exc, ApiError):
        return exc
    for etype, make in _TABLE:
        if isinstance(exc, etype):
            return make(exc)
    return None


# Ordered: the first matching type wins, so subclasses come before their bases.
_TABLE: list[tuple[type[BaseException], Callable[[Any], ApiError]]] = [
    (workflow.WorkflowValidationError, _from_workflow_invalid),
    (workflow.InvalidInputsError, _from_inputs),
    (workflow.NodeExecutionError, _from_node),
    (workflow.ExecutionTimeoutError, lambda e: ApiError("EXECUTION_TIMEOUT", str(e))),
    (workflow.ExecutionCancelledError, lambda e: ApiError("EXECUTION_CANCELLED", str(e))),
    (workflow.RegistryError, lambda e: ApiError("WORKFLOW_INVALID", str(e))),
    (dataflow.ValidationError, _from_validation),
    (dataflow.NotFoundError, lambda e: ApiError("RECORD_NOT_FOUND", str(e))),
    (dataflow.AlreadyExistsError, lambda e: ApiError("RECORD_ALREADY_EXISTS", str(e))),
    (dataflow.ConflictError, lambda e: ApiError("TRANSACTION_CONFLICT", str(e))),
    (dataflow.MigrationError, lambda e: ApiError("CONSTRAINT_VIOLATION", str(e))),
    (dataflow.DatabaseError, lambda e: ApiError("DATABASE_UNAVAILABLE", str(e))),
    (asyncio.CancelledError, lambda e: ApiError("EXECUTION_CANCELLED", "the call was cancelled")),
]


def to_api_error(exc: BaseException) -> ApiError:
    """Map any exception to an `ApiError`; unknown ones become INTERNAL and are logged."""
    mapped = _mapped(exc)
    if mapped is not None:
        return mapped
    _log.error("unexpected error", exc_info=exc)
    return ApiError("INTERNAL_ERROR", "internal error (logged on the server)")


def status_of(exc: BaseException) -> status_pb2.Status:
    """The `google.rpc.Status` for any exception (used for stored execution errors)."""
    return to_api_error(exc).to_status()


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the call with the status of `exc`, details in `grpc-status-details-bin`."""
    status = exc.status if isinstance(exc, StatusError) else to_api_error(exc).to_status()
    rich = rpc_status.to_status(status)
    await context.abort(rich.code, rich.details, trailing_metadata=rich.trailing_metadata)
    raise AssertionError("unreachable")  # context.abort raises


assert code_pb2.OK == 0  # the numbering grpc.StatusCode and google.rpc.Code share
