"""The `nexus` server commands: `nexus serve APP` and `nexus proto export APP`.

APP is `path/to/app.py` (its `app` attribute) or `module:attr`, naming a `Nexus`.
This command, not the library, configures logging.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from ._app import Nexus
from ._discovery import load_app_target
from ._proto_export import export_protos
from ._typed import TypedModels

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


async def _serve(app: Nexus) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with app.serving() as info:
        names = ", ".join(app.registry.names()) or "none"
        models = ", ".join(m.name for m in (app.db.models if app.db else ())) or "none"
        print(
            f"Nexus gRPC server on {info.address} (started in {info.startup_seconds * 1e3:.0f} ms)"
        )
        print(f"  workflows: {names}")
        print(f"  models:    {models}")
        print("  Ctrl-C stops it.", flush=True)
        await stop.wait()
        print("stopping: letting in-flight calls finish...", flush=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = _load(args.app)
    if args.host is not None:
        app.host = args.host
    if args.grpc_port is not None:
        app.grpc_port = args.grpc_port
    try:
        asyncio.run(_serve(app))
    except OSError as exc:
        print(f"nexus: cannot serve: {exc}", file=sys.stderr)
        return EXIT_APP
    return 0


def _cmd_proto_export(args: argparse.Namespace) -> int:
    app = _load(args.app)
    from ._app import _static_files

    typed = TypedModels(app.db.models if app.db else (), _static_files())
    out = Path(args.out)
    files = export_protos(typed, out)
    for f in files:
        print(f.relative_to(out).as_posix())
    print(f"wrote {len(files)} file(s) to {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexus", description="Serve a Nexus app.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve APP over gRPC until Ctrl-C")
    serve.add_argument("app", help="path/to/app.py or module:attr naming a Nexus app")
    serve.add_argument("--host", help="interface to listen on (default: the app's)")
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default: the app's; 0: any)")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
