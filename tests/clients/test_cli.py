"""The `nexus` CLI as a subprocess against a real gRPC server (see conftest.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

WAIT = 20.0

# exit codes (docs/cli.md)
OK, FAILED, USAGE, NOT_FOUND, INVALID, CONFLICT, UNAVAILABLE = 0, 1, 2, 3, 4, 5, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------- help


def test_help_lists_static_commands_and_one_group_per_model(cli: Any) -> None:
    r = cli("--help")
    assert r.code == OK, r.err
    for name in ("workflows", "executions", "models", "run", "call", "contacts", "companies"):
        assert name in r.out


def test_run_help_is_generated_from_the_typed_inputs(cli: Any) -> None:
    r = cli("run", "search_contacts", "--help")
    assert r.code == OK, r.err
    assert "Find contacts whose name contains a text." in r.out
    assert "--query" in r.out and "text the name contains (any case)" in r.out
    assert "--min-score" in r.out and "lowest score to list" in r.out and "default: 0" in r.out
    assert "--limit" in r.out and "default: 20" in r.out
    assert "(str, required)" in r.out
    for common in ("--inputs", "--watch", "--request-id"):
        assert common in r.out


def test_run_lists_the_workflows(cli: Any) -> None:
    r = cli("run", "--help")
    assert r.code == OK, r.err
    for name in ("create_contact", "search_contacts", "gated", "boom"):
        assert name in r.out


def test_model_help_is_generated_from_the_fields(cli: Any) -> None:
    r = cli("contacts", "--help")
    assert r.code == OK, r.err
    for verb in ("create", "get", "update", "delete", "list", "count", "upsert", "import"):
        assert verb in r.out
    r = cli("contacts", "create", "--help")
    assert r.code == OK, r.err
    assert "--email" in r.out and "where to write to" in r.out and "unique" in r.out
    assert "--score" in r.out and "default: 0" in r.out
    assert "--created-at" not in r.out  # managed fields are not flags


def test_shell_completion_script(cli: Any) -> None:
    # the shell is named, not detected from the parent processes (a test runner may have
    # no shell among them)
    r = cli("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert r.code == OK, r.err
    assert "complete" in r.out


# ---------------------------------------------------------------------------- workflows


def test_workflows_list_and_get(cli: Any) -> None:
    r = cli("-o", "json", "workflows", "list")
    assert r.code == OK, r.err
    names = [w["name"] for w in r.json()["workflows"]]
    assert {"create_contact", "search_contacts", "gated"} <= set(names)
    r = cli("-o", "json", "workflows", "get", "search_contacts")
    assert r.code == OK, r.err
    doc = r.json()
    limit = next(i for i in doc["inputs"] if i["name"] == "limit")
    assert limit["type"] == "int" and limit["default"] == 20
    r = cli("workflows", "get", "search_contacts")
    assert r.code == OK and "min_score" in r.out and "lowest score to list" in r.out


def test_run_with_flags_in_every_output_format(cli: Any, unique: Any) -> None:
    name = unique("Ada")
    email = unique("ada") + "@x.org"
    r = cli("-o", "json", "run", "create_contact", "--name", name, "--email", email)
    assert r.code == OK, r.err
    doc = r.json()
    assert doc["state"] == "STATE_SUCCEEDED"
    assert doc["outputs"]["create"]["email"] == email
    assert doc["outputs"]["create"]["score"] == 0  # proto3 JSON number as REST prints it
    assert doc["inputs"] == {"name": name, "email": email, "company": None}  # defaults filled

    r = cli("-o", "yaml", "run", "search_contacts", "--query", name.lower())
    assert r.code == OK, r.err
    doc = yaml.safe_load(r.out)
    assert [c["email"] for c in doc["outputs"]["search"]["records"]] == [email]

    r = cli("run", "search_contacts", "--query", name)
    assert r.code == OK, r.err
    # the table folds long values (the outputs' JSON) at the terminal's width, wherever
    # the varying ids and times put the line break
    assert "STATE_SUCCEEDED" in r.out and email in "".join(r.out.split())


def test_run_inputs_from_a_file_and_stdin_flags_win(cli: Any, unique: Any, tmp_path: Path) -> None:
    email = unique("bo") + "@x.org"
    path = tmp_path / "inputs.json"
    path.write_text(json.dumps({"name": "Bo", "email": email, "company": "Acme"}))
    r = cli("-o", "json", "run", "create_contact", "--inputs", f"@{path}", "--name", "Bob")
    assert r.code == OK, r.err
    created = r.json()["outputs"]["create"]
    assert (created["name"], created["email"], created["company"]) == ("Bob", email, "Acme")

    r = cli(
        "-o",
        "json",
        "run",
        "search_contacts",
        "--inputs",
        "-",
        input=json.dumps({"query": email.split("@")[0], "limit": 5}),
    )
    assert r.code == OK, r.err
    assert r.json()["inputs"] == {"query": email.split("@")[0], "limit": 5, "min_score": 0}


def test_invalid_inputs_exit_4_with_the_field_violations(cli: Any) -> None:
    r = cli("run", "create_contact", "--name", "Nobody")
    assert r.code == INVALID
    assert "INVALID_ARGUMENT" in r.err and "INPUTS_INVALID" in r.err
    assert "inputs.email" in r.err

    r = cli("run", "search_contacts", "--inputs", '{"query": "a", "limit": "many"}')
    assert r.code == INVALID
    assert "inputs.limit" in r.err


def test_usage_errors_exit_2(cli: Any) -> None:
    assert cli("run", "search_contacts", "--query", "a", "--limit", "many").code == USAGE
    assert cli("frobnicate").code == USAGE
    r = cli("run", "search_contacts", "--inputs", "{not json")
    assert r.code == USAGE and "--inputs" in r.err
    assert cli("-o", "xml", "models", "list").code == USAGE


def test_not_found_exits_3(cli: Any) -> None:
    r = cli("executions", "get", "no-such-execution")
    assert r.code == NOT_FOUND
    assert "NOT_FOUND (EXECUTION_NOT_FOUND)" in r.err
    assert cli("workflows", "get", "no_such_workflow").code == NOT_FOUND
    assert cli("run", "no_such_workflow").code == NOT_FOUND
    assert cli("contacts", "get", "no-such-id").code == NOT_FOUND


def test_server_unavailable_exits_6(cli: Any) -> None:
    address = f"127.0.0.1:{_free_port()}"
    r = cli("--server", address, "models", "list")
    assert r.code == UNAVAILABLE
    assert "UNAVAILABLE" in r.err and "is the server running" in r.err
    r = cli("models", "list", env={"NEXUS_SERVER": address})
    assert r.code == UNAVAILABLE


def test_failed_execution_exits_1_with_the_status(cli: Any) -> None:
    r = cli("run", "boom", "--message", "kaput")
    assert r.code == FAILED
    assert "NODE_FAILED" in r.err and "kaput" in r.err and "execution_id=" in r.err


def test_conflict_exits_5(cli: Any, unique: Any) -> None:
    email = unique("dup") + "@x.org"
    assert cli("contacts", "create", "--name", "A", "--email", email).code == OK
    r = cli("contacts", "create", "--name", "B", "--email", email)
    assert r.code == CONFLICT
    assert "ALREADY_EXISTS (RECORD_ALREADY_EXISTS)" in r.err


# ---------------------------------------------------------------------------- executions


def test_run_watch_shows_node_by_node_progress(cli: Any, unique: Any) -> None:
    email = unique("watch") + "@x.org"
    r = cli("-o", "json", "run", "two_steps", "--name", "W", "--email", email, "--watch")
    assert r.code == OK, r.err
    lines = r.err.splitlines()
    expected = [
        "execution",
        "node create (ContactCreateNode) started",
        "node create (ContactCreateNode) completed",
        "node read (ContactReadNode) started",
        "node read (ContactReadNode) completed",
        "execution completed",
    ]
    positions = [next(i for i, line in enumerate(lines) if e in line) for e in expected]
    assert positions == sorted(positions), r.err
    doc = r.json()
    assert doc["state"] == "STATE_SUCCEEDED"
    assert doc["outputs"]["read"]["email"] == email


def test_executions_get_and_list(cli: Any, unique: Any) -> None:
    email = unique("exe") + "@x.org"
    r = cli("-o", "json", "run", "create_contact", "--name", "E", "--email", email)
    assert r.code == OK, r.err
    run_doc = r.json()
    r = cli("-o", "json", "executions", "get", run_doc["id"])
    assert r.code == OK, r.err
    assert r.json()["outputs"] == run_doc["outputs"]
    r = cli("-o", "json", "executions", "list", "--workflow", "create_contact", "--limit", "1000")
    assert r.code == OK, r.err
    assert run_doc["id"] in [e["id"] for e in r.json()["executions"]]
    r = cli("executions", "list", "--state", "succeeded", "--limit", "3")
    assert r.code == OK and "STATE_SUCCEEDED" in r.out
    assert cli("executions", "list", "--state", "sleepy").code == USAGE


def test_run_async_queues_and_prints_the_execution_at_once(cli: Any, unique: Any) -> None:
    email = unique("async") + "@x.org"
    r = cli("-o", "json", "run", "create_contact", "--name", "Q", "--email", email, "--async")
    assert r.code == OK, r.err
    queued = r.json()
    assert queued["state"] == "STATE_QUEUED" and queued["inputs"]["email"] == email
    for _ in range(20):  # each look is a process of its own: a few at most
        r = cli("-o", "json", "executions", "get", queued["id"])
        assert r.code == OK, r.err
        if r.json()["state"] != "STATE_QUEUED" and r.json()["state"] != "STATE_RUNNING":
            break
    assert r.json()["state"] == "STATE_SUCCEEDED"
    assert r.json()["outputs"]["create"]["email"] == email
    both = cli("run", "create_contact", "--name", "Q", "--email", email, "--async", "--watch")
    assert both.code == USAGE and "--async" in both.err


def _running_id(cli: Any, server: Any, gate: str) -> str:
    assert server.gates.started(gate).wait(WAIT), "the gated node never started"
    r = cli("-o", "json", "executions", "list", "--workflow", "gated", "--state", "running")
    assert r.code == OK, r.err
    ids = [e["id"] for e in r.json().get("executions", []) if e["inputs"].get("gate") == gate]
    assert len(ids) == 1, r.out
    return str(ids[0])


def test_executions_watch_follows_a_running_execution(
    cli: Any, cli_popen: Any, server: Any, unique: Any
) -> None:
    gate = unique("gate")
    runner = cli_popen("-o", "json", "run", "gated", "--gate", gate, "--value", "7", "--watch")
    execution_id = _running_id(cli, server, gate)
    watcher = cli_popen("-o", "json", "executions", "watch", execution_id)
    # the watcher has subscribed once it printed the replayed start event
    assert watcher.stderr is not None
    first = watcher.stderr.readline()
    assert "started" in first, first
    server.gates.release(gate)
    out, err = watcher.communicate(timeout=WAIT)
    assert watcher.returncode == OK, err
    assert json.loads(out)["outputs"] == {"wait": {"value": 7}}
    assert "execution completed" in err
    out, err = runner.communicate(timeout=WAIT)
    assert runner.returncode == OK, err
    assert "node wait (ClientsGateNode) started" in err
    assert json.loads(out)["state"] == "STATE_SUCCEEDED"


def test_executions_cancel(cli: Any, cli_popen: Any, server: Any, unique: Any) -> None:
    gate = unique("cancel")
    runner = cli_popen("run", "gated", "--gate", gate, "--watch")
    execution_id = _running_id(cli, server, gate)
    r = cli("-o", "json", "executions", "cancel", execution_id)
    assert r.code == OK, r.err
    assert r.json()["state"] == "STATE_CANCELLED"
    assert server.gates.cancelled(gate).wait(WAIT)
    _, err = runner.communicate(timeout=WAIT)
    assert runner.returncode == FAILED
    assert "CANCELLED" in err
    r = cli("executions", "cancel", execution_id)  # already cancelled: returned unchanged
    assert r.code == OK, r.err


# ---------------------------------------------------------------------------- models


def test_models_list_and_get(cli: Any) -> None:
    r = cli("-o", "json", "models", "list")
    assert r.code == OK, r.err
    models = {m["name"]: m for m in r.json()["models"]}
    assert models["Contact"]["collection"] == "contacts"
    assert models["Contact"]["service"] == "nexus.models.v1.ContactService"
    r = cli("models", "list")
    assert r.code == OK and "contacts" in r.out and "companies" in r.out
    r = cli("-o", "yaml", "models", "get", "Contact")
    assert r.code == OK, r.err
    assert [f["name"] for f in yaml.safe_load(r.out)["fields"]][:3] == ["id", "name", "email"]


def test_model_crud(cli: Any, unique: Any) -> None:
    company = unique("crud")
    email = unique("c") + "@x.org"
    r = cli(
        "-o",
        "json",
        "contacts",
        "create",
        "--name",
        "Cy",
        "--email",
        email,
        "--company",
        company,
        "--score",
        "4",
    )
    assert r.code == OK, r.err
    rec = r.json()
    assert (rec["name"], rec["score"], rec["company"]) == ("Cy", 4, company)
    rid = rec["id"]

    r = cli("-o", "json", "contacts", "get", rid, "--fields", "name,score")
    assert r.code == OK, r.err
    assert r.json()["name"] == "Cy"

    r = cli("-o", "json", "contacts", "update", rid, "--score", "9")
    assert r.code == OK, r.err
    assert (r.json()["score"], r.json()["name"]) == (9, "Cy")
    assert cli("contacts", "update", rid).code == USAGE

    r = cli(
        "-o",
        "json",
        "contacts",
        "upsert",
        "--name",
        "Cy2",
        "--email",
        email,
        "--score",
        "9",
        "--company",
        company,
        "--conflict-on",
        "email",
    )
    assert r.code == OK, r.err
    assert r.json()["record"]["name"] == "Cy2" and r.json()["created"] is False  # as REST

    cli(
        "contacts",
        "create",
        "--name",
        "Low",
        "--email",
        unique("l") + "@x.org",
        "--company",
        company,
        "--score",
        "1",
    )
    flt = json.dumps({"company": company, "score": {"$gt": 3}})
    r = cli(
        "-o",
        "json",
        "contacts",
        "list",
        "--filter",
        flt,
        "--order-by",
        "-created_at",
        "--limit",
        "20",
    )
    assert r.code == OK, r.err
    assert [c["email"] for c in r.json()["records"]] == [email]
    r = cli("contacts", "list", "--filter", json.dumps({"company": company}), "--limit", "20")
    assert r.code == OK and "Cy2" in r.out and "Low" in r.out

    r = cli("-o", "json", "contacts", "count", "--filter", json.dumps({"company": company}))
    assert r.code == OK, r.err
    assert int(r.json()["count"]) == 2
    r = cli("contacts", "count", "--filter", json.dumps({"company": company}))
    assert r.out.strip() == "2"

    r = cli("contacts", "delete", rid)
    assert r.code == OK, r.err
    assert cli("contacts", "get", rid).code == NOT_FOUND

    r = cli("contacts", "list", "--filter", '{"score": {"$bogus": 1}}')
    assert r.code == INVALID and "QUERY_INVALID" in r.err


def test_model_create_invalid_shows_violations(cli: Any) -> None:
    r = cli("contacts", "create", "--name", "X", "--json", '{"email": 3, "score": "x"}')
    assert r.code == INVALID
    assert "RECORD_INVALID" in r.err and "record." in r.err


# ---------------------------------------------------------------------------- import


def _count(cli: Any, company: str) -> int:
    r = cli("-o", "json", "contacts", "count", "--filter", json.dumps({"company": company}))
    assert r.code == OK, r.err
    return int(r.json().get("count", 0))  # proto3 JSON leaves a zero out


def test_import_csv_in_batches(cli: Any, unique: Any, tmp_path: Path) -> None:
    company = unique("csv")
    rows = ["name,email,company,score"] + [
        f"P{i},{unique('p')}@x.org,{company},{i}" for i in range(5)
    ]
    path = tmp_path / "people.csv"
    path.write_text("\n".join(rows) + "\n")
    r = cli("-o", "json", "contacts", "import", str(path), "--batch-size", "2")
    assert r.code == OK, r.err
    assert r.json() == {"created_count": 5, "batches": 3}
    assert "batch 1: 2 records (lines 2-3)" in r.err
    assert "imported 5 contacts from people.csv in 3 batches" in r.err
    assert _count(cli, company) == 5


def test_import_bad_row_stops_with_its_line_and_writes_nothing_of_its_batch(
    cli: Any, unique: Any, tmp_path: Path
) -> None:
    company = unique("bad")
    rows = ["name,email,company,score"]
    rows += [f"P{i},{unique('p')}@x.org,{company},{i}" for i in range(3)]
    rows += [f"Bad,{unique('p')}@x.org,{company},not-a-number"]  # line 5, batch 2
    rows += [f"P9,{unique('p')}@x.org,{company},9"]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(rows) + "\n")
    r = cli("contacts", "import", str(path), "--batch-size", "2")
    assert r.code == INVALID
    assert "line 5" in r.err and "score" in r.err
    assert "2 records written in 1 batches" in r.err
    assert _count(cli, company) == 2  # batch 1 only; nothing of batch 2 (lines 4-5)


def test_import_server_rejected_row_names_its_line(cli: Any, unique: Any, tmp_path: Path) -> None:
    company = unique("jsonl")
    taken = unique("taken") + "@x.org"
    lines = [
        {"name": "A", "email": unique("a") + "@x.org", "company": company},
        {"name": "B", "email": taken, "company": company},
        {"name": "C", "email": unique("c") + "@x.org", "company": company, "score": "high"},
    ]
    path = tmp_path / "people.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = cli("contacts", "import", str(path), "--batch-size", "10")
    assert r.code == INVALID, r.err
    assert "line 3" in r.err and "records[2].score" in r.err
    assert _count(cli, company) == 0

    path.write_text("{not json}\n")
    r = cli("contacts", "import", str(path))
    assert r.code == INVALID and "line 1" in r.err


# ---------------------------------------------------------------------------- call


def test_call_any_rpc(cli: Any, unique: Any) -> None:
    r = cli("-o", "json", "call", "WorkflowService/GetWorkflow", "--json", '{"name": "gated"}')
    assert r.code == OK, r.err
    assert r.json()["name"] == "gated"

    email = unique("typed") + "@x.org"
    body = json.dumps({"contact": {"name": "Ty", "email": email, "score": 3}})
    r = cli("-o", "json", "call", "nexus.models.v1.ContactService/CreateContact", "-d", body)
    assert r.code == OK, r.err
    assert r.json()["email"] == email and r.json()["score"] == "3"  # typed int64: a string

    r = cli("-o", "json", "call", "ContactService/GetContact", "-d", json.dumps({"id": "nope"}))
    assert r.code == NOT_FOUND and "RECORD_NOT_FOUND" in r.err
    assert cli("call", "NoSuchService/Nothing").code == USAGE
    assert cli("call", "WorkflowService/Nothing").code == USAGE
    assert cli("call", "WorkflowService/GetWorkflow", "-d", '{"nam": 1}').code == INVALID


def test_call_server_streaming(cli: Any, unique: Any) -> None:
    body = json.dumps(
        {"name": "create_contact", "inputs": {"name": "S", "email": unique("s") + "@x.org"}}
    )
    r = cli("-o", "json", "call", "WorkflowService/StreamExecution", "-d", body)
    assert r.code == OK, r.err
    events = [json.loads(line) for line in r.out.splitlines()]
    assert "execution_started" in events[0]
    assert "execution_completed" in events[-1]


def test_python_dash_m_and_entry_function(cli_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, clients.cli as c; sys.exit(c.main(['--help']))"],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=WAIT,
    )
    assert proc.returncode == OK, proc.stderr
