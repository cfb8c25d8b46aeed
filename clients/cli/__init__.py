"""The generated `nexus` CLI: `main()` runs it (`python -m clients.cli`).

The command tree comes from the server's descriptors (see `_app`); importing this
package is cheap, the heavy imports happen when a command runs.
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with `argv` (default: `sys.argv[1:]`); returns the exit code."""
    from ._app import main as _main

    return _main(argv)
