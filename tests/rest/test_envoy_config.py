"""The Envoy configuration (validated by the real binary), the checked-in example, the
supervisor (ready, restarted when it dies, stopped) and `nexus serve` with Envoy."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

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


def test_nexus_serve_runs_envoy_in_front(envoy_bin: Path, tmp_path: Path) -> None:
    env = {**os.environ, "NEXUS_DATABASE_URL": f"sqlite:///{tmp_path}/app.db"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_server", "serve", str(ROOT / "examples" / "contacts_app.py"),
         "--grpc-port", "0", "--api-port", "0"],
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
            r"Envoy on (http://127\.0\.0\.1:\d+) \(REST, gRPC-Web and gRPC\)", lines[-1]
        )
        assert match, lines
        base = match.group(1)
        resp = httpx.post(
            f"{base}/workflows/create_contact/execute",
            json={"inputs": {"name": "John Doe", "email": "john@example.com"}},
            timeout=WAIT,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["state"] == "STATE_SUCCEEDED"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/v1/workflows", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_nexus_serve_without_envoy(tmp_path: Path) -> None:
    env = {**os.environ, "NEXUS_DATABASE_URL": f"sqlite:///{tmp_path}/app.db"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_server", "serve", str(ROOT / "examples" / "contacts_app.py"),
         "--grpc-port", "0", "--no-envoy"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        assert lines[0].startswith("Nexus gRPC server on"), lines
        assert "Ctrl-C" in lines[3], lines
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        assert "Envoy" not in "".join(lines) + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_unreachable_server_is_a_503_json(envoy_bin: Path, serving: Any) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    sup = EnvoySupervisor(
        merged_descriptor_set(serving.typed),
        EnvoyOptions(grpc_port=dead, api_port=0, services=transcoded_services(serving.typed)),
        ready_timeout=WAIT,
    )

    async def call() -> httpx.Response:
        await sup.start()
        try:
            async with httpx.AsyncClient(timeout=WAIT) as client:
                return await client.get(f"http://127.0.0.1:{sup.api_port}/v1/workflows")
        finally:
            await sup.stop()

    resp = asyncio.run(call())
    assert resp.status_code == 503
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"code", "message", "details"}
    assert body["code"] == 14


def test_nexus_serve_reports_a_busy_api_port(envoy_bin: Path, tmp_path: Path) -> None:
    import socket

    env = {**os.environ, "NEXUS_DATABASE_URL": f"sqlite:///{tmp_path}/app.db"}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "nexus_server", "serve", str(ROOT / "examples/contacts_app.py"),
             "--grpc-port", "0", "--api-port", str(port)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"cannot start Envoy on port {port}" in proc.stderr
    assert "--no-envoy" in proc.stderr
