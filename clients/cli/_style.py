"""The look of the `nexus` help screens, shared by every command tree that uses it.

Typer shows a type after every option, `<bool>` after a flag too, although a flag takes
no value. `tidy_help(command)` removes that from a command tree (the help option
included), so the help of a flag shows only its name and text. Any typer/click command
tree can be passed, the server's `nexus serve` too, to get the same look.
"""

from __future__ import annotations

from typing import Any

__all__ = ["tidy_help"]


def tidy_help(command: Any) -> Any:
    """`command` and its subcommands with no type shown after a flag; returns it."""
    # duck-typed: typer carries its own copy of click, whose classes are not `click`'s
    flags = [p for p in command.params if getattr(p, "is_flag", False)]
    context = command.context_class(command, **(command.context_settings or {}))
    help_option = command.get_help_option(context)
    if help_option is not None:
        flags.append(help_option)
    for option in flags:
        option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        tidy_help(sub)
    return command
