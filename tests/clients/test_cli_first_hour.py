"""A newcomer's first hour with the `nexus` CLI (issue 15), one test per finding.

The CLI runs as a subprocess against the real server of conftest.py; `-o json` is
compared with the body the real Envoy returns for the same call.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

WAIT = 20.0
ROOT = Path(__file__).resolve().parents[2]
OK, USAGE, INVALID, CONFLICT = 0, 2, 4, 5
#: The declaration order of the Contact model (conftest.py), managed timestamps last.
CONTACT_FIELDS = ["id", "name", "email", "company", "score", "created_at", "updated_at"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ordered(text: str) -> Any:
    """JSON with every object as a list of (key, value) pairs: the printed order."""
    return json.loads(text, object_pairs_hook=list)


def _create(cli: Any, unique: Any, **extra: str) -> dict[str, Any]:
    args = ["contacts", "create", "--name", unique("Ann"), "--email", unique("a") + "@x.org"]
    for key, value in extra.items():
        args += [f"--{key}", value]
    r = cli("-o", "json", *args)
    assert r.code == OK, r.err
    doc: dict[str, Any] = r.json()
    return doc


# ---------------------------------------------------------------------------- the server


def test_server_option_is_honoured_when_listing_commands(cli: Any, server: Any) -> None:
    """`nexus -s HOST:PORT --help` lists the models of that server, not the default's."""
    elsewhere = {"NEXUS_SERVER": f"127.0.0.1:{_closed_port()}"}
    r = cli("--help", env=elsewhere)
    assert r.code == OK, r.err
    assert "contacts" not in r.out  # nothing answers at the default
    r = cli("-s", server.address, "--help", env=elsewhere)
    assert r.code == OK, r.err
    assert "contacts" in r.out and "companies" in r.out
    r = cli("--server", server.address, "contacts", "--help", env=elsewhere)
    assert r.code == OK and "import" in r.out


# ---------------------------------------------------------------------------- records


def test_record_fields_print_in_declaration_order(cli: Any, unique: Any) -> None:
    rec = _create(cli, unique, company="Acme")
    for args in (
        ("contacts", "get", rec["id"]),
        ("contacts", "update", rec["id"], "--score", "2"),
    ):
        r = cli("-o", "json", *args)
        assert r.code == OK, r.err
        assert [k for k, _ in _ordered(r.out)] == CONTACT_FIELDS, args
    r = cli("-o", "json", "contacts", "list", "--filter", json.dumps({"id": rec["id"]}))
    assert r.code == OK, r.err
    records = dict(_ordered(r.out))["records"]
    assert [k for k, _ in records[0]] == CONTACT_FIELDS
    r = cli("-o", "json", "run", "two_steps", "--name", "Bo", "--email", unique("b") + "@x.org")
    assert r.code == OK, r.err
    outputs = dict(dict(_ordered(r.out))["outputs"])
    assert [k for k, _ in outputs["read"]] == CONTACT_FIELDS

    # the table: one line per field, in the same order, every time
    r = cli("contacts", "get", rec["id"])
    assert r.code == OK, r.err
    assert [line.split()[0] for line in r.out.splitlines() if line.strip()] == CONTACT_FIELDS
    r = cli("contacts", "list", "--filter", json.dumps({"id": rec["id"]}))
    header = next(line for line in r.out.splitlines() if "email" in line)
    assert re.findall(r"\w+", header) == CONTACT_FIELDS
    r = cli("contacts", "upsert", "--name", "Up", "--email", rec["email"], "--conflict-on", "email")
    assert r.code == OK, r.err
    lines = [line for line in r.out.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines[:-1]] == CONTACT_FIELDS
    assert lines[-1] == "updated (it existed)"


def test_null_on_a_nullable_flag_is_null_and_the_text_is_escaped(cli: Any, unique: Any) -> None:
    assert _create(cli, unique, company="null")["company"] is None
    assert _create(cli, unique, company="\\null")["company"] == "null"
    rec = _create(cli, unique, company="Acme")
    r = cli("-o", "json", "contacts", "update", rec["id"], "--company", "null")
    assert r.code == OK, r.err
    assert r.json()["company"] is None
    # a workflow input typed `str | None`
    email = unique("w") + "@x.org"
    run = ["run", "create_contact", "--name", "W", "--email", email, "--company", "null"]
    r = cli("-o", "json", *run)
    assert r.code == OK, r.err
    assert r.json()["inputs"]["company"] is None
    assert r.json()["outputs"]["create"]["company"] is None
    # a field that is not nullable takes no null
    r = cli("contacts", "update", rec["id"], "--score", "null")
    assert r.code == USAGE and "--score" in r.err
    r = cli("contacts", "create", "--help")
    assert "<str|null>" in r.out


def test_a_nullable_number_flag_takes_null_and_numbers_only() -> None:
    """The same rule for `int | None` (the test app has no such field): in process."""
    from clients.cli._app import _collect, _flag, _make_command

    spec = _flag("age", "int | None", nullable=False, help_text="an age")
    got: dict[str, Any] = {}

    def record(**params: Any) -> None:
        got.update(_collect(params, [spec]))

    command = _make_command("t", "a test", [spec.parameter()], record)
    for args, want in ((["--age", "null"], None), (["--age", "5"], 5)):
        got.clear()
        command.main(args=args, standalone_mode=False)
        assert got == {"age": want}
    with pytest.raises(Exception, match="invalid literal for int"):  # exit 2 in the CLI
        command.main(args=["--age", "\\null"], standalone_mode=False)


def test_flags_show_no_type(cli: Any) -> None:
    for args in (("--help",), ("run", "create_contact", "--help"), ("workflows", "list", "--help")):
        r = cli(*args)
        assert r.code == OK, r.err
        assert "<bool>" not in r.out, args
    assert "--watch" in cli("run", "create_contact", "--help").out


# ---------------------------------------------------------------------------- tables


def test_run_table_shows_outputs_readably(cli: Any, unique: Any) -> None:
    email = unique("t") + "@x.org"
    r = cli("run", "two_steps", "--name", "Tab", "--email", email)
    assert r.code == OK, r.err
    lines = r.out.splitlines()
    assert "outputs.create:" in lines and "outputs.read:" in lines
    start = lines.index("outputs.read:")
    rows = [line.split() for line in lines[start + 1 : start + 1 + len(CONTACT_FIELDS)]]
    assert [row[0] for row in rows] == CONTACT_FIELDS
    assert rows[2] == ["email", email]
    assert "{" not in r.out  # no JSON text for people

    r = cli("run", "search_contacts", "--query", "Tab", "--limit", "5")
    assert r.code == OK, r.err
    assert re.search(r"^outputs\.search\.records: \d+$", r.out, re.M)
    assert email in r.out


def test_ids_are_never_cut_in_tables(cli: Any, unique: Any) -> None:
    company = unique("narrow")
    ids = [_create(cli, unique, company=company)["id"] for _ in range(2)]
    narrow = {"COLUMNS": "60"}
    r = cli("contacts", "list", "--filter", json.dumps({"company": company}), env=narrow)
    assert r.code == OK, r.err
    for rid in ids:
        assert rid in r.out  # whole, on one line
    r = cli("-o", "json", "run", "create_contact", "--name", "N", "--email", unique("n") + "@x.org")
    execution = r.json()["id"]
    r = cli("executions", "list", "--workflow", "create_contact", "--limit", "3", env=narrow)
    assert r.code == OK, r.err
    assert execution in r.out and "…" not in r.out.split(execution)[0].splitlines()[-1]


def test_a_list_too_wide_for_the_terminal_prints_one_block_per_record(
    cli: Any, unique: Any
) -> None:
    """As psql's expanded display: no column folded into a strip of a few letters."""
    company = unique("wide")
    made = [_create(cli, unique, company=company) for _ in range(2)]
    listing = ("contacts", "list", "--filter", json.dumps({"company": company}), "--order-by", "id")
    made.sort(key=lambda rec: rec["id"])

    r = cli(*listing, env={"COLUMNS": "80"})
    assert r.code == OK, r.err
    assert "┃" not in r.out  # no table
    blocks = re.split(r"^record \d of 2 ─+$", r.out, flags=re.M)
    assert blocks[0] == "" and len(blocks) == 3, r.out
    for block, rec in zip(blocks[1:], made, strict=True):
        lines = [line.split(None, 1) for line in block.strip().splitlines()]
        fields = {pair[0]: pair[1] if len(pair) > 1 else "" for pair in lines}
        assert list(fields) == list(rec)  # every field, in the record's order
        assert fields["id"] == rec["id"]  # whole, on its line
        assert fields["name"] == rec["name"] and fields["company"] == company

    r = cli(*listing, env={"COLUMNS": "200"})  # it fits: one table, a row per record
    assert r.code == OK, r.err
    assert "record 1" not in r.out
    rows = [line for line in r.out.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == [rec["id"] for rec in made]


# ---------------------------------------------------------------------------- docs


def test_readme_commands_run_as_written(cli: Any, unique: Any) -> None:
    """The README's commands, `--output` after the subcommand included."""
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\.venv/bin/nexus (.+)$", readme, re.M)
    assert len(commands) >= 3
    for line in commands:
        args = shlex.split(line)
        if "create_contact" in args:
            args[args.index("--email") + 1] = unique("readme") + "@example.com"
        r = cli(*args)
        assert r.code == OK, (line, r.err)
        if "--output" in args:
            assert isinstance(r.json(), dict)
    late = (("workflows", "list", "-o", "json"), ("models", "get", "Contact", "--output=yaml"))
    for args in late:
        r = cli(*args)
        assert r.code == OK, r.err
        assert r.out.lstrip().startswith("{") or "name: Contact" in r.out


def test_hello_workflow_example_runs_as_its_docstring_says() -> None:
    path = ROOT / "examples" / "hello_workflow.py"
    doc = path.read_text()
    assert "`make run` runs this file" not in doc  # `make run` serves contacts_app.py
    assert "python examples/hello_workflow.py" in doc
    proc = subprocess.run(
        [sys.executable, str(path), "ada"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=WAIT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HI ADA" in proc.stdout


def test_workflows_get_shows_outputs_and_definition(cli: Any) -> None:
    r = cli("workflows", "get", "two_steps")
    assert r.code == OK, r.err
    cells = [re.findall(r"[^\s│┃]+", line) for line in r.out.splitlines()]
    assert ["create", "created_at", "datetime"] in cells  # an output, its type
    assert ["read", "ContactReadNode", "{}"] in cells  # a node of the definition
    assert ["create.id", "read.id"] in cells  # a connection


def test_json_output_is_the_rest_body(cli: Any, rest_url: str, unique: Any) -> None:
    """`-o json` prints exactly what REST (the real Envoy) returns for the same call,
    default values (`false`, `""`, `0`) included."""
    rec = _create(cli, unique)
    calls: list[tuple[tuple[str, ...], str, Any]] = [
        (("workflows", "get", "search_contacts"), "/v1/workflows/search_contacts", None),
        (("models", "get", "Contact"), "/v1/models/Contact", None),
        (("contacts", "get", rec["id"]), f"/v1/models/Contact/records/{rec['id']}", None),
        (  # a zero count: `{"count": "0"}` on both, not `{}`
            ("contacts", "count", "--filter", json.dumps({"id": "none"})),
            "/v1/models/Contact/records:count",
            {"filter": {"id": "none"}},
        ),
    ]
    with httpx.Client(base_url=rest_url, timeout=WAIT) as client:
        for args, path, body_json in calls:
            r = cli("-o", "json", *args)
            assert r.code == OK, r.err
            get = body_json is None
            body = client.get(path) if get else client.post(path, json=body_json)
            assert body.status_code == 200, body.text
            assert r.json() == body.json(), args
        # a write: upserting the same values again changes nothing but updated_at
        upsert = ["--name", rec["name"], "--email", rec["email"], "--conflict-on", "email"]
        r = cli("-o", "json", "contacts", "upsert", *upsert)
        assert r.code == OK, r.err
        body = client.post(
            "/v1/models/Contact/records:upsert",
            json={
                "record": {"name": rec["name"], "email": rec["email"]},
                "conflict_on": ["email"],
            },
        )
        assert body.status_code == 200, body.text
        cli_doc, rest_doc = r.json(), body.json()
        assert cli_doc["created"] is False and rest_doc["created"] is False
        for doc in (cli_doc, rest_doc):
            del doc["record"]["updated_at"]
        assert cli_doc == rest_doc


# ---------------------------------------------------------------------------- import


def _count(cli: Any, company: str) -> int:
    r = cli("-o", "json", "contacts", "count", "--filter", json.dumps({"company": company}))
    assert r.code == OK, r.err
    return int(r.json()["count"])


def test_import_reads_the_format_from_the_content(cli: Any, unique: Any, tmp_path: Path) -> None:
    company = unique("sniff")

    def person(i: int) -> dict[str, Any]:
        return {"name": f"S{i}", "email": unique("s") + "@x.org", "company": company}

    files = {
        "array.txt": json.dumps([person(0), person(1)], indent=2),  # a JSON array
        "lines": "\n".join(json.dumps(person(i)) for i in (2, 3)),  # JSON lines, no suffix
        "semi.data": "name;email;company\n"
        + "\n".join(f"{p['name']};{p['email']};{company}" for p in (person(4), person(5))),
        "bom.csv": "\ufeffname,email,company\n" + f"B,{unique('b')}@x.org,{company}\n",
    }
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        r = cli("contacts", "import", str(path))
        assert r.code == OK, (name, r.err)
    assert _count(cli, company) == 7

    # a bad element of a JSON array is named by its line
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([person(8), {"name": "X", "score": "high"}], indent=2))
    r = cli("contacts", "import", str(path))
    assert r.code == INVALID and "line 7: " in r.err, r.err  # where its `{` is

    for text in ("hello world\nnot a table\n", "\x00\x01binary"):
        path = tmp_path / "unknown.bin"
        path.write_text(text)
        r = cli("contacts", "import", str(path))
        assert r.code == INVALID, r.err
        assert "cannot import unknown.bin" in r.err and "--format" in r.err
    path.write_bytes(b"\xff\xfe\x00n\x00a")
    r = cli("contacts", "import", str(path))
    assert r.code == INVALID and "not UTF-8" in r.err
    r = cli("contacts", "import", str(tmp_path / "lines"), "--format", "xml")
    assert r.code == USAGE and "csv, jsonl, json" in r.err


def test_import_on_conflict_fail_skip_upsert(cli: Any, unique: Any, tmp_path: Path) -> None:
    company = unique("conflict")
    taken = _create(cli, unique, company=company)["email"]
    new, twice = unique("new") + "@x.org", unique("twice") + "@x.org"
    path = tmp_path / "people.csv"
    path.write_text(
        "name,email,company\n"
        f"New,{new},{company}\n"
        f"Taken,{taken},{company}\n"  # line 3
        f"Once,{twice},{company}\n"
        f"Twice,{twice},{company}\n"  # line 5: the same as line 4
    )
    r = cli("contacts", "import", str(path))  # --on-conflict fail is the default
    assert r.code == CONFLICT, r.err
    assert f'line 3: email "{taken}" already exists' in r.err
    assert _count(cli, company) == 1  # nothing of the batch

    r = cli("-o", "json", "contacts", "import", str(path), "--on-conflict", "skip")
    assert r.code == OK, r.err
    assert f'line 3: skipped: email "{taken}" already exists' in r.err
    assert f'line 5: skipped: email "{twice}" is on line 4 too' in r.err
    assert r.json() == {"created_count": 2, "batches": 1, "skipped_count": 2}
    assert _count(cli, company) == 3

    path.write_text(f"name,email,company,score\nRenamed,{taken},{company},7\n")
    r = cli(
        "-o", "json", "contacts", "import", str(path), "--on-conflict", "upsert",
        "--conflict-on", "email",
    )  # fmt: skip
    assert r.code == OK, r.err
    assert r.json() == {"upserted_count": 1, "batches": 1}
    r = cli("-o", "json", "contacts", "list", "--filter", json.dumps({"email": taken}))
    assert [(c["name"], c["score"]) for c in r.json()["records"]] == [("Renamed", 7)]
    assert _count(cli, company) == 3

    r = cli("contacts", "import", str(path), "--conflict-on", "email")
    assert r.code == USAGE and "--on-conflict upsert" in r.err
    r = cli("contacts", "import", str(path), "--on-conflict", "ignore")
    assert r.code == USAGE and "fail, skip, upsert" in r.err
