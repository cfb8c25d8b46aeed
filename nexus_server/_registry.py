"""The registry of workflows a server exposes."""

from __future__ import annotations

import asyncio
import datetime as _dt
import re
from dataclasses import dataclass

from workflow import Workflow, closest

from ._errors import ApiError, brief

__all__ = ["NAME_RULE", "Registered", "WorkflowRegistry", "check_name", "no_room", "shown"]

#: A workflow name must be usable as a URL path segment, a CLI command and (behind
#: `run_`) an MCP tool name of at most 64 characters.
NAME_RULE = re.compile(r"^[a-z][a-z0-9_]{0,59}$")

#: Characters of a caller's value that a message repeats (a name is at most 60 long;
#: anything longer is cut, so that an error never grows with the request).
SHOWN_CHARS = 60


def shown(value: str) -> str:
    """`value` as messages quote it: its repr, cut to about `SHOWN_CHARS` characters."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS + 2 else text[: SHOWN_CHARS + 1] + "..."


def no_room(limit: int) -> ApiError:
    """The error of a registration past `Limits.max_workflows` (see `check_room`)."""
    return ApiError(
        # CONSTRAINT_VIOLATION until errors.proto has a reason of its own for it
        "CONSTRAINT_VIOLATION",
        f"this server holds {limit} workflows registered over the network, its "
        "limit (Limits.max_workflows); delete one first",
        [("name", f"no room for another workflow (limit {limit})")],
        {"limit": "max_workflows", "max": str(limit)},
    )


def check_name(name: str) -> None:
    """Reject a workflow name that could never be called, saying why."""
    if not NAME_RULE.match(name):
        raise ApiError(
            "WORKFLOW_NAME_INVALID",
            f"invalid workflow name {shown(name)}: use 1 to 60 lowercase letters, digits or "
            "'_', starting with a letter",
            [("name", "must match ^[a-z][a-z0-9_]{0,59}$")],
        )


@dataclass(frozen=True)
class Registered:
    """A workflow and how it got here: `builtin` when registered in code by the app;
    `owner`, the principal that registered it over the API (empty for the app's own);
    `public`, anyone may run it, with or without a credential; `cache_ttl`, seconds its
    replies are cached (a read-only workflow; see gateway._response_cache)."""

    workflow: Workflow
    builtin: bool
    update_time: _dt.datetime
    owner: str = ""
    public: bool = False
    cache_ttl: float | None = None


class WorkflowRegistry:
    """Workflows by name, with a version counter that watchers can wait on."""

    def __init__(self) -> None:
        self._items: dict[str, Registered] = {}
        self.version = 0
        self._changed = asyncio.Event()

    def add(
        self,
        name: str,
        wf: Workflow,
        *,
        builtin: bool,
        replace: bool = True,
        limit: int | None = None,
        owner: str = "",
        public: bool = False,
        cache_ttl: float | None = None,
        update_time: _dt.datetime | None = None,
    ) -> Registered:
        """Register `wf` as `name`. `limit`: the most workflows registered over the
        network (`builtin=False`) there may be, checked when `name` is a new one.
        `update_time`: when it was registered (default: now; a registration read from
        the database keeps its own)."""
        check_name(name)
        if not isinstance(wf, Workflow):
            raise TypeError(f"expected a built Workflow (call .build()), got {type(wf).__name__}")
        if not replace and name in self._items:
            raise ApiError(
                "WORKFLOW_ALREADY_EXISTS",
                f"workflow {brief(name)} already exists (set replace to overwrite it)",
                [("name", "already registered")],
            )
        if limit is not None and not builtin:
            self.check_room(name, limit)
        when = update_time or _dt.datetime.now(_dt.UTC)
        item = Registered(wf, builtin, when, owner, public, cache_ttl)
        self._items[name] = item
        self._bump()
        return item

    def check_room(self, name: str, limit: int) -> None:
        """Refuse a new network-registered workflow when `limit` of them exist already.

        FAILED_PRECONDITION (HTTP 400), not RESOURCE_EXHAUSTED (HTTP 429): the registry
        is full until someone deletes a workflow, so retrying the same call later does
        not help the way it does after a rate limit.
        """
        if name in self._items:
            return  # a replacement takes no more room
        if self._registered >= limit:
            raise no_room(limit)

    @property
    def _registered(self) -> int:
        return sum(1 for item in self._items.values() if not item.builtin)

    def remove(self, name: str) -> None:
        self.get(name)
        del self._items[name]
        self._bump()

    def get(self, name: str) -> Registered:
        try:
            return self._items[name]
        except KeyError:
            pass
        # the closest registered name, in the message (every channel shows it) and in
        # the ErrorInfo's metadata (`suggestion`, for clients that offer it)
        best = closest(name, self._items)
        hint = f" (did you mean {best}?)" if best else ""
        metadata = {"workflow": name[:SHOWN_CHARS]}
        if best:
            metadata["suggestion"] = best
        raise ApiError(
            "WORKFLOW_NOT_FOUND",
            f"workflow {shown(name)} not found{hint}",
            [("name", f"no workflow is registered under this name{hint}")],
            metadata,
        )

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def _bump(self) -> None:
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_changed(self, seen_version: int) -> int:
        """Return once the registry's version differs from `seen_version`."""
        while self.version == seen_version:
            await self._changed.wait()
        return self.version
