"""`nexus-mcp`: the workflows and models of a Nexus gRPC server as MCP tools.

    nexus-mcp --server 127.0.0.1:50051                  # stdio (for desktop agents)
    nexus-mcp --transport http --port 3001              # streamable HTTP at /mcp

See docs/mcp.md. The adapter is a gRPC client only: it never imports the server. It
holds no rights of its own: over stdio its calls carry `NEXUS_TOKEN`/`NEXUS_API_KEY`,
over HTTP each request's own credential (an OAuth 2.1 resource server, `_auth.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Sequence

__all__ = ["main"]

#: Seconds open streams (a client's SSE stream) get to end when the adapter stops.
_GRACE = 5


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nexus-mcp",
        description="Serve a Nexus gRPC server's workflows and models as MCP tools.",
    )
    p.add_argument(
        "--server",
        "-s",
        help="the gRPC server, HOST:PORT (default: $NEXUS_SERVER or 127.0.0.1:50051)",
    )
    p.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    p.add_argument("--host", default="127.0.0.1", help="HTTP interface (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=3001, help="HTTP port (default: 3001; 0: any)")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=5.0,
        help="seconds between checks for new or removed workflows and models (default: 5)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=None,
        help="HTTP: seconds a connection gets to send its request headers (default: 10)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="HTTP: connections served at once, beyond it 503 (default: 1000)",
    )
    p.add_argument(
        "--authorization-server",
        action="append",
        default=[],
        metavar="URL",
        help="HTTP: an OAuth authorization server (issuer URL) that issues tokens for this "
        "server, named in /.well-known/oauth-protected-resource (repeatable)",
    )
    p.add_argument(
        "--resource-url",
        metavar="URL",
        help="HTTP: the URL clients reach the MCP endpoint at, as the resource's identifier "
        "(default: http://<the request's Host>/mcp; set it behind a proxy)",
    )
    p.add_argument("--log-level", default="warning")
    return p


async def _serve_stdio(adapter: object) -> None:
    from mcp.server.stdio import stdio_server

    from ._server import Adapter

    assert isinstance(adapter, Adapter)
    async with stdio_server() as (read, write):
        await adapter.server.run(read, write, adapter.init_options())


async def _serve_http(
    adapter: object,
    host: str,
    port: int,
    header_timeout: float | None = None,
    max_connections: int | None = None,
    authorization_servers: Sequence[str] = (),
    resource_url: str | None = None,
) -> None:
    import uvicorn

    from ._auth import ResourceServer
    from ._http import HEADER_TIMEOUT, MAX_CONNECTIONS, http_config
    from ._server import Adapter

    assert isinstance(adapter, Adapter)
    try:
        app = ResourceServer(
            adapter.server.streamable_http_app(host=host),
            adapter.principal,
            authorization_servers=authorization_servers,
            resource_url=resource_url,
        )
    except ValueError as exc:
        raise SystemExit(f"nexus-mcp: --authorization-server/--resource-url: {exc}") from None
    # Bound here rather than by uvicorn, so that a taken port is a clear error and port 0
    # is announced as the port it became (`nexus serve --mcp` reads this line).
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # listening before the port is announced: a client that connects at once waits
        # in the backlog until uvicorn accepts, instead of being refused
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise SystemExit(f"nexus-mcp: cannot listen on {host}:{port}: {exc}") from None
    bound = sock.getsockname()[1]
    config = http_config(
        app,
        header_timeout=HEADER_TIMEOUT if header_timeout is None else header_timeout,
        max_connections=MAX_CONNECTIONS if max_connections is None else max_connections,
        graceful_shutdown=_GRACE,
    )
    server = uvicorn.Server(config)
    url_host = f"[{host}]" if ":" in host else host
    print(
        f"nexus-mcp: streamable HTTP on http://{url_host}:{bound}/mcp", file=sys.stderr, flush=True
    )
    await server.serve(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    """Run `nexus-mcp`; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    from .._grpc import credential_from_env, set_channel
    from ._server import Adapter

    set_channel("mcp")
    credential = None
    if args.transport == "stdio":
        if args.authorization_server or args.resource_url:
            parser.error("--authorization-server and --resource-url are for --transport http")
        try:
            credential = credential_from_env()
        except ValueError as exc:
            parser.error(str(exc))
    elif os.environ.get("NEXUS_TOKEN") or os.environ.get("NEXUS_API_KEY"):
        logging.getLogger("nexus.mcp").info(
            "NEXUS_TOKEN/NEXUS_API_KEY are not used over HTTP: each request sends its own"
        )
    adapter = Adapter(args.server, poll_interval=args.poll_interval, credential=credential)
    try:
        if args.transport == "stdio":
            asyncio.run(_serve_stdio(adapter))
        else:
            asyncio.run(
                _serve_http(
                    adapter,
                    args.host,
                    args.port,
                    args.header_timeout,
                    args.max_connections,
                    args.authorization_server,
                    args.resource_url,
                )
            )
    except KeyboardInterrupt:
        return 130
    return 0
