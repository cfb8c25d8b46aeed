"""`--help` for the server's commands (`nexus serve`, `proto export`, `envoy-config`,
`openapi`) in the look of the rest of the `nexus` CLI: a usage line, the description,
then Arguments, Options and Commands panels. The server's commands use argparse (the
server never imports the client package); this renders an argparse parser with rich,
imported only when help is asked for.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["HelpAction", "Parser", "describe_commands"]


class HelpAction(argparse.Action):
    """`-h/--help`: print the parser's help in panels and exit."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print_help(parser)
        parser.exit()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose `-h/--help` prints panels; its subcommands' parsers are
    made of this class too (`add_subparsers` uses the parent's class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["add_help"] = False
        super().__init__(*args, **kwargs)
        self.add_argument("-h", "--help", action=HelpAction, help="Show this message and exit.")


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    return [
        (choice.dest, choice.help or "")
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
    ]


def describe_commands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every subcommand without a description the one-line help its parent lists
    for it (shown under its usage line), at every depth; returns `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                sub = action.choices[choice.dest]
                if not sub.description:
                    sub.description = choice.help
                describe_commands(sub)
    return parser


def _metavar(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""  # a flag takes no value: no metavar, as the client CLI shows flags
    if action.choices is not None:
        return "[" + "|".join(str(c) for c in action.choices) + "]"
    return str(action.metavar or action.dest).upper()


def print_help(parser: argparse.ArgumentParser) -> None:
    """Print `parser`'s help: usage, description, then one panel per kind of argument."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    positionals = [
        a
        for a in parser._actions
        if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
    ]
    optionals = [a for a in parser._actions if a.option_strings]
    commands = _subcommands(parser)
    usage = " ".join(
        [parser.prog, "[OPTIONS]"]
        + [str(a.metavar or a.dest).upper() for a in positionals]
        + (["COMMAND [ARGS]..."] if commands else [])
    )
    console = Console()
    console.print(f"\n [bold]Usage:[/bold] {escape(usage)}\n")
    if parser.description:
        console.print(f" {escape(parser.description)}\n")

    def panel(title: str, rows: list[tuple[str, str, str]]) -> None:
        if not rows:
            return
        grid = Table.grid(padding=(0, 1), expand=False)
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column(style="bold yellow", no_wrap=True)
        grid.add_column()
        for row in rows:
            grid.add_row(*(escape(cell) for cell in row))
        console.print(
            Panel(grid, title=title, title_align="left", box=box.ROUNDED, border_style="dim")
        )

    panel(
        "Arguments",
        [(str(a.metavar or a.dest).upper(), "", a.help or "") for a in positionals],
    )
    panel(
        "Options",
        [(", ".join(a.option_strings), _metavar(a), a.help or "") for a in optionals],
    )
    panel("Commands", [(name, "", text) for name, text in commands])
