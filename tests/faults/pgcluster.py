"""A throwaway PostgreSQL cluster of the test's own, to take down and bring back.

The outage test must stop a database server mid-load. It never touches the machine's
server (127.0.0.1:5432): it makes a cluster of its own with `initdb` in a temporary
folder, runs it with `pg_ctl` on a free port of 127.0.0.1 (its socket in the same
folder), and removes the folder at the end, always. PostgreSQL refuses to run as
root, so every command runs as the `postgres` OS user (`runuser -u postgres --` when
we are root), in a folder owned by that user.

Loaded by `tests/faults/conftest.py` (tests reach it through fixtures).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["PgCluster", "PgClusterUnavailable", "find_bindir"]

#: Seconds any one pg_ctl or initdb command may take.
COMMAND_TIMEOUT = 60.0
OS_USER = "postgres"


class PgClusterUnavailable(Exception):
    """The machine cannot run a throwaway cluster (no binaries, no postgres user)."""


def find_bindir() -> Path:
    """The folder holding `initdb` and `pg_ctl`: `pg_config --bindir`, else the newest
    /usr/lib/postgresql/*/bin.

    Raises:
        PgClusterUnavailable: neither has both programs.
    """
    candidates: list[Path] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True
        )
        candidates.append(Path(done.stdout.strip()))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: [int(x) for x in Path(p).parent.name.split(".") if x.isdigit()],
        reverse=True,
    )
    candidates.extend(Path(p) for p in versions)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    raise PgClusterUnavailable(
        "initdb/pg_ctl not found (pg_config --bindir, /usr/lib/postgresql/*/bin)"
    )


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (PostgreSQL cannot take 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One cluster: `init()` once, then `start()` / `stop()` as often as needed,
    `remove()` at the end (also when anything failed). Use `running()` for all that.

    Args:
        bindir: where initdb and pg_ctl are (`find_bindir()`).
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.root: Path | None = None
        self._as_root = os.geteuid() == 0
        try:
            self._user = pwd.getpwnam(OS_USER)
        except KeyError:
            if self._as_root:
                raise PgClusterUnavailable(f"no {OS_USER!r} OS user to run PostgreSQL") from None
            self._user = pwd.getpwuid(os.geteuid())

    @property
    def data(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def url(self) -> str:
        """The URL of its `postgres` database (trust authentication, TCP on 127.0.0.1)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_root:
            command = ["runuser", "-u", self._user.pw_name, "--", *command]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, cwd=self.root
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return done

    def init(self) -> None:
        """Create the folder (owned by the postgres user) and the cluster in it."""
        # under /tmp itself: pytest's tmp_path lives in a folder only root may enter
        self.root = Path(tempfile.mkdtemp(prefix="nexus-faults-pg-"))
        os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-instructions", "--no-sync",
        )  # fmt: skip
        settings = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.root}'",
            # a process crash is what the tests make; the OS keeps what was written
            "fsync = off",
            "full_page_writes = off",
            "max_connections = 50",
            "shared_buffers = 32MB",
        ]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# nexus fault tests\n" + "\n".join(settings) + "\n")

    def start(self) -> None:
        """Start the server and wait (bounded) until it accepts connections."""
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-w", "-t", str(int(COMMAND_TIMEOUT)), "start",
        )  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; `immediate` is a crash for the clients (no shutdown packets,
        recovery at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def is_running(self) -> bool:
        return self.root is not None and (self.data / "postmaster.pid").exists()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log (for a failing test's message)."""
        if self.root is None:
            return ""
        with contextlib.suppress(OSError):
            return (self.root / "server.log").read_text(errors="replace")[-chars:]
        return ""

    def remove(self) -> None:
        """Stop the server if it runs and delete its folder."""
        if self.root is None:
            return
        try:
            if self.is_running():
                with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[PgCluster]:
        """A started cluster, removed on exit whatever happened."""
        cluster = cls(find_bindir())
        try:
            cluster.init()
            cluster.start()
            yield cluster
        finally:
            cluster.remove()
