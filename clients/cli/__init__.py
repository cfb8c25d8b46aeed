"""The generated `nexus` CLI: `main()` runs it (`python -m clients.cli`).

The command tree comes from the server's descriptors (see `_app`); importing this
package is cheap, the heavy imports happen when a command runs.
"""

from __future__ import annotations

import os
import sys

__all__ = ["SERVER_COMMANDS", "main"]

#: Commands that belong to the server (`python -m nexus_server`). `nexus` hands them to it
#: in a fresh interpreter (exec, so signals and the exit code are the server's own): a
#: client never imports the server, and one `nexus` command still does both.
SERVER_COMMANDS = frozenset({"serve", "proto", "envoy-config", "openapi"})


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in SERVER_COMMANDS:
        os.execv(sys.executable, [sys.executable, "-m", "nexus_server", *args])
    from ._app import main as _main

    return _main(args)
