"""Envoy in front of N replicas (`nexus envoy-config APP --upstream HOST:PORT ...`).

The pieces `_envoy.envoy_config` adds when it is given several upstreams (one or more
`nexus serve --no-envoy` replicas on one database), instead of its single gRPC server:

- one cluster listing every replica, balanced by least requests, with active gRPC
  health checks (`grpc.health.v1`, the server's overall service `""`: NOT_SERVING while
  its database does not answer and from the moment it begins to stop) and outlier
  ejection on connection failures (a replica that died is out after two of them,
  before its next health check);
- routes that retry, on another replica, only what is safe to run twice:
  - read methods (those whose `google.api.http` binding is GET, and the health
    service) on UNAVAILABLE, connect failure, reset or refused stream;
  - writes that carry an idempotency key, which Envoy cannot read in the body: clients
    send it also as the header `x-nexus-request-id` (`REQUEST_ID_HEADER`; the CLI and
    the MCP adapter do), and a request with that header is retried likewise;
  - every other write only when it never reached a replica (connect failure, refused
    stream: the replica had not started it);
- connection draining: Envoy's own drain (`drain_timeout`) and HTTP/2 keepalive pings
  that find a replica whose machine vanished without closing its connections.

Nothing here imports `_envoy` (which imports this module).
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

__all__ = [
    "HEALTH_CHECK_SERVICE",
    "READ_RETRY_ON",
    "REQUEST_ID_HEADER",
    "SAFE_RETRY_ON",
    "Upstream",
    "keepalive_protocol_options",
    "parse_upstream",
    "read_methods",
    "replica_cluster",
    "retry_policy",
    "retry_routes",
    "upstreams_are_dns",
]

#: An upstream replica: (host, port).
Upstream = tuple[str, int]

#: The header a client sends its idempotency key in as well, for Envoy to see it.
REQUEST_ID_HEADER = "x-nexus-request-id"
#: The gRPC health service name Envoy probes: the server as a whole.
HEALTH_CHECK_SERVICE = ""
#: When a read (or a write with a request_id) is retried on another replica.
READ_RETRY_ON = "unavailable,connect-failure,reset,refused-stream"
#: When any other write is retried: it never reached a replica's handler.
SAFE_RETRY_ON = "connect-failure,refused-stream,reset-before-request"
#: Retries after the first attempt (3 attempts: with 3 replicas, one on each).
NUM_RETRIES = 2
#: Retries in flight at once: this percentage of the requests in flight, and at least
#: `MIN_RETRY_CONCURRENCY`.
RETRY_BUDGET_PERCENT = 25.0
MIN_RETRY_CONCURRENCY = 64
#: Health checks: every `HEALTH_INTERVAL`, `UNHEALTHY_AFTER` failures take a replica
#: out, `HEALTHY_AFTER` successes put it back.
HEALTH_INTERVAL = "2s"
HEALTH_TIMEOUT = "1s"
UNHEALTHY_AFTER = 2
HEALTHY_AFTER = 2
#: How long Envoy drains its own connections when it stops or reloads.
DRAIN_TIMEOUT = "10s"

#: Methods of the health service, reads though they have no HTTP binding.
_HEALTH_READS = (
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/List",
    "/grpc.health.v1.Health/Watch",
)
#: A DNS name: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")


def parse_upstream(text: str) -> Upstream:
    """`HOST:PORT` (an IPv4 address, `[IPv6]` or a DNS name; a port 1-65535) as an
    upstream; argparse shows the ArgumentTypeError's message for anything else."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError("expected HOST:PORT, e.g. 10.0.0.5:50051 or nexus-1:50051")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError("the port must be a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise argparse.ArgumentTypeError("not an IPv6 address inside [...]") from None
        return host[1:-1], int(port_text)
    if ":" in host:
        raise argparse.ArgumentTypeError("write an IPv6 address in brackets: [::1]:50051")
    if not _HOSTNAME.match(host):
        raise argparse.ArgumentTypeError("the host must be an IP address or a DNS name")
    return host, int(port_text)


def upstreams_are_dns(upstreams: Iterable[Upstream]) -> bool:
    """Whether any upstream is a DNS name (the cluster resolves them: STRICT_DNS)."""
    for host, _ in upstreams:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return True
    return False


def read_methods(descriptor: bytes) -> list[str]:
    """The gRPC paths of every read method: those of the descriptor set's services
    whose `google.api.http` binding is GET (AIP: safe to repeat), and the health
    service's."""
    paths = list(_HEALTH_READS)
    for f in descriptor_pb2.FileDescriptorSet.FromString(descriptor).file:
        for service in f.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                if rule.WhichOneof("pattern") == "get":
                    paths.append(f"/{f.package}.{service.name}/{method.name}")
    return sorted(set(paths))


def retry_policy(retry_on: str) -> dict[str, Any]:
    """A route's retry policy: on `retry_on`, `NUM_RETRIES` times, each on a replica
    not tried yet."""
    return {
        "retry_on": retry_on,
        "num_retries": NUM_RETRIES,
        # each retry goes to a replica not tried yet
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts."
                    "v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": 5,
    }


def retry_routes(cluster: str, reads: Sequence[str], catch_all: dict[str, Any]) -> list[Any]:
    """The routes of the replicas: each read method, then writes carrying a
    `REQUEST_ID_HEADER`, retried on `READ_RETRY_ON`; then `catch_all` (the single-server
    catch-all route) retried on `SAFE_RETRY_ON` only."""
    # no route timeout: the client's deadline bounds a call, and streams last as long
    # as their execution
    retried = {"cluster": cluster, "timeout": "0s", "retry_policy": retry_policy(READ_RETRY_ON)}
    routes: list[Any] = [{"match": {"path": path}, "route": retried} for path in reads]
    routes.append(
        {
            "match": {
                "prefix": "/",
                "headers": [{"name": REQUEST_ID_HEADER, "present_match": True}],
            },
            "route": retried,
        }
    )
    last = dict(catch_all)
    last["route"] = {**catch_all["route"], "retry_policy": retry_policy(SAFE_RETRY_ON)}
    routes.append(last)
    return routes


def replica_cluster(
    name: str, upstreams: Sequence[Upstream], protocol_options: dict[str, Any]
) -> dict[str, Any]:
    """The cluster of the replicas: every upstream, health-checked and ejected when
    its connections fail."""
    return {
        "name": name,
        "type": "STRICT_DNS" if upstreams_are_dns(upstreams) else "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "LEAST_REQUEST",
        # retries in flight at once: a share of the requests in flight (Envoy's default
        # is 3 at once, far too few when a replica dies under load: every call in
        # flight on it fails over together)
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "retry_budget": {
                        "budget_percent": {"value": RETRY_BUDGET_PERCENT},
                        "min_retry_concurrency": MIN_RETRY_CONCURRENCY,
                    },
                }
            ]
        },
        "typed_extension_protocol_options": protocol_options,
        "health_checks": [
            {
                "timeout": HEALTH_TIMEOUT,
                "interval": HEALTH_INTERVAL,
                "interval_jitter": "0.2s",
                "unhealthy_threshold": UNHEALTHY_AFTER,
                "healthy_threshold": HEALTHY_AFTER,
                # probe a new replica at once instead of after a first interval
                "no_traffic_interval": HEALTH_INTERVAL,
                "grpc_health_check": {"service_name": HEALTH_CHECK_SERVICE},
            }
        ],
        # a replica that failed its health check loses its connections at once (its
        # in-flight calls on them fail over on retry)
        "close_connections_on_host_health_failure": True,
        "outlier_detection": {
            # only connection failures, resets and timeouts count (a replica answering
            # UNAVAILABLE because the shared database is down is no worse than another:
            # the health checks say so)
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "enforcing_consecutive_local_origin_failure": 100,
            "enforcing_consecutive_5xx": 0,
            "enforcing_consecutive_gateway_failure": 0,
            "enforcing_success_rate": 0,
            "interval": "2s",
            "base_ejection_time": "10s",
            "max_ejection_percent": 50,
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": host, "port_value": port}}
                            }
                        }
                        for host, port in upstreams
                    ]
                }
            ],
        },
    }


def keepalive_protocol_options() -> dict[str, Any]:
    """HTTP/2 to the replicas with keepalive pings: a replica whose machine vanished
    (no FIN, no RST) is found within seconds, not at the kernel's TCP timeout."""
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {
                "http2_protocol_options": {
                    "connection_keepalive": {"interval": "10s", "timeout": "5s"}
                }
            },
        }
    }
