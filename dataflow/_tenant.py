"""The current tenant: which tenant's rows the operations of tenant-scoped models see.

The tenant lives in a context variable, so it follows the code that runs on behalf of
one caller: a ``with tenant_scope(...)`` block, the coroutines it awaits and the asyncio
tasks created inside it (a workflow run by the engine inside the block, say), and no
other. The server sets it for each call from the authenticated principal; DataFlow
never takes it from a caller's data.
"""

from __future__ import annotations

import contextvars
from types import TracebackType

from ._errors import ValidationError

__all__ = ["MAX_TENANT_CHARS", "current_tenant", "tenant_scope"]

#: The longest tenant accepted (characters).
MAX_TENANT_CHARS = 256

_TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "dataflow_tenant", default=None
)


def current_tenant() -> str | None:
    """The tenant of the current context (None: no `tenant_scope` is active, or the
    innermost one is ``tenant_scope(None)``)."""
    return _TENANT.get()


class tenant_scope:  # lower case: used like a function, ``with tenant_scope("acme"):``
    """Run a block as one tenant: every operation of a tenant-scoped model inside it
    reads only that tenant's rows and stamps it on every row it writes.

    ```python
    with tenant_scope("acme"):
        note = await db.ops(Note).create(text="hi")  # note["tenant_id"] == "acme"
    ```

    A plain (sync) context manager, usable in async code: the tenant is a context
    variable, so tasks created inside the block inherit it. Scopes nest; leaving one
    restores the tenant that was current before it. ``tenant_scope(None)`` runs a block
    without a tenant (operations on tenant-scoped models then raise `TenantRequired`).

    Raises:
        ValidationError: on ``tenant``: not a string or None, empty, longer than
            `MAX_TENANT_CHARS`, or containing a NUL character.
    """

    __slots__ = ("_token", "tenant")

    def __init__(self, tenant: str | None) -> None:
        if tenant is not None:
            if not isinstance(tenant, str):
                raise ValidationError("tenant", "expects a string (or None)")
            if not tenant or len(tenant) > MAX_TENANT_CHARS or "\x00" in tenant:
                raise ValidationError(
                    "tenant",
                    f"must be 1 to {MAX_TENANT_CHARS} characters without NUL",
                )
        self.tenant = tenant
        self._token: contextvars.Token[str | None] | None = None

    def __enter__(self) -> str | None:
        if self._token is not None:
            raise RuntimeError("this tenant_scope is already active; make a new one")
        self._token = _TENANT.set(self.tenant)
        return self.tenant

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        token, self._token = self._token, None
        if token is not None:
            _TENANT.reset(token)
