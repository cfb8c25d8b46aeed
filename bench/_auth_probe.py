"""The gateway's steps timed inside a served call, per credential.

`bench/_auth_cost.py` times the admission of a call in a tight loop, where the code and
its data stay in the CPU's caches; inside a server every call runs much other code in
between, and the same steps cost several times more. This serves the app of
`bench/grpc.py` (authentication on: an environment API key and an HS256 secret, a
managed key made at start) in this process, with a timer around each step of the
chain's authentication, drives it with h2load (one connection, `--concurrency` streams)
with each credential in turn, and prints µs per call of each step.

The timers are `time.perf_counter` around the awaited step (none of these steps waits
on anything while it runs: the managed key's read runs on the calling thread), so a
step's time includes the steps it calls, and about 0.2 µs of the timer itself.

Run: `.venv/bin/python -m bench._auth_probe` (`--calls`, `--concurrency`; `--auth-off`
serves the same app without authentication, for the admission's time without it).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib.util
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-" + "k" * 40
JWT_SECRET = "bench-" + "s" * 48

#: (module, class, method, label): the steps timed, outermost first.
STEPS = (
    ("nexus_server.gateway._chain", "Gateway", "_admit", "Gateway._admit"),
    ("nexus_server.gateway._authn", "Authenticator", "authenticate", "Authenticator.authenticate"),
    ("nexus_server.gateway._jwt", "JwtVerifier", "verify", "JwtVerifier.verify"),
    ("nexus_server.gateway._keys", "KeyStore", "lookup", "KeyStore.lookup"),
    ("dataflow._dataflow", "DataFlow", "fetchrow", "DataFlow.fetchrow"),
)

_totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])


def _timed(label: str, method: Callable[..., Any]) -> Callable[..., Any]:
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            entry = _totals[label]
            entry[0] += 1
            entry[1] += time.perf_counter() - started

    return timed


#: single reads that could not run on the calling thread (see `DataFlow._here`)
_fallbacks = [0]


def _instrument() -> None:
    for module, cls, name, label in STEPS:
        owner = getattr(importlib.import_module(module), cls)
        setattr(owner, name, _timed(label, getattr(owner, name)))
    dataflow_module: Any = importlib.import_module("dataflow._dataflow")
    here = dataflow_module.DataFlow._here

    def counted(self: Any, model: Any, write: bool, work: Any, rows: int) -> Any:
        result = here(self, model, write, work, rows)
        if not write and isinstance(result, dataflow_module._NotHere):
            _fallbacks[0] += 1
        return result

    dataflow_module.DataFlow._here = counted


def _bench_grpc() -> Any:
    """bench/grpc.py as a module (its name would shadow grpc as an import)."""
    spec = importlib.util.spec_from_file_location("bench_grpc", ROOT / "bench" / "grpc.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_grpc"] = module
    spec.loader.exec_module(module)
    return module


async def _h2load(
    address: str, body: Path, header: str | None, calls: int, concurrency: int
) -> str:
    extra = ("-H", header) if header else ()
    proc = await asyncio.create_subprocess_exec(
        "h2load", "-n", str(calls), "-c", "1", "-t", "1", "-m", str(concurrency),
        "-H", "content-type: application/grpc", "-H", "te: trailers", *extra,
        "-d", str(body), f"http://{address}/nexus.workflow.v1.WorkflowService/ExecuteWorkflow",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=calls / 50 + 60)
    text = out.decode()
    done = re.search(r"(\d+) succeeded, (\d+) failed", text)
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
    if proc.returncode != 0 or not done or not rate or done.group(2) != "0":
        raise RuntimeError(f"h2load failed:\n{text}")
    return f"{float(rate.group(1)):,.0f} calls/s"


async def _serve(calls: int, concurrency: int, tmp: Path, auth: bool) -> None:
    bench = _bench_grpc()
    app_file = bench.write_app(tmp, 1, auth=True)
    spec = importlib.util.spec_from_file_location("bench_auth_app", app_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.app
    app.enable_auth = auth
    keys_module = importlib.import_module("nexus_server.gateway._keys")
    token = jwt.encode(
        {"sub": "bench", "roles": ["bench"], "exp": int(time.time()) + 3600},
        JWT_SECRET,
        algorithm="HS256",
    )
    body = tmp / "body"
    raw: bytes = bench.execute_body("noop")
    body.write_bytes(b"\x00" + len(raw).to_bytes(4, "big") + raw)
    async with app.serving() as serving:
        _, managed = await keys_module.KeyStore(app.db).create(
            "bench_managed", ["bench"], None, None, "key:bench"
        )
        address = f"127.0.0.1:{serving.port}"
        credentials: tuple[tuple[str, str | None], ...] = (
            (
                ("env API key", f"x-api-key: {API_KEY}"),
                ("JWT HS256, same token", f"authorization: Bearer {token}"),
                ("managed key (DB read)", f"x-api-key: {managed}"),
            )
            if auth
            else (("auth off, no credential", None),)
        )
        print(
            f"\nThe gateway's steps inside served ExecuteWorkflow noop calls ({calls} calls "
            f"per credential, h2load, concurrency {concurrency}; µs per call)"
        )
        for label, header in credentials:
            await _h2load(address, body, header, min(calls, 500), concurrency)  # warm
            _totals.clear()
            _fallbacks[0] = 0
            rate = await _h2load(address, body, header, calls, concurrency)
            print(f"{label} ({rate})")
            for _, _, _, step in STEPS:
                n, seconds = _totals.get(step, (0, 0.0))
                if n:
                    print(f"  {step:<28} {seconds / n * 1e6:7.1f}  ({int(n)} calls)")
            if _fallbacks[0]:
                print(f"  reads sent to the driver's thread (a writer held it): {_fallbacks[0]}")


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--calls", type=int, default=10_000, help="calls per credential")
    p.add_argument("--concurrency", type=int, default=16, help="h2load streams")
    p.add_argument(
        "--auth-off", action="store_true", help="serve without authentication (no credential)"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="nexus-auth-probe-") as tmp:
        os.environ.update(
            {
                "BENCH_AUTH": "1",
                "NEXUS_API_KEY_BENCH": API_KEY,
                "NEXUS_JWT_SECRET": JWT_SECRET,
                "NEXUS_DATABASE_URL": f"sqlite:///{Path(tmp) / 'probe.db'}",
            }
        )
        _instrument()
        asyncio.run(_serve(args.calls, args.concurrency, Path(tmp), not args.auth_off))
    return 0


if __name__ == "__main__":
    sys.exit(main())
