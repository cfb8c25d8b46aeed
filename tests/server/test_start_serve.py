"""`app.start()` and `nexus serve` are one code path (issue 15): every configured channel
(gRPC, Envoy, the MCP adapter) is served, a port set to None turns a channel off, a file
calling `app.start()` at module level is served once by `nexus serve` with its options,
and a start that cannot happen (a busy gRPC port, a database that does not exist) exits
with status 3 and one line. Each case runs as a user runs it: a subprocess."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0

APP = """
from dataflow import DataFlow
from nexus_server import Nexus
from workflow import WorkflowBuilder

app = Nexus({options})
db = DataFlow({url!r})


@db.model
class Contact:
    id: str
    name: str
    email: str


wf = WorkflowBuilder()
wf.add_node("ContactCreateNode", "create", {{"name": "{{{{name}}}}", "email": "{{{{email}}}}"}})
app.register("create_contact", wf.build())
app.start()
print("after start", flush=True)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def write_app(tmp_path: Path, options: str, url: str | None = None) -> Path:
    path = tmp_path / "app.py"
    url = url or f"sqlite:///{tmp_path / 'app.db'}"
    path.write_text(textwrap.dedent(APP.format(options=options, url=url)))
    return path


class Running:
    """A serving subprocess: its banner (read until "Ctrl-C stops it") and its output."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.banner: list[str] = []
        self.err: list[str] = []
        self._err_reader = threading.Thread(target=self._drain_err, daemon=True)
        self._err_reader.start()
        done = threading.Event()

        def read_banner() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.banner.append(line.rstrip("\n"))
                if "Ctrl-C stops it" in line:
                    break
            done.set()

        threading.Thread(target=read_banner, daemon=True).start()
        if not done.wait(WAIT) or not self.banner or "Ctrl-C" not in self.banner[-1]:
            self.proc.kill()
            raise AssertionError(f"no banner: {self.banner} {''.join(self.err)[-2000:]}")

    def _drain_err(self) -> None:
        assert self.proc.stderr is not None
        self.err.extend(self.proc.stderr)

    def line(self, prefix: str) -> str:
        found = [line for line in self.banner if line.startswith(prefix)]
        assert len(found) == 1, self.banner
        return found[0]

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        """Stop the process; its exit code and what it printed after the banner. Its
        stderr is all in `err` on return (read by one reader only: `communicate` would
        race `_drain_err` for it)."""
        self.proc.send_signal(sig)
        self.proc.wait(timeout=WAIT)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()  # it ended: the rest is in the pipe, then EOF
        self._err_reader.join(WAIT)
        assert not self._err_reader.is_alive(), "stderr still open after the process ended"
        return self.proc.returncode, out


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for r in started:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait(timeout=WAIT)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


@pytest.mark.timeout(150)
def test_app_start_serves_every_channel_and_sigterm_stops_them(
    tmp_path: Path, running: list[Running]
) -> None:
    app = write_app(tmp_path, "grpc_port=0, api_port=0, mcp_port=0")
    r = Running([sys.executable, str(app)], tmp_path)
    running.append(r)
    assert r.line("Nexus gRPC server on 127.0.0.1:")
    envoy = r.line("Envoy on http://127.0.0.1:").split()[2]
    mcp = r.line("MCP adapter on http://127.0.0.1:").split()[3]
    assert "  models:    Contact" in r.banner  # integrated without integrate_dataflow
    with httpx.Client(timeout=WAIT) as client:
        done = client.post(
            f"{envoy}/workflows/create_contact/execute",
            json={"inputs": {"name": "Ada", "email": "ada@example.com"}},
        )
        assert done.status_code == 200, done.text
        assert done.json()["outputs"]["create"]["email"] == "ada@example.com"
        listed = client.get(f"{envoy}/v1/contacts")
        assert listed.status_code == 200 and len(listed.json()["contacts"]) == 1
        # any HTTP answer: a bare GET is not an MCP call, but the endpoint is there
        assert client.get(mcp).status_code < 500
    kids = _children(r.proc.pid)
    assert len(kids) == 2, kids  # Envoy and the MCP adapter
    code, out = r.stop(signal.SIGTERM)
    assert code == 0, "".join(r.err)[-2000:]
    assert "after start" in out  # start() returned after the stop
    assert not [k for k in kids if Path(f"/proc/{k}").exists()]
    assert not (tmp_path / "nexus.db").exists()


def test_ports_set_to_none_turn_channels_off(tmp_path: Path, running: list[Running]) -> None:
    app = write_app(tmp_path, "grpc_port=0, api_port=None, mcp_port=None")
    r = Running([sys.executable, str(app)], tmp_path)
    running.append(r)
    assert not [line for line in r.banner if line.startswith(("Envoy", "MCP"))], r.banner
    assert _children(r.proc.pid) == []
    code, _ = r.stop()
    assert code == 0


def test_nexus_serve_serves_a_module_level_start_once_with_its_options(
    tmp_path: Path, running: list[Running]
) -> None:
    """The app's own ports would serve gRPC only: `nexus serve --api-port 0` shows the
    command's options were used, and that the import did not serve first (it would
    block there)."""
    app = write_app(tmp_path, "grpc_port=0, api_port=None, mcp_port=None")
    r = Running(
        [sys.executable, "-m", "nexus_server", "serve", str(app), "--api-port", "0"], tmp_path
    )
    running.append(r)
    assert r.line("Envoy on http://127.0.0.1:")
    assert sum(line.startswith("Nexus gRPC server on") for line in r.banner) == 1
    code, out = r.stop()  # one Ctrl-C stops it
    assert code == 0, "".join(r.err)[-2000:]
    assert "Nexus gRPC server on" not in out  # not served a second time


def _busy_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("how", ["python", "serve"])
def test_a_busy_grpc_port_is_one_line_and_exit_3(tmp_path: Path, how: str) -> None:
    sock, port = _busy_port()
    with sock:
        app = write_app(tmp_path, f"grpc_port={port}, api_port=None, mcp_port=None")
        argv = (
            [sys.executable, str(app)]
            if how == "python"
            else [sys.executable, "-m", "nexus_server", "serve", str(app)]
        )
        done = subprocess.run(
            argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=WAIT
        )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("nexus:")]
    assert lines == [f"nexus: cannot start gRPC on port {port}: 127.0.0.1:{port} is in use "
                     "(or not an address of this host)"], done.stderr  # fmt: skip
    assert "--grpc-port" in done.stderr
    assert "Nexus gRPC server on" not in done.stdout


def test_a_database_that_does_not_exist_is_one_line_and_exit_3(tmp_path: Path, pg_url: str) -> None:
    base, _, _ = pg_url.rpartition("/")
    url = f"{base}/nexus_missing_{secrets.token_hex(6)}"
    app = write_app(tmp_path, "grpc_port=0, api_port=None, mcp_port=None", url)
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "serve", str(app)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("nexus:")]
    assert len(lines) == 1, done.stderr
    assert "cannot open the database" in lines[0] and "does not exist" in lines[0]
    assert f"cannot open the database {url}:" in lines[0]  # the URL as written


def test_skip_migration_against_an_empty_database_warns_at_start(
    tmp_path: Path, running: list[Running]
) -> None:
    path = tmp_path / "app.py"
    write_app(tmp_path, "grpc_port=0, api_port=None, mcp_port=None")
    path.write_text(
        path.read_text().replace(
            "db = DataFlow(",
            "db = DataFlow(auto_migrate=False, skip_migration=True, database_url=",
        )
    )
    r = Running([sys.executable, "-m", "nexus_server", "serve", str(path)], tmp_path)
    running.append(r)
    code, _ = r.stop()
    assert code == 0
    warned = [line for line in r.err if "table 'contact' does not exist" in line]
    assert len(warned) == 1, r.err
    assert "skip_migration=True" in warned[0] and "auto_migrate=True" in warned[0]


def test_nexus_openapi_sees_the_dataflow_the_workflows_use(tmp_path: Path) -> None:
    """The commands that export an app's contracts integrate its DataFlow the way start
    does (and load a file calling `app.start()` without serving it)."""
    app = write_app(tmp_path, "grpc_port=0")
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "openapi", str(app)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=WAIT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert '"/v1/contacts"' in done.stdout
    assert "after start" in done.stdout  # the module ran on past its start()
