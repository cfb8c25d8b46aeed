"""`nexus envoy-config --upstream` and the Envoy configuration in front of replicas
(`nexus_server/_upstreams.py`), and the `x-nexus-request-id` header the Python clients
send so that Envoy can tell a retryable write.

The retry rules run in a real Envoy in front of two stand-in replicas (grpc.aio servers
with the health service): one answers UNAVAILABLE to everything, the other answers. A
write is retried on the other replica only when it carries the header; a read always.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from clients._grpc import REQUEST_ID_HEADER, call_metadata
from clients.cli._credentials import _CallMetadata
from nexus_api import descriptor_set_bytes
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wpb
from nexus_api.nexus.workflow.v1 import workflow_service_pb2_grpc as wgrpc
from nexus_server import _upstreams
from nexus_server._envoy import (
    EnvoyOptions,
    EnvoySupervisor,
    admin_get,
    envoy_config,
)

ROOT = Path(__file__).resolve().parents[2]
APP = "examples/contacts_app.py"
WAIT = 20.0
SERVICE = "nexus.workflow.v1.WorkflowService"


def _nexus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus_server", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- the command line --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nexus-1", "expected HOST:PORT"),
        (":50051", "expected HOST:PORT"),
        ("nexus-1:0", "a number from 1 to 65535"),
        ("nexus-1:65536", "a number from 1 to 65535"),
        ("nexus-1:http", "a number from 1 to 65535"),
        ("::1:50051", "in brackets"),
        ("[nope]:50051", "not an IPv6 address"),
        ("bad_host:50051", "an IP address or a DNS name"),
        ("-x.example:50051", "an IP address or a DNS name"),
    ],
)
def test_a_bad_upstream_is_a_usage_error(value: str, message: str) -> None:
    done = _nexus("envoy-config", APP, f"--upstream={value}")
    assert done.returncode == 2, done.stderr
    assert "argument --upstream" in done.stderr and message in done.stderr, done.stderr
    assert not done.stdout


def test_upstream_conflicts_are_usage_errors() -> None:
    twice = _nexus("envoy-config", APP, "--upstream=a:1", "--upstream=a:1")
    assert twice.returncode == 2 and "--upstream a:1 is given twice" in twice.stderr
    both = _nexus("envoy-config", APP, "--upstream=a:1", "--grpc-host", "b")
    assert both.returncode == 2 and "--upstream replaces --grpc-host" in both.stderr


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("10.0.0.5:50051", ("10.0.0.5", 50051)),
        ("nexus-1:1", ("nexus-1", 1)),
        ("nexus-replicas.default.svc.cluster.local:65535", (
            "nexus-replicas.default.svc.cluster.local", 65535)),
        ("[::1]:50051", ("::1", 50051)),
    ],
)  # fmt: skip
def test_good_upstreams_parse(text: str, parsed: tuple[str, int]) -> None:
    assert _upstreams.parse_upstream(text) == parsed


def test_envoy_config_lists_every_upstream(envoy_path: Path, tmp_path: Path) -> None:
    done = _nexus(
        "envoy-config", APP, "--upstream=10.0.0.1:50051", "--upstream=nexus-2:50052",
        "--upstream=[::1]:50053", "--embed-descriptor",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "nexus_grpc"]
    endpoints = [
        e["endpoint"]["address"]["socket_address"]
        for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert endpoints == [
        {"address": "10.0.0.1", "port_value": 50051},
        {"address": "nexus-2", "port_value": 50052},
        {"address": "::1", "port_value": 50053},
    ]
    assert cluster["type"] == "STRICT_DNS"  # a DNS name among them
    assert "nexus-2:50052" in done.stdout.split("overload_manager")[0]  # named in the header
    path = tmp_path / "envoy.yaml"
    path.write_text(done.stdout)
    check = subprocess.run(
        [str(envoy_path), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# --- the configuration -------------------------------------------------------------------


def _config(**kw: Any) -> dict[str, Any]:
    return envoy_config(descriptor_set_bytes(), EnvoyOptions(**kw))


def _routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes: list[dict[str, Any]] = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    return routes


def test_routes_retry_reads_and_keyed_writes_only() -> None:
    config = _config(upstreams=(("127.0.0.1", 1), ("127.0.0.1", 2)))
    routes = _routes(config)
    by_path = {r["match"]["path"]: r for r in routes if "path" in r["match"]}
    read = _upstreams.READ_RETRY_ON
    for method in ("GetExecution", "ListExecutions", "WatchExecution", "GetWorkflow"):
        assert by_path[f"/{SERVICE}/{method}"]["route"]["retry_policy"]["retry_on"] == read
    assert by_path["/grpc.health.v1.Health/Check"]["route"]["retry_policy"]["retry_on"] == read
    for write in ("ExecuteWorkflow", "StreamExecution", "CancelExecution", "RegisterWorkflow"):
        assert f"/{SERVICE}/{write}" not in by_path
    assert "/nexus.model.v1.ModelService/CreateRecord" not in by_path
    assert "/nexus.model.v1.ModelService/ListRecords" in by_path
    # then the unbuffered streaming route (gRPC, gRPC-Web and Connect content types),
    # retried as the catch-all it copies
    keyed, streaming, catch_all = routes[-3:]
    assert streaming["match"]["headers"][0]["name"] == "content-type"
    assert streaming["route"]["retry_policy"]["retry_on"] == _upstreams.SAFE_RETRY_ON
    assert keyed["match"] == {
        "prefix": "/",
        "headers": [{"name": REQUEST_ID_HEADER, "present_match": True}],
    }
    assert keyed["route"]["retry_policy"]["retry_on"] == read
    assert catch_all["match"] == {"prefix": "/"}
    assert catch_all["route"]["retry_policy"]["retry_on"] == _upstreams.SAFE_RETRY_ON
    # every route (the REST probe routes too) has a retry policy, to another replica
    for route in routes:
        policy = route["route"]["retry_policy"]
        assert policy["retry_host_predicate"][0]["name"].endswith("previous_hosts")
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "nexus_grpc"]
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": ""}
    assert cluster["outlier_detection"]["consecutive_local_origin_failure"] == 2
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    assert hcm["typed_config"]["drain_timeout"] == _upstreams.DRAIN_TIMEOUT


def test_a_single_server_has_none_of_it() -> None:
    config = _config()
    text = json.dumps(config)
    for word in ("retry_policy", "health_checks", "outlier_detection", "drain_timeout"):
        assert word not in text
    assert [r["match"] for r in _routes(config)][-1] == {"prefix": "/"}


# --- the clients' header ------------------------------------------------------------------


def test_call_metadata_carries_the_request_id() -> None:
    assert (REQUEST_ID_HEADER, "k-1") in call_metadata("k-1")
    assert REQUEST_ID_HEADER not in dict(call_metadata())
    assert REQUEST_ID_HEADER not in dict(call_metadata(""))


class _Details:
    method = f"/{SERVICE}/ExecuteWorkflow"
    timeout = None
    metadata = None
    credentials = None


def test_the_cli_channel_sends_a_requests_id_as_the_header() -> None:
    sent = _CallMetadata()._details(_Details(), wpb.ExecuteWorkflowRequest(request_id="k-2"))
    assert (REQUEST_ID_HEADER, "k-2") in sent.metadata
    plain = _CallMetadata()._details(_Details(), wpb.ExecuteWorkflowRequest())
    assert REQUEST_ID_HEADER not in dict(plain.metadata)
    read = _CallMetadata()._details(_Details(), wpb.GetExecutionRequest(id="x"))
    assert REQUEST_ID_HEADER not in dict(read.metadata)


class _CapturingModels:
    """A ModelService stub that keeps the metadata of each call (a unit test of the
    adapter's metadata, without a server)."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    async def CreateRecord(self, request: Any, metadata: Any = ()) -> Any:
        from google.protobuf import struct_pb2

        self.metadata.append(dict(metadata))
        return struct_pb2.Struct()

    async def GetRecord(self, request: Any, metadata: Any = ()) -> Any:
        return await self.CreateRecord(request, metadata)


async def test_the_mcp_adapter_sends_a_writes_request_id_as_the_header() -> None:
    from clients.mcp._server import Adapter
    from clients.mcp._tools import ToolSpec

    adapter = Adapter("127.0.0.1:1")
    models = _CapturingModels()
    adapter._ms = lambda: models  # type: ignore[method-assign]

    def spec(kind: str, request_id: bool) -> ToolSpec:
        return ToolSpec(
            name=f"contacts_{kind}", description="", input_schema={}, kind=kind,
            target="Contact", request_id=request_id,
        )  # fmt: skip

    await adapter._model_op(spec("create", True), {"name": "Ada", "request_id": "m-1"})
    await adapter._model_op(spec("create", True), {"name": "Ada"})
    await adapter._model_op(spec("get", False), {"id": "x"})
    assert models.metadata[0].get(REQUEST_ID_HEADER) == "m-1"
    assert REQUEST_ID_HEADER not in models.metadata[1]
    assert REQUEST_ID_HEADER not in models.metadata[2]


# --- the rules, in a real Envoy -----------------------------------------------------------


class _Replica:
    """A stand-in replica: the health service SERVING, ExecuteWorkflow and GetExecution
    answered (`failing`: UNAVAILABLE), each call counted."""

    def __init__(self, failing: bool) -> None:
        self.failing = failing
        self.calls = 0
        self.port = 0
        self.server = grpc.aio.server()

    async def _answer(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        self.calls += 1
        if self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "this replica is unavailable")
        return wpb.Execution(id="from-the-good-replica", state=wpb.Execution.STATE_SUCCEEDED)

    async def start(self) -> None:
        def unary(request_type: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                self._answer,
                request_deserializer=request_type.FromString,
                response_serializer=wpb.Execution.SerializeToString,
            )

        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    SERVICE,
                    {
                        "ExecuteWorkflow": unary(wpb.ExecuteWorkflowRequest),
                        "GetExecution": unary(wpb.GetExecutionRequest),
                    },
                )
            ]
        )
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()


@pytest.fixture
async def two_replicas(
    envoy_path: Path,
) -> AsyncIterator[tuple[str, _Replica, _Replica, Path]]:
    bad, good = _Replica(failing=True), _Replica(failing=False)
    await bad.start()
    await good.start()
    envoy = EnvoySupervisor(
        descriptor_set_bytes(),
        EnvoyOptions(
            api_port=0,
            upstreams=(("127.0.0.1", bad.port), ("127.0.0.1", good.port)),
        ),
        binary=envoy_path,
        concurrency=1,
    )
    await envoy.start()
    try:
        await _wait_both_healthy(envoy.admin_socket)
        yield envoy.address, bad, good, envoy.admin_socket
    finally:
        await envoy.stop()
        await bad.server.stop(0)
        await good.server.stop(0)


async def _wait_both_healthy(admin: Path) -> None:
    """Until Envoy finds both replicas healthy (a health check that timed out on a
    busy machine takes one out for a while; the tests need both)."""
    deadline = time.monotonic() + WAIT
    while not await asyncio.to_thread(_both_healthy, admin):
        assert time.monotonic() < deadline, "the replicas are not both healthy in Envoy"
        await asyncio.sleep(0.1)


def _both_healthy(admin: Path) -> bool:
    status, body = admin_get(admin, "/clusters?format=json")
    if status != 200:
        return False
    for cluster in json.loads(body).get("cluster_statuses", []):
        if cluster["name"] == "nexus_grpc":
            hosts = cluster.get("host_statuses", [])
            return len(hosts) == 2 and all(
                h.get("health_status", {}).get("eds_health_status") == "HEALTHY"
                and not h.get("health_status", {}).get("failed_active_health_check")
                for h in hosts
            )
    return False


#: Calls of each kind: each lands on the failing replica first with probability 1/2,
#: so with 24 of them at least one does, but with probability 2^-24.
CALLS = 24
#: CLI processes in the CLI test (each lands on the failing replica first with
#: probability 1/2: none does with probability 2^-16).
RUNS = 16


@pytest.mark.timeout(90)
async def test_envoy_retries_reads_and_keyed_writes_on_another_replica(
    two_replicas: tuple[str, _Replica, _Replica, Path],
) -> None:
    address, bad, good, admin = two_replicas
    async with grpc.aio.insecure_channel(address) as channel:
        stub = wgrpc.WorkflowServiceStub(channel)  # type: ignore[no-untyped-call]

        async def outcomes(call: Any, request: Any, metadata: Any = ()) -> list[str]:
            got = []
            for _ in range(CALLS):
                await _wait_both_healthy(admin)
                try:
                    done = await call(request, metadata=metadata, timeout=10)
                    got.append(done.id)
                except grpc.aio.AioRpcError as err:
                    got.append(err.code().name)
            return got

        # a write with the header: the failing replica's UNAVAILABLE is retried
        before = bad.calls
        keyed = await outcomes(
            stub.ExecuteWorkflow,
            wpb.ExecuteWorkflowRequest(name="w", request_id="k"),
            ((REQUEST_ID_HEADER, "k"),),
        )
        assert set(keyed) == {"from-the-good-replica"}, keyed
        assert bad.calls > before, "no keyed write reached the failing replica"
        # a read: likewise
        before = bad.calls
        reads = await outcomes(stub.GetExecution, wpb.GetExecutionRequest(id="x"))
        assert set(reads) == {"from-the-good-replica"}, reads
        assert bad.calls > before
        # a write without it: the failing replica's answer reaches the client
        before = bad.calls
        plain = await outcomes(stub.ExecuteWorkflow, wpb.ExecuteWorkflowRequest(name="w"))
        assert plain.count("UNAVAILABLE") == bad.calls - before > 0, plain
        assert set(plain) == {"UNAVAILABLE", "from-the-good-replica"}
    # every answer came from the good replica once: nothing ran twice there
    assert good.calls == CALLS * 2 + plain.count("from-the-good-replica")


@pytest.mark.timeout(120)
async def test_the_cli_sends_the_header_envoy_retries_on(
    two_replicas: tuple[str, _Replica, _Replica, Path], tmp_path: Path
) -> None:
    """`nexus call` (a real CLI process) with a request_id: Envoy retries the write away
    from the failing replica, so every call succeeds, though some reached it first."""
    address, bad, good, admin = two_replicas
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["HOME"] = str(tmp_path)  # no stored login
    outputs = []
    for i in range(RUNS):
        await _wait_both_healthy(admin)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clients.cli", "--server", address, "-o", "json", "call",
            "WorkflowService/ExecuteWorkflow", "--json", f'{{"name": "w", "request_id": "c-{i}"}}',
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        outputs.append(json.loads(out)["id"])
    assert set(outputs) == {"from-the-good-replica"}
    assert bad.calls > 0, "no call reached the failing replica first"
    assert good.calls == RUNS, (good.calls, bad.calls)


def test_the_cap_on_calls_in_flight_covers_every_replica() -> None:
    """`Limits(max_in_flight=N)` in front of 3 replicas: Envoy lets 3N requests in flight
    (N per replica) and refuses the rest itself; the probes' uncapped cluster reaches the
    same replicas, health-checked like the capped one."""
    from nexus_server import Limits

    ups = (("127.0.0.1", 1), ("127.0.0.1", 2), ("127.0.0.1", 3))
    config = _config(upstreams=ups, limits=Limits(max_in_flight=4))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    capped = clusters["nexus_grpc"]["circuit_breakers"]["thresholds"][0]
    assert (capped["max_requests"], capped["max_pending_requests"]) == (12, 12)
    assert "retry_budget" in capped  # the replicas' retry budget is kept
    probes = clusters["nexus_probes"]
    assert "max_requests" not in probes["circuit_breakers"]["thresholds"][0]
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in probes["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [1, 2, 3]
    assert probes["health_checks"] == clusters["nexus_grpc"]["health_checks"]
