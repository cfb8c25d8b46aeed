"""DataFlow's Prometheus metrics (`DataFlow(enable_metrics=True)`): connection pool use
and statement latency.

`DataFlowMetrics` is a prometheus_client collector: a program registers it in the
registry it exposes (`Nexus(enable_monitoring=True)` does so itself). The pool gauges are
read from the pool when scraped; statement durations are observed as statements run,
by kind (the statement's first word: select, insert, update, delete, other), on every
path a statement takes (SQLAlchemy, and the driver fast paths).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["QUERY_BUCKETS", "DataFlowMetrics", "statement_kind"]

#: Seconds: from an in-process SQLite read (~20 µs) to a slow query (10 s).
QUERY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
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
    10.0,
)

_KINDS = {"select": "select", "insert": "insert", "update": "update", "delete": "delete"}


def statement_kind(sql: str) -> str:
    """The label of a statement: its first word when a known one, else `other`
    (a `WITH ... SELECT` counts as select)."""
    word = sql.lstrip()[:6].lower()
    if word.startswith("with"):
        return "select"
    return _KINDS.get(word, "other")


#: (in use, idle, max) connections of the pool, when there is one.
PoolUse = Callable[[], tuple[int, int, int] | None]


class DataFlowMetrics(Collector):
    """Pool gauges (read at scrape time) and the statement latency histogram.

    Args:
        database: the `database` label (the dialect: `sqlite`, `postgresql`).
        pool_use: reads the pool's (in use, idle, max) connections.
    """

    def __init__(self, database: str, pool_use: PoolUse) -> None:
        self.database = database
        self._pool_use = pool_use
        # a registry of its own: the histogram is collected through this collector
        self._private = CollectorRegistry(auto_describe=False)
        self.query_seconds = Histogram(
            "dataflow_query_duration_seconds",
            "DataFlow statement duration in seconds, by database and statement kind",
            ["database", "kind"],
            buckets=QUERY_BUCKETS,
            registry=self._private,
        )
        self._children: dict[str, Any] = {}

    def observe(self, sql: str, seconds: float) -> None:
        """Record one statement of `sql` that took `seconds`."""
        kind = statement_kind(sql)
        child = self._children.get(kind)
        if child is None:
            child = self._children[kind] = self.query_seconds.labels(self.database, kind)
        child.observe(seconds)

    def timer(self) -> float:
        return time.perf_counter()

    def collect(self) -> Iterator[Any]:
        yield from self.query_seconds.collect()
        use = self._pool_use()
        if use is None:
            return
        in_use, idle, size = use
        family = GaugeMetricFamily(
            "dataflow_pool_connections",
            "DataFlow connections by state (in_use, idle, max)",
            labels=["database", "state"],
        )
        family.add_metric([self.database, "in_use"], in_use)
        family.add_metric([self.database, "idle"], idle)
        family.add_metric([self.database, "max"], size)
        yield family
