"""`nexus proto export`: every exported file carries the options code generators read,
in its source and in `nexus.binpb`, and `--go-module` sets the Go import path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "contacts_app.py"

#: protoc sees the exported directory only.
PROTOC = "import sys; from grpc_tools import protoc; sys.exit(protoc.main(sys.argv))"


def _export(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus_server", "proto", "export", str(APP), "--out", str(out),
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _compile(protos: Path, tmp_path: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Every exported .proto, compiled from the sources by protoc."""
    names = sorted(p.relative_to(protos).as_posix() for p in protos.rglob("*.proto"))
    out = tmp_path / "compiled.binpb"
    done = subprocess.run(
        [sys.executable, "-c", PROTOC, f"-I{protos}", f"--descriptor_set_out={out}", *names],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}


def test_every_file_of_ours_has_the_language_options(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    done = _export(protos)
    assert done.returncode == 0, done.stderr
    compiled = _compile(protos, tmp_path)
    exported = {
        f.name: f
        for f in descriptor_pb2.FileDescriptorSet.FromString(
            (protos / "nexus.binpb").read_bytes()
        ).file
    }
    ours = sorted(n for n in compiled if n.startswith("nexus/"))
    assert "nexus/models/v1/models.proto" in ours
    assert "nexus/workflow/v1/workflow_service.proto" in ours
    assert "nexus/common/v1/errors.proto" in ours
    for name in ours:
        opts = compiled[name].options
        directory, stem = name.rsplit("/", 1)
        area = directory.split("/")[1]
        pascal = "".join(w.capitalize() for w in stem.removesuffix(".proto").split("_"))
        assert opts.go_package == f"nexus.local/api/{directory};{area}v1", name
        assert opts.java_package == f"io.nexus.{area}.v1"
        assert opts.java_multiple_files is True
        assert opts.java_outer_classname == f"{pascal}Proto"
        assert opts.csharp_namespace == f"Nexus.{area.capitalize()}.V1"
        assert opts.php_namespace == f"Nexus\\{area.capitalize()}\\V1"
        assert opts.ruby_package == f"Nexus::{area.capitalize()}::V1"
        assert opts.objc_class_prefix == f"NX{area.upper()}"
        # the descriptor set says the same as the sources
        assert exported[name].options == opts, name
    # one Go package per directory
    go = [compiled[n].options.go_package for n in ours]
    assert len({g.split(";")[0] for g in go}) == len({n.rsplit("/", 1)[0] for n in ours})
    # the google files keep their own options
    assert compiled["google/rpc/status.proto"].options.go_package.startswith(
        "google.golang.org/genproto/googleapis/rpc/status"
    )
    assert compiled["google/api/annotations.proto"].options.java_package == "com.google.api"


def test_go_module_sets_the_import_path(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    done = _export(protos, "--go-module", "github.com/acme/app/gen")
    assert done.returncode == 0, done.stderr
    text = (protos / "nexus" / "models" / "v1" / "models.proto").read_text()
    assert 'option go_package = "github.com/acme/app/gen/nexus/models/v1;modelsv1";' in text
    workflow = (protos / "nexus" / "workflow" / "v1" / "workflow_service.proto").read_text()
    assert 'option go_package = "github.com/acme/app/gen/nexus/workflow/v1;workflowv1";' in workflow


def test_a_bad_go_module_is_refused(tmp_path: Path) -> None:
    done = _export(tmp_path / "protos", "--go-module", 'x"; option y = "z')
    assert done.returncode == 2
    assert "--go-module: must be a Go import path" in done.stderr
    assert not (tmp_path / "protos").exists()
