"""Schemathesis hooks for the REST fuzz run (tests/rest/test_openapi.py).

Loaded by the `st` subprocess through `SCHEMATHESIS_HOOKS=<this file>`; it registers one
check, `no_leak_in_error_body`: every error response Envoy sends back is a JSON
google.rpc.Status whose message passes `_rules.message_problems` (no traceback, driver or
class name, SQL, path or address, and a bounded length), the same rules the gRPC and MCP
fuzzers apply. Server errors (5xx) are schemathesis' own `not_a_server_error` check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import schemathesis

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fuzz._rules import message_problems


@schemathesis.check
def no_leak_in_error_body(ctx: Any, response: Any, case: Any) -> bool | None:
    """An error body's message follows the rules for what a client may be shown."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content or b"null")
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    text = message if isinstance(message, str) else response.content.decode("utf-8", "replace")
    problems = message_problems(text)
    if problems:
        raise AssertionError(
            f"HTTP {response.status_code} error message shows {', '.join(problems)}: {text[:300]!r}"
        )
    return None
