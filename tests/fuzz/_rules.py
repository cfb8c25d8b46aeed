"""What an error message sent to a client must never contain, on every channel.

One function, `message_problems`, shared by the gRPC fuzzer, the MCP fuzzer and the
schemathesis hooks of the REST run (tests/rest/test_openapi.py), so the three channels
are held to the same rules (issue 14, section 1): no traceback, no driver or exception
class names, no SQL, no file paths, no network addresses, and a bounded length.

The fuzzers never put any of these patterns into the values they send, so a match is
always the server's own text, never an echo of the input.
"""

from __future__ import annotations

import re

__all__ = ["MAX_MESSAGE", "message_problems"]

#: The longest error message a client may get (every echoed value is capped).
MAX_MESSAGE = 2_000

_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("a traceback", re.compile(r"Traceback|File \"")),
    ("a driver name", re.compile(r"asyncpg|aiosqlite|sqlite3|sqlalchemy|psycopg", re.I)),
    ("a Python class", re.compile(r"<class |\b[A-Z][A-Za-z]*(?:Error|Exception)\b")),
    (
        "SQL",
        re.compile(
            r"\b(?:SELECT\b.*\bFROM|INSERT\s+INTO|UPDATE\b.*\bSET|DELETE\s+FROM)\b|\bsetval\b"
        ),
    ),
    ("a file path", re.compile(r"/tmp/|/work/|/home/|/usr/|\.py\b|site-packages")),
    (
        "a network address",
        re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\(\s*'[\d.]+'\s*,\s*\d+\s*\)"),
    ),
]


def message_problems(message: str) -> list[str]:
    """Why `message` must not be sent to a client (an empty list: it may be)."""
    found = [what for what, pattern in _PATTERNS if pattern.search(message)]
    if len(message) > MAX_MESSAGE:
        found.append(f"{len(message)} characters (more than {MAX_MESSAGE})")
    return found
