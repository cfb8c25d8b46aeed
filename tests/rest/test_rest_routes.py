"""Every kind of REST call through the real Envoy: success, each error status with its
JSON `google.rpc.Status` body, the original route, and Envoy's own local replies."""

from __future__ import annotations

import json
from typing import Any

import httpx

from nexus_server._envoy import MAX_REQUEST_BYTES


def _contact(client: httpx.Client, unique: str, **extra: Any) -> dict[str, Any]:
    body = {"name": f"Ada {unique}", "email": f"{unique}@example.com", **extra}
    resp = client.post("/v1/contacts", json=body)
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def test_the_original_route_executes_a_workflow(client: httpx.Client, unique: str) -> None:
    resp = client.post(
        "/workflows/create_contact/execute",
        json={"inputs": {"name": "John Doe", "email": f"john.{unique}@example.com"}},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/json"
    execution = resp.json()
    assert execution["state"] == "STATE_SUCCEEDED"
    assert execution["workflow"] == "create_contact"
    created = execution["outputs"]["create"]
    assert created["email"] == f"john.{unique}@example.com"
    assert created["score"] == 0  # a Struct number stays a number
    # proto field names as declared; primitive fields printed even when empty
    assert execution["request_id"] == ""
    assert execution["duration"].endswith("s")


def test_a_workflows_inputs_and_outputs_print_their_keys_sorted(
    client: httpx.Client, unique: str
) -> None:
    """A Struct's keys (a workflow's inputs and outputs) reach Envoy's transcoder in the
    map's wire order, a hash order seeded per process: REST replies are serialized
    deterministically, so their keys are sorted, the same on every call and after every
    restart. A message's own fields keep their declaration order."""
    inputs = {"name": "Sorted", "email": f"sorted.{unique}@x.org", "company": "C", "score": 2}
    resp = client.post("/workflows/create_contact/execute", json={"inputs": inputs})
    assert resp.status_code == 200, resp.text
    pairs = json.loads(resp.text, object_pairs_hook=list)
    assert [k for k, _ in pairs][:3] == ["id", "workflow", "state"]
    execution = dict(pairs)
    record = dict(execution["outputs"])["create"]
    keys = [k for k, _ in record]
    assert len(keys) == 7 and keys == sorted(keys), keys  # by chance: 1 in 5,040
    assert [k for k, _ in execution["inputs"]] == sorted(inputs)


def test_the_custom_verb_route_and_camel_case_input(client: httpx.Client, unique: str) -> None:
    resp = client.post(
        "/v1/workflows/create_contact:execute",
        json={"inputs": {"name": "Cam", "email": f"cam.{unique}@x.org"}, "requestId": unique},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["request_id"] == unique


def test_invalid_inputs_are_400_with_field_violations(
    client: httpx.Client, status_body: Any
) -> None:
    resp = client.post("/workflows/create_contact/execute", json={"inputs": {"name": 3}})
    assert resp.status_code == 400
    assert resp.headers["content-type"] == "application/json"
    body = status_body(resp.json(), 3, "INPUTS_INVALID")
    (bad,) = [d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    fields = {v["field"] for v in bad["field_violations"]}
    assert fields == {"inputs.name", "inputs.email"}


def test_unknown_workflow_is_404(client: httpx.Client, status_body: Any) -> None:
    resp = client.post("/workflows/nope/execute", json={"inputs": {}})
    assert resp.status_code == 404
    body = status_body(resp.json(), 5, "WORKFLOW_NOT_FOUND")
    assert body["details"][0]["metadata"] == {"workflow": "nope"}
    assert client.get("/v1/workflows/nope").status_code == 404


def test_unknown_records_are_404_on_typed_and_generic_routes(
    client: httpx.Client, status_body: Any
) -> None:
    resp = client.get("/v1/contacts/no-such-id")
    assert resp.status_code == 404
    status_body(resp.json(), 5, "RECORD_NOT_FOUND")
    resp = client.get("/v1/models/Contact/records/no-such-id")
    assert resp.status_code == 404
    status_body(resp.json(), 5, "RECORD_NOT_FOUND")
    resp = client.get("/v1/models/Nope/records")
    assert resp.status_code == 404
    status_body(resp.json(), 5, "MODEL_NOT_FOUND")
    resp = client.get("/v1/executions/no-such-execution")
    assert resp.status_code == 404
    status_body(resp.json(), 5, "EXECUTION_NOT_FOUND")


def test_request_id_conflict_is_409(client: httpx.Client, unique: str, status_body: Any) -> None:
    url = "/v1/workflows/create_contact:execute"
    first = {"inputs": {"name": "R", "email": f"r.{unique}@x.org"}, "request_id": unique}
    resp = client.post(url, json=first)
    assert resp.status_code == 200, resp.text
    again = client.post(url, json=first)
    assert again.status_code == 200
    assert again.json()["id"] == resp.json()["id"]  # the retry returns the first execution
    other = {"inputs": {"name": "R", "email": f"other.{unique}@x.org"}, "request_id": unique}
    conflict = client.post(url, json=other)
    assert conflict.status_code == 409
    status_body(conflict.json(), 6, "REQUEST_ID_CONFLICT")


def test_an_existing_record_is_409(client: httpx.Client, unique: str, status_body: Any) -> None:
    _contact(client, unique)
    resp = client.post("/v1/contacts", json={"name": "Dup", "email": f"{unique}@example.com"})
    assert resp.status_code == 409
    status_body(resp.json(), 6, "RECORD_ALREADY_EXISTS")


def test_a_failed_node_is_409_and_an_internal_error_500(
    client: httpx.Client, status_body: Any
) -> None:
    resp = client.post("/workflows/boom/execute", json={"inputs": {"message": "kaput"}})
    assert resp.status_code == 409
    body = status_body(resp.json(), 10, "NODE_FAILED")
    assert body["details"][0]["metadata"]["execution_id"]
    resp = client.post("/workflows/internal/execute", json={"inputs": {"message": "x"}})
    assert resp.status_code == 500
    body = status_body(resp.json(), 13, "INTERNAL_ERROR")


def test_typed_crud_through_envoy(client: httpx.Client, unique: str) -> None:
    created = _contact(client, unique, score="7")
    cid = created["id"]
    assert created["score"] == "7"  # int64 prints as a string (proto3 JSON)
    assert client.get(f"/v1/contacts/{cid}").json() == created
    resp = client.patch(
        f"/v1/contacts/{cid}", params={"update_mask": "score"}, json={"score": 9, "name": "no"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["score"] == "9"
    assert resp.json()["name"] == created["name"]  # outside the mask
    listed = client.get("/v1/contacts", params={"page_size": 1000}).json()
    assert cid in {c["id"] for c in listed["contacts"]}
    assert "next_page_token" in listed
    resp = client.delete(f"/v1/contacts/{cid}")
    assert resp.status_code == 200
    assert resp.json() == {}
    assert client.get(f"/v1/contacts/{cid}").status_code == 404


def test_generic_record_routes(client: httpx.Client, unique: str) -> None:
    resp = client.post(
        "/v1/models/Company/records", json={"name": f"Acme {unique}", "employees": 5}
    )
    assert resp.status_code == 200, resp.text
    record = resp.json()
    assert record["employees"] == 5
    count = client.post(
        "/v1/models/Company/records:count", json={"filter": {"name": f"Acme {unique}"}}
    )
    assert count.status_code == 200, count.text
    assert count.json()["count"] == "1"
    found = client.post(
        "/v1/models/Company/records:search", json={"filter": {"employees": {"$gte": 5}}}
    )
    assert record["id"] in {r["id"] for r in found.json()["records"]}


def test_an_unknown_route_is_404_json(client: httpx.Client, status_body: Any) -> None:
    for method, url in [
        ("GET", "/nothing/here"),
        ("POST", "/v1/workflows/x:explode"),  # an unknown custom verb
        ("PUT", "/v1/workflows"),  # a known path with a method no RPC binds
    ]:
        resp = client.request(method, url)
        assert resp.status_code == 404, (method, url)
        assert resp.headers["content-type"] == "application/json"
        status_body(resp.json(), 5, "ROUTE_NOT_FOUND", gateway=True)


def test_an_unknown_query_parameter_is_400_json(client: httpx.Client, status_body: Any) -> None:
    resp = client.get("/v1/workflows", params={"bogus": "1"})
    assert resp.status_code == 400
    body = status_body(resp.json(), 3, "REQUEST_INVALID", gateway=True)
    assert "bogus" in body["message"]


def test_a_malformed_json_body_is_400_json(client: httpx.Client, status_body: Any) -> None:
    for body in [b'{"inputs": {', b'{"inputs": "x"}', b"[1, 2]", b"\xff\xfe"]:
        resp = client.post(
            "/workflows/create_contact/execute",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert resp.status_code == 400, body
        assert resp.headers["content-type"] == "application/json", body
        status_body(resp.json(), 3, "REQUEST_INVALID", gateway=True)
    resp = client.get("/v1/workflows", params={"page_size": "abc"})
    assert resp.status_code == 400
    status_body(resp.json(), 3, "REQUEST_INVALID", gateway=True)


def test_an_oversized_request_is_413_json(client: httpx.Client, status_body: Any) -> None:
    big = {"inputs": {"name": "a" * (MAX_REQUEST_BYTES + 1), "email": "x@y.z"}}
    resp = client.post("/workflows/create_contact/execute", json=big)
    assert resp.status_code == 413
    assert resp.headers["content-type"] == "application/json"
    status_body(resp.json(), 8, "REQUEST_TOO_LARGE", gateway=True)
    # headers above Envoy's limit (60 KiB by default) are the same error
    resp = client.get("/v1/workflows", headers={"x-padding": "a" * (64 * 1024)})
    assert resp.status_code == 431
    assert resp.headers["content-type"] == "application/json"
    status_body(resp.json(), 8, "REQUEST_TOO_LARGE", gateway=True)


def test_enums_and_query_parameters(client: httpx.Client) -> None:
    resp = client.get(
        "/v1/executions", params={"workflow": "create_contact", "state": "STATE_SUCCEEDED"}
    )
    assert resp.status_code == 200, resp.text
    states = {e["state"] for e in resp.json()["executions"]}
    assert states <= {"STATE_SUCCEEDED"}
    # case-insensitive enum parsing; `+` is a space in a query string
    resp = client.get("/v1/executions?workflow=create_contact&state=state_succeeded")
    assert resp.status_code == 200, resp.text


def test_envoys_own_errors_never_quote_a_long_value(client: httpx.Client, status_body: Any) -> None:
    """The transcoder's "field: invalid value ..." quotes the caller's value; Envoy cannot
    cut it, so the Lua filter does (over 4 KiB): from the body and from the query."""
    big = "x" * 100_000
    resp = client.post("/v1/models/Contact/records:count", json={"filter": big})
    assert resp.status_code == 400, resp.text[:300]
    body = status_body(resp.json(), 3, "REQUEST_INVALID", gateway=True)
    assert body["message"].startswith("filter: invalid value")
    assert body["message"].endswith("... (cut)") and len(resp.content) < 1000
    resp = client.get("/v1/models/Contact/records", params={"filter": "y" * 20_000})
    assert resp.status_code == 400 and len(resp.content) < 1000, resp.text[:300]
    assert status_body(resp.json(), 3, "REQUEST_INVALID", gateway=True)["message"].endswith(
        "... (cut)"
    )
    # a short one is quoted whole
    resp = client.post("/v1/models/Contact/records:count", json={"filter": "short"})
    assert resp.status_code == 400 and '"short"' in resp.json()["message"]
