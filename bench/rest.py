"""REST through Envoy beside direct gRPC, measured in the same run.

Serves the example app (`examples/contacts_app.py`, a fresh SQLite file) with
`nexus serve` (Envoy in front), then, for ExecuteWorkflow (`search_contacts`, a read-only
workflow), GetContact and ListContacts (a page of 10; the typed service), at concurrency
1, 16 and 64:

* REST through Envoy with wrk (HTTP/1.1 keep-alive, one request in flight per connection);
* direct gRPC to the server with h2load (one connection per client, one stream each);
* gRPC through Envoy with h2load (the same listener, passed through), for reference.

Prints requests/s and p99 latency for each (the best of `--rounds` alternating rounds),
and the ratio REST / direct gRPC (the target is at least 0.8 at concurrency 16). Needs
`wrk` and `h2load` (Debian: `apt-get install wrk nghttp2-client`). Run:
`.venv/bin/python bench/rest.py` (`--rounds 1` for a shorter run). Every run is bounded
by `--seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# bench/ holds a `grpc.py` benchmark that would shadow the grpc package
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != HERE)]

from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w  # noqa: E402

CONCURRENCY = (1, 16, 64)
RATIO_TARGET = 0.8
TARGET_CONCURRENCY = 16


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def _grpc_frame(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def _serve(tmp: Path) -> tuple[subprocess.Popen[str], str, str]:
    env = {**os.environ, "NEXUS_DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_server", "serve", str(ROOT / "examples/contacts_app.py"),
         "--grpc-port", "0", "--api-port", "0", "--log-level", "warning"],
        cwd=tmp, env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    grpc_addr = api = ""
    deadline = time.monotonic() + 60
    while not api:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("nexus serve did not start")
        line = proc.stdout.readline()
        if m := re.match(r"Nexus gRPC server on (\S+)", line):
            grpc_addr = m.group(1)
        if m := re.match(r"Envoy on http://(\S+)", line):
            api = m.group(1)
    return proc, grpc_addr, api


def _wrk(url: str, body: str | None, conns: int, seconds: float, tmp: Path) -> tuple[float, float]:
    script = tmp / "wrk.lua"
    if body is None:
        script.write_text("")
    else:
        script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(body)}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    out = subprocess.run(
        ["wrk", "-t", str(min(conns, 2)), "-c", str(conns),
         "-d", f"{max(1, round(seconds))}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, timeout=seconds + 30, check=True,
    ).stdout  # fmt: skip
    if "Non-2xx" in out:
        raise SystemExit(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    assert m, out
    p99 = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
    return rps, p99


def _h2load(
    addr: str, path: str, payload: bytes, conns: int, seconds: float, tmp: Path
) -> tuple[float, float]:
    data = tmp / "grpc.bin"
    data.write_bytes(_grpc_frame(payload))
    log = tmp / "h2load.log"
    log.unlink(missing_ok=True)
    run = subprocess.run(
        ["h2load", "-c", str(conns), "-m", "1", "-D", str(max(1, round(seconds))),
         "--warm-up-time", "1", "-d", str(data),
         "-H", "content-type: application/grpc", "-H", "te: trailers",
         "--log-file", str(log), f"http://{addr}{path}"],
        capture_output=True, text=True, timeout=seconds + 30,
    )  # fmt: skip
    if run.returncode != 0:
        raise SystemExit(f"h2load failed:\n{run.stdout}\n{run.stderr}")
    out = run.stdout
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    assert m, out
    if not re.search(r"(\d+) failed, (\d+) errored", out) or re.search(
        r"[1-9]\d* failed|[1-9]\d* errored", out
    ):
        raise SystemExit(f"h2load saw errors:\n{out}")
    times = [int(line.split()[2]) / 1000 for line in log.read_text().splitlines() if line]
    p99 = statistics.quantiles(times, n=100)[98] if len(times) >= 100 else max(times)
    return float(m.group(1)), p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds per figure, best kept"
    )
    args = parser.parse_args()
    for tool in ("wrk", "h2load"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install wrk nghttp2-client")
    with tempfile.TemporaryDirectory(prefix="nexus-bench-") as d:
        tmp = Path(d)
        proc, grpc_addr, api = _serve(tmp)
        try:
            created = _post(
                f"http://{api}/v1/contacts", {"name": "Ada Lovelace", "email": "ada@x.org"}
            )
            for i in range(20):
                _post(f"http://{api}/v1/contacts", {"name": f"Ada {i}", "email": f"a{i}@x.org"})
            inputs: dict[str, Any] = {"query": "ada", "limit": 5}
            exec_body = {"inputs": inputs}
            exec_req = w.ExecuteWorkflowRequest(name="search_contacts")
            exec_req.inputs.update(inputs)
            from nexus_server._discovery import load_app_target

            os.environ.setdefault("NEXUS_DATABASE_URL", f"sqlite:///{tmp / 'unused.db'}")
            app = load_app_target(str(ROOT / "examples/contacts_app.py"))
            from nexus_server._app import _static_files
            from nexus_server._typed import TypedModels

            typed = TypedModels(app.db.models if app.db else (), _static_files())
            get_req = typed.message_class("GetContactRequest")(id=created["id"])
            list_req = typed.message_class("ListContactsRequest")(page_size=10, order_by="email")
            cases = [
                (
                    "ExecuteWorkflow",
                    f"http://{api}/v1/workflows/search_contacts:execute",
                    json.dumps(exec_body),
                    "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow",
                    exec_req.SerializeToString(),
                ),
                (
                    "GetContact",
                    f"http://{api}/v1/contacts/{created['id']}",
                    None,
                    "/nexus.models.v1.ContactService/GetContact",
                    get_req.SerializeToString(),
                ),
                (
                    "ListContacts (10)",
                    f"http://{api}/v1/contacts?page_size=10&order_by=email",
                    None,
                    "/nexus.models.v1.ContactService/ListContacts",
                    list_req.SerializeToString(),
                ),
            ]
            missed: list[str] = []
            print(
                f"nexus serve: gRPC {grpc_addr}, Envoy {api}; best of {args.rounds} alternating "
                f"round(s) of {args.seconds:.0f} s"
            )
            print(
                "| call | concurrency | REST via Envoy req/s | p99 ms | direct gRPC req/s | "
                "p99 ms | REST / gRPC | gRPC via Envoy req/s | p99 ms |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for name, url, body, path, payload in cases:
                for c in CONCURRENCY:
                    _wrk(url, body, c, 1.0, tmp)  # warm up
                    runs: dict[str, list[tuple[float, float]]] = {
                        "rest": [],
                        "direct": [],
                        "via": [],
                    }
                    for _ in range(args.rounds):  # alternating, so drift hits all three alike
                        runs["rest"].append(_wrk(url, body, c, args.seconds, tmp))
                        runs["direct"].append(
                            _h2load(grpc_addr, path, payload, c, args.seconds, tmp)
                        )
                        runs["via"].append(_h2load(api, path, payload, c, args.seconds, tmp))
                    (rest, rest_p99), (direct, direct_p99), (via, via_p99) = (
                        max(runs[k]) for k in ("rest", "direct", "via")
                    )
                    ratio = rest / direct
                    if c == TARGET_CONCURRENCY and ratio < RATIO_TARGET:
                        missed.append(f"{name} at concurrency {c}: {ratio:.2f}")
                    print(
                        f"| {name} | {c} | {rest:,.0f} | {rest_p99:.2f} | {direct:,.0f} | "
                        f"{direct_p99:.2f} | {ratio:.2f} | {via:,.0f} | {via_p99:.2f} |",
                        flush=True,
                    )
            print(
                f"\ntarget: REST / direct gRPC >= {RATIO_TARGET} at concurrency "
                f"{TARGET_CONCURRENCY}: "
                + ("met" if not missed else "MISSED: " + "; ".join(missed))
            )
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
