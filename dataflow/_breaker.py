"""`CircuitBreaker`: fail fast while a dependency is unreachable, instead of making
every call wait for a connection attempt of its own.

The breaker counts failures that mean "cannot reach it" (connection refused, reset or
lost; timeouts), never a refusal of the call itself (a constraint violation, a bad
query). After `failures` of them in a row it opens: calls are refused at once with
`CircuitOpenError` (which says when to retry). After `reset_after` seconds it half-opens:
the next call is let through as the one trial, the others are still refused; the trial
closes the breaker when it succeeds and opens it again when it fails.

Every `DataFlow` has one around its database (`DataFlow(breaker=...)`, `DataFlow.breaker`);
a node guards any other dependency with a breaker of its own:

```python
payments = CircuitBreaker("payments", failures=5, reset_after=10.0)

async def charge(order):
    async with payments.attempt():  # CircuitOpenError at once while open
        return await client.post("/charges", json=order)
```

The closed path costs one attribute read before a call and one after it (`quiet`:
closed with no failure counted), so a healthy dependency pays next to nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, ParamSpec, TypeVar

from ._errors import DatabaseError, DataFlowError, ValidationError

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "BreakerOptions",
    "BreakerState",
    "CircuitBreaker",
    "CircuitOpenError",
    "is_unreachable",
]

BreakerState = Literal["closed", "open", "half_open"]
CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

#: The shortest delay a refusal tells the caller to wait (seconds).
MIN_RETRY_AFTER = 0.1

_log = logging.getLogger("dataflow")

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class BreakerOptions:
    """When a circuit breaker opens and when it tries again.

    Attributes:
        failures: failures in a row (each meaning "cannot reach it") that open the
            breaker. A success in between starts the count again.
        reset_after: seconds the breaker stays open before it lets one trial call
            through (half-open).

    Raises:
        ValidationError: on ``breaker.failures`` (not a positive integer) or
            ``breaker.reset_after`` (not a positive finite number of seconds).
    """

    failures: int = 5
    reset_after: float = 5.0

    def __post_init__(self) -> None:
        f = self.failures
        if not isinstance(f, int) or isinstance(f, bool) or f < 1:
            raise ValidationError("breaker.failures", f"expects a positive integer, got {f!r}")
        r = self.reset_after
        if not isinstance(r, int | float) or isinstance(r, bool) or not math.isfinite(r) or r <= 0:
            raise ValidationError(
                "breaker.reset_after", f"expects a positive number of seconds, got {r!r}"
            )


class CircuitOpenError(DataFlowError):
    """A call refused at once because its dependency's circuit breaker is open: the
    dependency failed to answer `failures` times in a row. Nothing was sent, so nothing
    was written. A server answers UNAVAILABLE with reason ``DEPENDENCY_UNAVAILABLE`` and
    a ``google.rpc.RetryInfo`` of `retry_after`.

    Attributes:
        dependency: the breaker's name (``"database"`` for DataFlow's own).
        retry_after: seconds until the breaker lets a trial call through.
        failures: the failures in a row that opened it.
    """

    def __init__(self, dependency: str, retry_after: float, failures: int) -> None:
        self.dependency = dependency
        self.retry_after = retry_after
        self.failures = failures
        super().__init__(
            f"{dependency} unavailable: {failures} attempt(s) in a row could not reach it, "
            f"so calls fail fast (circuit breaker open); retry in {retry_after:.1f} s"
        )


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` means the dependency could not be reached: a connection refused,
    reset or lost, a timeout (`OSError`, `TimeoutError`), a `DatabaseError` DataFlow
    marked ``unreachable``, or another breaker's `CircuitOpenError`. What a breaker
    counts unless told otherwise (`CircuitBreaker(is_failure=...)`)."""
    if isinstance(exc, CircuitOpenError):
        return True
    if isinstance(exc, DatabaseError):
        return exc.unreachable
    return isinstance(exc, OSError | TimeoutError)


class CircuitBreaker:
    """A circuit breaker around one dependency (see the module's documentation).

    Use `attempt()` (a context manager, sync or async) or `call()`; or, to classify
    outcomes yourself, `admit()` before the call and `success()`, `failure()` or
    `release()` after it. Safe to share between tasks and threads.

    Args:
        name: the dependency's name, shown in errors, health and metrics.
        failures: failures in a row that open the breaker.
        reset_after: seconds open before one trial call.
        is_failure: which exceptions count as failures (default `is_unreachable`);
            any other exception neither counts nor resets the count.
        clock: monotonic seconds (tests may pass their own).

    Raises:
        ValidationError: a bad `failures` or `reset_after` (as `BreakerOptions`).
    """

    def __init__(
        self,
        name: str = "dependency",
        *,
        failures: int = 5,
        reset_after: float = 5.0,
        is_failure: Callable[[BaseException], bool] = is_unreachable,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = BreakerOptions(failures, reset_after)
        self.name = name
        self.is_failure = is_failure
        self._clock = clock
        self._lock = threading.Lock()
        self._state: BreakerState = CLOSED
        #: Closed with no failure counted: nothing to do before or after a call (the
        #: one attribute the hot path reads).
        self.quiet = True
        self._run = 0  # failures in a row
        self._until = 0.0  # open: when a trial may start; half-open: when the trial lapses
        self._listeners: list[Callable[[BreakerState, BreakerState], None]] = []
        #: Times the breaker opened (from closed or after a failed trial).
        self.opened_total = 0
        #: Calls refused because it was open.
        self.rejected_total = 0
        #: Failures counted (each meaning "cannot reach it").
        self.failures_total = 0

    @classmethod
    def from_options(cls, name: str, options: BreakerOptions) -> CircuitBreaker:
        """A breaker named `name` with `options`."""
        return cls(name, failures=options.failures, reset_after=options.reset_after)

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.state}>"

    # -- reading --------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """``"closed"`` (calls go through), ``"open"`` (calls are refused) or
        ``"half_open"`` (the delay has passed: the next call is the trial, or the trial
        is under way)."""
        state = self._state
        if state == OPEN and self._clock() >= self._until:
            return HALF_OPEN
        return state

    @property
    def consecutive_failures(self) -> int:
        """Failures counted since the last success."""
        return self._run

    def retry_after(self) -> float:
        """Seconds a refused caller should wait (0.0 when closed)."""
        if self._state == CLOSED:
            return 0.0
        left = min(self._until - self._clock(), self.options.reset_after)
        return max(left, MIN_RETRY_AFTER)

    def snapshot(self) -> dict[str, Any]:
        """The breaker as JSON-friendly data (the health document's ``breaker``
        component): ``status`` (``healthy`` while closed, else ``unhealthy``),
        ``state``, ``dependency``, ``consecutive_failures``, ``opened_total``,
        ``rejected_total``, ``failures_total``, and ``retry_after`` (seconds, while
        not closed)."""
        state = self.state
        doc: dict[str, Any] = {
            "status": "healthy" if state == CLOSED else "unhealthy",
            "state": state,
            "dependency": self.name,
            "consecutive_failures": self._run,
            "opened_total": self.opened_total,
            "rejected_total": self.rejected_total,
            "failures_total": self.failures_total,
        }
        if state != CLOSED:
            doc["retry_after"] = round(self.retry_after(), 3)
        return doc

    def add_listener(self, listener: Callable[[BreakerState, BreakerState], None]) -> None:
        """Call `listener(old, new)` at every change of state (a metrics gauge, a log).
        The change from open to half-open is reported when the trial call starts.
        A listener's exception is logged and ignored."""
        self._listeners.append(listener)

    # -- recording ------------------------------------------------------------------

    def admit(self) -> bool:
        """Before a call: return whether it is the half-open trial (False for an
        ordinary call), or refuse it.

        Raises:
            CircuitOpenError: the breaker is open, or half-open with the trial under way.
        """
        if self.quiet:
            return False
        changed: tuple[BreakerState, BreakerState] | None = None
        with self._lock:
            state = self._state
            if state == CLOSED:
                return False
            now = self._clock()
            if now < self._until:  # open and waiting, or a trial under way
                self.rejected_total += 1
                error = CircuitOpenError(
                    self.name,
                    max(min(self._until - now, self.options.reset_after), MIN_RETRY_AFTER),
                    self._run,
                )
            else:  # this call is the trial (the first, or one after a trial lapsed)
                self._state = HALF_OPEN
                self._until = now + self.options.reset_after
                changed = (state, HALF_OPEN) if state != HALF_OPEN else None
                error = None
        if error is not None:
            raise error
        if changed is not None:
            self._tell(*changed)
        return True

    def success(self) -> None:
        """The call reached the dependency: the count starts again, and a half-open
        breaker closes. Ignored while open (a call admitted before it opened says
        nothing about now)."""
        if self.quiet:
            return
        with self._lock:
            old = self._state
            if old == OPEN:
                return
            self._state = CLOSED
            self._run = 0
            self.quiet = True
        if old != CLOSED:
            _log.info("circuit breaker %r closed: %s answers again", self.name, self.name)
            self._tell(old, CLOSED)

    def failure(self) -> None:
        """The call could not reach the dependency: counted; the breaker opens at
        `failures` in a row, and again when a half-open trial fails."""
        with self._lock:
            old = self._state
            self.failures_total += 1
            if old == OPEN:
                return
            self._run += 1
            self.quiet = False
            if old == CLOSED and self._run < self.options.failures:
                return
            self._state = OPEN
            self._until = self._clock() + self.options.reset_after
            self.opened_total += 1
        _log.warning(
            "circuit breaker %r open: %d failure(s) in a row reaching %s; calls fail fast for %g s",
            self.name,
            self._run,
            self.name,
            self.options.reset_after,
        )
        self._tell(old, OPEN)

    def release(self, trial: bool) -> None:
        """The call ended without saying whether the dependency is reachable (the
        caller's own error, a cancellation). When it was the trial (`admit` returned
        True), the next call becomes the trial."""
        if not trial:
            return
        with self._lock:
            if self._state == HALF_OPEN:
                self._until = 0.0

    def record(self, exc: BaseException | None, trial: bool) -> None:
        """After a call: `success()` when it raised nothing, `failure()` when `exc` is a
        failure (`is_failure`), else `release(trial)`."""
        if exc is None:
            self.success()
        elif self.is_failure(exc):
            self.failure()
        else:
            self.release(trial)

    def reset(self) -> None:
        """Close the breaker and clear the count: the dependency answered a probe made
        outside the breaker (DataFlow's `ping`), or an operator says it is back."""
        if self.quiet:
            return
        with self._lock:
            old = self._state
            self._state = CLOSED
            self._run = 0
            self.quiet = True
        if old != CLOSED:
            _log.info("circuit breaker %r closed: %s answered a probe", self.name, self.name)
            self._tell(old, CLOSED)

    def _tell(self, old: BreakerState, new: BreakerState) -> None:
        for listener in list(self._listeners):
            try:
                listener(old, new)
            except Exception:
                _log.exception("circuit breaker %r: a listener failed", self.name)

    # -- guarding -------------------------------------------------------------------

    def attempt(self) -> _Attempt:
        """A context manager (``with`` or ``async with``) around one call: `admit` on
        entry (raising `CircuitOpenError` while open), `record` on exit. The call's own
        exception is never swallowed."""
        return _Attempt(self)

    async def call(self, fn: Callable[P, Awaitable[R]], *args: P.args, **kwargs: P.kwargs) -> R:
        """``await fn(*args, **kwargs)`` inside `attempt()`."""
        with self.attempt():
            return await fn(*args, **kwargs)


class _Attempt:
    """One guarded call (`CircuitBreaker.attempt`)."""

    __slots__ = ("_breaker", "_trial")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker
        self._trial = False

    def __enter__(self) -> _Attempt:
        self._trial = self._breaker.admit()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._breaker.record(e, self._trial)

    async def __aenter__(self) -> _Attempt:
        return self.__enter__()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(et, e, tb)
