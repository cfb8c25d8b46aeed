"""Rate limits per principal: a token bucket per (scope, tenant, principal).

What a limit means (docs/operations.md, "Rate limits and load shedding"): `N/period`
with a burst `B` (by default `B = N`) is a bucket of `B` tokens that refills at `N` per
period, one token every `period / N`; each call takes one token, and a call that finds
the bucket empty is refused with RESOURCE_EXHAUSTED (`RATE_LIMITED`) and told when the
next token arrives (`google.rpc.RetryInfo`, REST `Retry-After`). A principal at rest may
therefore make `B` calls at once, then one every `period / N`; over any span `t` it makes
at most `B + N * t / period` calls.

The algorithm is pyrate-limiter's `TokenBucket` (GCRA: one theoretical arrival time per
bucket, integer microseconds), not ours: in memory its `step` runs on a dict in the event
loop (no lock needed: one loop, no await between read and write); in Redis its own Lua
script runs the same step atomically on the server, so every replica pointed at one
Redis shares one bucket per principal. The Redis buckets are stepped with the replicas'
wall clocks (`time.time()`), so the replicas' clocks should agree to well under the
refill interval (NTP does).

Which limit applies to a call (the most specific wins, each with its own bucket):

1. the workflow's (`register(..., rate_limit=...)`, `RateLimits(workflows=...)`) for
   ExecuteWorkflow and StreamExecution of that workflow;
2. the model operation's (`RateLimits(models={"Contact:write": ...})`, also
   `"Contact:*"` and `"*:bulk"`) for ModelService and the typed services;
3. the role's (`RateLimits(roles={"batch": ...})`): the most generous of the
   principal's roles that have one;
4. the default (`Nexus(rate_limit=...)`, `RateLimits(default=...)`).

Health checks and discovery (reflection, the OpenAPI document) are never limited. When
Redis cannot be reached the limiter admits the call (fails open), asks Redis again only
after 5 s, and logs a warning at most once a minute: a rate limit protects the server,
it must not take it down.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions
from pyrate_limiter import Rate, TokenBucket
from pyrate_limiter.abstracts.algorithm import Decision

from .._errors import ApiError
from ._principal import Principal

__all__ = [
    "RateLimit",
    "RateLimiter",
    "RateLimits",
    "parse_backend",
    "parse_rate",
]

_log = logging.getLogger("nexus_server")

_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}
_RATE = re.compile(
    r"^\s*(\d{1,9})\s*(?:/|per)\s*(\d{1,6})?\s*([a-z]+?)s?\s*(?:burst\s*(\d{1,9}))?\s*$"
)
_FORMS = (
    "a positive int (calls per minute), or a string like '10/s', '100/minute', "
    "'1000/hour', '100/minute burst 20'"
)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`amount` calls per `seconds`, with a bucket of `burst` tokens (default `amount`).

    Example:
        RateLimit(100, 60, burst=20)  # 100 a minute, at most 20 at once
    """

    amount: int
    seconds: int
    burst: int = 0

    def __post_init__(self) -> None:
        for name in ("amount", "seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RateLimit.{name} must be a positive int, got {value!r}")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 0:
            raise ValueError(f"RateLimit.burst must be a positive int, got {self.burst!r}")
        if self.burst == 0:
            object.__setattr__(self, "burst", self.amount)

    def __str__(self) -> str:
        unit = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}.get(self.seconds)
        text = f"{self.amount}/{unit}" if unit else f"{self.amount}/{self.seconds}s"
        return text if self.burst == self.amount else f"{text} burst {self.burst}"

    def rate(self) -> Rate:
        """The pyrate-limiter rate (interval in milliseconds)."""
        return Rate(self.amount, self.seconds * 1000, burst=self.burst)


def parse_rate(value: object, option: str) -> RateLimit:
    """A `RateLimit` from what a user writes; `option` names the option in the error.

    Accepted: a `RateLimit`; a positive int `N` (N per minute, the original's meaning);
    a string `"N/unit"`, `"N per unit"`, `"N/Munit"` (unit: s, second, m, minute, h,
    hour, d, day, optionally plural), optionally followed by `burst B`.

    Raises:
        ValueError: anything else, naming `option` and the accepted forms.
    """
    if isinstance(value, RateLimit):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return RateLimit(value, 60)
    elif isinstance(value, str):
        found = _RATE.match(value.lower())
        if found is not None:
            amount, many, unit, burst = found.groups()
            seconds = _UNITS.get(unit)
            burst_ok = burst is None or int(burst) > 0
            if seconds is not None and int(amount) > 0 and int(many or 1) > 0 and burst_ok:
                return RateLimit(int(amount), seconds * int(many or 1), int(burst or 0))
    raise ValueError(f"{option}={str(value)[:60]!r} is not a rate limit: expected {_FORMS}")


def _rates(values: Mapping[str, RateSpec] | None, option: str) -> dict[str, RateLimit]:
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{option} must be a mapping of name -> rate limit")
    return {str(k): parse_rate(v, f"{option}[{k!r}]") for k, v in values.items()}


#: What a limit may be written as (see `parse_rate`).
RateSpec = RateLimit | int | str


class RateLimits:
    """Every rate limit of an app (see the module docstring for which one applies).

    Args:
        default: every principal's limit on every call (None: no limit).
        workflows: workflow name -> its limit (ExecuteWorkflow, StreamExecution).
        models: `"<Model>:<class>"` (class: read, write, delete, bulk; `*` for either
            part) -> its limit.
        roles: role -> the limit of principals holding it (instead of the default).
        key_prefix: the prefix of every Redis key (one per app or test).

    Each limit in any `parse_rate` form (`RateLimit`, an int per minute, `"10/s"`).
    """

    def __init__(
        self,
        default: RateSpec | None = None,
        *,
        workflows: Mapping[str, RateSpec] | None = None,
        models: Mapping[str, RateSpec] | None = None,
        roles: Mapping[str, RateSpec] | None = None,
        key_prefix: str = "nexus:rate:",
    ) -> None:
        self.default = None if default is None else parse_rate(default, "RateLimits.default")
        self.workflows = _rates(workflows, "RateLimits.workflows")
        self.models = _rates(models, "RateLimits.models")
        self.roles = _rates(roles, "RateLimits.roles")
        self.key_prefix = key_prefix
        for key in self.models:
            model, _, op = key.partition(":")
            if not model or op not in ("read", "write", "delete", "bulk", "*"):
                raise ValueError(
                    f"RateLimits.models[{key!r}]: expected '<Model>:<class>' with class "
                    "read, write, delete, bulk or '*'"
                )

    def __repr__(self) -> str:
        return (
            f"RateLimits(default={self.default}, workflows={self.workflows}, "
            f"models={self.models}, roles={self.roles})"
        )

    def with_workflows(self, workflows: Mapping[str, RateLimit]) -> RateLimits:
        """These limits, with `workflows` added to (or replacing) the workflows' own."""
        return RateLimits(
            self.default,
            workflows={**self.workflows, **workflows},
            models=self.models,
            roles=self.roles,
            key_prefix=self.key_prefix,
        )

    @classmethod
    def of(cls, value: object, option: str = "Nexus(rate_limit)") -> RateLimits:
        """`value` (a `RateLimits`, or one default limit in any `parse_rate` form, or
        None) as a `RateLimits`."""
        if isinstance(value, RateLimits):
            return value
        if value is None or value is False:
            return cls()
        return cls(parse_rate(value, option))

    @property
    def empty(self) -> bool:
        return not (self.default or self.workflows or self.models or self.roles)

    def choose(
        self, principal: Principal, workflow: str | None, models: Iterable[str]
    ) -> tuple[str, RateLimit] | None:
        """The (scope, limit) of a call, or None when no limit applies."""
        if workflow is not None:
            found = self.workflows.get(workflow)
            if found is not None:
                return f"workflow:{workflow}", found
        if self.models:
            for permission in models:  # model:<Model>:<class>
                _, model, op = permission.split(":", 2)
                for key in (f"{model}:{op}", f"{model}:*", f"*:{op}", "*:*"):
                    found = self.models.get(key)
                    if found is not None:
                        return f"model:{key}", found
        if self.roles:
            best: tuple[str, RateLimit] | None = None
            for role in sorted(principal.roles):
                found = self.roles.get(role)
                if found is not None and (
                    best is None or found.amount / found.seconds > best[1].amount / best[1].seconds
                ):
                    best = (f"role:{role}", found)
            if best is not None:
                return best
        if self.default is not None:
            return "default", self.default
        return None


def parse_backend(value: object, option: str = "Nexus(rate_limit_backend)") -> str | None:
    """`None` (in memory), `"memory"`, or a `redis://[user:password@]host[:port][/db]`
    URL; anything else is a ValueError naming `option`."""
    if value is None or value == "memory":
        return None
    if isinstance(value, str):
        parts = urlsplit(value)
        if parts.scheme == "redis" and parts.hostname:
            try:
                int(parts.path.strip("/") or 0)
                _ = parts.port
            except ValueError:
                pass
            else:
                return value
    raise ValueError(
        f"{option}: expected None or 'memory' (in this process) or a URL "
        "'redis://host:port/db' (shared by replicas), got a value that is neither"
    )


class _Store(Protocol):
    async def check(self, key: str, rate: Rate) -> Decision: ...

    async def close(self) -> None: ...


_ALGORITHM = TokenBucket()


class _MemoryStore:
    """Buckets in this process: key -> the bucket's theoretical arrival time."""

    #: Checks between sweeps of full (idle) buckets.
    _SWEEP = 4096

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, ...]] = {}
        self._checks = 0

    async def check(self, key: str, rate: Rate) -> Decision:
        now = int(time.monotonic() * 1000)
        state = self._state.get(key)
        if state is None:
            state = _ALGORITHM.initial([rate])
        new, decision = _ALGORITHM.step([rate], state, now, 1)
        if decision.allowed:
            self._state[key] = new
        self._checks += 1
        if self._checks >= self._SWEEP:
            self._sweep(now)
        return decision

    def _sweep(self, now_ms: int) -> None:
        """Forget buckets that are full again (their arrival time has passed): a
        forgotten bucket starts full, exactly as it is."""
        self._checks = 0
        now_us = now_ms * 1000
        for key in [k for k, (tat, *_) in self._state.items() if tat <= now_us]:
            del self._state[key]

    async def close(self) -> None:
        self._state.clear()


#: Seconds the limiter admits calls without asking Redis after Redis failed (so that an
#: unreachable Redis costs one bounded wait every few seconds, not one per call).
_RETRY_REDIS = 5.0


class _RedisStore:
    """Buckets in Redis, one hash per key, stepped by pyrate-limiter's Lua script."""

    def __init__(self, url: str) -> None:
        # every command bounded: an unreachable Redis costs one short wait, then the
        # limiter admits calls without it for `_RETRY_REDIS` seconds
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=1.0, socket_connect_timeout=1.0, max_connections=16
        )
        self._script = _ALGORITHM.redis_script() or ""
        self._sha = hashlib.sha1(self._script.encode()).hexdigest()
        self._warned = 0.0
        self._down_until = 0.0

    async def check(self, key: str, rate: Rate) -> Decision:
        if self._down_until and time.monotonic() < self._down_until:
            return Decision()  # Redis failed a moment ago: no call waits for it again
        now = int(time.time() * 1000)
        ttl = max(1, -(-2 * rate.burst * rate.interval // rate.limit))
        args: list[str] = [str(now), "1", str(ttl), "1"]
        args += [str(a) for a in _ALGORITHM.redis_args([rate])]
        try:
            try:
                reply = await self._client.evalsha(self._sha, 1, key, *args)
            except redis.exceptions.NoScriptError:  # first use on this Redis: load it
                reply = await self._client.eval(self._script, 1, key, *args)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + _RETRY_REDIS
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                _log.warning("rate limits: Redis unreachable (%s): calls are admitted", exc)
            return Decision()
        self._down_until = 0.0
        index, retry = int(reply[0]), int(reply[1])
        if index < 0:
            return Decision()
        return Decision(failing_rate=rate, retry_after_ms=max(retry, 0))

    async def close(self) -> None:
        await self._client.aclose()


class RateLimiter:
    """Admits or refuses each call against its principal's bucket (the gateway calls
    `admit` once a call is authenticated and authorized).

    Args:
        limits: the limits (`RateLimits`).
        backend: None for buckets in this process, or a `redis://` URL.
    """

    def __init__(self, limits: RateLimits, backend: str | None = None) -> None:
        self.limits = limits
        self._store: _Store = _RedisStore(backend) if backend else _MemoryStore()
        self._rates: dict[RateLimit, Rate] = {}
        self.refused = 0

    async def admit(
        self, principal: Principal, workflow: str | None, models: Iterable[str] = ()
    ) -> None:
        """Take one token of the call's bucket, or raise `RATE_LIMITED`.

        Args:
            principal: who calls.
            workflow: the workflow an ExecuteWorkflow/StreamExecution runs, else None.
            models: the call's model permissions (`model:<Model>:<class>`).

        Raises:
            ApiError: RATE_LIMITED, with the delay (`retry_after`).
        """
        chosen = self.limits.choose(principal, workflow, models)
        if chosen is None:
            return
        scope, limit = chosen
        rate = self._rates.get(limit)
        if rate is None:
            rate = self._rates[limit] = limit.rate()
        key = f"{self.limits.key_prefix}{scope}\x1f{principal.tenant or ''}\x1f{principal.id}"
        decision = await self._store.check(key, rate)
        if decision.allowed:
            return
        self.refused += 1
        delay = (decision.retry_after_ms or 1) / 1000
        raise ApiError(
            "RATE_LIMITED",
            f"rate limit exceeded ({limit}, {scope}): retry in {_seconds(delay)}",
            metadata={"limit": str(limit), "scope": scope[:200]},
            retry_after=delay,
        )

    async def close(self) -> None:
        await self._store.close()


def _seconds(delay: float) -> str:
    return f"{delay:.1f} s" if delay < 10 else f"{delay:.0f} s"
