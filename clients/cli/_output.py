"""How the CLI prints a result: `--output table|json|yaml`.

`json` is the proto3 JSON document REST returns for the same call; `yaml` is the same
document as YAML; `table` is for people (rich tables, nested values as compact JSON).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["FORMATS", "emit", "emit_rows", "err"]

FORMATS = ("table", "json", "yaml")


def err(text: str) -> None:
    """A line for people on stderr (progress, summaries, errors)."""
    print(text, file=sys.stderr, flush=True)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _print_doc(doc: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(doc, indent=2, ensure_ascii=False), flush=True)
    else:
        import yaml  # type: ignore[import-untyped]

        print(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), end="", flush=True)


def emit(doc: Any, output: str) -> None:
    """Print one document: a key/value table, or the document as JSON or YAML."""
    if output != "table":
        _print_doc(doc, output)
        return
    if not isinstance(doc, dict):
        print(_cell(doc), flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in doc.items():
        table.add_row(key, _cell(value))
    Console(soft_wrap=True).print(table)


def emit_rows(
    doc: Any, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None, output: str
) -> None:
    """Print a list: `rows` as a table, else the whole response `doc` as JSON or YAML."""
    if output != "table":
        _print_doc(doc, output)
        return
    from rich.console import Console
    from rich.table import Table

    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    table = Table(*columns)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console = Console(soft_wrap=True)
    console.print(table)
    token = doc.get("next_page_token") if isinstance(doc, dict) else None
    if token:
        err(f"more: --page-token {token}")
