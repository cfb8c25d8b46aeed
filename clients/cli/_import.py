"""`nexus <collection> import FILE`: bulk-create records from CSV, JSON Lines or JSON.

The file's format is read from its content, not its name (`sniff`): a JSON array, one
JSON object per line, or CSV whose header row names fields of the model; anything else
is refused with a clear error (`--format` overrides). Records go in batches, one
`BulkCreateRecords` call (one transaction) each, `BulkUpsertRecords` with
`--on-conflict upsert`. A bad row stops the import with its line number; nothing of its
batch is written (the batches before it are, and the summary says how many records
that was). A record whose unique value is taken stops it too, naming the line and the
value (`--on-conflict fail`), is left out and reported (`skip`), or updates the record
it matches (`upsert`).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .._grpc import (
    EXIT_CONFLICT,
    EXIT_INVALID,
    EXIT_USAGE,
    ApiFailure,
    call_metadata,
    exact,
    struct_of,
    to_json,
    type_spec,
)
from ._output import emit, err

if TYPE_CHECKING:
    from ._app import State

__all__ = [
    "FORMATS",
    "ON_CONFLICT",
    "FormatError",
    "ImportOptions",
    "RowError",
    "coerce_csv_row",
    "import_records",
    "read_rows",
    "sniff",
]

#: The formats `import` reads (`--format`), and what it does with a taken unique value.
FORMATS = ("csv", "jsonl", "json")
ON_CONFLICT = ("fail", "skip", "upsert")

#: How much of the file `sniff` looks at.
_SNIFF_BYTES = 64 * 1024
#: A value longer than this is cut in messages.
_SHOWN = 60


class FormatError(ValueError):
    """A file whose format cannot be told from its content."""


class RowError(ValueError):
    """A row that cannot be a record, with its line number in the file."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def coerce_csv_row(
    row: dict[str, str], types: dict[str, tuple[str, bool]], line: int
) -> dict[str, Any]:
    """A CSV row (all text) as a record typed by the model's fields.

    An empty cell is left out (the model default applies), or null for a nullable field
    written as `null`.
    """
    record: dict[str, Any] = {}
    for name, text in row.items():
        if name is None:
            raise RowError(line, "more cells than header columns")
        if name not in types:
            raise RowError(line, f"unknown column {name!r}")
        if text is None or text == "":
            continue
        type_name, nullable = types[name]
        spec = type_spec(type_name)
        try:
            if nullable and text == "null":
                value: Any = None
            elif text == "\\null":  # the text "null" itself, as on a flag
                value = "null"
            elif spec.python is int:
                value = int(text)
            elif spec.python is float:
                value = float(text)
            elif spec.python is bool:
                low = text.strip().lower()
                if low not in _TRUE | _FALSE:
                    raise ValueError(f"not a boolean: {text!r}")
                value = low in _TRUE
            elif spec.is_json:
                value = json.loads(text)
            else:
                value = text
        except ValueError as exc:
            raise RowError(line, f"{name}: {exc}") from None
        record[name] = value
    return record


def sniff(path: Path, fields: Sequence[str]) -> str:
    """The format of `path` from its content: `json` (an array), `jsonl` (one object per
    line) or `csv` (a header row naming at least one of `fields`); `FormatError` when
    it is none of them. An empty file is `jsonl` (nothing to import)."""
    with path.open("rb") as fh:
        head = fh.read(_SNIFF_BYTES)
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not only a character cut at the end of the sample
            raise FormatError("it is not UTF-8 text") from None
        text = head[: exc.start].decode("utf-8-sig")
    body = text.lstrip()
    if not body:
        return "jsonl"
    if body[0] == "[":
        return "json"
    if body[0] == "{":
        return "jsonl"
    header = next(csv.reader([body.splitlines()[0]], _dialect(body)), [])
    if any(cell.strip() in fields for cell in header):
        return "csv"
    raise FormatError(
        "it is not a JSON array, JSON lines, or CSV with a header row naming fields "
        f"({', '.join(fields[:6])}{', ...' if len(fields) > 6 else ''})"
    )


def _dialect(sample: str) -> type[csv.Dialect]:
    """The CSV dialect of `sample` (comma, semicolon, tab or bar separated)."""
    try:
        return csv.Sniffer().sniff(sample.splitlines()[0], delimiters=",;\t|")
    except (csv.Error, IndexError):
        return csv.excel


def _json_array(text: str) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each element of the JSON array `text`."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise RowError(exc.lineno, f"not valid JSON: {exc.msg}") from None
        yield line_at(pos), value
        pos = end
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            raise RowError(line_at(min(pos, len(text))), "expected , or ] in the JSON array")


def read_rows(
    path: Path, fmt: str, types: dict[str, tuple[str, bool]]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each row of the file; raises `RowError` on a bad one."""
    with path.open(encoding="utf-8-sig", newline="") as fh:
        if fmt == "csv":
            first = fh.readline()
            fh.seek(0)
            reader = csv.DictReader(fh, dialect=_dialect(first))
            for row in reader:
                yield reader.line_num, coerce_csv_row(row, types, reader.line_num)
            return
        if fmt == "json":
            for number, value in _json_array(fh.read()):
                if not isinstance(value, dict):
                    raise RowError(number, "expected a JSON object")
                yield number, value
            return
        for number, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RowError(number, f"not valid JSON: {exc.msg}") from None
            if not isinstance(value, dict):
                raise RowError(number, "expected a JSON object")
            yield number, value


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def find_conflicts(
    st: State, model: Any, batch: Sequence[tuple[int, dict[str, Any]]], fields: Sequence[str]
) -> list[tuple[int, str]]:
    """(index in `batch`, message) of each record whose `fields` values are taken: by a
    record already stored, or by an earlier line of the same batch."""
    from nexus_api.nexus.model.v1 import model_service_pb2 as m

    def key_of(record: dict[str, Any]) -> tuple[str, ...] | None:
        if any(record.get(f) is None for f in fields):
            return None
        return tuple(json.dumps(record[f], sort_keys=True) for f in fields)

    def describe(record: dict[str, Any]) -> str:
        return ", ".join(f"{f} {_shown(record[f])}" for f in fields)

    keys = [key_of(record) for _, record in batch]
    wanted = [record for (_, record), key in zip(batch, keys, strict=True) if key is not None]
    if not wanted:
        return []
    if len(fields) == 1:
        flt: dict[str, Any] = {fields[0]: {"$in": [r[fields[0]] for r in wanted]}}
    else:
        flt = {"$or": [{f: r[f] for f in fields} for r in wanted]}
    req = m.ListRecordsRequest(model=model.name, page_size=len(wanted), fields=list(fields))
    req.filter.update(exact(flt))
    stored: set[tuple[str, ...] | None] = set()
    try:
        resp = st.models.ListRecords(req, timeout=st.timeout, metadata=call_metadata())
        stored = {key_of(to_json(r)) for r in resp.records}
    except Exception as exc:  # the conflict is still reported, by the server's message
        import grpc

        if not isinstance(exc, grpc.RpcError):
            raise
    hits: list[tuple[int, str]] = []
    first_line: dict[tuple[str, ...], int] = {}
    for index, ((line, record), key) in enumerate(zip(batch, keys, strict=True)):
        if key is None:
            continue
        if key in stored:
            hits.append((index, f"{describe(record)} already exists"))
        elif key in first_line:
            hits.append((index, f"{describe(record)} is on line {first_line[key]} too"))
        else:
            first_line[key] = line
    return hits


def _stop(message: str, code: int, written: int, batches: int) -> NoReturn:
    err(f"error: {message}")
    err(
        f"stopped: {written} records written in {batches} batches before this one; "
        "nothing of the failed batch was written"
    )
    raise SystemExit(code)


@dataclass
class ImportOptions:
    """The options of one `import`, as given on the command line."""

    batch_size: int = 100
    fmt: str | None = None  # None: from the content
    on_conflict: str = "fail"
    conflict_on: Sequence[str] = ()  # with `upsert`: the fields that identify a record


def _usage(message: str) -> NoReturn:
    err(f"error: {message}")
    raise SystemExit(EXIT_USAGE)


def import_records(st: State, model: Any, path: Path, opts: ImportOptions) -> None:
    """Import `path` into `model` in batches, showing progress on stderr."""
    from nexus_api.nexus.model.v1 import model_service_pb2 as m

    from ._app import exit_code_of

    if opts.fmt not in (None, *FORMATS):
        _usage(f"--format: {opts.fmt!r} is not one of {', '.join(FORMATS)}")
    if opts.on_conflict not in ON_CONFLICT:
        _usage(f"--on-conflict: {opts.on_conflict!r} is not one of {', '.join(ON_CONFLICT)}")
    if opts.conflict_on and opts.on_conflict != "upsert":
        _usage("--conflict-on is used only with --on-conflict upsert")
    upsert = opts.on_conflict == "upsert"
    types = {f.name: (f.type, f.nullable) for f in model.fields}
    try:
        fmt = opts.fmt or sniff(path, list(types))
    except FormatError as exc:
        err(f"error: cannot import {path.name}: {exc}; give --format {'|'.join(FORMATS)}")
        raise SystemExit(EXIT_INVALID) from None
    written = batches = skipped = 0
    progress = None
    task: Any = None
    if sys.stderr.isatty():
        from rich.progress import Progress

        with path.open(encoding="utf-8", errors="replace") as fh:
            total = sum(1 for text in fh if text.strip()) - (1 if fmt == "csv" else 0)
        progress = Progress(transient=False)
        progress.start()
        task = progress.add_task(f"importing {path.name}", total=max(total, 0))

    def stop(message: str, code: int) -> NoReturn:
        if progress is not None:
            progress.stop()
        _stop(message, code, written, batches)

    def call(batch: list[tuple[int, dict[str, Any]]]) -> int:
        records = [struct_of(record) for _, record in batch]
        if upsert:
            ureq = m.BulkUpsertRecordsRequest(
                model=model.name, records=records, conflict_on=list(opts.conflict_on)
            )
            uresp = st.models.BulkUpsertRecords(ureq, timeout=st.timeout, metadata=call_metadata())
            return int(uresp.upserted_count)
        req = m.BulkCreateRecordsRequest(model=model.name, records=records)
        resp = st.models.BulkCreateRecords(req, timeout=st.timeout, metadata=call_metadata())
        return int(resp.created_count)

    def send(batch: list[tuple[int, dict[str, Any]]]) -> None:
        nonlocal written, batches, skipped
        first, last, size = batch[0][0], batch[-1][0], len(batch)
        while True:
            try:
                count = call(batch) if batch else 0
                break
            except Exception as exc:
                import grpc

                if not isinstance(exc, grpc.RpcError):
                    raise
                failure = ApiFailure.from_rpc_error(exc)
            fields = [f for f in failure.metadata.get("field", "").split(",") if f]
            if failure.reason == "RECORD_ALREADY_EXISTS" and fields:
                hits = find_conflicts(st, model, batch, fields)
                if hits and opts.on_conflict == "skip":
                    for index, text in hits:
                        err(f"line {batch[index][0]}: skipped: {text}")
                    skipped += len(hits)
                    left = {index for index, _ in hits}
                    batch = [row for i, row in enumerate(batch) if i not in left]
                    continue
                if hits:
                    index, text = hits[0]
                    stop(f"line {batch[index][0]}: {text} ({failure.code})", EXIT_CONFLICT)
            where = ""
            for fld, _ in failure.violations:
                if fld.startswith("records["):
                    index = int(fld[len("records[") : fld.index("]")])
                    if 0 <= index < len(batch):
                        where = f"line {batch[index][0]}: "
                        break
            stop(where + failure.render(), exit_code_of(failure))
        written += count
        batches += 1
        if progress is not None:
            progress.update(task, advance=size)
        else:
            verb = "upserted" if upsert else "written"
            done = f"{verb}, {written} so far"
            err(f"batch {batches}: {len(batch)} records (lines {first}-{last}) {done}")

    batch: list[tuple[int, dict[str, Any]]] = []
    try:
        for line, record in read_rows(path, fmt, types):
            batch.append((line, record))
            if len(batch) >= opts.batch_size:
                send(batch)
                batch = []
        if batch:
            send(batch)
    except RowError as exc:
        stop(str(exc), EXIT_INVALID)
    except UnicodeDecodeError:
        stop(f"{path.name} is not UTF-8 text", EXIT_INVALID)
    if progress is not None:
        progress.stop()
    what = "upserted" if upsert else "imported"
    tail = f", skipped {skipped} with a taken unique value" if opts.on_conflict == "skip" else ""
    err(f"{what} {written} {model.collection} from {path.name} in {batches} batches{tail}")
    if st.output != "table":
        doc: dict[str, Any] = {"upserted_count" if upsert else "created_count": written}
        doc["batches"] = batches
        if opts.on_conflict == "skip":
            doc["skipped_count"] = skipped
        emit(doc, st.output)
