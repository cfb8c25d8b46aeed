"""The Envoy configuration (validated by the real binary), the checked-in example, the
supervisor (ready, restarted when it dies, stopped) and `nexus serve` with Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from nexus_api import descriptor_set_bytes
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as w
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wg
from nexus_server import _envoy
from nexus_server._envoy import (
    EnvoyError,
    EnvoyOptions,
    EnvoySupervisor,
    envoy_config,
    merged_descriptor_set,
    render_yaml,
    transcoded_services,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "envoy" / "envoy.example.yaml"
WAIT = 15.0


def _validate(envoy: Path, config: Path) -> None:
    proc = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout + proc.stderr


def _nexus(*args: str, cwd: Path = ROOT, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus_server", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        **kw,
    )


def _wait_until(pred: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still "exists": read its state
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(") ", 1)[1][0] != "Z"


@pytest.fixture
def envoy_bin(running: Any) -> Path:
    sup = running._ready.result(0).envoy
    assert sup is not None
    return Path(sup.binary)


def test_generated_configs_pass_envoy_validate(
    envoy_bin: Path, serving: Any, tmp_path: Path
) -> None:
    descriptor = merged_descriptor_set(serving.typed)
    services = transcoded_services(serving.typed)
    for name, options in {
        "embedded": EnvoyOptions(services=services, cors_origins=("*", "https://a.example")),
        "path": EnvoyOptions(
            services=services,
            descriptor_path=str(tmp_path / "nexus.binpb"),
            grpc_host="nexus-server",
            grpc_address_is_dns=True,
        ),
    }.items():
        (tmp_path / "nexus.binpb").write_bytes(descriptor)
        config = tmp_path / f"{name}.yaml"
        config.write_text(render_yaml(envoy_config(descriptor, options)))
        _validate(envoy_bin, config)


def test_the_checked_in_example_is_up_to_date_and_valid(envoy_bin: Path, tmp_path: Path) -> None:
    out = _nexus("envoy-config", "examples/contacts_app.py").stdout
    assert out == EXAMPLE.read_text(), (
        "envoy/envoy.example.yaml is stale: run "
        "`nexus envoy-config examples/contacts_app.py > envoy/envoy.example.yaml`"
    )
    _nexus("proto", "export", str(ROOT / "examples" / "contacts_app.py"), "--out", str(tmp_path))
    config = tmp_path / "envoy.yaml"
    config.write_text(out.replace("/etc/envoy/nexus.binpb", str(tmp_path / "nexus.binpb")))
    _validate(envoy_bin, config)


def test_envoy_config_embeds_the_descriptor_on_request(envoy_bin: Path, tmp_path: Path) -> None:
    out = _nexus(
        "envoy-config", "examples/contacts_app.py", "--embed-descriptor", "--api-port", "9000",
        "--cors-origin", "https://a.example",
    ).stdout  # fmt: skip
    assert "proto_descriptor_bin:" in out
    assert "port_value: 9000" in out
    assert "https://a.example" in out
    config = tmp_path / "envoy.yaml"
    config.write_text(out)
    _validate(envoy_bin, config)


def test_the_supervisor_restarts_envoy_when_it_dies(run_app: Any) -> None:
    running = run_app()
    info = running._ready.result(0)
    sup: EnvoySupervisor = info.envoy
    first = sup.pid
    assert first is not None
    url = f"http://{info.api_address}/v1/workflows"
    assert httpx.get(url, timeout=WAIT).status_code == 200
    os.kill(first, signal.SIGKILL)
    _wait_until(lambda: sup.restarts == 1, "Envoy to be restarted")
    assert sup.pid != first
    assert sup.api_port == info.api_port  # the same port again
    assert httpx.get(url, timeout=WAIT).status_code == 200
    last = sup.pid
    assert last is not None
    running.stop()
    _wait_until(lambda: not _alive(last), "Envoy to stop")


def test_a_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEXUS_ENVOY_BIN", "/nonexistent/envoy")
    with pytest.raises(EnvoyError, match="Envoy binary was not found"):
        EnvoySupervisor(b"", EnvoyOptions())


def test_envoy_that_cannot_start_fails_startup_with_its_log(envoy_bin: Path, serving: Any) -> None:
    busy = serving.api_port  # already taken by the session's Envoy
    sup = EnvoySupervisor(
        merged_descriptor_set(serving.typed),
        EnvoyOptions(api_port=busy, services=transcoded_services(serving.typed)),
        ready_timeout=WAIT,
    )

    async def start() -> None:
        try:
            await sup.start()
        finally:
            await sup.stop()

    with pytest.raises(EnvoyError, match="Envoy exited"):
        asyncio.run(start())


def _serve_with_envoy(tmp_path: Path, *options: str) -> tuple[subprocess.Popen[str], str]:
    """`nexus serve` of the example app with Envoy in front; returns the process once it
    printed Envoy's address, and that address (the caller stops the process)."""
    env = {**os.environ, "NEXUS_DATABASE_URL": f"sqlite:///{tmp_path}/app.db"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_server", "serve", str(ROOT / "examples" / "contacts_app.py"),
         "--grpc-port", "0", "--api-port", "0", "--no-mcp", *options],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("Envoy on") for line in lines):
            assert time.monotonic() < deadline
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            lines.append(line)
        assert lines[0].startswith("Nexus gRPC server on 127.0.0.1:")
        match = re.match(
            r"Envoy on (http://127\.0\.0\.1:\d+) \(REST, gRPC-Web, Connect and gRPC\)", lines[-1]
        )
        assert match, lines
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, match.group(1)


def test_nexus_serve_runs_envoy_in_front(envoy_bin: Path, tmp_path: Path) -> None:
    proc, base = _serve_with_envoy(tmp_path, "--cors-origin", "https://a.example")
    try:
        resp = httpx.post(
            f"{base}/workflows/create_contact/execute",
            json={"inputs": {"name": "John Doe", "email": "john@example.com"}},
            timeout=WAIT,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["state"] == "STATE_SUCCEEDED"
        # --cors-origin reached Envoy: a browser preflight from that origin is allowed
        for origin, allowed in [("https://a.example", True), ("https://b.example", False)]:
            pre = httpx.options(
                f"{base}/v1/workflows",
                headers={"origin": origin, "access-control-request-method": "GET"},
                timeout=WAIT,
            )
            assert (pre.headers.get("access-control-allow-origin") == origin) is allowed
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/v1/workflows", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed but not yet reaped by init, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_envoy_stops_when_nexus_serve_is_killed(envoy_bin: Path, tmp_path: Path) -> None:
    """SIGKILL leaves `nexus serve` no chance to stop Envoy: Linux does it (the
    parent-death signal), so no Envoy is left holding the port."""
    proc, base = _serve_with_envoy(tmp_path)
    envoys: list[int] = []
    try:
        assert httpx.get(f"{base}/v1/workflows", timeout=WAIT).status_code == 200
        envoys = [c for c in _children(proc.pid) if "envoy" in Path(f"/proc/{c}/comm").read_text()]
        assert len(envoys) == 1, _children(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _alive(envoys[0]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(envoys[0]), "Envoy outlived the killed server"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/v1/workflows", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in envoys:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_nexus_serve_refuses_cors_without_envoy(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "serve", str(ROOT / "examples" / "contacts_app.py"),
         "--no-envoy", "--cors-origin", "https://a.example"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--cors-origin goes with Envoy" in done.stderr


def test_nexus_serve_without_envoy(tmp_path: Path) -> None:
    env = {**os.environ, "NEXUS_DATABASE_URL": f"sqlite:///{tmp_path}/app.db"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_server", "serve", str(ROOT / "examples" / "contacts_app.py"),
         "--grpc-port", "0", "--no-envoy", "--no-mcp"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(5)]
        assert lines[0].startswith("Nexus gRPC server on"), lines
        assert "Ctrl-C" in lines[4], lines
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert "Envoy" not in "".join(lines) + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_grpc_server_down_behind_a_running_envoy(run_app: Any, status_body: Any) -> None:
    """REST gets a JSON SERVER_UNAVAILABLE; gRPC and gRPC-Web get a plain gRPC status
    (`grpc-status` UNAVAILABLE, Envoy's text as `grpc-message`), never JSON."""
    app = run_app(envoy=False)
    info = app._ready.result(0)
    sup = EnvoySupervisor(
        merged_descriptor_set(info.typed),
        EnvoyOptions(grpc_port=info.port, api_port=0, services=transcoded_services(info.typed)),
        ready_timeout=WAIT,
    )
    payload = w.ListWorkflowsRequest().SerializeToString()
    grpc_web = {
        "content": b"\x00" + struct.pack(">I", len(payload)) + payload,
        "headers": {"content-type": "application/grpc-web+proto", "x-grpc-web": "1"},
    }

    def grpc_call(address: str) -> grpc.RpcError:
        with grpc.insecure_channel(address) as channel:
            stub = wg.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]
            try:
                stub.ListWorkflows(w.ListWorkflowsRequest(), timeout=WAIT)
            except grpc.RpcError as exc:
                return exc
        raise AssertionError("ListWorkflows succeeded with the server down")

    async def scenario() -> tuple[httpx.Response, httpx.Response, grpc.RpcError]:
        await sup.start()
        try:
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{sup.api_port}", timeout=WAIT
            ) as client:
                up = await client.get("/v1/workflows")
                assert up.status_code == 200, up.text
                await asyncio.to_thread(app.stop)  # the gRPC server; Envoy keeps running
                rest = await client.get("/v1/workflows")
                web = await client.post(
                    "/nexus.workflow.v1.WorkflowService/ListWorkflows", **grpc_web
                )
            failed = await asyncio.to_thread(grpc_call, f"127.0.0.1:{sup.api_port}")
            return rest, web, failed
        finally:
            await sup.stop()

    rest, web, failed = asyncio.run(scenario())
    # 503 when Envoy cannot connect; 502 if the connection broke during the call
    assert rest.status_code in (502, 503), rest.text
    assert rest.headers["content-type"] == "application/json"
    status_body(rest.json(), 14, "SERVER_UNAVAILABLE", gateway=True)

    assert web.headers["content-type"] == "application/grpc-web+proto"
    assert web.headers["grpc-status"] == str(grpc.StatusCode.UNAVAILABLE.value[0])
    assert web.headers["grpc-message"] and not web.headers["grpc-message"].startswith("{")

    assert failed.code() == grpc.StatusCode.UNAVAILABLE
    assert failed.details() and not failed.details().startswith("{"), failed.details()
    assert "grpc-status-details-bin" not in dict(failed.trailing_metadata() or ())


def _raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as is and read the response (Envoy closes the connection after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def _silent_upstream_call(port: int, call: Any) -> Any:
    """Run `call(api_port)` against an Envoy whose gRPC server accepts connections and
    never answers."""
    sup = EnvoySupervisor(
        descriptor_set_bytes(), EnvoyOptions(grpc_port=port, api_port=0), ready_timeout=WAIT
    )

    async def run() -> Any:
        await sup.start()
        try:
            assert sup.api_port is not None
            return await asyncio.to_thread(call, sup.api_port)
        finally:
            await sup.stop()

    return asyncio.run(run())


def test_stalled_calls_are_gateway_timeouts(
    envoy_bin: Path, monkeypatch: pytest.MonkeyPatch, status_body: Any
) -> None:
    """A call the gRPC server never answers ends at Envoy's stream idle timeout (an
    hour; shortened here) with 504; a request whose body never arrives ends at the
    request timeout (60 s; shortened here) with 408, while the idle timeout is long:
    both GATEWAY_TIMEOUT, never a stream left hanging."""
    stalled_post = (
        b"POST /v1/workflows HTTP/1.1\r\nhost: nexus\r\n"
        b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{"
    )
    with socket.socket() as silent:  # the kernel accepts connections; nothing answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]

        monkeypatch.setattr(_envoy, "STREAM_IDLE_TIMEOUT", "0.3s")
        unanswered = _silent_upstream_call(
            port, lambda api: httpx.get(f"http://127.0.0.1:{api}/v1/workflows", timeout=WAIT)
        )
        monkeypatch.setattr(_envoy, "STREAM_IDLE_TIMEOUT", "3600s")
        monkeypatch.setattr(_envoy, "REQUEST_TIMEOUT", "0.5s")
        status, headers, body = _silent_upstream_call(
            port, lambda api: _raw_http(api, stalled_post)
        )
    assert unanswered.status_code == 504, unanswered.text
    assert unanswered.headers["content-type"] == "application/json"
    status_body(unanswered.json(), 4, "GATEWAY_TIMEOUT", gateway=True)
    assert status == 408, body
    assert headers["content-type"] == "application/json"
    status_body(json.loads(body), 4, "GATEWAY_TIMEOUT", gateway=True)


def test_nexus_serve_reports_a_busy_api_port(envoy_bin: Path, tmp_path: Path) -> None:
    env = {**os.environ, "NEXUS_DATABASE_URL": f"sqlite:///{tmp_path}/app.db"}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "nexus_server", "serve", str(ROOT / "examples/contacts_app.py"),
             "--grpc-port", "0", "--api-port", str(port), "--no-mcp"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"cannot start Envoy on port {port}" in proc.stderr
    assert "--no-envoy" in proc.stderr
