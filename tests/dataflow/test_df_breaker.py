"""The circuit breaker (`dataflow.CircuitBreaker`) on its own, with a clock the test
moves, and DataFlow's breaker around an unreachable database (a port nothing listens
on) and around statements the database refuses (which never count).

The outage against a real PostgreSQL server that stops and starts again is in
tests/faults/test_breaker.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from dataflow import (
    AlreadyExistsError,
    BreakerOptions,
    CircuitBreaker,
    CircuitOpenError,
    DatabaseError,
    DataFlow,
    ValidationError,
    field,
    is_unreachable,
)


def state(breaker: CircuitBreaker | None) -> str:
    """The breaker's state, as plain text (mypy would narrow `breaker.state` between
    two reads, but it changes with time)."""
    assert breaker is not None
    return breaker.state


class Clock:
    """Monotonic seconds the test sets."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, failures: int = 3, reset_after: float = 2.0) -> CircuitBreaker:
    return CircuitBreaker("svc", failures=failures, reset_after=reset_after, clock=clock)


def refused() -> ConnectionRefusedError:
    return ConnectionRefusedError(111, "Connection refused")


# -- the state machine ----------------------------------------------------------------


def test_closed_until_the_run_of_failures_then_open(clock: Clock) -> None:
    b = breaker(clock)
    changes: list[tuple[str, str]] = []
    b.add_listener(lambda old, new: changes.append((old, new)))
    assert state(b) == "closed" and b.quiet
    for _ in range(2):
        b.failure()
    assert state(b) == "closed" and not b.quiet and b.consecutive_failures == 2
    assert b.admit() is False  # closed: an ordinary call
    b.failure()
    assert state(b) == "open" and changes == [("closed", "open")]
    with pytest.raises(CircuitOpenError) as ei:
        b.admit()
    err = ei.value
    assert err.dependency == "svc" and err.failures == 3 and err.retry_after == pytest.approx(2.0)
    assert "svc unavailable" in str(err) and "retry in 2.0 s" in str(err)
    assert b.rejected_total == 1 and b.opened_total == 1 and b.failures_total == 3


def test_a_success_starts_the_count_again(clock: Clock) -> None:
    b = breaker(clock)
    b.failure()
    b.failure()
    b.success()
    assert b.quiet and b.consecutive_failures == 0
    b.failure()
    b.failure()
    assert state(b) == "closed"


def test_half_open_lets_one_trial_through_and_closes_on_success(clock: Clock) -> None:
    b = breaker(clock)
    changes: list[tuple[str, str]] = []
    b.add_listener(lambda old, new: changes.append((old, new)))
    for _ in range(3):
        b.failure()
    clock.now += 1.5
    with pytest.raises(CircuitOpenError) as ei:
        b.admit()
    assert ei.value.retry_after == pytest.approx(0.5)
    clock.now += 0.5
    assert state(b) == "half_open"  # the delay has passed: the next call is the trial
    assert b.admit() is True
    with pytest.raises(CircuitOpenError):
        b.admit()  # only one trial at a time
    b.success()
    assert state(b) == "closed" and b.quiet
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert b.admit() is False


def test_a_failed_trial_opens_it_again_for_the_whole_delay(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 2.0
    assert b.admit() is True
    b.failure()
    assert state(b) == "open" and b.opened_total == 2
    clock.now += 1.9
    with pytest.raises(CircuitOpenError):
        b.admit()
    clock.now += 0.1
    assert b.admit() is True


def test_a_trial_that_says_nothing_passes_the_turn(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 2.0
    assert b.admit() is True
    b.release(True)  # the caller's own error, or a cancellation
    assert state(b) == "half_open"
    assert b.admit() is True  # the next call is the trial


def test_a_trial_that_never_ends_lapses(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    clock.now += 2.0
    assert b.admit() is True  # ... and its caller never reports
    clock.now += 1.0
    with pytest.raises(CircuitOpenError):
        b.admit()
    clock.now += 1.0
    assert b.admit() is True


def test_outcomes_while_open_change_nothing(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    b.success()  # a call admitted before it opened
    b.failure()
    assert state(b) == "open" and b.opened_total == 1


def test_reset_closes_at_once(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        b.failure()
    b.reset()
    assert state(b) == "closed" and b.quiet and b.admit() is False


def test_snapshot_is_the_health_component(clock: Clock) -> None:
    b = breaker(clock)
    assert b.snapshot() == {
        "status": "healthy",
        "state": "closed",
        "dependency": "svc",
        "consecutive_failures": 0,
        "opened_total": 0,
        "rejected_total": 0,
        "failures_total": 0,
    }
    for _ in range(3):
        b.failure()
    snap = b.snapshot()
    assert snap["status"] == "unhealthy" and snap["state"] == "open"
    assert snap["retry_after"] == pytest.approx(2.0)


def test_a_failing_listener_is_logged_not_raised(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    b = breaker(clock, failures=1)

    def bad(old: str, new: str) -> None:
        raise RuntimeError("listener")

    b.add_listener(bad)
    b.failure()
    assert state(b) == "open"
    assert any("listener failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("kw", "field_name"),
    [
        ({"failures": 0}, "breaker.failures"),
        ({"failures": True}, "breaker.failures"),
        ({"failures": 2.5}, "breaker.failures"),
        ({"reset_after": 0}, "breaker.reset_after"),
        ({"reset_after": float("nan")}, "breaker.reset_after"),
        ({"reset_after": float("inf")}, "breaker.reset_after"),
        ({"reset_after": "5"}, "breaker.reset_after"),
    ],
)
def test_bad_options_name_the_field(kw: dict[str, Any], field_name: str) -> None:
    with pytest.raises(ValidationError) as ei:
        BreakerOptions(**kw)
    assert ei.value.field == field_name
    with pytest.raises(ValidationError):
        CircuitBreaker("x", **kw)


def test_dataflow_breaker_option() -> None:
    assert DataFlow("sqlite:///:memory:").breaker is not None
    assert DataFlow("sqlite:///:memory:", breaker=False).breaker is None
    db = DataFlow("sqlite:///:memory:", breaker=BreakerOptions(failures=2, reset_after=0.5))
    assert db.breaker is not None and db.breaker.options == BreakerOptions(2, 0.5)
    assert db.breaker.name == "database" and state(db.breaker) == "closed"
    with pytest.raises(ValidationError) as ei:
        DataFlow("sqlite:///:memory:", breaker={"failures": 2})  # type: ignore[arg-type]
    assert ei.value.field == "breaker"


# -- guarding a dependency ------------------------------------------------------------


def test_is_unreachable() -> None:
    assert is_unreachable(refused())
    assert is_unreachable(ConnectionResetError())
    assert is_unreachable(TimeoutError())
    assert is_unreachable(CircuitOpenError("db", 1.0, 5))
    unreachable = DatabaseError("the database is unreachable")
    unreachable.unreachable = True
    assert is_unreachable(unreachable)
    assert not is_unreachable(DatabaseError("the database failed"))
    assert not is_unreachable(ValueError("bad input"))
    assert not is_unreachable(AlreadyExistsError("M"))


async def test_attempt_guards_async_calls(clock: Clock) -> None:
    b = breaker(clock, failures=2)
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise refused()

    for _ in range(2):
        with pytest.raises(ConnectionRefusedError):
            async with b.attempt():
                await down()
    with pytest.raises(CircuitOpenError):
        await b.call(down)
    assert calls == 2  # refused without being called

    async def up() -> str:
        return "ok"

    clock.now += 2.0
    assert await b.call(up) == "ok"
    assert state(b) == "closed"


def test_attempt_guards_sync_calls_and_ignores_callers_errors(clock: Clock) -> None:
    b = breaker(clock, failures=2)
    for _ in range(5):
        with pytest.raises(ValueError), b.attempt():
            raise ValueError("the caller's mistake")
    assert b.quiet  # not a failure to reach the dependency
    b2 = CircuitBreaker(
        "http", failures=1, clock=clock, is_failure=lambda e: isinstance(e, LookupError)
    )
    with pytest.raises(KeyError), b2.attempt():
        raise KeyError("503")
    assert state(b2) == "open"


async def test_a_cancelled_trial_passes_the_turn(clock: Clock) -> None:
    b = breaker(clock, failures=1)
    b.failure()
    clock.now += 2.0
    started = asyncio.Event()

    async def hang() -> None:
        async with b.attempt():
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hang())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.admit() is True


# -- DataFlow's breaker ---------------------------------------------------------------


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port of 127.0.0.1 where nothing listens (connections are refused at once)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield int(s.getsockname()[1])  # bound, never listening: refused
    finally:
        s.close()


def declare(db: DataFlow) -> type[Any]:
    @db.model
    class Gadget:
        id: str
        name: str = field(unique=True)

    return Gadget


async def test_dataflow_opens_on_an_unreachable_database(dead_port: int) -> None:
    db = DataFlow(
        f"postgresql://postgres@127.0.0.1:{dead_port}/none",
        breaker=BreakerOptions(failures=3, reset_after=60.0),
    )
    try:
        Gadget = declare(db)
        br = db.breaker
        assert br is not None
        for _ in range(3):
            with pytest.raises(DatabaseError) as ei:
                await db.ops(Gadget).count()
            assert ei.value.unreachable and "unreachable" in str(ei.value)
        assert state(br) == "open"
        for _ in range(5):
            with pytest.raises(CircuitOpenError) as oe:
                await db.ops(Gadget).count()
            assert oe.value.dependency == "database" and oe.value.retry_after > 0
        with pytest.raises(CircuitOpenError):
            async with db.transaction():
                pass
        assert br.rejected_total == 6 and br.failures_total == 3
        assert await db.ping(0.5) is False
        assert state(br) == "open"  # a failed ping is not counted
    finally:
        await db.close()


async def test_statements_the_database_refuses_never_count(make_db: Any) -> None:
    db: DataFlow = make_db(breaker=BreakerOptions(failures=2, reset_after=60.0))
    Gadget = declare(db)
    ops = db.ops(Gadget)
    await ops.create(id="g1", name="one")
    for _ in range(5):
        with pytest.raises(AlreadyExistsError):
            await ops.create(id="g1", name="other")
        with pytest.raises(AlreadyExistsError):
            await ops.create(id="g2", name="one")
        with pytest.raises(ValidationError):
            await ops.list({"nope": 1})
        with pytest.raises(AlreadyExistsError):
            async with db.transaction():
                await ops.create(id="g3", name="three")
                await ops.create(id="g4", name="three")
    br = db.breaker
    assert br is not None and state(br) == "closed" and br.failures_total == 0
    assert await ops.count() == 1


async def test_a_refused_statement_closes_a_half_open_breaker(make_db: Any) -> None:
    """A constraint violation is the database answering: the trial succeeded."""
    db: DataFlow = make_db(breaker=BreakerOptions(failures=1, reset_after=0.05))
    Gadget = declare(db)
    ops = db.ops(Gadget)
    await ops.create(id="g1", name="one")
    br = db.breaker
    assert br is not None
    br.failure()  # as if the database had been unreachable
    with pytest.raises(CircuitOpenError):
        await ops.read("g1")
    for _ in range(100):  # the breaker's own delay, then half-open
        if state(br) == "half_open":
            break
        await asyncio.sleep(br.retry_after() + 0.01)
    with pytest.raises(AlreadyExistsError):
        await ops.create(id="g1", name="again")
    assert state(br) == "closed"
    assert (await ops.read("g1"))["name"] == "one"


async def test_a_ping_that_answers_closes_the_breaker(make_db: Any) -> None:
    db: DataFlow = make_db(breaker=BreakerOptions(failures=1, reset_after=60.0))
    Gadget = declare(db)
    await db.initialize()
    br = db.breaker
    assert br is not None
    br.failure()
    with pytest.raises(CircuitOpenError):
        await db.ops(Gadget).count()
    assert await db.ping(2.0) is True
    assert state(br) == "closed"
    assert await db.ops(Gadget).count() == 0


async def test_without_a_breaker_every_call_tries(dead_port: int) -> None:
    db = DataFlow(f"postgresql://postgres@127.0.0.1:{dead_port}/none", breaker=False)
    try:
        Gadget = declare(db)
        for _ in range(8):
            with pytest.raises(DatabaseError) as ei:
                await db.ops(Gadget).count()
            assert not isinstance(ei.value, CircuitOpenError)
    finally:
        await db.close()
