"""`nexus proto export`: the printed .proto compiles back to the served descriptors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "contacts_app.py"


def test_export_round_trips_through_protoc(tmp_path: Path) -> None:
    out = tmp_path / "protos"
    done = subprocess.run(
        [sys.executable, "-m", "nexus_server", "proto", "export", str(APP), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    listed = set(done.stdout.split())
    assert "nexus/models/v1/models.proto" in listed
    assert "nexus/workflow/v1/workflow_service.proto" in listed
    assert "nexus.binpb" in listed

    compiled = tmp_path / "compiled.binpb"
    protoc = subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{out}",
            f"--descriptor_set_out={compiled}", "--include_source_info",
            "nexus/models/v1/models.proto",
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert protoc.returncode == 0, protoc.stderr
    assert "warning" not in protoc.stderr
    from_source = descriptor_pb2.FileDescriptorSet.FromString(compiled.read_bytes()).file[0]

    exported = descriptor_pb2.FileDescriptorSet.FromString((out / "nexus.binpb").read_bytes())
    served = next(f for f in exported.file if f.name == "nexus/models/v1/models.proto")

    # the comments (model docstrings, field descriptions) are the served ones
    def comments(fdp: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
        return {
            tuple(loc.path): loc.leading_comments
            for loc in fdp.source_code_info.location
            if loc.leading_comments and list(loc.path) != [12]  # (the `syntax` header)
        }

    assert comments(from_source) == comments(served)
    assert comments(served)[(4, 2)].startswith(" A company contacts work for.\n")
    # protoc fills json_name only when asked, and spans only from a source; compare
    # everything else exactly
    for fdp in (from_source, served):
        fdp.ClearField("source_code_info")
        for msg in fdp.message_type:
            for f in msg.field:
                f.ClearField("json_name")
    assert from_source == served
    names = [s.name for s in served.service]
    assert names == ["CompanyService", "ContactService"]
    contact = next(m for m in served.message_type if m.name == "Contact")
    assert [f.name for f in contact.field] == [
        "id", "name", "email", "company", "score", "created_at", "updated_at",
    ]  # fmt: skip


def test_the_nexus_command_hands_server_commands_to_the_server(tmp_path: Path) -> None:
    # `nexus` is the client CLI's entry point; `nexus proto export` must still work
    out = tmp_path / "via-nexus"
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", "proto", "export", str(APP), "--out", str(out)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (out / "nexus" / "models" / "v1" / "models.proto").is_file()
