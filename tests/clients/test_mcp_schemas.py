"""Every MCP tool schema is valid JSON Schema 2020-12 and portable, and the MCP
Inspector's CLI (`--strict`) finds nothing to report on either transport.

The portability rules are the Inspector's own (its `--strict` schema lint): no `type`
array (nullable fields are `anyOf` branches of one type each), no schema that constrains
nothing (`{}`), no boolean schema, no `$ref` outside the document. They are checked
here in Python on every tool, and by the Inspector itself, run from npm with the
Node it needs (22.19 or later: `npx -p node@22.23.3`, pinned below), so the test does not
depend on the machine's Node. Without `npx`, or without the npm registry, the Inspector
test skips outside CI and fails under `CI=true`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest
from mcp import Client

from clients.mcp._server import Adapter

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0
#: The Inspector and the Node it runs on (it needs Node >= 22.19), both pinned.
INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"
NODE = "node@22.23.3"
#: The first run downloads both packages into npm's cache.
NPX_TIMEOUT = 600.0

#: Keywords that make a schema constrain its value (the Inspector's list, abridged to
#: what a tool schema of ours could hold).
_CONSTRAINING = {
    "type",
    "enum",
    "const",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "contentEncoding",
    "items",
    "properties",
    "additionalProperties",
    "required",
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "$ref",
}
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "contains")


def portability_problems(schema: Any, path: str = "") -> list[str]:
    """What the Inspector's `--strict` would report about `schema`, as `path: rule`."""
    if isinstance(schema, bool):
        return [f"{path or '(root)'}: boolean schema"]
    if not isinstance(schema, dict):
        return []
    out = []
    if isinstance(schema.get("type"), list):
        out.append(f"{path or '(root)'}: type-union {schema['type']}")
    if not _CONSTRAINING & set(schema):
        out.append(f"{path or '(root)'}: untyped-schema")
    ref = schema.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        out.append(f"{path or '(root)'}: remote-ref")
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            out += portability_problems(sub, f"{path}.{key}.{name}")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or []):
            out += portability_problems(sub, f"{path}.{key}[{i}]")
    for key in _SUBSCHEMAS:
        # additionalProperties: false is a keyword's value, not a schema to lint
        if key in schema and not isinstance(schema[key], bool):
            out += portability_problems(schema[key], f"{path}.{key}")
    return out


def test_the_portability_check_finds_what_the_inspector_reports() -> None:
    """The check above fails on the forms it exists to refuse."""
    assert portability_problems({"type": ["string", "null"]}) == [
        "(root): type-union ['string', 'null']"
    ]
    assert portability_problems({"type": "object", "properties": {"a": {}}}) == [
        ".properties.a: untyped-schema"
    ]
    assert portability_problems({"anyOf": [{"type": "string"}, {"$ref": "http://x/s"}]}) == [
        ".anyOf[1]: remote-ref"
    ]
    assert portability_problems({"anyOf": [{"type": "integer"}, {"type": "null"}]}) == []


async def _tools(address: str) -> list[Any]:
    adapter = Adapter(address, poll_interval=60)
    with anyio.fail_after(WAIT):
        async with Client(adapter.server) as client:
            return list((await client.list_tools()).tools)


async def test_every_tool_schema_is_valid_2020_12_and_portable(server: Any) -> None:
    tools = await _tools(server.address)
    names = {t.name for t in tools}
    # workflows, and every operation of the models (the example's nullable fields too)
    assert {"run_create_contact", "contacts_create", "contacts_count", "contacts_search"} <= names
    seen_nullable = False
    for tool in tools:
        for kind, schema in (("input", tool.input_schema), ("output", tool.output_schema)):
            assert schema is not None, f"{tool.name}: no {kind} schema"
            jsonschema.Draft202012Validator.check_schema(schema)
            assert portability_problems(schema) == [], (tool.name, kind)
            seen_nullable = seen_nullable or '{"type": "null"}' in json.dumps(schema)
    assert seen_nullable  # the nullable fields are there, in their portable form


def test_output_schemas_accept_the_int64_text_form(server: Any) -> None:
    """An int beyond +-2^53 (and an int64 message field such as `count`) is text: the
    output schemas accept it, and refuse text that is not an integer."""
    tools = {t.name: t for t in anyio.run(_tools, server.address)}
    record = tools["contacts_get"].output_schema
    assert record is not None
    check = jsonschema.Draft202012Validator(record)
    assert check.is_valid({"score": str(2**63 - 1)}) and check.is_valid({"score": 3})
    assert not check.is_valid({"score": "3.5"}) and not check.is_valid({"score": None})
    assert check.is_valid({"company": None}) and not check.is_valid({"company": 3})
    count = tools["contacts_count"].output_schema
    assert count is not None
    assert jsonschema.Draft202012Validator(count).is_valid({"count": "4"})
    assert not jsonschema.Draft202012Validator(count).is_valid({"count": "four"})


# ---------------------------------------------------------------------------- Inspector


def _npx() -> str:
    found = shutil.which("npx")
    if found is None:
        _unavailable("npx (npm) is not installed")
    return str(found)


def _unavailable(reason: str) -> None:
    text = f"the MCP Inspector cannot run: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{text}; CI=true, so this is a failure, not a skip")
    pytest.skip(text)


def _inspector(args: list[str], env: dict[str, str], tmp: Path) -> dict[str, Any]:
    """Run `mcp-inspector --cli ARGS --format json` on Node 22 (both from npm), return
    the JSON envelope it prints."""
    command = shlex.join(["mcp-inspector", "--cli", *args, "--format", "json"])
    proc = subprocess.run(
        [_npx(), "--yes", "-p", NODE, "-p", INSPECTOR, "-c", command],
        capture_output=True,
        text=True,
        env={**env, "MCP_CATALOG_PATH": str(tmp / "catalog.json"), "NO_COLOR": "1"},
        cwd=str(tmp),
        timeout=NPX_TIMEOUT,
    )
    if proc.returncode != 0 and any(
        marker in proc.stderr for marker in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT")
    ):
        _unavailable("the npm registry cannot be reached to fetch it")
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    line = proc.stdout.strip().splitlines()[-1]
    doc: dict[str, Any] = json.loads(line)
    return doc


@pytest.mark.timeout(NPX_TIMEOUT * 3)
@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_the_inspector_strict_finds_nothing(
    transport: str, server: Any, cli_env: dict[str, str], mcp_http: Any, tmp_path: Path
) -> None:
    if transport == "stdio":
        target = [
            "-e",
            f"NEXUS_SERVER={server.address}",
            "-e",
            f"PYTHONPATH={ROOT}",
            "--cwd",
            str(ROOT),
            sys.executable,
            "-m",
            "clients.mcp",
        ]
    else:
        target = ["--transport", "http", "--server-url", mcp_http("--poll-interval", "60")]
    listed = _inspector(["--method", "tools/list", "--strict", *target], cli_env, tmp_path)
    names = {t["name"] for t in listed["result"]["tools"]}
    assert {"run_search_contacts", "contacts_count"} <= names
    assert listed.get("schemaFindings", []) == []  # not even a warning

    # a call through it: the structured result is the REST document of CountRecords
    called = _inspector(
        ["--method", "tools/call", "--tool-name", "contacts_count", *target], cli_env, tmp_path
    )
    result = called["result"]
    assert result.get("isError") is not True, result
    assert set(result["structuredContent"]) == {"count"}
    assert result["structuredContent"]["count"].isdigit()  # int64: text, as REST prints it
