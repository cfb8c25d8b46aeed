"""DataFlow benchmark: generated nodes and the direct API against the raw drivers.

Prints, for SQLite (aiosqlite) and PostgreSQL (asyncpg), measured in the same run:

* single Create and Read-by-id operations per second through the node API (a one-node
  workflow run by AsyncLocalRuntime) and through ``db.ops(Model)``, beside the same
  statement sent with the raw driver, and the ratio;
* BulkCreate rows per second beside raw ``copy_records_to_table`` (PostgreSQL) and a raw
  ``executemany`` in one transaction (SQLite);
* full-text search (``ops.search``: FTS5 on SQLite, tsvector + GIN on PostgreSQL) over
  100,000 records, p50 latency and queries per second, beside a ``$ilike`` listing of
  the same words on the same data (and how fast the rows went in with the index kept);
* time from process start (before the interpreter starts) to a DataFlow with 100 models
  initialised on SQLite;
* the query cache (``enable_caching``): Read by id and a List page at concurrency 16,
  uncached (the baseline) beside cached in memory and in Redis (``cache_url``);
* queries (``--only queries`` for this part alone): List pages and Count of several
  shapes over 10,000 records (a 2-condition filter ordered by an indexed field, an
  ``$in`` list, the next page by token, Count filtered and not) through ``db.ops``,
  beside the raw driver sending the same SQL text (captured from DataFlow's statement
  hook) with the same values on its own connection, in the same run.

Every loop is bounded by a count and by time. Run: ``.venv/bin/python bench/dataflow.py``
(``--quick`` for a short run; ``--only cache`` for the cache part alone; ``--help`` for
sizes).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataflow import DataFlow, field
from workflow import AsyncLocalRuntime, WorkflowBuilder

PG_URL = os.environ.get("NEXUS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("NEXUS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
#: Concurrent callers of the cache measurements.
CACHE_CONCURRENCY = 16
#: Records the cache measurements read from (all of them hot once warmed up).
CACHE_ROWS = 1000
COLS = "id, name, email, score, created_at, updated_at"


async def timed(n: int, max_s: float, fn: Callable[[int], Awaitable[Any]]) -> float:
    """Operations per second of `fn(i)`, for at most `n` calls and about `max_s` seconds."""
    for i in range(min(50, n)):  # warm up (prepared statements, caches)
        await fn(-1 - i)
    start = time.perf_counter()
    done = 0
    deadline = start + max_s
    while done < n:
        await fn(done)
        done += 1
        if done % 64 == 0 and time.perf_counter() > deadline:
            break
    return done / (time.perf_counter() - start)


def line(label: str, value: float, base: float | None = None, unit: str = "ops/s") -> None:
    ratio = f"   ratio {value / base:5.2f}" if base else ""
    print(f"  {label:<44} {value:>12,.0f} {unit}{ratio}", flush=True)


def declare(db: DataFlow) -> type[Any]:
    @db.model
    class Contact:
        id: str
        name: str
        email: str
        score: int = 0

    return Contact


def one_node(node: str, params: dict[str, Any]) -> Any:
    wf = WorkflowBuilder()
    wf.add_node(node, "n", params)
    return wf.build()


async def single_ops(db: DataFlow, raw: RawDriver, n: int, max_s: float) -> None:
    model = declare(db)
    await db.initialize()
    ops = db.ops(model)
    rt = AsyncLocalRuntime()
    create_wf = one_node(
        "ContactCreateNode", {"id": "{{id}}", "name": "{{name}}", "email": "{{email}}"}
    )
    read_wf = one_node("ContactReadNode", {"id": "{{id}}"})
    tag = secrets.token_hex(3)

    def params(prefix: str, i: int) -> dict[str, Any]:
        return {"id": f"{prefix}{tag}-{i}", "name": "Ada", "email": f"{prefix}{i}@x"}

    raw_create = await timed(n, max_s, lambda i: raw.create(params("r", i)))
    node_create = await timed(
        n, max_s, lambda i: rt.execute_workflow_async(create_wf, params("n", i))
    )
    ops_create = await timed(n, max_s, lambda i: ops.create(**params("o", i)))
    line("Create, raw driver", raw_create)
    line("Create, node API (1-node workflow)", node_create, raw_create)
    line("Create, direct API db.ops().create", ops_create, raw_create)

    count = min(n, 1000)

    def pick(prefix: str, i: int) -> str:
        return f"{prefix}{tag}-{i % count}"

    raw_read = await timed(n, max_s, lambda i: raw.read(pick("r", i)))
    node_read = await timed(
        n, max_s, lambda i: rt.execute_workflow_async(read_wf, {"id": pick("o", i)})
    )
    ops_read = await timed(n, max_s, lambda i: ops.read(pick("o", i)))
    line("Read by id, raw driver", raw_read)
    line("Read by id, node API (1-node workflow)", node_read, raw_read)
    line("Read by id, direct API db.ops().read", ops_read, raw_read)


async def bulk(db: DataFlow, raw: RawDriver, rows: int) -> None:
    model = declare(db)
    await db.initialize()
    now = dt.datetime.now(dt.UTC)
    data = [{"name": f"n{i}", "email": f"e{i}@x", "score": i} for i in range(rows)]
    t0 = time.perf_counter()
    await raw.bulk([(str(uuid.uuid4()), d["name"], d["email"], d["score"], now, now) for d in data])
    raw_rate = rows / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    await db.ops(model).bulk_create(data)
    df_rate = rows / (time.perf_counter() - t0)
    line(f"BulkCreate {rows:,} rows, raw {raw.bulk_name}", raw_rate, unit="rows/s")
    line(f"BulkCreate {rows:,} rows, DataFlow", df_rate, raw_rate, unit="rows/s")
    t0 = time.perf_counter()
    out = await AsyncLocalRuntime().execute_workflow_async(
        one_node("ContactBulkCreateNode", {"data": "{{data}}"}),
        {"data": [{"name": d["name"], "email": d["email"]} for d in data]},
    )
    node_rate = out["n"]["created"] / (time.perf_counter() - t0)
    line(f"BulkCreate {rows:,} rows, node API", node_rate, raw_rate, unit="rows/s")


class RawDriver:
    """The same statements with the driver alone."""

    bulk_name = ""

    async def create(self, p: dict[str, Any]) -> Any:
        raise NotImplementedError

    async def read(self, id: str) -> Any:
        raise NotImplementedError

    async def bulk(self, records: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class RawSqlite(RawDriver):
    bulk_name = "aiosqlite executemany"

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, path: str) -> RawSqlite:
        conn = await aiosqlite.connect(path)
        for pragma in ("journal_mode = WAL", "synchronous = NORMAL"):
            await conn.execute(f"PRAGMA {pragma}")
        await conn.execute(
            "CREATE TABLE raw_contact (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
            "email TEXT NOT NULL, score BIGINT NOT NULL, created_at DATETIME NOT NULL, "
            "updated_at DATETIME NOT NULL)"
        )
        await conn.commit()
        return cls(conn)

    async def create(self, p: dict[str, Any]) -> Any:
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(" ")
        # execute_fetchall: aiosqlite's quickest way (one hop to its thread) to a row
        rows = await self.conn.execute_fetchall(
            f"INSERT INTO raw_contact ({COLS}) VALUES (?, ?, ?, ?, ?, ?) RETURNING {COLS}",
            (p["id"], p["name"], p["email"], 0, now, now),
        )
        await self.conn.commit()
        return rows[0]

    async def read(self, id: str) -> Any:
        rows = await self.conn.execute_fetchall(
            f"SELECT {COLS} FROM raw_contact WHERE id = ?", (id,)
        )
        return rows[0]

    async def bulk(self, records: list[tuple[Any, ...]]) -> None:
        # every row shares its timestamps: convert them once, as DataFlow does
        stamp = records[0][4].replace(tzinfo=None).isoformat(" ")
        recs = [(r[0], r[1], r[2], r[3], stamp, stamp) for r in records]
        await self.conn.executemany(
            f"INSERT INTO raw_contact ({COLS}) VALUES (?, ?, ?, ?, ?, ?)", recs
        )
        await self.conn.commit()

    async def close(self) -> None:
        await self.conn.close()


class RawPg(RawDriver):
    bulk_name = "asyncpg copy_records_to_table"

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    @classmethod
    async def open(cls, url: str) -> RawPg:
        conn = await asyncpg.connect(url)
        await conn.execute(
            "CREATE TABLE raw_contact (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
            "email TEXT NOT NULL, score BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL, "
            "updated_at TIMESTAMPTZ NOT NULL)"
        )
        return cls(conn)

    async def create(self, p: dict[str, Any]) -> Any:
        now = dt.datetime.now(dt.UTC)
        return await self.conn.fetchrow(
            f"INSERT INTO raw_contact ({COLS}) VALUES ($1, $2, $3, $4, $5, $6) RETURNING {COLS}",
            p["id"],
            p["name"],
            p["email"],
            0,
            now,
            now,
        )

    async def read(self, id: str) -> Any:
        return await self.conn.fetchrow(f"SELECT {COLS} FROM raw_contact WHERE id = $1", id)

    async def bulk(self, records: list[tuple[Any, ...]]) -> None:
        async with self.conn.transaction():
            await self.conn.copy_records_to_table(
                "raw_contact", records=records, columns=COLS.split(", ")
            )

    async def close(self) -> None:
        await self.conn.close()


STARTUP = """
import asyncio, sys, time
t_import = time.perf_counter()
from dataflow import DataFlow, field
db = DataFlow(sys.argv[1], enable_model_persistence=True)
for i in range({models}):
    db.model(type(f"Model{{i}}", (), {{"__annotations__": {{
        "id": str, "name": str, "email": str | None, "score": int, "active": bool}}}}))
asyncio.run(db.initialize())
"""


# -- full-text search ------------------------------------------------------------------

_SYLLABLES = ["ka", "lo", "mi", "ra", "te", "no", "su", "vi", "de", "pa", "ro", "li", "ma", "zu"]


def _vocabulary(n: int, rng: Any) -> list[str]:
    """`n` distinct made-up words of 2 to 4 syllables (deterministic for a seed)."""
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def declare_searchable(db: DataFlow) -> tuple[type[Any], type[Any]]:
    """A searchable model, and the same fields without search (the insert baseline)."""

    @db.model
    class Document:
        __searchable__ = True
        id: int
        title: str
        author: str
        body: str
        score: int = 0

    @db.model
    class PlainDocument:
        id: int
        title: str
        author: str
        body: str
        score: int = 0

    return Document, PlainDocument


async def search_bench(db: DataFlow, rows: int, queries: int, max_s: float) -> None:
    """Rows in (bulk, the database keeping the search index), then `queries` searches of
    one word and of two words, beside `$ilike` listings of the same words."""
    import random

    rng = random.Random(15)
    vocab = _vocabulary(5000, rng)
    names = vocab[:400]
    Document, PlainDocument = declare_searchable(db)
    await db.initialize()
    ops = db.ops(Document)
    data = [
        {
            "title": " ".join(rng.choices(vocab, k=4)),
            "author": " ".join(rng.choices(names, k=2)),
            "body": " ".join(rng.choices(vocab, k=30)),
            "score": i % 100,
        }
        for i in range(rows)
    ]
    rates = []
    for target in (db.ops(PlainDocument), ops):
        t0 = time.perf_counter()
        for start in range(0, rows, 10_000):
            await target.bulk_create(data[start : start + 10_000])
        rates.append(rows / (time.perf_counter() - t0))
    line("BulkCreate, the same model without search", rates[0], unit="rows/s")
    line("BulkCreate, the search index kept", rates[1], rates[0], unit="rows/s")
    # words of middling frequency (about 30 * rows / 5000 occurrences each)
    words = rng.sample(vocab[400:], 200)
    pairs = [f"{words[i]} {words[i + 1]}" for i in range(0, 198, 2)]

    async def measure(label: str, fn: Callable[[int], Awaitable[Any]]) -> float:
        for i in range(5):  # warm up
            await fn(i)
        lat: list[float] = []
        start = time.perf_counter()
        deadline = start + max_s
        while len(lat) < queries and time.perf_counter() < deadline:
            t = time.perf_counter()
            await fn(len(lat))
            lat.append(time.perf_counter() - t)
        qps = len(lat) / (time.perf_counter() - start)
        print(
            f"  {label:<44} {statistics.median(lat) * 1000:>9.2f} ms p50 {qps:>9,.0f} q/s",
            flush=True,
        )
        return qps

    def ilike(text: str) -> dict[str, Any]:
        per_word = [
            {"$or": [{f: {"$ilike": f"%{w}%"}} for f in ("title", "author", "body")]}
            for w in text.split()
        ]
        return per_word[0] if len(per_word) == 1 else {"$and": per_word}

    for kind, qs in (("one word", words), ("two words", pairs)):
        fts = await measure(
            f"search, {kind}, top 20", lambda i, qs=qs: ops.search(qs[i % len(qs)], limit=20)
        )
        base = await measure(
            f"$ilike, {kind}, first 20",
            lambda i, qs=qs: ops.list(ilike(qs[i % len(qs)]), limit=20),
        )
        print(f"  {'search / $ilike (queries per second)':<44} {fts / base:>9.2f}", flush=True)


def startup(models: int, runs: int) -> None:
    """Wall time of a fresh interpreter that imports DataFlow, declares `models` models
    and initialises them, measured from before the process is started."""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    script = STARTUP.format(models=models)

    def run(args: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True, env=env, timeout=60)
        return time.perf_counter() - t0

    bare, empty, existing = [], [], []
    for _ in range(runs):
        bare.append(run(["-c", "pass"]))
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/startup.db"
            empty.append(run(["-c", script, url]))  # creates the tables
            existing.append(run(["-c", script, url]))  # compares them, changes nothing

    def show(label: str, xs: list[float]) -> None:
        ms = sorted(x * 1000 for x in xs)
        print(f"  {label:<44} {ms[0]:>9.0f} ms min, {statistics.median(ms):.0f} ms median")

    show("bare interpreter start", bare)
    show(f"{models} models initialised, empty database", empty)
    show(f"{models} models initialised, tables exist", existing)


async def concurrently(
    n: int, max_s: float, workers: int, fn: Callable[[int], Awaitable[Any]]
) -> float:
    """Operations per second of `fn(i)` called by `workers` tasks at once, for at most
    `n` calls in all and about `max_s` seconds (after a warm-up of 200 calls)."""
    for i in range(200):
        await fn(i)
    done = 0
    start = time.perf_counter()
    deadline = start + max_s

    async def worker() -> None:
        nonlocal done
        while done < n and time.perf_counter() < deadline:
            done += 1
            await fn(done)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return done / (time.perf_counter() - start)


async def cache_bench(url: str, n: int, max_s: float) -> None:
    """Read by id and List (a page of 20 of a filter, 10 distinct filters) at
    concurrency 16: uncached, cached in memory, cached in Redis."""
    print(f"  -- query cache, {CACHE_CONCURRENCY} concurrent callers, {CACHE_ROWS} records")
    ids: list[str] = []
    setups: list[tuple[str, dict[str, Any]]] = [
        ("uncached", {}),
        ("memory", {"enable_caching": True}),
    ]
    prefix = f"bench-df-cache:{secrets.token_hex(4)}"
    try:
        import redis.asyncio  # noqa: F401

        setups.append(("redis", {"cache_url": REDIS_URL, "cache_prefix": prefix}))
    except ImportError:
        print("  (Redis: skipped, the redis package is not installed)")
    base: dict[str, float] = {}
    for label, options in setups:
        db = DataFlow(url, **options)
        try:
            Contact = declare(db)
            await db.initialize()
            ops = db.ops(Contact)
            if not ids:
                ids = [f"c{i}" for i in range(CACHE_ROWS)]
                rows = [
                    {"id": cid, "name": f"n{i}", "email": f"e{i}@x", "score": i % 10}
                    for i, cid in enumerate(ids)
                ]
                await ops.bulk_create(rows)

            async def read(i: int, ops: Any = ops, ids: list[str] = ids) -> None:
                await ops.read(ids[i % CACHE_ROWS])

            async def page(i: int, ops: Any = ops) -> None:
                await ops.list({"score": {"$gte": i % 10}}, order_by="name", limit=20)

            for what, fn in (("Read", read), ("List (20 of a filter)", page)):
                rate = await concurrently(n, max_s, CACHE_CONCURRENCY, fn)
                if label == "uncached":
                    base[what] = rate
                line(f"{what}, {label}", rate, None if label == "uncached" else base[what])
        finally:
            await db.close()
    if len(setups) == 3:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


#: Records of the query measurements, and how many companies they are spread over.
QUERY_ROWS = 10_000
QUERY_COMPANIES = 10


def declare_item(db: DataFlow) -> type[Any]:
    @db.model
    class Item:
        id: str
        name: str
        company: str | None = None
        score: int = field(default=0, index=True)

    return Item


class RawQuery:
    """One driver connection sending SQL text with positional values, returning rows."""

    def __init__(self, fetch: Callable[[str, list[Any]], Awaitable[Any]]) -> None:
        self.fetch = fetch


async def paired(
    n: int, max_s: float, a: Callable[[int], Awaitable[Any]], b: Callable[[int], Awaitable[Any]]
) -> tuple[float, float]:
    """Operations per second of `a(i)` and of `b(i)`, measured in alternating bursts of
    50 calls (so a busy moment of a shared machine weighs on both alike), for at most `n`
    calls each and about `max_s` seconds in all."""
    for i in range(50):  # warm up (prepared statements, caches)
        await a(-1 - i)
        await b(-1 - i)
    spent = [0.0, 0.0]
    done = 0
    deadline = time.perf_counter() + max_s
    while done < n and time.perf_counter() < deadline:
        for k, fn in enumerate((a, b)):
            start = time.perf_counter()
            for i in range(done, done + 50):
                await fn(i)
            spent[k] += time.perf_counter() - start
        done += 50
    return done / spent[0], done / spent[1]


def placeholders(sql: str) -> int:
    """How many values `sql` takes (SQLite: ``?``; PostgreSQL: ``$n``)."""
    numbered = [int(n) for n in re.findall(r"\$(\d+)", sql)]
    return max(numbered) if numbered else sql.count("?")


def pad_of(sql: str) -> list[int]:
    """The values the raw driver adds for `sql`: SQLAlchemy's SQL (DataFlow before the
    query fast path) binds an offset of 0."""
    return [0] if " OFFSET " in sql else []


async def query_bench(
    db: DataFlow, raw: RawQuery, n: int, max_s: float, verbose: bool = False
) -> None:
    """List and Count shapes through `db.ops`, beside `raw` sending the same SQL."""
    print(f"  -- queries over {QUERY_ROWS:,} records, one caller", flush=True)
    Item = declare_item(db)
    await db.initialize()
    ops = db.ops(Item)
    await ops.bulk_create(
        [
            {
                "id": f"i{i:05d}",
                "name": f"n{i}",
                "company": f"co{i % QUERY_COMPANIES}",
                "score": i,
            }
            for i in range(QUERY_ROWS)
        ]
    )
    await raw.fetch("ANALYZE", [])  # statistics for the planner, as in production
    first = await ops.list(order_by="score", limit=10)
    token = first["next_page_token"]
    last = first["records"][-1]
    top = QUERY_ROWS - 200

    def lo(i: int) -> int:
        return (i * 37) % top

    def co(i: int) -> str:
        return f"co{i % QUERY_COMPANIES}"

    # (label, DataFlow call, the raw driver's values for DataFlow's SQL, target ratio)
    shapes: list[
        tuple[str, Callable[[int], Awaitable[Any]], Callable[[int], list[Any]], float | None]
    ] = [
        (
            "List 10, 2-condition filter, order by indexed",
            lambda i: ops.list(
                {"score": {"$gte": lo(i)}, "company": co(i)}, order_by="score", limit=10
            ),
            lambda i: [lo(i), co(i), 11],
            0.7,
        ),
        (
            "List 10, $in of 10 ids",
            lambda i: ops.list({"id": {"$in": [f"i{lo(i) + k:05d}" for k in range(10)]}}),
            # DataFlow repeats the last value up to a power of two (one statement for
            # lists of 9 to 16): the raw driver binds the same values
            lambda i: (
                [f"i{lo(i) + k:05d}" for k in range(10)]
                + [f"i{lo(i) + 9:05d}"]
                * (placeholders(keyset_sql[0]) - 10 - len(pad_of(keyset_sql[0])))
            ),
            None,
        ),
        (
            "List 10, next page by page_token",
            lambda i: ops.list(order_by="score", limit=10, page_token=token),
            # the score is compared more than once, and bound once a comparison except
            # in PostgreSQL's SQL from this version (numbered once): as many as it takes
            lambda i: (
                [last["score"]] * (placeholders(keyset_sql[0]) - 2 - len(pad_of(keyset_sql[0])))
                + [last["id"], 11]
            ),
            None,
        ),
        (
            "Count, 2-condition filter",
            lambda i: ops.count({"score": {"$gte": lo(i)}, "company": co(i)}),
            lambda i: [lo(i), co(i)],
            0.8,
        ),
        ("Count, no filter", lambda i: ops.count(), lambda i: [], 0.8),
    ]
    seen: list[str] = []
    keyset_sql = [""]  # the SQL of the shape being measured (its values depend on it)

    class _Hook:
        """Records the SQL text DataFlow sends (the statement hook's interface)."""

        def __init__(self, sql: str) -> None:
            seen.append(sql)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: object) -> None:
            return None

    for label, call, values, target in shapes:
        db.set_statement_hook(_Hook)
        await call(0)
        db.set_statement_hook(None)
        sql = seen[-1]
        keyset_sql[:] = [sql]
        if verbose:
            print(f"     {sql!r}")
        pad = pad_of(sql)
        raw_rate, df_rate = await paired(
            n,
            max_s,
            lambda i, sql=sql, values=values, pad=pad: raw.fetch(sql, values(i) + pad),
            call,
        )
        line(f"{label}, raw driver", raw_rate)
        want = f" (target {target})" if target else ""
        line(f"{label}, db.ops{want}", df_rate, raw_rate)


async def run_queries_sqlite(tmp: str, args: argparse.Namespace) -> None:
    db = DataFlow(f"sqlite:///{tmp}/queries.db")
    conn = await aiosqlite.connect(f"{tmp}/queries.db")
    try:

        async def fetch(sql: str, values: list[Any]) -> Any:
            return await conn.execute_fetchall(sql, values)

        await query_bench(db, RawQuery(fetch), args.ops, args.seconds, args.show_sql)
    finally:
        await conn.close()
        await db.close()


async def run_queries_pg(url: str, args: argparse.Namespace) -> None:
    db = DataFlow(url)
    conn = await asyncpg.connect(url)
    try:

        async def fetch(sql: str, values: list[Any]) -> Any:
            return await conn.fetch(sql, *values)

        await query_bench(db, RawQuery(fetch), args.ops, args.seconds, args.show_sql)
    finally:
        await conn.close()
        await db.close()


async def run_sqlite(args: argparse.Namespace) -> None:
    print("SQLite (aiosqlite), file database, WAL", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only == "cache":
            await cache_bench(f"sqlite:///{tmp}/cache.db", args.cache_ops, args.seconds)
            return
        if args.only == "queries":
            await run_queries_sqlite(tmp, args)
            return
        raw = await RawSqlite.open(f"{tmp}/raw.db")
        db = DataFlow(f"sqlite:///{tmp}/df.db")
        try:
            await single_ops(db, raw, args.ops, args.seconds)
        finally:
            await db.close()
            await raw.close()
        raw = await RawSqlite.open(f"{tmp}/raw2.db")
        # one request of `--bulk` rows: above DataFlow's default cap of 10,000
        db = DataFlow(f"sqlite:///{tmp}/df2.db", max_bulk_rows=max(args.bulk, 10_000))
        try:
            await bulk(db, raw, args.bulk)
        finally:
            await db.close()
            await raw.close()
        if args.search_rows:
            print(f"  -- full-text search over {args.search_rows:,} records", flush=True)
            db = DataFlow(f"sqlite:///{tmp}/df3.db")
            try:
                await search_bench(db, args.search_rows, args.search_queries, args.seconds)
            finally:
                await db.close()
        await cache_bench(f"sqlite:///{tmp}/cache.db", args.cache_ops, args.seconds)
        await run_queries_sqlite(tmp, args)


async def run_pg(args: argparse.Namespace) -> None:
    print(f"PostgreSQL (asyncpg) at {PG_URL.rpartition('@')[2]}", flush=True)
    admin = await asyncpg.connect(PG_URL, timeout=5)
    names = [f"nexus_bench_{secrets.token_hex(4)}" for _ in range(5)]
    base = PG_URL.rpartition("/")[0]
    try:
        for name in names:
            await admin.execute(f'CREATE DATABASE "{name}"')
        if args.only == "cache":
            await cache_bench(f"{base}/{names[3]}", args.cache_ops, args.seconds)
            return
        if args.only == "queries":
            await run_queries_pg(f"{base}/{names[4]}", args)
            return
        for name, fn in zip(names[:2], ("single", "bulk"), strict=True):
            url = f"{base}/{name}"
            raw = await RawPg.open(url)
            db = DataFlow(url, max_bulk_rows=max(args.bulk, 10_000))
            try:
                if fn == "single":
                    await single_ops(db, raw, args.ops, args.seconds)
                else:
                    await bulk(db, raw, args.bulk)
            finally:
                await db.close()
                await raw.close()
        if args.search_rows:
            print(f"  -- full-text search over {args.search_rows:,} records", flush=True)
            db = DataFlow(f"{base}/{names[2]}")
            try:
                await search_bench(db, args.search_rows, args.search_queries, args.seconds)
            finally:
                await db.close()
        await cache_bench(f"{base}/{names[3]}", args.cache_ops, args.seconds)
        await run_queries_pg(f"{base}/{names[4]}", args)
    finally:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (a few seconds)")
    p.add_argument("--ops", type=int, help="single operations per measurement (default 3000)")
    p.add_argument("--bulk", type=int, help="rows for BulkCreate (default 100000)")
    p.add_argument("--models", type=int, default=100, help="models for the startup test")
    p.add_argument("--seconds", type=float, default=10.0, help="time cap per measurement")
    p.add_argument("--skip-pg", action="store_true", help="SQLite only")
    p.add_argument(
        "--search-rows", type=int, help="records for the search test (default 100000; 0: skip)"
    )
    p.add_argument(
        "--search-queries", type=int, help="queries per search measurement (default 500)"
    )
    p.add_argument(
        "--only", choices=["all", "cache", "queries"], default="all", help="run one part"
    )
    p.add_argument("--show-sql", action="store_true", help="print the queries' SQL")
    p.add_argument("--cache-ops", type=int, help="calls per cache measurement (default 20000)")
    args = p.parse_args()
    args.cache_ops = args.cache_ops or (3000 if args.quick else 20_000)
    if args.search_rows is None:
        args.search_rows = 10_000 if args.quick else 100_000
    args.search_queries = args.search_queries or (50 if args.quick else 500)
    args.ops = args.ops or (300 if args.quick else 3000)
    args.bulk = args.bulk or (10_000 if args.quick else 100_000)
    if args.quick:
        args.seconds = min(args.seconds, 2.0)
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; ops={args.ops} bulk={args.bulk}"
    )
    asyncio.run(run_sqlite(args))
    if not args.skip_pg:
        asyncio.run(run_pg(args))
    if args.only != "all":
        return
    print(f"Startup (SQLite, process start to initialised, {args.models} models)", flush=True)
    startup(args.models, 3 if args.quick else 7)


if __name__ == "__main__":
    main()
