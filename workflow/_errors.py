"""Exceptions of the workflow engine.

Each carries structured fields (node, parameter, input) so that the server can turn it
into a gRPC status with field violations without parsing messages.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ExecutionCancelledError",
    "ExecutionTimeoutError",
    "InputError",
    "InvalidInputsError",
    "NodeExecutionError",
    "Problem",
    "RegistryError",
    "WorkflowError",
    "WorkflowValidationError",
]


class WorkflowError(Exception):
    """Base class of every error raised by the workflow engine."""


class RegistryError(WorkflowError):
    """A node type is unknown, or two different nodes claim one name."""


@dataclass(frozen=True)
class Problem:
    """One reason a workflow does not build.

    Attributes:
        node: the node id the problem is about ("" for workflow-level problems).
        field: the parameter, input or output concerned ("" when none).
        message: what is wrong, in words.
    """

    node: str
    field: str
    message: str

    def __str__(self) -> str:
        where = ".".join(p for p in (self.node, self.field) if p)
        return f"{where}: {self.message}" if where else self.message


class WorkflowValidationError(WorkflowError):
    """`build()` (or a definition) found problems; all of them are listed."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"workflow is invalid ({len(self.problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class InputError:
    """One bad execution input: its name and why it was rejected."""

    input: str
    message: str

    def __str__(self) -> str:
        return f"{self.input}: {self.message}"


class InvalidInputsError(WorkflowError):
    """Execution parameters were missing, unknown or of the wrong type; no node ran."""

    def __init__(self, errors: list[InputError]) -> None:
        self.errors = list(errors)
        super().__init__("invalid inputs: " + "; ".join(str(e) for e in self.errors))


class NodeExecutionError(WorkflowError):
    """A node raised (or returned something unusable) while running."""

    def __init__(self, node_id: str, node_type: str, cause: BaseException | str) -> None:
        self.node_id = node_id
        self.node_type = node_type
        self.cause = cause if isinstance(cause, BaseException) else None
        reason = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
        self.reason = reason
        super().__init__(f"node '{node_id}' ({node_type}) failed: {reason}")


class ExecutionTimeoutError(WorkflowError):
    """The execution ran longer than its timeout and was stopped."""

    def __init__(self, timeout: float, running: list[str]) -> None:
        self.timeout = timeout
        self.running = running
        nodes = ", ".join(running) or "none"
        super().__init__(f"execution timed out after {timeout:g}s (running nodes: {nodes})")


class ExecutionCancelledError(WorkflowError):
    """Raised by the synchronous runtime when the execution was cancelled."""
