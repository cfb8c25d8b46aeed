"""`nexus <collection> import FILE`: bulk-create records from CSV or JSON Lines.

Records go in batches, one `BulkCreateRecords` call (one transaction) each. A bad row
stops the import with its line number; nothing of its batch is written (the batches
before it are, and the summary says how many records that was).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .._grpc import EXIT_INVALID, ApiFailure, caller_metadata, struct_of, type_spec
from ._output import emit, err

if TYPE_CHECKING:
    from ._app import State

__all__ = ["RowError", "coerce_csv_row", "import_records", "read_rows"]


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


def read_rows(
    path: Path, fmt: str, types: dict[str, tuple[str, bool]]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each row of the file; raises `RowError` on a bad one."""
    with path.open(encoding="utf-8", newline="") as fh:
        if fmt == "csv":
            reader = csv.DictReader(fh)
            for row in reader:
                yield reader.line_num, coerce_csv_row(row, types, reader.line_num)
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


def _stop(message: str, code: int, written: int, batches: int) -> NoReturn:
    err(f"error: {message}")
    err(
        f"stopped: {written} records written in {batches} batches before this one; "
        "nothing of the failed batch was written"
    )
    raise SystemExit(code)


def import_records(st: State, model: Any, path: Path, batch_size: int, fmt: str | None) -> None:
    """Import `path` into `model` in batches of `batch_size`, showing progress on stderr."""
    from nexus_api.nexus.model.v1 import model_service_pb2 as m

    if fmt not in (None, "csv", "jsonl"):
        err(f"error: --format: {fmt!r} is not csv or jsonl")
        raise SystemExit(2)
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
    types = {f.name: (f.type, f.nullable) for f in model.fields}
    with path.open(encoding="utf-8") as fh:
        total = sum(1 for text in fh if text.strip()) - (1 if fmt == "csv" else 0)
    written = batches = 0
    progress = None
    task: Any = None
    if sys.stderr.isatty():
        from rich.progress import Progress

        progress = Progress(transient=False)
        progress.start()
        task = progress.add_task(f"importing {path.name}", total=max(total, 0))

    def send(batch: list[tuple[int, dict[str, Any]]]) -> None:
        nonlocal written, batches
        req = m.BulkCreateRecordsRequest(model=model.name)
        for _, record in batch:
            req.records.append(struct_of(record))
        try:
            resp = st.models.BulkCreateRecords(req, timeout=st.timeout, metadata=caller_metadata())
        except Exception as exc:
            import grpc

            if not isinstance(exc, grpc.RpcError):
                raise
            failure = ApiFailure.from_rpc_error(exc)
            where = ""
            for fld, _ in failure.violations:
                if fld.startswith("records["):
                    index = int(fld[len("records[") : fld.index("]")])
                    if 0 <= index < len(batch):
                        where = f"line {batch[index][0]}: "
                        break
            from ._app import exit_code_of

            if progress is not None:
                progress.stop()
            _stop(where + failure.render(), exit_code_of(failure), written, batches)
        written += int(resp.created_count)
        batches += 1
        first, last = batch[0][0], batch[-1][0]
        if progress is not None:
            progress.update(task, advance=len(batch))
        else:
            err(
                f"batch {batches}: {len(batch)} records (lines {first}-{last}) written, "
                f"{written} so far"
            )

    batch: list[tuple[int, dict[str, Any]]] = []
    try:
        for line, record in read_rows(path, fmt, types):
            batch.append((line, record))
            if len(batch) >= batch_size:
                send(batch)
                batch = []
        if batch:
            send(batch)
    except RowError as exc:
        if progress is not None:
            progress.stop()
        _stop(str(exc), EXIT_INVALID, written, batches)
    if progress is not None:
        progress.stop()
    err(f"imported {written} {model.collection} from {path.name} in {batches} batches")
    if st.output != "table":
        emit({"created_count": written, "batches": batches}, st.output)
