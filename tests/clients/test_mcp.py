"""`nexus-mcp` through the real `mcp` client: over stdio (spawning the console script)
and over streamable HTTP, against a real gRPC server (see conftest.py)."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from mcp import Client, StdioServerParameters

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg

WAIT = 20.0
ROOT = Path(__file__).resolve().parents[2]
NEXUS_MCP = str(Path(sys.executable).parent / "nexus-mcp")


def _env(server: Any) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_SERVER"] = server.address
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture
def stdio(server: Any) -> StdioServerParameters:
    """How the real MCP client spawns `nexus-mcp` over stdio (polling every 0.2 s).

    Each test enters `Client(stdio)` itself: the client's task groups must be entered
    and exited in the same task, which an async fixture does not guarantee.
    """
    return StdioServerParameters(
        command=NEXUS_MCP, args=["--poll-interval", "0.2"], env=_env(server), cwd=str(ROOT)
    )


def _walk(value: Any) -> Iterator[Any]:
    yield value
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


async def test_tools_are_typed_from_workflows_and_models(stdio: Any) -> None:
    async with Client(stdio, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            tools = {t.name: t for t in (await client.list_tools()).tools}
            for name in ("run_create_contact", "run_search_contacts", "run_gated", "run_boom"):
                assert name in tools
            for op in ("create", "get", "list", "count", "update", "upsert", "delete"):
                assert f"contacts_{op}" in tools and f"companies_{op}" in tools
            for name, tool in tools.items():
                assert re.fullmatch(r"[a-z][a-z0-9_]{0,63}", name), name
                assert "$ref" not in list(_walk(tool.input_schema)), name
                assert tool.input_schema["type"] == "object"

            search = tools["run_search_contacts"].input_schema
            assert search["required"] == ["query"]
            assert search["properties"]["query"] == {
                "type": "string",
                "description": "text the name contains (any case)",
            }
            assert search["properties"]["min_score"]["type"] == "integer"
            assert search["properties"]["min_score"]["default"] == 0
            assert search["properties"]["limit"]["default"] == 20
            create = tools["run_create_contact"].input_schema
            assert create["properties"]["company"]["anyOf"] == [
                {"type": "string"},
                {"type": "null"},
            ]

            contact = tools["contacts_create"].input_schema
            assert sorted(contact["required"]) == ["email", "name"]
            assert contact["properties"]["score"] == {"type": "integer", "default": 0}
            assert "created_at" not in contact["properties"]
            ann = {
                n: tools[n].annotations
                for n in ("contacts_get", "contacts_list", "contacts_delete")
            }
            assert ann["contacts_get"] is not None and ann["contacts_get"].read_only_hint is True
            assert ann["contacts_list"] is not None and ann["contacts_list"].read_only_hint is True
            assert (
                ann["contacts_delete"] is not None
                and ann["contacts_delete"].destructive_hint is True
            )


def _declared_fields(server: Any, model: str) -> list[str]:
    from nexus_api.nexus.model.v1 import model_service_pb2 as m
    from nexus_api.nexus.model.v1 import model_service_pb2_grpc as mg

    with grpc.insecure_channel(server.address) as channel:
        info = mg.ModelServiceStub(channel).GetModel(m.GetModelRequest(name=model), timeout=WAIT)
    return [f.name for f in info.fields]


async def test_call_a_workflow_tool_and_model_tools(stdio: Any, server: Any, unique: Any) -> None:
    declared = _declared_fields(server, "Contact")
    async with Client(stdio, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            email = unique("mcp") + "@x.org"
            result = await client.call_tool("run_create_contact", {"name": "Mo", "email": email})
            assert not result.is_error, result.content
            created = result.structured_content["create"]
            assert created["email"] == email and created["score"] == 0
            # a record's fields in the model's declaration order, every time (the CLI's)
            assert list(created) == declared

            got = await client.call_tool("contacts_get", {"id": created["id"]})
            assert not got.is_error, got.content
            assert got.structured_content == created
            assert list(got.structured_content) == declared

            upd = await client.call_tool("contacts_update", {"id": created["id"], "score": 5})
            assert not upd.is_error and upd.structured_content["score"] == 5

            listed = await client.call_tool(
                "contacts_list", {"filter": {"email": email}, "order_by": "-created_at", "limit": 5}
            )
            assert not listed.is_error, listed.content
            assert [r["id"] for r in listed.structured_content["records"]] == [created["id"]]
            assert [list(r) for r in listed.structured_content["records"]] == [declared]
            assert list(listed.structured_content) == ["records", "next_page_token"]
            count = await client.call_tool("contacts_count", {"filter": {"email": email}})
            assert count.structured_content == {"count": "1"}  # int64: text, as REST prints it

            deleted = await client.call_tool("contacts_delete", {"id": created["id"]})
            assert not deleted.is_error
            gone = await client.call_tool("contacts_get", {"id": created["id"]})
            assert gone.is_error
            assert "NOT_FOUND (RECORD_NOT_FOUND)" in gone.content[0].text  # type: ignore[union-attr]


async def test_invalid_arguments_are_tool_errors(stdio: Any) -> None:
    async with Client(stdio, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            result = await client.call_tool(
                "run_search_contacts", {"query": "a", "min_score": "high"}
            )
            assert result.is_error
            text = result.content[0].text  # type: ignore[union-attr]
            assert "invalid arguments" in text and "min_score" in text
            result = await client.call_tool("contacts_create", {"name": "No Email"})
            assert result.is_error and "'email' is a required property" in result.content[0].text  # type: ignore[union-attr]
            result = await client.call_tool("contacts_get", {"id": "x", "bogus": 1})
            assert result.is_error and "bogus" in result.content[0].text  # type: ignore[union-attr]


async def test_server_side_errors_are_tool_errors_with_status(stdio: Any, unique: Any) -> None:
    async with Client(stdio, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            email = unique("dup") + "@x.org"
            first = await client.call_tool("contacts_create", {"name": "A", "email": email})
            assert not first.is_error
            again = await client.call_tool("contacts_create", {"name": "B", "email": email})
            assert again.is_error
            assert "ALREADY_EXISTS (RECORD_ALREADY_EXISTS)" in again.content[0].text  # type: ignore[union-attr]

            boom = await client.call_tool("run_boom", {"message": "kaput"})
            assert boom.is_error
            text = boom.content[0].text  # type: ignore[union-attr]
            assert "NODE_FAILED" in text and "kaput" in text and "execution_id=" in text

            bad = await client.call_tool("contacts_list", {"filter": {"score": {"$bogus": 1}}})
            assert bad.is_error and "QUERY_INVALID" in bad.content[0].text  # type: ignore[union-attr]
            # the session is still usable after errors
            assert (await client.list_tools()).tools


async def test_progress_notifications_on_a_slow_workflow(
    stdio: Any, server: Any, unique: Any
) -> None:
    async with Client(stdio, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            gate = unique("progress")
            seen: list[tuple[float, float | None, str | None]] = []
            started = anyio.Event()

            async def on_progress(
                progress: float, total: float | None, message: str | None
            ) -> None:
                seen.append((progress, total, message))
                if message and "started" in message:
                    started.set()

            async def release_when_started() -> None:
                await started.wait()
                server.gates.release(gate)

            with anyio.fail_after(WAIT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(release_when_started)
                    result = await client.call_tool(
                        "run_gated", {"gate": gate, "value": 3}, progress_callback=on_progress
                    )
            assert not result.is_error, result.content
            assert result.structured_content == {"wait": {"value": 3}}
            # half a step when the node starts, the other half when it ends
            assert seen == [(0.5, 1.0, "node wait started"), (1.0, 1.0, "node wait completed")]


async def test_cancellation_cancels_the_execution(stdio: Any, server: Any, unique: Any) -> None:
    async with Client(stdio, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            gate = unique("mcp-cancel")
            with anyio.fail_after(WAIT):
                async with anyio.create_task_group() as tg:

                    async def call() -> None:
                        await client.call_tool("run_gated", {"gate": gate})

                    tg.start_soon(call)
                    assert await anyio.to_thread.run_sync(server.gates.started(gate).wait, WAIT)
                    tg.cancel_scope.cancel()
            assert await anyio.to_thread.run_sync(server.gates.cancelled(gate).wait, WAIT)

            def cancelled_execution() -> list[Any]:
                with grpc.insecure_channel(server.address) as ch:
                    stub = wg.WorkflowServiceStub(ch)  # type: ignore[no-untyped-call]
                    deadline = time.monotonic() + WAIT
                    while True:
                        resp = stub.ListExecutions(
                            w.ListExecutionsRequest(workflow="gated", page_size=1000), timeout=WAIT
                        )
                        mine = [e for e in resp.executions if e.inputs["gate"] == gate]
                        if mine and mine[0].state != w.Execution.STATE_RUNNING:
                            return mine
                        assert time.monotonic() < deadline, "the execution never stopped"
                        time.sleep(0.05)  # polling the recorded state, bounded by the deadline

            mine = await anyio.to_thread.run_sync(cancelled_execution)
            assert [e.state for e in mine] == [w.Execution.STATE_CANCELLED]
            # the session survives the cancellation
            assert (await client.list_tools()).tools


async def test_tools_list_changed_after_a_registration(
    stdio: Any, server: Any, unique: Any
) -> None:
    async with Client(stdio, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            name = unique("added").replace("-", "_")
            definition = w.WorkflowDefinition(description="Added over the network.")
            node = definition.nodes.add(id="count", type="ContactListNode")
            node.params.update({"limit": "{{limit}}"})
            definition.inputs.add(name="limit", type="int", description="how many")

            def grpc_call(method: str, request: Any) -> Any:
                with grpc.insecure_channel(server.address) as ch:
                    stub = wg.WorkflowServiceStub(ch)  # type: ignore[no-untyped-call]
                    return getattr(stub, method)(request, timeout=WAIT)

            with anyio.fail_after(WAIT):
                async with client.listen(tools_list_changed=True) as sub:
                    await anyio.to_thread.run_sync(
                        grpc_call,
                        "RegisterWorkflow",
                        w.RegisterWorkflowRequest(name=name, definition=definition),
                    )
                    await sub.__anext__()
                    tools = {t.name: t for t in (await client.list_tools()).tools}
                    assert f"run_{name}" in tools
                    assert (
                        tools[f"run_{name}"].input_schema["properties"]["limit"]["type"]
                        == "integer"
                    )
                    result = await client.call_tool(f"run_{name}", {"limit": 1})
                    assert not result.is_error, result.content

                    await anyio.to_thread.run_sync(
                        grpc_call, "DeleteWorkflow", w.DeleteWorkflowRequest(name=name)
                    )
                    await sub.__anext__()
                    assert f"run_{name}" not in {t.name for t in (await client.list_tools()).tools}


async def test_tools_list_changed_on_the_pre_2026_protocol(
    stdio: Any, server: Any, unique: Any
) -> None:
    """Clients of the handshake era get the notification on their session."""
    name = unique("legacy").replace("-", "_")
    definition = w.WorkflowDefinition(description="Added over the network.")
    definition.nodes.add(id="list", type="ContactListNode").params.update({"limit": 1})
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if getattr(message, "method", None) == "notifications/tools/list_changed":
            changed.set()

    def register(delete: bool = False) -> None:
        with grpc.insecure_channel(server.address) as ch:
            stub = wg.WorkflowServiceStub(ch)  # type: ignore[no-untyped-call]
            if delete:
                stub.DeleteWorkflow(w.DeleteWorkflowRequest(name=name), timeout=WAIT)
                return
            stub.RegisterWorkflow(
                w.RegisterWorkflowRequest(name=name, definition=definition), timeout=WAIT
            )

    async with Client(
        stdio, mode="legacy", message_handler=on_message, read_timeout_seconds=WAIT
    ) as client:
        with anyio.fail_after(WAIT):
            assert client.protocol_version == "2025-11-25"
            assert f"run_{name}" not in {t.name for t in (await client.list_tools()).tools}
            await anyio.to_thread.run_sync(register)
            await changed.wait()
            assert f"run_{name}" in {t.name for t in (await client.list_tools()).tools}
            await anyio.to_thread.run_sync(register, True)


async def test_resources_for_models_and_workflows(stdio: Any) -> None:
    async with Client(stdio, read_timeout_seconds=WAIT) as client:
        with anyio.fail_after(WAIT):
            uris = {str(r.uri) for r in (await client.list_resources()).resources}
            assert {"nexus://models/Contact", "nexus://workflows/search_contacts"} <= uris
            model = await client.read_resource("nexus://models/Contact")
            doc = json.loads(model.contents[0].text)  # type: ignore[union-attr]
            assert doc["collection"] == "contacts"
            assert [f["name"] for f in doc["fields"]][:3] == ["id", "name", "email"]
            wf = await client.read_resource("nexus://workflows/search_contacts")
            assert json.loads(wf.contents[0].text)["inputs"][0]["name"] == "query"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- HTTP


@pytest.fixture
def http_adapter(mcp_http: Any) -> str:
    """`nexus-mcp --transport http --port 0` as a subprocess (conftest's `mcp_http`)."""
    url: str = mcp_http("--poll-interval", "0.2")
    return url


async def test_streamable_http(http_adapter: str, server: Any, unique: Any) -> None:
    gate = unique("http")
    messages: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        messages.append(message or "")
        if message == "node wait started":
            server.gates.release(gate)

    with anyio.fail_after(WAIT):
        async with Client(http_adapter, read_timeout_seconds=WAIT) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            assert {"run_create_contact", "contacts_create", "contacts_list"} <= names
            email = unique("http") + "@x.org"
            result = await c.call_tool("run_create_contact", {"name": "H", "email": email})
            assert not result.is_error, result.content
            assert result.structured_content["create"]["email"] == email
            listed = await c.call_tool("contacts_list", {"filter": {"email": email}})
            assert len(listed.structured_content["records"]) == 1
            bad = await c.call_tool("contacts_create", {"name": "H"})
            assert bad.is_error
            slow = await c.call_tool("run_gated", {"gate": gate}, progress_callback=on_progress)
            assert not slow.is_error, slow.content
            assert messages == ["node wait started", "node wait completed"]
