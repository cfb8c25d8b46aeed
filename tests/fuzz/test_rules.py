"""The message rules and the REST hook that applies them, on their own: each rule can
fail (so a fuzzer that finds nothing has really checked something)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.fuzz._rules import message_problems

HOOKS = Path(__file__).with_name("schemathesis_hooks.py")


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ('Traceback (most recent call last):\n  File "x", line 1', "a traceback"),
        ("the database failed (asyncpg.exceptions.DataError)", "a driver name"),
        ("Unexpected <class 'google.protobuf.message.DecodeError'>", "a Python class"),
        ("the database failed (OverflowError: date value out of range)", "a Python class"),
        ("near SELECT id FROM gadget WHERE", "SQL"),
        ("setval: value 0 is out of bounds", "SQL"),
        ("cannot open /tmp/nexus-child-1/app.db", "a file path"),
        ("in _ops.py line 3", "a file path"),
        ("Connect call failed ('127.0.0.1', 55439)", "a network address"),
        ("connection to 10.0.0.1:5432 refused", "a network address"),
        ("x" * 2_001, "2001 characters (more than 2000)"),
    ],
)
def test_each_rule_catches_its_leak(message: str, problem: str) -> None:
    assert problem in message_problems(message)


@pytest.mark.parametrize(
    "message",
    [
        "filter.count.$in: at most 1,000 values (got 40,000)",
        "the request is not a valid nexus.model.v1.ListRecordsRequest",
        "Gadget 'abc...' (10,000 characters) not found",
        "page_token: is not a token returned by this listing",
        "seen_at: 9999-12-31T23:59:59-05:00 is after 9999-12-31 in UTC",
    ],
)
def test_clear_messages_pass(message: str) -> None:
    assert message_problems(message) == []


def _hook() -> Any:
    spec = importlib.util.spec_from_file_location("_fuzz_st_hooks", HOOKS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.no_leak_in_error_body


def test_the_rest_hook_applies_the_rules() -> None:
    check = _hook()
    leak = SimpleNamespace(
        status_code=400, content=b'{"code": 3, "message": "bad (ValueError: x)", "details": []}'
    )
    with pytest.raises(AssertionError, match="a Python class"):
        check(None, leak, None)
    clean = SimpleNamespace(
        status_code=400, content=b'{"code": 3, "message": "id: too long", "details": []}'
    )
    assert check(None, clean, None) is None
    assert check(None, SimpleNamespace(status_code=200, content=b"{}"), None) is None
