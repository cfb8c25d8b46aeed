"""Supervised child processes: Envoy in front of the server, the MCP adapter beside it.

`Supervisor` runs one child: it starts it with its output in a private log file, waits
until it is ready, restarts it whenever it exits (after 0.2 s, doubling up to 5 s while
it keeps failing quickly; a run of 10 s or more starts the delays over) and stops it on
`stop()` (SIGTERM, then SIGKILL after a grace period). On Linux the child also gets
SIGTERM if this process dies without stopping it (killed with SIGKILL, say), so it
never outlives the server holding its port; the private directory such a death leaves
behind (named after the server's pid) is removed by the next start. A subclass says
what to run and how to tell it is ready.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

__all__ = ["DIR_PREFIX", "Supervisor", "SupervisorError", "remove_stale_dirs"]

_log = logging.getLogger("nexus_server")

#: Restart delays: the first, the longest, and how long a run must last for the next
#: failure to count as new rather than as part of a crash loop.
FIRST_DELAY = 0.2
MAX_DELAY = 5.0
STABLE_AFTER = 10.0
#: Seconds a child gets to exit after SIGTERM before it is killed.
STOP_GRACE = 10.0
#: Private directories are named `nexus-child-<pid of the server>-<random>`, so that a
#: later start can tell the folders of a server that died without cleaning up.
DIR_PREFIX = "nexus-child-"
_DIR_NAME = re.compile(re.escape(DIR_PREFIX) + r"(\d+)-")


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_dirs(parent: Path | None = None) -> list[Path]:
    """Remove the private directories that dead servers left behind (killed with
    SIGKILL: no `stop()` ran). Only our user's folders whose owning pid no longer
    exists are removed; a live server's folder is never touched. Returns them."""
    root = Path(parent or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        candidates = list(root.glob(DIR_PREFIX + "*"))
    except OSError:
        return removed
    uid = os.getuid()
    for path in candidates:
        match = _DIR_NAME.match(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            st = path.lstat()
        except OSError:
            continue
        if st.st_uid != uid or not path.is_dir() or path.is_symlink():
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


@functools.cache
def _setpriv() -> str | None:
    """util-linux's `setpriv`, if it can give a child a parent-death signal (Linux).

    The child is started as `setpriv --pdeathsig TERM -- command...`: setpriv sets the
    signal and execs the command in the same process, so the child gets SIGTERM when
    this process dies, even by SIGKILL (no `stop()` runs then). Setting it ourselves
    between fork and exec (`preexec_fn`) would run Python in the child of a process
    with gRPC's threads, and forces a fork that gRPC warns about on every start.
    """
    if not sys.platform.startswith("linux"):
        return None
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        done = subprocess.run(
            [path, "--help"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if "--pdeathsig" in done.stdout else None


class SupervisorError(RuntimeError):
    """A child could not be started (the message ends with its own output)."""


class Supervisor(abc.ABC):
    """One supervised child process.

    Args:
        name: what the child is, in messages ("Envoy", "MCP adapter").
        ready_timeout: seconds a launch gets to become ready.
    """

    #: The error `start` raises (a subclass of SupervisorError).
    error: type[SupervisorError] = SupervisorError
    #: The child writes to this process's standard output and error instead of a log
    #: file of its own (`log_tail` is then empty: its output was shown already).
    inherit_output = False

    def __init__(self, name: str, *, ready_timeout: float) -> None:
        self.name = name
        self.ready_timeout = ready_timeout
        self.restarts = 0
        #: seconds the child gets to exit after SIGTERM before it is killed
        self.stop_grace = STOP_GRACE
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._launched_at = 0.0
        self._watch: asyncio.Task[None] | None = None

    # -- what a subclass provides ---------------------------------------------------

    @abc.abstractmethod
    def command(self, workdir: Path) -> list[str]:
        """The command line of the next launch (`workdir` is the child's private
        directory, kept across restarts: config files go there)."""

    @abc.abstractmethod
    async def probe(self, log_offset: int) -> bool:
        """Whether this launch is ready (`log_offset`: where its output starts in
        `log_path`). Called every 50 ms until it is, or until `ready_timeout`."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """Where the child serves (for messages)."""

    def environment(self) -> dict[str, str] | None:
        """The environment of the next launch (None: this process's)."""
        return None

    def exited(self, pid: int, code: int) -> None:
        """Called when a launch (process `pid`) has exited with `code`, whether it died
        or was stopped (a subclass cleans up after it)."""
        _log.debug("%s (pid %d) exited with %s", self.name, pid, code)

    # -- running it ------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def workdir(self) -> Path:
        assert self._dir is not None, "not started"
        return Path(self._dir.name)

    @property
    def log_path(self) -> Path:
        return self.workdir / "output.log"

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the child and wait until it is ready (raises `error` if it is not)."""
        for path in await asyncio.to_thread(remove_stale_dirs):
            _log.info("removed %s, left behind by a server that no longer runs", path.name)
        self._dir = tempfile.TemporaryDirectory(prefix=f"{DIR_PREFIX}{os.getpid()}-")
        try:
            await self._launch()
        except BaseException:
            await self.stop()
            raise
        self._watch = asyncio.create_task(self._supervise(), name=f"supervise {self.name}")

    async def _launch(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = self.command(self.workdir)
        setpriv = await asyncio.to_thread(_setpriv)  # cached after the first call
        if setpriv is not None:  # and if we are killed outright, Linux stops the child
            argv = [setpriv, "--pdeathsig", "TERM", "--", *argv]
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=None if self.inherit_output else log,
                stderr=None if self.inherit_output else log,
                start_new_session=True,  # Ctrl-C reaches us; we stop the child ourselves
                env=self.environment(),
            )
        self._launched_at = time.monotonic()
        try:
            await self._wait_ready(offset)
        except BaseException:
            await self._terminate()
            raise

    async def _wait_ready(self, offset: int) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if proc.returncode is not None:
                raise self.error(f"{self.name} exited with {proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise self.error(
                    f"{self.name} was not ready within {self.ready_timeout:.0f} s: "
                    f"{self.log_tail()}"
                )
            if await self.probe(offset):
                return
            await asyncio.sleep(0.05)

    async def _supervise(self) -> None:
        """Restart the child whenever it exits, backing off while it keeps failing."""
        delay = FIRST_DELAY
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            self.exited(self._proc.pid, code)
            if time.monotonic() - self._launched_at >= STABLE_AFTER:
                delay = FIRST_DELAY  # it ran for a while: not a crash loop
            _log.error("%s exited with %s; restarting it: %s", self.name, code, self.log_tail())
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)
                try:
                    await self._launch()
                except (SupervisorError, OSError) as exc:
                    _log.error("%s restart failed: %s", self.name, exc)
                    continue
                break
            self.restarts += 1
            _log.info("%s restarted on %s (pid %s)", self.name, self.address, self.pid)

    def health(self) -> dict[str, Any]:
        """The child's state for the health document (`_probes.HealthComponents`):
        healthy while it runs (a restart in progress is not), and how often it was
        restarted."""
        proc = self._proc
        running = self._watch is not None and proc is not None and proc.returncode is None
        return {"status": "healthy" if running else "unhealthy", "restarts": self.restarts}

    def log_tail(self, lines: int = 20) -> str:
        """The end of the child's output (for error messages)."""
        if self._dir is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(self.stop_grace):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self.exited(proc.pid, await proc.wait())

    async def stop(self) -> None:
        """Stop the child (and stop restarting it)."""
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        await self._terminate()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
