"""The gateway: every check a call passes before a servicer runs it, in one place.

The chain (`_chain`) wraps every method handler of the server; for each call it
authenticates the credential (`_authn`), checks the permission the method needs against
the principal's roles (`_policy`), sets the principal and its tenant for the call, and
records the audit entry (`_audit`). Every channel (gRPC, REST and gRPC-Web through Envoy,
the CLI, MCP) is a client of the server, so each is checked the same way.
"""

from __future__ import annotations

from ._chain import CHANNELS, Gateway, caller_id
from ._policy import BUILTIN_ROLES, Policy
from ._principal import ADMIN, CURRENT_PRINCIPAL, AuthError, Principal
from ._response_cache import CACHE_HEADER, ResponseCache, check_cache_ttl, check_read_only

__all__ = [
    "ADMIN",
    "BUILTIN_ROLES",
    "CACHE_HEADER",
    "CHANNELS",
    "CURRENT_PRINCIPAL",
    "AuthError",
    "Gateway",
    "Policy",
    "Principal",
    "ResponseCache",
    "caller_id",
    "check_cache_ttl",
    "check_read_only",
]
