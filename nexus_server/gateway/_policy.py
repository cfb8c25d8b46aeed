"""Roles to permissions: what each role may do.

A permission is a colon-separated name:

- `workflow:<name>:execute`: run a workflow (and read its definition);
- `workflow:register`: register workflows over the API (replacing or deleting one also
  needs to be its registrant, or an admin);
- `model:<Model>:<class>`: an operation class on a model: `read` (get, list, count,
  search), `write` (create, update, upsert), `delete`, `bulk` (the bulk operations and
  BatchWrite);
- `admin`: API keys, the audit trail, every principal's executions and workflows.

A grant may use `*` for one segment (`model:*:read`, `workflow:*:execute`) or be `*`
alone (everything). The default is deny: a role has exactly what it is granted. Three
roles are built in (and can be granted more): `admin` (`*`), `reader` (`model:*:read`)
and `writer` (`model:*:read`, `model:*:write`, `model:*:delete`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

__all__ = ["BUILTIN_ROLES", "MODEL_CLASSES", "Policy", "check_role"]

#: The operation classes of a model permission.
MODEL_CLASSES = ("read", "write", "delete", "bulk")

BUILTIN_ROLES: Mapping[str, tuple[str, ...]] = {
    "admin": ("*",),
    "reader": ("model:*:read",),
    "writer": ("model:*:read", "model:*:write", "model:*:delete"),
}

_ROLE = re.compile(r"^[a-z][a-z0-9_-]{0,59}$")
_SEGMENT = r"(?:\*|[A-Za-z_][A-Za-z0-9_]{0,127})"
_PERMISSION = re.compile(
    rf"^(?:\*|admin|workflow:register|workflow:{_SEGMENT}:(?:execute|\*)"
    rf"|model:{_SEGMENT}:(?:read|write|delete|bulk|\*))$"
)


def check_role(role: str) -> str:
    """`role` if it is a valid role name (lower case, digits, `_`, `-`; at most 60)."""
    if not isinstance(role, str) or not _ROLE.match(role):
        raise ValueError(
            f"role {str(role)[:40]!r} is not a role name (lower case letters, digits, "
            "'_' and '-', starting with a letter, at most 60 characters)"
        )
    return role


class Policy:
    """Which roles hold which permissions.

    Args:
        grants: role -> permissions, added to the built-in roles.

    Example:
        Policy({"sales": ["model:Contact:read", "model:Contact:write",
                          "workflow:create_contact:execute"]})
    """

    def __init__(self, grants: Mapping[str, Iterable[str]] | None = None) -> None:
        self._grants: dict[str, set[tuple[str, ...]]] = {}
        self._cache: dict[tuple[frozenset[str], str], bool] = {}
        for role, permissions in BUILTIN_ROLES.items():
            self.grant(role, *permissions)
        for role, granted in (grants or {}).items():
            self.grant(role, *granted)

    def grant(self, role: str, *permissions: str) -> None:
        """Give `role` each of `permissions` (see the module docstring for their form).

        Raises:
            ValueError: a role name or permission that is not one.
        """
        check_role(role)
        for permission in permissions:
            if not isinstance(permission, str) or not _PERMISSION.match(permission):
                raise ValueError(
                    f"permission {str(permission)[:80]!r} of role {role!r} is not one: "
                    "expected workflow:<name>:execute, workflow:register, "
                    "model:<Model>:read|write|delete|bulk, admin, or '*' for a segment"
                )
            self._grants.setdefault(role, set()).add(tuple(permission.split(":")))
        self._cache.clear()

    def grants(self) -> dict[str, list[str]]:
        """Every role and its permissions, sorted (for docs and `nexus` output)."""
        return {r: sorted(":".join(p) for p in ps) for r, ps in sorted(self._grants.items())}

    def allows(self, roles: frozenset[str], permission: str) -> bool:
        """Whether any of `roles` holds `permission`."""
        key = (roles, permission)
        found = self._cache.get(key)
        if found is None:
            wanted = tuple(permission.split(":"))
            found = any(
                _matches(pattern, wanted)
                for role in roles
                for pattern in self._grants.get(role, ())
            )
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[key] = found
        return found


def _matches(pattern: tuple[str, ...], wanted: tuple[str, ...]) -> bool:
    if pattern == ("*",):
        return True
    return len(pattern) == len(wanted) and all(
        p in ("*", w) for p, w in zip(pattern, wanted, strict=True)
    )
