"""Issue 14, section 4: the MCP adapter tells agents the truth.

Most tests run a Nexus app on the test's own event loop (port 0) with an `Item` model
holding a field of every type, nullable and not, on SQLite and PostgreSQL, and talk to
the adapter in process through the real `mcp.Client` (which checks every structured
result against the tool's output schema itself, as agent clients do). The HTTP header
timeout is tested against a real `nexus-mcp --transport http` subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import itertools
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import jsonschema
import pytest
from mcp import Client
from sqlalchemy import text

from clients.mcp._server import Adapter, unsendable
from clients.mcp._tools import workflow_hints
from dataflow import DataFlow
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_server import Nexus
from workflow import WorkflowBuilder

WAIT = 20.0


class Tier(enum.Enum):
    FREE = "free"
    PRO = "pro"


class Level(enum.Enum):
    LOW = 1
    HIGH = 2


def _declare(db: DataFlow) -> None:
    @db.model
    class Item:
        """A field of every type, nullable and not."""

        id: str
        text: str = ""
        count: int = 0
        ratio: float = 0.0
        flag: bool = False
        amount: Decimal = Decimal("0")
        tier: Tier = Tier.FREE
        level: Level = Level.LOW
        blob: bytes
        at: dt.datetime
        day: dt.date
        uid: uuid.UUID
        meta: dict  # type: ignore[type-arg]
        tags: list  # type: ignore[type-arg]
        text_n: str | None = None
        count_n: int | None = None
        ratio_n: float | None = None
        flag_n: bool | None = None
        amount_n: Decimal | None = None
        tier_n: Tier | None = None
        level_n: Level | None = None
        blob_n: bytes | None = None
        at_n: dt.datetime | None = None
        day_n: dt.date | None = None
        uid_n: uuid.UUID | None = None
        meta_n: dict | None = None  # type: ignore[type-arg]
        tags_n: list | None = None  # type: ignore[type-arg]


#: The required fields of an Item, as an agent sends them.
REQUIRED = {
    "blob": "AAEC",
    "at": "2024-05-06T07:08:09.123456Z",
    "day": "2024-05-06",
    "uid": "12345678-1234-5678-1234-567812345678",
    "meta": {"a": [1, None]},
    "tags": ["x", 2],
}
#: What `run_create_item` takes (a workflow `bytes` input refuses base64 text today:
#: the workflow's blob is a static parameter).
WF_REQUIRED = {k: v for k, v in REQUIRED.items() if k != "blob"}
#: Every nullable field set to a value.
SET = {
    "text_n": "hi",
    "count_n": 7,
    "ratio_n": 0.25,
    "flag_n": True,
    "amount_n": "12.50",
    "tier_n": "pro",
    "level_n": 2,
    "blob_n": "AAEC",
    "at_n": "2024-01-01T00:00:00Z",
    "day_n": "2024-01-01",
    "uid_n": "87654321-4321-8765-4321-876543218765",
    "meta_n": {"k": "v"},
    "tags_n": [],
}


def _workflows(app: Nexus) -> None:
    """Workflows whose annotations the adapter derives from their node types."""
    reads = WorkflowBuilder("Read an item, list and count items.")
    reads.add_node("ItemReadNode", "read", {"id": "{{id}}"})
    reads.add_node("ItemListNode", "list", {"limit": 5})
    reads.add_node("ItemCountNode", "count")
    app.register("read_items", reads.build())

    create = WorkflowBuilder("Create an item and read it back.")
    create.add_node(
        "ItemCreateNode",
        "create",
        {"text": "{{text}}", "blob": b"\x00\x01", **{k: f"{{{{{k}}}}}" for k in WF_REQUIRED}},
    )
    create.add_node("ItemReadNode", "read")
    create.add_connection("create", "id", "read", "id")
    app.register("create_item", create.build())

    delete = WorkflowBuilder("Delete an item.")
    delete.add_node("ItemDeleteNode", "delete", {"id": "{{id}}"})
    app.register("delete_item", delete.build())

    fed = WorkflowBuilder("Delete the item a read found (another one each time).")
    fed.add_node("ItemReadNode", "read", {"id": "{{id}}"})
    fed.add_node("ItemDeleteNode", "delete")
    fed.add_connection("read", "id", "delete", "id")
    app.register("read_then_delete", fed.build())

    code = WorkflowBuilder("Arbitrary code: anything may happen.")
    code.add_node("PythonCodeNode", "code", {"code": "result = x * 2", "x": "{{x}}"})
    app.register("double", code.build())


@dataclass
class Served:
    address: str
    db: DataFlow
    stop: contextlib.AsyncExitStack


@contextlib.asynccontextmanager
async def _serve(db_url: str) -> AsyncIterator[Served]:
    """The app on this loop, on port 0; `served.stop.aclose()` stops it early."""
    app = Nexus(grpc_port=0, grace_period=1.0)
    db = DataFlow(db_url)
    _declare(db)
    app.integrate_dataflow(db)
    _workflows(app)
    async with contextlib.AsyncExitStack() as outer:
        outer.push_async_callback(db.close)
        stop = contextlib.AsyncExitStack()
        info = await stop.enter_async_context(app.serving())
        outer.push_async_callback(stop.aclose)
        yield Served(info.address, db, stop)


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a new SQLite file, or the session's PostgreSQL database with
    its public schema recreated."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'items.db'}"
    pg: str = request.getfixturevalue("pg_url")
    conn = await asyncpg.connect(pg, timeout=5)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
    return pg


def _check(tool: Any, result: Any) -> Any:
    """The structured result of a successful call, valid for the tool's output schema
    (the `mcp.Client` already refused an invalid one; checked here once more, with
    formats)."""
    assert not result.is_error, result.content
    assert tool.output_schema is not None, tool.name
    jsonschema.Draft202012Validator(
        tool.output_schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(result.structured_content)
    return result.structured_content


async def test_every_tool_output_validates_against_its_schema(db_url: str) -> None:
    async with _serve(db_url) as served:
        adapter = Adapter(served.address, poll_interval=60)
        with anyio.fail_after(WAIT):
            async with Client(adapter.server) as client:
                tools = {t.name: t for t in (await client.list_tools()).tools}

                async def call(name: str, args: dict[str, Any]) -> Any:
                    return _check(tools[name], await client.call_tool(name, args))

                full = await call("items_create", {**REQUIRED, **SET, "count": 2**60})
                assert full["tier_n"] == "pro" and full["level_n"] == 2
                assert full["count"] == str(2**60)  # beyond 2^53: as text, still valid
                # the case: a nullable enum left out (null), then given as null
                bare = await call("items_create", REQUIRED)
                assert bare["tier_n"] is None and bare["level_n"] is None
                nulls = await call("items_create", {**REQUIRED, **dict.fromkeys(SET)})
                assert all(nulls[k] is None for k in SET)

                got = await call("items_get", {"id": full["id"]})
                assert got["amount_n"] in ("12.50", "12.5")
                await call("items_get", {"id": bare["id"], "fields": ["tier_n", "at"]})
                listed = await call("items_list", {"order_by": "created_at", "limit": 10})
                assert len(listed["records"]) == 3
                assert (await call("items_count", {"filter": {"tier_n": None}}))[
                    "count"
                ] == "2"  # int64: text, as REST prints it

                changed = await call("items_update", {"id": full["id"], **dict.fromkeys(SET)})
                assert all(changed[k] is None for k in SET)
                changed = await call("items_update", {"id": bare["id"], **SET})
                assert changed["tier_n"] == "pro"
                up = await call("items_upsert", {"id": "fixed", **REQUIRED, "tier_n": None})
                assert up["created"] is True and up["record"]["tier_n"] is None
                up = await call("items_upsert", {"id": "fixed", **REQUIRED, "tier_n": "free"})
                assert up["created"] is False and up["record"]["tier_n"] == "free"
                assert await call("items_delete", {"id": "fixed"}) == {"deleted": "fixed"}

                made = await call("run_create_item", {"text": "t", **WF_REQUIRED})
                assert made["read"]["text"] == "t"
                read = await call("run_read_items", {"id": full["id"]})
                assert read["count"]["count"] == 4  # full, bare, nulls and made

                # a value stored before non-finite floats were refused reads back as text
                table = served.db.model_info("Item").table
                async with served.db.engine.begin() as conn:
                    await conn.execute(
                        text(f"UPDATE {table} SET ratio = :v, ratio_n = :w WHERE id = :id"),
                        {"v": float("inf"), "w": float("-inf"), "id": full["id"]},
                    )
                odd = await call("items_get", {"id": full["id"]})
                assert (odd["ratio"], odd["ratio_n"]) == ("Infinity", "-Infinity")
                await call("items_list", {"filter": {"id": full["id"]}})


async def test_input_schemas_accept_null_where_nullable_and_update_has_no_defaults(
    tmp_path: Path,
) -> None:
    async with _serve(f"sqlite:///{tmp_path / 'items.db'}") as served:
        adapter = Adapter(served.address, poll_interval=60)
        with anyio.fail_after(WAIT):
            async with Client(adapter.server) as client:
                tools = {t.name: t for t in (await client.list_tools()).tools}
        create = tools["items_create"].input_schema
        for name in SET:
            jsonschema.validate({**REQUIRED, name: None}, create)
            jsonschema.validate({**REQUIRED, name: SET[name]}, create)
            assert create["properties"][name]["default"] is None
        assert create["properties"]["tier_n"]["enum"] == ["free", "pro", None]
        assert create["properties"]["level"] == {"enum": [1, 2], "default": 1}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**REQUIRED, "tier": None}, create)  # not nullable
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**REQUIRED, "count": None}, create)
        for op in ("update", "upsert"):
            props = tools[f"items_{op}"].input_schema["properties"]
            assert [k for k, v in props.items() if "default" in v] == [], op


async def test_annotations_follow_the_workflow_nodes(tmp_path: Path) -> None:
    async with _serve(f"sqlite:///{tmp_path / 'items.db'}") as served:
        adapter = Adapter(served.address, poll_interval=60)
        with anyio.fail_after(WAIT):
            async with Client(adapter.server) as client:
                tools = {t.name: t for t in (await client.list_tools()).tools}

    def hints(name: str) -> tuple[bool | None, bool | None, bool | None]:
        ann = tools[name].annotations
        assert ann is not None and ann.open_world_hint is False
        return ann.read_only_hint, ann.destructive_hint, ann.idempotent_hint

    # (read-only, destructive, idempotent)
    assert hints("run_read_items") == (True, False, True)
    assert hints("run_create_item") == (False, False, False)
    assert hints("run_delete_item") == (False, True, True)
    assert hints("run_read_then_delete") == (False, True, False)  # fed by another node
    assert hints("run_double") == (False, True, False)  # unknown effect: conservative
    assert hints("items_get") == hints("items_list") == hints("items_count") == (True, False, True)
    assert hints("items_create") == (False, False, False)
    for op in ("update", "upsert", "delete"):
        assert hints(f"items_{op}") == (False, True, True)
    # writing tools take an idempotency key, reading ones do not
    for name, tool in tools.items():
        writes = not tool.annotations or not tool.annotations.read_only_hint
        assert ("request_id" in tool.input_schema["properties"]) == writes, name


async def test_progress_strictly_increases(tmp_path: Path) -> None:
    async with _serve(f"sqlite:///{tmp_path / 'items.db'}") as served:
        adapter = Adapter(served.address, poll_interval=60)
        with anyio.fail_after(WAIT):
            async with Client(adapter.server) as client:
                for name, args in (
                    ("run_create_item", {"text": "p", **WF_REQUIRED}),  # two nodes in a row
                    ("run_read_items", {"id": "none"}),  # three, one of them failing
                ):
                    seen: list[tuple[float, float | None]] = []

                    async def on_progress(
                        progress: float,
                        total: float | None,
                        message: str | None,
                        seen: list[tuple[float, float | None]] = seen,
                    ) -> None:
                        seen.append((progress, total))

                    await client.call_tool(name, args, progress_callback=on_progress)
                    values = [p for p, _ in seen]
                    assert values, name
                    assert all(a < b for a, b in itertools.pairwise(values)), seen
                    total = seen[0][1]
                    assert total is not None and all(t == total for _, t in seen)
                    assert values[-1] <= total
                    if name == "run_create_item":
                        assert values == [0.5, 1.0, 1.5, 2.0] and total == 2.0


async def test_request_id_makes_a_retry_write_once(tmp_path: Path) -> None:
    async with _serve(f"sqlite:///{tmp_path / 'items.db'}") as served:
        adapter = Adapter(served.address, poll_interval=60)
        with anyio.fail_after(WAIT):
            async with Client(adapter.server) as client:

                async def count(text_value: str) -> int:
                    res = await client.call_tool("items_count", {"filter": {"text": text_value}})
                    return int(res.structured_content["count"])  # type: ignore[index]

                # without a key, a retry writes twice (the control)
                for _ in range(2):
                    res = await client.call_tool("items_create", {"text": "plain", **REQUIRED})
                    assert not res.is_error, res.content
                assert await count("plain") == 2

                key = str(uuid.uuid4())
                args = {"text": "keyed", **REQUIRED, "request_id": key}
                first = await client.call_tool("items_create", args)
                again = await client.call_tool("items_create", args)
                assert not first.is_error and not again.is_error, (first, again)
                assert first.structured_content == again.structured_content
                assert await count("keyed") == 1
                other = await client.call_tool("items_create", {**args, "text": "other"})
                assert other.is_error
                assert "REQUEST_ID_CONFLICT" in other.content[0].text  # type: ignore[union-attr]

                run = {"text": "wf", **WF_REQUIRED, "request_id": str(uuid.uuid4())}
                one = await client.call_tool("run_create_item", run)
                two = await client.call_tool("run_create_item", run)
                assert not one.is_error and not two.is_error, (one, two)
                assert one.structured_content == two.structured_content
                assert await count("wf") == 1

                record_id = first.structured_content["id"]  # type: ignore[index]
                upd = {"id": record_id, "count": 5, "request_id": str(uuid.uuid4())}
                for _ in range(2):
                    assert not (await client.call_tool("items_update", upd)).is_error
                gone = {"id": record_id, "request_id": str(uuid.uuid4())}
                for _ in range(2):  # the retry gets the first answer, not NOT_FOUND
                    res = await client.call_tool("items_delete", gone)
                    assert not res.is_error, res.content


def _refused_port() -> socket.socket:
    """A bound port nothing listens on (kept bound, so nothing else takes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_unreachable_server_is_logged_and_a_clear_tool_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="nexus.mcp")
    with _refused_port() as sock:
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        adapter = Adapter(address, poll_interval=60)
        with anyio.fail_after(WAIT):
            async with Client(adapter.server) as client:
                assert (await client.list_tools()).tools == []
                for name in ("items_create", "run_anything"):
                    res = await client.call_tool(name, {})
                    assert res.is_error
                    text_ = res.content[0].text  # type: ignore[union-attr]
                    assert f"the Nexus server at {address} is unreachable" in text_
                    assert "unknown tool" not in text_
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"the Nexus server at {address} is unreachable" in r.getMessage() for r in warnings)
    assert len(warnings) == 1  # logged when it happens, not at every call


async def test_server_stopped_mid_session(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nexus.mcp")
    async with _serve(f"sqlite:///{tmp_path / 'items.db'}") as served:
        adapter = Adapter(served.address, poll_interval=60)
        with anyio.fail_after(WAIT):
            async with Client(adapter.server) as client:
                ok = await client.call_tool("items_count", {})
                assert not ok.is_error, ok.content
                await served.stop.aclose()
                for name, args in (("items_count", {}), ("run_delete_item", {"id": "x"})):
                    res = await client.call_tool(name, args)
                    assert res.is_error, name
                    text_ = res.content[0].text  # type: ignore[union-attr]
                    assert text_ == (
                        f"UNAVAILABLE: the Nexus server at {served.address} is unreachable"
                    ), text_
    assert any(
        f"the Nexus server at {served.address} is unreachable" in r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING
    )


async def test_arguments_breaking_the_schema_are_tool_errors(tmp_path: Path) -> None:
    """Every tool, called with arguments its input schema refuses or that protobuf
    cannot carry, answers an `isError` result naming the argument: never a protocol
    error (the MCP fuzz of tests/fuzz covers this at random)."""
    deep: Any = "x"
    for _ in range(120):  # beyond protobuf's decoding depth (100), within the client's
        deep = {"$not": deep}
    wrong: dict[str, Any] = {
        "string": 5,
        "integer": "five",
        "number": "n",
        "boolean": "yes",
        "object": [1],
        "array": {"a": 1},
    }
    async with _serve(f"sqlite:///{tmp_path / 'items.db'}") as served:
        adapter = Adapter(served.address, poll_interval=60)
        with anyio.fail_after(WAIT * 3):
            async with Client(adapter.server) as client:
                tools = (await client.list_tools()).tools
                for tool in tools:
                    props = tool.input_schema.get("properties", {})
                    cases: list[dict[str, Any]] = [{"bogus_argument": 1}]
                    for name, schema in props.items():
                        if "enum" in schema:
                            cases.append({name: "zz"})
                        elif "type" in schema:
                            kind = schema["type"]
                            cases.append({name: wrong[kind[0] if isinstance(kind, list) else kind]})
                    for args in cases:
                        res = await client.call_tool(tool.name, args)
                        assert res.is_error, (tool.name, args)
                        assert res.content[0].text.startswith("invalid arguments"), res  # type: ignore[union-attr]
                # valid JSON a protobuf message cannot hold, inside and outside schemas
                for name, args in (
                    ("items_list", {"filter": {"count": 10**400}}),
                    ("items_count", {"filter": {"text": "\ud800"}}),
                    ("items_create", {**REQUIRED, "text": "a" * 10, "tags": [10**400]}),
                ):
                    res = await client.call_tool(name, args)
                    assert res.is_error, (name, args)
                    text_ = res.content[0].text  # type: ignore[union-attr]
                    assert text_.startswith("invalid arguments"), text_
                    assert len(text_) < 400
                # refused by the server, still a tool result
                for name, args in (
                    ("items_list", {"filter": deep}),
                    ("items_get", {"id": "x" * 10_000}),
                ):
                    res = await client.call_tool(name, args)
                    assert res.is_error, (name, res)
                assert not (await client.call_tool("items_count", {})).is_error


def test_hints_trust_dataflow_names_only_for_listed_models() -> None:
    """A node named like a DataFlow node of a model the server does not list (a custom
    `GhostReadNode`) may do anything; a workflow without a definition too."""

    def hints(*types: str) -> tuple[bool, bool, bool]:
        wf = w.Workflow(name="x")
        for i, type_ in enumerate(types):
            wf.definition.nodes.add(id=f"n{i}", type=type_)
        h = workflow_hints(wf, {"Item", "ItemBulk"})
        return h.read_only, h.destructive, h.idempotent

    assert hints("ItemReadNode", "ItemCountNode") == (True, False, True)
    assert hints("GhostReadNode") == (False, True, False)
    assert hints("ItemBulkCreateNode") == (False, False, False)
    assert hints("ItemBulkDeleteNode", "ItemUpsertNode") == (False, True, True)
    assert hints("ItemCreateNode", "ItemDeleteNode") == (False, True, False)
    assert hints() == (False, True, False)  # no declarative definition


def test_unsendable_names_what_protobuf_cannot_carry() -> None:
    """Also what the `mcp` client itself cannot send (a lone surrogate in a key)."""
    assert unsendable({"a": [1, {"b": "ok"}], "c": 2**64, "d": 1.5}) == []
    assert unsendable({"a": [1, {"\udfff": 1}], "b": {"c": -(10**400)}, "d": "\ud800"}) == [
        "'a[1].\\udfff': a name that is not valid UTF-8 text",
        "b.c: an integer beyond the range of a JSON number",
        "d: text that is not valid UTF-8 (a lone surrogate)",
    ]


# ---------------------------------------------------------------------------- HTTP


async def test_slow_header_clients_are_closed_and_others_served(mcp_http: Any) -> None:
    timeout = 1.5
    url = mcp_http("--header-timeout", str(timeout), "--poll-interval", "60")
    host, _, port = url.removeprefix("http://").removesuffix("/mcp").rpartition(":")
    slow: list[tuple[float, asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def closed_after(
        opened: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> float:
        try:
            data = await asyncio.wait_for(reader.read(), timeout + WAIT)
            assert data == b"" or data.startswith(b"HTTP/1.1 4"), data
        except ConnectionResetError:
            pass
        finally:
            writer.close()
        return time.monotonic() - opened

    async def dribble(writer: asyncio.StreamWriter) -> None:
        # one byte at a time: data arriving must not move the deadline
        for byte in b"X-Slow: " + b"a" * 100:
            if writer.is_closing():
                return
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.sleep(0.1)  # the slow client's pace, not a wait for readiness

    with anyio.fail_after(WAIT * 2):
        for _ in range(50):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            await writer.drain()
            slow.append((time.monotonic(), reader, writer))
        dribblers = [asyncio.create_task(dribble(w)) for _, _, w in slow[:5]]
        closes = [asyncio.create_task(closed_after(*s)) for s in slow]
        # a well-behaved client is served while the slow ones hold their connections
        started = time.monotonic()
        async with Client(url, read_timeout_seconds=WAIT) as client:
            assert (await client.list_tools()).tools
            assert not (await client.call_tool("contacts_count", {})).is_error
        assert time.monotonic() - started < WAIT
        lifetimes = await asyncio.gather(*closes)
        for task in dribblers:
            task.cancel()
    assert min(lifetimes) >= timeout * 0.8, lifetimes  # the timer, not an instant refusal
    assert max(lifetimes) < timeout + 5, lifetimes
