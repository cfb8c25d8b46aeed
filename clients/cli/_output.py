"""How the CLI prints a result: `--output table|json|yaml`.

`json` is the proto3 JSON document REST returns for the same call; `yaml` is the same
document as YAML; `table` is for people (rich tables, nested values as compact JSON).
A list is a table when its rows fit the terminal's width, else one block of
`field  value` lines per row (as psql's expanded display), so that no column is folded
into a narrow strip. An id is never cut: in a table id columns keep their whole width
(any other column folds its text, should the table still be too wide), and in blocks no
value is folded.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["FORMATS", "emit", "emit_rows", "emit_value", "err", "is_id_column"]

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


def is_id_column(name: str) -> bool:
    """Whether a column holds ids (`id`, `execution_id`, ...), which are never cut."""
    return name == "id" or name.endswith("_id")


def emit_rows(
    doc: Any,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] | None,
    output: str,
    *,
    keep: Sequence[str] = (),
) -> None:
    """Print a list: `rows` as a table (or one block per row when the table is wider
    than the terminal), else the whole response `doc` as JSON or YAML.

    Id columns (and those named in `keep`, such as a model's primary key) are printed
    whole on one line; nothing is cut with an ellipsis.
    """
    if output != "table":
        _print_doc(doc, output)
        return
    _print_table(rows, columns, keep)
    token = doc.get("next_page_token") if isinstance(doc, dict) else None
    if token:
        err(f"more: --page-token {token}")


def _print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None, keep: Sequence[str] = ()
) -> None:
    from rich.console import Console
    from rich.table import Table

    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            seen.update(dict.fromkeys(row))
        columns = list(seen)
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    console = Console(soft_wrap=True)
    if cells and _table_width(columns, cells) > console.width:
        _print_blocks(console, columns, cells)
        return
    table = Table()
    for i, name in enumerate(columns):
        if name in keep or is_id_column(name):
            widest = max([len(name), *(len(r[i]) for r in cells)])
            table.add_column(name, no_wrap=True, min_width=widest)
        else:
            table.add_column(name, overflow="fold")
    for row_cells in cells:
        table.add_row(*row_cells)
    console.print(table)


def _table_width(columns: Sequence[str], cells: Sequence[Sequence[str]]) -> int:
    """The width of the table with no cell folded: each column as wide as its widest
    line, plus rich's padding and borders (`│ a │ b │`)."""
    from rich.cells import cell_len

    def widest(texts: Iterable[str]) -> int:
        return max(cell_len(line) for text in texts for line in text.splitlines() or [""])

    width = sum(widest([name, *(row[i] for row in cells)]) for i, name in enumerate(columns))
    return width + 3 * len(columns) + 1


def _print_blocks(console: Any, columns: Sequence[str], cells: Sequence[Sequence[str]]) -> None:
    """Rows too wide for the terminal: one block per row, a `field  value` line each,
    under a `record N of M` rule. Values are never folded (a long one wraps as the
    terminal wraps any line), so ids stay whole."""
    from rich.rule import Rule
    from rich.text import Text

    width = max(len(c) for c in columns)
    for n, row_cells in enumerate(cells, 1):
        console.print(Rule(f"record {n} of {len(cells)}", align="left", style="dim"))
        for name, value in zip(columns, row_cells, strict=True):
            console.print(Text.assemble((name.ljust(width), "bold"), "  ", value))


def _scalar(value: Any) -> bool:
    return not isinstance(value, dict | list)


def emit_value(title: str, value: Any) -> None:
    """Print one value for people under a `title` line: a record (a flat object) as a
    key/value table, a list of records as a table with one row each, an object of such
    values as one section per key; anything else as indented JSON."""
    if isinstance(value, dict) and all(_scalar(v) for v in value.values()):
        print(f"{title}:", flush=True)
        emit(value, "table")
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        print(f"{title}: {len(value)}", flush=True)
        _print_table(value, None)
    elif isinstance(value, dict) and value:
        for key, item in value.items():
            emit_value(f"{title}.{key}", item)
    else:
        text = json.dumps(value, indent=2, ensure_ascii=False)
        print(f"{title}: {text}", flush=True)
