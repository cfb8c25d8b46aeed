"""Typed test nodes shared by the workflow tests.

They are registered once, under names prefixed with `T`, so they cannot clash with the
engine's built-in nodes or with other test packages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from workflow import Event, Node, Output, Param, current_execution, register_node


@register_node
class TConst(Node):
    """Outputs the configured value."""

    parameters = {"value": Param(int, description="the value to output")}
    outputs = {"value": Output(int, description="the configured value")}

    def run(self, value: int) -> Mapping[str, Any]:
        return {"value": value}


@register_node
class TAdd(Node):
    """Adds two ints."""

    parameters = {
        "a": Param(int, description="left operand"),
        "b": Param(int, default=0, description="right operand"),
    }
    outputs = {"sum": Output(int, description="a + b")}

    def run(self, a: int, b: int) -> Mapping[str, Any]:
        return {"sum": a + b}


@register_node
class TFloat(Node):
    """Echoes a float parameter."""

    parameters = {"x": Param(float)}
    outputs = {"x": Output(float)}

    def run(self, x: float) -> Mapping[str, Any]:
        return {"x": x}


@register_node
class TText(Node):
    """Echoes a str parameter."""

    parameters = {"text": Param(str, description="some text")}
    outputs = {"text": Output(str)}

    def run(self, text: str) -> Mapping[str, Any]:
        return {"text": text}


@register_node
class TFlag(Node):
    """Echoes a bool parameter."""

    parameters = {"flag": Param(bool)}
    outputs = {"flag": Output(bool)}

    def run(self, flag: bool) -> Mapping[str, Any]:
        return {"flag": flag}


@register_node
class TAnything(Node):
    """Echoes an untyped value."""

    parameters = {"value": Param(Any, required=False)}
    outputs = {"value": Output(Any)}

    def run(self, value: Any) -> Mapping[str, Any]:
        return {"value": value}


@register_node
class TBoom(Node):
    """Always fails."""

    parameters = {"value": Param(Any, required=False)}
    outputs = {"value": Output(Any)}

    def run(self, value: Any) -> Mapping[str, Any]:
        raise ValueError("kaboom")


class Gate:
    """asyncio.Events that test nodes wait on or set, looked up by name."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}
        self.log: list[str] = []
        self.cancelled: list[str] = []

    def __getitem__(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())


GATE = Gate()


@register_node
class TWait(Node):
    """Sets the event `signal` (if any), then waits for the event `wait` (if any)."""

    parameters = {
        "signal": Param(str, default=""),
        "wait": Param(str, default=""),
        "value": Param(Any, required=False),
    }
    outputs = {"value": Output(Any)}

    async def run(self, signal: str, wait: str, value: Any) -> Mapping[str, Any]:
        GATE.log.append(f"start {self.id}")
        try:
            if signal:
                GATE[signal].set()
            if wait:
                await GATE[wait].wait()
        except asyncio.CancelledError:
            GATE.cancelled.append(self.id)
            raise
        GATE.log.append(f"end {self.id}")
        return {"value": value}


@register_node
class TExecId(Node):
    """Outputs the id of the execution it runs in."""

    outputs = {"id": Output(str)}

    def run(self) -> Mapping[str, Any]:
        ctx = current_execution()
        assert ctx is not None
        return {"id": ctx.execution_id}


@pytest.fixture
def gate() -> Iterator[Gate]:
    """A fresh set of events for TWait nodes (reset after each test)."""
    GATE.events.clear()
    GATE.log.clear()
    GATE.cancelled.clear()
    yield GATE
    GATE.events.clear()
    GATE.log.clear()
    GATE.cancelled.clear()


class Recorder:
    """An `on_event` callback that keeps every event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self, node: str | None = None) -> list[str]:
        return [str(e.kind) for e in self.events if node is None or e.node_id == node]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()
