"""Who a call is from: the `Principal` every check of the gateway reads.

A principal comes only from a verified credential when authentication is on (an API key
or a JWT); with authentication off it is the development label (`x-nexus-caller`, else
`anonymous`), holding every right, as before authentication existed.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

__all__ = [
    "ADMIN",
    "CURRENT_PRINCIPAL",
    "AuthError",
    "Principal",
]

#: The role that holds every permission and sees every principal's executions.
ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one call.

    Attributes:
        id: `key:<name>` for an API key, `jwt:<subject>` for a token, the development
            label when authentication is off (`anonymous` without one).
        roles: the roles granted (from the key, or the token's roles claim).
        tenant: the tenant its calls act in (from the key, or the token's tenant claim);
            None for none.
        authentication: `api_key`, `jwt`, or `none` (authentication off, or no
            credential on a public method).
    """

    id: str
    roles: frozenset[str]
    tenant: str | None
    authentication: str

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.roles


#: The principal of the call being served (set by the gateway chain for the handler and
#: everything it awaits, workflow nodes included).
CURRENT_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "nexus_principal", default=None
)


class AuthError(Exception):
    """A credential was refused: UNAUTHENTICATED with `reason` (`CREDENTIALS_MISSING`,
    `CREDENTIALS_INVALID`, `CREDENTIALS_EXPIRED`). The message says which check failed
    and never contains the credential."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
