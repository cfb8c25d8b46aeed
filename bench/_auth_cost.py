"""The gateway's admission of one call, timed in process, for each kind of credential.

`bench/grpc.py --only-auth` prints this under its h2load table: the h2load figures say
what authentication costs a served call, and on a shared 2-core machine they move by
10-20 % between rounds; these say where that cost is, to the microsecond. Timed: the
chain's `Gateway._admit` for an ExecuteWorkflow call (read the metadata, authenticate,
authorize; what a call pays before its servicer runs, and the only step that differs
between authentication off and on), and within it `Authenticator.authenticate`, with:

- authentication off (the development label);
- an environment API key (`x-api-key`);
- an HS256 JWT sent on every call (`authorization: Bearer`; verified once, then
  remembered until its `exp`), and a new JWT on every call (the signature check);
- a managed key (`nxk_...`, one database read per call, on a SQLite file in WAL mode).

And the audit entry every call that changes something gets once it ends, authentication
on or off (`Gateway._record`, the trail without its table): not logged (the servers of
`bench/grpc.py` run at `--log-level warning`), and logged as `nexus serve` does by
default (INFO; a handler writing to /dev/null).

Every figure is the best of a few rounds of many calls (wall clock, one event loop).
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from dataflow import DataFlow
from nexus_api.nexus.workflow.v1 import workflow_service_pb2 as wf_pb2
from nexus_server._registry import WorkflowRegistry
from nexus_server.gateway import Gateway, Policy, Principal
from nexus_server.gateway._audit import AuditTrail
from nexus_server.gateway._authn import Authenticator
from nexus_server.gateway._config import AuthConfig
from nexus_server.gateway._keys import KeyStore
from workflow import Node, Output, WorkflowBuilder, register_node

__all__ = ["Cost", "admission_costs"]

PATH = "/nexus.workflow.v1.WorkflowService/ExecuteWorkflow"
AUDIT_PREFIX = "audit entry, "
#: What h2load's calls carry besides the credential (grpc keeps user-agent).
BASE_METADATA: tuple[tuple[str, str], ...] = (("user-agent", "h2load nghttp2"),)
API_KEY = "bench-" + "k" * 40
JWT_SECRET = "bench-" + "s" * 48


@dataclass(frozen=True)
class Cost:
    """µs per call of one credential: the whole admission and, with authentication
    on, the authenticator's part of it (best round; median round in `*_median`)."""

    label: str
    admit_us: float
    admit_median_us: float
    authenticate_us: float | None = None
    authenticate_median_us: float | None = None


@register_node
class BenchAuthNoop(Node):
    """A node for the registry (the admission looks the workflow up, never runs it)."""

    outputs = {"x": Output(int)}

    def run(self) -> dict[str, Any]:
        return {"x": 1}


class _Context:
    """The parts of a grpc servicer context that admission and audit read."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> None:  # the call succeeded
        return None


class _NoAudit:
    def record(self, entry: object) -> None:  # admission records only refusals
        raise AssertionError(f"refused: {entry}")


def _token(subject: str) -> str:
    # a jti of its own: every token made is a new one (the server remembers tokens)
    claims = {
        "sub": subject, "roles": ["bench"], "exp": int(time.time()) + 3600,
        "jti": uuid.uuid4().hex,
    }  # fmt: skip
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


async def _best(run: Callable[[], Awaitable[float]], rounds: int) -> tuple[float, float]:
    times = [await run() for _ in range(rounds)]
    return min(times), statistics.median(times)


async def admission_costs(calls: int = 20_000, rounds: int = 7) -> list[Cost]:
    """The table (see the module docstring); `calls` per round (a tenth of them for the
    database-backed key, a fifth for new JWTs)."""
    with tempfile.TemporaryDirectory(prefix="nexus-auth-cost-") as tmp:
        db = DataFlow(f"sqlite:///{Path(tmp) / 'keys.db'}")
        await db.initialize()
        try:
            return await _measure(db, calls, rounds)
        finally:
            await db.close()


async def _measure(db: DataFlow, calls: int, rounds: int) -> list[Cost]:
    keys = KeyStore(db)
    await keys.initialize()
    _, managed = await keys.create("bench_managed", ["bench"], None, None, "key:bench")
    registry = WorkflowRegistry()
    builder = WorkflowBuilder("One trivial node.")
    builder.add_node("BenchAuthNoop", "noop", {})
    registry.add("noop", builder.build(), builtin=True)
    policy = Policy({"bench": ["workflow:noop:execute"]})
    config = AuthConfig.from_env({"NEXUS_API_KEY_BENCH": API_KEY, "NEXUS_JWT_SECRET": JWT_SECRET})
    authenticator = Authenticator(config, keys)
    common: dict[str, Any] = {
        "policy": policy, "registry": registry, "audit": _NoAudit(), "typed_models": {}
    }  # fmt: skip
    off = Gateway(authenticator=None, **common)
    on = Gateway(authenticator=authenticator, **common)
    request = wf_pb2.ExecuteWorkflowRequest(name="noop")
    rule = on.rule(PATH)

    def admit(gateway: Gateway, metadata: Sequence[tuple[str, str]], n: int) -> Any:
        context = _Context(metadata)

        async def run() -> float:
            started = time.perf_counter()
            for _ in range(n):
                await gateway._admit(PATH, rule, request, context)
            return (time.perf_counter() - started) / n * 1e6

        return run

    def authenticate(metadata: Sequence[tuple[str, str]], n: int) -> Any:
        async def run() -> float:
            started = time.perf_counter()
            for _ in range(n):
                await authenticator.authenticate(metadata)
            return (time.perf_counter() - started) / n * 1e6

        return run

    cases = [
        ("auth off", off, BASE_METADATA, calls),
        ("env API key", on, (*BASE_METADATA, ("x-api-key", API_KEY)), calls),
        ("JWT HS256, same token", on,
         (*BASE_METADATA, ("authorization", f"Bearer {_token('bench')}")), calls),
        ("managed key (DB read)", on, (*BASE_METADATA, ("x-api-key", managed)), calls // 10),
    ]  # fmt: skip
    out = []
    for label, gateway, metadata, n in cases:
        await admit(gateway, metadata, min(n, 200))()  # warm: caches, prepared statements
        admit_best, admit_median = await _best(admit(gateway, metadata, n), rounds)
        auth_best = auth_median = None
        if gateway is on:
            auth_best, auth_median = await _best(authenticate(metadata, n), rounds)
        out.append(Cost(label, admit_best, admit_median, auth_best, auth_median))

    fresh = max(calls // 5, 10)

    async def new_tokens() -> float:
        tokens = [_token(f"user{i}") for i in range(fresh)]  # made outside the clock
        started = time.perf_counter()
        for token in tokens:
            await authenticator.authenticate((*BASE_METADATA, ("authorization", f"Bearer {token}")))
        return (time.perf_counter() - started) / fresh * 1e6

    best, median = await _best(new_tokens, max(rounds // 2, 1))
    out.append(Cost("JWT HS256, a new token", float("nan"), float("nan"), best, median))
    out += _audit_costs(common, request, rule, calls, rounds)
    return out


def _audit_costs(
    common: dict[str, Any], request: Any, rule: Any, calls: int, rounds: int
) -> list[Cost]:
    """The audit entry of one change, not logged and logged (see the module docstring).
    Synchronous, as `Gateway._record` is."""
    gateway = Gateway(authenticator=None, **(common | {"audit": AuditTrail(None, table=False)}))
    context = _Context(BASE_METADATA)
    principal = Principal("key:bench", frozenset({"bench"}), None, "api_key")

    def run() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            gateway._record(PATH, rule, request, principal, "grpc", context)
        return (time.perf_counter() - started) / calls * 1e6

    log = logging.getLogger("nexus.audit")
    saved = log.level, log.propagate, list(log.handlers)
    out = []
    with open(os.devnull, "w") as devnull:
        handler = logging.StreamHandler(devnull)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        try:
            log.propagate = False
            log.handlers = [handler]
            for label, level in (
                (AUDIT_PREFIX + "not logged", logging.WARNING),
                (AUDIT_PREFIX + "logged (INFO)", logging.INFO),
            ):
                log.setLevel(level)
                times = [run() for _ in range(rounds)]
                out.append(Cost(label, min(times), statistics.median(times)))
        finally:
            log.setLevel(saved[0])
            log.propagate = saved[1]
            log.handlers = saved[2]
    return out


def print_costs(costs: Sequence[Cost]) -> None:
    """The tables, µs per call."""
    admissions = [c for c in costs if not c.label.startswith(AUDIT_PREFIX)]
    print("\nAdmission of one ExecuteWorkflow call, in process (µs per call; best / median)")
    header = f"{'credential':<26} {'Gateway._admit':>18} {'of which authenticate':>24}"
    print(header)
    print("-" * len(header))
    for c in admissions:
        admit = "" if c.admit_us != c.admit_us else f"{c.admit_us:.1f} / {c.admit_median_us:.1f}"
        auth = (
            ""
            if c.authenticate_us is None
            else f"{c.authenticate_us:.1f} / {c.authenticate_median_us:.1f}"
        )
        print(f"{c.label:<26} {admit:>18} {auth:>24}")
    print("\nThe audit entry of one change, in process (Gateway._record; µs; best / median)")
    for c in costs:
        if c.label.startswith(AUDIT_PREFIX):
            label = c.label.removeprefix(AUDIT_PREFIX)
            print(f"  {label:<24} {c.admit_us:.1f} / {c.admit_median_us:.1f}")


if __name__ == "__main__":
    print_costs(asyncio.run(admission_costs()))
