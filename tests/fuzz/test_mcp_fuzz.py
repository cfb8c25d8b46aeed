"""An MCP fuzzer over every tool of a real adapter (issue 14, sections 4 and 5).

The tools come from the adapter itself (`list_tools` through the real `mcp.Client`, in
process, against the fuzz app's gRPC server; see conftest.py), so a new workflow or
model is fuzzed without touching this file. For each tool a small generator of our own
reads its `inputSchema` and makes, with a seeded `random.Random`:

- valid arguments (every required property, then every property), of the schema's types;
- each required property missing; an extra property; no arguments at all;
- each property as null, as every wrong JSON type, as a 10,000-character string, as a
  NaN-like or out-of-range text ("NaN", "Infinity", "1e999999", "sNaN", a date that
  overflows UTC...), with a NUL character; object properties (filters, records) also
  get hostile filters from `_values.py` (`$in` with 40,000 values, `$or` with 1,001
  branches, nesting 200 deep, unknown operators...).

Every call must end in a result, never an exception: no protocol error (`MCPError`),
no timeout. A failure is an `isError` result with a clear text that passes
`_rules.message_problems` and does not call an existing tool "unknown". A success with
structured content must validate against the tool's `outputSchema` (the client checks
it; a mismatch is reported as a failure here). After the run the server answers
health. The test collects every failure and fails with the deduplicated list.
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from mcp import Client

from clients.mcp._server import Adapter
from tests.fuzz._rules import message_problems
from tests.fuzz._values import HOSTILE_FILTERS, LONG, deep_filter

SEED = 14
#: Cases per tool are capped here (the schema decides how many it has).
MAX_CASES_PER_TOOL = 45
#: The fuzzing stops here and says what it left; one call is bounded by CALL_TIMEOUT.
TIME_BUDGET = 60.0
CALL_TIMEOUT = 15.0

NAN_LIKE = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999999",
    "sNaN",
    "9223372036854775808",
    "9999-12-31T23:59:59-05:00",
    "0001-01-01T00:00:00+05:00",
]
FILTERS = [
    HOSTILE_FILTERS[0],  # $in with 40,000 values
    HOSTILE_FILTERS[2],  # $or with 1,001 branches
    deep_filter(200),
    {"count": {"$foo": 1}},
    {"$not": {"$or": []}},
    {"seen_at": {"$gt": "9999-12-31T23:59:59-05:00"}},
    {"name": "a\x00b"},
    {"ratio": {"$gt": "NaN"}},
]
JSON_TYPES: dict[str, Any] = {
    "string": "text",
    "integer": 7,
    "number": 1.5,
    "boolean": True,
    "object": {"k": 1},
    "array": [1],
    "null": None,
}


def _types(prop: dict[str, Any]) -> list[str]:
    """The JSON types a property schema allows (from `type` and `anyOf`/`oneOf`)."""
    t = prop.get("type")
    found = list(t) if isinstance(t, list) else [t] if isinstance(t, str) else []
    for alt in prop.get("anyOf", []) + prop.get("oneOf", []):
        found.extend(_types(alt))
    if not found and "enum" in prop:
        found.extend(
            JSON_NAME.get(type(v).__name__, "string") for v in prop["enum"] if v is not None
        )
    return found


JSON_NAME = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


class Serial:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n


def valid_value(name: str, prop: dict[str, Any], serial: Serial) -> Any:
    """A value `prop` accepts (unique text, so unique fields never collide)."""
    enum = [v for v in prop.get("enum", []) if v is not None]
    if enum:
        return enum[0]
    types = [t for t in _types(prop) if t != "null"] or ["string"]
    t = types[0]
    fmt = prop.get("format", "")
    if t == "string":
        if fmt == "date-time":
            return "2024-01-02T03:04:05Z"
        if fmt == "date":
            return "2024-01-02"
        if fmt == "uuid":
            return f"00000000-0000-4000-8000-{serial.next():012d}"
        if fmt in ("byte", "base64"):
            return "AAE="
        if fmt in ("int64", "uint64") or prop.get("pattern", "").startswith("^-?\\d"):
            return "3"
        if name in ("price",) or fmt == "decimal":
            return "1.25"
        return f"fz-{name}-{serial.next()}"
    if t == "integer":
        return 1
    if t == "number":
        return 1.5
    if t == "boolean":
        return False
    if t == "object":
        return {}
    if t == "array":
        return []
    return None


def argument_cases(
    schema: dict[str, Any], rng: random.Random, serial: Serial, limit: int = MAX_CASES_PER_TOOL
) -> list[tuple[str, dict[str, Any]]]:
    """Valid and invalid arguments for a tool with `schema` as its inputSchema."""
    props: dict[str, Any] = schema.get("properties", {})
    required: list[str] = list(schema.get("required", []))

    def base() -> dict[str, Any]:
        return {n: valid_value(n, props.get(n, {}), serial) for n in required}

    cases: list[tuple[str, dict[str, Any]]] = [("valid (required only)", base())]
    full = base()
    for n, p in props.items():
        if n not in full and n not in ("all", "allow_all"):
            full[n] = valid_value(n, p, serial)
    cases.append(("valid (every property)", full))
    cases.append(("no arguments", {}))
    for n in required:
        args = base()
        del args[n]
        cases.append((f"missing required {n}", args))
    cases.append(("extra property", {**base(), "zz_extra": 1}))
    per_prop: list[tuple[str, dict[str, Any]]] = []
    for n, p in props.items():
        allowed = set(_types(p))
        if "number" in allowed:
            allowed.add("integer")
        values: list[tuple[str, Any]] = [
            (f"as {t}", v) for t, v in JSON_TYPES.items() if t not in allowed
        ]
        values += [("as null", None), ("10,000 characters", LONG), ("with NUL", "a\x00b")]
        values += [(f"= {v!r}", v) for v in NAN_LIKE]
        values += [("huge number", 1e308), ("max int64", 2**63 - 1), ("below int64", -(2**63) - 1)]
        if "object" in allowed:
            values += [(f"filter {i}", f) for i, f in enumerate(FILTERS)]
        for label, v in values:
            per_prop.append((f"{n} {label}", {**base(), n: v}))
    rng.shuffle(per_prop)
    cases.extend(per_prop)
    return cases[:limit]


@dataclass
class McpFailure:
    tool: str
    case: str
    what: str
    text: str

    def key(self) -> tuple[str, str, str]:
        """Same failure: the same argument (by name), problem and text (numbers, ids and
        long runs of one character aside), whichever tool it hit."""
        text = re.sub(r"[0-9a-f]{8,}|\d+", "#", self.text)
        text = re.sub(r"(.)\1{20,}", r"\1...", text)
        text = re.sub(r"\b(gadgets?|counters?|Gadget|Counter)\b", "<model>", text)[:100]
        return self.case.split(" ")[-1] if "character" in self.case else self.case, self.what, text


@dataclass
class McpRun:
    failures: list[McpFailure] = field(default_factory=list)
    calls: int = 0
    errors: int = 0
    tools: set[str] = field(default_factory=set)

    def report(self) -> str:
        """The failures, deduplicated (see `McpFailure.key`), with the tools each hit."""
        groups: dict[tuple[str, str, str], list[McpFailure]] = {}
        for f in self.failures:
            groups.setdefault(f.key(), []).append(f)
        lines = [f"{len(self.failures)} failing calls, {len(groups)} distinct:"]
        for key in sorted(groups, key=lambda k: (k[1], k[0])):
            first = groups[key][0]
            tools = sorted({f.tool for f in groups[key]})
            shown = ", ".join(tools[:5]) + (f" +{len(tools) - 5}" if len(tools) > 5 else "")
            lines.append(
                f"- {first.what} x{len(groups[key])} [{first.case[:80]}] in {shown}: "
                f"{first.text[:200]!r}"
            )
        return "\n".join(lines)


def _text(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


async def _call(client: Client, run: McpRun, tool: str, case: str, args: dict[str, Any]) -> None:
    run.calls += 1
    try:
        with anyio.fail_after(CALL_TIMEOUT):
            result = await client.call_tool(tool, args)
    except TimeoutError:
        run.failures.append(McpFailure(tool, case, "no result", f"within {CALL_TIMEOUT} s"))
        return
    except Exception as exc:  # a protocol error, or an output the client refused
        run.failures.append(McpFailure(tool, case, type(exc).__name__, str(exc)[:300]))
        return
    if not result.is_error:
        return
    run.errors += 1
    text = _text(result)
    if not text.strip():
        run.failures.append(McpFailure(tool, case, "isError without a text", repr(result)[:200]))
    for problem in message_problems(text):
        run.failures.append(McpFailure(tool, case, f"the text shows {problem}", text[:300]))
    if re.search(r"unknown tool", text, re.I):
        run.failures.append(McpFailure(tool, case, "an existing tool called unknown", text))


@pytest.mark.timeout(150)
async def test_every_tool_answers_bad_arguments_with_a_tool_error(fuzz_server: Any) -> None:
    """Every tool, valid and invalid arguments: results, never protocol errors."""
    rng = random.Random(SEED)
    serial = Serial()
    adapter = Adapter(fuzz_server.address, poll_interval=60)
    run = McpRun()
    skipped: list[str] = []
    started = time.monotonic()
    with anyio.fail_after(TIME_BUDGET + 2 * CALL_TIMEOUT + 20):
        async with Client(adapter.server, read_timeout_seconds=CALL_TIMEOUT) as client:
            tools = (await client.list_tools()).tools
            names = {t.name for t in tools}
            assert {"run_create_gadget", "gadgets_create", "counters_list"} <= names, names
            for tool in sorted(tools, key=lambda t: t.name):
                for case, args in argument_cases(tool.input_schema, rng, serial):
                    if time.monotonic() - started > TIME_BUDGET:
                        skipped.append(tool.name)
                        break
                    run.tools.add(tool.name)
                    await _call(client, run, tool.name, case, args)
            # after the run: the adapter still works
            after = await client.call_tool("gadgets_count", {})
    elapsed = time.monotonic() - started
    summary = (
        f"MCP: {run.calls} calls over {len(run.tools)} of {len(tools)} tools in {elapsed:.1f} s, "
        f"{run.errors} isError results"
    )
    print(summary)
    report = run.report()
    print(report)
    assert not after.is_error, _text(after)
    assert not skipped, f"the time budget left tools unfuzzed: {sorted(set(skipped))}"
    assert not run.failures, f"{summary}\n{report}"


def test_the_generator_covers_the_schema() -> None:
    """The argument generator itself: valid values of every type, each required field
    missing once, and a wrong type for each property."""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "score": {"type": "integer"},
            "ratio": {"type": ["number", "null"]},
            "filter": {"type": "object"},
            "color": {"enum": ["red", "green", None]},
        },
        "required": ["name", "score"],
    }
    cases = dict(argument_cases(schema, random.Random(SEED), Serial(), limit=10_000))
    valid = cases["valid (every property)"]
    assert isinstance(valid["name"], str) and valid["score"] == 1 and valid["color"] == "red"
    assert "name" not in cases["missing required name"]
    assert cases["score as string"]["score"] == "text"
    assert math.isclose(cases["score huge number"]["score"], 1e308)
    assert any(label.startswith("filter filter ") for label in cases)
