"""The server's resource limits: what one request, one client or one connection may cost.

One frozen `Limits` value holds every bound, with documented defaults (docs/server.md,
"Limits"); `Nexus(limits=Limits(...))` changes them. The registration limits are checked
before anything of a definition is parsed, so a refused request costs next to nothing;
the connection limits go to the gRPC server's channel arguments and to Envoy's
configuration, so an idle or half-open client cannot hold a socket forever.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

__all__ = ["Limits"]

#: File descriptors kept free for the server's own use (database, log and child files)
#: when the connection limit is derived from the process's descriptor limit.
_FD_RESERVE = 256


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@dataclass(frozen=True)
class Limits:
    """Bounds on what requests and connections may cost the server.

    Registration (RegisterWorkflow, checked in this order, before any parsing):

    Args:
        max_workflows: workflows registered over the network at once (those the app
            registers in code do not count). A registration beyond it fails with
            FAILED_PRECONDITION; replacing a registered workflow always works.
        max_definition_bytes: size of a definition (its protobuf encoding).
        max_workflow_nodes: nodes in one definition.
        max_workflow_connections: connections in one definition.
        max_code_chars: characters of code in one code-bearing node (PythonCodeNode's
            `code`), when code nodes are allowed at all.
        registration_timeout: seconds the validation of one definition (parsing and
            compiling code, checking the graph) may take; it runs off the event loop.
        max_list_bytes: encoded size of one ListWorkflows page; a page stops early (with
            a next_page_token) rather than exceed it, far below gRPC's 4 MiB message limit.

    Connections (the gRPC server's, and Envoy's downstream ones):

    Args:
        max_connections: open client connections at once (gRPC server and Envoy each);
            None: the process's file descriptor limit less 256, at most 10,000.
        handshake_timeout: seconds a new gRPC connection gets to complete its HTTP/2
            handshake (a TCP connection that sends nothing is closed after it).
        connection_idle_timeout: seconds a connection with no call in progress stays
            open (gRPC `max_connection_idle`, Envoy `idle_timeout`).
        max_connection_age: seconds after which a connection is asked to go away (clients
            reconnect transparently; gRPC `max_connection_age`, Envoy
            `max_connection_duration`).
        max_connection_age_grace: seconds calls still running on a connection past its
            age get to finish before it is closed (gRPC only; Envoy waits for them).
        keepalive_time: seconds of silence after which the gRPC server pings a client.
        keepalive_timeout: seconds a ping waits for its answer before the connection is
            closed as dead.
        min_client_ping_interval: the shortest interval between a client's keepalive
            pings that the gRPC server tolerates (more often: the connection is closed).
        per_connection_buffer_bytes: Envoy's read/write buffer per connection.

    Load shedding (docs/operations.md, "Rate limits and load shedding"):

    Args:
        max_in_flight: calls the server runs at once; past it a call is refused at
            once with RESOURCE_EXHAUSTED (`OVERLOADED`, RetryInfo) instead of waiting
            in a queue. Health checks are never refused. None: no cap.
        max_executions: workflow executions (ExecuteWorkflow, StreamExecution) the
            server runs at once, refused the same way past it. None: no cap.

    Health:

    Args:
        health_check_timeout: seconds one database ping may take.
        health_check_failures: consecutive failed pings before the health service says
            NOT_SERVING (a ping that timed out while the event loop was late does not
            count: a busy server is not a missing database).
    """

    max_workflows: int = 1_000
    max_definition_bytes: int = 256 * 1024
    max_workflow_nodes: int = 2_000
    max_workflow_connections: int = 10_000
    max_code_chars: int = 64 * 1024
    registration_timeout: float = 10.0
    max_list_bytes: int = 2 * 1024 * 1024

    max_connections: int | None = None
    handshake_timeout: float = 10.0
    connection_idle_timeout: float = 300.0
    max_connection_age: float = 3600.0
    max_connection_age_grace: float = 3600.0
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    min_client_ping_interval: float = 10.0
    per_connection_buffer_bytes: int = 1024 * 1024

    max_in_flight: int | None = None
    max_executions: int | None = None

    health_check_timeout: float = 2.0
    health_check_failures: int = 3

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is not None and not value > 0:
                raise ValueError(f"Limits.{name} must be positive, got {value!r}")

    @property
    def connections(self) -> int:
        """`max_connections`, or the limit derived from the file descriptor limit."""
        if self.max_connections is not None:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return 10_000
        return max(64, min(10_000, soft - _FD_RESERVE))

    def grpc_options(self) -> list[tuple[str, int]]:
        """The gRPC server's channel arguments for these limits."""
        return [
            ("grpc.max_allowed_incoming_connections", self.connections),
            ("grpc.server_handshake_timeout_ms", _ms(self.handshake_timeout)),
            ("grpc.max_connection_idle_ms", _ms(self.connection_idle_timeout)),
            ("grpc.max_connection_age_ms", _ms(self.max_connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(self.max_connection_age_grace)),
            ("grpc.keepalive_time_ms", _ms(self.keepalive_time)),
            ("grpc.keepalive_timeout_ms", _ms(self.keepalive_timeout)),
            # clients may keep an idle connection alive with pings, not more often than this
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(self.min_client_ping_interval)),
            ("grpc.http2.max_ping_strikes", 2),
            # the server's own keepalive pings continue on a connection without data
            ("grpc.http2.max_pings_without_data", 0),
        ]
