"""The server's Prometheus metrics (`Nexus(enable_monitoring=True)`), in one place.

Every call is counted once, by the gateway chain, when it ends: by method, channel and
status code, with its duration and the calls in flight. The execution engine adds the
executions by workflow and final state with their durations, and every node's duration;
authentication refusals are counted by reason. The other gateway checks report through
the hooks below (`rate_limited`, `shed`, `watch_cache`, `watch_breaker`,
`watch_queue`), so that every metric of the server is declared, named and documented
here (docs/operations.md).

With monitoring off there is no `Metrics` object at all: each hook site costs one `if`.

Registries: each `Metrics` has a registry of its own (not prometheus_client's global
one), so two apps in one process (tests, an embedding program) never collide. When
`PROMETHEUS_MULTIPROC_DIR` is set before prometheus_client is first imported, the values
live in that directory's memory-mapped files, shared by every server process, and
`exposition` reads them all through a `MultiProcessCollector` (the gauges of calls in
flight and running executions are summed over live processes). The values read when
scraped (breaker states, cache look-ups, DataFlow's pool) are copied into such files
too, every second and before each scrape (`_Mirror`), so that any process's scrape,
or `nexus serve --workers N`'s parent's, sums every process's. Which of the two modes
is in force is `Metrics.multiprocess`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "BREAKER_STATES",
    "CALL_BUCKETS",
    "MethodMetrics",
    "Metrics",
    "MetricsServer",
    "multiprocess_dir",
]

#: Seconds: from a cached read (~100 µs) to a long execution (a minute).
CALL_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

#: The value `nexus_circuit_breaker_state` reports for each state of a breaker.
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multi-process mode, when it is on."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class _Breakers(Collector):
    """`nexus_circuit_breaker_state`, read from the breakers when scraped (a gauge
    callback: the breaker keeps its own state, the metric only reports it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, Callable[[], str]] = {}

    def watch(self, dependency: str, state: Callable[[], str]) -> None:
        with self._lock:
            self._states[dependency] = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "nexus_circuit_breaker_state",
            "Circuit breaker state by dependency: 0 closed, 1 half-open, 2 open",
            labels=["dependency"],
        )
        with self._lock:
            states = list(self._states.items())
        for dependency, state in states:
            try:
                value = BREAKER_STATES.get(state(), 2)
            except Exception:  # a breaker that cannot say: reported open
                value = 2
            family.add_metric([dependency], value)
        yield family


class _Caches(Collector):
    """`nexus_cache_requests_total`, read from the caches' own counters when scraped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Callable[[], tuple[int, int]]] = {}

    def watch(self, cache: str, counts: Callable[[], tuple[int, int]]) -> None:
        with self._lock:
            self._counts[cache] = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "nexus_cache_requests",
            "Cache look-ups by cache (dataflow, response) and result (hit, miss)",
            labels=["cache", "result"],
        )
        with self._lock:
            caches = list(self._counts.items())
        for cache, counts in caches:
            hits, misses = counts()
            family.add_metric([cache, "hit"], hits)
            family.add_metric([cache, "miss"], misses)
        yield family


class _Queues(Collector):
    """`nexus_queue_*`: the asynchronous executions' queue (`_queue.ExecutionQueue`),
    read from its `snapshot()` when scraped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: list[Callable[[], dict[str, Any]]] = []

    def watch(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        with self._lock:
            self._snapshots.append(snapshot)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        with self._lock:
            snapshots = [snapshot() for snapshot in self._snapshots]
        if not snapshots:
            return
        waiting = GaugeMetricFamily(
            "nexus_queue_waiting",
            "Asynchronous executions waiting in the queue (QUEUED, every replica's), "
            "as counted at the last lease heartbeat",
        )
        running = GaugeMetricFamily(
            "nexus_queue_running", "Queued executions running in this server process"
        )
        capacity = GaugeMetricFamily(
            "nexus_queue_capacity",
            "Queued executions this server process runs at once at most (max_running)",
        )
        claimed = CounterMetricFamily(
            "nexus_queue_claimed", "Queued executions this server process claimed"
        )
        settled = CounterMetricFamily(
            "nexus_queue_settled",
            "Executions of lost server processes this one settled, by the state given "
            "them (QUEUED again, FAILED with EXECUTION_LOST, INTERRUPTED)",
            labels=["state"],
        )
        counted = [s["waiting"] for s in snapshots if s.get("waiting") is not None]
        if counted:
            waiting.add_metric([], max(counted))
        running.add_metric([], sum(s["running"] for s in snapshots))
        capacity.add_metric([], sum(s["max_running"] for s in snapshots))
        claimed.add_metric([], sum(s["claimed_total"] for s in snapshots))
        states: dict[str, int] = {}
        for s in snapshots:
            for state, n in s["settled_total"].items():
                states[state] = states.get(state, 0) + n
        for state, n in sorted(states.items()):
            settled.add_metric([state], n)
        yield from (waiting, running, capacity, claimed, settled)


#: Seconds between two copies of the scrape-time values into the multi-process files.
MIRROR_INTERVAL = 1.0
#: How the processes' values of a mirrored gauge combine (default: their sum).
_GAUGE_MODES: dict[str, Literal["livemax", "livesum"]] = {
    "nexus_circuit_breaker_state": "livemax",  # the worst state of any process's breaker
    "nexus_queue_waiting": "livemax",  # every process counts the same rows
}


class _Mirror:
    """Multi-process mode: the values this process's collectors produce when scraped
    (gauges and counters), copied into prometheus_client metrics whose values live in the
    shared files, so that every process's scrape reads them. Gauges of live processes
    combine by `_GAUGE_MODES` (sum by default); a counter grows by what its source grew.
    Histograms are not copied: theirs are in the files already."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self._collectors = collectors
        self._lock = threading.Lock()
        self._metrics: dict[str, Any] = {}
        self._last: dict[tuple[str, tuple[str, ...]], float] = {}

    def copy(self) -> None:
        with self._lock:
            for collector in list(self._collectors):
                for family in collector.collect():
                    if family.type == "gauge":
                        for sample in family.samples:
                            self._child(Gauge, family, sample).set(sample.value)
                    elif family.type == "counter":
                        for sample in family.samples:
                            if not sample.name.endswith("_total"):
                                continue  # a `_created` sample
                            key = (family.name, tuple(sample.labels.values()))
                            grown = sample.value - self._last.get(key, 0.0)
                            self._last[key] = sample.value
                            if grown > 0:
                                self._child(Counter, family, sample).inc(grown)

    def _child(self, kind: type[Counter] | type[Gauge], family: Any, sample: Any) -> Any:
        """The metric copying `family` (made on first use), at `sample`'s labels."""
        metric = self._metrics.get(family.name)
        if metric is None:
            labels = list(sample.labels)
            if kind is Gauge:
                mode = _GAUGE_MODES.get(family.name, "livesum")
                metric = Gauge(
                    family.name, family.documentation, labels, registry=None,
                    multiprocess_mode=mode,
                )  # fmt: skip
            else:
                metric = Counter(family.name, family.documentation, labels, registry=None)
            self._metrics[family.name] = metric
        return metric.labels(*sample.labels.values()) if sample.labels else metric


def _mirror_every(ref: weakref.ref[_Mirror], interval: float) -> None:
    """Copy while the mirror exists (the thread ends with the `Metrics` it serves)."""
    stop = threading.Event()
    while not stop.wait(interval):
        mirror = ref()
        if mirror is None:
            return
        # a source that cannot say now: the next round catches up
        with contextlib.suppress(Exception):
            mirror.copy()
        del mirror


class Metrics:
    """The server's metrics and the hooks that record them (see the module docstring).

    Args:
        registry: where the metrics are registered; default: a registry of their own.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess_dir() is not None
        r = self.registry
        self.calls = Counter(
            "nexus_calls",
            "Calls ended, by method, channel and gRPC status code",
            ["method", "channel", "code"],
            registry=r,
        )
        self.call_seconds = Histogram(
            "nexus_call_duration_seconds",
            "Call duration in seconds (gateway checks included), by method and channel",
            ["method", "channel"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "nexus_calls_in_flight",
            "Calls being served, by method",
            ["method"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.auth_failures = Counter(
            "nexus_auth_failures",
            "Calls refused by authentication or authorization, by reason and channel",
            ["reason", "channel"],
            registry=r,
        )
        self.executions = Counter(
            "nexus_executions",
            "Executions ended, by workflow and final state",
            ["workflow", "state"],
            registry=r,
        )
        self.execution_seconds = Histogram(
            "nexus_execution_duration_seconds",
            "Execution duration in seconds, by workflow and final state",
            ["workflow", "state"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.executions_running = Gauge(
            "nexus_executions_running",
            "Executions running, by workflow",
            ["workflow"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.node_seconds = Histogram(
            "nexus_node_duration_seconds",
            "Node run time in seconds, by workflow, node type and outcome",
            ["workflow", "node_type", "outcome"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.rate_limited_calls = Counter(
            "nexus_rate_limited",
            "Calls refused by a rate limit (RATE_LIMITED), by method, channel and scope",
            ["method", "channel", "scope"],
            registry=r,
        )
        self.shed_calls = Counter(
            "nexus_load_shed",
            "Calls refused by load shedding, by what was full (calls, executions)",
            ["kind"],
            registry=r,
        )
        # metric children by label values, bound on first use (a `labels()` look-up costs
        # more than the observation itself)
        self._running: dict[str, Any] = {}
        self._ended: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._nodes: dict[tuple[str, str, str], Any] = {}
        self._breakers = _Breakers()
        r.register(self._breakers)
        self._caches = _Caches()
        r.register(self._caches)
        self._queues = _Queues()
        r.register(self._queues)
        self._process: list[Collector] = [self._breakers, self._caches, self._queues]
        self._mirror: _Mirror | None = None
        if self.multiprocess:
            self._mirror = _Mirror(self._process)
            threading.Thread(
                target=_mirror_every,
                args=(weakref.ref(self._mirror), MIRROR_INTERVAL),
                name="nexus-metrics-mirror",
                daemon=True,
            ).start()

    # -- hooks of the chain and the execution engine ---------------------------------------

    def for_method(self, method: str) -> MethodMetrics:
        """The children of `method`'s call metrics (bound once, used per call)."""
        return MethodMetrics(self, method)

    def auth_failure(self, reason: str, channel: str) -> None:
        """Count a call refused by authentication or authorization (`reason`: the
        ErrorInfo reason, e.g. `CREDENTIALS_INVALID`, `PERMISSION_DENIED`)."""
        self.auth_failures.labels(reason, channel).inc()

    def execution_started(self, workflow: str) -> None:
        """An execution of `workflow` starts running in this process."""
        running = self._running.get(workflow)
        if running is None:
            running = self._running[workflow] = self.executions_running.labels(workflow)
        running.inc()

    def execution_ended(self, workflow: str, state: str, seconds: float) -> None:
        """An execution of `workflow` that `execution_started` counted ended in `state`
        (SUCCEEDED, FAILED, CANCELLED) after `seconds`."""
        self._running[workflow].dec()
        ended = self._ended.get((workflow, state))
        if ended is None:
            ended = self._ended[(workflow, state)] = (
                self.executions.labels(workflow, state),
                self.execution_seconds.labels(workflow, state),
            )
        ended[0].inc()
        ended[1].observe(seconds)

    def node_ended(self, workflow: str, node_type: str, outcome: str, seconds: float) -> None:
        """A node of type `node_type` ran for `seconds` (`outcome`: completed, failed)."""
        key = (workflow, node_type, outcome)
        child = self._nodes.get(key)
        if child is None:
            child = self._nodes[key] = self.node_seconds.labels(workflow, node_type, outcome)
        child.observe(seconds)

    # -- hooks the other gateway checks call -----------------------------------------------

    def rate_limited(self, method: str, channel: str, scope: str = "default") -> None:
        """Count a call refused with RATE_LIMITED. `scope`: which limit refused it
        (`default`: `rate_limit`; `workflow`, `model`, `role`: an override)."""
        self.rate_limited_calls.labels(method, channel, scope).inc()

    def shed(self, kind: str) -> None:
        """Count a call refused because `kind` (`calls`, `executions`) was at its cap."""
        self.shed_calls.labels(kind).inc()

    def watch_cache(self, cache: str, counts: Callable[[], tuple[int, int]]) -> None:
        """Report the look-ups of `cache` (`dataflow`: DataFlow's query cache, `response`:
        the workflows' response cache): `counts()` returns its (hits, misses) so far,
        read at every scrape (the caches count in plain integers; nothing per look-up)."""
        self._caches.watch(cache, counts)

    def watch_breaker(self, dependency: str, state: Callable[[], str]) -> None:
        """Report the breaker of `dependency` (e.g. `database`): `state()` returns
        `closed`, `half_open` or `open`, read at every scrape."""
        self._breakers.watch(dependency, state)

    def watch_queue(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Report the asynchronous executions' queue: `snapshot()` is
        `ExecutionQueue.snapshot`, read at every scrape."""
        self._queues.watch(snapshot)

    def add_collector(self, collector: Collector) -> None:
        """Expose `collector` too (read at every scrape, in this process): DataFlow's
        pool and query metrics (`DataFlow(enable_metrics=True)`) come this way."""
        self.registry.register(collector)
        self._process.append(collector)

    # -- exposition -----------------------------------------------------------------------

    def exposition_registry(self) -> CollectorRegistry:
        """What a scrape reads: this registry, or in multi-process mode the values of
        every process (from `PROMETHEUS_MULTIPROC_DIR`), this process's scrape-time
        values copied there first."""
        path = multiprocess_dir()
        if path is None or self._mirror is None:
            return self.registry
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        registry.register(_Fresh(self._mirror))
        multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        return registry

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (what `GET /metrics` returns)."""
        return generate_latest(self.exposition_registry())


class _Fresh(Collector):
    """Copies this process's scrape-time values into the files just before they are
    read (registered ahead of the `MultiProcessCollector`); yields nothing itself."""

    def __init__(self, mirror: _Mirror) -> None:
        self._mirror = mirror

    def collect(self) -> Iterator[Any]:
        self._mirror.copy()
        return iter(())


class MetricsServer:
    """prometheus_client's HTTP server for `metrics`, on `host:port` (0: a free port),
    in a thread of its own: `GET /metrics` (any path) answers the text format."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(
            port, addr=host, registry=metrics.exposition_registry()
        )
        self.port: int = self._server.server_port

    def close(self) -> None:
        """Stop serving (blocks until the serving thread's loop ends, ~0.5 s at most)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class MethodMetrics:
    """One method's metric children, bound once when its handler is wrapped (a label
    look-up per call would cost more than the observation)."""

    __slots__ = ("_calls", "_metrics", "_seconds", "in_flight", "method")

    def __init__(self, metrics: Metrics, method: str) -> None:
        self._metrics = metrics
        self.method = method
        self.in_flight = metrics.in_flight.labels(method)
        self._seconds: dict[str, Any] = {}
        self._calls: dict[tuple[str, str], Any] = {}

    def ended(self, channel: str, code: str, seconds: float) -> None:
        """Record a call of this method that ended with `code` after `seconds`."""
        hist = self._seconds.get(channel)
        if hist is None:
            hist = self._seconds[channel] = self._metrics.call_seconds.labels(self.method, channel)
        hist.observe(seconds)
        counter = self._calls.get((channel, code))
        if counter is None:
            counter = self._calls[(channel, code)] = self._metrics.calls.labels(
                self.method, channel, code
            )
        counter.inc()
