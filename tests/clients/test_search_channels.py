"""Full-text search on every channel, against one real server whose `Contact` is
searchable: REST through the real Envoy (typed `GET /v1/contacts:search?q=...` and the
generic route), the CLI as a subprocess (`nexus contacts search "ada love"`) and the MCP
tool `contacts_search` through the real `mcp` client."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters

from dataflow import DataFlow, field
from nexus_server import Nexus

pytestmark = pytest.mark.timeout(120)

WAIT = 20.0
ROOT = Path(__file__).resolve().parents[2]
NEXUS_MCP = str(Path(sys.executable).parent / "nexus-mcp")

PEOPLE = [
    {"id": "s1", "name": "Ada Lovelace", "email": "ada@example.com", "company": "Engines"},
    {"id": "s2", "name": "Ada Ada Ada", "email": "triple@example.com", "score": 5},
    {"id": "s3", "name": "Charles Babbage", "email": "charles@example.com", "company": "Engines"},
    {"id": "s4", "name": "Lovelace Ada Byron", "email": "byron@example.com", "score": 9},
]


def _searchable_app(db_url: str) -> tuple[Nexus, DataFlow]:
    app = Nexus(grpc_port=0, grace_period=1.0)
    db = DataFlow(db_url)

    @db.model
    class Contact:
        """A person to keep in touch with."""

        __searchable__ = True
        id: str
        name: str
        email: str = field(unique=True)
        company: str | None = None
        score: int = 0

    app.integrate_dataflow(db)
    return app, db


@pytest.fixture(scope="module")
def app_builder() -> Any:
    return _searchable_app


@pytest.fixture(scope="module")
def seeded(server: Any) -> Any:
    db = server.app.db
    server.run_on_loop(db.ops("Contact").bulk_create(PEOPLE))
    return server


def _reason(body: dict[str, Any]) -> tuple[str, list[str]]:
    reason, fields = "", []
    for d in body.get("details", []):
        if d.get("@type", "").endswith("ErrorInfo"):
            reason = d["reason"]
        if d.get("@type", "").endswith("BadRequest"):
            fields += [v["field"] for v in d.get("field_violations", [])]
    return reason, fields


def test_rest_search(seeded: Any, rest_url: str) -> None:
    with httpx.Client(base_url=rest_url, timeout=WAIT) as http:
        resp = http.get("/v1/contacts:search", params={"q": "ada love*"})
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        assert sorted(c["id"] for c in doc["contacts"]) == ["s1", "s4"]
        assert len(doc["scores"]) == 2

        resp = http.get("/v1/contacts:search", params={"q": "ada"})
        assert resp.json()["contacts"][0]["id"] == "s2"  # says it three times

        resp = http.post(
            "/v1/contacts:fullTextSearch",
            json={"q": "ada", "filter": {"score": {"$gte": 5}}, "page_size": 1},
        )
        assert resp.status_code == 200, resp.text
        first = resp.json()
        assert len(first["contacts"]) == 1 and first["next_page_token"]
        resp = http.post(
            "/v1/contacts:fullTextSearch",
            json={
                "q": "ada",
                "filter": {"score": {"$gte": 5}},
                "page_token": first["next_page_token"],
            },
        )
        ids = [first["contacts"][0]["id"], *(c["id"] for c in resp.json()["contacts"])]
        assert sorted(ids) == ["s2", "s4"]

        resp = http.get("/v1/models/Contact/records:search", params={"q": '"ada lovelace"'})
        assert resp.status_code == 200, resp.text
        assert [r["id"] for r in resp.json()["records"]] == ["s1"]

        for q in ('"ada', "-ada"):
            resp = http.get("/v1/contacts:search", params={"q": q})
            assert resp.status_code == 400, resp.text
            assert _reason(resp.json()) == ("QUERY_INVALID", ["q"])


def test_cli_search(seeded: Any, cli: Any) -> None:
    res = cli("contacts", "--help")
    assert res.code == 0 and "search" in res.out, res.out + res.err
    res = cli("contacts", "search", "ada love*")
    assert res.code == 0, res.err
    assert "Ada Lovelace" in res.out and "Lovelace Ada Byron" in res.out
    assert "Babbage" not in res.out and "relevance" in res.out
    res = cli("-o", "json", "contacts", "search", "ada", "--filter", '{"score": {"$gt": 0}}')
    assert res.code == 0, res.err
    doc = res.json()
    assert sorted(r["id"] for r in doc["records"]) == ["s2", "s4"]
    assert len(doc["scores"]) == 2
    # records in the model's declaration order, as `list` prints them
    listed = cli("-o", "json", "contacts", "list", "--filter", '{"id": "s2"}').json()
    (found,) = [r for r in doc["records"] if r["id"] == "s2"]
    assert list(found) == list(listed["records"][0])
    res = cli("-o", "json", "contacts", "search", "ada", "--limit", "1", "--fields", "name")
    doc = res.json()
    assert doc["records"] == [{"name": "Ada Ada Ada"}] and doc["next_page_token"]
    res = cli("contacts", "search", '"ada')
    assert res.code == 4  # INVALID_ARGUMENT
    assert "QUERY_INVALID" in res.err and "unclosed quote" in res.err


async def test_mcp_search_tool(seeded: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_SERVER"] = seeded.address
    env["PYTHONPATH"] = str(ROOT)
    params = StdioServerParameters(command=NEXUS_MCP, args=[], env=env, cwd=str(ROOT))
    async with Client(params, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            tools = {t.name: t for t in (await client.list_tools()).tools}
            tool = tools["contacts_search"]
            assert tool.input_schema["required"] == ["query"]
            assert tool.annotations is not None and tool.annotations.read_only_hint is True
            result = await client.call_tool("contacts_search", {"query": "ada lovelace"})
            assert not result.is_error, result.content
            doc = result.structured_content
            assert doc is not None
            assert sorted(r["id"] for r in doc["records"]) == ["s1", "s4"]
            assert len(doc["scores"]) == 2
            result = await client.call_tool(
                "contacts_search", {"query": "engines", "filter": {"company": "Engines"}}
            )
            assert sorted(r["id"] for r in result.structured_content["records"]) == ["s1", "s3"]  # type: ignore[index]
            bad = await client.call_tool("contacts_search", {"query": "-ada"})
            assert bad.is_error
            assert "QUERY_INVALID" in bad.content[0].text  # type: ignore[union-attr]
