"""The OpenAPI document passes two third-party linters: Redocly CLI's recommended rules
(`redocly.yaml`, npm `@redocly/cli`) and openapi-spec-validator, with no error and no
warning, for the example app with authentication off and on.

The documents come from `nexus openapi` (the same bytes Envoy serves at
`GET /openapi.json`, tests/rest/test_openapi.py). Redocly is skipped, saying why, when
Node or the npm package is missing, except with CI=true, where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "contacts_app.py"
REDOCLY = ROOT / "node_modules" / ".bin" / "redocly"

pytestmark = pytest.mark.timeout(240)


def _document(tmp_path: Path, *, auth: bool) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / f"openapi-{'auth' if auth else 'open'}.json"
    env = {**os.environ, "NEXUS_ENV": "production" if auth else "development"}
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "openapi", str(APP), "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(out.read_text())
    return out, doc


def _redocly(document: Path) -> list[dict[str, Any]]:
    """Redocly's problems (errors and warnings) with the checked-in configuration."""
    node = shutil.which("node")
    if node is None or not REDOCLY.exists():
        missing = "node is not on PATH" if node is None else f"{REDOCLY} is missing (npm ci)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing}; CI=true, so this is a failure, not a skip")
        pytest.skip(missing)
    done = subprocess.run(
        [str(REDOCLY), "lint", str(document), "--config", str(ROOT / "redocly.yaml"),
         "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "REDOCLY_TELEMETRY": "off", "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true"},
    )  # fmt: skip
    report = json.loads(done.stdout)
    problems: list[dict[str, Any]] = report["problems"]
    assert (done.returncode == 0) == (not any(p["severity"] == "error" for p in problems))
    return problems


def _summary(problems: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{p['severity']} {p['ruleId']}: {p['message']} at {p['location'][0]['pointer']}"
        for p in problems[:40]
    )


@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "auth-on"])
def test_both_linters_find_nothing(tmp_path: Path, auth: bool) -> None:
    path, doc = _document(tmp_path, auth=auth)
    validate(doc)  # openapi-spec-validator: raises on any error
    problems = _redocly(path)
    assert problems == [], _summary(problems)


def test_the_document_says_what_the_linters_look_for(tmp_path: Path) -> None:
    _, doc = _document(tmp_path, auth=True)
    assert doc["info"]["license"]["identifier"] == "Apache-2.0"
    assert doc["servers"] == [{"url": "/", "description": "The Envoy that serves this document."}]
    assert doc["security"] == [{"apiKey": []}, {"bearer": []}]
    schemes = doc["components"]["securitySchemes"]
    assert (schemes["apiKey"]["in"], schemes["apiKey"]["name"]) == ("header", "X-API-Key")
    assert (schemes["bearer"]["type"], schemes["bearer"]["scheme"]) == ("http", "bearer")
    assert doc["paths"]["/livez"]["get"]["security"] == []
    assert all(t.get("description") for t in doc["tags"])
    for path, item in doc["paths"].items():
        for verb, op in item.items():
            assert op["summary"] and op["description"], (verb, path)
    # the typed operations: from the generated comments, and the model's docstring
    create = doc["paths"]["/v1/contacts"]["post"]
    assert create["summary"].startswith("Creates a Contact and returns it as stored")
    contact = doc["components"]["schemas"]["nexus.models.v1.Contact"]
    assert contact["description"].startswith("A person to keep in touch with.")
    assert contact["properties"]["email"]["description"] == "Where to write to. Unique."
    contacts = next(t for t in doc["tags"] if t["name"] == "ContactService")
    assert "A person to keep in touch with" in contacts["description"]
    # errors: Status.details is a oneOf of the details the server sends, by `@type`
    items = doc["components"]["schemas"]["google.rpc.Status"]["properties"]["details"]["items"]
    mapping = items["discriminator"]["mapping"]
    assert items["discriminator"]["propertyName"] == "@type"
    assert set(mapping) == {
        f"type.googleapis.com/google.rpc.{name}"
        for name in ("ErrorInfo", "BadRequest", "RetryInfo")
    }
    assert items["oneOf"] == [{"$ref": ref} for ref in mapping.values()]
    info = doc["components"]["schemas"]["google.rpc.ErrorInfo"]
    assert info["required"] == ["@type"]
    assert info["properties"]["@type"]["const"] == "type.googleapis.com/google.rpc.ErrorInfo"


def test_without_authentication_no_operation_needs_a_credential(tmp_path: Path) -> None:
    _, doc = _document(tmp_path, auth=False)
    assert doc["security"] == []
    assert "securitySchemes" not in doc["components"]
