"""`nexus serve APP --workers N`: every core of one machine.

One server process answers calls on one core (its event loop); N worker processes
answer N at a time. The process `nexus serve` starts (the parent) serves no call itself:

- it reserves the ports first: the app's `grpc_port`, which every worker shares through
  SO_REUSEPORT (the kernel spreads the connections of clients that connect straight to
  it), and one port per worker, which Envoy balances between (least request). The
  parent holds each port with a bound socket that never listens (so it never gets a
  connection), for as long as it runs: a worker restarted after a crash gets its port
  back, and no other program can take one in between;
- it starts the workers, each `nexus serve APP --no-envoy --no-mcp` on its own port,
  with the shared port and its index in the environment (`configure_worker`): the first
  alone (it creates the tables), then the others together; and supervises them
  (`_supervisor.Supervisor`: restarted with backoff when they exit);
- it runs the one Envoy (REST, gRPC-Web, Connect and gRPC on `api_port`, every worker as an
  endpoint), the one MCP adapter (a client of the shared port) and the one metrics port:
  the workers keep their metrics in prometheus_client's multi-process files, in a
  private directory the parent creates and removes, and the parent's `GET /metrics`
  answers their sum (a dead worker's in-flight gauges are dropped with
  `mark_process_dead`);
- on SIGINT/SIGTERM it stops the MCP adapter, then every worker at once (each lets its
  calls in flight finish within `grace_period`, with Envoy still up for the calls it
  carries), then Envoy. It exits with 0 when every worker stopped cleanly.

Each worker reports itself in the health document, as the component
`worker: {"status": "healthy", "index": i, "pid": ...}`: which process answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._app import GrpcPortError, MetricsPortError, Nexus, _local
from ._supervisor import DIR_PREFIX, Supervisor, SupervisorError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from threading import Thread
    from wsgiref.simple_server import WSGIServer

__all__ = [
    "ENV_INDEX",
    "ENV_SHARED_PORT",
    "WorkerError",
    "check_shareable",
    "configure_worker",
    "parse_workers",
    "serve_workers",
]

#: The environment of a worker: its index (0..N-1) and the port all workers share.
ENV_INDEX = "NEXUS_WORKER_INDEX"
ENV_SHARED_PORT = "NEXUS_WORKER_SHARED_PORT"
#: prometheus_client's multi-process directory (read when it is first imported).
ENV_METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: Seconds a worker gets to become ready (it opens the database and migrates).
READY_TIMEOUT = 60.0
#: Seconds past the app's grace_period before a worker that does not stop is killed.
STOP_MARGIN = 5.0
#: Attempts at reserving a set of ports for a wildcard or two-address host.
_RESERVE_ATTEMPTS = 10


class WorkerError(RuntimeError):
    """The workers could not be started (the message says which and why)."""


def parse_workers(value: str) -> int:
    """`--workers`: a whole number of 1 or more, or `auto` (the number of CPUs)."""
    if value.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"expects a whole number of 1 or more, or auto (the number of CPUs); got {value[:40]!r}"
        )
    return n


def check_shareable(app: Nexus, workers: int) -> None:
    """Refuse what N processes cannot share: state an app keeps in process memory
    that would then differ from worker to worker.

    Raises:
        ValueError: an in-memory SQLite database (each worker would have its own), an
            in-memory DataFlow query cache (a write through one worker would not end
            another's cached reads), or rate limits kept in memory (each worker would
            allow the whole limit).
    """
    db = app.resolve_dataflow()
    if db is not None and db.dialect == "sqlite":
        from sqlalchemy.engine import make_url

        url = make_url(db.url)
        if url.database in (None, "", ":memory:") or "memory" in str(url.query):
            raise ValueError(
                f"--workers {workers}: the app's database is a SQLite database in memory, "
                "which each worker would have to itself; use a file (sqlite:///app.db) or "
                "PostgreSQL"
            )
    cache = db.cache if db is not None else None
    if cache is not None and cache.backend == "memory":
        raise ValueError(
            f"--workers {workers}: DataFlow(enable_caching=True) keeps its cache in each "
            "process, and a write through one worker would not end another's cached "
            "reads; share it with DataFlow(cache_url='redis://host:port/db'), or serve "
            "with one worker"
        )
    if not app.rate_limits().empty and app.rate_limit_backend in (None, "memory"):
        raise ValueError(
            f"--workers {workers}: rate limits kept in memory would be kept by each "
            f"worker ({workers} times the limit in all); share them with "
            "Nexus(rate_limit_backend='redis://host:port/db'), or serve with one worker"
        )


def configure_worker(app: Nexus, environ: Mapping[str, str] | None = None) -> bool:
    """In a worker that `serve_workers` started, make `app` one: gRPC only (the parent
    runs Envoy, the MCP adapter and the metrics port), on the shared port as well, and
    a `worker` component in its health document. Returns whether this is a worker."""
    env = os.environ if environ is None else environ
    index = env.get(ENV_INDEX)
    if index is None:
        return False
    app._shared_port = int(env[ENV_SHARED_PORT])
    app.api_port = None
    app.mcp_port = None
    app.expose_metrics = False
    app.metrics_port = None
    pid = os.getpid()
    app.health.add("worker", lambda: {"status": "healthy", "index": int(index), "pid": pid})
    return True


# -- ports ------------------------------------------------------------------------------


def _addresses(host: str, port: int) -> list[tuple[int, Any]]:
    """The (family, address) pairs gRPC would bind for `host`."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise GrpcPortError(f"cannot serve on {host!r}: {exc.strerror}") from None
    seen: list[tuple[int, Any]] = []
    for family, _, _, _, address in infos:
        if (family, address) not in seen:
            seen.append((family, address))
    return seen


def _held(family: int, address: Any) -> socket.socket:
    """A socket bound to `address` with SO_REUSEPORT that never listens: it holds the
    port for the workers (who bind it with SO_REUSEPORT too) and gets no connection."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _free(family: int, address: Any) -> None:
    """Raise OSError when another program listens on `address` (a plain bind fails)."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address)


def reserve_port(host: str, port: int) -> tuple[int, list[socket.socket]]:
    """Hold `port` (0: a free one) on every address of `host`; returns the port and
    the sockets holding it (close them to release it).

    Raises:
        GrpcPortError: the port is in use (or `host` is not an address of this host).
    """
    for _ in range(_RESERVE_ATTEMPTS):
        held: list[socket.socket] = []
        chosen = port
        try:
            for family, address in _addresses(host, port):
                address = (address[0], chosen, *address[2:])
                if port:
                    _free(family, address)  # another program's port is refused, not shared
                sock = _held(family, address)
                held.append(sock)
                chosen = sock.getsockname()[1]
            return chosen, held
        except OSError:
            for sock in held:
                sock.close()
            if port:
                raise GrpcPortError(
                    f"cannot start gRPC on port {port}: {host}:{port} is in use (or not an "
                    "address of this host)"
                ) from None
            # a free port on the first address was taken on another one: try another
    raise GrpcPortError(f"cannot find a free port on every address of {host!r}")


# -- the workers --------------------------------------------------------------------------


class WorkerProcess(Supervisor):
    """One worker: `nexus serve APP --no-envoy --no-mcp` on its own port (and the shared
    one), ready when its gRPC health service says SERVING. Its output is this process's.
    """

    error = SupervisorError
    inherit_output = True

    def __init__(
        self,
        target: str,
        *,
        index: int,
        host: str,
        port: int,
        shared_port: int,
        metrics_dir: str,
        log_level: str,
        grace_period: float,
        loop: str = "auto",
    ) -> None:
        super().__init__(f"worker {index}", ready_timeout=READY_TIMEOUT)
        self.target = target
        self.index = index
        self.host = host
        self.port = port
        self.shared_port = shared_port
        self.metrics_dir = metrics_dir
        self.log_level = log_level
        self.loop = loop
        self.stop_grace = grace_period + STOP_MARGIN
        #: the exit code of the last launch once it exited, else None
        self.exit_code: int | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self, workdir: Path) -> list[str]:
        return [
            sys.executable, "-m", "nexus_server", "serve", self.target,
            "--host", self.host, "--grpc-port", str(self.port),
            "--no-envoy", "--no-mcp", "--log-level", self.log_level, "--loop", self.loop,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            ENV_INDEX: str(self.index),
            ENV_SHARED_PORT: str(self.shared_port),
            ENV_METRICS_DIR: self.metrics_dir,
        }

    async def probe(self, log_offset: int) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with grpc.aio.insecure_channel(f"{_local(self.host)}:{self.port}") as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
            except grpc.aio.AioRpcError:
                return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def exited(self, pid: int, code: int) -> None:
        from prometheus_client import multiprocess

        self.exit_code = code
        # its gauges of calls in flight and running executions no longer count
        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]


@dataclass
class _MetricsPort:
    """The parent's `GET /metrics`: the sum of every worker's multi-process files."""

    server: WSGIServer
    thread: Thread

    @classmethod
    def start(cls, metrics_dir: str, host: str, port: int) -> _MetricsPort:
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError:
            raise MetricsPortError(
                f"cannot serve metrics on port {port}: {host}:{port} is in use (or not an "
                "address of this host); set metrics_port (0 picks a free one, None: none)"
            ) from None
        return cls(server, thread)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


async def serve_workers(
    app: Nexus, target: str, *, workers: int, log_level: str, event_loop: str = "auto"
) -> int:
    """Serve `app` (loaded from `target`, which each worker loads again) as `workers`
    processes until SIGINT/SIGTERM (see the module docstring). Returns the exit code:
    0 when every worker stopped cleanly.

    Raises:
        GrpcPortError: a port is in use. MetricsPortError: the metrics port is.
        WorkerError: a worker could not start. EnvoyError, McpProcessError: as
            `nexus serve` without workers.
    """
    started = time.perf_counter()
    app.check_options()
    check_shareable(app, workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    held: list[socket.socket] = []
    # named like the supervisors' folders: removed by a later start if we are killed
    metrics_dir = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-metrics-")
    procs: list[WorkerProcess] = []
    try:
        # Envoy and the metrics port stop last: the workers drain the calls Envoy carries
        async with contextlib.AsyncExitStack() as channels, contextlib.AsyncExitStack() as stack:
            shared, sockets = reserve_port(app.host, app.grpc_port)
            held += sockets
            ports = []
            for _ in range(workers):
                port, sockets = reserve_port(app.host, 0)
                held += sockets
                ports.append(port)
            procs = [
                WorkerProcess(
                    target,
                    index=i,
                    host=app.host,
                    port=port,
                    shared_port=shared,
                    metrics_dir=metrics_dir,
                    log_level=log_level,
                    grace_period=app.grace_period,
                    loop=event_loop,
                )
                for i, port in enumerate(ports)
            ]
            # the workers stop after the MCP adapter, their client (a stack unwinds in reverse)
            stack.push_async_callback(_stop_all, procs)
            # the first alone: it creates the tables the others then find
            await _start(procs[:1])
            await _start(procs[1:])
            metrics: _MetricsPort | None = None
            if app.enable_monitoring and app.metrics_port is not None:
                metrics = _MetricsPort.start(metrics_dir, app.host, app.metrics_port)
                channels.callback(metrics.close)
            api_address = await _start_envoy(app, channels, ports, metrics)
            mcp_url = await _start_mcp(app, stack, shared, log_level)
            pids = ", ".join(str(p.pid) for p in procs)
            print(
                f"Nexus gRPC server on {app.host}:{shared}, {workers} workers (pids {pids}; "
                f"started in {(time.perf_counter() - started) * 1e3:.0f} ms)"
            )
            print(f"  workers' own ports (Envoy's endpoints): {', '.join(map(str, ports))}")
            from ._cli import loop_factory

            print(f"  workers' loop: {'asyncio' if loop_factory(event_loop) is None else 'uvloop'}")
            if api_address:
                from ._envoy import envoy_banner

                print(envoy_banner(api_address))
            if metrics is not None:
                print(f"  metrics of all workers: http://{app.host}:{metrics.port}/metrics")
            if mcp_url:
                print(f"MCP adapter on {mcp_url} (streamable HTTP; a gRPC client of the workers)")
            print("  Ctrl-C stops it.", flush=True)
            await stop.wait()
            print("stopping: letting in-flight calls finish...", flush=True)
    finally:
        for sock in held:
            sock.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    failed = [p for p in procs if p.exit_code not in (0, None)]
    for p in failed:
        print(f"nexus: {p.name} stopped with exit code {p.exit_code}", file=sys.stderr)
    return 1 if failed else 0


async def _start(procs: list[WorkerProcess]) -> None:
    results = await asyncio.gather(*(p.start() for p in procs), return_exceptions=True)
    for proc, result in zip(procs, results, strict=True):
        if isinstance(result, SupervisorError):
            # its own output (its error) was shown already, on ours
            raise WorkerError(f"{proc.name} did not start ({str(result).rstrip(': ')})") from None
        if isinstance(result, BaseException):
            raise result


async def _stop_all(procs: list[WorkerProcess]) -> None:
    """SIGTERM to every worker at once; each drains its calls in flight."""
    await asyncio.gather(*(p.stop() for p in procs))


async def _start_envoy(
    app: Nexus, stack: contextlib.AsyncExitStack, ports: list[int], metrics: _MetricsPort | None
) -> str | None:
    """Envoy in front of every worker (when `api_port` is set); returns its address."""
    if app.api_port is None:
        return None
    from ._app import _static_files
    from ._envoy import EnvoyOptions, EnvoySupervisor, merged_descriptor_set, transcoded_services
    from ._typed import TypedModels

    db = app.resolve_dataflow()
    typed = TypedModels(db.models if db else (), _static_files())
    supervisor = EnvoySupervisor(
        merged_descriptor_set(typed),
        EnvoyOptions(
            grpc_host=_local(app.host),
            grpc_port=ports[0],
            grpc_ports=tuple(ports),
            api_host=app.host,
            api_port=app.api_port,
            cors_origins=app.cors_origins,
            services=transcoded_services(typed),
            limits=app.limits,
            metrics_port=metrics.port if metrics is not None and app.expose_metrics else None,
        ),
    )
    await stack.enter_async_context(supervisor)
    return f"{app.host}:{supervisor.api_port}"


async def _start_mcp(
    app: Nexus, stack: contextlib.AsyncExitStack, shared_port: int, log_level: str
) -> str | None:
    """The one MCP adapter, a client of the shared port (when `mcp_port` is set)."""
    if app.mcp_port is None:
        return None
    from ._mcp_process import adapter_for

    adapter = adapter_for(app, shared_port, log_level)
    await stack.enter_async_context(adapter)
    return adapter.url
