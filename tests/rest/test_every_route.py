"""Every REST route of the app, called once through Envoy with a valid request; the test
fails when the OpenAPI document lists a route this table does not call."""

from __future__ import annotations

import json
from typing import Any

import httpx


def test_every_route_answers(client: httpx.Client, unique: str) -> None:
    called: set[tuple[str, str]] = set()

    def call(method: str, template: str, url: str, status: int = 200, **kw: Any) -> dict[str, Any]:
        resp = client.request(method, url, **kw)
        assert resp.status_code == status, (method, url, resp.text)
        called.add((method.lower(), template))
        if resp.headers["content-type"] == "text/event-stream":
            return {
                "events": [json.loads(x[6:]) for x in resp.text.splitlines() if x[:6] == "data: "]
            }
        data: dict[str, Any] = resp.json()
        return data

    u = unique
    doc = call("GET", "/openapi.json", "/openapi.json")

    # ProbeService
    call("GET", "/health", "/health")
    assert call("GET", "/readyz", "/readyz")["status"] == "ready"
    assert call("GET", "/livez", "/livez") == {"status": "alive"}

    # WorkflowService
    call("GET", "/v1/workflows", "/v1/workflows")
    call("GET", "/workflows", "/workflows")
    definition = {
        "nodes": [{"id": "n", "type": "RestBoomNode", "params": {"message": "{{message}}"}}]
    }
    call(
        "POST", "/v1/workflows", "/v1/workflows", json={"name": f"w_{u}", "definition": definition}
    )
    call("GET", "/v1/workflows/{name}", f"/v1/workflows/w_{u}")
    call("DELETE", "/v1/workflows/{name}", f"/v1/workflows/w_{u}")
    inputs = {"name": "E", "email": f"e.{u}@x.org"}
    ex = call(
        "POST", "/v1/workflows/{name}:execute", "/v1/workflows/create_contact:execute",
        json={"inputs": inputs},
    )  # fmt: skip
    call(
        "POST", "/workflows/{name}/execute", "/workflows/create_contact/execute",
        json={"inputs": {"name": "F", "email": f"f.{u}@x.org"}},
    )  # fmt: skip
    streamed = call(
        "POST", "/v1/workflows/{name}:stream", "/v1/workflows/create_contact:stream",
        json={"inputs": {"name": "G", "email": f"g.{u}@x.org"}},
    )  # fmt: skip
    assert "execution_completed" in streamed["events"][-1]
    queued = call(
        "POST", "/v1/workflows/{name}:start", "/v1/workflows/create_contact:start",
        json={"inputs": {"name": "Q", "email": f"q.{u}@x.org"}},
    )  # fmt: skip
    assert queued["state"] == "STATE_QUEUED"
    call(
        "GET", "/workflows/{workflow}/status/{id}",
        f"/workflows/create_contact/status/{queued['id']}",
    )  # fmt: skip
    call("GET", "/v1/executions", "/v1/executions", params={"workflow": "create_contact"})
    call("GET", "/v1/executions/{id}", f"/v1/executions/{ex['id']}")
    watched = call("GET", "/v1/executions/{id}:watch", f"/v1/executions/{ex['id']}:watch")
    assert "execution_completed" in watched["events"][-1]
    # a finished execution cannot be cancelled: the route answers with that error
    call("POST", "/v1/executions/{id}:cancel", f"/v1/executions/{ex['id']}:cancel", 400, json={})

    # ModelService
    base = "/v1/models/{model}/records"
    call("GET", "/v1/models", "/v1/models")
    call("GET", "/v1/models/{name}", "/v1/models/Company")
    rec = call("POST", base, "/v1/models/Company/records", json={"name": f"C {u}"})
    one = f"/v1/models/Company/records/{rec['id']}"
    call("GET", base + "/{id}", one)
    call("PATCH", base + "/{id}", one, json={"employees": 3})
    call("GET", base, "/v1/models/Company/records", params={"order_by": "-name"})
    flt = {"filter": {"name": {"$like": f"%{u}%"}}}
    call("POST", base + ":search", "/v1/models/Company/records:search", json=flt)
    # full-text search: Company has no searchable field, so the route answers 400
    # QUERY_INVALID (tests/clients/test_search_channels.py searches a searchable model)
    call("GET", base + ":search", "/v1/models/Company/records:search", 400, params={"q": "x"})
    call(
        "POST", base + ":fullTextSearch", "/v1/models/Company/records:fullTextSearch", 400,
        json={"q": "x"},
    )  # fmt: skip
    call("GET", base + ":count", "/v1/models/Company/records:count")
    call("POST", base + ":count", "/v1/models/Company/records:count", json=flt)
    up = call(
        "POST", base + ":upsert", "/v1/models/Company/records:upsert",
        json={"record": {"name": f"U {u}"}, "conflict_on": ["name"]},
    )  # fmt: skip
    assert up["created"] is True
    call(
        "POST", base + ":bulkCreate", "/v1/models/Company/records:bulkCreate",
        json={"records": [{"name": f"B1 {u}"}, {"name": f"B2 {u}"}]},
    )  # fmt: skip
    call(
        "POST", base + ":bulkUpdate", "/v1/models/Company/records:bulkUpdate",
        json={**flt, "values": {"employees": 9}},
    )  # fmt: skip
    call(
        "POST", base + ":bulkUpsert", "/v1/models/Company/records:bulkUpsert",
        json={"records": [{"name": f"B3 {u}"}], "conflict_on": ["name"]},
    )  # fmt: skip
    call(
        "POST", "/v1/records:batchWrite", "/v1/records:batchWrite",
        json={"writes": [{"create": {"model": "Company", "record": {"name": f"W {u}"}}}]},
    )  # fmt: skip
    call("DELETE", base + "/{id}", one)
    deleted = call("POST", base + ":bulkDelete", "/v1/models/Company/records:bulkDelete", json=flt)
    assert deleted["deleted_count"] == "5"

    # the typed services
    typed = [("contacts", "email", "score"), ("companies", "name", "employees")]
    for coll, field, number in typed:

        def record(tag: str, coll: str = coll) -> dict[str, Any]:
            r: dict[str, Any] = {"name": f"{tag} {u}"}
            if coll == "contacts":
                r["email"] = f"{tag}.{u}@typed.org"
            return r

        b = f"/v1/{coll}"
        created = call("POST", b, b, json=record("t1"))
        item = f"{b}/{created['id']}"
        call("GET", b + "/{id}", item)
        call("PATCH", b + "/{id}", item, json={"name": f"t1b {u}"}, params={"update_mask": "name"})
        call("GET", b, b, params={"page_size": 5})
        tflt = {"filter": {"name": {"$like": f"%{u}"}}}
        call("POST", b + ":search", f"{b}:search", json=tflt)
        call("GET", b + ":count", f"{b}:count")
        call("POST", b + ":count", f"{b}:count", json=tflt)
        call(
            "POST",
            b + ":upsert",
            f"{b}:upsert",
            json={_single(coll): record("t2"), "conflict_on": [field]},
        )
        call(
            "POST", b + ":bulkCreate", f"{b}:bulkCreate", json={coll: [record("t3"), record("t4")]}
        )
        call(
            "POST",
            b + ":bulkUpdate",
            f"{b}:bulkUpdate",
            json={**tflt, "values": {number: "5"}},
        )
        call(
            "POST",
            b + ":bulkUpsert",
            f"{b}:bulkUpsert",
            json={coll: [record("t6")], "conflict_on": [field]},
        )
        call("DELETE", b + "/{id}", item)
        call("POST", b + ":bulkDelete", f"{b}:bulkDelete", json=tflt)

    routes = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert routes - called == set(), "routes without a REST call in this test"
    assert called - routes == set()


def _single(collection: str) -> str:
    return {"contacts": "contact", "companies": "company"}[collection]
