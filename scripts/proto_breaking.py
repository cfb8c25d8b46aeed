#!/usr/bin/env python3
"""`buf breaking` of the working tree's protos against the last landed main.

Run by `make protocheck`. The base is the `proto/` tree (and `buf.yaml`) of branch
`main`, or of the ref in `NEXUS_PROTO_BASE`.

Why not plain `buf breaking --against '.git#branch=main'`: our buf.yaml lists the
git-ignored `.proto-deps/` module (the google/api and google/rpc imports, copied from
googleapis-common-protos by scripts/gen_protos.py), which a git input does not contain,
so buf cannot build it. This script takes the same base from git (`git archive`), adds
the same `.proto-deps/`, and runs `buf breaking --against` on that directory: offline,
same rules, same result.

The check is skipped, saying why, when the base ref does not exist or holds no .proto
files yet (the first landing of the contracts): there is nothing to break.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "node_modules" / ".bin" / "buf"
DEPS_DIR = ROOT / ".proto-deps"


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=False)


def main() -> int:
    base = os.environ.get("NEXUS_PROTO_BASE", "main")
    if _git("rev-parse", "--verify", "--quiet", f"{base}^{{commit}}").returncode != 0:
        print(f"buf breaking: skipped, there is no '{base}' to compare with")
        return 0
    listed = _git("ls-tree", "-r", "--name-only", base, "--", "proto")
    if not any(n.endswith(".proto") for n in listed.stdout.decode().splitlines()):
        print(
            f"buf breaking: skipped, '{base}' has no .proto files yet "
            "(first landing of the contracts: nothing to break)"
        )
        return 0
    if not BUF.exists():
        print(f"buf breaking: {BUF} is missing; run `npm ci` (make does)", file=sys.stderr)
        return 2
    if not DEPS_DIR.is_dir():
        print("buf breaking: .proto-deps/ is missing; run scripts/gen_protos.py", file=sys.stderr)
        return 2
    paths = ["proto"]
    if _git("cat-file", "-e", f"{base}:buf.yaml").returncode == 0:
        paths.append("buf.yaml")
    archive = _git("archive", "--format=tar", base, "--", *paths)
    if archive.returncode != 0:
        sys.stderr.write(archive.stderr.decode())
        return 2
    with tempfile.TemporaryDirectory(prefix="nexus-proto-base-") as tmp:
        against = Path(tmp)
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(against, filter="data")
        if not (against / "buf.yaml").exists():
            shutil.copyfile(ROOT / "buf.yaml", against / "buf.yaml")
        shutil.copytree(DEPS_DIR, against / ".proto-deps")
        result = subprocess.run([str(BUF), "breaking", "--against", str(against)], cwd=ROOT)
    if result.returncode == 0:
        print(f"buf breaking: no breaking change against '{base}'")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
