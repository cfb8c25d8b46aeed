"""The adapter keeps one session per pre-2026 connection (for its change notifications),
however many requests each connection makes: the real `mcp` client, in process."""

from __future__ import annotations

from typing import Any

import anyio
from mcp import Client

from clients.mcp._server import Adapter

WAIT = 20.0


async def test_one_kept_session_per_legacy_connection(server: Any) -> None:
    adapter = Adapter(server.address, poll_interval=60)
    with anyio.fail_after(WAIT):
        async with (
            Client(adapter.server, mode="legacy") as first,
            Client(adapter.server, mode="legacy") as second,
        ):
            for client in (first, second, first, second):
                assert (await client.list_tools()).tools
                assert (await client.list_resources()).resources
            result = await first.call_tool("contacts_count", {})
            assert not result.is_error, result.content
            assert len(adapter._sessions) == 2
