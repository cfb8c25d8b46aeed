"""A `kill -9`ed `nexus serve` leaves its private folder (`nexus-child-<pid>-*`) behind;
the next start removes it, and never a live server's folder."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from nexus_server._supervisor import DIR_PREFIX

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "contacts_app.py"
#: Seconds a server gets to start (Envoy included) or to stop.
BOUND = 60.0


async def _serve(tmp: Path, db: Path) -> asyncio.subprocess.Process:
    """`nexus serve` with Envoy, its temporary files under `tmp`, once it is ready."""
    env = {**os.environ, "TMPDIR": str(tmp), "NEXUS_DATABASE_URL": f"sqlite:///{db}"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexus_server", "serve", str(APP),
        "--grpc-port", "0", "--api-port", "0", "--no-mcp",
        cwd=tmp.parent, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    async with asyncio.timeout(BOUND):
        while True:
            line = (await proc.stdout.readline()).decode()
            seen.append(line)
            assert line, "".join(seen)
            if "Ctrl-C stops it" in line:
                return proc


def _folders(tmp: Path, pid: int) -> list[Path]:
    return sorted(tmp.glob(f"{DIR_PREFIX}{pid}-*"))


async def test_a_killed_servers_folder_is_removed_at_the_next_start(
    tmp_path: Path, envoy_path: Path
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # a live process's folder (this test's) and a folder of unknown origin: both stay
    live = tmp / f"{DIR_PREFIX}{os.getpid()}-live"
    unknown = tmp / f"{DIR_PREFIX}k2j4h5"
    live.mkdir()
    unknown.mkdir()
    first = await _serve(tmp, tmp_path / "app.db")
    try:
        left = _folders(tmp, first.pid)
        assert len(left) == 1 and (left[0] / "envoy.yaml").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        async with asyncio.timeout(BOUND):
            await first.wait()
    assert left[0].exists()  # nothing cleaned up after a SIGKILL

    second = await _serve(tmp, tmp_path / "app.db")
    try:
        assert not left[0].exists()
        assert live.exists() and unknown.exists()
        assert len(_folders(tmp, second.pid)) == 1
    finally:
        second.send_signal(signal.SIGINT)
        async with asyncio.timeout(BOUND):
            assert await second.wait() == 0
    assert _folders(tmp, second.pid) == []  # a clean stop removes its own folder
