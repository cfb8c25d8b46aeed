"""DataFlow's exceptions: the one boundary where database driver errors become ours.

Every error a caller can see from DataFlow is a `DataFlowError`. The server maps each
subclass to one gRPC status code (not found, already exists, invalid argument, aborted,
failed precondition), so a driver exception never reaches a client.
"""

from __future__ import annotations

__all__ = [
    "AlreadyExistsError",
    "ConflictError",
    "DataFlowError",
    "DatabaseError",
    "MigrationError",
    "ModelError",
    "NotFoundError",
    "SchemaMissingError",
    "TenantRequired",
    "UniqueViolation",
    "ValidationError",
]


class DataFlowError(Exception):
    """Base class of every DataFlow error."""


class ModelError(DataFlowError, TypeError):
    """A model declaration is invalid (unsupported annotation, bad option, redefinition)."""


class ValidationError(DataFlowError, ValueError):
    """A value, filter, field name or option given to an operation is invalid.

    Nothing was written. Raised before the database is asked whenever possible.

    Attributes:
        field: the field (or parameter, such as ``filter`` or ``order_by``) at fault.
        reason: why it was rejected, in words.
        row: the index of the offending row in a bulk operation's ``data`` (else None).
    """

    def __init__(self, field: str, reason: str, *, row: int | None = None) -> None:
        self.field = field
        self.reason = reason
        self.row = row
        where = f"row {row}: " if row is not None else ""
        super().__init__(f"{where}{field}: {reason}" if field else f"{where}{reason}")


class TenantRequired(DataFlowError):
    """An operation on a tenant-scoped model ran without a current tenant
    (`dataflow.tenant_scope`). Nothing was read or written: without a tenant there is
    no way to tell which rows the caller may see, so the call is refused rather than
    run over every tenant's rows.

    Attributes:
        model: the model's name.
    """

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"model {model} is tenant-scoped: this call has no tenant")


class NotFoundError(DataFlowError, LookupError):
    """The record an operation addresses does not exist."""

    def __init__(self, model: str, key: object) -> None:
        self.model = model
        self.key = key
        # the key is a caller's input: the message shows at most about 60 characters
        try:
            text = repr(key[:61] if isinstance(key, str) else key)
        except ValueError:  # an int too long to print
            text = "(too long to show)"
        if len(text) > 60:
            text = text[:57] + "..."
        super().__init__(f"{model} {text} not found")


class AlreadyExistsError(DataFlowError):
    """A write would duplicate a primary key or a unique field; nothing was written.

    Attributes:
        model: the model written to.
        fields: the unique fields concerned, when the database says which.
        row: the bulk row index, when known.
    """

    def __init__(
        self, model: str, fields: tuple[str, ...] = (), detail: str = "", *, row: int | None = None
    ) -> None:
        self.model = model
        self.fields = fields
        self.row = row
        what = ", ".join(fields) if fields else "a unique key"
        where = f"row {row}: " if row is not None else ""
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{where}{model}: a record with the same {what} already exists{extra}")


#: Another name for `AlreadyExistsError`, for callers who think in SQL terms.
UniqueViolation = AlreadyExistsError


class ConflictError(DataFlowError):
    """The operation conflicts with the state of the database (for instance an update by
    filter that matches several records, or a transaction that could not be serialised)."""


class MigrationError(DataFlowError):
    """The database schema differs from the models in a way DataFlow will not change by
    itself (a dropped column, a changed type). Nothing was changed.

    Attributes:
        differences: one human-readable line per difference.
    """

    def __init__(self, differences: list[str]) -> None:
        self.differences = list(differences)
        lines = "\n".join(f"  - {d}" for d in self.differences)
        super().__init__(
            f"the database schema differs from the models in {len(self.differences)} way(s) "
            f"that auto_migrate will not apply (nothing was changed):\n{lines}"
        )


class DatabaseError(DataFlowError):
    """The database failed in a way that is not the caller's fault (connection lost,
    server error). The message names the operation; the driver's exception is not
    exposed.

    Attributes:
        unreachable: the database could not be reached (connection refused, reset or
            lost, a timeout), as opposed to failing a statement: what DataFlow's circuit
            breaker counts (`dataflow.CircuitBreaker`).
    """

    unreachable = False


class SchemaMissingError(MigrationError, DatabaseError):
    """A model's table does not exist in the database (never created: DataFlow was told
    to skip migration, or it was dropped since). The message names the table and the
    options that create it (``search=True``: the table's full-text search index, see
    `ModelOps.search`). A MigrationError (a server answers FAILED_PRECONDITION: the
    database is reachable and retrying will not help) and, as before, a DatabaseError."""

    def __init__(self, table: str, model: str | None = None, *, search: bool = False) -> None:
        thing = f"the full-text search index of table {table!r}" if search else f"table {table!r}"
        self.differences = [f"missing {thing.removeprefix('the ')}"]
        self.table = table
        what = f"{model}: " if model else ""
        DataFlowError.__init__(
            self,
            f"{what}{'' if search else 'the '}{thing} does not exist; DataFlow creates it at "
            f"start with auto_migrate=True and skip_migration=False",
        )
