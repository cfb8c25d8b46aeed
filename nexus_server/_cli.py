"""The `nexus` server commands: `nexus serve APP`, `nexus proto export APP`,
`nexus envoy-config APP` and `nexus openapi APP`.

`nexus serve` serves every channel the app is configured for, exactly as `app.start()`
does (both call `run_app`): gRPC, Envoy in front (REST, gRPC-Web, Connect and gRPC) unless
`--no-envoy`/`api_port=None`, and the MCP adapter unless `--no-mcp`/`mcp_port=None`, a
supervised child process that talks to the server over gRPC like any other client (see
`_mcp_process.py`).

APP is `path/to/app.py` (its `app` attribute) or `module:attr`, naming a `Nexus`.
This command, not the library, configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import ipaddress
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._app import (
    GrpcPortError,
    MetricsPortError,
    Nexus,
    _local,
    deferred_start,
    shown_url,
)
from ._discovery import load_app_target
from ._help import Parser, describe_commands
from ._workers import parse_workers

if TYPE_CHECKING:
    from dataflow import DataFlow

    from ._mcp_process import McpProcess
    from ._typed import TypedModels

# each command imports what it needs, so `nexus serve` starts without the others' modules

__all__ = ["main"]

_log = logging.getLogger("nexus_server")

EXIT_USAGE = 2
EXIT_APP = 3
#: The MCP adapter's port when `--mcp` is given and the app turned MCP off.
DEFAULT_MCP_PORT = 3001
#: Envoy's port in `nexus envoy-config` when neither --api-port nor the app sets one.
DEFAULT_API_PORT = 8000


def _load(target: str) -> Nexus:
    """The app `target` names. An `app.start()` the file calls while it is imported
    (at module level, without a `__main__` guard) is recorded, not run: the command
    serves (or exports) the app itself, once."""
    from dataflow import ValidationError

    try:
        with deferred_start():
            app = load_app_target(target)
    except (FileNotFoundError, AttributeError, ImportError) as exc:
        raise SystemExit(f"nexus: cannot load {target!r}: {exc}") from None
    except (ValueError, ValidationError) as exc:  # an option the app passes
        raise SystemExit(f"nexus: {target}: {exc}") from None
    if not isinstance(app, Nexus):
        raise SystemExit(f"nexus: {target!r} is a {type(app).__name__}, not a Nexus app")
    return app


def _typed(app: Nexus) -> TypedModels:
    from ._app import _static_files
    from ._typed import TypedModels

    try:
        db = app.resolve_dataflow()  # the DataFlow its workflows use, as at start
    except ValueError as exc:
        raise SystemExit(f"nexus: {exc}") from None
    return TypedModels(db.models if db else (), _static_files())


async def _serve(app: Nexus, *, log_level: str, banner: bool = True) -> None:
    """Serve every channel `app` is configured for until SIGINT/SIGTERM: gRPC, Envoy
    (unless `api_port` is None) and the MCP adapter (unless `mcp_port` is None).
    `banner`: print where it serves (a worker of `--workers N` does not)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        info = await stack.enter_async_context(app.serving(envoy=app.api_port is not None))
        adapter: McpProcess | None = None
        if app.mcp_port is not None:
            from ._mcp_process import adapter_for

            # a client of this server, so stopped before it (the stack unwinds in reverse)
            adapter = adapter_for(app, info.port, log_level)
            await stack.enter_async_context(adapter)
            app.health.add("mcp", adapter.health)  # GET /health's `mcp` component
            stack.callback(app.health.remove, "mcp")
        if app.db is not None and app.db.skip_migration:
            await _warn_missing_tables(app.db)
        names = ", ".join(app.registry.names()) or "none"
        models = ", ".join(m.name for m in (app.db.models if app.db else ())) or "none"
        # what startup made (modules, models, descriptors) lives as long as the process:
        # out of the collector's generations, collections during calls scan only what
        # the calls allocate
        gc.freeze()
        if not banner:  # a worker of `--workers N`: its parent says where they serve
            await stop.wait()
            return
        print(
            f"Nexus gRPC server on {info.address} (started in {info.startup_seconds * 1e3:.0f} ms)"
        )
        print(f"  workflows: {names}")
        print(f"  models:    {models}")
        print(f"  loop:      {loop_name(loop)}")
        if info.api_address:
            from ._envoy import envoy_banner  # imported already: Envoy runs

            print(envoy_banner(info.api_address))
            print(f"  OpenAPI:   http://{info.api_address}/openapi.json")
        if info.metrics_port is not None:
            print(f"  metrics:   http://{_local(info.host)}:{info.metrics_port}/metrics")
        if adapter is not None:
            print(f"MCP adapter on {adapter.url} (streamable HTTP; a gRPC client of this server)")
        print("  Ctrl-C stops it.", flush=True)
        await stop.wait()
        print("stopping: letting in-flight calls finish...", flush=True)


async def _warn_missing_tables(db: DataFlow) -> None:
    """With `skip_migration=True` nothing creates or alters the models' tables: say at
    start which tables and columns are missing (each call on such a model fails until
    the schema is brought up to date)."""
    from sqlalchemy import inspect

    from dataflow import DataFlowError

    names = {model.table: model.name for model in db.models}

    def read(conn: Any) -> dict[str, set[str]]:
        seen = inspect(conn)
        present = set(seen.get_table_names())
        return {t: {c["name"] for c in seen.get_columns(t)} for t in names if t in present}

    try:
        found = await db.run_sync(read)
    except DataFlowError as exc:
        _log.warning("cannot list the database's tables: %s", exc)
        return
    for table, model in names.items():
        if table not in found:
            _log.warning(
                "model %s: the table %r does not exist and skip_migration=True: calls on "
                "it fail (FAILED_PRECONDITION) until it is created; "
                "DataFlow(auto_migrate=True, skip_migration=False) creates it at start",
                model,
                table,
            )
            continue
        missing = [c.name for c in db.table(model).columns if c.name not in found[table]]
        if missing:
            _log.warning(
                "model %s: the table %r lacks the column(s) %s and skip_migration=True: "
                "calls on it fail until they are added; "
                "DataFlow(auto_migrate=True, skip_migration=False) adds them at start",
                model,
                table,
                ", ".join(missing),
            )


def loop_factory(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a server process runs on (`nexus serve --loop`): uvloop's (libuv;
    10-30 % less CPU per call than asyncio's own, docs/benchmarks.md) for `auto` when it
    is installed (a dependency, except on Windows) and for `uvloop`; asyncio's own
    (None) for `asyncio`, or `auto` without uvloop.

    Raises:
        ValueError: `uvloop` when it is not installed; a choice that is none of these.
    """
    if choice not in LOOPS:
        raise ValueError(f"--loop {choice!r}: expects one of {', '.join(LOOPS)}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError(
                "--loop uvloop: uvloop is not installed (pip install uvloop; it does not "
                "run on Windows); use --loop asyncio"
            ) from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """`uvloop` or `asyncio`: the event loop `loop` is (the banner says it)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


#: `nexus serve --loop` choices.
LOOPS = ("auto", "uvloop", "asyncio")


def run_app(
    app: Nexus,
    *,
    log_level: str = "info",
    workers: int = 1,
    target: str | None = None,
    worker: bool = False,
    loop: str = "auto",
) -> int:
    """Serve `app` until Ctrl-C/SIGTERM: the one code path of `nexus serve` and
    `Nexus.start()`. A start that cannot happen (a busy port, a database that is not
    there, an option this build refuses) prints one line (and a hint) on stderr and
    returns EXIT_APP; a clean stop returns 0. `workers` > 1: as that many processes,
    each loading `target` (`_workers.py`); `worker`: this process is one of them.
    `loop`: the server processes' event loop (`loop_factory`)."""
    from dataflow import DataFlowError

    from ._envoy import EnvoyError
    from ._mcp_process import McpProcessError
    from ._workers import WorkerError, serve_workers

    try:
        factory = loop_factory(loop)  # a bad choice fails before anything starts
        if workers > 1 and target is not None:
            # the parent only supervises: asyncio's own loop; the workers run on `loop`
            return asyncio.run(
                serve_workers(app, target, workers=workers, log_level=log_level, event_loop=loop)
            )
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(app, log_level=log_level, banner=not worker))
    except WorkerError as exc:
        return _fail(str(exc), None)
    except McpProcessError as exc:
        return _fail(
            f"cannot start the MCP adapter on port {app.mcp_port}: {exc}",
            "choose another port with --mcp-port (mcp_port=), or serve without MCP "
            "with --no-mcp (mcp_port=None)",
        )
    except EnvoyError as exc:
        return _fail(
            f"cannot start Envoy on port {app.api_port}: {exc}",
            "choose another port with --api-port (api_port=), or serve gRPC only with "
            "--no-envoy (api_port=None)",
        )
    except MetricsPortError as exc:
        return _fail(str(exc), "choose another port with --metrics-port (metrics_port=; 0: any)")
    except GrpcPortError as exc:
        return _fail(str(exc), "choose another port with --grpc-port (grpc_port=)")
    except DataFlowError as exc:
        url = shown_url(app.db) if app.db is not None else "the app's database"
        return _fail(f"cannot open the database {url}: {_first_line(str(exc))}", None)
    except ValueError as exc:  # an option refused at start (the attribute form)
        return _fail(str(exc), None)
    except OSError as exc:
        return _fail(f"cannot serve: {exc}", None)
    return 0


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _fail(message: str, hint: str | None) -> int:
    print(f"nexus: {message}" + (f"\n  {hint}" if hint else ""), file=sys.stderr, flush=True)
    return EXIT_APP


def _cmd_serve(args: argparse.Namespace) -> int:
    from .gateway._access_log import configure_access_log

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    configure_access_log()
    app = _load(args.app)
    if args.host is not None:
        app.host = args.host
    if args.grpc_port is not None:
        app.grpc_port = args.grpc_port
    if args.api_port is not None:
        app.api_port = args.api_port
    if args.no_envoy:
        app.api_port = None
    if args.mcp_port is not None:
        app.mcp_port = args.mcp_port
    elif args.mcp and app.mcp_port is None:
        app.mcp_port = DEFAULT_MCP_PORT
    if args.no_mcp:
        app.mcp_port = None
    if args.cors_origin:
        app.cors_origins = tuple(args.cors_origin)
    if args.metrics_port is not None:
        if not app.enable_monitoring:
            return _fail(
                "--metrics-port needs monitoring on",
                "set Nexus(enable_monitoring=True) in the app (docs/operations.md)",
            )
        app.metrics_port = args.metrics_port
    if args.drain_delay is not None:
        app.drain_delay = args.drain_delay
    from ._workers import configure_worker

    worker = configure_worker(app)  # a process of `--workers N` (started by one)
    return run_app(
        app,
        log_level=args.log_level,
        workers=args.workers,
        target=args.app,
        worker=worker,
        loop=args.loop,
    )


def _cmd_envoy_config(args: argparse.Namespace) -> int:
    from ._envoy import (
        EnvoyOptions,
        envoy_config,
        merged_descriptor_set,
        render_yaml,
        transcoded_services,
    )

    app = _load(args.app)
    typed = _typed(app)
    grpc_host = args.grpc_host or "127.0.0.1"
    try:
        ipaddress.ip_address(grpc_host)
        dns = False
    except ValueError:
        dns = True  # a container or service name
    options = EnvoyOptions(
        grpc_host=grpc_host,
        grpc_port=app.grpc_port if args.grpc_port is None else args.grpc_port,
        api_host=args.api_host,
        api_port=next(p for p in (args.api_port, app.api_port, DEFAULT_API_PORT) if p is not None),
        admin_socket=args.admin_socket,
        admin_port=args.admin_port,
        cors_origins=tuple(args.cors_origin or app.cors_origins),
        descriptor_path=None if args.embed_descriptor else args.descriptor,
        grpc_address_is_dns=dns,
        services=transcoded_services(typed),
        # a file for another machine: its connection limit must not depend on this
        # process's file descriptor limit
        limits=dataclasses.replace(
            app.limits, max_connections=app.limits.max_connections or 10_000
        ),
        upstreams=tuple(args.upstream or ()),
    )
    header = [
        f"Envoy for the Nexus app {args.app}: REST (gRPC-JSON transcoder), gRPC-Web and",
        *(
            _upstreams_text(options.api_port, options.upstreams)
            if options.upstreams
            else [
                f"gRPC on port {options.api_port}, in front of the gRPC server at "
                f"{options.grpc_host}:{options.grpc_port}."
            ]
        ),
        "Generated by `nexus envoy-config`; regenerate it when the app's models change.",
    ]
    if not args.embed_descriptor:
        header.append(
            f"{args.descriptor} is the descriptor set `nexus proto export` writes (nexus.binpb)."
        )
    sys.stdout.write(render_yaml(envoy_config(merged_descriptor_set(typed), options), header))
    return 0


def _upstreams_text(api_port: int, upstreams: tuple[tuple[str, int], ...]) -> list[str]:
    """The header lines naming the replicas (one per line)."""
    return [
        f"gRPC on port {api_port}, in front of the gRPC server replicas below (a DNS name",
        "stands for every address it resolves to), health-checked; reads, and writes with",
        "an x-nexus-request-id header, are retried on another replica (docs/deploy.md):",
        *(f"  [{h}]:{p}" if ":" in h else f"  {h}:{p}" for h, p in upstreams),
    ]


def _cmd_openapi(args: argparse.Namespace) -> int:
    from ._envoy import api_services, merged_descriptor_set
    from ._openapi import openapi_json

    app = _load(args.app)
    typed = _typed(app)
    doc = openapi_json(
        merged_descriptor_set(typed),
        api_services(typed),
        secured=app.auth_enabled(),
        public_discovery=app.public_discovery,
    )
    if args.out:
        Path(args.out).write_bytes(doc)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(doc.decode())
    return 0


def _go_module(value: str) -> str:
    """`--go-module`: an import path (`github.com/acme/api`), without spaces or quotes."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*", value):
        raise argparse.ArgumentTypeError(
            "must be a Go import path such as github.com/acme/api (letters, digits, . _ ~ - /)"
        )
    return value


def _cmd_proto_export(args: argparse.Namespace) -> int:
    from ._proto_export import GO_MODULE, export_protos

    typed = _typed(_load(args.app))
    out = Path(args.out)
    files = export_protos(typed, out, go_module=args.go_module or GO_MODULE)
    for f in files:
        print(f.relative_to(out).as_posix())
    print(f"wrote {len(files)} file(s) to {out}", file=sys.stderr)
    return 0


def _drain_delay_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected seconds, e.g. 5") from None
    if not 0 <= value <= 3600:  # also refuses nan
        raise argparse.ArgumentTypeError("expected seconds from 0 to 3600")
    return value


def _upstream_arg(text: str) -> tuple[str, int]:
    from ._upstreams import parse_upstream

    return parse_upstream(text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nexus", description="Serve a Nexus app.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve APP until Ctrl-C: gRPC, Envoy in front (REST, gRPC-Web, Connect and "
        "gRPC) and the MCP adapter, each unless turned off (as app.start() does)",
    )
    serve.add_argument("app", help="path/to/app.py or module:attr naming a Nexus app")
    serve.add_argument("--host", help="interface to listen on (default: the app's)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default: the app's; 0: any)")
    serve.add_argument(
        "--api-port", type=int, help="Envoy's port: REST, gRPC-Web, gRPC (default: the app's)"
    )
    serve.add_argument(
        "--no-envoy", action="store_true", help="no Envoy in front (as api_port=None)"
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        help="browser origin Envoy allows by CORS (repeatable; `*`: any; default: the "
        "app's cors_origins)",
    )
    mcp = serve.add_mutually_exclusive_group()
    mcp.add_argument(
        "--mcp",
        action="store_true",
        help="run the MCP adapter (nexus-mcp over streamable HTTP, a supervised child "
        "process and gRPC client of this server) even if the app sets mcp_port=None "
        f"(then on port {DEFAULT_MCP_PORT}); served by default when mcp_port is set",
    )
    mcp.add_argument("--no-mcp", action="store_true", help="no MCP adapter (as mcp_port=None)")
    serve.add_argument(
        "--mcp-port",
        type=int,
        help="the MCP adapter's HTTP port (default: the app's mcp_port; 0: any)",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="with monitoring on (enable_monitoring=True), the port serving GET /metrics "
        "(default: the app's metrics_port; 0: any)",
    )
    serve.add_argument(
        "--workers",
        type=parse_workers,
        default=1,
        metavar="N",
        help="serve with N server processes (auto: one per CPU), each on a port of its "
        "own behind Envoy and all sharing --grpc-port (SO_REUSEPORT); default: 1",
    )
    serve.add_argument(
        "--drain-delay",
        type=_drain_delay_arg,
        metavar="SECONDS",
        help="at shutdown, go on answering this long after health says NOT_SERVING, so "
        "a load balancer moves new calls to other replicas first (default: the app's "
        "drain_delay, 0; 5 suits replicas behind `nexus envoy-config --upstream`)",
    )
    serve.add_argument(
        "--loop",
        default="auto",
        choices=LOOPS,
        help="the server's event loop: uvloop (faster; auto picks it when installed) or "
        "asyncio's own (default: auto)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the server's log level (default: info)",
    )
    serve.set_defaults(func=_cmd_serve)

    proto = sub.add_parser("proto", help="the app's protobuf contracts")
    proto_sub = proto.add_subparsers(dest="proto_command", required=True)
    export = proto_sub.add_parser(
        "export", help="write the .proto files (with the per-model file) and a descriptor set"
    )
    export.add_argument("app", help="path/to/app.py or module:attr naming a Nexus app")
    export.add_argument("--out", default="nexus-protos", help="directory to write to")
    export.add_argument(
        "--go-module",
        type=_go_module,
        help="Go import path prefix of the files' go_package (default: nexus.local/api)",
    )
    export.set_defaults(func=_cmd_proto_export)

    envoy = sub.add_parser(
        "envoy-config", help="print the Envoy configuration (YAML) for running your own Envoy"
    )
    envoy.add_argument("app", help="path/to/app.py or module:attr naming a Nexus app")
    envoy.add_argument(
        "--grpc-host", help="the gRPC server as Envoy reaches it (IP or DNS; default: 127.0.0.1)"
    )
    envoy.add_argument("--grpc-port", type=int, help="the gRPC server's port (default: the app's)")
    envoy.add_argument(
        "--upstream",
        action="append",
        type=_upstream_arg,
        metavar="HOST:PORT",
        help="a replica (`nexus serve --no-envoy`) Envoy balances over, instead of "
        "--grpc-host/--grpc-port (repeatable): health-checked, with retries on another "
        "replica (docs/deploy.md)",
    )
    envoy.add_argument("--api-host", default="0.0.0.0", help="interface Envoy listens on")
    envoy.add_argument("--api-port", type=int, help="Envoy's port (default: the app's api_port)")
    admin = envoy.add_mutually_exclusive_group()
    admin.add_argument(
        "--admin-socket",
        help="serve Envoy's admin interface on this unix socket (mode 0600); default: none",
    )
    admin.add_argument(
        "--admin-port",
        type=int,
        help="serve Envoy's admin interface on 127.0.0.1:PORT instead (any local process "
        "can reach it); default: none",
    )
    envoy.add_argument(
        "--cors-origin", action="append", help="allowed browser origin (repeatable; `*`: any)"
    )
    envoy.add_argument(
        "--descriptor", default="/etc/envoy/nexus.binpb", help="the descriptor set's path"
    )
    envoy.add_argument(
        "--embed-descriptor",
        action="store_true",
        help="embed the descriptor set in the YAML instead of reading --descriptor",
    )
    envoy.set_defaults(func=_cmd_envoy_config)

    openapi = sub.add_parser("openapi", help="write the OpenAPI 3.1 document of the REST API")
    openapi.add_argument("app", help="path/to/app.py or module:attr naming a Nexus app")
    openapi.add_argument("--out", help="file to write (default: standard output)")
    openapi.set_defaults(func=_cmd_openapi)
    return describe_commands(parser)


def _check_upstreams(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--upstream replaces --grpc-host/--grpc-port; each replica is named once."""
    if args.grpc_host is not None or args.grpc_port is not None:
        parser.error("--upstream replaces --grpc-host/--grpc-port: give one or the other")
    seen: set[tuple[str, int]] = set()
    for host, port in args.upstream:
        if (host, port) in seen:
            parser.error(f"--upstream {host}:{port} is given twice")
        seen.add((host, port))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "mcp_port", None) is not None and args.no_mcp:
        parser.error("--mcp-port and --no-mcp contradict each other")
    if args.command == "serve" and args.cors_origin and args.no_envoy:
        parser.error("--cors-origin goes with Envoy (it is Envoy that answers CORS)")
    if args.command == "envoy-config" and args.upstream:
        _check_upstreams(parser, args)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
