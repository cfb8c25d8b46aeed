"""The `nexus` server commands: `nexus serve APP`, `nexus proto export APP`,
`nexus envoy-config APP` and `nexus openapi APP`.

`nexus serve --mcp` also runs the MCP adapter, as a supervised child process that talks
to the server over gRPC like any other client (see `_mcp_process.py`).

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
from pathlib import Path
from typing import TYPE_CHECKING

from ._app import Nexus, _local
from ._discovery import load_app_target

if TYPE_CHECKING:
    from ._mcp_process import McpProcess
    from ._typed import TypedModels

# each command imports what it needs, so `nexus serve` starts without the others' modules

__all__ = ["main"]

EXIT_USAGE = 2
EXIT_APP = 3


def _load(target: str) -> Nexus:
    try:
        app = load_app_target(target)
    except (FileNotFoundError, AttributeError, ImportError) as exc:
        raise SystemExit(f"nexus: cannot load {target!r}: {exc}") from None
    if not isinstance(app, Nexus):
        raise SystemExit(f"nexus: {target!r} is a {type(app).__name__}, not a Nexus app")
    return app


def _typed(app: Nexus) -> TypedModels:
    from ._app import _static_files
    from ._typed import TypedModels

    return TypedModels(app.db.models if app.db else (), _static_files())


async def _serve(app: Nexus, *, envoy: bool, mcp: bool, log_level: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        info = await stack.enter_async_context(app.serving(envoy=envoy))
        adapter: McpProcess | None = None
        if mcp:
            from ._mcp_process import McpProcess

            # a client of this server, so stopped before it (the stack unwinds in reverse)
            adapter = McpProcess(
                f"{_local(info.host)}:{info.port}",
                host=info.host,
                port=app.mcp_port,
                log_level="debug" if log_level == "debug" else "warning",
            )
            await stack.enter_async_context(adapter)
        names = ", ".join(app.registry.names()) or "none"
        models = ", ".join(m.name for m in (app.db.models if app.db else ())) or "none"
        print(
            f"Nexus gRPC server on {info.address} (started in {info.startup_seconds * 1e3:.0f} ms)"
        )
        print(f"  workflows: {names}")
        print(f"  models:    {models}")
        if info.api_address:
            print(f"Envoy on http://{info.api_address} (REST, gRPC-Web and gRPC)")
            print(f"  OpenAPI:   http://{info.api_address}/openapi.json")
        if adapter is not None:
            print(f"MCP adapter on {adapter.url} (streamable HTTP; a gRPC client of this server)")
        print("  Ctrl-C stops it.", flush=True)
        # what startup made (modules, models, descriptors) lives as long as the process:
        # out of the collector's generations, collections during calls scan only what
        # the calls allocate
        gc.freeze()
        await stop.wait()
        print("stopping: letting in-flight calls finish...", flush=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    from ._envoy import EnvoyError
    from ._mcp_process import McpProcessError

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = _load(args.app)
    if args.host is not None:
        app.host = args.host
    if args.grpc_port is not None:
        app.grpc_port = args.grpc_port
    if args.api_port is not None:
        app.api_port = args.api_port
    if args.mcp_port is not None:
        app.mcp_port = args.mcp_port
    if args.cors_origin:
        app.cors_origins = tuple(args.cors_origin)
    try:
        asyncio.run(_serve(app, envoy=not args.no_envoy, mcp=args.mcp, log_level=args.log_level))
    except McpProcessError as exc:
        print(
            f"nexus: cannot start the MCP adapter on port {app.mcp_port}: {exc}\n"
            "  choose another port with --mcp-port, or serve without --mcp",
            file=sys.stderr,
        )
        return EXIT_APP
    except EnvoyError as exc:
        print(
            f"nexus: cannot start Envoy on port {app.api_port}: {exc}\n"
            "  choose another port with --api-port, or serve gRPC only with --no-envoy",
            file=sys.stderr,
        )
        return EXIT_APP
    except OSError as exc:
        print(f"nexus: cannot serve: {exc}", file=sys.stderr)
        return EXIT_APP
    return 0


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
    try:
        ipaddress.ip_address(args.grpc_host)
        dns = False
    except ValueError:
        dns = True  # a container or service name
    options = EnvoyOptions(
        grpc_host=args.grpc_host,
        grpc_port=app.grpc_port if args.grpc_port is None else args.grpc_port,
        api_host=args.api_host,
        api_port=app.api_port if args.api_port is None else args.api_port,
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
    )
    header = [
        f"Envoy for the Nexus app {args.app}: REST (gRPC-JSON transcoder), gRPC-Web and",
        f"gRPC on port {options.api_port}, in front of the gRPC server at "
        f"{options.grpc_host}:{options.grpc_port}.",
        "Generated by `nexus envoy-config`; regenerate it when the app's models change.",
    ]
    if not args.embed_descriptor:
        header.append(
            f"{args.descriptor} is the descriptor set `nexus proto export` writes (nexus.binpb)."
        )
    sys.stdout.write(render_yaml(envoy_config(merged_descriptor_set(typed), options), header))
    return 0


def _cmd_openapi(args: argparse.Namespace) -> int:
    from ._envoy import merged_descriptor_set, transcoded_services
    from ._openapi import openapi_json

    typed = _typed(_load(args.app))
    doc = openapi_json(merged_descriptor_set(typed), transcoded_services(typed))
    if args.out:
        Path(args.out).write_bytes(doc)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(doc.decode())
    return 0


def _cmd_proto_export(args: argparse.Namespace) -> int:
    from ._proto_export import export_protos

    typed = _typed(_load(args.app))
    out = Path(args.out)
    files = export_protos(typed, out)
    for f in files:
        print(f.relative_to(out).as_posix())
    print(f"wrote {len(files)} file(s) to {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexus", description="Serve a Nexus app.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="serve APP over gRPC, with Envoy in front for REST, until Ctrl-C"
    )
    serve.add_argument("app", help="path/to/app.py or module:attr naming a Nexus app")
    serve.add_argument("--host", help="interface to listen on (default: the app's)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default: the app's; 0: any)")
    serve.add_argument(
        "--api-port", type=int, help="Envoy's port: REST, gRPC-Web, gRPC (default: the app's)"
    )
    serve.add_argument(
        "--no-envoy", action="store_true", help="serve gRPC only, without Envoy in front"
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        help="browser origin Envoy allows by CORS (repeatable; `*`: any; default: the "
        "app's cors_origins)",
    )
    serve.add_argument(
        "--mcp",
        action="store_true",
        help="also run the MCP adapter (nexus-mcp over streamable HTTP) as a supervised "
        "child process, a gRPC client of this server",
    )
    serve.add_argument(
        "--mcp-port",
        type=int,
        help="the MCP adapter's HTTP port, with --mcp (default: the app's mcp_port; 0: any)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=_cmd_serve)

    proto = sub.add_parser("proto", help="the app's protobuf contracts")
    proto_sub = proto.add_subparsers(dest="proto_command", required=True)
    export = proto_sub.add_parser(
        "export", help="write the .proto files (with the per-model file) and a descriptor set"
    )
    export.add_argument("app", help="path/to/app.py or module:attr naming a Nexus app")
    export.add_argument("--out", default="nexus-protos", help="directory to write to")
    export.set_defaults(func=_cmd_proto_export)

    envoy = sub.add_parser(
        "envoy-config", help="print the Envoy configuration (YAML) for running your own Envoy"
    )
    envoy.add_argument("app", help="path/to/app.py or module:attr naming a Nexus app")
    envoy.add_argument(
        "--grpc-host", default="127.0.0.1", help="the gRPC server as Envoy reaches it (IP or DNS)"
    )
    envoy.add_argument("--grpc-port", type=int, help="the gRPC server's port (default: the app's)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "mcp_port", None) is not None and not args.mcp:
        parser.error("--mcp-port goes with --mcp")
    if args.command == "serve" and args.cors_origin and args.no_envoy:
        parser.error("--cors-origin goes with Envoy (it is Envoy that answers CORS)")
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
