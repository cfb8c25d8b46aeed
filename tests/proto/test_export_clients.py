"""Clients in other languages, built only from what `nexus proto export` writes.

A real `nexus serve` of the example app (port 0, a fresh SQLite file) and real
toolchains: protoc with protoc-gen-go and protoc-gen-go-grpc (Debian's), then `go build`
of `clients/go` against Debian's Go sources (`/usr/share/gocode`, GOPATH mode, no
network); protoc's Java generator with grpc-java's plugin, then `javac` and `java` for
`clients/java` with Debian's jars; protoc with ts-proto (npm), then `tsc` and `node` for
`clients/ts`. No generator gets a flag about packages: the exported files carry their
`go_package`, `java_package` and the rest. Each client executes a workflow, streams
one, creates and lists typed records with a filter, and reads an error's ErrorInfo.
Server reflection, too, serves the comments (model docstrings, field descriptions) the
exported files carry.

Skipped, saying what is missing, when a toolchain is not installed; with CI=true that is
a failure (the Debian packages are in docs/api.md, "Clients in other languages", and
in the skip messages).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "contacts_app.py"
#: Every wait on a process is bounded by this many seconds (a cold `go build` of
#: grpc-go, or `javac` of every generated class, takes a minute or two on a busy machine).
WAIT = 360.0
READY = re.compile(r"Nexus gRPC server on (127\.0\.0\.1:\d+) ")
#: Debian's Go sources (golang-google-grpc-dev and its dependencies).
GOCODE = Path("/usr/share/gocode")

pytestmark = pytest.mark.timeout(900)


def _missing(what: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what}; CI=true, so this is a failure, not a skip")
    pytest.skip(what)


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def protos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example app's contracts, as `nexus proto export` writes them."""
    out = tmp_path_factory.mktemp("protos")
    _run([sys.executable, "-m", "nexus_server", "proto", "export", str(APP), "--out", str(out)],
         ROOT)  # fmt: skip
    return out


def _read_lines(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`nexus serve` on the example app, gRPC only, port 0; yields its address."""
    work = tmp_path_factory.mktemp("server")
    env = {**os.environ, "NEXUS_DATABASE_URL": f"sqlite:///{work / 'app.db'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_server", "serve", str(APP), "--grpc-port", "0",
         "--log-level", "warning", "--no-envoy", "--no-mcp"],
        cwd=work, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        address = None
        while address is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"nexus serve did not report its address in 60 s: {seen}")
            if line is None:
                pytest.fail(f"nexus serve exited with {proc.wait(30)}: {''.join(seen)}")
            seen.append(line)
            match = READY.match(line)
            address = match.group(1) if match else None
        yield address
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _our_protos(protos: Path) -> list[str]:
    return sorted(p.relative_to(protos).as_posix() for p in (protos / "nexus").rglob("*.proto"))


def _snake(value: Any) -> Any:
    """proto3 JSON printed with lowerCamelCase names (ts-proto's toJSON), as declared."""
    if isinstance(value, dict):
        return {re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", k).lower(): _snake(v)
                for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [_snake(v) for v in value]
    return value


def _check_result(result: dict[str, Any], name: str, email: str) -> None:
    """What every client prints: the same steps, in proto3 JSON."""
    result = _snake(result)
    execution = result["execution"]
    assert (execution["workflow"], execution["state"]) == ("create_contact", "STATE_SUCCEEDED")
    assert execution["outputs"]["create"]["name"] == name
    kinds = [next(k for k in e if k not in ("execution_id", "sequence", "time"))
             for e in result["events"]]  # fmt: skip
    assert kinds[0] == "execution_started" and kinds[-1] == "execution_completed"
    assert "node_completed" in kinds
    found = result["events"][-1]["execution_completed"]["execution"]["outputs"]["search"]
    assert [r["email"] for r in found["records"]] == [email]
    created = result["created"]
    assert (created["name"], created["score"], created["company"]) == (
        "Grace Hopper", "7", "Analytical Engines",
    )  # fmt: skip
    # the filter (its email, score >= 5) finds the typed record
    assert [c["id"] for c in result["listed"]["contacts"]] == [created["id"]]
    error = result["error"]
    assert error["reason"] == "RECORD_NOT_FOUND" and error["domain"] == "nexus"
    assert error["code"] in ("NotFound", "NOT_FOUND", 5)


def _go_toolchain() -> None:
    missing = [t for t in ("protoc", "protoc-gen-go", "protoc-gen-go-grpc", "go")
               if shutil.which(t) is None]  # fmt: skip
    for pkg in ("google.golang.org/grpc", "google.golang.org/genproto/googleapis/rpc",
                "github.com/golang/protobuf/proto"):  # fmt: skip
        if not (GOCODE / "src" / pkg).is_dir():
            missing.append(f"{GOCODE}/src/{pkg}")
    if missing:
        _missing(
            f"the Go toolchain is incomplete ({', '.join(missing)}): apt-get install "
            "golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev "
            "golang-google-genproto-dev golang-github-golang-protobuf-1-5-dev"
        )


def test_a_go_client_from_the_exported_files(protos: Path, server: str, tmp_path: Path) -> None:
    _go_toolchain()
    gopath = tmp_path / "go"
    src = gopath / "src"
    src.mkdir(parents=True)
    # no option but the output directories: the files say where their Go packages live
    _run(["protoc", f"-I{protos}", f"--go_out={src}", f"--go-grpc_out={src}",
          *_our_protos(protos)], tmp_path)  # fmt: skip
    assert (src / "nexus.local/api/nexus/models/v1/models.pb.go").is_file()
    assert (src / "nexus.local/api/nexus/workflow/v1/workflow_service_grpc.pb.go").is_file()
    (src / "nexusclient").mkdir()
    shutil.copyfile(ROOT / "clients" / "go" / "main.go", src / "nexusclient" / "main.go")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GO111MODULE": "off",  # Debian's sources, GOPATH layout: nothing to download
        "GOPATH": f"{gopath}:{GOCODE}",
        "GOCACHE": str(tmp_path / "gocache"),
        "GOFLAGS": "",
        "GOPROXY": "off",
    }
    # every generated package compiles, and the client with them
    _run(["go", "build", "nexus.local/api/..."], tmp_path, env)
    _run(["go", "build", "-o", str(tmp_path / "client"), "nexusclient"], tmp_path, env)
    name, email = "Ada Gopher", "ada.go@example.org"
    out = _run([str(tmp_path / "client"), "-server", server, "-name", name, "-email", email],
               tmp_path)  # fmt: skip
    _check_result(json.loads(out), name, email)


#: Debian's jars (/usr/share/java) the Java client compiles and runs with, and the
#: packages that install them.
JAVA_JARS = (
    "grpc-api", "grpc-context", "grpc-core", "grpc-netty", "grpc-protobuf",
    "grpc-protobuf-lite", "grpc-stub", "protobuf", "protobuf-util", "guava", "gson",
    "perfmark-api", "geronimo-annotation-1.3-spec", "netty-buffer", "netty-codec",
    "netty-codec-http", "netty-codec-http2", "netty-common", "netty-handler",
    "netty-resolver", "netty-transport",
)  # fmt: skip
JAVA_PACKAGES = (
    "protobuf-compiler protobuf-compiler-grpc-java-plugin libgrpc-java libprotobuf-java "
    "libguava-java libnetty-java libperfmark-java libgoogle-gson-java "
    "libgeronimo-annotation-1.3-spec-java"
)
JAVA_LIB = Path("/usr/share/java")
#: grpc-java's protoc plugin, as Debian installs it.
GRPC_JAVA_PLUGIN = Path("/usr/bin/grpc_java_plugin")


def _java_toolchain() -> str:
    missing = [t for t in ("protoc", "javac", "java") if shutil.which(t) is None]
    if not GRPC_JAVA_PLUGIN.exists():
        missing.append(str(GRPC_JAVA_PLUGIN))
    missing += [f"{JAVA_LIB}/{jar}.jar" for jar in JAVA_JARS
                if not (JAVA_LIB / f"{jar}.jar").exists()]  # fmt: skip
    if missing:
        _missing(
            f"the Java toolchain is incomplete ({', '.join(missing)}): apt-get install "
            f"{JAVA_PACKAGES}"
        )
    return ":".join(str(JAVA_LIB / f"{jar}.jar") for jar in JAVA_JARS)


def test_a_java_client_from_the_exported_files(protos: Path, server: str, tmp_path: Path) -> None:
    classpath = _java_toolchain()
    gen = tmp_path / "gen"
    gen.mkdir()
    # our files and the google/api and google/rpc imports (google/protobuf is in
    # protobuf-java); no option but the output directories
    files = _our_protos(protos) + sorted(
        p.relative_to(protos).as_posix()
        for d in ("google/api", "google/rpc")
        for p in (protos / d).glob("*.proto")
    )
    _run(["protoc", f"-I{protos}", f"--java_out={gen}", f"--grpc-java_out={gen}",
          f"--plugin=protoc-gen-grpc-java={GRPC_JAVA_PLUGIN}", *files], tmp_path)  # fmt: skip
    assert (gen / "io" / "nexus" / "models" / "v1" / "ContactServiceGrpc.java").is_file()
    classes = tmp_path / "classes"
    sources = [str(p) for p in gen.rglob("*.java")]
    _run(["javac", "-nowarn", "-d", str(classes), "-cp", classpath, *sources,
          str(ROOT / "clients" / "java" / "Main.java")], tmp_path)  # fmt: skip
    name, email = "Ada Java", "ada.java@example.org"
    out = _run(["java", "-cp", f"{classes}:{classpath}", "Main", "--server", server,
                "--name", name, "--email", email], tmp_path)  # fmt: skip
    _check_result(json.loads(out), name, email)


def _ts_toolchain() -> str:
    node = shutil.which("node")
    bins = ROOT / "node_modules" / ".bin"
    missing = [] if node else ["node"]
    missing += [str(bins / b) for b in ("protoc-gen-ts_proto", "tsc") if not (bins / b).exists()]
    if not (ROOT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        missing.append("@grpc/grpc-js")
    if missing:
        _missing(f"the TypeScript toolchain is incomplete ({', '.join(missing)}): run `npm ci`")
    assert node is not None
    return node


#: ts-proto's options: the runtime (@grpc/grpc-js), int64 as strings (exact), the field
#: names as declared. Nothing about packages or paths.
TS_PROTO_OPT = "outputServices=grpc-js,esModuleInterop=true,forceLong=string,snakeToCamel=false"

#: `nexus proto export`'s output only: protoc sees no other include directory.
PROTOC = "import sys; from grpc_tools import protoc; sys.exit(protoc.main(sys.argv))"


def test_a_typescript_client_from_the_exported_files(
    protos: Path, server: str, tmp_path: Path
) -> None:
    node = _ts_toolchain()
    gen = tmp_path / "gen"
    gen.mkdir()
    plugin = ROOT / "node_modules" / ".bin" / "protoc-gen-ts_proto"
    _run([sys.executable, "-c", PROTOC, f"-I{protos}", f"--plugin=protoc-gen-ts_proto={plugin}",
          f"--ts_proto_out={gen}", f"--ts_proto_opt={TS_PROTO_OPT}",
          "google/rpc/error_details.proto", *_our_protos(protos)], tmp_path)  # fmt: skip
    assert (gen / "nexus" / "models" / "v1" / "models.ts").is_file()
    shutil.copyfile(ROOT / "clients" / "ts" / "client.ts", tmp_path / "client.ts")
    shutil.copyfile(ROOT / "clients" / "ts" / "tsconfig.json", tmp_path / "tsconfig.json")
    (tmp_path / "node_modules").symlink_to(ROOT / "node_modules")
    # strict type-checking of the client against every generated file
    _run([node, str(ROOT / "node_modules" / "typescript" / "bin" / "tsc"), "-p", "."], tmp_path)
    name, email = "Ada Typescript", "ada.ts@example.org"
    out = _run([node, "dist/client.js", "--server", server, "--name", name, "--email", email],
               tmp_path)  # fmt: skip
    _check_result(json.loads(out), name, email)


def _reflected_file(server: str, symbol: str, name: str) -> descriptor_pb2.FileDescriptorProto:
    """The file `name` among those reflection returns for `symbol` (and its imports)."""
    with grpc.insecure_channel(server) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    return next(f for f in files if f.name == name)


def _comments(fdp: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {tuple(loc.path): loc.leading_comments for loc in fdp.source_code_info.location}


def test_reflection_serves_the_descriptions(server: str) -> None:
    """Reflection clients see the model docstring and field descriptions, and the
    comments of the static contracts, as the exported files have them."""
    models = _reflected_file(
        server, "nexus.models.v1.ContactService", "nexus/models/v1/models.proto"
    )
    comments = _comments(models)
    i = next(i for i, m in enumerate(models.message_type) if m.name == "Contact")
    j = next(j for j, f in enumerate(models.message_type[i].field) if f.name == "email")
    assert comments[(4, i)].startswith(" A person to keep in touch with.\n")
    assert comments[(4, i, 2, j)] == " Where to write to. Unique.\n"
    s = next(s for s, svc in enumerate(models.service) if svc.name == "ContactService")
    assert "Creates a Contact" in comments[(6, s, 2, 0)]
    workflows = _reflected_file(
        server, "nexus.workflow.v1.WorkflowService", "nexus/workflow/v1/workflow_service.proto"
    )
    assert "Registers, describes and runs workflows" in _comments(workflows)[(6, 0)]
