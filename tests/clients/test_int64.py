"""A 64-bit integer survives every channel exactly (docs/api.md, "64-bit integers").

A model with an int primary key and an int field (BIGINT on PostgreSQL, `BIGSERIAL` for
the id) holds 2^63-1, and ids beyond 2^53. Records are created over gRPC (typed and
generic), REST through the real Envoy (typed and generic), the CLI (a subprocess) and
MCP (the `mcp` client over stdio), then read, listed with a filter on the value, passed
through a workflow (its input and outputs) and read back from the execution record on
every channel: each time the same exact value, a JSON string of its digits on the JSON
surfaces, an int in gRPC's typed message. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from mcp import Client, StdioServerParameters

from clients._grpc import ApiFailure, DynamicMethods, to_json
from dataflow import DataFlow
from nexus_api.nexus.model.v1 import model_service_pb2 as m
from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg
from nexus_server import Nexus
from workflow import WorkflowBuilder

ROOT = Path(__file__).resolve().parents[2]
WAIT = 20.0
BIG = 2**63 - 1
#: The largest id a create may give (docs/dataflow.md: 2^63 - 2^20), far beyond 2^53.
TOP_ID = 2**63 - 2**20


def build_app(db_url: str) -> tuple[Nexus, DataFlow]:
    app = Nexus(grpc_port=0, grace_period=1.0)
    db = DataFlow(db_url)

    @db.model
    class Tally:
        """A counter with a 64-bit value."""

        id: int
        total: int = 0
        note: str | None = None

    app.integrate_dataflow(db)
    read = WorkflowBuilder("Read a tally by id.")
    read.add_input("id", int, description="the tally's id")
    read.add_node("TallyReadNode", "read", {"id": "{{id}}"})
    app.register("read_tally", read.build())
    return app, db


@pytest.fixture(scope="module")
def app_builder() -> Any:
    return build_app


def _reset_schema(url: str) -> None:
    async def reset() -> None:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, reset()).result(timeout=WAIT)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server_db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('int64') / 'nexus.db'}"
    url: str = request.getfixturevalue("pg_url")
    _reset_schema(url)  # an empty schema: `tallies` is this module's table
    return url


def _text_ids(docs: list[dict[str, Any]]) -> set[str]:
    return {d["id"] for d in docs}


def test_int64_survives_every_channel(server: Any, rest_url: str, cli: Any) -> None:
    ids = {name: TOP_ID - n for n, name in enumerate(("grpc", "grpc_typed", "rest", "cli", "mcp"))}
    want = {str(i) for i in ids.values()}
    rest = httpx.Client(base_url=rest_url, timeout=WAIT)
    channel = grpc.insecure_channel(server.address)
    records = mg.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
    workflows = wg.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
    typed = DynamicMethods(channel)

    # ---- create, one record per channel
    record = struct_pb2.Struct()
    record.update({"id": str(ids["grpc"]), "total": str(BIG)})  # beyond 2^53: as text
    made = records.CreateRecord(m.CreateRecordRequest(model="Tally", record=record), timeout=WAIT)
    assert to_json(made)["total"] == str(BIG)
    # the typed message: a real int64 on the wire, text in its proto3 JSON
    (made_typed,) = typed.call(
        "TallyService/CreateTally",
        {"tally": {"id": str(ids["grpc_typed"]), "total": str(BIG)}},
        timeout=WAIT,
    )
    assert made_typed["total"] == str(BIG) and made_typed["id"] == str(ids["grpc_typed"])
    r = rest.post("/v1/tallies", json={"id": str(ids["rest"]), "total": str(BIG)})
    assert r.status_code == 200, r.text
    assert r.json()["total"] == str(BIG)
    r2 = cli("-o", "json", "tallies", "create", "--id", str(ids["cli"]), "--total", str(BIG))
    assert r2.code == 0, r2.err
    assert r2.json()["total"] == str(BIG) and r2.json()["id"] == str(ids["cli"])

    async def mcp_calls() -> list[Any]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
        env.update(NEXUS_SERVER=server.address, PYTHONPATH=str(ROOT))
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "clients.mcp"], env=env, cwd=str(ROOT)
        )
        out = []
        async with Client(params, read_timeout_seconds=WAIT) as client:
            with anyio.fail_after(WAIT * 3):
                # JSON integers as an agent sends them: the adapter keeps them exact
                calls: list[tuple[str, dict[str, Any]]] = [
                    ("tallies_create", {"id": ids["mcp"], "total": BIG}),
                    ("tallies_get", {"id": str(ids["grpc"])}),
                    ("tallies_list", {"filter": {"total": BIG}, "order_by": "id"}),
                    ("tallies_count", {"filter": {"total": {"$gte": BIG}}}),
                    ("run_read_tally", {"id": ids["rest"]}),
                ]
                for name, args in calls:
                    result = await client.call_tool(name, args)
                    assert not result.is_error, (name, result.content)
                    out.append(result.structured_content)
        return out

    mcp_created, mcp_got, mcp_listed, mcp_count, mcp_run = anyio.run(mcp_calls)
    assert mcp_created["total"] == str(BIG) and mcp_created["id"] == str(ids["mcp"])

    # ---- read: the generic record is one document on every channel
    via_grpc = to_json(
        records.GetRecord(m.GetRecordRequest(model="Tally", id=str(ids["grpc"])), timeout=WAIT)
    )
    assert via_grpc["total"] == str(BIG) and via_grpc["id"] == str(ids["grpc"])
    assert via_grpc["note"] is None  # a null is printed
    assert rest.get(f"/v1/models/Tally/records/{ids['grpc']}").json() == via_grpc
    got = cli("-o", "json", "tallies", "get", str(ids["grpc"]))
    assert got.code == 0, got.err
    assert got.json() == via_grpc
    assert mcp_got == via_grpc
    # the typed message: an int in gRPC, its digits in proto3 JSON (REST, `nexus call`)
    (typed_doc,) = typed.call("TallyService/GetTally", {"id": str(ids["rest"])}, timeout=WAIT)
    assert typed_doc["total"] == str(BIG)
    assert rest.get(f"/v1/tallies/{ids['rest']}").json() == typed_doc
    called = cli(
        "-o",
        "json",
        "call",
        "TallyService/GetTally",
        "--json",
        json.dumps({"id": str(ids["rest"])}),
    )
    assert called.code == 0, called.err
    assert called.json() == typed_doc

    # ---- list, filtered on the value itself
    flt = {"total": str(BIG)}
    listed = to_json(
        records.ListRecords(
            m.ListRecordsRequest(model="Tally", filter=_struct(flt), order_by="id"), timeout=WAIT
        )
    )
    assert _text_ids(listed["records"]) == want
    assert all(d["total"] == str(BIG) for d in listed["records"])
    r = rest.post("/v1/models/Tally/records:search", json={"filter": flt, "order_by": "id"})
    assert r.json() == listed
    typed_list = rest.post("/v1/tallies:search", json={"filter": flt, "order_by": "id"})
    assert typed_list.status_code == 200, typed_list.text
    assert {d["id"] for d in typed_list.json()["tallies"]} == want
    assert all(d["total"] == str(BIG) for d in typed_list.json()["tallies"])
    # `nexus call` with the value as a JSON number in the filter (a Struct): sent exact
    request = json.dumps({"filter": {"total": BIG}, "order_by": "id"})
    typed_cli = cli("-o", "json", "call", "TallyService/ListTallies", "--json", request)
    assert typed_cli.code == 0, typed_cli.err
    assert typed_cli.json() == typed_list.json()
    on_cli = cli(
        "-o", "json", "tallies", "list", "--filter", json.dumps({"total": BIG}), "--order-by", "id"
    )
    assert on_cli.code == 0, on_cli.err
    assert on_cli.json() == listed
    assert mcp_listed == listed
    assert mcp_count == {"count": "5"}  # CountRecordsResponse.count: int64, as text

    # ---- a workflow: the id goes in as an int input, the record comes out exact
    request = w.ExecuteWorkflowRequest(name="read_tally", inputs=_struct({"id": str(ids["rest"])}))
    execution = to_json(workflows.ExecuteWorkflow(request, timeout=WAIT))
    outputs = execution["outputs"]
    assert outputs["read"]["total"] == str(BIG) and outputs["read"]["id"] == str(ids["rest"])
    assert execution["inputs"] == {"id": str(ids["rest"])}
    r = rest.post("/v1/workflows/read_tally:execute", json={"inputs": {"id": str(ids["rest"])}})
    assert r.json()["outputs"] == outputs and r.json()["inputs"] == execution["inputs"]
    ran = cli("-o", "json", "run", "read_tally", "--id", str(ids["rest"]))
    assert ran.code == 0, ran.err
    assert ran.json()["outputs"] == outputs and ran.json()["inputs"] == execution["inputs"]
    assert mcp_run == outputs

    # ---- the execution record, read back on every channel
    stored = to_json(
        workflows.GetExecution(w.GetExecutionRequest(id=execution["id"]), timeout=WAIT)
    )
    assert stored["outputs"] == outputs and stored["inputs"] == execution["inputs"]
    assert rest.get(f"/v1/executions/{execution['id']}").json() == stored
    shown = cli("-o", "json", "executions", "get", execution["id"])
    assert shown.code == 0, shown.err
    assert shown.json() == stored
    channel.close()
    rest.close()


def _struct(doc: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(doc)
    return s


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"id": "12x"}, "inputs.id"),  # not an integer's text
        ({"id": "99999999999999999999"}, "id"),  # beyond 64 bits: refused by the node
        ({"id": "1" * 40}, "inputs.id"),  # longer than any 64-bit integer: left as text
    ],
)
def test_bad_int_text_in_inputs_is_invalid_naming_the_input(
    server: Any, inputs: dict[str, Any], field: str
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = wg.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
        request = w.ExecuteWorkflowRequest(name="read_tally", inputs=_struct(inputs))
        with pytest.raises(grpc.RpcError) as caught:
            stub.ExecuteWorkflow(request, timeout=WAIT)
    failure = ApiFailure.from_rpc_error(caught.value)
    assert failure.code == "INVALID_ARGUMENT", failure.render()
    assert [f for f, _ in failure.violations] == [field], failure.render()


@pytest.mark.parametrize(
    ("flt", "field"),
    [
        ({"total": {"$gte": "abc"}}, "filter.total.$gte"),
        ({"total": {"$in": ["1", "1x"]}}, "filter.total.$in[1]"),
        ({"$or": [{"total": "99999999999999999999"}]}, "filter.$or[0].total"),
    ],
)
def test_bad_int_text_in_filters_is_invalid_naming_the_field(
    server: Any, flt: dict[str, Any], field: str
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = mg.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        with pytest.raises(grpc.RpcError) as caught:
            stub.CountRecords(
                m.CountRecordsRequest(model="Tally", filter=_struct(flt)), timeout=WAIT
            )
    failure = ApiFailure.from_rpc_error(caught.value)
    assert failure.code == "INVALID_ARGUMENT", failure.render()
    assert [f for f, _ in failure.violations] == [field], failure.render()


def test_int_text_in_filter_operators_finds_the_records(server: Any) -> None:
    """Operators, `$in` and `$and`/`$or`/`$not` take an int's text like `$eq` does."""
    with grpc.insecure_channel(server.address) as channel:
        stub = mg.ModelServiceStub(channel)  # type: ignore[no-untyped-call]
        for n in (2**60, 2**60 + 1):
            stub.CreateRecord(
                m.CreateRecordRequest(
                    model="Tally", record=_struct({"id": str(n - 2**40), "total": str(n)})
                ),
                timeout=WAIT,
            )

        def count(flt: dict[str, Any]) -> str:
            resp = stub.CountRecords(
                m.CountRecordsRequest(model="Tally", filter=_struct(flt)), timeout=WAIT
            )
            return str(to_json(resp)["count"])

        below = {"$lt": str(2**61)}  # not the records of the other test
        assert count({"total": {"$gt": str(2**60), **below}}) == "1"  # 2^60 + 1 is 2^60 as a double
        assert count({"total": {"$in": [str(2**60), str(2**60 + 1)]}}) == "2"
        assert (
            count({"$and": [{"total": {"$gte": str(2**60)}}, {"total": {"$lte": str(2**60)}}]})
            == "1"
        )
        assert (
            count({"$not": {"total": str(2**60 + 1)}, "total": {"$gte": str(2**60), **below}})
            == "1"
        )
