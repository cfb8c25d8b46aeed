"""The MCP adapter inside `nexus serve --mcp`: a supervised child process.

The adapter (`clients.mcp`, the `nexus-mcp` command) is a gRPC client of the server, and
the server never imports the clients, so `nexus serve --mcp` runs it as a child process,
`python -m clients.mcp --server <this server> --transport http --port <mcp_port>`, the
same program an operator would run by hand. `McpProcess` starts it, waits until its
streamable HTTP endpoint answers, restarts it when it exits (waiting longer after each
quick failure) and stops it on `stop()`.

The child's output goes to a private log file; the adapter announces the port it bound
there (`nexus-mcp: streamable HTTP on http://HOST:PORT/mcp`, written by
`clients/mcp/__init__.py`), which is how port 0 becomes a known port. Restarts keep it.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ._supervisor import Supervisor, SupervisorError

if TYPE_CHECKING:
    from ._app import Nexus

__all__ = ["McpProcess", "McpProcessError", "authorization_servers_from_env"]

#: The line the adapter writes once it has bound its port (see `clients/mcp/__init__.py`).
_ANNOUNCED = re.compile(r"nexus-mcp: streamable HTTP on http://\S+:(\d+)/mcp")


def authorization_servers_from_env(issuer: str | None = None) -> list[str]:
    """The OAuth authorization servers the adapter names in its protected resource
    metadata: `$NEXUS_MCP_AUTHORIZATION_SERVER` (URLs separated by commas or spaces),
    else the app's JWT issuer (`issuer`, from `AuthConfig(jwt_issuer=...)`), else
    `$NEXUS_JWT_ISSUER`, else none."""
    text = os.environ.get("NEXUS_MCP_AUTHORIZATION_SERVER", "").replace(",", " ")
    urls = text.split()
    fallback = issuer or os.environ.get("NEXUS_JWT_ISSUER", "").strip()
    if not urls and fallback:
        urls = [fallback]
    return urls


class McpProcessError(SupervisorError):
    """The MCP adapter could not be started (the message ends with its own output)."""


class McpProcess(Supervisor):
    """Runs the MCP adapter as a child process talking to the gRPC server at `server`.

    Args:
        server: the gRPC server's `host:port`, as the adapter reaches it.
        host: the interface the adapter's HTTP endpoint listens on.
        port: its port (0: any free one; `port` tells which once started).
        ready_timeout: seconds the adapter gets to answer over HTTP.
        poll_interval: seconds between the adapter's checks for changed workflows.
        log_level: the adapter's log level (its log is kept for error messages).
        authorization_servers: the OAuth authorization servers the adapter names to
            its clients (`--authorization-server`).
    """

    error = McpProcessError

    def __init__(
        self,
        server: str,
        *,
        host: str = "127.0.0.1",
        port: int = 3001,
        ready_timeout: float = 30.0,
        poll_interval: float = 5.0,
        log_level: str = "warning",
        authorization_servers: Sequence[str] = (),
    ) -> None:
        super().__init__("MCP adapter", ready_timeout=ready_timeout)
        self.server = server
        self.host = host
        self.port = port
        self.poll_interval = poll_interval
        self.log_level = log_level
        self.authorization_servers = list(authorization_servers)
        self._announced: int | None = None

    @property
    def url(self) -> str:
        """The streamable HTTP endpoint agents connect to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/mcp"

    @property
    def address(self) -> str:
        return self.url

    def command(self, workdir: Path) -> list[str]:
        self._announced = None
        return [
            sys.executable, "-m", "clients.mcp",
            "--server", self.server,
            "--transport", "http",
            "--host", self.host,
            "--port", str(self.port),  # after a restart: the port the first launch bound
            "--poll-interval", str(self.poll_interval),
            "--log-level", self.log_level,
            *(a for url in self.authorization_servers for a in ("--authorization-server", url)),
        ]  # fmt: skip

    async def probe(self, log_offset: int) -> bool:
        """Ready once this launch announced its port and its endpoint answers."""
        if self._announced is None:
            self._announced = self._announced_port(log_offset)
        if self._announced is None or not await asyncio.to_thread(self._answers, self._announced):
            return False
        self.port = self._announced
        return True

    def _announced_port(self, offset: int) -> int | None:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            match = _ANNOUNCED.search(log.read().decode(errors="replace"))
        return int(match.group(1)) if match else None

    def _answers(self, port: int) -> bool:
        """Whether the endpoint answers HTTP (any status: a bare GET is not an MCP call)."""
        host = self.host if self.host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/mcp", timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False


def adapter_for(app: Nexus, grpc_port: int, log_level: str) -> McpProcess:
    """The MCP adapter `nexus serve` runs beside `app`'s server (listening on
    `grpc_port`), on the app's host and `mcp_port`, logging at the server's level (debug,
    or warnings only), naming the app's OAuth authorization servers
    (`authorization_servers_from_env` of its JWT issuer)."""
    from ._app import _local

    assert app.mcp_port is not None
    return McpProcess(
        f"{_local(app.host)}:{grpc_port}",
        host=app.host,
        port=app.mcp_port,
        log_level="debug" if log_level == "debug" else "warning",
        authorization_servers=authorization_servers_from_env(
            app.auth.jwt_issuer if app.auth is not None else None
        ),
    )
