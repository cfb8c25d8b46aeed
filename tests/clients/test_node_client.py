"""The Node.js client (`clients/node/client.js`) against a real `nexus serve`.

Everything is a real process: `nexus serve examples/contacts_app.py` on an ephemeral port
and a fresh SQLite file, `nexus proto export` writing the `.proto` files, and `node`
running the client, which knows the server only through those files. Skipped when `node`
or the npm packages are missing, except with `CI=true`, where that is a failure.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "contacts_app.py"
CLIENT = ROOT / "clients" / "node" / "client.js"
NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader")

#: Every wait on a process is bounded by this many seconds.
WAIT = 30.0

READY = re.compile(r"Nexus gRPC server on (127\.0\.0\.1:\d+) ")


def _node() -> str:
    """The `node` executable, or skip (fail when CI=true) saying what is missing."""
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "`node` is not on PATH (install Node.js 20)"
    else:
        absent = [p for p in NODE_PACKAGES if not (ROOT / "node_modules" / p).is_dir()]
        if absent:
            missing = f"{', '.join(absent)} not installed in {ROOT / 'node_modules'} (run `npm ci`)"
    if missing is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing}; CI=true, so this is a failure, not a skip")
        pytest.skip(missing)
    assert node is not None
    return node


@pytest.fixture(scope="module")
def node() -> str:
    return _node()


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example app's `.proto` files, as `nexus proto export` writes them."""
    out = tmp_path_factory.mktemp("protos")
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "proto", "export", str(APP), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr
    assert "nexus/models/v1/models.proto" in done.stdout.split()
    return out


def _read_lines(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _serve_options() -> list[str]:
    """`--no-envoy` where `nexus serve` has it: this test is about the gRPC server only, and
    an Envoy on the app's fixed REST port would collide with other tests."""
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    return [o for o in ("--no-envoy", "--no-mcp") if o in done.stdout]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`nexus serve` on the example app, port 0, a fresh SQLite file; yields its address."""
    work = tmp_path_factory.mktemp("server")
    env = {**os.environ, "NEXUS_DATABASE_URL": f"sqlite:///{work / 'app.db'}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nexus_server",
            "serve",
            str(APP),
            "--grpc-port",
            "0",
            "--log-level",
            "warning",
            *_serve_options(),
        ],
        cwd=work,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + WAIT
        address = None
        while address is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"nexus serve did not report its address in {WAIT:.0f} s: {seen}")
            if line is None:
                pytest.fail(f"nexus serve exited with {proc.wait(WAIT)}: {''.join(seen)}")
            seen.append(line)
            match = READY.match(line)
            address = match.group(1) if match else None
        yield address
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(WAIT)


def _run_client(
    node: str, protos: Path, server: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(CLIENT), "--protos", str(protos), "--server", server, "--timeout", "10", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


def test_node_client_executes_a_workflow_and_reads_the_contact_through_the_typed_service(
    node: str, protos: Path, server: str
) -> None:
    done = _run_client(
        node,
        protos,
        server,
        "--name",
        "Ada Lovelace",
        "--email",
        "ada@example.org",
        "--company",
        "Analytical Engines",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)

    execution = result["execution"]
    assert execution["workflow"] == "create_contact"
    assert execution["state"] == "STATE_SUCCEEDED"
    assert execution["error"] is None
    assert execution["inputs"]["name"] == "Ada Lovelace"
    assert execution["inputs"]["email"] == "ada@example.org"
    assert execution["inputs"]["company"] == "Analytical Engines"
    created = execution["outputs"]["create"]
    assert created["name"] == "Ada Lovelace"
    assert created["email"] == "ada@example.org"
    assert created["company"] == "Analytical Engines"
    assert created["score"] == 0
    assert re.fullmatch(r"[0-9a-f]{32}", execution["id"])
    assert re.fullmatch(r"\d+(\.\d{3,9})?s", execution["duration"])

    # the typed ContactService: proto3 JSON style (int64 as a string, RFC 3339 timestamps)
    contact = result["contact"]
    assert contact == {
        "id": created["id"],
        "name": "Ada Lovelace",
        "email": "ada@example.org",
        "company": "Analytical Engines",
        "score": "0",
        "created_at": created["created_at"],
        "updated_at": created["updated_at"],
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3,9})?Z", contact["created_at"])
    assert result["list"] == {"contacts": [contact], "next_page_token": ""}


def test_node_client_leaves_an_unset_optional_field_out(
    node: str, protos: Path, server: str
) -> None:
    done = _run_client(node, protos, server, "--name", "Grace Hopper", "--email", "gh@example.org")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["execution"]["state"] == "STATE_SUCCEEDED"
    contact = result["contact"]
    assert "company" not in contact  # proto3 `optional string company`: no presence, no key
    assert (contact["name"], contact["email"], contact["score"]) == (
        "Grace Hopper",
        "gh@example.org",
        "0",
    )
    assert [c["id"] for c in result["list"]["contacts"]] == [contact["id"]]


def test_node_client_reports_the_grpc_status_and_its_details(
    node: str, protos: Path, server: str
) -> None:
    first = _run_client(node, protos, server, "--name", "Alan", "--email", "alan@example.org")
    assert first.returncode == 0, first.stderr
    again = _run_client(node, protos, server, "--name", "Alan", "--email", "alan@example.org")
    assert again.returncode == 1
    assert again.stdout == ""
    error = json.loads(again.stderr)["error"]
    assert error["method"] == "ExecuteWorkflow"
    assert (error["code"], error["code_name"]) == (6, "ALREADY_EXISTS")
    assert "email" in error["details"]
    info = [d for d in error["status"]["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert len(info) == 1
    assert (info[0]["reason"], info[0]["domain"]) == ("RECORD_ALREADY_EXISTS", "nexus")
    assert info[0]["metadata"]["node_id"] == "create"


def test_node_client_sends_every_struct_value_kind_and_reads_back_field_violations(
    node: str, protos: Path, server: str
) -> None:
    inputs = {"name": 5, "email": "x@example.org", "company": None, "extra": {"a": [1.5, True]}}
    done = _run_client(node, protos, server, "--inputs", json.dumps(inputs))
    assert done.returncode == 1
    error = json.loads(done.stderr)["error"]
    assert (error["method"], error["code_name"]) == ("ExecuteWorkflow", "INVALID_ARGUMENT")
    details = {d["@type"].rsplit(".", 1)[-1]: d for d in error["status"]["details"]}
    assert details["ErrorInfo"]["reason"] == "INPUTS_INVALID"
    # a number arrived as a number (not a string), the nested struct as an unknown input
    assert [v["field"] for v in details["BadRequest"]["field_violations"]] == [
        "inputs.extra",
        "inputs.name",
    ]
    assert "got int 5" in details["BadRequest"]["field_violations"][1]["description"]


def test_node_client_sends_null_for_an_optional_input(node: str, protos: Path, server: str) -> None:
    inputs = {"name": "Null Company", "email": "nc@example.org", "company": None}
    done = _run_client(node, protos, server, "--inputs", json.dumps(inputs))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["execution"]["inputs"] == inputs
    assert result["execution"]["outputs"]["create"]["company"] is None
    assert "company" not in result["contact"]


def test_node_client_exits_with_usage_when_the_protos_are_missing(
    node: str, tmp_path: Path
) -> None:
    done = _run_client(node, tmp_path, "127.0.0.1:1")
    assert done.returncode == 2
    assert "nexus proto export" in done.stderr
